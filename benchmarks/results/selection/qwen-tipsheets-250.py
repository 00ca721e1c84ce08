"""Qwen Tipsheets on 250 test items (the issue 18 goals at ratios 0.3 and 0.5, with tighter
intervals than the 100 items of qwen-tipsheets.json).

Items 90-249 are evaluated with the answer rule's profile from qwen-tipsheets.json (the same 4
calibration items, so the same layers) and written to OUT; they are then merged with that run's
items 0-89 into 250 test items, and the table (scores with 95% bootstrap intervals, shares of
the skyline with their paired intervals, paired differences to random and to all layers; the
harness's seeded bootstrap) is printed and written beside OUT (``-merged``).
Items 90-99 are in both runs: the merge refuses to go on unless their answers are equal (today's
code against the saved run), and unless both runs read the same data file and calibration items.
With OUT already there, only the merge runs.

    python benchmarks/results/selection/qwen-tipsheets-250.py benchmarks/results/selection/qwen-tipsheets-250-new.json
"""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from kvcomm.eval.results import bootstrap_ci, share_ci

HERE = Path(__file__).parent
SAVED = HERE / "qwen-tipsheets.json"
FIRST, COUNT, KEEP = 90, 160, 90  # new items 90..249; the saved run's first 90 items are kept
SAVED_LABEL = {"kvcomm@0.3": "kvcomm@0.3~answer", "kvcomm@0.5": "kvcomm@0.5~answer"}


def run(out: Path) -> None:
    from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method
    from kvcomm.selection.calibrate import Profile

    profile = Profile.model_validate(json.loads(SAVED.read_text())["profiles"]["answer"])
    agents = Agents.load("qwen2.5-coder-1.5b")
    task = load_task("tipsheets", "../shared/data/tipsheets.jsonl")
    task = dataclasses.replace(task, items=task.items[FIRST:FIRST + COUNT] + task.items[-4:])
    methods = [make_method("baseline"), make_method("skyline"), make_method("kvcomm", ratio=1.0)]
    for ratio in (0.3, 0.5):
        methods += [make_method("kvcomm", ratio=ratio), make_method("random", ratio=ratio, seed=42)]
    evaluate(agents, task, methods, EvalConfig(limit=COUNT, calib_size=4, batch_size=16), profile=profile).save(out)


def share_interval(values: list[float], skyline: list[float]) -> list[float]:
    """95% interval of a configuration's share of the skyline (items resampled in pairs), rounded."""
    return [round(x, 3) for x in share_ci(values, skyline)]


def merge(out: Path) -> dict:
    saved_report = json.loads(SAVED.read_text())
    new_report = json.loads(out.read_text())
    for key in ("data", "calibration_items"):
        assert saved_report["config"][key] == new_report["config"][key], f"the runs differ in {key}"
    saved = {r["label"]: r for r in saved_report["runs"]}
    scores: dict[str, list[float]] = {}
    rows: dict[str, dict] = {}
    for r in new_report["runs"]:
        old = saved[SAVED_LABEL.get(r["label"], r["label"])]
        assert old["layers"] == r["layers"], f"{r['label']}: other layers than the saved run"
        before = {i["id"]: i["answer"] for i in old["items"]}
        overlap = [i for i in r["items"] if i["id"] in before]
        assert overlap and all(before[i["id"]] == i["answer"] for i in overlap), f"{r['label']}: answers changed"
        kept = old["items"][:KEEP]
        items = kept + [i for i in r["items"] if i["id"] not in {o["id"] for o in kept}]
        assert len({i["id"] for i in items}) == len(items) == KEEP + COUNT
        scores[r["label"]] = [i["scores"]["paper_f1"] for i in items]
        rows[r["label"]] = {"layers": r["layers"], "overlap_equal_answers": len(overlap)}
    sky = scores["skyline"]
    for label, values in scores.items():
        mean = float(np.mean(values))
        rows[label].update(n=len(values), paper_f1=round(mean, 3), ci95=[round(x, 3) for x in bootstrap_ci(values)],
                           of_skyline=round(mean / float(np.mean(sky)), 3), of_skyline_ci95=share_interval(values, sky))

    def paired(a: str, b: str) -> list:
        diff = [x - y for x, y in zip(scores[a], scores[b])]
        return [round(float(np.mean(diff)), 3), [round(x, 3) for x in bootstrap_ci(diff)]]

    for ratio in ("0.3", "0.5"):
        for label in (f"kvcomm@{ratio}", "kvcomm@1"):
            rows[label][f"minus_random@{ratio}"] = paired(label, f"random@{ratio}")
        rows[f"kvcomm@{ratio}"]["minus_all_layers"] = paired(f"kvcomm@{ratio}", "kvcomm@1")
    return {"items": KEEP + COUNT, "from": [SAVED.name, out.name], "rows": rows}


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if not target.exists():
        run(target)
    summary = merge(target)
    target.with_name(target.stem.replace("-new", "") + "-merged.json").write_text(json.dumps(summary, indent=1) + "\n")
    for label, row in summary["rows"].items():
        print(label, {k: v for k, v in row.items() if k != "layers"})
