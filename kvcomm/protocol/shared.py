"""Cache surgery: what the sender gives the receiver, layer by layer, and joining several such pieces.

At a shared layer the receiver gets the sender's whole context; elsewhere only the first context
token, an attention sink (or, for passages, the opening of the prompt they were cut from). Pieces
prefilled apart (several senders, several KV messages) are joined by one mechanism,
:func:`concat_shared`: later pieces' keys are re-rotated so that their positions follow the earlier
pieces'.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kvcomm.errors import ConfigError, ProtocolError
from kvcomm.protocol.layout import MASK_MODES, MaskMode
from kvcomm.protocol.rope import inverse_frequencies, rotate_keys
from kvcomm.protocol.sender import SenderKV, check_model_argument


def effective_layers(layers: Iterable[int], mode: MaskMode) -> list[int]:
    """The layers a receiver actually gets in full: ``layers``, plus layer 0 in ``legacy`` mode
    (the reference code always sends it)."""
    chosen = set(layer_indices(layers))
    if mode == "legacy":
        chosen.add(0)
    return sorted(chosen)


def layer_indices(layers: Iterable[int]) -> list[int]:
    """``layers`` as a list of ints: a string (``"15"`` would be read as layers 1 and 5) or a
    number that is not an integer (``20.7``) is refused, not read.

    Raises:
        ConfigError: naming what was given.
    """
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise ConfigError(f"layers are a list or range of layer indices, not {layers!r}")
    indices = []
    for layer in layers:
        try:
            if isinstance(layer, bool):
                raise TypeError
            indices.append(operator.index(layer))
        except TypeError:
            raise ConfigError(f"layer indices are integers; got {layer!r} in the layers given") from None
    return indices


def received_positions(full: bool, tokens: int, context_len: int, sink_position: int) -> torch.Tensor:
    """``[1, tokens]`` RoPE positions of one received layer of a one-row message: the context's
    0..|C|-1 where it is shared in full, else the sink's (none where the layer is left out), or an
    opening's, from the sink's position on (0..``tokens``-1)."""
    return torch.arange(context_len)[None] if full else (sink_position + torch.arange(tokens))[None]


@dataclass
class SharedKV:
    """What the sender gives the receiver, layer by layer (left-padded over a batch).

    At a shared layer: the whole context; elsewhere: the sink (first context token) only, or the
    opening's columns (passages, :func:`share`'s ``opening``), or nothing at a layer the receiver
    computes itself (DroidSpeak's block).

    Attributes:
        keys, values: per layer ``[B, Hkv, P_l, D]``.
        positions: per layer ``[B, P_l]`` RoPE positions of those keys.
        valid: per layer ``[B, P_l]`` False on padding.
        context_len: ``[B]`` |C|, where the receiver's own positions start.
        full: per layer, whether the whole context is shared there.
        mode: the mask mode the receiver must use with it (:data:`~kvcomm.protocol.layout.MaskMode`).
        token_ids: ``[B, C]`` the context's token ids, aligned with a full layer's columns, when
            known (blending recomputes tokens from them).
        hidden: ``{layer: [B, C, H]}`` the sender's hidden states entering those layers, aligned
            with a full layer's columns (recomputing a block of layers starts from them).
        columns: ``[B, C]`` which columns of ``token_ids`` and ``hidden`` are real tokens (not
            padding); None: those of a full layer. Pieces joined where no layer is full in
            all of them (:func:`splice`) need it: no one layer then holds every column.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    valid: list[torch.Tensor]
    context_len: torch.Tensor
    full: list[bool]
    mode: MaskMode = "causal"
    token_ids: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    columns: torch.Tensor | None = None

    @classmethod
    def whole(cls, sender: SenderKV) -> SharedKV:
        """Every layer of ``sender`` in full (what a receiver of all layers gets), with the hidden
        states it recorded."""
        layers = range(sender.num_layers)
        return cls(list(sender.keys), list(sender.values), [sender.positions for _ in layers],
                   [sender.valid for _ in layers], sender.context_len, [True for _ in layers], token_ids=sender.ids,
                   hidden=dict(sender.hidden), columns=sender.valid)

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

    @property
    def sent_bytes(self) -> torch.Tensor:
        """``[B]`` bytes of everything a row sends in process: keys, values and hidden states."""
        total = self.kv_bytes
        for hidden in self.hidden.values():
            total = total + self._columns().sum(1) * hidden.shape[2] * hidden.element_size()
        return total

    def row(self, index: int) -> SharedKV:
        """One row, padding removed (``B`` = 1)."""
        def cut(tensor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            keep = valid[index]
            return tensor[index:index + 1, ..., keep, :] if tensor.dim() == 4 else tensor[index:index + 1, keep]

        columns = self._columns()[index] if self.token_ids is not None or self.hidden or self.columns is not None \
            else None
        return replace(
            self,
            keys=[cut(k, m) for k, m in zip(self.keys, self.valid)],
            values=[cut(v, m) for v, m in zip(self.values, self.valid)],
            positions=[cut(p, m) for p, m in zip(self.positions, self.valid)],
            valid=[m[index:index + 1, m[index]] for m in self.valid],
            context_len=self.context_len[index:index + 1], full=list(self.full),
            token_ids=None if self.token_ids is None else self.token_ids[index:index + 1, columns],
            hidden={layer: h[index:index + 1, columns] for layer, h in self.hidden.items()},
            columns=None if columns is None else torch.ones(1, int(columns.sum()), dtype=torch.bool),
        )

    @property
    def knows_columns(self) -> bool:
        """Whether :meth:`_columns` can answer: a column mask, or a layer shared in full."""
        return self.columns is not None or any(self.full)

    def _columns(self) -> torch.Tensor:
        """``[B, C]`` validity of the context columns: :attr:`columns`, else a full layer's.

        Raises:
            ProtocolError: neither is known (no column mask, and no layer shared in full).
        """
        if self.columns is not None:
            return self.columns
        found = next((v for v, full in zip(self.valid, self.full) if full), None)
        if found is None:
            raise ProtocolError("this KV has no layer shared in full and no column mask: its token ids and hidden "
                                "states cannot be lined up with its context")
        return found

    @classmethod
    def stack(cls, rows: Sequence[SharedKV]) -> SharedKV:
        """Left-pads single rows back into one batch (the inverse of :meth:`row`)."""
        def pad(tensors: list[torch.Tensor]) -> torch.Tensor:
            axis = 1 if tensors[0].dim() in (2, 3) else 2  # [B, C], [B, C, H] or [B, H, C, D]
            width = max(t.shape[axis] for t in tensors)
            out = []
            for t in tensors:
                missing = width - t.shape[axis]
                out.append(F.pad(t, {2: (missing, 0), 3: (0, 0, missing, 0), 4: (0, 0, missing, 0)}[t.dim()]))
            return torch.cat(out, dim=0)

        def column(field: str) -> list[torch.Tensor]:
            return [pad([getattr(r, field)[layer] for r in rows]) for layer in range(rows[0].num_layers)]

        _check_joinable(rows)
        ids = pad([r.token_ids for r in rows]) if all(r.token_ids is not None for r in rows) else None  # type: ignore[misc]
        if any(r.hidden.keys() != rows[0].hidden.keys() for r in rows):
            raise ConfigError("rows to stack must carry hidden states at the same layers")
        return cls(
            keys=column("keys"), values=column("values"), positions=column("positions"), valid=column("valid"),
            context_len=torch.cat([r.context_len for r in rows]), full=list(rows[0].full), mode=rows[0].mode,
            token_ids=ids, hidden={layer: pad([r.hidden[layer] for r in rows]) for layer in rows[0].hidden},
            columns=pad([r._columns() for r in rows]) if all(r.knows_columns for r in rows) else None,
        )


def _gather_sink(tensor: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[B, H, C, D] -> [B, H, 1, D]: each row's first real (non-padding) token."""
    index = first[:, None, None, None].expand(-1, tensor.shape[1], 1, tensor.shape[3])
    return tensor.gather(2, index)


def share(
    model: PreTrainedModel | None, sender: SenderKV, layers: Iterable[int], mode: MaskMode = "causal",
    opening: int = 0,
) -> SharedKV:
    """Cache surgery: the sender's full KV at ``layers``, its first token (the sink) elsewhere.

    Args:
        model: the receiver; needed only for ``shift-back`` (its RoPE frequencies).
        sender: the sender's KV for a batch.
        layers: indices of the layers whose KV is shared in full.
        mode: ``causal``; ``legacy`` (reference parity: layer 0 is always shared in full, as the
            reference code does), ``shift-back`` (KVComm-S: the sink key is re-rotated to
            position |C|-1, right before the receiver's first token), or ``padded-sink`` /
            ``padded-zero`` (a paged engine's view: :data:`~kvcomm.protocol.layout.MaskMode`).
        opening: when > 0, the first ``opening`` columns (the opening of a prompt cut in two, the
            valid ones among them: :func:`kept_columns`) are kept at every other layer instead
            of the sink alone.

    Raises:
        ConfigError: a layer index is out of range, the mode is unknown, or an opening is asked
            in another mode than ``causal`` or is wider than the context.
        ProtocolError: the sender's KV does not start at position 0 (a slice of a longer prefill:
            :func:`~kvcomm.protocol.reply.rebase` it first).
    """
    if model is not None:
        check_model_argument(model)
    if mode not in MASK_MODES:
        raise ConfigError(f"unknown mask mode {mode!r}; valid: {', '.join(MASK_MODES)}")
    selected = _in_range(effective_layers(layers, mode), sender.num_layers)
    if mode == "shift-back" and model is None:
        raise ConfigError("shift-back mode needs the receiver model for its RoPE frequencies")
    if opening:
        return _share_opening(sender, selected, mode, opening)
    expected = sender.valid.long().cumsum(dim=1) - 1  # each row's valid columns at 0, 1, 2, …
    if bool(((sender.positions != expected) & sender.valid).any()):
        raise ProtocolError("the sender's KV must hold positions 0, 1, 2, … (a slice of a longer prefill: rebase it "
                            "to position 0 first)")
    context_len = sender.context_len
    first = sender.first_column
    sink_pos = torch.zeros_like(context_len)[:, None]
    if mode == "shift-back":
        sink_pos = (context_len - 1).clamp(min=0)[:, None]
    sink_valid = context_len[:, None] > 0
    shared = SharedKV([], [], [], [], context_len, [], mode, token_ids=sender.ids, columns=sender.valid)
    for layer in range(sender.num_layers):
        keys, values = sender.keys[layer], sender.values[layer]
        full = layer in selected
        if not full:
            keys, values = _gather_sink(keys, first), _gather_sink(values, first)
            if mode == "shift-back":
                assert model is not None
                keys = rotate_keys(keys, sink_pos[:, 0], inverse_frequencies(model, layer))
        shared.keys.append(keys)
        shared.values.append(values)
        shared.positions.append(sender.positions if full else sink_pos)
        shared.valid.append(sender.valid if full else sink_valid)
        shared.full.append(full)
    return shared


def kept_columns(sender: SenderKV, opening: int = 0) -> torch.Tensor:
    """``[B, C]`` the columns a receiver keeps at layers not shared in full: each row's sink (its
    first real token) or, with ``opening`` > 0, the valid columns among the first ``opening`` (an
    opening piece's width; padding may sit anywhere).

    Raises:
        ConfigError: ``opening`` is negative or wider than the context, or leaves a row without a
            token (no sink).
    """
    if not opening:
        return sender.valid & (sender.valid.cumsum(dim=1) == 1)
    width = sender.valid.shape[1]
    if not 0 < opening <= width:
        raise ConfigError(f"an opening of {opening} columns does not fit a context of {width}")
    kept = sender.valid.clone()
    kept[:, opening:] = False
    if not bool(kept.any(dim=1).all()):
        raise ConfigError("the opening holds no token in some row: it would leave that row without a sink")
    return kept


def _share_opening(sender: SenderKV, selected: set[int], mode: MaskMode, opening: int) -> SharedKV:
    """:func:`share` keeping the opening's columns (not the sink alone) at layers not shared."""
    if mode != "causal":
        raise ConfigError(f"an opening is kept in causal mode only; {mode} moves, pads or leaks around one sink token")
    kept = kept_columns(sender, opening)
    shared = SharedKV([], [], [], [], sender.context_len, [], mode, token_ids=sender.ids, columns=sender.valid)
    for layer in range(sender.num_layers):
        full = layer in selected
        cut = slice(None) if full else slice(0, opening)
        shared.keys.append(sender.keys[layer][:, :, cut])
        shared.values.append(sender.values[layer][:, :, cut])
        shared.positions.append(sender.positions[:, cut])
        shared.valid.append(sender.valid if full else kept[:, :opening])
        shared.full.append(full)
    return shared


def _in_range(layers: Iterable[int], num_layers: int) -> set[int]:
    """``layers`` as a set, each checked against the model's depth (a ConfigError names the bad ones)."""
    chosen = set(layers)
    if bad := sorted(layer for layer in chosen if not 0 <= layer < num_layers):
        raise ConfigError(f"layer indices {bad} out of range for a {num_layers}-layer model")
    return chosen


def share_many(sender: SenderKV, layer_sets: Sequence[Iterable[int]], opening: int = 0) -> SharedKV:
    """Several configurations' shares of one sender's KV as one batch, in ``causal`` mode:
    configuration ``i`` takes rows ``i·B … i·B+B−1``. Every layer holds the whole context for every
    row; a row whose configuration does not share that layer sees only its sink (or its
    ``opening``'s columns, as :func:`share`), the other columns being invalid keys. A receiver then
    computes for each configuration what it computes on :func:`share` of that configuration alone
    (up to float rounding: the tests bound it), and a sweep decodes all of them with one pass over
    the weights per step.

    Raises:
        ConfigError: a layer index is out of range, or the opening does not fit (:func:`kept_columns`).
    """
    sets = [_in_range(effective_layers(layers, "causal"), sender.num_layers) for layers in layer_sets]
    copies = len(sets)
    sink_only = kept_columns(sender, opening)
    positions = sender.positions.repeat(copies, 1)
    masks: dict[tuple[bool, ...], torch.Tensor] = {}  # one tensor per pattern: layers alike share a mask
    valid = []
    for layer in range(sender.num_layers):
        pattern = tuple(layer in chosen for chosen in sets)
        if pattern not in masks:
            masks[pattern] = torch.cat([sender.valid if full else sink_only for full in pattern])
        valid.append(masks[pattern])
    return SharedKV(
        keys=[k.repeat(copies, 1, 1, 1) for k in sender.keys],
        values=[v.repeat(copies, 1, 1, 1) for v in sender.values],
        positions=[positions] * sender.num_layers, valid=valid, context_len=sender.context_len.repeat(copies),
        full=[all(layer in chosen for chosen in sets) for layer in range(sender.num_layers)],
        token_ids=None if sender.ids is None else sender.ids.repeat(copies, 1), columns=sender.valid.repeat(copies, 1),
    )


def follow_on_keys(model: PreTrainedModel, layer: int, keys: Sequence[torch.Tensor],
                   offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Parts' keys ``[B, H, T_i, D]`` concatenated along tokens, part ``i`` re-rotated by
    ``offsets[i]`` (``[B]``) so that its positions follow the earlier parts'."""
    return torch.cat([rotate_keys(k, o, inverse_frequencies(model, layer)) if bool(o.any()) else k
                      for k, o in zip(keys, offsets)], dim=2)


def check_joinable(fulls: Sequence[Sequence[bool]], modes: Sequence[str]) -> None:
    """Pieces joined into one context (or stacked into one batch) share their full layers and their
    mask mode: the one check for the protocol and for the service, which runs it on messages
    before any answer begins.

    Raises:
        ConfigError: naming the layers and modes found.
    """
    if len({tuple(full) for full in fulls}) > 1 or len(set(modes)) > 1:
        found = sorted({f"layers {[i for i, f in enumerate(full) if f]} in {mode} mode"
                        for full, mode in zip(fulls, modes)})
        raise ConfigError(f"KV pieces joined into one context must share their layers and mask mode; got "
                          f"{'; '.join(found)}")


def _check_joinable(parts: Sequence[SharedKV]) -> None:
    check_joinable([p.full for p in parts], [p.mode for p in parts])


def concat_shared(model: PreTrainedModel, parts: Sequence[SharedKV]) -> SharedKV:
    """Several pieces of shared KV (e.g. KV messages from different senders) as one context, in order.

    Each piece was prefilled from position 0; later pieces' keys at full layers are re-rotated to
    follow the earlier pieces' positions (padding may then sit between pieces: masks only look at
    validity). At a sink layer only the first piece's sink (or opening) is kept (in ``shift-back``
    mode the sink is moved next to the joined context's end). Every piece must share the same full layers and mode.
    """
    check_model_argument(model)
    if len(parts) == 1:
        return parts[0]
    _check_joinable(parts)
    if any(p.hidden for p in parts):
        raise ConfigError("pieces carrying hidden states (for recomputing layers) are used one at a time, not joined")
    offsets = [torch.zeros_like(parts[0].context_len)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.context_len)
    context = offsets[-1] + parts[-1].context_len
    shift = context - parts[0].context_len  # how far a shifted-back sink moves
    keys, values, positions, valid = [], [], [], []
    for layer, full in enumerate(parts[0].full):
        chosen = parts if full else parts[:1]
        if full:
            keys.append(follow_on_keys(model, layer, [p.keys[layer] for p in chosen], offsets))
            positions.append(torch.cat([p.positions[layer] + o[:, None] for p, o in zip(chosen, offsets)], dim=1))
        elif parts[0].mode == "shift-back":
            keys.append(follow_on_keys(model, layer, [parts[0].keys[layer]], [shift]))
            positions.append(parts[0].positions[layer] + shift[:, None])
        else:
            keys.append(parts[0].keys[layer])
            positions.append(parts[0].positions[layer])
        values.append(torch.cat([p.values[layer] for p in chosen], dim=2))
        valid.append(torch.cat([p.valid[layer] for p in chosen], dim=1))
    ids, columns = _joined_columns(parts)
    return SharedKV(keys, values, positions, valid, context, list(parts[0].full), parts[0].mode, token_ids=ids,
                    columns=columns)


def splice(model: PreTrainedModel, parts: Sequence[SharedKV]) -> SharedKV:
    """Pieces joined in order where they may share different layers: at each layer only the pieces
    that are full there take part, at the positions they would have with every piece present (a
    piece left out of a layer leaves a gap, which masks ignore). The first piece must be full at
    every layer (e.g. the hearer's own prompt so far): its first token is each layer's sink.

    This is how an agent graph places heard turns inside a prompt, between the hearer's own text
    segments (KVCOMM's placeholders); with every piece full everywhere it is :func:`concat_shared`.
    The result takes the first piece's mask mode (later pieces' sinks are not used).
    """
    check_model_argument(model)
    if not all(parts[0].full):
        raise ConfigError("the first piece of a splice must be full at every layer (it holds the sinks)")
    offsets = [torch.zeros_like(parts[0].context_len)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.context_len)
    keys, values, positions, valid = [], [], [], []
    for layer in range(parts[0].num_layers):
        chosen = [(p, o) for p, o in zip(parts, offsets) if p.full[layer]]
        keys.append(follow_on_keys(model, layer, [p.keys[layer] for p, _ in chosen], [o for _, o in chosen]))
        values.append(torch.cat([p.values[layer] for p, _ in chosen], dim=2))
        positions.append(torch.cat([p.positions[layer] + o[:, None] for p, o in chosen], dim=1))
        valid.append(torch.cat([p.valid[layer] for p, _ in chosen], dim=1))
    full = [all(p.full[layer] for p in parts) for layer in range(parts[0].num_layers)]
    ids, columns = _joined_columns(parts)
    return SharedKV(keys, values, positions, valid, offsets[-1] + parts[-1].context_len, full, parts[0].mode,
                    token_ids=ids, columns=columns)


def _joined_columns(parts: Sequence[SharedKV]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The joined context's token ids (when every piece has them) and its column mask: each piece's,
    in order. None where a piece does not know its columns (no mask, no full layer)."""
    ids = None
    if all(p.token_ids is not None for p in parts):
        ids = torch.cat([p.token_ids for p in parts], dim=1)  # type: ignore[misc]
    return ids, torch.cat([p._columns() for p in parts], dim=1) if all(p.knows_columns for p in parts) else None


def merge_senders(model: PreTrainedModel, senders: Sequence[SenderKV]) -> SenderKV:
    """Several senders' KV as one context, in order, with consistent positions: every layer of each
    sender is a full piece joined by :func:`concat_shared` (the reference code leaves positions
    overlapping)."""
    if len(senders) == 1:
        return senders[0]
    joined = concat_shared(model, [SharedKV.whole(s) for s in senders])
    return SenderKV(joined.keys, joined.values, joined.positions[0], joined.valid[0], joined.token_ids)
