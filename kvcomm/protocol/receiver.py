"""The receiver's starting point: a cache holding the shared KV, and the layout that masks it.

At selected layers the receiver's cache starts with the sender's whole context; at the others
with the sender's first token only (an attention sink). Receiver tokens take positions |C|,
|C|+1, ... at every layer, so selected layers see exactly the concatenated sequence. In the
``padded-*`` modes the sink-only layers are widened here, at injection, as a paged engine would
(:mod:`kvcomm.protocol.padded`); the message itself stays compact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ProtocolError, WireError
from kvcomm.protocol.layout import AttentionLayout, MaskMode
from kvcomm.protocol.padded import pad_sink_layers
from kvcomm.protocol.sender import SenderKV, cache_tensors
from kvcomm.protocol.shared import SharedKV, share


@dataclass
class ReceiverInput:
    """What a receiver starts from: a cache, its layout, and how many KV bytes it was given.

    One prefill's: the cache grows with the tokens prefilled and decoded on it, so a second
    prefill on it (``greedy_generate``, ``generate_turn``, ``prefill_logits``) is refused (build
    one per question: :func:`receiver_input` again on the same :class:`SharedKV`)."""

    cache: DynamicCache
    layout: AttentionLayout
    kv_bytes: torch.Tensor  # [B] bytes of received keys and values (sinks included)
    used: bool = False  # a prefill ran on it (:func:`take`)


def check_unused(start: ReceiverInput) -> None:
    """Refuses ``start`` if a prefill used it before.

    Raises:
        ProtocolError: it was used (its cache holds that prompt's tokens).
    """
    if start.used:
        raise ProtocolError("this receiver input was used by an earlier prefill or generation, whose tokens its "
                            "cache now holds: build one per question (receiver_input or build_receiver_input again)")


def take(start: ReceiverInput) -> None:
    """Marks ``start`` used by a prefill (its cache now holds that prompt's tokens).

    Raises:
        ProtocolError: a prefill used it before (:func:`check_unused`).
    """
    check_unused(start)
    start.used = True


def keep_rows(start: ReceiverInput, rows: torch.Tensor) -> None:
    """Keeps only the batch rows ``rows`` (indices ``[b]``, in their new order) of a started
    receiver: its cache at every layer and its layout (``kv_bytes`` keeps every row: it counts what
    was received). Decoding calls it when rows have finished, so that later steps compute only
    the rows still answering.

    Raises:
        ProtocolError: ``start`` was not used by a prefill (nothing of it is decoding), or importance
            is being recorded.
    """
    if not start.used:
        raise ProtocolError("rows leave a receiver's batch only while it decodes, after its prefill")
    start.layout = start.layout.select_rows(rows)
    keys, values = cache_tensors(start.cache)
    for layer, k, v in zip(start.cache.layers, keys, values):
        setattr(layer, "keys", k.index_select(0, rows))  # noqa: B010  (cache layers of every kind, to mypy)
        setattr(layer, "values", v.index_select(0, rows))  # noqa: B010


def receiver_input(shared: SharedKV) -> ReceiverInput:
    """A receiver cache holding ``shared`` at every layer, and the layout (in ``shared.mode``) that masks it.

    ``kv_bytes`` counts what was received, before a ``padded-*`` mode widens the sink-only layers.

    Raises:
        WireError: a layer is left out (a DroidSpeak message: only ``recompute_block`` can use it).
    """
    if absent := [layer for layer, keys in enumerate(shared.keys) if keys.shape[2] == 0]:
        raise WireError(f"layers {absent[0]}:{absent[-1] + 1} are left out of this KV; only a droidspeak receiver, "
                        "which recomputes them from the sender's hidden state, can use it")
    received = shared.kv_bytes
    shared = pad_sink_layers(shared)
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(zip(shared.keys, shared.values)):
        cache.update(keys, values, layer)
    batch = shared.context_len.shape[0]
    layout = AttentionLayout(
        prefix_pos=list(shared.positions), prefix_valid=list(shared.valid), context_len=shared.context_len,
        own_pos=torch.zeros(batch, 0, dtype=torch.long), own_valid=torch.zeros(batch, 0, dtype=torch.bool),
        mode=shared.mode,
    )
    return ReceiverInput(cache=cache, layout=layout, kv_bytes=received)


def build_receiver_input(
    model: PreTrainedModel | None, sender: SenderKV, layers: Iterable[int], mode: MaskMode = "causal"
) -> ReceiverInput:
    """:func:`~kvcomm.protocol.shared.share` then :func:`receiver_input`: the in-process path."""
    return receiver_input(share(model, sender, layers, mode))


def empty_input(model: PreTrainedModel, batch: int) -> ReceiverInput:
    """A receiver that was given nothing (baseline and skyline read their own prompt only)."""
    layers = model.config.get_text_config().num_hidden_layers
    return ReceiverInput(DynamicCache(), AttentionLayout.empty(layers, batch), torch.zeros(batch, dtype=torch.long))
