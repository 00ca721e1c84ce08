"""Prefilling a batch whose prompts begin alike: the common opening once, the rest per row.

Chat prompts of one task share their template's opening (the system prompt, the instruction):
44 of the 57–94 tokens of SmolLM2's Countries sender prompts. :func:`prefix_start` prefills that
opening once, for a batch of one, and returns a starting point that holds it at every layer of
every row; the rest of each prompt is then prefilled on top of it, exactly as a receiver
prefills its prompt on top of received KV (the layout numbers the rows' own tokens after the
prefix). :func:`prefill_shared` does this for a sender and returns the same left-padded
:class:`~kvcomm.protocol.sender.SenderKV` as :func:`~kvcomm.protocol.sender.prefill` (equal up
to float rounding, which the tests bound). :func:`continuing` starts a prompt from KV already
computed for its first tokens by another prefill: the skyline's prompt opens with the sender's
chat up to the end of the context, so a sweep's skyline reads only the question on top of the
sender's KV.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from kvcomm.errors import ProtocolError
from kvcomm.protocol.receiver import ReceiverInput, empty_input, receiver_input
from kvcomm.protocol.sender import SenderKV, cache_tensors, pad_left, prefill, run_body
from kvcomm.protocol.shared import SharedKV

MIN_PREFIX = 8  # shorter common openings are not worth a forward pass of their own


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many tokens every row begins with, leaving each row at least one token of its own."""
    if not rows:
        return 0
    first, shortest = rows[0], min(len(row) for row in rows)
    length = 0
    while length < shortest - 1 and all(row[length] == first[length] for row in rows):
        length += 1
    return length


def shared_opening(rows: Sequence[Sequence[int]], min_prefix: int = MIN_PREFIX) -> int:
    """How many tokens :func:`prefix_start` prefills once for ``rows``: their common opening, or 0
    for one row or an opening shorter than ``min_prefix``."""
    length = common_prefix(rows) if len(rows) > 1 else 0
    return length if length >= min_prefix else 0


def prefix_start(
    model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int, min_prefix: int = MIN_PREFIX
) -> tuple[ReceiverInput, torch.Tensor, torch.Tensor]:
    """A starting point holding the rows' common opening (prefilled once), and the rest of each
    row left-padded (``ids [B, T]``, ``valid [B, T]``) to prefill on top of it.

    With one row, or an opening shorter than ``min_prefix``, the start is empty and the rest is
    every row whole.
    """
    length = shared_opening(rows, min_prefix)
    if not length:
        return (empty_input(model, len(rows)), *pad_left(rows, pad_id))
    opening = torch.tensor([list(rows[0][:length])], dtype=torch.long)
    head = prefill(model, opening, torch.ones_like(opening, dtype=torch.bool))
    batch = len(rows)
    every_row = SenderKV(
        keys=[k.expand(batch, -1, -1, -1) for k in head.keys],
        values=[v.expand(batch, -1, -1, -1) for v in head.values],
        positions=head.positions.expand(batch, -1), valid=head.valid.expand(batch, -1),
    )
    return (receiver_input(SharedKV.whole(every_row)), *pad_left([row[length:] for row in rows], pad_id))


def continuing(kv: SenderKV, rows: Sequence[Sequence[int]], opening: Sequence[int],
               pad_id: int) -> tuple[ReceiverInput, torch.Tensor, torch.Tensor]:
    """A starting point holding each row's first ``opening[row]`` tokens, taken from ``kv`` (a
    prefill from position 0 of token lists that begin with those tokens: its KV of them is what a
    prefill of ``rows`` computes, up to float rounding), and the rest of each row left-padded
    (``ids [B, T]``, ``valid [B, T]``) to prefill on top of it.

    Raises:
        ProtocolError: ``kv`` does not hold those tokens at positions ``0 ..`` (another text, or KV
            moved to other positions).
    """
    head = kv.leading(opening)
    expected = [list(row[:count]) for row, count in zip(rows, opening)]
    held = [ids[ok].tolist() for ids, ok in zip(head.ids, head.valid)] if head.ids is not None else None
    places = [pos[ok].tolist() for pos, ok in zip(head.positions, head.valid)]
    if held != expected or places != [list(range(count)) for count in opening]:
        raise ProtocolError("this KV is not a prefill of the rows' opening tokens from position 0")
    return (receiver_input(SharedKV.whole(head)), *pad_left([row[count:] for row, count in zip(rows, opening)], pad_id))


@torch.inference_mode()
def prefill_shared(
    model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int, min_prefix: int = MIN_PREFIX
) -> SenderKV:
    """:func:`~kvcomm.protocol.sender.prefill` of ``rows`` (token id lists), computing their common
    opening once: the same left-padded KV, positions, validity and ids."""
    start, ids, valid = prefix_start(model, rows, pad_id, min_prefix)
    if not start.layout.prefix_pos[0].shape[1]:  # no opening worth sharing
        return prefill(model, ids, valid)
    run_body(model, ids, valid, start.cache, start.layout, head=False)
    keys, values = cache_tensors(start.cache)
    layout = start.layout
    positions = torch.cat([layout.prefix_pos[0], layout.own_pos], dim=1)
    present = torch.cat([layout.prefix_valid[0], layout.own_valid], dim=1)
    opening = torch.tensor(list(rows[0][:layout.prefix_pos[0].shape[1]]), dtype=torch.long)
    tokens = torch.cat([opening.expand(len(rows), -1), ids], dim=1)
    # [opening ; padding ; rest] -> [padding ; opening ; rest]: padding first, order kept.
    order = torch.sort(present.to(torch.int8), dim=1, stable=True).indices  # [B, W]
    packed_valid = present.gather(1, order)

    def packed(tensor: torch.Tensor) -> torch.Tensor:
        index = order[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
        return tensor.gather(2, index)

    return SenderKV(
        keys=[packed(k) for k in keys], values=[packed(v) for v in values],
        positions=positions.gather(1, order).masked_fill(~packed_valid, 0), valid=packed_valid,
        ids=tokens.gather(1, order),
    )
