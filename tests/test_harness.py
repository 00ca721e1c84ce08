"""The harness end to end on a tiny model: every method, results JSON, profile, plot."""

from __future__ import annotations

import json

import pytest
import torch

from kvcomm import Agents, EvalConfig, build_methods, calibrate, evaluate, make_method, plot_sweep
from kvcomm.errors import ConfigError, DataError
from kvcomm.eval import Report
from kvcomm.eval.memory import item_bytes, plan_batches, rss_bytes
from kvcomm.eval.provenance import data_record
from kvcomm.protocol import empty_input, greedy_generate
from kvcomm.selection import Profile
from kvcomm.selection.calibrate import DEFAULT_RULE
from kvcomm.tasks import load_task
from tests.conftest import tiny_loaded


@pytest.fixture(scope="module")
def agents() -> Agents:
    model = tiny_loaded("llama")
    return Agents(model, model)


def test_sweep_runs_every_method_and_records_what_it_did(agents, tmp_path):
    task = load_task("facts", items=8)
    methods = build_methods(["baseline", "skyline", "kvcomm", "random", "contiguous"], [0.5, 1.0])
    report = evaluate(agents, task, methods, EvalConfig(limit=6, batch_size=4, calib_size=2), progress=False)
    labels = [r.label for r in report.runs]
    assert labels == ["baseline", "skyline", "kvcomm@0.5", "kvcomm@1", "random@0.5", "random@1",
                      "contiguous@0.5", "contiguous@1"]
    by = {r.label: r for r in report.runs}
    assert by["kvcomm@1"].layers == [0, 1, 2, 3] and len(by["kvcomm@0.5"].layers) == 2
    assert by["baseline"].kv_bytes_mean == 0 and by["kvcomm@1"].kv_bytes_mean > by["kvcomm@0.5"].kv_bytes_mean
    for run in report.runs:
        assert run.n == 6 and 0 <= run.scores["contains"].ci95[0] <= run.scores["contains"].ci95[1] <= 1
        assert all(i.receiver_ids for i in run.items)
    assert report.config["calibration_items"] == ["facts_0_0006", "facts_0_0007"]
    assert report.profile["calibration_items"] == ["facts_0_0006", "facts_0_0007"]
    path = tmp_path / "r.json"
    report.save(path)
    assert Report.model_validate(json.loads(path.read_text())).runs[2].label == "kvcomm@0.5"
    assert plot_sweep(report, tmp_path / "p.png").stat().st_size > 1000


def test_profile_round_trip_and_reuse(agents, tmp_path):
    task = load_task("facts", items=6)
    profile = calibrate(agents, task, task.items[-2:], progress=False)
    assert sorted(profile.ranking) == [0, 1, 2, 3] and len(profile.importance) == 4
    profile.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded == profile
    report = evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), loaded,
                      progress=False)
    assert report.runs[0].layers == sorted(profile.ranking[:2])


def test_profile_calibrated_on_test_items_is_refused(agents):
    task = load_task("facts", items=6)
    profile = calibrate(agents, task, task.items[:1], progress=False)
    with pytest.raises(ConfigError, match="calibrated on test items"):
        evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), profile,
                 progress=False)


def test_a_profile_made_on_another_data_file_of_the_same_task_name_is_refused(agents, tmp_path):
    """A jsonl task is named after its file and its ids are line numbers: a profile calibrated on
    lines of one mine.jsonl was taken for another mine.jsonl whose test items held those contexts."""
    import json

    rows = [{"context": f"Person {n} lives in City {n}.", "question": f"Where does person {n} live?",
             "answers": [f"City {n}"]} for n in range(6)]
    for folder, order in (("a", rows), ("b", rows[::-1])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order))
    made_on = load_task("jsonl", str(tmp_path / "a" / "mine.jsonl"))
    profile = calibrate(agents, made_on, made_on.items[-2:], progress=False)
    profile.details["provenance"] = {"data": data_record(made_on)}  # as kvcomm calibrate records it
    other = load_task("jsonl", str(tmp_path / "b" / "mine.jsonl"))
    with pytest.raises(ConfigError, match="calibrated on mine items of another data file"):
        evaluate(agents, other, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), profile,
                 progress=False)
    report = evaluate(agents, made_on, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), profile,
                      progress=False)
    assert report.runs[0].n == 4
    # a results file given as the profile carries its data file too (before, only calibrate's did)
    from kvcomm.selection.blocks import read_profile

    ran = evaluate(agents, made_on, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=3, calib_size=2),
                   progress=False)
    ran.save(tmp_path / "results.json")
    with pytest.raises(ConfigError, match="calibrated on mine items of another data file"):
        evaluate(agents, other, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=3, calib_size=0),
                 read_profile(tmp_path / "results.json"), progress=False)


def test_a_profile_of_items_made_with_other_options_is_refused(agents):
    """Generated ids number items and do not name the options that made them: a profile of
    ``facts`` with 2 facts per item is refused for items with 4 (before, its ids were compared as
    if they named the same items), while another item count is fine (the first items are the same)."""
    other = load_task("facts", items=6, facts_per_item=2)
    profile = calibrate(agents, other, other.items[-1:], progress=False)
    assert profile.task_options == {"facts_per_item": 2, "seed": 0}
    task = load_task("facts", items=6)
    with pytest.raises(ConfigError, match=r"made with facts_per_item=2, this run's are made with facts_per_item=4"):
        evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), profile,
                 progress=False)
    more = load_task("facts", items=9, facts_per_item=2)
    report = evaluate(agents, more, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), profile,
                      progress=False)
    assert report.runs[0].layers == sorted(profile.ranking[:2])
    old = profile.model_copy(update={"task_options": None})  # written before options were recorded: not compared
    evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), old, progress=False)


def test_answers_do_not_depend_on_batch_size(agents):
    task = load_task("facts", items=7)
    methods = lambda: build_methods(["skyline", "kvcomm"], [0.5])  # noqa: E731
    one = evaluate(agents, task, methods(), EvalConfig(limit=6, batch_size=1), progress=False)
    many = evaluate(agents, task, methods(), EvalConfig(limit=6, batch_size=4), progress=False)
    for a, b in zip(one.runs, many.runs):
        assert [i.answer for i in a.items] == [i.answer for i in b.items]


def test_ask_with_all_layers_equals_reading_both_messages_in_sequence(agents):
    context, question = "Mira lives in Oslo.", "Where does Mira live?"
    task = load_task("facts", items=1)
    item = type(task.items[0])("0", context, question, ())
    model = agents.receiver
    ids = model.encode_message(task.sender_message(item)) + model.encode_message(task.receiver_message(item))
    tensor = torch.tensor([ids])
    expected = greedy_generate(model.model, empty_input(model.model, 1), tensor, tensor >= 0, 6,
                               model.stop_ids, model.pad_id)[0]
    assert agents.ask(context, question, max_new_tokens=6) == model.decode(expected)


def test_method_options_are_checked():
    with pytest.raises(ConfigError):
        build_methods(["kvcomm"])
    with pytest.raises(ConfigError, match="Did you mean"):
        build_methods(["skylin"])
    with pytest.raises(ConfigError):
        build_methods(["random"], layers=[1, 2])


def test_a_memory_budget_counts_the_rows_fused_configurations_add_and_takes_the_largest_batch_that_fits(agents):
    """Three ratios of kvcomm answer a batch together, three receiver rows an item: the budget
    that holds 6 lone items holds 2 such items; 3 items' worth gives batches of 3, not the 2 halving 8 gave."""
    from kvcomm.eval.harness import _fused_rows

    task = load_task("facts", items=8)
    longest = max(len(agents.receiver.encode_message(task.skyline_message(i))) for i in task.items)
    per_item = item_bytes(agents, longest + task.max_new_tokens)  # what the longest item takes
    assert [len(b) for b in plan_batches(agents, task, task.items, 8, budget=3 * per_item)] == [3, 3, 2]
    assert max(len(b) for b in plan_batches(agents, task, task.items, 8, budget=6 * per_item, rows_per_item=3)) == 2
    assert _fused_rows(build_methods(["kvcomm"], [0.3, 0.5, 0.7])) == 3 and _fused_rows(build_methods(["skyline"])) == 1


def test_memory_budget_shrinks_batches_without_changing_answers(agents):
    task = load_task("facts", items=8)
    per_item = item_bytes(agents, 200)
    sizes = [len(b) for b in plan_batches(agents, task, task.items, 8, budget=3 * per_item)]
    assert sum(sizes) == 8 and max(sizes) <= 3
    assert [len(b) for b in plan_batches(agents, task, task.items, 8, budget=None)] == [8]
    methods = lambda: build_methods(["kvcomm"], [0.5])  # noqa: E731
    free = evaluate(agents, task, methods(), EvalConfig(limit=7, batch_size=8, calib_size=1), progress=False)
    budget_gb = rss_bytes() / 2**30 + 0.002  # 2 MiB above what is in use: one item (~1.8 MiB) per batch
    tight = evaluate(agents, task, methods(), EvalConfig(limit=7, batch_size=8, calib_size=1,
                                                         max_memory_gb=budget_gb), progress=False)
    assert [i.answer for i in free.runs[0].items] == [i.answer for i in tight.runs[0].items]


def test_impossible_memory_budget_is_refused(agents):
    with pytest.raises(ConfigError, match="max-memory"):
        evaluate(agents, load_task("facts", items=4), build_methods(["baseline"]),
                 EvalConfig(limit=3, max_memory_gb=0.001), progress=False)


def test_skip_evaluates_a_later_set_of_test_items_and_names_itself_only_when_used(agents):
    """``skip`` moves the test items past the first ones (the calibration items stay at the end);
    answers on them equal those of a run over every item; at 0 it is left out of the run's
    identity, so checkpoints written before the option still resume."""
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=8)
    methods = [make_method("kvcomm", ratio=0.5)]
    later = evaluate(agents, task, methods, EvalConfig(limit=3, skip=3, batch_size=4, calib_size=2), progress=False)
    every = evaluate(agents, task, methods, EvalConfig(limit=6, batch_size=4, calib_size=2), progress=False)
    assert [i.id for i in later.runs[0].items] == [i.id for i in task.items[3:6]]
    assert [i.answer for i in later.runs[0].items] == [i.answer for i in every.runs[0].items[3:]]
    assert later.config["calibration_items"] == every.config["calibration_items"] == ["facts_0_0006", "facts_0_0007"]
    identity = {skip: run_identity(task, methods, EvalConfig(skip=skip).model_dump(mode="json"), "m", "m", "float32",
                                   None)["evaluation"] for skip in (0, 3)}
    assert "skip" not in identity[0] and identity[3]["skip"] == 3


def test_an_interrupted_run_resumes_to_the_same_report_method_state_included(agents, tmp_path, monkeypatch):
    from kvcomm.eval import harness
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=8)
    config = EvalConfig(limit=6, batch_size=2, calib_size=2)
    methods = lambda: build_methods(["kvcomm", "online", "blend"], [0.5], interval=3)  # noqa: E731
    whole = evaluate(agents, task, methods(), config, progress=False)
    identity = run_identity(task, methods(), config.model_dump(mode="json"), agents.sender.name,
                            agents.receiver.name, "float32", None)
    real, calls, stopped = harness._run_one, [], []

    def stops_at_the_fourth(method, batch):
        calls.append(method.label)
        if len(calls) == 4 and not stopped:
            stopped.append(True)
            raise RuntimeError("interrupted")
        return real(method, batch)

    monkeypatch.setattr(harness, "_run_one", stops_at_the_fourth)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    with pytest.raises(ConfigError, match="--resume"):  # a checkpoint is never started over silently
        Checkpoint(tmp_path / "c", identity)
    with pytest.raises(ConfigError, match="batch_size: 2 → 3"):
        Checkpoint(tmp_path / "c", {**identity, "evaluation": {**identity["evaluation"], "batch_size": 3}},
                   resume=True)
    calls.clear()
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    assert calls == ["kvcomm@0.5", "online@0.5/3", "blend@0.5x2", "kvcomm@0.5", "online@0.5/3",
                     "blend@0.5x2"]  # only what had not finished
    untimed = lambda profile: {**profile, "cost": {**profile["cost"], "seconds": None}}  # noqa: E731
    assert untimed(resumed.profile) == untimed(whole.profile) and resumed.config == whole.config
    timing = {"seconds", "sender_seconds"}
    for a, b in zip(whole.runs, resumed.runs):
        assert a.model_dump(exclude=timing) == b.model_dump(exclude=timing)
    assert len(resumed.runs[1].details["rebuilds"]) == 3  # online's rebuilds span the interruption
    assert resumed.runs[2].details == whole.runs[2].details  # blend's counts: every batch, once


def test_rules_side_by_side_in_one_run(agents):
    """kvcomm's `selection` option: each rule's ranking is calibrated once and recorded."""
    task = load_task("facts", items=6)
    methods = [make_method("kvcomm", ratio=0.5, selection=rule) for rule in ("paper", "answer", "prior")]
    methods.append(make_method("kvcomm", ratio=0.5))  # the run's rule (EvalConfig.selection)
    report = evaluate(agents, task, methods, EvalConfig(limit=4, calib_size=2, selection="answer"), progress=False)
    assert [r.label for r in report.runs] == ["kvcomm@0.5~paper", "kvcomm@0.5~answer", "kvcomm@0.5~prior",
                                              "kvcomm@0.5"]
    assert set(report.profiles) == {"paper", "answer", "prior"} and report.profile["rule"] == "answer"
    by = {r.label: r for r in report.runs}
    assert by["kvcomm@0.5"].layers == by["kvcomm@0.5~answer"].layers  # the same ranking, calibrated once
    for rule, profile in report.profiles.items():
        assert by[f"kvcomm@0.5~{rule}"].layers == sorted(profile["ranking"][:2])


def test_a_given_profile_ranks_only_its_own_rules_methods(agents):
    """With a paper-rule profile given and --selection prune, ``kvcomm~prune`` gets prune's ranking
    (calibrated here), not the profile's under prune's name; plain ``kvcomm`` keeps the profile's."""
    task = load_task("facts", items=6)
    paper = calibrate(agents, task, task.items[-2:], progress=False, rule="paper")
    paper.ranking = [3, 1, 0, 2]  # a ranking no search makes, so that borrowing it shows
    methods = [make_method("kvcomm", ratio=0.5), make_method("kvcomm", ratio=0.5, selection="prune"),
               make_method("kvcomm", ratio=0.5, selection="paper")]
    report = evaluate(agents, task, methods, EvalConfig(limit=4, calib_size=2, selection="prune"), paper,
                      progress=False)
    by = {r.label: r.layers for r in report.runs}
    assert by["kvcomm@0.5"] == by["kvcomm@0.5~paper"] == [1, 3]
    assert set(report.profiles) == {"paper", "prune"}
    assert by["kvcomm@0.5~prune"] == sorted(report.profiles["prune"]["ranking"][:2])


def test_a_method_naming_a_rule_gets_that_rules_calibration_items(agents):
    """``--selection paper`` takes one calibration item, ``prune`` eight (four to search on, four
    held out to choose its objective): a run with ``kvcomm~prune`` holds out eight, so prune is
    not calibrated on the paper rule's one, and chooses its objective as it would alone."""
    task = load_task("facts", items=10)
    config = EvalConfig(selection="paper")
    alone = evaluate(agents, task, [make_method("kvcomm", ratio=0.5)], config, progress=False)
    assert len(alone.config["calibration_items"]) == 1 and alone.runs[0].n == 9
    report = evaluate(agents, task, [make_method("kvcomm", ratio=0.5, selection="prune")], config, progress=False)
    assert len(report.config["calibration_items"]) == 8 and report.runs[0].n == 2
    prune = report.profiles["prune"]
    assert len(prune["calibration_items"]) == 8 and prune["details"]["objective"].startswith("auto: ")


def test_a_profile_of_another_pair_is_refused(agents):
    task = load_task("facts", items=6)
    profile = calibrate(agents, task, task.items[-1:], progress=False, rule="paper")
    assert profile.weights == list(agents.weights)
    run = lambda given: evaluate(agents, task, build_methods(["kvcomm"], [0.5]),  # noqa: E731
                                 EvalConfig(limit=4, calib_size=1), given, progress=False)
    with pytest.raises(ConfigError, match="calibrated on other weights"):  # a model derived again under its name
        run(profile.model_copy(update={"weights": ["0" * 32, agents.weights[1]]}))
    with pytest.raises(ConfigError, match="ranks layers for .* another-model"):  # a profile without weights: names
        run(profile.model_copy(update={"receiver": "another-model", "weights": None}))
    report = run(profile.model_copy(update={"receiver": "./the/same/model"}))  # other name, same weights
    assert report.runs and report.config["selection"] == "paper"  # the profile's rule ranked, not the default's


def test_bucketed_batches_group_lengths_and_report_in_item_order(agents, tmp_path, monkeypatch):
    from kvcomm.eval import harness
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=9)
    lengths = {i.id: len(agents.sender.encode_message(task.sender_message(i))) for i in task.items}
    assert len(set(lengths.values())) > 2  # the items differ in length, so the order can change
    seen: list[list[str]] = []
    real = harness._run_one

    def records(method, batch):
        seen.append([item.id for item in batch.items])
        return real(method, batch)

    monkeypatch.setattr(harness, "_run_one", records)
    methods = lambda: build_methods(["skyline", "kvcomm"], [0.5])  # noqa: E731
    config = EvalConfig(limit=8, batch_size=3)
    bucketed = evaluate(agents, task, methods(), config, progress=False)
    batches = seen[::2]  # each batch once (two methods ran on it)
    assert sorted(sum(batches, [])) == sorted(i.id for i in task.items[:8])
    assert [lengths[i] for i in sum(batches, [])] == sorted(lengths[i.id] for i in task.items[:8])
    in_order = evaluate(agents, task, methods(), EvalConfig(limit=8, batch_size=3, bucket=False), progress=False)
    for a, b in zip(bucketed.runs, in_order.runs):
        assert [i.id for i in a.items] == [i.id for i in task.items[:8]] == [i.id for i in b.items]
        assert [i.answer for i in a.items] == [i.answer for i in b.items]
    assert seen[-2][0] == task.items[6].id  # without bucketing, batches follow the items

    # a bucketed run interrupted and resumed takes its recorded batches as they were
    identity = run_identity(task, methods(), config.model_dump(mode="json"), agents.sender.name,
                            agents.receiver.name, "float32", None)
    seen.clear()

    def stops_at_the_third(method, batch):
        if len(seen) == 2:
            raise RuntimeError("interrupted")
        return records(method, batch)

    monkeypatch.setattr(harness, "_run_one", stops_at_the_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    monkeypatch.setattr(harness, "_run_one", records)
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    timing = {"seconds", "sender_seconds"}
    assert [r.model_dump(exclude=timing) for r in resumed.runs] == [r.model_dump(exclude=timing)
                                                                     for r in bucketed.runs]


def test_repeated_item_ids_are_refused():
    from kvcomm.errors import DataError
    from kvcomm.tasks.base import Item, Task

    item = Item("a", "Mira lives in Oslo.", "Where does Mira live?", ("Oslo",))
    with pytest.raises(DataError, match="unique"):
        Task("t", [item, item], max_new_tokens=4)


def test_configurations_run_together_give_what_each_gives_alone(agents, monkeypatch):
    from kvcomm.eval import harness

    task = load_task("facts", items=7)
    methods = lambda: build_methods(["kvcomm", "random", "skyline"], [0.5, 1.0]) + build_methods(  # noqa: E731
        ["kvcomm"], [0.5], codec="int8")
    together: list[list[str]] = []
    real = harness._run_together
    monkeypatch.setattr(harness, "_run_together", lambda group, batch: together.append(
        [m.label for m in group]) or real(group, batch))
    both = evaluate(agents, task, methods(), EvalConfig(limit=6, batch_size=3), progress=False)
    assert together == [["kvcomm@0.5", "kvcomm@1", "random@0.5", "random@1"]] * 2  # the int8 one runs alone
    for method in methods():
        alone = evaluate(agents, task, [method], EvalConfig(limit=6, batch_size=3), progress=False).runs[0]
        run = next(r for r in both.runs if r.label == alone.label)
        assert [i.answer for i in run.items] == [i.answer for i in alone.items]
        assert [i.kv_bytes for i in run.items] == [i.kv_bytes for i in alone.items]


def test_a_runs_results_serve_as_its_profile_so_calibration_is_paid_once(agents, tmp_path, monkeypatch):
    """`--profile results.json` reuses the ranking an earlier run calibrated: the same layers, no
    second calibration; results that made no ranking are refused with a clear error."""
    from kvcomm.errors import DataError
    from kvcomm.eval import harness
    from kvcomm.selection.blocks import read_profile, read_ranking

    task = load_task("facts", items=6)
    first = evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=2), progress=False)
    first.save(tmp_path / "run.json")
    calls = []
    monkeypatch.setattr(harness, "calibrate", lambda *a, **k: calls.append(1))
    loaded = read_ranking(tmp_path / "run.json")
    assert loaded.model_dump() == first.profile and loaded.rule == DEFAULT_RULE
    assert read_ranking(tmp_path / "run.json", DEFAULT_RULE).model_dump() == first.profile  # one rule's, by name
    with pytest.raises(DataError, match="holds no paper ranking"):
        read_ranking(tmp_path / "run.json", "paper")
    again = evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=0), loaded,
                     progress=False)
    assert again.runs[0].layers == first.runs[0].layers and not calls
    plain = evaluate(agents, task, build_methods(["skyline"], []), EvalConfig(limit=2), progress=False)
    plain.save(tmp_path / "s.json")
    with pytest.raises(DataError, match="no layer ranking"):
        read_profile(tmp_path / "s.json")


# --- checkpoints: what a resumed run reads is checked, and what the run made is reused ---


def _checkpointed(agents, folder, task, config, methods, stop_at=None, monkeypatch=None, resume=False):
    """``evaluate`` recording into the checkpoint ``folder``; ``stop_at``: interrupted at that
    ``_run_one`` call (the checkpoint keeps what finished before). Returns the report, or None."""
    from kvcomm.eval import harness
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    identity = run_identity(task, methods(), config.model_dump(mode="json"), agents.sender.name,
                            agents.receiver.name, "float32", None)
    if stop_at is None:
        return evaluate(agents, task, methods(), config, progress=False,
                        checkpoint=Checkpoint(folder, identity, resume=resume))
    real, calls = harness._run_one, []

    def stops(method, batch):
        calls.append(1)
        if len(calls) == stop_at:
            raise RuntimeError("interrupted")
        return real(method, batch)

    monkeypatch.setattr(harness, "_run_one", stops)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(folder, identity))
    monkeypatch.setattr(harness, "_run_one", real)
    return None


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _edit(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(("damage", "message"), [
    # batch 0 holds facts_0_0000 and facts_0_0001 (no bucketing)
    (lambda b0, b1: _edit(b0, lambda r: r["runs"]["baseline"]["items"].pop()),
     r"batch-00000.json: the results of baseline are for items \[\"facts_0_0000\"\]"),
    (lambda b0, b1: _edit(b0, lambda r: r["runs"]["baseline"]["items"][0].update(id="nope")),
     r"batch-00000.json: the results of baseline are for items"),
    (lambda b0, b1: _edit(b0, lambda r: (r.update(ids=[r["ids"][0]] * 2), r["runs"]["baseline"].update(
        items=[r["runs"]["baseline"]["items"][0]] * 2))),
     r"batch-00000.json holds items \['facts_0_0000'\] already in this or an earlier batch"),
    (lambda b0, b1: b1.write_bytes(b0.read_bytes()),
     r"batch-00001.json holds items \['facts_0_0000', 'facts_0_0001'\] already in this or an earlier batch"),
    (lambda b0, b1: _edit(b0, lambda r: r.update(ids=[], runs={})), r"batch-00000.json holds a batch of no items"),
])
def test_a_batch_whose_results_miss_repeat_or_swap_items_is_refused_naming_its_file(agents, tmp_path, damage,
                                                                                     message):
    """Before, a batch missing an item's results resumed with n one short of the test items, and a
    result of an item not the batch's escaped as a KeyError."""
    from kvcomm.errors import DataError

    task = load_task("facts", items=6)
    config = EvalConfig(limit=4, batch_size=2, calib_size=1, bucket=False)
    methods = lambda: build_methods(["baseline"])  # noqa: E731
    folder = tmp_path / "c"
    whole = _checkpointed(agents, folder, task, config, methods)
    assert whole.runs[0].n == 4
    damage(folder / "batch-00000.json", folder / "batch-00001.json")
    before = _files(folder)
    with pytest.raises(DataError, match=message):
        _checkpointed(agents, folder, task, config, methods, resume=True)
    assert _files(folder) == before  # nothing lost


def test_a_batch_of_items_that_are_not_the_runs_test_items_is_refused(agents, tmp_path):
    from kvcomm.errors import DataError

    task = load_task("facts", items=6)
    config = EvalConfig(limit=4, batch_size=2, calib_size=1, bucket=False)
    methods = lambda: build_methods(["baseline"])  # noqa: E731
    folder = tmp_path / "c"
    _checkpointed(agents, folder, task, config, methods)
    batch = folder / "batch-00001.json"
    recorded = batch.read_bytes()  # facts_0_0002, facts_0_0003

    def rename(record):  # a consistent batch, of an item this run does not test
        record["ids"][0] = record["runs"]["baseline"]["items"][0]["id"] = "facts_0_0005"

    def reverse(record):  # facts_0_0003, facts_0_0002: out of order, for a run that keeps the items' order
        record["ids"].reverse()
        for run in record["runs"].values():
            run["items"].reverse()

    batch.write_bytes(recorded)
    _edit(batch, rename)
    with pytest.raises(DataError, match=r"batch-00001.json holds items \['facts_0_0005'\] that are not test items"):
        _checkpointed(agents, folder, task, config, methods, resume=True)
    batch.write_bytes(recorded)
    _edit(batch, reverse)  # in another order: taken (a cluster's batches come back in any order)
    assert _checkpointed(agents, folder, task, config, methods, resume=True).runs[0].n == 4
    online = lambda: build_methods(["online"], [0.5])  # noqa: E731  (it learns from the stream of batches, in order)
    _checkpointed(agents, tmp_path / "online", task, config, online)
    _edit(tmp_path / "online" / "batch-00001.json", reverse)
    with pytest.raises(DataError, match=r"batch-00001.json holds items out of order"):
        _checkpointed(agents, tmp_path / "online", task, config, online, resume=True)


def test_a_damaged_or_foreign_ranking_in_a_checkpoint_is_refused_naming_it(agents, tmp_path):
    """Before, a recorded ranking [0, 0, 0, 0] ran (one layer shared at ratio 0.5), and a recorded
    profile that was not one escaped as a raw pydantic ValidationError."""
    from kvcomm.errors import DataError

    task = load_task("facts", items=5)
    config = EvalConfig(limit=4, batch_size=2, calib_size=1)
    methods = lambda: build_methods(["kvcomm"], [0.5])  # noqa: E731
    folder = tmp_path / "c"
    whole = _checkpointed(agents, folder, task, config, methods)
    header = json.loads((folder / "run.json").read_text())
    assert list(header["profiles"]) == [DEFAULT_RULE] and header["profiles"][DEFAULT_RULE] == json.loads(
        Profile.model_validate(whole.profile).model_dump_json())
    for path in folder.glob("batch-*.json"):
        path.unlink()
    damages = [
        (lambda p: p.update(ranking=[0, 0, 0, 0]),
         r"its profile prune is not a profile: ranking must order each of the 4 layers once, not \[0, 0, 0, 0\]"),
        (lambda p: p.clear() or p.update(rule="prune"), "its profile prune is not a profile"),
        (lambda p: p.update(sender="another-model"), "its profile prune is for sender 'another-model'"),
        (lambda p: p.update(num_layers=3, ranking=[2, 1, 0], importance=[0.0] * 3, scores=[0.0] * 3),
         "its profile prune has num_layers 3, this run's would have 4"),
        (lambda p: p.update(calibration_items=["facts_0_0000"]),
         r"its profile prune has calibration_items \[\"facts_0_0000\"\], this run's would have \[\"facts_0_0004\"\]"),
        (lambda p: p.update(rule="answer"), "its profile prune has rule \"answer\", this run's would have \"prune\""),
    ]
    for change, message in damages:
        damaged = json.loads(json.dumps(header))
        change(damaged["profiles"][DEFAULT_RULE])
        (folder / "run.json").write_text(json.dumps(damaged))
        with pytest.raises(DataError, match=message) as refused:
            _checkpointed(agents, folder, task, config, methods, resume=True)
        assert str(folder / "run.json") in str(refused.value)


def test_batch_files_without_run_json_are_refused_until_overwrite_removes_them(agents, tmp_path):
    """Before, a folder of batch files without run.json (e.g. an interrupted removal) started a run
    on top of them, and its resumption took the earlier run's batches (1-token answers) as its own."""
    from kvcomm.errors import DataError
    from kvcomm.eval.checkpoint import Checkpoint, remove_checkpoint

    task = load_task("facts", items=7)
    config = EvalConfig(limit=6, batch_size=2, calib_size=1, bucket=False)
    methods = lambda: build_methods(["skyline"])  # noqa: E731
    folder = tmp_path / "c"
    _checkpointed(agents, folder, task, config, methods)
    (folder / "run.json").unlink()
    before = _files(folder)
    for resume in (False, True):
        with pytest.raises(DataError, match=f"{folder} holds batch files .* but no run.json.*--overwrite"):
            Checkpoint(folder, {"task": "facts"}, resume=resume)
    assert _files(folder) == before
    remove_checkpoint(folder)  # what --overwrite does
    assert not folder.exists()


def test_remove_checkpoint_deletes_the_last_batches_first_and_run_json_last(agents, tmp_path, monkeypatch):
    """An interrupted removal leaves the first batches of the same run, resumable, never batch
    files without their run.json."""
    from pathlib import Path

    from kvcomm.eval.checkpoint import remove_checkpoint

    task = load_task("facts", items=7)
    config = EvalConfig(limit=6, batch_size=2, calib_size=1, bucket=False)
    methods = lambda: build_methods(["skyline"])  # noqa: E731
    folder = tmp_path / "c"
    whole = _checkpointed(agents, folder, task, config, methods)
    order = []
    real = Path.unlink

    def interrupted(path, missing_ok=False):
        if len(order) == 1:
            raise KeyboardInterrupt
        order.append(path.name)
        real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(folder)
    monkeypatch.setattr(Path, "unlink", real)
    assert order == ["batch-00002.json"]
    resumed = _checkpointed(agents, folder, task, config, methods, resume=True)
    assert [i.answer for i in resumed.runs[0].items] == [i.answer for i in whole.runs[0].items]
    order.clear()
    monkeypatch.setattr(Path, "unlink", lambda path, missing_ok=False: order.append(path.name) or real(
        path, missing_ok=missing_ok))
    remove_checkpoint(folder)
    assert order == ["batch-00002.json", "batch-00001.json", "batch-00000.json", "run.json"] and not folder.exists()


def test_a_batch_file_of_another_run_is_refused(agents, tmp_path):
    """Each batch file names its run (the sha256 of its identity): one of a run with 1-token
    answers in a checkpoint of 8-token answers is refused, and so is one naming none in a
    checkpoint whose batch files all name theirs."""
    from kvcomm.errors import DataError

    config = EvalConfig(limit=6, batch_size=2, calib_size=1, bucket=False)
    methods = lambda: build_methods(["skyline"])  # noqa: E731
    short, long = (load_task("facts", items=7, max_new_tokens=n) for n in (1, 8))
    _checkpointed(agents, tmp_path / "short", short, config, methods)
    _checkpointed(agents, tmp_path / "long", long, config, methods)
    foreign = (tmp_path / "short" / "batch-00002.json").read_bytes()
    (tmp_path / "long" / "batch-00002.json").write_bytes(foreign)
    with pytest.raises(DataError, match=r"batch-00002.json belongs to another run than .*long/run.json"):
        _checkpointed(agents, tmp_path / "long", long, config, methods, resume=True)
    _edit(tmp_path / "long" / "batch-00002.json", lambda r: r.pop("run"))
    with pytest.raises(DataError, match=r"batch-00002.json does not name the run it belongs to"):
        _checkpointed(agents, tmp_path / "long", long, config, methods, resume=True)


def test_a_resumed_run_reuses_every_ranking_and_block_profile_it_made(agents, tmp_path, monkeypatch):
    """The rankings of rules its methods name (``kvcomm~prune`` beside ``--selection paper``), of
    the other pieces layout, and block profiles are recorded once made and taken back on resuming:
    before, only the run's own rule's was, and the others were made again, unchecked against what
    the recorded batches used."""
    from kvcomm.eval import harness

    task = load_task("facts", items=8)
    config = EvalConfig(limit=4, batch_size=2, calib_size=2, selection="paper", bucket=False)
    methods = lambda: [make_method("kvcomm", ratio=0.5, selection="prune"),  # noqa: E731
                       make_method("kvcomm", ratio=0.5, pieces="passages"),
                       make_method("droidspeak", max_recompute=0.5)]
    folder = tmp_path / "c"
    whole = evaluate(agents, task, methods(), config, progress=False)
    _checkpointed(agents, folder, task, config, methods, stop_at=4, monkeypatch=monkeypatch)
    header = json.loads((folder / "run.json").read_text())
    assert set(header["profiles"]) == {"prune", "paper/passages", "droidspeak@0.5"}
    header["profiles"]["prune"]["ranking"] = ranking = [3, 1, 0, 2]  # not what a search makes: its use shows
    (folder / "run.json").write_text(json.dumps(header))

    def made_again(*args, **kwargs):
        raise AssertionError("a profile the checkpoint holds was made again")

    monkeypatch.setattr(harness, "calibrate", made_again)
    monkeypatch.setattr(harness, "profile_blocks", made_again)
    resumed = _checkpointed(agents, folder, task, config, methods, resume=True)
    by = {run.label: run for run in resumed.runs}
    assert by["kvcomm@0.5~prune"].layers == sorted(ranking[:2]) and resumed.profiles["prune"]["ranking"] == ranking
    for before, after in list(zip(whole.runs, resumed.runs))[1:]:  # kvcomm@0.5/passages, droidspeak's pick
        assert before.label == after.label and [i.answer for i in before.items] == [i.answer for i in after.items]
    for name in header["profiles"]:  # the recorded ones, to their timings: not made again
        assert resumed.profiles[name] == header["profiles"][name]


def test_a_resumed_run_reuses_the_codebook_its_batches_used(agents, tmp_path, monkeypatch):
    """The codebook's id is recorded once made; a resumed run loads that one (not made again), and
    where this machine does not hold it, takes one made again only if it is the same."""
    from kvcomm.errors import DataError
    from kvcomm.eval import harness

    task = load_task("facts", items=6)
    config = EvalConfig(limit=4, batch_size=2, calib_size=2, bucket=False)
    methods = lambda: [make_method("kvcomm", ratio=1.0, codec="klt")]  # noqa: E731
    folder = tmp_path / "c"
    whole = evaluate(agents, task, methods(), config, progress=False)
    _checkpointed(agents, folder, task, config, methods, stop_at=2, monkeypatch=monkeypatch)
    header = json.loads((folder / "run.json").read_text())
    assert header["codebook"] == whole.config["codebook"]["id"]
    real = harness.codebook_from_items

    def made_again(*args, **kwargs):
        raise AssertionError("the recorded codebook was made again")

    monkeypatch.setattr(harness, "codebook_from_items", made_again)
    resumed = _checkpointed(agents, folder, task, config, methods, resume=True)
    assert [i.answer for i in resumed.runs[0].items] == [i.answer for i in whole.runs[0].items]
    monkeypatch.setattr(harness, "codebook_from_items", real)
    (folder / "batch-00001.json").unlink()
    header["codebook"] = "0123456789abcdef"  # one this machine does not hold, and not the one made now
    (folder / "run.json").write_text(json.dumps(header))
    made_now = whole.config["codebook"]["id"]
    with pytest.raises(DataError, match=r"run.json: the recorded batches used codebook 0123456789abcdef, which is "
                                        rf"not in .*the one made now is {made_now}"):
        _checkpointed(agents, folder, task, config, methods, resume=True)


def test_a_version_1_checkpoint_resumes_unless_it_lacks_a_profile_its_batches_used(agents, tmp_path, monkeypatch,
                                                                                    capsys):
    """Checkpoints of the earlier format (no run named in batch files, no code, the run's own
    ranking alone) still resume; one that ran ``kvcomm~prune`` beside another rule did not record
    that ranking, so what its batches used cannot be told: refused, saying how to go on."""
    task = load_task("facts", items=8)
    config = EvalConfig(limit=4, batch_size=2, calib_size=2, selection="paper", bucket=False)

    def as_version_1(folder):
        def header(record):
            own = record["profiles"].pop("paper", None)
            record.update(version=1, profile=own)
            for name in ("profiles", "code", "codebook"):
                record.pop(name)

        _edit(folder / "run.json", header)
        for path in folder.glob("batch-*.json"):
            _edit(path, lambda r: r.pop("run"))

    own = lambda: [make_method("kvcomm", ratio=0.5)]  # noqa: E731
    whole = evaluate(agents, task, own(), config, progress=False)
    _checkpointed(agents, tmp_path / "own", task, config, own, stop_at=2, monkeypatch=monkeypatch)
    as_version_1(tmp_path / "own")
    resumed = _checkpointed(agents, tmp_path / "own", task, config, own, resume=True)
    assert [i.answer for i in resumed.runs[0].items] == [i.answer for i in whole.runs[0].items]
    assert "did not record its version" in capsys.readouterr().err
    assert "did not record its version" in resumed.provenance["resumed"][-1]["warning"]

    named = lambda: [make_method("kvcomm", ratio=0.5, selection="prune")]  # noqa: E731
    _checkpointed(agents, tmp_path / "named", task, config, named, stop_at=2, monkeypatch=monkeypatch)
    as_version_1(tmp_path / "named")
    with pytest.raises(ConfigError, match="did not record the profile prune its batches used.*--overwrite"):
        _checkpointed(agents, tmp_path / "named", task, config, named, resume=True)


def test_items_identity_covers_choices_and_pieces_only_where_items_have_them(tmp_path):
    """Before, two data files differing only in their choices had one identity, so a resumed run
    calibrated on other choices than its recorded batches; a task without choices or pieces keeps
    the identity it had, so its checkpoints still resume."""
    import dataclasses
    import hashlib

    from kvcomm.eval.provenance import items_sha256

    task = load_task("facts", items=3)
    assert not any(i.choices or i.pieces for i in task.items)
    rows = [[i.id, i.context, i.question, list(i.answers)] for i in task.items]
    assert items_sha256(task) == hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    first = task.items[0]
    variants = [dataclasses.replace(first, choices=(first.answers[0], "Oslo")),
                dataclasses.replace(first, choices=(first.answers[0], "Lima")),
                dataclasses.replace(first, pieces=("a", "b"))]
    hashes = {items_sha256(dataclasses.replace(task, items=(variant, *task.items[1:]))) for variant in variants}
    assert len(hashes) == 3 and items_sha256(task) not in hashes


def test_resuming_under_other_code_warns_and_records_each_version(agents, tmp_path, monkeypatch, capsys):
    """Before, a run resumed by another kvcomm version or commit said nothing, and its results
    named only the last one."""
    from kvcomm.eval import checkpoint as checkpoint_module

    task = load_task("facts", items=6)
    config = EvalConfig(limit=4, batch_size=2, calib_size=1)
    methods = lambda: build_methods(["baseline"])  # noqa: E731
    old, new = ({"kvcomm": version, "git_commit": commit} for version, commit in
                (("0.1.0", "a" * 40), ("0.2.0", "b" * 40 + "+dirty")))
    monkeypatch.setattr(checkpoint_module, "code_version", lambda: old)
    _checkpointed(agents, tmp_path / "c", task, config, methods, stop_at=2, monkeypatch=monkeypatch)
    resumed_alike = _checkpointed(agents, tmp_path / "c", task, config, methods, resume=True)
    assert "warning" not in resumed_alike.provenance["resumed"][-1] and "warning" not in capsys.readouterr().err
    (tmp_path / "c" / "batch-00001.json").unlink()
    monkeypatch.setattr(checkpoint_module, "code_version", lambda: new)
    report = _checkpointed(agents, tmp_path / "c", task, config, methods, resume=True)
    assert report.runs[0].n == 4
    provenance = report.provenance
    assert provenance["code"] == old and [r["code"] for r in provenance["resumed"]] == [old, new]
    warning = provenance["resumed"][-1]["warning"]
    assert f"kvcomm 0.1.0 (commit {'a' * 40})" in warning and f"kvcomm 0.2.0 (commit {'b' * 40}+dirty)" in warning
    assert warning in capsys.readouterr().err
    saved = json.loads((tmp_path / "c" / "run.json").read_text())
    assert saved["code"] == old and saved["resumed"][-1]["warning"] == warning


def test_git_commit_marks_a_tree_with_uncommitted_changes(monkeypatch):
    import subprocess

    from kvcomm.eval import provenance

    head = "c" * 40
    answers: dict[str, object] = {}

    def git(args, **kwargs):
        answer = answers[args[1]]
        if isinstance(answer, Exception):
            raise answer
        return subprocess.CompletedProcess(args, 0, stdout=answer, stderr="")

    monkeypatch.setattr(provenance.subprocess, "run", git)
    monkeypatch.setattr(provenance.Path, "exists", lambda path: True)
    for status, commit in ((" M kvcomm/eval/harness.py\n", head + "+dirty"), ("", head),
                           (subprocess.TimeoutExpired("git", 30), head + "+dirty")):
        answers.update({"rev-parse": head + "\n", "status": status})
        assert provenance.git_commit.__wrapped__() == commit
    answers["rev-parse"] = OSError("no git")
    assert provenance.git_commit.__wrapped__() is None


def test_a_checkpoint_names_what_the_calibration_options_came_to(agents, tmp_path):
    """A run's identity records its calibration items and each calibrated rule's objective, so that
    a default that changes later is a difference the resumed run repeats by giving the recorded
    value, and giving a default's value is the same run. A checkpoint written before (no such
    record, its options left to their defaults: 4 items and the likelihood, then) resumes with
    those values given, where before its null options matched no value."""
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.harness import calibration_identity
    from kvcomm.eval.provenance import identity_difference, run_identity

    task = load_task("facts", items=12)
    methods = lambda: build_methods(["kvcomm"], [0.5])  # noqa: E731

    def identity(config, recorded=True):
        calibration = calibration_identity(config, [], len(task.items)) if recorded else None
        return run_identity(task, methods(), config.model_dump(mode="json"), "m", "m", "float32", None,
                            calibration=calibration)

    default = identity(EvalConfig(limit=2))
    assert default["calibration"] == {"items": 8, "objectives": {"prune": "auto"}}
    assert identity_difference(default, identity(EvalConfig(limit=2, calib_size=8, objective="auto"))) is None
    assert identity_difference(default, identity(EvalConfig(limit=2, calib_size=4))) == "calibration.items: 8 → 4"
    assert identity_difference(identity(EvalConfig(limit=2, calib_size=4)),  # 4 items: the likelihood's default
                               identity(EvalConfig(limit=2, calib_size=4, objective="likelihood"))) is None
    # written before identities recorded the calibration, with the options left to their defaults
    older = identity(EvalConfig(limit=2), recorded=False)
    assert identity_difference(older, identity(EvalConfig(limit=2, calib_size=4, objective="likelihood"))) is None
    assert identity_difference(older, identity(EvalConfig(limit=2, objective="probability"))) == \
        "evaluation.objective: null → \"probability\""
    # such a run (4 items and the likelihood, the defaults then) resumed with those values given
    name = agents.sender.name
    recorded = run_identity(task, methods(), EvalConfig(limit=2, batch_size=2).model_dump(mode="json"), name, name,
                            "float32", None)
    then = EvalConfig(limit=2, batch_size=2, calib_size=4, objective="likelihood")
    first = evaluate(agents, task, methods(), then, progress=False, checkpoint=Checkpoint(tmp_path / "c", recorded))
    now = run_identity(task, methods(), then.model_dump(mode="json"), name, name, "float32", None,
                       calibration=calibration_identity(then, [], len(task.items)))
    today = EvalConfig(limit=2, batch_size=2)  # today's defaults: 8 items and auto; the advice names the way back
    with pytest.raises(DataError, match="--calib-size 4 .* resumes it"):
        evaluate(agents, task, methods(), today, progress=False, checkpoint=Checkpoint(
            tmp_path / "c", run_identity(task, methods(), today.model_dump(mode="json"), name, name, "float32", None,
                                         calibration=calibration_identity(today, [], len(task.items))), resume=True))
    resumed = evaluate(agents, task, methods(), then, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", now, resume=True))
    assert resumed.profile["calibration_items"] == first.profile["calibration_items"]
    assert [i.answer for i in resumed.runs[0].items] == [i.answer for i in first.runs[0].items]


def test_a_run_resumed_on_other_weights_under_the_same_names_is_refused(agents, tmp_path):
    """The checkpoint records the models' weights once they load (the command line's identity,
    made before, has none); resuming with a model derived again under the same name is refused
    (before, its answers were mixed with the first model's), the same weights resume."""
    import copy

    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.harness import calibration_identity, named_rules
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=6)
    methods = lambda: build_methods(["kvcomm"], [0.5])  # noqa: E731
    config = EvalConfig(limit=4, batch_size=2, calib_size=1)
    name = agents.sender.name
    calibration = calibration_identity(config, named_rules(methods()), len(task.items))
    identity = run_identity(task, methods(), config.model_dump(mode="json"), name, name, "float32", None,
                            calibration=calibration)  # what the command line makes, before the models load
    first = evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    assert Checkpoint(tmp_path / "c", identity, resume=True).identity["weights"] == list(agents.weights)
    again = copy.copy(agents.sender)
    again.__dict__["weights_digest"] = "0" * 32  # the same name, other weights
    with pytest.raises(ConfigError, match="weights"):
        evaluate(Agents(again, again), task, methods(), config, progress=False,
                 checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    assert [i.answer for i in resumed.runs[0].items] == [i.answer for i in first.runs[0].items]


def test_a_checkpoint_recorded_under_a_former_label_resumes_without_redoing_its_work(agents, tmp_path, monkeypatch):
    """Labels name options given other values than their defaults since this version (random's
    seed); a checkpoint whose batches were recorded under the former label is found, not redone."""
    import json as json_module

    from kvcomm.eval import harness
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=5)
    methods = lambda: [make_method("random", ratio=0.5, seed=5)]  # noqa: E731
    config = EvalConfig(limit=4, batch_size=2, calib_size=0)
    name = agents.sender.name
    identity = run_identity(task, methods(), config.model_dump(mode="json"), name, name, "float32", None)
    first = evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    assert methods()[0].former_labels == ("random@0.5",)
    for batch in (tmp_path / "c").glob("batch-*.json"):  # as the version before wrote it
        record = json_module.loads(batch.read_text())
        record["runs"] = {"random@0.5": record["runs"]["random@0.5~seed5"]}
        batch.write_text(json_module.dumps(record))
    calls = []
    real = harness._run_one
    monkeypatch.setattr(harness, "_run_one", lambda method, batch: calls.append(method.label) or real(method, batch))
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    assert calls == [] and [i.answer for i in resumed.runs[0].items] == [i.answer for i in first.runs[0].items]


def test_a_former_label_that_another_configuration_bears_now_is_not_taken(agents, tmp_path, monkeypatch):
    """``random@0.5`` is the default seed's label and seed 7's former one: a run of both, stopped
    after the default seed recorded a batch and before seed 7 did, took the default seed's answers
    for seed 7 when resumed."""
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=6)
    methods = lambda: [make_method("random", ratio=0.5), make_method("random", ratio=0.5, seed=7)]  # noqa: E731
    config = EvalConfig(limit=4, batch_size=4, calib_size=0, bucket=False)
    name = agents.sender.name
    identity = run_identity(task, methods(), config.model_dump(mode="json"), name, name, "float32", None)
    whole = evaluate(agents, task, methods(), config, progress=False)
    assert whole.runs[0].layers != whole.runs[1].layers
    real = Checkpoint.save

    def killed(self, index, ids, label, run):
        if label.endswith("~seed7"):
            raise KeyboardInterrupt
        return real(self, index, ids, label, run)

    monkeypatch.setattr(Checkpoint, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    monkeypatch.setattr(Checkpoint, "save", real)
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    for a, b in zip(whole.runs, resumed.runs):
        assert a.label == b.label and [i.answer for i in a.items] == [i.answer for i in b.items]
        assert [i.kv_bytes for i in a.items] == [i.kv_bytes for i in b.items]


def test_an_objective_is_refused_only_where_no_calibrated_rule_uses_it():
    """The command line refuses an objective nothing calibrates with (the paper's rule, a given
    profile read as it was made); a profile's own rule counts where the run reads passages (methods
    reading chats calibrate it again), and the Python API takes a script's objective for any run."""
    from kvcomm.errors import ConfigError
    from kvcomm.eval.harness import calibration_identity, check_calibration

    passages = EvalConfig(pieces="passages", objective="probability")
    check_calibration(passages, [], 60, profiled="prune")  # before: refused, then calibrated with it anyway
    assert calibration_identity(passages, [], 60, "prune")["objectives"] == {"prune": "probability"}
    chats = EvalConfig(objective="probability")
    with pytest.raises(ConfigError, match="the profile's ranking is used as it was calibrated"):
        check_calibration(chats, [], 60, profiled="prune")
    check_calibration(chats, [], 60, profiled="prune", unused=False)
    with pytest.raises(ConfigError, match="ranks layers by attention"):
        check_calibration(EvalConfig(selection="paper", objective="likelihood"), [], 60)
    check_calibration(EvalConfig(selection="paper", objective="likelihood"), ["prune"], 60)  # kvcomm~prune uses it


def test_a_codecs_one_off_costs_are_paid_before_the_clock_not_by_the_first_batch(agents, monkeypatch):
    import time

    from kvcomm.wire import make_codec

    codec_class, first = type(make_codec("int8")), []
    real = codec_class.encode

    def encode(self, *args, **kwargs):
        if not first:
            first.append(True)
            time.sleep(1.0)  # a one-off cost: a kernel compiled, a table built
        return real(self, *args, **kwargs)

    monkeypatch.setattr(codec_class, "encode", encode)
    from kvcomm.methods import base

    monkeypatch.setattr(base, "_WARMED", set())  # as in a fresh process (earlier tests warmed int8 up)
    task = load_task("facts", items=4)
    report = evaluate(agents, task, [make_method("kvcomm", ratio=1.0, codec="int8")],
                      EvalConfig(limit=2, batch_size=1, calib_size=1), progress=False)
    assert first and report.runs[0].sender_seconds < 0.5  # the sleep was before the clock


def test_a_clusters_worker_warms_its_codecs_up_before_its_batches(agents, monkeypatch):
    from kvcomm.eval.harness import _SweepJob
    from kvcomm.methods.base import Method

    warmed = []
    monkeypatch.setattr(Method, "warm_up", lambda self, sender, receiver: warmed.append(self.label))
    task = load_task("facts", items=2)
    methods = [make_method("kvcomm", ratio=1.0, codec="int8"), make_method("baseline")]
    calls = []
    monkeypatch.setattr("kvcomm.eval.harness._run_methods", lambda chosen, batch: calls.append(warmed[:]) or {})
    _SweepJob(methods).run_batch(agents, task, task.items, [m.label for m in methods])
    assert calls == [[m.label for m in methods]]  # warmed before the batch ran
    assert warmed == [m.label for m in methods]  # (a method without a codec warms nothing)


def test_an_output_with_another_number_of_entries_than_items_is_refused():
    """A method returning an answer too many had every answer shifted onto the next item."""
    from kvcomm.errors import ProtocolError
    from kvcomm.eval.harness import _item_results
    from kvcomm.methods.base import Output
    from kvcomm.tasks import Item

    items = [Item("q0", "", "?", ("Paris",)), Item("q1", "", "?", ("Rome",))]
    good = Output(answers=["Paris", "Rome"], receiver_ids=[[1], [2]], sender_ids=None, kv_bytes=[0, 0])
    assert [r.answer for r in _item_results(items, good)] == ["Paris", "Rome"]
    for bad in (Output(answers=["Lisbon", "Paris", "Rome"], receiver_ids=[[1], [2], [3]], sender_ids=None,
                       kv_bytes=[0, 0, 0]),
                Output(answers=["Paris", "Rome"], receiver_ids=[[1], [2]], sender_ids=[[1]], kv_bytes=[0, 0])):
        with pytest.raises(ProtocolError, match="for a batch of 2 items"):
            _item_results(items, bad)


def test_a_resumed_run_scores_recorded_answers_as_this_kvcomm_scores_them(agents, tmp_path):
    """Recorded batches kept the scores of the kvcomm that wrote them: after a metric changed, one
    report mixed two scorings (a choice letter's hedge scored 0 in old batches, 1 in new ones)."""
    import json as json_module

    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=6)
    methods = lambda: [make_method("baseline")]  # noqa: E731
    config = EvalConfig(limit=4, batch_size=2, calib_size=0)
    name = agents.sender.name
    identity = run_identity(task, methods(), config.model_dump(mode="json"), name, name, "float32", None)
    first = evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    for batch in (tmp_path / "c").glob("batch-*.json"):  # as another scoring wrote them
        record = json_module.loads(batch.read_text())
        for run in record["runs"].values():
            for item in run["items"]:
                item["scores"] = {metric: 0.5 for metric in item["scores"]}
        batch.write_text(json_module.dumps(record))
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    assert [i.scores for i in resumed.runs[0].items] == [i.scores for i in first.runs[0].items]
    assert resumed.runs[0].scores == first.runs[0].scores


def test_a_resume_naming_the_same_model_another_way_is_taken_and_other_weights_are_not(tmp_path, monkeypatch):
    """``-m tiny`` then ``-m ./tiny`` was refused though the checkpoint's weights were the same."""
    from kvcomm.eval.provenance import identity_difference

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    recorded = {"sender": "tiny", "receiver": "tiny", "dtype": "float32", "evaluation": {"calib_size": 1},
                "weights": ["ab", "ab"]}
    before_load = {"sender": "./tiny", "receiver": "./tiny", "dtype": "float32", "evaluation": {"calib_size": 1}}
    assert identity_difference(recorded, before_load) is None  # one folder; the weights decide once loaded
    other = {**before_load, "sender": "qwen2.5-coder-1.5b", "receiver": "qwen2.5-coder-1.5b"}
    assert "receiver" in identity_difference(recorded, other)  # another model, refused before it loads
    assert identity_difference(recorded, before_load | {"weights": ["ab", "ab"]}) is None
    assert "weights" in identity_difference(recorded, before_load | {"weights": ["cd", "cd"]})
    assert "dtype" in identity_difference(recorded, before_load | {"dtype": "bfloat16"})
    old = {k: v for k, v in recorded.items() if k != "weights"}  # written before weights were recorded
    assert identity_difference(old, before_load) is None and "receiver" in identity_difference(old, other)
