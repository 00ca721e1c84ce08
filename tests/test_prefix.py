"""A batch's common opening prefilled once: the same KV and the same answers as prefilling every row whole."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import ProtocolError
from kvcomm.protocol import (
    build_receiver_input,
    common_prefix,
    continuing,
    empty_input,
    greedy_generate,
    pad_left,
    prefill,
    prefill_shared,
    prefix_start,
)
from kvcomm.protocol.decoding import chunked_prefill
from tests.conftest import tiny_model

torch.set_grad_enabled(False)


def rows_with_opening(opening: int, rests: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 99, (opening,), generator=generator).tolist()
    return [head + torch.randint(1, 99, (n,), generator=generator).tolist() for n in rests]


def test_common_prefix_leaves_every_row_a_token_of_its_own():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert common_prefix([[7, 2], [1, 2]]) == 0
    assert common_prefix([[5, 6, 7]]) == 2 and common_prefix([]) == 0


def test_shared_prefill_equals_prefilling_every_row(family):
    model = tiny_model(family)
    rows = rows_with_opening(10, (3, 9, 1, 6))  # Gemma3's sliding window (6) crosses the opening
    reference = prefill(model, *pad_left(rows, 0))
    got = prefill_shared(model, rows, 0, min_prefix=4)
    assert torch.equal(got.valid, reference.valid) and torch.equal(got.ids, reference.ids)
    assert torch.equal(got.positions[got.valid], reference.positions[reference.valid])
    assert torch.equal(got.positions, reference.positions)  # padding keeps prefill's position 0 too
    for k, v, rk, rv in zip(got.keys, got.values, reference.keys, reference.values):
        valid = reference.valid[:, None, :, None].expand_as(rk)
        assert (k - rk)[valid].abs().max().item() <= 1e-5 and (v - rv)[valid].abs().max().item() <= 1e-5


def test_no_opening_worth_sharing_is_a_plain_prefill():
    model = tiny_model("llama")
    rows = rows_with_opening(3, (4, 6))
    reference = prefill(model, *pad_left(rows, 0))
    got = prefill_shared(model, rows, 0)  # 3 tokens < MIN_PREFIX: one forward, no split
    assert all(torch.equal(a, b) for a, b in zip(got.keys, reference.keys))
    start, ids, valid = prefix_start(model, rows, 0)
    assert start.layout.prefix_pos[0].shape[1] == 0 and torch.equal(ids, pad_left(rows, 0)[0])


def test_a_receiver_on_a_shared_prefill_answers_as_on_the_plain_one(family):
    model = tiny_model(family)
    senders = rows_with_opening(9, (2, 7, 4), seed=1)
    receivers = [torch.randint(1, 99, (n,)).tolist() for n in (5, 3, 6)]
    r_ids, r_valid = pad_left(receivers, 0)

    def answers(kv):
        start = build_receiver_input(model, kv, [0, 2])
        return greedy_generate(model, start, r_ids, r_valid, 6, stop_ids=[98], pad_id=0)

    assert answers(prefill_shared(model, senders, 0, min_prefix=4)) == answers(prefill(model, *pad_left(senders, 0)))


@pytest.mark.parametrize("same", [False, True])
def test_prompts_on_a_shared_opening_give_the_logits_and_answers_of_whole_prompts(family, same):
    model = tiny_model(family)
    rows = rows_with_opening(12, (5, 2, 8), seed=2)
    if same:  # identical prompts: each keeps its last token to prefill on the opening
        rows = [rows[0]] * 3
    ids, valid = pad_left(rows, 0)
    whole = chunked_prefill(model, empty_input(model, len(rows)), ids, valid, None)
    start, rest, rest_valid = prefix_start(model, rows, 0, min_prefix=4)
    assert start.layout.prefix_pos[0].shape[1] == (16 if same else 12) and rest.shape[1] == (1 if same else 8)
    shared = chunked_prefill(model, start, rest, rest_valid, None)
    assert (shared - whole).abs().max().item() <= 1e-4
    plain = greedy_generate(model, empty_input(model, len(rows)), ids, valid, 5, stop_ids=[98], pad_id=0)
    start, rest, rest_valid = prefix_start(model, rows, 0, min_prefix=4)
    assert greedy_generate(model, start, rest, rest_valid, 5, stop_ids=[98], pad_id=0) == plain


@pytest.mark.parametrize("with_opening", [False, True], ids=["sink", "opening"])
def test_configurations_decoded_together_answer_as_each_alone(family, with_opening):
    """Also where rows keep an opening (a first piece of 2-3 tokens) at layers not shared."""
    from kvcomm.protocol import merge_senders, prefill_logits, receiver_input, share, share_many

    model = tiny_model(family)
    senders = rows_with_opening(3, (6, 2, 9), seed=3)
    receivers = [torch.randint(1, 99, (n,)).tolist() for n in (4, 7, 5)]
    kv, opening = prefill(model, *pad_left(senders, 0)), 0
    if with_opening:  # as passages are: the opening piece, then the rest, joined
        heads = [row[:3] if i else row[:2] for i, row in enumerate(senders)]
        first = prefill(model, *pad_left(heads, 0))
        kv = merge_senders(model, [first, prefill(model, *pad_left([r[len(h):] for r, h in zip(senders, heads)], 0))])
        opening = first.valid.shape[1]
    r_ids, r_valid = pad_left(receivers, 0)
    configurations = [[1, 2], [0, 1, 2, 3], [3]]
    together = receiver_input(share_many(kv, configurations, opening))
    copies = len(configurations)
    logits = prefill_logits(model, together, r_ids.repeat(copies, 1), r_valid.repeat(copies, 1))
    answers = greedy_generate(model, receiver_input(share_many(kv, configurations, opening)),
                              r_ids.repeat(copies, 1), r_valid.repeat(copies, 1), 6, stop_ids=[98], pad_id=0)
    for i, layers in enumerate(configurations):
        alone = receiver_input(share(model, kv, layers, opening=opening))
        rows = slice(3 * i, 3 * i + 3)
        expected = prefill_logits(model, alone, r_ids, r_valid)
        assert (logits[rows] - expected)[r_valid].abs().max().item() <= 1e-5
        assert answers[rows] == greedy_generate(model, receiver_input(share(model, kv, layers, opening=opening)),
                                                r_ids, r_valid, 6, stop_ids=[98], pad_id=0)
    if with_opening:  # the opening is more than the sink: it changes what unshared layers give
        sink = prefill_logits(model, receiver_input(share(model, kv, [1, 2])), r_ids, r_valid)
        assert (sink - logits[:3])[r_valid].abs().max().item() > 1e-3


def test_leading_keeps_each_rows_first_tokens_left_padded():
    model = tiny_model("llama")
    rows = [torch.randint(1, 99, (n,)).tolist() for n in (6, 3, 9)]
    kv = prefill(model, *pad_left(rows, 0))
    head = kv.leading([4, 3, 2])
    assert head.valid.tolist() == [[True] * 4, [False, True, True, True], [False, False, True, True]]
    assert [ids[ok].tolist() for ids, ok in zip(head.ids, head.valid)] == [rows[0][:4], rows[1], rows[2][:2]]
    assert head.positions.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 1]]
    for row, count in enumerate((4, 3, 2)):
        for k, kk in zip(head.row(row).keys, kv.row(row).keys):
            assert torch.equal(k, kk[:, :, :count])
    with pytest.raises(ProtocolError):
        kv.leading([7, 3, 2])  # row 0 holds 6 tokens
    with pytest.raises(ProtocolError):
        kv.leading([0, 3, 2])


def test_a_prompt_continuing_a_prefill_of_its_opening_equals_the_prompt_whole(family):
    """The skyline's path: another prefill's KV of each row's opening (of different lengths), and the
    rest on top: the logits and answers of prefilling the rows whole."""
    model = tiny_model(family)
    openings = [torch.randint(1, 99, (n,)).tolist() for n in (9, 5, 12)]
    earlier = [row + [7, 8] for row in openings]  # the other prompt goes on differently (a chat's closing)
    rows = [row + torch.randint(1, 99, (n,)).tolist() for row, n in zip(openings, (3, 6, 2))]
    kv = prefill(model, *pad_left(earlier, 0))
    ids, valid = pad_left(rows, 0)
    whole = chunked_prefill(model, empty_input(model, 3), ids, valid, None)
    start, rest, rest_valid = continuing(kv, rows, [len(o) for o in openings], 0)
    assert rest_valid.sum(1).tolist() == [3, 6, 2]
    assert (chunked_prefill(model, start, rest, rest_valid, None) - whole).abs().max().item() <= 1e-4
    plain = greedy_generate(model, empty_input(model, 3), ids, valid, 5, stop_ids=[98], pad_id=0)
    start, rest, rest_valid = continuing(kv, rows, [len(o) for o in openings], 0)
    assert greedy_generate(model, start, rest, rest_valid, 5, stop_ids=[98], pad_id=0) == plain


def test_continuing_refuses_kv_of_other_tokens_or_positions():
    model = tiny_model("llama")
    rows = [torch.randint(1, 99, (n,)).tolist() for n in (6, 8)]
    kv = prefill(model, *pad_left(rows, 0))
    with pytest.raises(ProtocolError, match="not a prefill"):
        continuing(kv, [[r[0] + 1, *r[1:]] for r in rows], [4, 4], 0)
    moved = prefill_shared(model, rows, 0)
    moved.positions = moved.positions + 3
    with pytest.raises(ProtocolError, match="not a prefill"):
        continuing(moved, rows, [4, 4], 0)
