"""The receiver's side: cache surgery on the sender's KV, prefill on top of it, greedy decoding.

At selected layers the receiver's cache starts with the sender's whole context; at the others
with the sender's first token only (an attention sink). Receiver tokens take positions |C|,
|C|+1, ... at every layer, so selected layers see exactly the concatenated sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ConfigError
from kvcomm.protocol.layout import AttentionLayout, ImportanceRecorder
from kvcomm.protocol.rope import inverse_frequencies, rotate_keys
from kvcomm.protocol.sender import SenderKV, run_body


@dataclass
class ReceiverInput:
    """What a receiver starts from: a cache, its layout, and how many KV bytes it was given."""

    cache: DynamicCache
    layout: AttentionLayout
    kv_bytes: torch.Tensor  # [B] bytes of received keys and values (sinks included)


def _gather_sink(tensor: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[B, H, C, D] -> [B, H, 1, D]: each row's first real (non-padding) token."""
    index = first[:, None, None, None].expand(-1, tensor.shape[1], 1, tensor.shape[3])
    return tensor.gather(2, index)


def build_receiver_input(
    model: PreTrainedModel | None,
    sender: SenderKV,
    layers: Iterable[int],
    mode: str = "causal",
) -> ReceiverInput:
    """Builds the receiver cache: full sender KV at ``layers``, the sink token elsewhere.

    Args:
        model: the receiver; needed only for ``shift-back`` (its RoPE frequencies).
        sender: the sender's KV for a batch.
        layers: indices of the layers whose KV is shared in full.
        mode: ``causal``, ``legacy`` (reference parity: layer 0 is always shared in full, as the
            reference code does, and masks are sliced) or ``shift-back`` (KVComm-S).

    Raises:
        ConfigError: a layer index is out of range or the mode is unknown.
    """
    selected = set(int(layer) for layer in layers)
    bad = sorted(layer for layer in selected if not 0 <= layer < sender.num_layers)
    if bad:
        raise ConfigError(f"layer indices {bad} out of range for a {sender.num_layers}-layer model")
    if mode == "legacy":
        selected.add(0)
    if mode == "shift-back" and model is None:
        raise ConfigError("shift-back mode needs the receiver model for its RoPE frequencies")
    batch = sender.valid.shape[0]
    context_len = sender.context_len
    first = sender.valid.shape[1] - context_len  # left padding: first real column per row
    sink_pos = torch.zeros(batch, 1, dtype=torch.long)
    if mode == "shift-back":
        sink_pos = (context_len - 1).clamp(min=0)[:, None]  # sink right before the receiver

    cache = DynamicCache()
    prefix_pos, prefix_valid = [], []
    kv_bytes = torch.zeros(batch, dtype=torch.long)
    for layer in range(sender.num_layers):
        keys, values = sender.keys[layer], sender.values[layer]
        if layer in selected:
            prefix_pos.append(sender.positions)
            prefix_valid.append(sender.valid)
            kv_bytes += context_len * sender.token_bytes(layer)
        else:
            keys, values = _gather_sink(keys, first), _gather_sink(values, first)
            if mode == "shift-back":
                keys = rotate_keys(keys, sink_pos[:, 0], inverse_frequencies(model, layer))
            prefix_pos.append(sink_pos)
            prefix_valid.append(context_len[:, None] > 0)
            kv_bytes += (context_len > 0).long() * sender.token_bytes(layer)
        cache.update(keys, values, layer)
    layout = AttentionLayout(
        prefix_pos=prefix_pos,
        prefix_valid=prefix_valid,
        context_len=context_len,
        own_pos=torch.zeros(batch, 0, dtype=torch.long),
        own_valid=torch.zeros(batch, 0, dtype=torch.bool),
        mode=mode,
    )
    return ReceiverInput(cache=cache, layout=layout, kv_bytes=kv_bytes)


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
) -> list[list[int]]:
    """Prefills ``input_ids`` on top of ``start`` and decodes greedily, row by row until a stop id.

    Returns the generated ids of each row, without the stop token.
    """
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    logits = run_body(model, input_ids, valid, start.cache, start.layout, with_logits=True, logits_to_keep=1)
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)
        done |= torch.isin(token, stops)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        token = token.masked_fill(done, pad_id)
        logits = run_body(model, token[:, None], ~done[:, None], start.cache, start.layout, with_logits=True)
    return out


@torch.inference_mode()
def prefill_logits(
    model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Receiver logits ``[B, T, V]`` over its whole prompt (used by tests and analysis)."""
    return run_body(model, input_ids, valid, start.cache, start.layout, with_logits=True)


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
    run_body(model, input_ids, valid, start.cache, start.layout, with_logits=False)
    scores = start.layout.recorder.scores
    return torch.stack([scores[layer] for layer in range(sender.num_layers)], dim=1)
