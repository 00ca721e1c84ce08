"""A sender's prefill that computes only what it shares: layers above the deepest one it sends
in full are computed for the attention sink alone.

A receiver gets a message's context in full at the shared layers and only the sender's first
token (the sink) at the others. A prefill's KV at layer ``l`` depends on layers ``0..l`` only,
so every context token's KV is needed up to the deepest shared layer ``d``; above it only the
sink's, and the first token attends to nothing but itself, so its KV is the same computed alone
(up to float rounding: one row through the same weights). Sharing the middle half of the layers
(SmolLM2 7–21 of 30, Qwen2.5 7–20 of 28) the context then goes through 22 of 30 or 21 of 28
layers, not all of them. :func:`shallow_share` equals ``share(model, prefill(...), layers,
mode)`` at every shared layer bit for bit and at the sink-only layers within float rounding
(tests bound both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import PreTrainedModel

from kvcomm.protocol.layout import MaskMode
from kvcomm.protocol.sender import SenderKV, prefill
from kvcomm.protocol.shared import SharedKV, effective_layers, layer_indices, share


def depth_needed(layers: Iterable[int], mode: MaskMode, num_layers: int) -> int:
    """How many layers (from layer 0) a sender must compute for every context token to share
    ``layers`` in ``mode``: one past the deepest layer shared in full (0 when none is)."""
    chosen = effective_layers(layers, mode)
    return min(num_layers, chosen[-1] + 1) if chosen else 0


@torch.inference_mode()
def shallow_share(
    model: PreTrainedModel, input_ids: torch.Tensor, valid: torch.Tensor, layers: Iterable[int],
    mode: MaskMode = "causal", chunk: int | None = None, check: Callable[[], None] | None = None,
) -> SharedKV:
    """``share(model, prefill(model, input_ids, valid, chunk=chunk, check=check), layers, mode)``
    for one row without padding, computing the context only through the deepest shared layer and
    the sink alone above it. Batches, padded rows and one-token contexts take the whole prefill
    (their sinks are not each row's column 0, or there is nothing to save).

    Raises:
        ConfigError: a layer index is out of range or the mode is unknown (as :func:`share`).
    """
    layers = layer_indices(layers)  # a string or a float refused, not read
    num_layers = model.config.get_text_config().num_hidden_layers
    depth = depth_needed(layers, mode, num_layers)
    if depth >= num_layers or input_ids.shape[0] != 1 or input_ids.shape[1] < 2 or not bool(valid.all()):
        return share(model, prefill(model, input_ids, valid, chunk=chunk, check=check), layers, mode)
    sink = prefill(model, input_ids[:, :1], valid[:, :1])  # every layer, for the first token alone
    if depth:
        shallow = prefill(model, input_ids, valid, chunk=chunk, check=check, depth=depth)
        keys, values = shallow.keys + sink.keys[depth:], shallow.values + sink.values[depth:]
    else:  # nothing shared in full: the sink is all the message holds
        if check is not None:
            check()
        keys, values = sink.keys, sink.values
    width = input_ids.shape[1]
    kv = SenderKV(keys=keys, values=values, positions=torch.arange(width)[None, :],
                  valid=torch.ones(1, width, dtype=torch.bool), ids=input_ids)
    return share(model, kv, layers, mode)  # reads only column 0 (the sink) of the layers above ``depth``
