"""Who may attend to whom: positions and validity of every key, layer by layer.

A receiver's cache differs per layer: selected layers hold the sender's whole context, the others
only its first token (the attention sink). Transformers builds one causal mask sized for one layer,
which is exactly the reference code's bug (a sliced mask lets receiver tokens see the future at
sink-only layers). Instead, every key carries its RoPE position and a validity bit, and the mask of
each layer is derived from those: a query sees a valid key whose position is not after its own.
Left padding (batches) is just invalid keys; sliding windows compare the same positions.

Two further modes show what a paged serving engine (vLLM) would make of the same message: every
layer of a request owns the same token slots there, so a sink-only layer must fill all |C| slots
and cannot mask them (:mod:`kvcomm.protocol.padded`). Their masks are the causal ones; what
differs is the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from kvcomm.errors import ConfigError, ProtocolError

MaskMode = Literal["causal", "legacy", "shift-back", "padded-sink", "padded-zero"]
"""How a receiver reads a message (:class:`AttentionLayout`'s ``mode`` says each): ``causal`` (masks from key
positions: kvcomm's default), ``legacy`` (the reference code's one sliced mask, and layer 0 always
sent: its answers), ``shift-back`` (KVComm-S: the sink re-rotated next to the receiver),
``padded-sink`` / ``padded-zero`` (a paged engine's view: sink-only layers filled to the whole
context with copies of the sink or with zeros, unmasked; :mod:`kvcomm.protocol.padded`)."""
MASK_MODES: tuple[str, ...] = get_args(MaskMode)


@dataclass
class ImportanceRecorder:
    """Collects, per layer, the prefill attention mass that queries put on received context keys.

    ``scores[layer]`` is a ``[B]`` tensor: per row, the mean over heads and valid query tokens of
    the attention probability on context keys 1..|C|-1 (the sink, key 0, is excluded as in the
    reference code), and not on the ``kept`` columns (``[B, C]``, e.g. a passages opening, which a
    receiver holds at every layer whether the layer is shared or not). It is filled one layer at a
    time by the attention function, so no layer's full attention matrix outlives that layer's forward.
    """

    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    kept: torch.Tensor | None = None


@dataclass
class AttentionLayout:
    """Positions and validity of the keys a model attends over during one batched exchange.

    Keys of layer ``l`` are ``[prefix_l ; own]``: ``prefix_l`` is what was received for that layer
    (nothing, the sink, or the whole context), ``own`` are the tokens this model processed itself.

    Attributes:
        prefix_pos: per layer, ``[B, P_l]`` RoPE positions of received keys.
        prefix_valid: per layer, ``[B, P_l]`` whether each received key is real (not padding).
        context_len: ``[B]`` valid context tokens per row; own tokens are numbered from here.
        own_pos: ``[B, R]`` positions of own tokens processed so far.
        own_valid: ``[B, R]`` whether each own token is real.
        mode: ``causal`` (correct masks), ``legacy`` (the reference code's sliced mask),
            ``shift-back`` (KVComm-S: the sink is re-rotated next to the receiver; masks causal),
            ``padded-sink`` or ``padded-zero`` (a paged engine's view: sink-only layers padded to
            the whole context, unmasked; masks causal).
        recorder: when set, prefill attention importance is recorded (calibration).
    """

    prefix_pos: list[torch.Tensor]
    prefix_valid: list[torch.Tensor]
    context_len: torch.Tensor
    own_pos: torch.Tensor
    own_valid: torch.Tensor
    mode: MaskMode = "causal"
    recorder: ImportanceRecorder | None = None
    # Masks already derived, with the tensors they were derived from: layers that received the
    # same keys (every sink-only layer, every full one) share one mask per forward step.
    _masks: dict[tuple[int, int, int, int | None], tuple[tuple[torch.Tensor, ...], torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MASK_MODES:
            raise ConfigError(f"unknown mask mode {self.mode!r}; valid: {', '.join(MASK_MODES)}")

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, device: torch.device | str = "cpu") -> AttentionLayout:
        """A layout with nothing received: a model reading its own prompt (sender, baseline, skyline)."""
        none = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return cls(
            prefix_pos=[none] * num_layers,
            prefix_valid=[none.bool()] * num_layers,
            context_len=torch.zeros(batch_size, dtype=torch.long, device=device),
            own_pos=none,
            own_valid=none.bool(),
        )

    def append(self, valid: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Registers ``[B, T]`` new own tokens and returns their position ids ``[B, T]``.

        Real tokens continue each row's numbering (``context_len`` + tokens seen so far); padding
        gets the row's next position too but is never visible as a key. ``positions`` places the
        tokens explicitly instead (recomputing context tokens where they stand: blending).
        """
        if positions is None:
            seen = self.own_valid.sum(dim=1, keepdim=True)
            positions = self.context_len[:, None] + seen + valid.long().cumsum(dim=1) - valid.long()
        self.own_pos = torch.cat([self.own_pos, positions], dim=1)
        self.own_valid = torch.cat([self.own_valid, valid], dim=1)
        self._masks.clear()
        return positions

    def select_rows(self, rows: torch.Tensor) -> AttentionLayout:
        """A layout of the batch rows ``rows`` only (indices, in their new order): the rows that go
        on decoding, or the distinct rows of a fork. Layers that shared one tensor here share one
        there too (and so one mask).

        Raises:
            ProtocolError: importance is being recorded (its scores are per row of this batch).
        """
        if self.recorder is not None:
            raise ProtocolError("rows cannot be taken out of a batch whose attention importance is being recorded")
        picked: dict[int, torch.Tensor] = {}

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in picked:
                picked[id(tensor)] = tensor.index_select(0, rows)
            return picked[id(tensor)]

        return AttentionLayout(
            prefix_pos=[pick(t) for t in self.prefix_pos], prefix_valid=[pick(t) for t in self.prefix_valid],
            context_len=self.context_len.index_select(0, rows), own_pos=self.own_pos.index_select(0, rows),
            own_valid=self.own_valid.index_select(0, rows), mode=self.mode)

    def mask(self, layer: int, query_len: int, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean mask ``[B, 1, T, K]`` (True = may attend) for the last ``query_len`` own tokens."""
        inputs = (self.prefix_pos[layer], self.prefix_valid[layer], self.own_pos, self.own_valid, self.context_len)
        key = (id(inputs[0]), id(inputs[1]), query_len, sliding_window)
        known = self._masks.get(key)
        if known is not None and all(a is b for a, b in zip(known[0], inputs)):
            return known[1]
        mask = self._derive_mask(layer, query_len, sliding_window)
        self._masks[key] = (inputs, mask)
        return mask

    def _derive_mask(self, layer: int, query_len: int, sliding_window: int | None) -> torch.Tensor:
        prefix_pos, prefix_valid = self.prefix_pos[layer], self.prefix_valid[layer]
        key_pos = torch.cat([prefix_pos, self.own_pos], dim=1)  # [B, K]
        key_valid = torch.cat([prefix_valid, self.own_valid], dim=1)
        query_pos = self.own_pos[:, -query_len:]  # [B, T]
        if self.mode == "legacy":
            # The reference builds one causal mask for a full-context layer (query i at index
            # |C|+i) and slices its first K columns; at a sink-only layer own token j sits at
            # column 1+j, so query i sees own tokens up to i+|C|-1. Index-based ordering:
            own_index = self.own_pos - self.context_len[:, None]
            order_keys = torch.cat([prefix_pos, prefix_valid.sum(1, keepdim=True) + own_index], dim=1)
        else:
            order_keys = key_pos
        visible = key_valid[:, None, :] & (order_keys[:, None, :] <= query_pos[:, :, None])
        if sliding_window is not None:
            visible &= (query_pos[:, :, None] - key_pos[:, None, :]) < sliding_window
        # A padding query may see nothing; let it see everything so softmax stays finite. Its
        # output is never used: padding is invalid as a key and its logits are ignored.
        visible |= ~visible.any(dim=-1, keepdim=True)
        return visible[:, None]

    def context_keys(self, layer: int) -> torch.Tensor:
        """``[B, P_l]`` received keys that count as context for importance (valid, not the sink)."""
        return self.prefix_valid[layer] & (self.prefix_pos[layer] >= 1)
