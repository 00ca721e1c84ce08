"""benchmarks/report.py: pooled files are summarised again in full, runs pair with random in their
own mask mode, and the codec table's reference fits the layout the run read and its dtype; files
and runs made on other items (task options, data), in another dtype, with other linear layers or
senders are neither pooled nor paired, and an uncompressed baseline is never a guess."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

from kvcomm.tasks import TASKS, load_task

spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[1] / "benchmarks" / "report.py")
assert spec is not None and spec.loader is not None
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def run(label, scores, method="kvcomm", fraction=0.5, mode="causal", codec=None, layers=(0, 1), kv_bytes=100.0,
        start=0, pieces="chats", senders=1):
    items = [{"id": f"i{start + n}", "kv_bytes": kv_bytes, "scores": {"paper_f1": s, "contains": s}, "answer": "a"}
             for n, s in enumerate(scores)]
    mean = sum(scores) / len(scores)
    return {"label": label, "method": method, "fraction": fraction, "mode": mode, "codec": codec,
            "layers": list(layers), "n": len(items), "kv_bytes_mean": kv_bytes, "seconds": 1.0,
            "sender_seconds": 0.5, "items": items,
            "options": {"ratio": fraction, "mode": mode, "codec": codec, "pieces": pieces, "senders": senders,
                        "selection": "prune" if method == "kvcomm" else None},
            "scores": {metric: {"mean": mean, "ci95": [mean, mean]} for metric in ("paper_f1", "contains")}}


def file(*runs, pieces="chats", **config):
    return {"config": {"sender": "m", "receiver": "m", "task": "t", "metric": "contains", "num_layers": 4,
                       "pieces": pieces} | config,
            "runs": list(runs)}


def facts(*runs, **config):
    """A results file of the generated facts task as ``kvcomm eval`` writes it now (defaults: float32,
    dense linear layers, the task's options recorded)."""
    return file(*runs, **({"task": "facts", "dtype": "float32", "linear": "dense", "data": None, "seeds": {"task": 0},
                           "task_options": {"items": 8, "facts_per_item": 4, "seed": 0}} | config))


JUDGED = 12  # items in the goals' fixtures: at least report.MIN_JUDGED


def baselines(**config):
    """Random and every layer on items i0-i11: random answers none, every layer all."""
    return facts(run("random@0.5", [0.0] * JUDGED, method="random"), run("kvcomm@1", [1.0] * JUDGED, fraction=1.0,
                                                                             layers=(0, 1, 2, 3)),
                 run("skyline", [1.0] * JUDGED, method="skyline", fraction=None, layers=()), **config)


def rule(senders=1, **config):
    """The rule at 0.5 on the same item ids, answering all: ✓ against ``baselines`` when comparable."""
    return facts(run("kvcomm@0.5", [1.0] * JUDGED, senders=senders), **config)


OTHER_ITEMS = [  # config changes that make a file's items (or their KV) another thing under the same ids
    {"task_options": {"items": 8, "facts_per_item": 8, "seed": 0}},
    {"data": {"path": "other.jsonl", "sha256": "ab" * 32}},
    {"dtype": "bfloat16"},
    {"linear": "int8"},
]


def test_pooling_summarises_every_metric_again_and_sums_the_time():
    ones, zeros = file(run("kvcomm@0.5", [1.0] * 4)), file(run("kvcomm@0.5", [0.0] * 4, start=4))
    merged = report.pooled([ones, zeros])[0]["runs"][0]
    assert merged["n"] == 8 and merged["seconds"] == 2.0 and merged["sender_seconds"] == 1.0
    for metric in ("paper_f1", "contains"):
        low, high = merged["scores"][metric]["ci95"]
        assert merged["scores"][metric]["mean"] == 0.5 and low < 0.5 < high  # not the first file's [1, 1]


def test_a_run_is_compared_with_random_in_its_own_mask_mode():
    mine = run("kvcomm@0.5[padded-zero]", [1.0, 1.0], mode="padded-zero")
    runs = file(run("random@0.5", [1.0, 1.0], method="random"), mine,
                run("random@0.5[padded-zero]", [0.0, 0.0], method="random", mode="padded-zero"))
    assert report.against_random(runs, mine) == "+1.000"


def test_the_codec_reference_for_passages_is_the_every_layer_run():
    half = run("kvcomm@0.5", [1.0], kv_bytes=300.0, pieces="passages")
    assert report.fp16_all_layers(file(half, pieces="passages")["config"], [half]) is None  # no width to scale
    every = run("kvcomm@1", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=400.0, pieces="passages")
    assert report.fp16_all_layers(file(half, every, pieces="passages")["config"], [half, every]) == 200.0


def test_the_codec_reference_is_read_as_the_run_is_whatever_the_order(capsys):
    """A file with every layer sent by one sender and by two: each run's reference is the one of its
    own senders (before, the first such run in the file was every run's)."""
    two = run("kvcomm@1x2", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=4700.0, senders=2)
    one = run("kvcomm@1", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=3300.0)
    small = run("kvcomm@0.5+int2", [1.0], codec="int2", kv_bytes=275.0)
    for order in ((two, one, small), (one, two, small)):
        report.codecs_table([file(*order)])
        row = next(line for line in capsys.readouterr().out.splitlines() if "| int2 |" in line)
        assert "| 6.0 |" in row, row  # 3,300 bytes of float32 = 1,650 in float16, over 275


@pytest.mark.parametrize("change", OTHER_ITEMS + [{"sender": "other"}], ids=lambda c: next(iter(c)))
def test_pooling_refuses_files_made_on_other_items_and_names_which_file_has_which(change):
    ones, other = facts(run("kvcomm@0.5", [1.0] * 4)), facts(run("kvcomm@0.5", [0.0] * 4, start=4), **change)
    refusal = r"m · facts: the files differ in .*; their items cannot be pooled \(.*: a\.json; .*: b\.json\)"
    with pytest.raises(SystemExit, match=refusal):
        report.pooled([ones, other], ["a.json", "b.json"])


def test_pooling_reads_a_field_a_file_does_not_record_as_its_default():
    old = facts(run("kvcomm@0.5", [1.0] * 4))  # written before dtype, linear layers and task options were recorded
    for field in ("dtype", "linear", "task_options"):
        del old["config"][field]
    more = facts(run("kvcomm@0.5", [0.0] * 4, start=4), task_options={"items": 12, "facts_per_item": 4, "seed": 0})
    assert report.pooled([old, more], ["a.json", "b.json"])[0]["runs"][0]["n"] == 8


@pytest.mark.parametrize("change", OTHER_ITEMS, ids=lambda c: next(iter(c)))
def test_goals_pair_no_runs_made_on_other_items_under_the_same_ids(change, capsys):
    assert report.goals_grid([baselines(), rule()], "prune")[0]["verdict"] == "✓"
    row = report.goals_grid([baselines(), rule(**change)], "prune", ["a.json", "b.json"])[0]
    assert row["verdict"] == "no random run on these items" and "all" not in row and "skyline" not in row
    assert "not paired" in capsys.readouterr().err and f" ({row['variant']}" in _table(row)


def test_goals_pair_no_runs_of_another_number_of_senders(capsys):
    row = report.goals_grid([baselines(), rule(senders=2)], "prune", ["a.json", "b.json"])[0]
    assert row["verdict"] == "no random run on these items" and row["variant"] == "senders 2"
    assert "runs of other senders are not paired" in capsys.readouterr().err


def test_goals_take_the_skyline_for_every_layer_only_where_it_computes_the_same():
    """Read as one passage by the receiver's own model, every layer shared is the skyline's
    computation; several passages (each prefilled alone) or another sender's KV are not."""
    def passages(senders=1, **config):
        return facts(run("random@0.5", [0.0] * 4, method="random", pieces="passages", senders=senders),
                     run("kvcomm@0.5", [0.0] * 4, pieces="passages", senders=senders),
                     run("skyline", [1.0] * 4, method="skyline", fraction=None, layers=()), **config)

    assert report.goals_grid([passages()], "prune")[0]["all_is_skyline"] is True
    for made in (passages(senders=2), passages(sender="other")):
        row = report.goals_grid([made], "prune")[0]
        assert row["all_is_skyline"] is False and "all" not in row, row


def test_goals_read_a_field_a_file_does_not_record_as_its_default(capsys):
    old = baselines(seeds={"task": 0})  # from before dtype, linear layers and task options were recorded
    for field in ("dtype", "linear", "task_options"):
        del old["config"][field]
    # another item count makes the same items under the same ids (the test below): still paired
    row = report.goals_grid([old, rule(task_options={"items": 12, "facts_per_item": 4, "seed": 0})], "prune")[0]
    assert row["verdict"] == "✓" and row["n_random"] == JUDGED and "variant" not in row
    assert capsys.readouterr().err == ""


def test_a_generated_tasks_items_do_not_depend_on_how_many_are_made():
    counted = [name for name in TASKS if set(report.COUNT_OPTIONS) & set(TASKS.get(name).options)]
    assert counted
    for name in counted:
        assert load_task(name, items=3).items == load_task(name, items=6).items[:3], name


def _table(row):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report.goals_table([row], "prune")
    return out.getvalue()


def _codecs(*files):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report.codecs_table(list(files))
    return [line.split(" | ") for line in out.getvalue().splitlines()[2:]]


@pytest.mark.parametrize("other", [{"pieces": "passages"}, {"senders": 2}])
def test_a_codec_run_is_compared_with_the_uncompressed_run_of_its_own_layout_and_senders(other):
    every = run("kvcomm@1", [1.0] * 2, fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=32000.0)
    mine = run("kvcomm@0.5", [1.0] * 2, kv_bytes=16000.0)
    theirs = run("kvcomm@0.5/other", [0.0] * 2, kv_bytes=16000.0, **other)
    q4 = run("kvcomm@0.5+q4", [0.0] * 2, codec="q4", kv_bytes=1000.0)
    row = next(r for r in _codecs(file(every, mine, theirs, q4)) if r[5] == "q4")
    assert row[9] == "-1.000" and "✓" not in row[10]  # 16x smaller, but every point lost: not the goal


def test_two_uncompressed_runs_a_codec_run_could_be_compared_with_are_refused():
    every = run("kvcomm@1", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=32000.0)
    twins = run("kvcomm@0.5~paper", [1.0], kv_bytes=16000.0), run("kvcomm@0.5~answer", [0.0], kv_bytes=16000.0)
    with pytest.raises(SystemExit, match="kvcomm@0.5~paper and kvcomm@0.5~answer are both uncompressed at layers "
                                         "0-1 .*which one is the baseline would be a guess"):
        _codecs(file(every, *twins, run("kvcomm@0.5+q4", [0.0], codec="q4", kv_bytes=1000.0)))


def test_a_mask_mode_is_compared_with_the_causal_run_of_its_own_layout(capsys):
    padded = run("kvcomm@0.5/passages[padded-zero]", [0.0] * 2, mode="padded-zero", pieces="passages")
    report.modes_table([file(run("kvcomm@0.5/passages", [0.0] * 2, pieces="passages"), padded,
                             run("kvcomm@0.5", [1.0] * 2))])
    row = next(line for line in capsys.readouterr().out.splitlines() if "padded-zero" in line)
    assert "| +0.000 [+0.000, +0.000] | 2/2 |" in row


def test_a_run_is_compared_with_random_of_its_own_layout_and_senders():
    for other in ({"pieces": "passages"}, {"senders": 2}):
        mine = run("kvcomm@0.5/other", [1.0] * 2, **other)
        runs = file(run("random@0.5", [1.0] * 2, method="random"), mine,
                    run("random@0.5/other", [0.0] * 2, method="random", **other))
        assert report.against_random(runs, mine) == "+1.000"
    twice = file(mine, *(run(f"random@0.5/{seed}", [0.0] * 2, method="random", **other) for seed in (1, 2)))
    with pytest.raises(SystemExit, match="random@0.5/1 and random@0.5/2 are both random at 0.5"):
        report.against_random(twice, mine)


@pytest.mark.parametrize(("dtype", "reference"), [(None, 200.0), ("float32", 200.0), ("bfloat16", 400.0),
                                                  ("float16", 400.0)])
def test_the_fp16_reference_scales_the_runs_own_element_size(dtype, reference):
    every = run("kvcomm@1", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=400.0)
    assert report.fp16_all_layers(file(every, dtype=dtype)["config"], [every]) == reference
    half = run("kvcomm@0.5", [1.0], kv_bytes=100.0)  # no ratio-1.0 run: from the token ids
    half["items"][0]["sender_ids"] = [1] * 10  # 2 of 4 layers * 10 tokens + 2 sinks: 100 bytes = 22 token-layers
    assert report.fp16_all_layers(file(half, dtype=dtype)["config"], [half]) == pytest.approx(
        100.0 / 22 * 40 * reference / 400.0)


def test_the_codec_table_names_the_dtype_of_an_uncompressed_run_and_refuses_one_it_cannot_size():
    every = run("kvcomm@1", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=400.0)
    assert _codecs(file(every, dtype="bfloat16"))[0][5] == "none (bf16, in process)"
    with pytest.raises(SystemExit, match="runs in float8; the codec table knows the element size of"):
        _codecs(file(every, dtype="float8"))


def test_goals_judge_a_rule_on_no_item_its_layers_were_calibrated_on(capsys):
    """Runs of the same layers are joined across files: an earlier run had tested items that a later
    calibration (the same layers, chosen on more items) then used, and the rule was judged on them."""
    later = facts(run("kvcomm@0.5", [1.0] * 2), calibration_items=["i2", "i3"])
    earlier = facts(run("kvcomm@0.5", [0.0] * 4))  # tested i0-i3; i2 and i3 score 0 there
    row = report.goals_grid([later, earlier, baselines()], "prune", ["later", "earlier", "base"])[0]
    assert row["n"] == 2 and row["rule"] == 1.0
    assert "2 item(s) the rule's layers were calibrated on left out (i2, i3)" in capsys.readouterr().err
    # calibration items of a random or every-layer file are no concern of the rule's
    row = report.goals_grid([rule(), baselines(calibration_items=["i0", "i1"])], "prune")[0]
    assert row["n"] == JUDGED and row["verdict"] == "✓"


def test_goals_read_the_items_of_a_given_profile_and_pooling_keeps_every_files(capsys):
    """A run given --profile records the profile's items in ``profile``, not ``calibration_items``:
    goals read only the latter, so a profile made on test items passed; and pooling kept the first
    file's calibration items, so the result depended on the files' order."""
    profiled = rule()
    profiled["profile"] = {"rule": "prune", "calibration_items": ["i0", "i1"]}
    assert report.ranked_on(profiled) == {"i0", "i1"}
    row = report.goals_grid([profiled, baselines()], "prune")[0]
    assert row["n"] == JUDGED - 2 and "2 item(s) the rule's layers were calibrated on left out (i0, i1)" in \
        capsys.readouterr().err
    plain, calibrated = rule(), facts(run("kvcomm@0.5", [1.0] * 2, start=JUDGED), calibration_items=["i0", "i1"])
    for order in ([plain, calibrated], [calibrated, plain]):
        merged = report.pooled([dict(f) for f in order])
        assert set(merged[0]["config"]["calibration_items"]) == {"i0", "i1"}, order


def test_a_cell_where_nothing_answers_is_no_goal_met_and_a_skyline_of_zero_has_no_share():
    nothing = facts(run("random@0.5", [0.0] * JUDGED, method="random"), run("kvcomm@0.5", [0.0] * JUDGED),
                    run("kvcomm@1", [0.0] * JUDGED, fraction=1.0, layers=(0, 1, 2, 3)),
                    run("skyline", [0.0] * JUDGED, method="skyline", fraction=None, layers=()))
    row = report.goals_grid([nothing], "prune")[0]
    assert row["verdict"].startswith("– uninformative") and "the skyline answers nothing" in _table(row)
    some = facts(run("random@0.5", [0.0] * 4, method="random"), run("kvcomm@0.5", [1.0, 0.0, 0.0, 0.0]),
                 run("skyline", [0.0] * 4, method="skyline", fraction=None, layers=()))
    share = report.goals_grid([some], "prune")[0]["share_of_skyline"]
    assert share[0] == float("inf") and report._finite([share]) == [[None, None, None]]


def test_goals_judge_no_cell_on_too_few_items_or_on_a_lead_measured_on_some_of_them():
    """Every layer's lead over random on 2 of the items (or one item's point interval) gave a ✓."""
    few = report.goals_grid([facts(run("kvcomm@0.5", [1.0] * 3)), baselines()], "prune")[0]
    assert few["verdict"] == "– 3 item(s) paired with random: too few to judge"
    partial = facts(run("random@0.5", [0.0] * JUDGED, method="random"),
                    run("kvcomm@1", [1.0] * 2, fraction=1.0, layers=(0, 1, 2, 3)))
    row = report.goals_grid([rule(), partial], "prune")[0]
    assert row["verdict"] == f"≥ random (every layer's lead measured on 2 of its {JUDGED} items only)"
    assert report.goals_grid([rule(), baselines()], "prune")[0]["verdict"] == "✓"


def test_options_of_another_table_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "path", [*sys.path, str(Path(__file__).parents[1] / "benchmarks")])  # its record.py
    path = tmp_path / "g.json"
    path.write_text(json.dumps(rule()))
    for argv in (["methods", str(path), "--json", str(tmp_path / "x.json")], ["codecs", str(path), "--rule", "paper"],
                 ["goals", str(path), "--uncompressed"]):
        monkeypatch.setattr(sys, "argv", ["report.py", *argv])
        with pytest.raises(SystemExit):
            report.main()
        assert "is for the" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["report.py", "goals", str(path), str(tmp_path / "b.json"),
                                      "--json", str(tmp_path / "grid.json")])
    (tmp_path / "b.json").write_text(json.dumps(baselines()))
    report.main()
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert grid["rule"] == "prune" and grid["files"] == [str(path), str(tmp_path / "b.json")]
    assert grid["rows"][0]["verdict"] == "✓" and "provenance" in grid


def test_pooling_says_which_runs_only_some_files_have(capsys):
    merged = report.pooled([facts(run("kvcomm@0.5", [1.0] * 2), run("random@0.5", [0.0] * 2, method="random")),
                            facts(run("random@0.5", [1.0] * 2, start=2, method="random"))], ["a.json", "b.json"])
    assert [r["label"] for r in merged[0]["runs"]] == ["random@0.5"]
    assert "kvcomm@0.5 is not in b.json: left out of the pool" in capsys.readouterr().err
    three = [facts(run("kvcomm@0.5", [1.0] * 2)), facts(run("random@0.5", [0.0] * 2, start=2, method="random")),
             facts(run("random@0.5", [0.0] * 2, start=4, method="random"))]
    report.pooled(three, ["a.json", "b.json", "c.json"])
    warned = capsys.readouterr().err.splitlines()  # each label once, naming every file without it
    assert warned == ["warning: m · facts: kvcomm@0.5 is not in b.json, c.json: left out of the pool",
                      "warning: m · facts: random@0.5 is not in a.json: left out of the pool"]


def test_goals_read_the_ratio_of_a_version_1_file_from_its_labels():
    """Version 1 recorded no run options: its random and every-layer runs were skipped without a word."""
    old = baselines()
    for entry in old["runs"]:
        del entry["options"]
    assert report.goals_grid([rule(), old], "prune")[0]["verdict"] == "✓"
    assert report._ratio({"label": "kvcomm@8,12,14"}) is None and report._ratio({"label": "random@0.3~seed7"}) == 0.3
