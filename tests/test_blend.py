"""Blending KV pieces by selective token recompute: its exact ends, batching, and what it recomputes."""

from __future__ import annotations

import re

import pytest
import torch

from kvcomm.errors import ConfigError
from kvcomm.protocol import concat_shared, pad_left, prefill, prefill_logits, receiver_input, share, splice
from kvcomm.protocol.blend import blend
from kvcomm.protocol.receiver import empty_input
from tests.conftest import tiny_model

torch.set_grad_enabled(False)


def pieces(model, lengths=(7, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 99, (1, n), generator=g) for n in lengths]
    every = range(model.config.num_hidden_layers)
    return ids, [share(model, prefill(model, i, torch.ones_like(i, dtype=torch.bool)), every) for i in ids]


def question_logits(model, shared, question):
    return prefill_logits(model, receiver_input(shared), question, torch.ones_like(question, dtype=torch.bool))


@pytest.mark.parametrize("deviation", ["keys", "values", "both"])
def test_recomputing_everything_is_a_full_prefill_of_the_joined_tokens(family, deviation):
    model = tiny_model(family)
    ids, parts = pieces(model)
    question = torch.randint(0, 99, (1, 4))
    blended, stats = blend(model, concat_shared(model, parts), recompute=1.0, deviation=deviation)
    whole = torch.cat([*ids, question], dim=1)
    reference = prefill_logits(model, empty_input(model, 1), whole, torch.ones_like(whole, dtype=torch.bool))
    got = question_logits(model, blended, question)
    assert (got - reference[:, -4:]).abs().max().item() <= 1e-4
    assert stats.recomputed == [18] and stats.context == [18]


def test_an_exact_opening_is_never_recomputed_nor_counted(family):
    """The first piece (a prompt's opening, prefilled before the others) is already exact: with
    ``exact`` its 7 tokens are neither chosen nor counted, and recomputing every other token is
    still the full prefill; half of the other 11 is 5 tokens, none of them the opening's."""
    model = tiny_model(family)
    ids, parts = pieces(model)
    question = torch.randint(0, 99, (1, 4))
    joined = concat_shared(model, parts)
    blended, stats = blend(model, joined, recompute=1.0, exact=7)
    whole = torch.cat([*ids, question], dim=1)
    reference = prefill_logits(model, empty_input(model, 1), whole, torch.ones_like(whole, dtype=torch.bool))
    assert (question_logits(model, blended, question) - reference[:, -4:]).abs().max().item() <= 1e-4
    assert stats.recomputed == [11]
    _, half = blend(model, joined, recompute=0.5, exact=7)
    assert half.recomputed == [5]


def test_recomputing_nothing_is_plain_concatenation(family):
    model = tiny_model(family)
    _, parts = pieces(model)
    question = torch.randint(0, 99, (1, 4))
    joined = concat_shared(model, parts)
    blended, stats = blend(model, joined, recompute=0.0, check_layer=1)
    assert stats.recomputed == [0]
    assert (question_logits(model, blended, question) - question_logits(model, joined, question)).abs().max() <= 1e-4


@pytest.mark.parametrize("recompute", [0.0, 0.3, 1.0])
def test_one_piece_is_its_own_prefill_at_any_ratio(family, recompute):
    model = tiny_model(family)
    _, parts = pieces(model, lengths=(9,))
    question = torch.randint(0, 99, (1, 3))
    blended, _ = blend(model, parts[0], recompute=recompute)
    assert (question_logits(model, blended, question) - question_logits(model, parts[0], question)).abs().max() <= 1e-4


@pytest.mark.parametrize("recompute", [0.3, 1.0])
def test_a_chunked_first_pass_blends_alike_and_is_checked_between_chunks(recompute):
    """``chunk`` splits the first layers' pass over the context (18 tokens, 5 at a time: 4
    forwards); ``check`` runs before each and once before the recompute, and stops the blend when
    it raises. The question's logits equal the one-pass blend's."""
    model = tiny_model("llama")
    _, parts = pieces(model)
    question = torch.randint(0, 99, (1, 4))
    joined = concat_shared(model, parts)
    whole, stats = blend(model, joined, recompute=recompute)
    calls = []
    chunked, chunked_stats = blend(model, joined, recompute=recompute, chunk=5, check=lambda: calls.append(1))
    assert len(calls) == 4 + 1 and chunked_stats.recomputed == stats.recomputed
    assert (question_logits(model, chunked, question) - question_logits(model, whole, question)).abs().max() <= 1e-4

    def stop():
        calls.append(1)
        if len(calls) > 2:
            raise TimeoutError("deadline")

    calls.clear()
    with pytest.raises(TimeoutError):
        blend(model, joined, recompute=recompute, chunk=5, check=stop)
    assert len(calls) == 3


def test_a_left_padded_batch_equals_each_row_alone():
    model = tiny_model("qwen2")
    firsts, seconds = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], [[16, 17, 18], [19, 20]]
    questions = [[21, 22], [23, 24, 25]]

    def run(rows):
        parts = []
        for chunk in (firsts, seconds):
            ids, valid = pad_left([chunk[r] for r in rows], 0)
            parts.append(share(model, prefill(model, ids, valid), range(4)))
        blended, stats = blend(model, concat_shared(model, parts), recompute=0.5)
        q_ids, q_valid = pad_left([questions[r] for r in rows], 0)
        logits = prefill_logits(model, receiver_input(blended), q_ids, q_valid)[:, -1]
        return logits, stats.recomputed

    together, counts = run([0, 1])
    assert counts == [3, 4]  # floor(0.5 * 7), floor(0.5 * 9)
    for row in range(2):
        alone, _ = run([row])
        assert (together[row] - alone[0]).abs().max().item() <= 1e-4


def sliding(window: int = 4):
    """A tiny Gemma 3 whose sliding-window layers see 4 keys back."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config("gemma3")
    config.sliding_window = window
    config._attn_implementation = "kvcomm"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "gemma3-window4"])
@pytest.mark.parametrize("layers", [[1, 3], [0, 1, 2, 3]])
def test_a_batch_chooses_each_rows_tokens_as_that_row_alone(name, layers):
    """The budget often exceeds the tokens that deviate (a first piece's deviate by rounding only;
    on sliding-window layers so do those a window past a piece's start): those ties went to
    rounding noise and to columns that left padding moves, so a row recomputed other tokens in a
    batch (0.04–0.13 in the logits where some layers hold sinks only). Now noise counts as 0 and
    ties go to the earlier token."""
    model = sliding() if name == "gemma3-window4" else tiny_model(name)
    firsts, seconds = [[3], list(range(10, 30)), [4, 5]], [list(range(40, 55)), [6], [7, 8, 9]]
    questions = [[60, 61], [62, 63, 64, 65, 66], [67]]

    def run(rows):
        parts = []
        for piece in (firsts, seconds):
            ids, valid = pad_left([piece[r] for r in rows], 0)
            parts.append(share(model, prefill(model, ids, valid), layers))
        blended, stats = blend(model, concat_shared(model, parts), recompute=0.5)
        q_ids, q_valid = pad_left([questions[r] for r in rows], 0)
        return prefill_logits(model, receiver_input(blended), q_ids, q_valid), stats.recomputed

    together, counts = run([0, 1, 2])
    assert counts == [8, 10, 2]
    for row in range(3):
        alone, _ = run([row])
        width = len(questions[row])
        assert (together[row, -width:] - alone[0]).abs().max().item() <= 1e-4


def test_rounding_noise_counts_as_no_deviation_and_ties_go_to_the_earlier_token():
    from kvcomm.protocol.blend import rounding_noise, top_fraction

    score = torch.tensor([[0.0, 0.0, 3e-14, 1e-14, 2.0, 0.5], [5e-14, 2.0, 0.5, 1e-14, 0.0, 0.0]])
    valid = torch.tensor([[False, False, True, True, True, True], [True, True, True, True, False, False]])
    size = torch.full_like(score, 4.0)  # each token's own squared KV norm
    chosen = top_fraction(score, valid, 0.75, size * rounding_noise(torch.float32))
    assert chosen[0].tolist() == [False, False, True, False, True, True]  # the earlier of two noise tokens
    assert chosen[1].tolist() == [True, True, True, False, False, False]
    assert 1e-4 < rounding_noise(torch.bfloat16) < 1e-2 and 1e-12 < rounding_noise(torch.float32) < 1e-8


def test_selected_layers_with_sinks_elsewhere_blend_too():
    """KVComm selection composes: sink-only layers stay sinks; recomputed tokens keep their own KV there."""
    model = tiny_model("llama")
    ids, _ = pieces(model, lengths=(6, 5))
    parts = [share(model, prefill(model, i, torch.ones_like(i, dtype=torch.bool)), [1, 3]) for i in ids]
    blended, stats = blend(model, concat_shared(model, parts), recompute=0.4, check_layer=1)
    assert stats.check_layer == 1 and stats.recomputed == [4]
    sink_layer_keys = int(blended.valid[2].sum())
    assert sink_layer_keys == 1 + 4  # the sink and the recomputed tokens
    assert question_logits(model, blended, torch.tensor([[7, 8]])).isfinite().all()
    moved, _ = blend(model, concat_shared(model, [share(model, prefill(model, i, torch.ones_like(
        i, dtype=torch.bool)), [3]) for i in ids]), recompute=0.4, check_layer=1)
    assert int(moved.valid[1].sum()) == 11  # the check moved to layer 3: layers 0-2 are fresh for every token


def test_below_a_moved_check_layer_every_token_is_read_as_text_even_at_ratio_zero(family):
    """What the docs say of pieces that share only some layers: the check moves to the first layer
    every piece shares in full, and the layers below it hold a full prefill's KV of the joined
    tokens (not the sink alone), at ratio 0 too; above it, ratio 0 keeps the pieces' own KV."""
    model = tiny_model(family)
    ids, _ = pieces(model, lengths=(6, 5), seed=5)
    sent = [prefill(model, i, torch.ones_like(i, dtype=torch.bool)) for i in ids]
    joined = concat_shared(model, [share(model, kv, [3]) for kv in sent])
    blended, stats = blend(model, joined, recompute=0.0, check_layer=1)
    assert stats.check_layer == 3 and stats.recomputed == [0] and blended.full == [True] * 4
    whole = torch.cat(ids, dim=1)
    text = prefill(model, whole, torch.ones_like(whole, dtype=torch.bool))
    for layer in range(3):
        held = blended.keys[layer][..., blended.valid[layer][0], :]
        assert (held - text.keys[layer]).abs().max() <= 1e-4, layer
    assert (blended.keys[3] - joined.keys[3]).abs().max() == 0


@pytest.mark.parametrize("joined_by", ["concat", "splice"])
def test_recomputing_everything_is_a_full_prefill_whatever_each_piece_shares(family, joined_by):
    """At a layer not every piece shares in full, a token it holds (the sink; in a splice, the pieces
    full there) that is recomputed keeps only its fresh KV: before, its reused copy stayed beside it
    (two keys at one position) and ``recompute=1`` was no full prefill."""
    model = tiny_model(family)
    ids, _ = pieces(model, lengths=(6, 9, 5), seed=3)
    sent = [prefill(model, i, torch.ones_like(i, dtype=torch.bool)) for i in ids]
    if joined_by == "concat":  # every piece at layers 1 and 3, the sink elsewhere
        joined = concat_shared(model, [share(model, kv, [1, 3]) for kv in sent])
    else:  # a graph's hearer: its own text full, a heard turn at layers 1 and 3, its own text again
        joined = splice(model, [share(model, sent[0], range(4)), share(model, sent[1], [1, 3]),
                                share(model, sent[2], range(4))])
    question = torch.randint(0, 99, (1, 3))
    whole = torch.cat([*ids, question], dim=1)
    reference = prefill_logits(model, empty_input(model, 1), whole, torch.ones_like(whole, dtype=torch.bool))
    for ratio in (1.0, 0.5):
        blended, _ = blend(model, joined, recompute=ratio)
        for layer in range(4):
            held = blended.positions[layer][blended.valid[layer]].tolist()
            assert len(held) == len(set(held)), (ratio, layer)  # each position once
        if ratio == 1.0:
            assert (question_logits(model, blended, question) - reference[:, -3:]).abs().max().item() <= 1e-4


def test_the_flops_fraction_is_the_linear_work():
    model = tiny_model("llama")
    _, parts = pieces(model, lengths=(10, 10))
    _, stats = blend(model, concat_shared(model, parts), recompute=0.25, check_layer=1)
    assert stats.recomputed == [5] and stats.flops_fraction == [pytest.approx((2 * 20 + 5 * 4) / (4 * 20))]


def test_blend_needs_token_ids_and_causal_masks():
    model = tiny_model("llama")
    _, parts = pieces(model, lengths=(5, 4))
    joined = concat_shared(model, parts)
    with pytest.raises(ConfigError, match="token ids"):
        blend(model, type(joined)(**{**vars(joined), "token_ids": None}), recompute=0.5)
    with pytest.raises(ConfigError, match="causal"):
        blend(model, type(joined)(**{**vars(joined), "mode": "legacy"}), recompute=0.5)
    with pytest.raises(ConfigError, match="the check layer is 1 or more, not 0"):  # before: ties, chosen arbitrarily
        blend(model, joined, recompute=0.5, check_layer=0)


def test_blend_options_that_cannot_work_are_refused_at_setup():
    """Before any prefill (before, per batch, after the sender's prefill): a check layer past the
    model's depth, or past every layer the pieces share; and a check layer of 0."""
    from kvcomm import make_method
    from kvcomm.methods.base import Setup

    setup = Setup(4, "llama", lambda *args: [0, 1, 2, 3], lambda: None)
    for options, said in (({"check_layer": 9}, "check layer 9 is past the model's last layer (3)"),
                          ({"share": 0.25}, "no layer at or after check layer 1 is shared in full (layers shared: 0)")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            make_method("blend", **options).setup(setup)
    with pytest.raises(ConfigError, match="check_layer"):
        make_method("blend", check_layer=0)


@pytest.fixture(scope="module")
def agents():
    from kvcomm import Agents
    from tests.conftest import tiny_loaded

    model = tiny_loaded("qwen2")
    return Agents(model, model)


def run_methods(agents, methods, items=4, pieces=2):
    from kvcomm import EvalConfig, evaluate, load_task

    task = load_task("multihop", items=items + 1, pieces=pieces, facts_per_piece=2)
    return {r.label: r for r in evaluate(agents, task, methods, EvalConfig(limit=items, batch_size=3, calib_size=1),
                                         progress=False).runs}


def test_the_methods_exact_ends_hold_in_a_sweep(agents):
    """blend@0 is full reuse (kvcomm@1xN); blend@1 and prefix reuse are both a full prefill of the pieces."""
    from kvcomm import make_method

    runs = run_methods(agents, [make_method("blend", ratio=0.0), make_method("kvcomm", ratio=1.0, senders=2),
                                make_method("blend", ratio=1.0), make_method("prefix", senders=2),
                                make_method("blend", ratio=0.5)])
    answers = {label: [i.answer for i in run.items] for label, run in runs.items()}
    assert answers["blend@0x2"] == answers["kvcomm@1x2"]
    assert answers["blend@1x2"] == answers["prefix@x2"]
    half = runs["blend@0.5x2"].details
    assert 0 < half["mean_recomputed_tokens"] < half["mean_context_tokens"] and 0 < half["mean_flops_fraction"] < 1
    assert runs["blend@1x2"].details["mean_recomputed_tokens"] == runs["blend@1x2"].details["mean_context_tokens"]
    # prefix reuse sends the first piece's KV and every token's id (before: every piece's KV too)
    from kvcomm import load_task
    from kvcomm.eval.batch import Batch
    from kvcomm.protocol import share

    task = load_task("multihop", items=5, pieces=2, facts_per_piece=2)
    for reused, whole in zip(runs["prefix@x2"].items, runs["blend@0x2"].items):
        batch = Batch(agents, task, [next(i for i in task.items if i.id == reused.id)])
        piece = share(agents.receiver.model, batch.sender_pieces(2, "chats")[0], range(agents.num_layers))
        assert reused.kv_bytes == int(piece.kv_bytes[0]) + 4 * int(batch.sender_kv(2, "chats").context_len[0])
        assert reused.kv_bytes < whole.kv_bytes


def test_results_record_what_several_senders_read(agents):
    """kvcomm and blend over two senders record the tokens both read, joined (before, the one
    sender's chat of the whole context, which no sender read)."""
    from kvcomm import load_task, make_method
    from kvcomm.eval.batch import Batch

    runs = run_methods(agents, [make_method("kvcomm", ratio=1.0, senders=2), make_method("blend", ratio=0.5)], items=2)
    task = load_task("multihop", items=3, pieces=2, facts_per_piece=2)
    batch = Batch(agents, task, task.items[:2])
    joined = batch.sender_kv(2, "chats")
    read = [row[ok].tolist() for row, ok in zip(joined.ids, joined.valid)]
    for run in runs.values():
        assert [item.sender_ids for item in run.items] == read


def test_a_method_object_used_for_a_second_run_reports_that_run_only(agents):
    """blend's and online's counts start afresh at setup (before, a second evaluate() with the same
    objects reported the first run's items too)."""
    from kvcomm import EvalConfig, evaluate, load_task, make_method

    task = load_task("multihop", items=4, pieces=2, facts_per_piece=2)
    methods = [make_method("blend", ratio=0.5), make_method("online", ratio=0.5)]
    config = EvalConfig(limit=2, batch_size=2, calib_size=1)
    first = evaluate(agents, task, methods, config, progress=False).runs
    again = evaluate(agents, task, methods, config, progress=False).runs
    for a, b in zip(first, again):
        assert a.details == b.details


def test_pieces_of_a_multihop_item_go_to_their_own_senders():
    from kvcomm import load_task

    item = load_task("multihop", items=1, pieces=4).items[0]
    assert item.parts(4) == list(item.pieces) and " ".join(item.pieces) == item.context
    assert len(item.parts(2)) == 2  # another count splits the context evenly


def test_blend_through_the_wire_and_on_selected_layers(agents):
    from kvcomm import make_method

    runs = run_methods(agents, [make_method("blend", ratio=0.3, codec="fp32"), make_method("blend", ratio=0.3),
                                make_method("blend", ratio=0.3, share=0.5)], items=2)
    assert [i.answer for i in runs["blend@0.3x2+fp32"].items] == [i.answer for i in runs["blend@0.3x2"].items]
    assert runs["blend@0.3x2/L0.5"].layers is not None and len(runs["blend@0.3x2/L0.5"].layers) == 2


def test_prefix_reuse_through_the_wire_recomputes_the_same_tokens_in_any_batch(agents):
    """prefix+fp32 (lossless) recomputes every token after the first piece and answers as in
    process, in batches whose rows' pieces differ in length (before, the join went through the wire
    whole, re-padded row by row, and rows of other lengths recomputed the wrong columns); its bytes
    are the first piece's own message and the others' token ids."""
    from kvcomm import make_method

    runs = run_methods(agents, [make_method("prefix", senders=2), make_method("prefix", senders=2, codec="fp32")],
                       items=4)
    plain, wired = runs["prefix@x2"], runs["prefix@x2+fp32"]
    assert [i.answer for i in wired.items] == [i.answer for i in plain.items]
    assert wired.details["mean_recomputed_tokens"] == plain.details["mean_recomputed_tokens"]
    assert all(w.kv_bytes > p.kv_bytes for w, p in zip(wired.items, plain.items))  # a message: header, float32


# -- passages: the receiver's own prompt cut up (retrieval's layout) ----------------------------------

def passage_task():
    from kvcomm import load_task

    return load_task("multihop", items=4, pieces=3, facts_per_piece=2)


def test_blend_over_passages_takes_its_ratio_of_the_passages_not_the_opening(agents):
    """In process as in the service, the opening (prefilled first, exact) is neither recomputed nor
    counted in the ratio (before, in process, the ratio was of the opening and the passages)."""
    from kvcomm import EvalConfig, evaluate, make_method
    from kvcomm.eval.batch import Batch

    task = passage_task()
    run = evaluate(agents, task, [make_method("blend", ratio=0.5, senders=3, pieces="passages")],
                   EvalConfig(limit=3, batch_size=3, calib_size=1), progress=False).runs[0]
    batch = Batch(agents, task, task.items[:3])
    opening = batch.sender_pieces(3, "passages")[0].context_len
    passages = batch.sender_kv(3, "passages").context_len - opening
    assert run.details["mean_recomputed_tokens"] == pytest.approx(float((passages // 2).double().mean()))


def test_blend_over_passages_at_some_layers_keeps_the_opening_at_the_others(agents, monkeypatch):
    """share < 1 over passages: a layer not shared holds the opening, as kvcomm over passages does
    (before, only the sink: the receiver lost its own system prompt and instruction there)."""
    import kvcomm.methods.blend as blend_module
    from kvcomm import make_method
    from kvcomm.eval.batch import Batch
    from kvcomm.methods.base import Setup

    task = passage_task()
    seen = []
    real = blend_module.receiver_input
    monkeypatch.setattr(blend_module, "receiver_input", lambda shared: seen.append(shared) or real(shared))
    method = make_method("blend", ratio=0.0, senders=3, pieces="passages", share=0.5)
    method.setup(Setup(agents.num_layers, "qwen2", lambda *args: [1, 3, 0, 2], lambda: None))
    batch = Batch(agents, task, task.items[:2])
    batch.begin_run()
    method.run(batch)
    opening = batch.sender_pieces(3, "passages")[0].context_len
    whole = batch.sender_kv(3, "passages").context_len
    assert method.layers == [1, 3]
    assert torch.equal(seen[0].valid[2].sum(dim=1), opening) and torch.equal(seen[0].valid[3].sum(dim=1), whole)


def test_passages_are_the_skyline_prompt_cut_into_an_opening_passages_and_the_question():
    from tests.conftest import tiny_loaded

    model, task = tiny_loaded("llama"), passage_task()
    for item in task.items:
        text, markers = task.passage_message(item, 3)
        for marker in markers:
            text = text.replace(marker, "")
        assert text == task.skyline_message(item)
        cut = model.encode_message_parts(*task.passage_message(item, 3))
        assert len(cut) == 5 and all(cut)
        assert sum(cut, []) == model.encode_message(task.skyline_message(item))  # spaces travel with passages
        assert model.tokenizer.decode(cut[1]).strip() == item.pieces[0]


def test_blending_every_passage_is_reading_the_skyline_prompt(family):
    """ratio 1 over passages each prefilled alone = one prefill of the whole skyline prompt."""
    from kvcomm import Agents
    from kvcomm.eval.batch import Batch
    from tests.conftest import tiny_loaded

    loaded, task = tiny_loaded(family), passage_task()
    batch = Batch(Agents(loaded, loaded), task, task.items)
    model = loaded.model
    joined = share(model, batch.sender_kv(3, "passages"), range(model.config.num_hidden_layers))
    question = batch.passage_question(3)
    whole, valid = pad_left([loaded.encode_message(task.skyline_message(i)) for i in task.items], loaded.pad_id)
    want = prefill_logits(model, empty_input(model, len(task.items)), whole, valid)[:, -1]
    full, stats = blend(model, joined, recompute=1.0)
    got = prefill_logits(model, receiver_input(full), question.input_ids, question.valid)[:, -1]
    assert stats.recomputed == stats.context
    assert (got - want).abs().max() <= 1e-4
    reused, stats = blend(model, joined, recompute=0.0)
    apart = prefill_logits(model, receiver_input(reused), question.input_ids, question.valid)[:, -1]
    assert stats.recomputed == [0] * len(task.items) and (apart - want).abs().max() > 1e-3  # pieces never met


def test_passage_methods_in_a_sweep_end_at_the_skyline(agents):
    from kvcomm import make_method

    runs = run_methods(agents, [make_method("skyline"), make_method("blend", ratio=1.0, senders=2, pieces="passages"),
                                make_method("prefix", senders=2, pieces="passages"),
                                make_method("blend", ratio=0.15, senders=2, pieces="passages")])
    answers = {label: [i.answer for i in run.items] for label, run in runs.items()}
    assert answers["blend@1x2/passages"] == answers["skyline"] == answers["prefix@x2/passages"]
    assert 0 < runs["blend@0.15x2/passages"].details["mean_recomputed_tokens"]


def test_a_passage_is_prefilled_behind_the_opening_and_moved_to_position_zero(family):
    """Each passage saw the opening (not position 0 itself, which would make it a second sink) and
    nothing else; stored from position 0, its layer-0 keys are those of the passage alone there."""
    from kvcomm import Agents
    from kvcomm.eval.batch import Batch
    from tests.conftest import tiny_loaded

    loaded, task = tiny_loaded(family), passage_task()
    batch = Batch(Agents(loaded, loaded), task, task.items)
    _, *passages = batch.sender_pieces(3, "passages")
    cut = [loaded.encode_message_parts(*task.passage_message(item, 3)) for item in task.items]
    for part, kv in enumerate(passages, start=1):
        for row in range(len(task.items)):
            mine, ids = kv.row(row), torch.tensor([cut[row][part]])
            assert mine.ids.tolist() == ids.tolist() and mine.positions.tolist() == [list(range(ids.shape[1]))]
            alone = prefill(loaded.model, ids, torch.ones_like(ids, dtype=torch.bool))
            assert torch.allclose(mine.keys[0], alone.keys[0], atol=1e-5)  # layer 0: token and position only
            assert not torch.allclose(mine.values[-1], alone.values[-1], atol=1e-3)  # later layers saw the opening
