"""DroidSpeak (NSDI '26): a receiver recomputes one block of layers from the sender's hidden state.

Sender and receiver are different fine-tunes of one base. Reusing the sender's KV at every layer
breaks quality at a few sensitive layers, so the receiver recomputes the context's KV at one
contiguous block ``[start, stop)`` itself, starting from the sender's hidden state entering
``start`` (the *E-cache*), and uses the sender's KV at every other layer; its own tokens then go
through all of its layers as usual. The sender sends the KV of ``L - (stop - start)`` layers and
one hidden state.

Exact ends: with sender = receiver the block's KV equals the sender's, so any block gives the full
prefill; the block ``[0, L)`` started from the receiver's own embeddings is its own prefill.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ConfigError, WireError
from kvcomm.protocol.hidden import only_layers
from kvcomm.protocol.layout import AttentionLayout
from kvcomm.protocol.sender import SenderKV, cache_tensors, run_body
from kvcomm.protocol.shared import SharedKV


def check_hidden_widths(sender: PreTrainedModel, receiver: PreTrainedModel) -> None:
    """DroidSpeak hands the receiver the sender's hidden state: both must be as wide (two models
    may share a KV layout, which is all the pair's compatibility check compares, and differ here).

    Raises:
        ConfigError: naming both widths.
    """
    widths = [int(model.config.get_text_config().hidden_size) for model in (sender, receiver)]
    if widths[0] != widths[1]:
        raise ConfigError(f"droidspeak hands the receiver the sender's hidden states: the sender's are {widths[0]} "
                          f"wide and the receiver's {widths[1]} (their KV layouts match, their hidden states do not)")


def check_block(start: int, stop: int, num_layers: int) -> None:
    """Refuses a block outside ``0 <= start <= stop <= num_layers`` (``start == stop``: none)."""
    if not 0 <= start <= stop <= num_layers:
        raise ConfigError(f"block {start}:{stop} must satisfy 0 <= start <= stop <= {num_layers}")


def send_block(sender: SenderKV, start: int, stop: int) -> SharedKV:
    """What a DroidSpeak sender gives: every layer's KV in full except the block ``[start, stop)``,
    which is left out, and the hidden state entering ``start`` (recorded by ``prefill(...,
    hidden=[start])``). An empty block (``start == stop``) is plain reuse of every layer.

    Raises:
        ConfigError: a block out of range, covering every layer, or a hidden state not recorded.
    """
    check_block(start, stop, sender.num_layers)
    if stop - start == sender.num_layers:
        raise ConfigError("a block of every layer sends no KV; recompute fewer layers (the receiver's own prefill "
                          "of the text is the skyline)")
    if start < stop and start not in sender.hidden:
        raise ConfigError(f"the sender's hidden state entering layer {start} was not recorded")
    shared = SharedKV.whole(sender)
    shared.hidden = {start: sender.hidden[start]} if start < stop else {}
    shared.token_ids = None  # the receiver recomputes layers, not tokens
    for layer in range(start, stop):
        shared.keys[layer] = shared.keys[layer][:, :, :0]
        shared.values[layer] = shared.values[layer][:, :, :0]
        shared.positions[layer] = shared.positions[layer][:, :0]
        shared.valid[layer] = shared.valid[layer][:, :0]
        shared.full[layer] = False
    return shared


@torch.inference_mode()
def block_kv(model: PreTrainedModel, hidden: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
             start: int, stop: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The context's keys and values at layers ``start..stop-1`` of ``model``, computed from
    ``hidden`` (``[B, C, H]``, the state entering ``start``) at ``positions`` (``[B, C]``)."""
    layers = model.config.get_text_config().num_hidden_layers
    cache = DynamicCache()
    layout = AttentionLayout.empty(layers, hidden.shape[0], hidden.device)
    with only_layers(model, start, stop):
        run_body(model, hidden, valid, cache, layout, head=False, positions=positions)
    keys, values = cache_tensors(cache, skip=start)  # layers before start hold nothing
    return keys, values


def recompute_block(model: PreTrainedModel, shared: SharedKV, start: int, stop: int) -> SharedKV:
    """``shared`` with the receiver's own KV at ``[start, stop)``, computed from the hidden state
    it carries for ``start``: the receiver's cache in DroidSpeak (every layer then full).

    Raises:
        ConfigError: a block out of range, or no full layer to take the context's columns from.
        WireError: no hidden state for ``start``, or one of another width than the model's.
    """
    check_block(start, stop, shared.num_layers)
    if start == stop:
        return shared
    if start not in shared.hidden:
        raise WireError(f"recomputing layers {start}:{stop} needs the sender's hidden state entering layer {start}")
    hidden = shared.hidden[start]
    width = int(model.config.get_text_config().hidden_size)
    if hidden.dim() != 3 or hidden.shape[2] != width:
        raise WireError(f"the hidden state has shape {tuple(hidden.shape)}; this receiver's is [*, *, {width}]")
    absent = [layer for layer in range(shared.num_layers) if shared.keys[layer].shape[2] == 0]
    if absent != list(range(start, stop)) or not all(shared.full[layer] for layer in range(shared.num_layers)
                                                     if layer not in absent):
        raise WireError(f"recomputing layers {start}:{stop} needs exactly those left out and every other layer in "
                        f"full; left out: {absent or 'none'}")
    full = next(layer for layer in range(shared.num_layers) if shared.full[layer])  # send_block keeps one
    valid, positions = shared.valid[full], shared.positions[full]
    if hidden.shape[:2] != valid.shape:
        raise WireError(f"the hidden state covers {hidden.shape[1]} tokens, the context {valid.shape[1]}")
    dtype = next(model.parameters()).dtype
    keys, values = block_kv(model, hidden.to(dtype), valid, positions, start, stop)
    out = replace(shared, keys=list(shared.keys), values=list(shared.values), positions=list(shared.positions),
                  valid=list(shared.valid), full=list(shared.full), hidden={})
    for offset, layer in enumerate(range(start, stop)):
        out.keys[layer], out.values[layer] = keys[offset], values[offset]
        out.positions[layer], out.valid[layer], out.full[layer] = positions, valid, True
    return out
