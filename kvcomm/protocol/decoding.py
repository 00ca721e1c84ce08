"""Prefill on top of a receiver's starting cache, then greedy decoding, batched and left-padded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral

import torch
from transformers import PreTrainedModel

from kvcomm.errors import ConfigError
from kvcomm.protocol.fork import Fork, forked_prefill
from kvcomm.protocol.receiver import ReceiverInput, check_unused, keep_rows, take
from kvcomm.protocol.sender import check_rows, run_body

LEAVE_AT = 4
"""Finished rows leave a decoding batch once they are at least 1/``LEAVE_AT`` of the rows still
computed: each later step then computes (and appends KV for) only the rows still answering. The
cache is copied once for the rows that stay, about what one step's append copies anyway, so
rows leave in a few large groups rather than one by one. 0: rows never leave."""


def check_budget(max_new_tokens: object, least: int = 1) -> int:
    """``max_new_tokens`` if it is an answer budget: a whole number of at least ``least`` (0 where
    a prompt's KV alone is wanted: :func:`~kvcomm.protocol.reply.generate_turn`).

    Raises:
        ConfigError: anything else (before, ``"5"`` failed in arithmetic and ``-1`` gave empty replies).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < least:
        raise ConfigError(f"max_new_tokens (the answer budget) is a whole number of at least {least}, not "
                          f"{max_new_tokens!r}")
    return int(max_new_tokens)


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
    prefill_chunk: int | None = None,
    check: Callable[[], None] | None = None,
    fork: Fork | None = None,
) -> list[list[int]]:
    """Prefills ``input_ids`` (ids ``[B, T]`` or embeddings ``[B, T, H]``) on top of ``start`` and
    decodes greedily, row by row until a stop id. Finished rows leave the batch in groups
    (:data:`LEAVE_AT`); ``start`` is spent, and its cache and layout may hold fewer rows than
    the batch (its ``kv_bytes`` keeps them all).

    Args:
        on_step: ``on_step(tokens, done)`` after every decoding step (streaming): ``[B]`` tokens
            (``pad_id`` for a row that finished at an earlier step) and ``[B]`` done flags.
        prefill_chunk: prefill at most this many prompt tokens per forward (same result; a long
            prompt then gives ``check`` a chance between chunks).
        check: called between prefill chunks and decoding steps; it raises to stop (a deadline, a
            client that went away).
        fork: rows that agree below a layer share its prefill there (:mod:`kvcomm.protocol.fork`;
            not with ``prefill_chunk``).

    Returns:
        the generated ids of each row, without the stop token.

    Raises:
        ConfigError: a budget below 1 token.
        ProtocolError: ``start`` was used by an earlier prefill or generation (its cache holds those tokens).
    """
    check_budget(max_new_tokens)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    logits = chunked_prefill(model, start, input_ids, valid, prefill_chunk, check, fork)
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    running = torch.arange(batch)  # the batch rows the model still computes, in the cache's order
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        token = torch.full((batch,), pad_id, dtype=torch.long)
        token[running] = logits[:, -1].argmax(dim=-1)
        token.masked_fill_(done, pad_id)  # a row that finished at an earlier step gives padding
        done |= torch.isin(token, stops)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
        if on_step is not None:
            on_step(token, done)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if check is not None:
            check()
        going = ~done[running]
        if LEAVE_AT * int((~going).sum()) >= len(running) and start.layout.recorder is None:
            kept = going.nonzero().flatten()
            keep_rows(start, kept)
            running = running[kept]
        step_tokens = token.masked_fill(done, pad_id)[running][:, None]  # a row that just finished: padding
        logits = run_body(model, step_tokens, ~done[running][:, None], start.cache, start.layout).logits
    return out


def chunked_prefill(model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor,
                    chunk: int | None, check: Callable[[], None] | None = None,
                    fork: Fork | None = None) -> torch.Tensor:
    """The last position's logits ``[B, 1, V]`` after prefilling ``input_ids`` ``chunk`` tokens at a
    time (all at once if None), calling ``check`` before each chunk; with ``fork``, in one forward
    whose lower layers run once per distinct row (:func:`~kvcomm.protocol.fork.forked_prefill`).

    Raises:
        ConfigError: a row with no token to prefill (its logits would be a padding query's), or a
            fork asked with chunks.
        ProtocolError: ``start`` was used by an earlier prefill (:func:`~kvcomm.protocol.receiver.take`),
            or a fork's rows differ from their sources.
    """
    _check_prompt(model, start, input_ids, valid)
    if fork is not None:
        if chunk is not None:
            raise ConfigError("a forked prefill runs in one forward: prefill it without chunks")
        if check is not None:
            check()
        return forked_prefill(model, start, input_ids, valid, fork)  # checks the fork, then takes start
    take(start)
    width = input_ids.shape[1]
    step = width if chunk is None else max(1, chunk)
    logits = None
    for begin in range(0, width, step):
        if check is not None:
            check()
        end = min(width, begin + step)
        logits = run_body(model, input_ids[:, begin:end], valid[:, begin:end], start.cache, start.layout,
                          logits_to_keep=1).logits
    assert logits is not None, "a prompt has at least one token"
    return logits


@torch.inference_mode()
def prefill_logits(
    model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Receiver logits ``[B, T, V]`` over its whole prompt (used by tests and analysis)."""
    _check_prompt(model, start, input_ids, valid)
    take(start)
    return run_body(model, input_ids, valid, start.cache, start.layout).logits


def _check_prompt(model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor) -> None:
    """``start`` is unused (:func:`~kvcomm.protocol.receiver.check_unused`; a used one may hold
    fewer rows, once finished rows left its decoding), :func:`check_rows` for a receiver's prompt
    on it, and every row has a token (a row without one would give a padding query's logits)."""
    check_unused(start)
    check_rows(model, input_ids, valid, int(start.layout.context_len.shape[0]))
    if empty := (~valid.any(dim=1)).nonzero().flatten().tolist():
        raise ConfigError(f"row {empty[0]} of the batch has no prompt token: a receiver prefills at least one")
