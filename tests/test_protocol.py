"""The protocol against plain forward passes: equivalence, positions, causality, masks, batching."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvcomm.errors import ConfigError
from kvcomm.protocol import (
    AttentionLayout,
    build_receiver_input,
    empty_input,
    greedy_generate,
    pad_left,
    prefill,
    prefill_logits,
)
from kvcomm.protocol.rope import inverse_frequencies, rotate_keys
from kvcomm.protocol.sender import cache_argument
from tests.conftest import tiny_model

torch.set_grad_enabled(False)


def ones(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool)


def receiver_logits(model, sender_ids, receiver_ids, layers, mode="causal"):
    sender = prefill(model, sender_ids, ones(sender_ids))
    start = build_receiver_input(model, sender, layers, mode)
    return prefill_logits(model, start, receiver_ids, ones(receiver_ids))


def test_all_layers_equal_concatenated_forward(family):
    model = tiny_model(family)
    sender_ids, receiver_ids = torch.randint(0, 99, (1, 12)), torch.randint(0, 99, (1, 7))
    reference = model(torch.cat([sender_ids, receiver_ids], 1)).logits[:, 12:]
    got = receiver_logits(model, sender_ids, receiver_ids, range(4))
    assert (got - reference).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_each_row_alone(family):
    model = tiny_model(family)
    senders = [torch.randint(0, 99, (n,)).tolist() for n in (5, 11, 8)]
    receivers = [torch.randint(0, 99, (n,)).tolist() for n in (6, 3, 9)]
    s_ids, s_valid = pad_left(senders, 0)
    r_ids, r_valid = pad_left(receivers, 0)
    batch = build_receiver_input(model, prefill(model, s_ids, s_valid), [0, 2])
    logits = prefill_logits(model, batch, r_ids, r_valid)
    for row, (s, r) in enumerate(zip(senders, receivers)):
        alone = receiver_logits(model, torch.tensor([s]), torch.tensor([r]), [0, 2])
        assert (logits[row, -len(r):] - alone[0]).abs().max().item() <= 1e-4


def test_receiver_positions_continue_at_context_length():
    layout = AttentionLayout.empty(2, 2)
    layout.context_len = torch.tensor([12, 5])
    pos = layout.append(torch.tensor([[False, True, True], [True, True, True]]))
    assert pos[0, 1:].tolist() == [12, 13] and pos[1].tolist() == [5, 6, 7]
    assert layout.append(torch.tensor([[True], [True]])).flatten().tolist() == [14, 8]


def test_layer_ranges_and_bytes_count_sinks():
    model = tiny_model("llama")
    sender = prefill(model, torch.randint(0, 99, (1, 10)), ones(torch.zeros(1, 10)))
    start = build_receiver_input(model, sender, [1])
    lengths = [layer.keys.shape[2] for layer in start.cache.layers]
    assert lengths == [1, 10, 1, 1]
    per_token = sender.token_bytes(0)
    assert start.kv_bytes.item() == (10 + 3) * per_token
    legacy = build_receiver_input(model, sender, [1], mode="legacy")  # the reference always sends layer 0
    assert [layer.keys.shape[2] for layer in legacy.cache.layers] == [10, 10, 1, 1]


@pytest.mark.parametrize("mode, leaks", [("causal", False), ("shift-back", False), ("legacy", True),
                                         ("padded-sink", False), ("padded-zero", False)])
def test_later_receiver_token_cannot_change_earlier_logits(family, mode, leaks):
    model = tiny_model(family)
    sender_ids, receiver_ids = torch.randint(0, 99, (1, 12)), torch.randint(0, 99, (1, 6))
    changed = receiver_ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 99
    a = receiver_logits(model, sender_ids, receiver_ids, [1], mode)[:, :-1]
    b = receiver_logits(model, sender_ids, changed, [1], mode)[:, :-1]
    difference = (a - b).abs().max().item()
    assert (difference > 1e-3) if leaks else (difference <= 1e-6)


PADDED = ("padded-sink", "padded-zero")


@pytest.mark.parametrize("mode", PADDED)
def test_padded_modes_with_every_layer_or_a_one_token_context_are_exact(family, mode):
    """The two ends: nothing to pad (all layers shared), and a context that is its sink alone."""
    model = tiny_model(family)
    sender_ids, receiver_ids = torch.randint(0, 99, (1, 12)), torch.randint(0, 99, (1, 7))
    reference = model(torch.cat([sender_ids, receiver_ids], 1)).logits[:, 12:]
    assert (receiver_logits(model, sender_ids, receiver_ids, range(4), mode) - reference).abs().max() <= 1e-4
    single = sender_ids[:, :1]
    assert (receiver_logits(model, single, receiver_ids, [1], mode)
            - receiver_logits(model, single, receiver_ids, [1])).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", PADDED)
def test_padded_modes_fill_every_slot_and_count_only_what_was_sent(mode):
    model = tiny_model("llama")
    sender = prefill(model, torch.randint(0, 99, (1, 10)), ones(torch.zeros(1, 10)))
    start = build_receiver_input(model, sender, [1], mode)
    assert [layer.keys.shape[2] for layer in start.cache.layers] == [10, 10, 10, 10]
    assert start.kv_bytes.item() == (10 + 3) * sender.token_bytes(0)  # the message stays compact
    keys = start.cache.layers[2].keys
    assert torch.equal(keys[:, :, 0], sender.keys[2][:, :, 0])  # the sink where it was
    rest = keys[:, :, 1:]
    expected = sender.keys[2][:, :, :1].expand_as(rest) if mode == "padded-sink" else torch.zeros_like(rest)
    assert torch.equal(rest, expected)
    assert start.layout.prefix_valid[2].all()  # unmasked


@pytest.mark.parametrize("mode", PADDED)
def test_padded_modes_change_the_answer_and_batch_like_one_row(mode):
    model = tiny_model("qwen2")
    sender_ids, receiver_ids = torch.randint(0, 99, (1, 12)), torch.randint(0, 99, (1, 6))
    causal = receiver_logits(model, sender_ids, receiver_ids, [1])
    assert (receiver_logits(model, sender_ids, receiver_ids, [1], mode) - causal).abs().max() > 1e-4
    senders = [torch.randint(0, 99, (n,)).tolist() for n in (5, 11)]
    receivers = [torch.randint(0, 99, (n,)).tolist() for n in (6, 3)]
    s_ids, s_valid = pad_left(senders, 0)
    r_ids, r_valid = pad_left(receivers, 0)
    logits = prefill_logits(model, build_receiver_input(model, prefill(model, s_ids, s_valid), [1], mode),
                            r_ids, r_valid)
    for row, (s, r) in enumerate(zip(senders, receivers)):
        alone = receiver_logits(model, torch.tensor([s]), torch.tensor([r]), [1], mode)
        assert (logits[row, -len(r):] - alone[0]).abs().max().item() <= 1e-4


def test_rotate_keys_moves_a_key_to_another_position(family):
    model = tiny_model(family)
    ids = torch.randint(0, 99, (1, 9))
    cache_keys = prefill(model, ids, ones(ids)).keys
    shifted = prefill(model, torch.cat([torch.randint(0, 99, (1, 4)), ids], 1), ones(torch.zeros(1, 13))).keys
    # The first token's key at position 0, moved by 4, is not the same as a key computed at 4 (its
    # hidden state differs); but at layer 0 the key depends only on the token, so it must match.
    moved = rotate_keys(cache_keys[0][:, :, :1], torch.tensor([4]), inverse_frequencies(model, 0))
    assert torch.allclose(moved, shifted[0][:, :, 4:5], atol=1e-5)


def test_shift_back_changes_only_the_sink_position(family):
    model = tiny_model(family)
    sender_ids, receiver_ids = torch.randint(0, 99, (1, 12)), torch.randint(0, 99, (1, 6))
    causal = receiver_logits(model, sender_ids, receiver_ids, [1])
    shifted = receiver_logits(model, sender_ids, receiver_ids, [1], "shift-back")
    everything = receiver_logits(model, sender_ids, receiver_ids, range(4), "shift-back")
    assert (causal - shifted).abs().max().item() > 1e-4  # the sink moved
    reference = model(torch.cat([sender_ids, receiver_ids], 1)).logits[:, 12:]
    assert (everything - reference).abs().max().item() <= 1e-4  # no sinks, no change


def test_kvcomm_attention_without_layout_matches_sdpa_after_a_cache(family):
    """Fails if the AttentionMaskInterface entry is missing: queries after a cache misalign."""
    model = tiny_model(family)
    ids = torch.randint(0, 99, (1, 14))
    reference = model(ids).logits
    first = model(ids[:, :9], use_cache=True)
    name = cache_argument(type(model))  # ``cache`` from transformers 5.24, ``past_key_values`` before
    rest = model(ids[:, 9:], **{name: getattr(first, name)}).logits
    assert (rest - reference[:, 9:]).abs().max().item() <= 1e-4


def test_greedy_batch_equals_batch_of_one(family):
    model = tiny_model(family)
    senders = [torch.randint(0, 99, (n,)).tolist() for n in (7, 4, 10)]
    receivers = [torch.randint(0, 99, (n,)).tolist() for n in (3, 8, 5)]

    def run(rows):
        s_ids, s_valid = pad_left([senders[r] for r in rows], 0)
        r_ids, r_valid = pad_left([receivers[r] for r in rows], 0)
        start = build_receiver_input(model, prefill(model, s_ids, s_valid), [0, 3])
        return greedy_generate(model, start, r_ids, r_valid, 6, stop_ids=[98], pad_id=0)

    assert run([0, 1, 2]) == [run([r])[0] for r in range(3)]


def test_finished_rows_leave_the_batch_and_the_rest_answer_as_alone(family, monkeypatch):
    """Rows that stop early leave the decoding batch (the cache and layout keep the others), and
    every row's answer is still its answer decoded alone."""
    import kvcomm.protocol.decoding as decoding

    model = tiny_model(family)
    senders = [torch.randint(0, 99, (n,)).tolist() for n in (7, 4, 10, 6, 9, 5)]
    receivers = [torch.randint(0, 99, (n,)).tolist() for n in (3, 8, 5, 6, 4, 7)]

    def run(rows, stops, on_step=None):
        s_ids, s_valid = pad_left([senders[r] for r in rows], 0)
        r_ids, r_valid = pad_left([receivers[r] for r in rows], 0)
        start = build_receiver_input(model, prefill(model, s_ids, s_valid), [0, 3])
        return greedy_generate(model, start, r_ids, r_valid, 8, stop_ids=stops, pad_id=0, on_step=on_step)

    free = [run([r], [])[0] for r in range(6)]
    stops = sorted({free[0][1], free[1][1], free[2][4]})  # rows 0 and 1 stop at their second token
    kept: list[int] = []
    real = decoding.keep_rows
    monkeypatch.setattr(decoding, "keep_rows", lambda start, rows: (kept.append(len(rows)), real(start, rows)))
    steps: list[tuple[list[int], list[bool]]] = []
    together = run(list(range(6)), stops, lambda token, done: steps.append((token.tolist(), done.tolist())))
    assert together == [run([r], stops)[0] for r in range(6)]
    assert kept and kept[0] < 6, "some rows stopped before the others and should have left the batch"
    assert len(steps[-1][0]) == 6  # on_step still sees the whole batch,
    for (token, _), (_, done_before) in zip(steps[1:], steps):
        assert all(t == 0 for t, d in zip(token, done_before) if d)  # finished rows as padding


def test_a_start_whose_rows_left_is_refused_as_used():
    """Once rows have left its decoding, a start holds fewer rows than its prompt: a second use is
    still refused for what it is (used), not for a row count."""
    from kvcomm.errors import ProtocolError

    model = tiny_model("llama")
    senders, receivers = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], [[20, 21], [22], [23, 24, 25], [26, 27]]
    s_ids, s_valid = pad_left(senders, 0)
    r_ids, r_valid = pad_left(receivers, 0)
    start = build_receiver_input(model, prefill(model, s_ids, s_valid), [0, 2])
    first = greedy_generate(model, build_receiver_input(model, prefill(model, s_ids, s_valid), [0, 2]), r_ids,
                            r_valid, 3, stop_ids=[], pad_id=0)
    greedy_generate(model, start, r_ids, r_valid, 3, stop_ids=[first[0][0], first[1][0]], pad_id=0)
    assert start.layout.context_len.shape[0] < 4  # rows left
    for again in (lambda: greedy_generate(model, start, r_ids, r_valid, 3, [], 0),
                  lambda: prefill_logits(model, start, r_ids, r_valid)):
        with pytest.raises(ProtocolError, match="used by an earlier prefill"):
            again()


def test_a_layouts_rows_keep_its_shared_tensors_shared():
    layout = AttentionLayout.empty(3, 4)
    shared = torch.arange(8).reshape(4, 2)
    layout.prefix_pos = [shared, shared, torch.arange(4)[:, None]]
    layout.prefix_valid = [torch.ones(4, 2, dtype=torch.bool)] * 2 + [torch.ones(4, 1, dtype=torch.bool)]
    layout.context_len = torch.tensor([5, 6, 7, 8])
    layout.append(torch.tensor([[True], [False], [True], [True]]))
    layout = layout.select_rows(torch.tensor([3, 1]))
    assert layout.prefix_pos[0] is layout.prefix_pos[1] and layout.prefix_valid[0] is layout.prefix_valid[1]
    assert layout.prefix_pos[0].tolist() == [[6, 7], [2, 3]] and layout.prefix_pos[2].tolist() == [[3], [1]]
    assert layout.context_len.tolist() == [8, 6] and layout.own_valid.tolist() == [[True], [False]]
    assert layout.own_pos.tolist() == [[8], [6]]


def test_rows_leave_only_a_decoding_batch_that_records_nothing():
    from kvcomm.errors import ProtocolError
    from kvcomm.protocol.layout import ImportanceRecorder
    from kvcomm.protocol.receiver import keep_rows

    start = empty_input(tiny_model("llama"), 2)
    with pytest.raises(ProtocolError, match="after its prefill"):
        keep_rows(start, torch.tensor([0]))
    start.used, start.layout.recorder = True, ImportanceRecorder()
    with pytest.raises(ProtocolError, match="importance"):
        keep_rows(start, torch.tensor([0]))


def test_greedy_decoding_matches_argmax_of_full_forward():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 99, (1, 8))
    out = greedy_generate(model, empty_input(model, 1), ids, ones(ids), 5, stop_ids=[], pad_id=0)[0]
    seq = ids
    for _ in range(5):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == seq[0, 8:].tolist()


def test_out_of_range_layers_are_refused():
    model = tiny_model("llama")
    sender = prefill(model, torch.randint(0, 99, (1, 5)), ones(torch.zeros(1, 5)))
    with pytest.raises(ConfigError, match="out of range"):
        build_receiver_input(model, sender, [4])


def test_shared_rows_restack_to_the_same_receiver_logits():
    from kvcomm.protocol import SharedKV, receiver_input, share

    model = tiny_model("qwen2")
    s_ids, s_valid = pad_left([[5, 6, 7], [8, 9, 10, 11, 12, 13]], 0)
    r_ids, r_valid = pad_left([[20, 21, 22, 23], [24, 25]], 0)
    shared = share(model, prefill(model, s_ids, s_valid), [1, 3])
    rows = [shared.row(i) for i in range(2)]
    assert [r.keys[1].shape[2] for r in rows] == [3, 6] and [r.keys[0].shape[2] for r in rows] == [1, 1]
    again = SharedKV.stack(rows)
    assert torch.equal(again.kv_bytes, shared.kv_bytes)
    a = prefill_logits(model, receiver_input(shared), r_ids, r_valid)
    b = prefill_logits(model, receiver_input(again), r_ids, r_valid)
    assert torch.allclose(a, b, atol=1e-6)


def test_a_row_keeps_its_token_ids_where_no_layer_is_full_in_every_piece():
    """Pieces spliced at disjoint layers leave no layer holding every column: the column mask does,
    so a row keeps every token id (it used to cut them to one layer's, or fail), and restacks."""
    from kvcomm.errors import ProtocolError
    from kvcomm.protocol import SharedKV, share, share_many, splice

    model = tiny_model("qwen2")
    own = prefill(model, *pad_left([[5, 6, 7], [8, 9, 10, 11]], 0))
    a, b = (prefill(model, *pad_left(rows, 0)) for rows in ([[12, 13], [14, 15, 16]], [[17], [18, 19]]))
    joined = splice(model, [SharedKV.whole(own), share(model, a, [1]), share(model, b, [2])])
    assert not any(joined.full)
    rows = [joined.row(i) for i in range(2)]
    assert [r.token_ids[0].tolist() for r in rows] == [[5, 6, 7, 12, 13, 17], [8, 9, 10, 11, 14, 15, 16, 18, 19]]
    again = SharedKV.stack(rows)
    assert again.columns is not None and again.columns.sum(1).tolist() == [6, 9]
    assert again.row(0).token_ids.tolist() == rows[0].token_ids.tolist()
    alone = share(model, own, [])  # nothing shared in full: the sink alone at every layer
    assert alone.row(1).token_ids[0].tolist() == [8, 9, 10, 11]
    disjoint = share_many(own, [[0], [1]])  # two configurations, no layer common to both
    assert disjoint.row(3).token_ids[0].tolist() == [8, 9, 10, 11]
    unknown = SharedKV(joined.keys, joined.values, joined.positions, joined.valid, joined.context_len, joined.full,
                       token_ids=joined.token_ids)
    with pytest.raises(ProtocolError, match="no layer shared in full and no column mask"):
        unknown.row(0)


def test_two_senders_with_all_layers_equal_reading_both_contexts_in_sequence(family):
    """Sender 2 never saw sender 1, so the reference is one sequence [C1; C2; Q] in which C2 does not
    attend to C1; positions run on through all three (sender 2's keys are re-rotated)."""
    from kvcomm.protocol import merge_senders

    model = tiny_model(family)
    c1, c2, q = torch.randint(0, 99, (1, 7)), torch.randint(0, 99, (1, 5)), torch.randint(0, 99, (1, 4))
    merged = merge_senders(model, [prefill(model, c, ones(c)) for c in (c1, c2)])
    got = prefill_logits(model, build_receiver_input(model, merged, range(4)), q, ones(q))
    n = 16
    allowed = torch.ones(n, n).tril().bool()
    allowed[7:12, :7] = False  # C2 does not see C1
    mask = allowed[None, None]
    if family == "gemma3":  # its sliding layers also need the window (6) applied to the reference
        near = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) < model.config.sliding_window
        mask = {"full_attention": mask, "sliding_attention": (allowed & near)[None, None]}
    reference = model(torch.cat([c1, c2, q], 1), attention_mask=mask).logits[:, 12:]
    assert (got - reference).abs().max().item() <= 1e-4


def test_combining_two_kv_messages_equals_merging_the_senders_before_selection():
    """The service combines received messages (``concat_shared``); the harness merges senders before
    choosing layers (``merge_senders``): both must give the receiver the same cache."""
    from kvcomm.protocol import concat_shared, merge_senders, receiver_input, share

    model = tiny_model("qwen2")
    c1, c2, q = torch.randint(0, 99, (1, 6)), torch.randint(0, 99, (1, 4)), torch.randint(0, 99, (1, 3))
    parts = [prefill(model, c, ones(c)) for c in (c1, c2)]
    combined = concat_shared(model, [share(model, p, [0, 2]) for p in parts])
    merged = share(model, merge_senders(model, parts), [0, 2])
    assert torch.equal(combined.context_len, merged.context_len) and combined.full == merged.full
    got = prefill_logits(model, receiver_input(combined), q, ones(q))
    expected = prefill_logits(model, receiver_input(merged), q, ones(q))
    assert (got - expected).abs().max().item() <= 1e-5


def test_two_padded_senders_in_a_batch_equal_each_row_alone():
    from kvcomm.protocol import merge_senders

    model = tiny_model("llama")
    firsts, seconds, questions = [[5, 6, 7], [8, 9, 10, 11, 12]], [[13, 14, 15, 16], [17]], [[20, 21], [22, 23, 24]]

    def run(rows):
        parts = [prefill(model, *pad_left([c[r] for r in rows], 0)) for c in (firsts, seconds)]
        q_ids, q_valid = pad_left([questions[r] for r in rows], 0)
        start = build_receiver_input(model, merge_senders(model, parts), [0, 2])
        return greedy_generate(model, start, q_ids, q_valid, 4, stop_ids=[], pad_id=0)

    assert run([0, 1]) == [run([0])[0], run([1])[0]]


def test_pieces_with_different_mask_modes_are_refused_when_combined():
    from kvcomm.protocol import concat_shared, share

    model = tiny_model("llama")
    parts = [prefill(model, c, ones(c)) for c in (torch.randint(0, 99, (1, 4)), torch.randint(0, 99, (1, 3)))]
    with pytest.raises(ConfigError, match=r"mask mode; got layers \[1\] in causal mode; layers \[1\] in shift-back"):
        concat_shared(model, [share(model, parts[0], [1], "causal"), share(model, parts[1], [1], "shift-back")])
    with pytest.raises(ConfigError, match=r"got layers \[1\] in causal mode; layers \[2\] in causal mode"):
        concat_shared(model, [share(model, parts[0], [1]), share(model, parts[1], [2])])


def test_shift_back_sink_follows_the_joined_context():
    """Two shift-back messages joined: the kept sink sits right before the receiver, at |C1|+|C2|-1."""
    from kvcomm.protocol import concat_shared, share

    model = tiny_model("qwen2")
    parts = [prefill(model, c, ones(c)) for c in (torch.randint(0, 99, (1, 6)), torch.randint(0, 99, (1, 4)))]
    joined = concat_shared(model, [share(model, p, [1], "shift-back") for p in parts])
    whole = share(model, merge_senders_of(model, parts), [1], "shift-back")
    assert joined.positions[0].tolist() == [[9]] == whole.positions[0].tolist()
    assert torch.allclose(joined.keys[0], whole.keys[0], atol=1e-5)


def merge_senders_of(model, parts):
    from kvcomm.protocol import merge_senders

    return merge_senders(model, parts)


def test_legacy_mode_reports_the_always_sent_layer_zero():
    from kvcomm import make_method
    from kvcomm.methods.base import Setup

    method = make_method("kvcomm", layers=(2, 3), mode="legacy")
    method.setup(Setup(4, "llama", lambda rule=None: [], lambda: None))  # type: ignore[arg-type, return-value]
    assert method.layers == [0, 2, 3]
    causal = make_method("kvcomm", layers=(2, 3))
    causal.setup(Setup(4, "llama", lambda rule=None: [], lambda: None))  # type: ignore[arg-type, return-value]
    assert causal.layers == [2, 3]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_prefill(family, chunk):
    """The service prefills long prompts in chunks (to notice deadlines): same answers, same logits."""
    from kvcomm.protocol.decoding import chunked_prefill

    model = tiny_model(family)
    s_ids, s_valid = pad_left([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], 0)
    r_ids, r_valid = pad_left([[20, 21, 22, 23, 24, 25, 26, 27, 28], [29, 30]], 0)
    sender = prefill(model, s_ids, s_valid)
    whole = chunked_prefill(model, build_receiver_input(model, sender, [0, 2]), r_ids, r_valid, None)
    parts = chunked_prefill(model, build_receiver_input(model, sender, [0, 2]), r_ids, r_valid, chunk)
    assert (whole - parts).abs().max().item() <= 1e-5
    one = greedy_generate(model, build_receiver_input(model, sender, [0, 2]), r_ids, r_valid, 5, [], 0)
    many = greedy_generate(model, build_receiver_input(model, sender, [0, 2]), r_ids, r_valid, 5, [], 0,
                           prefill_chunk=chunk)
    assert one == many


def stopping_at_the_second_call() -> tuple[list[int], Callable[[], None]]:
    """A deadline check that raises on its second call, and the list of its calls."""
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise TimeoutError("deadline")

    return calls, check


@pytest.mark.parametrize("chunk", [1, 4])
def test_a_sender_prefilled_in_chunks_has_the_kv_of_one_prefill(family, chunk):
    """The service's /v1/contexts prefills in chunks (to notice deadlines): the same KV, positions
    and validity, left padding included; a check that raises stops it between chunks."""
    model = tiny_model(family)
    ids, valid = pad_left([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 0)
    whole, parts = prefill(model, ids, valid), prefill(model, ids, valid, chunk=chunk)
    assert torch.equal(whole.valid, parts.valid) and torch.equal(whole.positions, parts.positions)
    for a, b in zip(whole.keys + whole.values, parts.keys + parts.values):
        assert (a - b)[whole.valid[:, None, :, None].expand_as(a)].abs().max().item() <= 1e-5
    calls, check = stopping_at_the_second_call()
    with pytest.raises(TimeoutError):
        prefill(model, ids, valid, chunk=3, check=check)
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="without chunks"):
        prefill(model, ids, valid, hidden=[1], chunk=3)


def test_check_stops_prefill_and_decoding():
    model = tiny_model("llama")
    ids, valid = pad_left([list(range(5, 30))], 0)
    calls, check = stopping_at_the_second_call()
    with pytest.raises(TimeoutError):
        greedy_generate(model, empty_input(model, 1), ids, valid, 50, [], 0, prefill_chunk=10, check=check)
    assert len(calls) == 2  # stopped at the second chunk, before the third


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_query_attention_equals_a_float64_reference(dtype):
    """The decoding step's path for bfloat16/float16 models (``_one_query``): grouped heads, masked keys."""
    from kvcomm.protocol.attention import _one_query

    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, keys = 3, 6, 2, 8, 11
    query = torch.randn(batch, heads, 1, dim, generator=gen).to(dtype)
    key, value = (torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype) for _ in range(2))
    mask = torch.rand(batch, 1, 1, keys, generator=gen) > 0.4
    mask[..., 0] = True
    reference = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=mask, scale=0.3, enable_gqa=True)
    got = _one_query(query, key, value, mask, 0.3)
    assert got.dtype == dtype and got.shape == query.shape
    assert (got.double() - reference).abs().max().item() <= 2**-8 * reference.abs().max().item()  # bf16 rounding
    hidden = value.clone()
    hidden[~mask[:, 0, 0][:, None, :, None].expand_as(value)] = 1e4  # masked keys' values never count
    assert torch.equal(_one_query(query, key, hidden, mask, 0.3), got)


def _sdpa_query_lengths(monkeypatch) -> list[int]:
    """The query length of every call to torch's SDPA kernel from now on (the sender's prefill calls it too)."""
    from kvcomm.protocol import attention

    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(query, *args, **kwargs):
        calls.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counted)
    return calls


def test_bfloat16_decoding_steps_skip_the_cpu_sdpa_kernel_and_agree_with_it(family, monkeypatch):
    """A one-token receiver step in bfloat16 runs ``_one_query`` (no SDPA call), with SDPA's logits."""
    from kvcomm.protocol import attention

    model = tiny_model(family).to(torch.bfloat16)
    sender_ids, step = torch.randint(0, 99, (2, 12)), torch.randint(0, 99, (2, 1))
    calls = _sdpa_query_lengths(monkeypatch)
    fast = receiver_logits(model, sender_ids, step, [0, 2]).float()
    assert 1 not in calls
    monkeypatch.setattr(attention, "REDUCED", ())  # the SDPA kernel for every query length
    slow = receiver_logits(model, sender_ids, step, [0, 2]).float()
    assert 1 in calls
    assert (fast - slow).abs().max().item() <= 0.05 * slow.abs().max().item()


def test_float32_decoding_steps_keep_the_sdpa_kernel(family, monkeypatch):
    """Float32 answers stay as recorded: a float32 one-token step still runs torch's kernel."""

    model = tiny_model(family)
    calls = _sdpa_query_lengths(monkeypatch)
    receiver_logits(model, torch.randint(0, 99, (2, 12)), torch.randint(0, 99, (2, 1)), [0, 2])
    assert 1 in calls


def test_a_slice_of_a_prefill_must_be_rebased_before_it_is_shared():
    """KV cut from a longer prefill keeps its positions (7..11); shared as it was, its receiver
    saw the wrong positions and no error (review, 2026-11-25). Refused; rebased, it is shared."""
    from kvcomm.errors import ProtocolError
    from kvcomm.protocol import share
    from kvcomm.protocol.reply import rebase

    model = tiny_model("llama")
    ids = torch.randint(0, 99, (1, 12))
    tail = prefill(model, ids, ones(ids)).last([5])
    with pytest.raises(ProtocolError, match="positions 0, 1, 2"):
        share(model, tail, [0, 1])
    assert share(model, rebase(model, tail), [0, 1]).context_len.tolist() == [5]


def test_a_row_without_prompt_tokens_is_refused():
    """A left-padded batch row with no prompt token was answered from a padding query's output."""
    model = tiny_model("llama")
    tokens, valid = pad_left([[8, 9, 10], []], 0)
    with pytest.raises(ConfigError, match="row 1 of the batch has no prompt token"):
        greedy_generate(model, empty_input(model, 2), tokens, valid, 3, [2], 0)
    with pytest.raises(ConfigError, match="row 1 of the batch has no prompt token"):  # it gave that row's logits
        prefill_logits(model, empty_input(model, 2), tokens, valid)
    nothing = torch.zeros(1, 0, dtype=torch.long)  # a SenderKV of no layers, refused later as "out of range"
    with pytest.raises(ConfigError, match="nothing to prefill"):
        prefill(model, nothing, torch.zeros(1, 0, dtype=torch.bool))


def test_cache_surgery_takes_the_transformers_model_and_says_so():
    """A LoadedModel was taken in causal mode and failed in shift-back with a raw AttributeError."""
    from kvcomm.protocol import build_receiver_input
    from tests.conftest import tiny_loaded

    loaded = tiny_loaded()
    ids = torch.tensor([[5, 6, 7]])
    kv = prefill(loaded.model, ids, torch.ones_like(ids, dtype=torch.bool))
    for mode in ("causal", "shift-back"):
        with pytest.raises(ConfigError, match="a transformers model .a LoadedModel: pass its .model."):
            build_receiver_input(loaded, kv, [1], mode)
    from kvcomm.protocol import concat_shared, share, splice
    from kvcomm.protocol.blend import blend
    from kvcomm.protocol.reply import rebase

    shared = share(loaded.model, kv, range(4))
    for given in (lambda: concat_shared(loaded, [shared, shared]), lambda: splice(loaded, [shared, shared]),
                  lambda: rebase(loaded, kv), lambda: blend(loaded, shared, 0.5)):
        with pytest.raises(ConfigError, match="pass its .model"):
            given()


def layer_lengths(model) -> tuple[list, list]:
    """Hooks that record how many tokens each decoder layer ran on (remove them after)."""
    seen: list[tuple[int, int]] = []
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: seen.append((index, (args[0] if args else kwargs["hidden_states"])
                                                               .shape[1])), with_kwargs=True)
        for index, layer in enumerate(model.get_decoder().layers)]
    return seen, handles


@pytest.mark.parametrize(("layers", "mode", "depth"), [
    ([1], "causal", 2), ([0, 2], "causal", 3), ([], "causal", 0), ([2], "legacy", 3), ([1], "shift-back", 2),
    ([3], "causal", 4),
])
@pytest.mark.parametrize("chunk", [None, 4])
def test_a_sender_computes_its_context_only_through_the_deepest_shared_layer(family, layers, mode, depth, chunk):
    """shallow_share = share(prefill): the shared layers bit for bit, the sink-only layers within
    rounding (the sink computed alone), and the context's tokens go no deeper than they must."""
    from kvcomm.protocol.shallow import depth_needed, shallow_share
    from kvcomm.protocol.shared import share

    model = tiny_model(family)
    ids = torch.randint(3, 99, (1, 11))
    assert depth_needed(layers, mode, 4) == depth
    seen, handles = layer_lengths(model)
    try:
        got = shallow_share(model, ids, ones(ids), layers, mode, chunk=chunk)
    finally:
        for handle in handles:
            handle.remove()
    assert {index for index, tokens in seen if tokens > 1} == set(range(depth))
    want = share(model, prefill(model, ids, ones(ids)), layers, mode)
    assert got.full == want.full and torch.equal(got.context_len, want.context_len)
    for layer, full in enumerate(want.full):
        assert torch.equal(got.positions[layer], want.positions[layer]) and torch.equal(got.valid[layer],
                                                                                        want.valid[layer])
        for a, b in ((got.keys[layer], want.keys[layer]), (got.values[layer], want.values[layer])):
            assert a.shape == b.shape
            if full and chunk is None:
                assert torch.equal(a, b)
            else:
                assert (a - b).abs().max().item() <= 1e-5
    question = torch.randint(3, 99, (1, 5))
    from kvcomm.protocol import receiver_input
    a = prefill_logits(model, receiver_input(got), question, ones(question))
    b = prefill_logits(model, receiver_input(want), question, ones(question))
    assert (a - b).abs().max().item() <= 1e-4


def test_a_shallow_sender_takes_the_whole_prefill_for_batches_and_padding():
    """Rows whose sink is not column 0 (padding) or several rows: the whole prefill, as before."""
    from kvcomm.protocol.shallow import shallow_share

    model = tiny_model("llama")
    ids, valid = pad_left([[5, 6, 7, 8, 9], [10, 11]], 0)
    seen, handles = layer_lengths(model)
    try:
        shallow_share(model, ids, valid, [0], "causal")
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(index for index, _ in seen) == [0, 1, 2, 3]


def test_a_prefill_depth_is_checked():
    model = tiny_model("llama")
    ids = torch.randint(3, 99, (1, 6))
    for depth in (0, 5):
        with pytest.raises(ConfigError, match="depth"):
            prefill(model, ids, ones(ids), depth=depth)
    with pytest.raises(ConfigError, match="hidden states"):
        prefill(model, ids, ones(ids), hidden=[2], depth=2)
    kv = prefill(model, ids, ones(ids), hidden=[1], depth=2)
    whole = prefill(model, ids, ones(ids), hidden=[1])
    assert kv.num_layers == 2 and torch.equal(kv.hidden[1], whole.hidden[1])
    assert all(torch.equal(a, b) for a, b in zip(kv.keys, whole.keys[:2]))


def test_learned_attention_sinks_are_refused_not_dropped():
    """gpt-oss passes each head's learned sink logit (``s_aux``); kvcomm attention took it in its
    keyword arguments and left it out of the softmax (0.027 in the logits of a tiny model)."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from kvcomm.errors import ProtocolError

    config = GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=64, layer_types=["full_attention"] * 2)
    config._attn_implementation = "kvcomm"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 99, (1, 6))
    with pytest.raises(ProtocolError, match="learned attention sinks"):
        prefill(model, ids, torch.ones_like(ids, dtype=torch.bool))
