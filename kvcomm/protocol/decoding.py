"""Prefill on top of a receiver's starting cache, then greedy decoding, batched and left-padded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from kvcomm.protocol.receiver import ReceiverInput
from kvcomm.protocol.sender import run_body


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
