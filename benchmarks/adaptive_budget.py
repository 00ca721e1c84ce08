"""The adaptive budget against fixed ratios: the same answers for fewer layers?

One run on one model and task: ``kvcomm`` at the fixed ratios 0.1, 0.2, … 1.0 of the run's
ranking (the rounds' with the default ``--step``; fused into one decode), ``adaptive`` (ranked layers in rounds until an
item's answer holds; patience 1 and 2), the skyline and the baseline, all on the same items and
one calibrated ranking. Prints each configuration's score with its 95% interval, the fraction of
layers and the KV bytes it sent and its receiver seconds; then, for each adaptive configuration,
the fixed ratio that sends at least as many bytes (paired difference, 95% interval) and the
smallest fixed ratio that scores as well. Writes the results JSON and a plot (score against the
fraction of layers sent) beside it.

    python benchmarks/adaptive_budget.py --model smollm2-135m --task facts --items 200 \\
        --out benchmarks/results/selection/adaptive-smollm2-facts.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, check_out, command, write_json  # noqa: E402  (benchmarks/record.py, beside this file)
from selection import paired  # noqa: E402  (benchmarks/selection.py, beside this file)

from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method  # noqa: E402
from kvcomm.eval.results import Report, RunResult  # noqa: E402
from kvcomm.selection.blocks import read_ranking  # noqa: E402
from kvcomm.selection.calibrate import OBJECTIVES  # noqa: E402
from kvcomm.tasks import TASKS  # noqa: E402

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PATIENCE = (1, 2)


def methods(step: float) -> list:
    built = [make_method("baseline"), make_method("skyline")]
    built += [make_method("kvcomm", ratio=ratio) for ratio in GRID]
    built += [make_method("adaptive", step=step, patience=p) for p in PATIENCE]
    return built


def fraction_sent(run: RunResult) -> float:
    """The mean fraction of layers sent: the adaptive rounds' own record, or the fixed fraction."""
    if run.details and "mean_ratio" in run.details:
        return float(run.details["mean_ratio"])
    return float(run.fraction or 0.0)


def comparisons(report: Report) -> list[dict]:
    """For each adaptive configuration: the fixed ratio of at least its bytes, paired, and the
    smallest fixed ratio that scores as well."""
    metric = report.config["metric"]
    fixed = [run for run in report.runs if run.method == "kvcomm"]
    found = []
    for run in (r for r in report.runs if r.method == "adaptive"):
        score = run.scores[metric].mean
        cover = next((f for f in fixed if f.kv_bytes_mean >= run.kv_bytes_mean - 1e-9), fixed[-1])
        d, low, high = paired(report, run.label, cover.label)
        matching = next((f for f in fixed if f.scores[metric].mean >= score - 1e-12), None)
        found.append({"adaptive": run.label, "score": score, "fraction": fraction_sent(run),
                      "kv_bytes_mean": run.kv_bytes_mean, "fixed_at_least_its_bytes": cover.label,
                      "fixed_score": cover.scores[metric].mean, "difference": d, "ci95": [low, high],
                      "smallest_fixed_as_good": matching.label if matching else None,
                      "smallest_fixed_as_good_fraction": matching.fraction if matching else None})
    return found


def table(report: Report) -> Table:
    metric = report.config["metric"]
    out = Table(title=f"{report.config['task']} · {report.config['receiver']} · n={report.runs[0].n} · "
                      f"ranking: {report.config['selection']}")
    for column in ("configuration", metric, "95% CI", "layers sent", "KV MB/item", "receiver s"):
        out.add_column(column, justify="left" if column == "configuration" else "right")
    for run in report.runs:
        score = run.scores[metric]
        sent = f"{fraction_sent(run):.3f}" if run.method in ("kvcomm", "adaptive") else "-"
        out.add_row(run.label, f"{score.mean:.3f}", f"{score.ci95[0]:.2f}–{score.ci95[1]:.2f}", sent,
                    f"{run.kv_bytes_mean / 1e6:.2f}", f"{run.seconds:.1f}")
    return out


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report.config["metric"]
    fixed = [run for run in report.runs if run.method == "kvcomm"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.plot([fraction_sent(r) for r in fixed], [r.scores[metric].mean for r in fixed], marker="o",
            label=f"kvcomm (fixed ratio, {report.config['selection']} ranking)")
    ax.fill_between([fraction_sent(r) for r in fixed], [r.scores[metric].ci95[0] for r in fixed],
                    [r.scores[metric].ci95[1] for r in fixed], alpha=0.12)
    for run in (r for r in report.runs if r.method == "adaptive"):
        score = run.scores[metric]
        error = [[score.mean - score.ci95[0]], [score.ci95[1] - score.mean]]
        ax.errorbar([fraction_sent(run)], [score.mean], yerr=error, marker="s", capsize=3, linestyle="none",
                    label=run.label)
    for name, style in (("skyline", "--"), ("baseline", ":")):
        run = next(r for r in report.runs if r.method == name)
        ax.axhline(run.scores[metric].mean, linestyle=style, color="grey", linewidth=1,
                   label=f"{name} ({run.scores[metric].mean:.2f})")
    ax.set(xlabel="mean fraction of layers sent", ylabel=metric, ylim=(0, None),
           title=f"{report.config['task']} · {report.config['receiver']}: adaptive budget against fixed ratios")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def show(report: Report, console: Console) -> list[dict]:
    console.print(table(report))
    found = comparisons(report)
    for c in found:
        as_good = (f"; the smallest fixed ratio as good: {c['smallest_fixed_as_good']}"
                   if c["smallest_fixed_as_good"] else "; no fixed ratio scores as well")
        console.print(f"{c['adaptive']}: {c['score']:.3f} at {c['fraction']:.3f} of the layers; "
                      f"{c['fixed_at_least_its_bytes']} (at least its bytes) {c['fixed_score']:.3f}, difference "
                      f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{as_good}", markup=False)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--items", type=int, default=200, help="generated tasks: how many items to make")
    parser.add_argument("--limit", type=int, default=None, help="test items (default: all but calibration)")
    parser.add_argument("--calib-size", type=int, default=None, help="(default: the rule's own count)")
    parser.add_argument("--selection", default="answer",
                        help="the rule whose ranking every configuration uses (default answer: the rule of the runs "
                             "in docs/results.md)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="likelihood",
                        help="what the --selection rule maximises (default likelihood: the runs in docs/results.md; "
                             "auto, the library's default, holds out 8 calibration items)")
    parser.add_argument("--step", type=float, default=0.1, help="adaptive: the fraction of layers each round adds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", type=Path, default=None,
                        help="reuse the --selection rule's ranking from a results JSON that calibrated it (e.g. "
                             "benchmarks/selection.py's, on the same model, task and calibration items)")
    parser.add_argument("--report", type=Path, default=None, help="print a saved results JSON's tables; run nothing")
    add_out(parser, required=False, help="results JSON (required unless --report)")
    args = parser.parse_args()
    if args.out is not None:  # the results, the comparison and the plot beside them
        check_out(parser, args, [args.out, args.out.with_name(args.out.stem + "-comparison.json"),
                                 args.out.with_suffix(".png")])
    console = Console(width=160)
    if args.report is not None:
        show(Report.model_validate_json(args.report.read_text()), console)
        return
    if args.out is None:
        parser.error("--out is required (the results JSON)")
    generated = {"items": args.items} if TASKS.get(args.task).source == "generated" else {}
    task = load_task(args.task, args.data, **generated)
    config = EvalConfig(limit=args.limit, calib_size=args.calib_size, batch_size=args.batch_size,
                        selection=args.selection, objective=args.objective)
    profile = read_ranking(args.profile, args.selection) if args.profile else None  # before the model loads
    agents = Agents.load(args.model)
    report = evaluate(agents, task, methods(args.step), config, profile=profile, command=command())
    found = show(report, console)
    report.save(args.out)
    write_json(args.out.with_name(args.out.stem + "-comparison.json"), found)
    plot(report, args.out.with_suffix(".png"))
    console.print(f"results: {args.out} (comparison and plot beside it)", markup=False)


if __name__ == "__main__":
    main()
