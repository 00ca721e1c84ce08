"""The same layers read two ways: the paper's two chats against one chat cut in two (passages).

Takes a saved run in the paper's layout (a results JSON of `kvcomm sweep` or
`benchmarks/selection.py`) and runs, on its test items and with its calibration items held out,
the skyline and each of its chosen layer sets (``--labels``; by default every ``kvcomm@…`` and
``random@…`` configuration below 1) with ``pieces="passages"``: the sender reads the skyline
prompt's opening and the context, the receiver the question, keeping the opening at the layers
not shared. The layers are the saved run's, not calibrated again, so the difference is the
layout's alone. Prints, per configuration, both layouts' scores as shares of the skyline (95%
intervals, items resampled in pairs) and the paired difference passages − chats; checks that the
skyline's answers equal the saved run's; writes the passages run's results JSON to ``--out`` and
the comparison beside it (``-comparison.json``).

    python benchmarks/passages.py --model qwen2.5-coder-1.5b --data ../shared/data/countries.jsonl \\
        --chats benchmarks/results/selection/qwen-countries.json \\
        --labels kvcomm@0.3~answer,kvcomm@0.5~answer,random@0.3,random@0.5 \\
        --out benchmarks/results/selection/passages-qwen-countries.json

``--summarise RUN.json`` instead prints a saved run that has a skyline (e.g. ``kvcomm sweep …
--pieces passages``): each configuration's score, its share of the skyline (paired intervals) and
its paired difference to random at the same ratio, and writes them beside it (``-summary.json``).
``--beside OTHER.json`` (repeatable) takes the skyline, baseline and random configurations
RUN.json lacks from another run of the same model, data, task, budget and metric on the same test
items, e.g. a run of newly calibrated layers against an earlier run's skyline and random (a random
configuration must read the items as RUN's kvcomm configurations do; borrowed rows are marked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import command, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method  # noqa: E402
from kvcomm.eval.results import bootstrap_ci, share, share_ci  # noqa: E402


def share_interval(values: list[float], skyline: list[float]) -> list[float] | None:
    """95% interval of a configuration's share of the skyline (items resampled in pairs), rounded;
    None where the skyline answers nothing (no share: strict JSON has no NaN)."""
    low, high = share_ci(values, skyline)
    return [round(low, 3), round(high, 3)] if math.isfinite(low) and math.isfinite(high) else None


def share_of(values: list[float], skyline: list[float]) -> float | None:
    """A configuration's share of the skyline, rounded; None where the skyline answers nothing."""
    value = share(values, skyline)
    return round(value, 3) if math.isfinite(value) else None


def _share(value: float | None) -> str:
    return "– (the skyline answers nothing)" if value is None else f"{value:.3f}"


def chosen_labels(saved: dict, given: str | None) -> list[str]:
    labels = [r["label"] for r in saved["runs"]]
    if given:
        wanted = [label.strip() for label in given.split(",") if label.strip()]
        if missing := [label for label in wanted if label not in labels]:
            raise SystemExit(f"--labels: {missing} are not in the saved run ({', '.join(labels)})")
        return wanted
    return [r["label"] for r in saved["runs"] if r["method"] in ("kvcomm", "random") and (r["fraction"] or 1) < 1]


def run(args: argparse.Namespace, saved: dict, labels: list[str]) -> dict:
    """The passages run: the skyline and each saved configuration's layers, read as passages."""
    config = saved["config"]
    task = load_task(config["task"], args.data)
    by_id = {item.id: item for item in task.items}
    runs = {r["label"]: r for r in saved["runs"]}
    test = [by_id[i["id"]] for i in runs["skyline"]["items"]]
    calib = [by_id[i] for i in config["calibration_items"]]
    task = dataclasses.replace(task, items=test + calib)
    methods = [make_method("skyline")]
    for label in labels:
        r = runs[label]
        if r["method"] == "random":  # the same seeded draw, named as random (checked below)
            methods.append(make_method("random", ratio=r["options"]["ratio"], seed=r["options"]["seed"],
                                       pieces="passages"))
        else:
            methods.append(make_method("kvcomm", layers=tuple(r["layers"]), pieces="passages"))
    agents = Agents.load(args.model, dtype=config["dtype"])
    report = evaluate(agents, task, methods, EvalConfig(limit=len(test), calib_size=len(calib),
                                                        batch_size=args.batch_size), command=command())
    report.save(args.out)
    return json.loads(Path(args.out).read_text())


def compare(saved: dict, new: dict, labels: list[str]) -> dict:
    chats = {r["label"]: r for r in saved["runs"]}
    here = {r["label"]: r for r in new["runs"]}
    assert [i["answer"] for i in here["skyline"]["items"]] == [i["answer"] for i in chats["skyline"]["items"]], \
        "the skyline's answers differ from the saved run's: not the same items or not the same code"
    metric = saved["config"]["metric"]

    def scores(run: dict) -> list[float]:
        return [float(i["scores"][metric]) for i in run["items"]]

    sky = scores(here["skyline"])
    rows = {}
    read = [r for r in new["runs"] if r["label"] != "skyline"]  # in the order of labels (run() builds them so)
    if len(read) != len(labels):
        raise SystemExit(f"the passages run holds {len(read)} configurations besides the skyline, not the "
                         f"{len(labels)} of --labels: {', '.join(labels)}")
    for label, passages in zip(labels, read):  # each pair's layers are checked below
        old = chats[label]
        assert passages["layers"] == old["layers"], f"{label}: other layers than the saved run's"
        a, b = scores(passages), scores(old)
        diff = [x - y for x, y in zip(a, b)]
        rows[label] = {
            "layers": old["layers"], "n": len(a),
            "chats": round(float(np.mean(b)), 3), "chats_of_skyline": share_of(b, sky),
            "chats_of_skyline_ci95": share_interval(b, sky),
            "passages": round(float(np.mean(a)), 3), "passages_ci95": [round(x, 3) for x in bootstrap_ci(a)],
            "passages_of_skyline": share_of(a, sky),
            "passages_of_skyline_ci95": share_interval(a, sky),
            "passages_minus_chats": [round(float(np.mean(diff)), 3), [round(x, 3) for x in bootstrap_ci(diff)]],
        }
    return {"task": saved["config"]["task"], "metric": metric, "items": len(sky),
            "skyline": round(float(np.mean(sky)), 3), "rows": rows}


SAME_CONFIG = ("sender", "receiver", "dtype", "linear", "task", "num_layers", "max_new_tokens", "metric")
SAME_OPTIONS = ("mode", "codec", "senders", "pieces")
BORROWED = ("skyline", "baseline", "random")  # what a run may take from another: its references, not rivals


def borrow(saved: dict, path: Path, runs: dict, beside: list[Path]) -> dict[str, str]:
    """Adds to ``runs`` the skyline, baseline and random configurations ``saved`` lacks, from the
    runs ``beside`` it; returns each borrowed label's file. The other run must be of the same
    model, data, task, budget and metric, on the same items, and a random configuration must read
    the items as ``saved``'s kvcomm configurations do (mask mode, codec, senders, layout)."""
    ids = [i["id"] for i in saved["runs"][0]["items"]]
    own = {tuple(r["options"].get(k) for k in SAME_OPTIONS) for r in saved["runs"] if r["method"] == "kvcomm"}
    borrowed: dict[str, str] = {}
    for other_path in beside:
        other = json.loads(other_path.read_text())
        differ = [k for k in SAME_CONFIG if other["config"].get(k) != saved["config"].get(k)]
        if other["config"]["data"].get("sha256") != saved["config"]["data"].get("sha256"):
            differ.append("data")
        if differ:
            raise SystemExit(f"{other_path}: its {', '.join(differ)} differ from {path}'s")
        for r in other["runs"]:
            if r["label"] in runs or r["method"] not in BORROWED:
                continue
            if [i["id"] for i in r["items"]] != ids:
                raise SystemExit(f"{other_path}: {r['label']} ran on other items than {path}")
            if r["method"] == "random" and {tuple(r["options"].get(k) for k in SAME_OPTIONS)} != own:
                raise SystemExit(f"{other_path}: {r['label']} reads the items otherwise ({SAME_OPTIONS}) than "
                                 f"{path}'s kvcomm configurations")
            runs[r["label"]] = r
            borrowed[r["label"]] = other_path.name
    return borrowed


def summarise(path: Path, beside: list[Path] | None = None) -> dict:
    """Each configuration of a saved run against its skyline and against random at its ratio; the
    skyline, baseline and random it lacks are taken from the runs ``beside`` it (:func:`borrow`)."""
    saved = json.loads(path.read_text())
    metric = saved["config"]["metric"]
    runs = {r["label"]: r for r in saved["runs"]}
    borrowed = borrow(saved, path, runs, beside or [])
    if "skyline" not in runs:
        raise SystemExit(f"{path} has no skyline: give a run that has one with --beside")
    scores = {label: [float(i["scores"][metric]) for i in r["items"]] for label, r in runs.items()}
    sky = scores["skyline"]
    rows = {}
    for label, values in scores.items():
        row = {"layers": runs[label]["layers"], "n": len(values), "score": round(float(np.mean(values)), 3),
               "ci95": [round(x, 3) for x in bootstrap_ci(values)],
               "of_skyline": share_of(values, sky),
               "of_skyline_ci95": share_interval(values, sky)}
        fraction = runs[label]["fraction"]
        rival = next((r for r, run in runs.items() if run["method"] == "random" and run["fraction"] == fraction), None)
        if runs[label]["method"] == "kvcomm" and rival is not None:
            diff = [x - y for x, y in zip(values, scores[rival])]
            row["minus_random"] = [round(float(np.mean(diff)), 3), [round(x, 3) for x in bootstrap_ci(diff)]]
        if label in borrowed:
            row["from"] = borrowed[label]
        rows[label] = row
    return {"run": path.name, "beside": [p.name for p in beside or []], "task": saved["config"]["task"],
            "metric": metric, "items": len(sky), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarise", type=Path, help="print a saved run against its skyline and random, then stop")
    parser.add_argument("--beside", type=Path, action="append",
                        help="with --summarise: a run on the same items that holds the configurations RUN lacks")
    parser.add_argument("--model")
    parser.add_argument("--data", help="the data file the saved run read")
    parser.add_argument("--chats", type=Path, help="the saved run in the paper's layout")
    parser.add_argument("--labels", help="its configurations to read as passages (comma-separated)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reuse", action="store_true",
                        help="compare the passages run already at --out instead of running it (its command is "
                             "kept as it was; the comparison records this one)")
    args = parser.parse_args()
    if args.summarise:
        summary = summarise(args.summarise, args.beside)
        write_json(args.summarise.with_name(args.summarise.stem + "-summary.json"), {**summary, **run_record(args)})
        table = Table(title=f"{summary['task']}, {summary['items']} items ({summary['metric']})")
        for column in ("configuration", "layers", "score [95% CI]", "÷ skyline [95% CI]", "− random [95% CI]"):
            table.add_column(column)
        for label, row in summary["rows"].items():
            lead = row.get("minus_random")
            table.add_row(label + (f" (from {row['from']})" if "from" in row else ""),
                          ",".join(map(str, row["layers"] or [])), f"{row['score']:.3f} {row['ci95']}",
                          f"{_share(row['of_skyline'])} {row['of_skyline_ci95']}",
                          f"{lead[0]:+.3f} {lead[1]}" if lead else "")
        Console().print(table)
        return
    if not (args.model and args.data and args.chats and args.out):
        parser.error("--model, --data, --chats and --out are needed (or --summarise RUN.json)")
    saved = json.loads(args.chats.read_text())
    labels = chosen_labels(saved, args.labels)
    record = run_record(args)
    if args.out.exists() and not args.reuse:  # before, reused silently, under this command's provenance
        parser.error(f"--out {args.out} exists: pass --reuse to compare it, or give another --out")
    if args.reuse and not args.out.exists():
        parser.error(f"--reuse: --out {args.out} does not exist")
    new = json.loads(args.out.read_text()) if args.reuse else run(args, saved, labels)
    summary = compare(saved, new, labels)
    write_json(args.out.with_name(args.out.stem + "-comparison.json"), {**summary, **record})
    table = Table(title=f"{summary['task']}, {summary['items']} items, skyline {summary['skyline']}: "
                        "score ÷ skyline [95% CI]")
    for column in ("configuration", "layers", "chats", "passages", "passages − chats [95% CI]"):
        table.add_column(column)
    for label, row in summary["rows"].items():
        table.add_row(label, ",".join(map(str, row["layers"])),
                      f"{_share(row['chats_of_skyline'])} {row['chats_of_skyline_ci95']}",
                      f"{_share(row['passages_of_skyline'])} {row['passages_of_skyline_ci95']}",
                      f"{row['passages_minus_chats'][0]:+.3f} {row['passages_minus_chats'][1]}")
    Console().print(table)


if __name__ == "__main__":
    main()
