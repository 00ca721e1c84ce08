"""Layer selection rules side by side, on the same items: which layers help the answer?

For one model and task: the paper's rule (attention importance + fixed prior), the answer-aware
greedy rule, its backward elimination (``prune``), the fitted prior, random layers (seeded) at each
ratio, all layers, the skyline and the baseline, in one run (each rule calibrated once on the same
held-out items). Prints the table with 95% intervals, marks every rule that is not above random at
a ratio, reports each rule's calibration cost, and writes the results JSON. ``--budget TOLERANCE``
also finds each rule's budget (the smallest ratio within the tolerance of all layers on the
calibration items), written beside the JSON; ``--report`` prints (``--markdown``) or budgets a
saved run.

    python benchmarks/selection.py --model smollm2-135m --task facts --items 200 --calib-size 4 \\
        --objective likelihood --out benchmarks/results/selection/smollm2-facts.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, check_out, command, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method  # noqa: E402
from kvcomm.errors import ConfigError  # noqa: E402
from kvcomm.eval.results import Report  # noqa: E402
from kvcomm.models.source import same_model_name  # noqa: E402
from kvcomm.selection.budget import check_tolerance, smallest_ratio  # noqa: E402
from kvcomm.selection.calibrate import OBJECTIVES  # noqa: E402
from kvcomm.tasks import TASKS  # noqa: E402
from kvcomm.tasks.base import Task  # noqa: E402

RULES = ("paper", "prior", "answer", "prune")
LEADS = (("answer", "paper"), ("prune", "paper"), ("prune", "answer"))  # paired differences the markdown reports


def methods(ratios: list[float], seed: int, rules: tuple[str, ...] = RULES) -> list:
    """``kvcomm@1`` (all layers) names no rule: it takes the run's own ranking (``EvalConfig.selection``),
    which any ranking serves, so the run's rule must be one of ``rules`` (:func:`run_config`) or a
    rule nobody compares is calibrated for nothing."""
    built = [make_method("baseline"), make_method("skyline"), make_method("kvcomm", ratio=1.0)]
    for ratio in ratios:
        built += [make_method("kvcomm", ratio=ratio, selection=rule) for rule in rules]
        built.append(make_method("random", ratio=ratio, seed=seed))
    return built


def paired(report: Report, a: str, b: str, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean per-item difference ``a - b`` (same items) and its 95% bootstrap interval."""
    metric = report.config["metric"]
    runs = {run.label: run for run in report.runs}
    diff = np.array([x.scores[metric] - y.scores[metric] for x, y in zip(runs[a].items, runs[b].items)])
    means = diff[np.random.default_rng(0).integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def random_label(report: Report, ratio: float) -> str:
    """The label of the run's random layers at ``ratio`` (``random@0.5``, or ``random@0.5~seed7``
    for another seed: looking up the first alone was a KeyError after the whole run)."""
    for run in report.runs:
        if run.method == "random" and run.options.get("ratio") == ratio:
            return run.label
    raise KeyError(f"no random run at ratio {ratio:g}")


def present(report: Report) -> list[str]:
    """The rules a run compared, in the order of :data:`RULES`."""
    labels = {run.label for run in report.runs}
    return [rule for rule in RULES if any(label.endswith(f"~{rule}") for label in labels)]


def _forwards(cost: dict) -> str:
    """A rule's search cost per calibration item (the paper's rule searches nothing)."""
    count = cost.get("forwards_per_item") or 0
    return f"{count:.0f} forwards per item" if count else "no search (attention importance, read once)"


def table(report: Report, ratios: list[float]) -> Table:
    metric = report.config["metric"]
    by = {run.label: run.scores[metric] for run in report.runs}
    out = Table(title=f"{report.config['task']} · {report.config['receiver']} · n={report.config['test_items']} · "
                      f"{metric} (95% CI) [paired difference to random, 95% CI]; ✗ = not above random")
    out.add_column("ratio")
    rules = present(report)
    for column in (*rules, "random"):
        out.add_column(column, justify="right")
    out.caption = (f"references on the same items: all layers (kvcomm@1) {by['kvcomm@1'].mean:.3f} · "
                   f"skyline {by['skyline'].mean:.3f} · baseline {by['baseline'].mean:.3f}")
    for ratio in ratios:
        rand = by[random_label(report, ratio)]
        cells = []
        for rule in rules:
            score = by[f"kvcomm@{ratio:g}~{rule}"]
            mark = "" if score.mean > rand.mean else " ✗"
            d, low, high = paired(report, f"kvcomm@{ratio:g}~{rule}", random_label(report, ratio))
            interval = f"({score.ci95[0]:.2f}–{score.ci95[1]:.2f})"
            cells.append(f"{score.mean:.3f} {interval} [{d:+.3f}, {low:+.2f}…{high:+.2f}]{mark}")
        out.add_row(f"{ratio:g}", *cells, f"{rand.mean:.3f} ({rand.ci95[0]:.2f}–{rand.ci95[1]:.2f})")
    return out


def markdown(report: Report, ratios: list[float]) -> str:
    """The table as markdown (docs/results.md): score (95% CI) ÷ skyline [paired difference to
    random, 95% CI] per rule and ratio, ✗ where not above random, then the rules' calibration cost."""
    metric = report.config["metric"]
    by = {run.label: run.scores[metric] for run in report.runs}
    sky = by["skyline"].mean
    rules = present(report)
    lines = [f"**{report.config['receiver']}, {report.config['task']} ({report.config['test_items']} test items, "
             f"{len(report.config['calibration_items'])} calibration items, {metric})**", "",
             "| ratio | " + " | ".join(rules) + " | random | all layers − random |", "|---" * (len(rules) + 3) + "|"]
    for ratio in ratios:
        rand = by[random_label(report, ratio)]
        cells = []
        for rule in rules:
            score = by[f"kvcomm@{ratio:g}~{rule}"]
            d, low, high = paired(report, f"kvcomm@{ratio:g}~{rule}", random_label(report, ratio))
            share = f" ÷sky {score.mean / sky:.2f}" if sky > 0 else ""
            mark = "" if low > 0 else " ✗" if score.mean <= rand.mean else " ≈"
            cells.append(f"{score.mean:.3f} ({score.ci95[0]:.2f}–{score.ci95[1]:.2f}){share} "
                         f"[{d:+.3f}, {low:+.2f}…{high:+.2f}]{mark}")
        d, low, high = paired(report, "kvcomm@1", random_label(report, ratio))
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + f" | {rand.mean:.3f} "
                     f"({rand.ci95[0]:.2f}–{rand.ci95[1]:.2f}) | {d:+.3f} [{low:+.2f}…{high:+.2f}] |")
    for better, worse in LEADS:
        if {better, worse} <= set(rules):
            gains = [f"{ratio:g}: {d:+.3f} [{low:+.2f}…{high:+.2f}]" for ratio in ratios
                     for d, low, high in [paired(report, f"kvcomm@{ratio:g}~{better}", f"kvcomm@{ratio:g}~{worse}")]]
            lines += ["", f"{better} − {worse} (paired, 95% CI): " + "; ".join(gains) + "."]
    lines += ["", f"All layers {by['kvcomm@1'].mean:.3f}, skyline {sky:.3f}, baseline {by['baseline'].mean:.3f}. "
              "Calibration: " + ", ".join(
                  f"{rule} {p['cost']['seconds']:.0f} s ({_forwards(p['cost'])})"
                  for rule, p in sorted(report.profiles.items()) if rule in rules) + "."]
    return "\n".join(lines)


def run_config(args: argparse.Namespace, rules: tuple[str, ...]) -> EvalConfig:
    """The run's evaluation settings; its own rule (what ``kvcomm@1`` is given, and which any
    ranking serves) is the first compared rule, so that no other rule is calibrated for it."""
    return EvalConfig(limit=args.limit, calib_size=args.calib_size, batch_size=args.batch_size,
                      objective=args.objective, selection=rules[0])


def budgets(agents: Agents, task: Task, report: Report, tolerance: float, batch_size: int) -> dict[str, dict]:
    """Each rule's budget: the smallest ratio whose score on the run's calibration items is within
    ``tolerance`` of all layers' (:func:`kvcomm.selection.budget.smallest_ratio`), with seconds."""
    ids = set(report.config["calibration_items"])
    items = [item for item in task.items if item.id in ids]
    out = {}
    for rule, profile in sorted(report.profiles.items()):
        began = time.perf_counter()
        found = smallest_ratio(agents, task, items, profile["ranking"], tolerance, batch_size=batch_size)
        out[rule] = {**found, "seconds": time.perf_counter() - began}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--items", type=int, default=200, help="generated tasks: how many items to make")
    parser.add_argument("--limit", type=int, default=None, help="test items (default: all but calibration)")
    parser.add_argument("--calib-size", type=int, default=None,
                        help="(default: the rules' own count: 8 for prune and answer with auto, 4 otherwise)")
    parser.add_argument("--ratios", default="0.3,0.5,0.7", help="ratios to run (--report reads the saved run's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rules", default=",".join(RULES), help="the rules to compare (comma-separated)")
    parser.add_argument("--objective", choices=OBJECTIVES, default=None,
                        help="what the answer, prune and prior rules maximise on the calibration items "
                             "(default: each rule's own: auto for answer and prune, likelihood for prior)")
    parser.add_argument("--report", type=Path, default=None, help="print a saved results JSON's table; run nothing")
    parser.add_argument("--markdown", action="store_true", help="with --report: the table as markdown "
                        "(≈: above random but inside the interval; ✗: not above)")
    add_out(parser, required=False, help="results JSON (required unless --report)")
    parser.add_argument("--budget", type=float, default=None, metavar="TOLERANCE",
                        help="also find each rule's budget on the calibration items (with --report: of that run; "
                             "give the same --model, --task, --data, --items); written beside the JSON")
    args = parser.parse_args()
    if args.budget is not None:
        try:  # before any work (it was checked after the whole evaluation)
            check_tolerance(args.budget)
        except ConfigError as err:
            parser.error(f"--budget: {err}")
    if args.report is not None and args.budget is not None:  # the budgets go beside the report read
        if args.out is not None:
            parser.error("--report with --budget writes its budgets beside the report; leave --out out")
        check_out(parser, args, [budgets_path(args.report)], option="report")
    elif args.out is not None:  # and the budgets beside the results
        check_out(parser, args, [args.out] + ([budgets_path(args.out)] if args.budget is not None else []))
    if args.report is not None and args.budget is not None:
        saved = Report.model_validate_json(args.report.read_text())
        generated = {"items": args.items} if TASKS.get(args.task).source == "generated" else {}
        task = load_task(args.task, args.data, **generated)
        if not same_model_name(saved.config["receiver"], args.model) or saved.config["task"] != task.name:
            parser.error(f"{args.report} is a run of {saved.config['receiver']} on {saved.config['task']}: give its "
                         f"--model and --task (not {args.model}, {task.name})")
        if missing := set(saved.config["calibration_items"]) - {item.id for item in task.items}:
            parser.error(f"{len(missing)} of the run's calibration items are not in this task (e.g. "
                         f"{sorted(missing)[0]}): give the run's --data and --items")
        record = run_record(args)
        write_budgets(budgets(Agents.load(args.model), task, saved, args.budget, args.batch_size), args.report, record)
        return
    if args.report is not None:
        saved = Report.model_validate_json(args.report.read_text())
        # the saved run's ratios (its random rows), not --ratios' default: a run at others was a KeyError
        ratios = sorted({float(run.label.removeprefix("random@").split("~")[0]) for run in saved.runs
                         if run.label.startswith("random@")})
        if not ratios:
            parser.error(f"{args.report} holds no random@RATIO run: not a results file of this benchmark")
        if args.markdown:
            print(markdown(saved, ratios))
        else:
            Console(width=200).print(table(saved, ratios))
        return
    if args.out is None:
        parser.error("--out is required (the results JSON)")
    rules = tuple(rule for rule in args.rules.split(",") if rule)
    if not rules:
        parser.error(f"--rules must name at least one rule of {', '.join(RULES)}")
    if unknown := set(rules) - set(RULES):
        parser.error(f"unknown rules {sorted(unknown)}; valid: {', '.join(RULES)}")
    generated = {"items": args.items} if TASKS.get(args.task).source == "generated" else {}
    task = load_task(args.task, args.data, **generated)
    ratios = [float(r) for r in args.ratios.split(",")]
    config = run_config(args, rules)
    record = run_record(args)
    agents = Agents.load(args.model)
    report = evaluate(agents, task, methods(ratios, args.seed, rules), config, command=command())
    report.save(args.out)  # first: a table that fails to print loses no run
    console = Console(width=200)
    console.print(table(report, ratios))
    for rule, profile in sorted(report.profiles.items()):
        cost, ranking = profile["cost"], profile["ranking"]
        console.print(f"{rule}: calibration {cost['seconds']:.1f} s, {_forwards(cost)} "
                      f"({cost['items']:.0f} items); top half {sorted(ranking[:len(ranking) // 2])}",
                      markup=False)
    console.print(f"results: {args.out}", markup=False)
    if args.budget is not None:
        write_budgets(budgets(agents, task, report, args.budget, args.batch_size), args.out, record)


def budgets_path(beside: Path) -> Path:
    """Where the budgets of a results file go: beside it, ``<stem>-budgets.json``."""
    return beside.with_name(beside.stem + "-budgets.json")


def write_budgets(found: dict[str, dict], beside: Path, record: dict) -> None:
    path = budgets_path(beside)
    write_json(path, {**found, **record})
    for rule, budget in found.items():  # (the JSON also holds the run's provenance and environment)
        scores = ", ".join(f"{r}: {v:.2f}" for r, v in budget["scores"].items())
        print(f"{rule}: budget {budget['ratio']:.3f} (tolerance {budget['tolerance']}, {budget['items']} items, "
              f"{budget['seconds']:.0f} s); calibration scores {scores}")
    print(f"budgets: {path}")


if __name__ == "__main__":
    main()
