"""An agent's turn as KV: greedy decoding that keeps the KV of everything the agent read and wrote.

In a multi-agent graph what an agent sends onward is mostly what it *said*. :func:`generate_turn`
decodes like :func:`~kvcomm.protocol.decoding.greedy_generate`, but feeds every accepted token
(the last one too), so the cache ends up holding the KV of the agent's prompt and its whole reply;
each row's part of it comes back as a :class:`~kvcomm.protocol.sender.SenderKV` (padding removed),
at the positions the agent used. Shared onward, a receiver reads the turn without re-reading it as
text: with every layer sent, what it computes equals a prefill of the prompt, the reply and its own
tokens in one sequence (the tests check this on three model families).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from transformers import PreTrainedModel

from kvcomm.protocol.decoding import check_budget, chunked_prefill
from kvcomm.protocol.layout import MaskMode
from kvcomm.protocol.receiver import ReceiverInput
from kvcomm.protocol.rope import inverse_frequencies, rotate_keys
from kvcomm.protocol.sender import SenderKV, cache_tensors, check_model_argument, run_body
from kvcomm.protocol.shared import SharedKV, share


@dataclass
class Turn:
    """What an agent produced: each row's reply ids (without the stop token) and the KV of its own
    tokens (prompt and reply; the KV it was given is not repeated)."""

    replies: list[list[int]]
    kv: list[SenderKV]
    first_token_s: float = 0.0  # from the call to the first token's logits (prefill)


@torch.inference_mode()
def generate_turn(model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor,
                  max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                  on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                  prefill_chunk: int | None = None, check: Callable[[], None] | None = None) -> Turn:
    """Prefills ``input_ids`` (``[B, T]``, left-padded) on ``start``, decodes greedily, and returns the
    replies with the KV of each row's prompt and reply (see the module docstring). ``on_step``,
    ``prefill_chunk`` and ``check`` work as in :func:`~kvcomm.protocol.decoding.greedy_generate`."""
    check_budget(max_new_tokens, least=0)  # 0: the prompt's KV alone (a graph's text segments)
    began = time.perf_counter()
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    logits = chunked_prefill(model, start, input_ids, valid, prefill_chunk, check)
    first_token_s = time.perf_counter() - began
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    replies: list[list[int]] = [[] for _ in range(batch)]
    fed = [input_ids]
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)
        done |= torch.isin(token, stops)
        if on_step is not None:
            on_step(token, done)
        if bool(done.all()):
            break
        if check is not None:
            check()
        for row in (~done).nonzero().flatten().tolist():
            replies[row].append(int(token[row]))
        step = token.masked_fill(done, pad_id)[:, None]
        fed.append(step)
        logits = run_body(model, step, ~done[:, None], start.cache, start.layout).logits  # the token's KV too
    own = start.layout.own_valid.shape[1]  # the prompt and the fed reply tokens, after any given prefix
    keys, values = cache_tensors(start.cache)
    ids = torch.cat(fed, dim=1)
    whole = SenderKV(keys=[k[:, :, -own:] for k in keys], values=[v[:, :, -own:] for v in values],
                     positions=start.layout.own_pos, valid=start.layout.own_valid, ids=ids)
    return Turn(replies, [whole.row(i) for i in range(batch)], first_token_s)


def outgoing(model: PreTrainedModel, kv: SenderKV, reply_tokens: int, content: Literal["reply", "turn"],
             layers: Iterable[int], mode: MaskMode = "causal") -> SharedKV:
    """What one row's turn (``Turn.kv[i]``) sends onward: the reply tokens' KV (at least one token,
    so a reply that stopped at once still sends the token that asked for it) or the whole turn's,
    moved to start at position 0 and cut to ``layers`` (the sink elsewhere)."""
    if content == "reply":
        keep = slice(kv.keys[0].shape[2] - max(1, reply_tokens), None)
        kv = SenderKV(keys=[k[:, :, keep] for k in kv.keys], values=[v[:, :, keep] for v in kv.values],
                      positions=kv.positions[:, keep], valid=kv.valid[:, keep],
                      ids=None if kv.ids is None else kv.ids[:, keep])
    return share(model, rebase(model, kv), layers, mode)


def rebase(model: PreTrainedModel, kv: SenderKV) -> SenderKV:
    """Each row moved to start at position 0 (keys re-rotated), as a message holds it: a turn taken
    after other KV starts where that KV ended, a passage prefilled behind an opening after it.
    Each row moves by the position of its first real (not padding) column."""
    check_model_argument(model)
    offset = kv.positions.gather(1, kv.first_column[:, None])[:, 0]
    if not bool(offset.any()):
        return kv
    keys = [rotate_keys(k, -offset, inverse_frequencies(model, layer)) for layer, k in enumerate(kv.keys)]
    return replace(kv, keys=keys, positions=(kv.positions - offset[:, None]).masked_fill(~kv.valid, 0))
