"""The receiver's side: cache surgery on the sender's KV, prefill on top of it, greedy decoding.

At selected layers the receiver's cache starts with the sender's whole context; at the others
with the sender's first token only (an attention sink). Receiver tokens take positions |C|,
|C|+1, ... at every layer, so selected layers see exactly the concatenated sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ConfigError
from kvcomm.protocol.layout import MASK_MODES, AttentionLayout, ImportanceRecorder
from kvcomm.protocol.rope import inverse_frequencies, rotate_keys
from kvcomm.protocol.sender import SenderKV, follow_on_keys, run_body


@dataclass
class ReceiverInput:
    """What a receiver starts from: a cache, its layout, and how many KV bytes it was given."""

    cache: DynamicCache
    layout: AttentionLayout
    kv_bytes: torch.Tensor  # [B] bytes of received keys and values (sinks included)


@dataclass
class SharedKV:
    """What the sender gives the receiver, layer by layer (left-padded over a batch).

    At a shared layer: the whole context; elsewhere: the sink (first context token) only.

    Attributes:
        keys, values: per layer ``[B, Hkv, P_l, D]``.
        positions: per layer ``[B, P_l]`` RoPE positions of those keys.
        valid: per layer ``[B, P_l]`` False on padding.
        context_len: ``[B]`` |C|, where the receiver's own positions start.
        full: per layer, whether the whole context is shared there.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    valid: list[torch.Tensor]
    context_len: torch.Tensor
    full: list[bool]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def kv_bytes(self) -> torch.Tensor:
        """``[B]`` bytes of the real (non-padding) keys and values of each row."""
        total = torch.zeros(self.context_len.shape[0], dtype=torch.long)
        for keys, valid in zip(self.keys, self.valid):
            total += valid.sum(1) * 2 * keys.shape[1] * keys.shape[3] * keys.element_size()
        return total

    def row(self, index: int) -> SharedKV:
        """One row, padding removed (``B`` = 1)."""
        def cut(tensor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            keep = valid[index]
            return tensor[index:index + 1, ..., keep, :] if tensor.dim() == 4 else tensor[index:index + 1, keep]

        return SharedKV(
            keys=[cut(k, m) for k, m in zip(self.keys, self.valid)],
            values=[cut(v, m) for v, m in zip(self.values, self.valid)],
            positions=[cut(p, m) for p, m in zip(self.positions, self.valid)],
            valid=[m[index:index + 1, m[index]] for m in self.valid],
            context_len=self.context_len[index:index + 1], full=list(self.full),
        )

    @classmethod
    def stack(cls, rows: Sequence[SharedKV]) -> SharedKV:
        """Left-pads single rows back into one batch (the inverse of :meth:`row`)."""
        def pad(tensors: list[torch.Tensor]) -> torch.Tensor:
            width = max(t.shape[-2 if t.dim() == 4 else -1] for t in tensors)
            out = []
            for t in tensors:
                missing = width - t.shape[-2 if t.dim() == 4 else -1]
                out.append(F.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0)))
            return torch.cat(out, dim=0)

        def column(field: str) -> list[torch.Tensor]:
            return [pad([getattr(r, field)[layer] for r in rows]) for layer in range(rows[0].num_layers)]

        return cls(
            keys=column("keys"), values=column("values"), positions=column("positions"), valid=column("valid"),
            context_len=torch.cat([r.context_len for r in rows]), full=list(rows[0].full),
        )


def _gather_sink(tensor: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[B, H, C, D] -> [B, H, 1, D]: each row's first real (non-padding) token."""
    index = first[:, None, None, None].expand(-1, tensor.shape[1], 1, tensor.shape[3])
    return tensor.gather(2, index)


def share(
    model: PreTrainedModel | None, sender: SenderKV, layers: Iterable[int], mode: str = "causal"
) -> SharedKV:
    """Cache surgery: the sender's full KV at ``layers``, its first token (the sink) elsewhere.

    Args:
        model: the receiver; needed only for ``shift-back`` (its RoPE frequencies).
        sender: the sender's KV for a batch.
        layers: indices of the layers whose KV is shared in full.
        mode: ``causal``; ``legacy`` (reference parity: layer 0 is always shared in full, as the
            reference code does) or ``shift-back`` (KVComm-S: the sink key is re-rotated to
            position |C|-1, right before the receiver's first token).

    Raises:
        ConfigError: a layer index is out of range or the mode is unknown.
    """
    if mode not in MASK_MODES:
        raise ConfigError(f"unknown mask mode {mode!r}; valid: {', '.join(MASK_MODES)}")
    selected = {int(layer) for layer in layers}
    bad = sorted(layer for layer in selected if not 0 <= layer < sender.num_layers)
    if bad:
        raise ConfigError(f"layer indices {bad} out of range for a {sender.num_layers}-layer model")
    if mode == "legacy":
        selected.add(0)
    if mode == "shift-back" and model is None:
        raise ConfigError("shift-back mode needs the receiver model for its RoPE frequencies")
    context_len = sender.context_len
    first = sender.valid.int().argmax(dim=1)  # first real column per row (padding may be anywhere)
    sink_pos = torch.zeros_like(context_len)[:, None]
    if mode == "shift-back":
        sink_pos = (context_len - 1).clamp(min=0)[:, None]
    shared = SharedKV([], [], [], [], context_len, [])
    for layer in range(sender.num_layers):
        keys, values = sender.keys[layer], sender.values[layer]
        full = layer in selected
        if not full:
            keys, values = _gather_sink(keys, first), _gather_sink(values, first)
            if mode == "shift-back":
                keys = rotate_keys(keys, sink_pos[:, 0], inverse_frequencies(model, layer))
        shared.keys.append(keys)
        shared.values.append(values)
        shared.positions.append(sender.positions if full else sink_pos)
        shared.valid.append(sender.valid if full else context_len[:, None] > 0)
        shared.full.append(full)
    return shared


def receiver_input(shared: SharedKV, mode: str = "causal") -> ReceiverInput:
    """A receiver cache holding ``shared`` at every layer, and the layout that masks it."""
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(zip(shared.keys, shared.values)):
        cache.update(keys, values, layer)
    batch = shared.context_len.shape[0]
    layout = AttentionLayout(
        prefix_pos=list(shared.positions), prefix_valid=list(shared.valid), context_len=shared.context_len,
        own_pos=torch.zeros(batch, 0, dtype=torch.long), own_valid=torch.zeros(batch, 0, dtype=torch.bool),
        mode=mode,
    )
    return ReceiverInput(cache=cache, layout=layout, kv_bytes=shared.kv_bytes)


def build_receiver_input(
    model: PreTrainedModel | None, sender: SenderKV, layers: Iterable[int], mode: str = "causal"
) -> ReceiverInput:
    """:func:`share` then :func:`receiver_input`: the in-process path, without a wire in between."""
    return receiver_input(share(model, sender, layers, mode), mode)


def empty_input(model: PreTrainedModel, batch: int) -> ReceiverInput:
    """A receiver that was given nothing (baseline and skyline read their own prompt only)."""
    layers = model.config.get_text_config().num_hidden_layers
    return ReceiverInput(DynamicCache(), AttentionLayout.empty(layers, batch), torch.zeros(batch, dtype=torch.long))


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    start: ReceiverInput,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Prefills ``input_ids`` (ids ``[B, T]`` or embeddings ``[B, T, H]``) on top of ``start`` and
    decodes greedily, row by row until a stop id.

    ``on_step(tokens, done)`` is called after every step (streaming, deadlines: it may raise to
    stop). Returns the generated ids of each row, without the stop token.
    """
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    logits = run_body(model, input_ids, valid, start.cache, start.layout, logits_to_keep=1).logits
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)
        done |= torch.isin(token, stops)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
        if on_step is not None:
            on_step(token, done)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        token = token.masked_fill(done, pad_id)
        logits = run_body(model, token[:, None], ~done[:, None], start.cache, start.layout).logits
    return out


@torch.inference_mode()
def prefill_logits(
    model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Receiver logits ``[B, T, V]`` over its whole prompt (used by tests and analysis)."""
    return run_body(model, input_ids, valid, start.cache, start.layout).logits


@torch.inference_mode()
def attention_importance(
    model: PreTrainedModel, sender: SenderKV, input_ids: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per-row, per-layer importance ``[B, L]``: receiver prefill attention mass on the context.

    All layers are shared (as in the reference calibration); nothing is generated, and the
    language-model head is skipped.
    """
    start = build_receiver_input(model, sender, range(sender.num_layers))
    start.layout.recorder = ImportanceRecorder()
    run_body(model, input_ids, valid, start.cache, start.layout, head=False)
    scores = start.layout.recorder.scores
    return torch.stack([scores[layer] for layer in range(sender.num_layers)], dim=1)


def concat_shared(model: PreTrainedModel, parts: Sequence[SharedKV]) -> SharedKV:
    """Several one-row :class:`SharedKV` (e.g. KV messages from different senders) as one context.

    Later parts' full-layer keys are re-rotated to follow the earlier parts' positions; at a
    layer that is a sink in the first part only the first part's sink is kept. Every part must
    share the same set of full layers.
    """
    if len(parts) == 1:
        return parts[0]
    if any(p.full != parts[0].full for p in parts):
        raise ConfigError("KV messages to combine must share the same layers")
    offsets = [torch.zeros_like(parts[0].context_len)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.context_len)
    keys, values, positions, valid = [], [], [], []
    for layer, full in enumerate(parts[0].full):
        chosen = parts if full else parts[:1]
        keys.append(follow_on_keys(model, layer, [p.keys[layer] for p in chosen], offsets))
        values.append(torch.cat([p.values[layer] for p in chosen], dim=2))
        positions.append(torch.cat([p.positions[layer] + o[:, None] for p, o in zip(chosen, offsets)], dim=1))
        valid.append(torch.cat([p.valid[layer] for p in chosen], dim=1))
    context = offsets[-1] + parts[-1].context_len
    return SharedKV(keys, values, positions, valid, context, list(parts[0].full))
