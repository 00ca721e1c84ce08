"""The harness end to end on a tiny model: every method, results JSON, profile, plot."""

from __future__ import annotations

import json

import pytest
import torch

from kvcomm import Agents, EvalConfig, build_methods, calibrate, evaluate, make_method, plot_sweep
from kvcomm.errors import ConfigError
from kvcomm.eval import Report
from kvcomm.eval.memory import item_bytes, plan_batches, rss_bytes
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
    """``--selection paper`` takes one calibration item, ``prune`` four: a run with ``kvcomm~prune``
    holds out four, so prune is not calibrated on the paper rule's one."""
    task = load_task("facts", items=10)
    config = EvalConfig(selection="paper")
    alone = evaluate(agents, task, [make_method("kvcomm", ratio=0.5)], config, progress=False)
    assert len(alone.config["calibration_items"]) == 1 and alone.runs[0].n == 9
    report = evaluate(agents, task, [make_method("kvcomm", ratio=0.5, selection="prune")], config, progress=False)
    assert len(report.config["calibration_items"]) == 4 and report.runs[0].n == 6
    assert len(report.profiles["prune"]["calibration_items"]) == 4


def test_a_profile_of_another_pair_is_refused(agents):
    task = load_task("facts", items=6)
    profile = calibrate(agents, task, task.items[-1:], progress=False, rule="paper")
    profile.receiver = "another-model"
    with pytest.raises(ConfigError, match="ranks layers for .* another-model"):
        evaluate(agents, task, build_methods(["kvcomm"], [0.5]), EvalConfig(limit=4, calib_size=1), profile,
                 progress=False)


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
