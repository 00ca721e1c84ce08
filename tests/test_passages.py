"""KVComm over one chat cut in two (``pieces="passages"``): the sender reads the skyline prompt's
opening and the context, the receiver the question and the closing, keeping the opening at the
layers not shared. Its two exact ends, fused configurations, and what it refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvcomm.errors import ConfigError
from kvcomm.protocol import SharedKV, pad_left, prefill_logits, receiver_input, share
from kvcomm.protocol.receiver import empty_input
from tests.conftest import tiny_loaded

torch.set_grad_enabled(False)


def reading(family: str, senders: int = 1):
    from kvcomm import Agents, load_task
    from kvcomm.eval.batch import Batch

    loaded, task = tiny_loaded(family), load_task("multihop", items=4, pieces=3, facts_per_piece=2)
    batch = Batch(Agents(loaded, loaded), task, task.items)
    return loaded, task, batch, batch.reading(senders, "passages")


def test_every_layer_shared_is_reading_the_skyline_prompt(family):
    loaded, task, batch, read = reading(family)
    model = loaded.model
    whole, valid = pad_left([loaded.encode_message(task.skyline_message(i)) for i in task.items], loaded.pad_id)
    want = prefill_logits(model, empty_input(model, len(task.items)), whole, valid)[:, -1]
    every = share(model, read.kv, range(model.config.num_hidden_layers), opening=read.opening)
    got = prefill_logits(model, receiver_input(every), read.prompt.input_ids, read.prompt.valid)[:, -1]
    assert (got - want).abs().max().item() <= 1e-4
    sink_only = share(model, read.kv, [1])  # the paper's sink at the other layers: not the same reading
    apart = prefill_logits(model, receiver_input(sink_only), read.prompt.input_ids, read.prompt.valid)[:, -1]
    assert (apart - want).abs().max().item() > 1e-3


def test_no_layer_shared_is_reading_the_opening_and_the_question(family):
    """At every layer the receiver sees the opening and nothing of the context; its own tokens still
    sit after the context (positions from |C|)."""
    loaded, task, batch, read = reading(family)
    model = loaded.model
    opening = batch.sender_pieces(1, "passages")[0]
    assert opening.valid.shape[1] == read.opening
    alone = dataclasses.replace(SharedKV.whole(opening), context_len=read.kv.context_len)
    want = prefill_logits(model, receiver_input(alone), read.prompt.input_ids, read.prompt.valid)
    got = prefill_logits(model, receiver_input(share(model, read.kv, [], opening=read.opening)),
                         read.prompt.input_ids, read.prompt.valid)
    assert (got - want)[read.prompt.valid].abs().max().item() <= 1e-5


def test_in_a_sweep_every_layer_answers_as_the_skyline_and_fused_as_alone():
    from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method

    loaded = tiny_loaded("qwen2")
    agents, task = Agents(loaded, loaded), load_task("multihop", items=5, pieces=2, facts_per_piece=2)
    config = EvalConfig(limit=4, batch_size=3, calib_size=1)

    def answers(*methods):
        report = evaluate(agents, task, list(methods), config, progress=False)
        return {run.label: [item.answer for item in run.items] for run in report.runs}

    together = answers(make_method("skyline"), make_method("kvcomm", ratio=1.0, pieces="passages"),
                       make_method("kvcomm", ratio=0.5, pieces="passages"),
                       make_method("random", ratio=0.5, senders=2, pieces="passages"))
    assert together["kvcomm@1/passages"] == together["skyline"]
    assert together["kvcomm@0.5/passages"] == answers(make_method("kvcomm", ratio=0.5, pieces="passages"))[
        "kvcomm@0.5/passages"]  # decoded with kvcomm@1 in one batch, the same as alone
    assert "random@0.5x2/passages" in together


@pytest.mark.parametrize(("method", "options", "refusal"), [
    ("kvcomm", {"mode": "shift-back"}, "shift-back"),
    ("kvcomm", {"mode": "legacy"}, "causal mode only"),
    ("random", {"mode": "padded-zero"}, "padded-zero"),
    ("online", {}, "chats"),
])
def test_what_passages_cannot_do_is_refused(method, options, refusal):
    from kvcomm import make_method

    with pytest.raises(ConfigError, match=refusal):
        make_method(method, ratio=0.5, pieces="passages", **options)


def test_an_opening_must_fit_and_leave_every_row_a_token():
    loaded, _, _, read = reading("llama")
    with pytest.raises(ConfigError, match="does not fit"):
        share(None, read.kv, [0], opening=read.kv.valid.shape[1] + 1)
    padded = dataclasses.replace(read.kv, valid=read.kv.valid.clone())
    padded.valid[0, :read.opening] = False  # a row whose opening columns are all padding
    with pytest.raises(ConfigError, match="without a sink"):
        share(None, padded, [0], opening=read.opening)
    for mode in ("shift-back", "legacy", "padded-sink"):
        with pytest.raises(ConfigError, match="causal mode only"):
            share(loaded.model, read.kv, [0], mode=mode, opening=read.opening)


def test_calibration_reads_items_as_passages_when_asked(monkeypatch):
    """The answer rule scores layer sets on the layout the method will read, keeping each row's
    opening (and says so in the profile); the budget answers on it too."""
    from importlib import import_module

    from kvcomm import Agents, load_task

    budget, calibration = (import_module(f"kvcomm.selection.{name}") for name in ("budget", "calibrate"))

    loaded = tiny_loaded("qwen2")
    agents, task = Agents(loaded, loaded), load_task("multihop", items=3, pieces=2, facts_per_piece=2)
    seen: dict[str, list] = {"scored": [], "shared": [], "importance": []}
    real_scored, real_share, real_importance = calibration.Scored, budget.share, calibration.attention_importance
    monkeypatch.setattr(calibration, "Scored", lambda *a: seen["scored"].append(a[5]) or real_scored(*a))
    monkeypatch.setattr(calibration, "attention_importance",
                        lambda *a: seen["importance"].append(a[4]) or real_importance(*a))
    monkeypatch.setattr(budget, "share", lambda *a, **k: seen["shared"].append(k["opening"]) or real_share(*a, **k))
    opening = opening_width(agents, task)
    profiles = {}
    for pieces in ("chats", "passages"):
        seen["scored"].clear(), seen["shared"].clear(), seen["importance"].clear()
        profiles[pieces] = calibration.calibrate(agents, task, task.items, rule="answer", steps=2, pool=3,
                                                 progress=False, pieces=pieces, tolerance=0.5)
        want = 0 if pieces == "chats" else opening
        assert seen["scored"] == [want] * 3 and set(seen["shared"]) == {want} and seen["importance"] == [want]
    assert profiles["passages"].details["pieces"] == "passages" and "pieces" not in profiles["chats"].details
    assert profiles["passages"].details["budget"]["items"] == 3


def test_importance_counts_no_mass_on_the_opening_a_receiver_keeps_anyway(family):
    """Attention importance over passages: the opening's columns are held at every layer, so their
    mass does not count; an opening as wide as the context leaves nothing to count."""
    from kvcomm.protocol import attention_importance

    loaded, _, _, read = reading(family)
    model, prompt = loaded.model, read.prompt
    whole = attention_importance(model, read.kv, prompt.input_ids, prompt.valid)
    less = attention_importance(model, read.kv, prompt.input_ids, prompt.valid, read.opening)
    assert bool((less <= whole + 1e-6).all()) and bool((less >= 0).all()) and bool((less > 1e-3).any())
    assert (whole - less).max().item() > 1e-2  # the opening held mass (Gemma3's sliding layers do not see it)
    assert len({int(n) for n in read.kv.valid[:, :read.opening].sum(dim=1)}) == 1  # one opening width: column 0
    sink = attention_importance(model, read.kv, prompt.input_ids, prompt.valid, 1)  # is every row's sink
    assert torch.equal(sink, whole)
    half = attention_importance(model, read.kv, prompt.input_ids, prompt.valid, read.opening // 2)
    assert bool((less <= half + 1e-6).all()) and bool((half <= whole + 1e-6).all())
    width = read.kv.valid.shape[1]
    assert attention_importance(model, read.kv, prompt.input_ids, prompt.valid, width).abs().max().item() == 0.0


def opening_width(agents, task) -> int:
    """The opening's width in tokens (every item of a task shares it)."""
    from kvcomm.eval.batch import Batch

    read = Batch(agents, task, task.items).reading(1, "passages")
    widths = {int(n) for n in read.kv.valid[:, :read.opening].sum(dim=1)}
    assert len(widths) == 1 and widths.pop() > 1
    return read.opening


def test_a_run_ranks_each_layout_on_its_own_reading_and_refuses_a_profile_of_the_other():
    from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method

    loaded = tiny_loaded("qwen2")
    agents, task = Agents(loaded, loaded), load_task("multihop", items=5, pieces=2, facts_per_piece=2)
    config = EvalConfig(limit=3, batch_size=3, calib_size=2, selection="paper")
    report = evaluate(agents, task, [make_method("kvcomm", ratio=0.5), make_method("kvcomm", ratio=0.5,
                                                                                   pieces="passages")],
                      config, progress=False)
    assert set(report.profiles) == {"paper", "paper/passages"}
    assert report.profiles["paper/passages"]["details"]["pieces"] == "passages"
    assert report.profiles["paper"]["importance"] != report.profiles["paper/passages"]["importance"]
    from kvcomm.selection.calibrate import Profile

    chats = Profile.model_validate(report.profiles["paper"])
    with pytest.raises(ConfigError, match="read as chats, this run reads passages"):
        evaluate(agents, task, [make_method("kvcomm", ratio=0.5, pieces="passages")],
                 config.model_copy(update={"pieces": "passages"}), profile=chats, progress=False)


def test_passages_travel_as_kv_messages_with_their_opening():
    """Through the wire (format 9) a layer not shared carries the opening; an fp32 message gives the
    in-process answers, and its bytes are the message's."""
    from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method

    loaded = tiny_loaded("llama")
    agents, task = Agents(loaded, loaded), load_task("multihop", items=4, pieces=2, facts_per_piece=2)
    report = evaluate(agents, task, [make_method("kvcomm", ratio=0.5, pieces="passages"),
                                     make_method("kvcomm", ratio=0.5, pieces="passages", codec="fp32")],
                      EvalConfig(limit=3, batch_size=3, calib_size=1), progress=False)
    here, wired = report.runs
    assert wired.label == "kvcomm@0.5/passages+fp32"
    assert [i.answer for i in here.items] == [i.answer for i in wired.items]
    assert all(w.kv_bytes > h.kv_bytes for h, w in zip(here.items, wired.items))  # header and frames on top


def test_a_stored_passage_ending_in_whitespace_reads_as_the_same_line():
    """``passage_parts`` read ``text + "\\n"``: a passage from a file (ending in a newline) or with a
    trailing space tokenised into another token there (``.\\n\\n``, `` \\n``), so blending it at
    ratio 1 no longer read like the same lines typed; trailing whitespace is dropped."""
    from kvcomm import encode_passage

    loaded = tiny_loaded()
    line = loaded.passage_parts("Omar lives in Cairo.")
    for text in ("Omar lives in Cairo.\n", "Omar lives in Cairo. ", "Omar lives in Cairo.\r\n\n \t"):
        assert loaded.passage_parts(text) == line, repr(text)
    assert encode_passage(loaded, "Omar lives in Cairo.\n").token_ids.flatten().tolist() == line[1]


def test_a_context_written_with_newlines_is_read_as_written(tmp_path):
    """One passage is the context as written (before, re-split into sentences and joined with
    spaces: newlines and tabs were lost, so 'every layer shared' was no longer the skyline); pieces
    keep what is inside them."""
    import json

    from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method
    from kvcomm.tasks.base import split_context

    assert split_context("A b.\nC d.\tE\n f g. H.", 2) == ["A b.\nC d.", "E\n f g. H."]
    path = tmp_path / "lines.jsonl"
    rows = [{"context": f"Line one of {k}.\nLine\ttwo.\n\nThe answer is {k}.", "question": "What is it?",
             "answers": [str(k)]} for k in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task("jsonl", path)
    assert task.items[0].parts(1) == [task.items[0].context]
    loaded = tiny_loaded("llama")
    report = evaluate(Agents(loaded, loaded), task, [make_method("skyline"), make_method("kvcomm", ratio=1.0,
                      pieces="passages")], EvalConfig(limit=3, calib_size=1), progress=False)
    skyline, passages = report.runs
    assert [i.receiver_ids for i in skyline.items] == [p.sender_ids + p.receiver_ids for p in passages.items]
    assert [i.answer for i in skyline.items] == [i.answer for i in passages.items]


def test_an_item_that_cannot_be_cut_into_the_pieces_asked_is_refused_before_any_work(tmp_path):
    import json

    from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method
    from kvcomm.errors import DataError

    path = tmp_path / "closed.jsonl"
    rows = [{"id": f"i{k}", "context": "Two words." if k else "", "question": "q?", "answers": ["a"]}
            for k in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task, loaded = load_task("jsonl", path), tiny_loaded("llama")
    agents, config = Agents(loaded, loaded), EvalConfig(limit=2, calib_size=1)
    with pytest.raises(DataError, match=r"item i0: its context is empty, and kvcomm@1/passages"):
        evaluate(agents, task, [make_method("kvcomm", ratio=1.0, pieces="passages")], config, progress=False)
    with pytest.raises(DataError, match=r"item i0: cannot split a context of 0 word\(s\) into 3 parts, and kvcomm@1x3"):
        evaluate(agents, task, [make_method("kvcomm", ratio=1.0, senders=3)], config, progress=False)
    assert evaluate(agents, task, [make_method("skyline")], config, progress=False).runs[0].n == 2  # read whole
    # calibration reads its items whole: a one-word calibration item is no refusal for two senders
    path.write_text("\n".join(json.dumps({"id": f"i{k}", "context": "Rome." if k == 2 else "Two words. Three.",
                                          "question": "q?", "answers": ["a"]}) for k in range(3)) + "\n")
    assert evaluate(agents, load_task("jsonl", path), [make_method("kvcomm", ratio=0.5, senders=2)], config,
                    progress=False).runs[0].n == 2
    from kvcomm.selection import calibrate

    with pytest.raises(DataError, match="item i0: its context is empty, and calibrating on passages"):
        calibrate(agents, task, task.items[:1], pieces="passages", rule="paper", progress=False)
