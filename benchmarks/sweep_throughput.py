r"""Throughput of a sweep: one configuration and one item at a time, against kvcomm's batched path.

Both runs answer the same items with the same configurations (baseline, skyline, kvcomm at each
ratio) and the same layers (ranked on the first item, not timed; quality is not the point here,
so the ranking is passed as explicit layer lists). The one-by-one run
evaluates each configuration separately with batch size 1, so every kvcomm configuration redoes
the sender prefill of every item, as the reference implementation does; the optimised run
batches items and computes each sender prefill once for all configurations. Each run is a
separate process so its peak resident memory is its own. With ``--bracket`` each optimised run
also runs before the one-by-one run, and the ratio takes the mean of the two: a drift of the
machine's speed over the run (this shared CPU's days differ by 2x) then cancels to first order.

    python benchmarks/sweep_throughput.py --model smollm2-135m --task countries \
        --data ../shared/data/countries.jsonl --items 200 --batch-size 16,64 \
        --out benchmarks/results/throughput-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from record import add_out, check_out, run_record, write_json  # benchmarks/record.py, beside this file
from rich.console import Console
from rich.table import Table

from kvcomm import Agents, EvalConfig, build_methods, calibrate, evaluate, load_task
from kvcomm.errors import KvcommError
from kvcomm.eval.memory import GIB, peak_rss_bytes, rss_bytes
from kvcomm.models.allocator import allocator_state
from kvcomm.models.source import resolve_model
from kvcomm.selection import top_layers


def one_run(args: argparse.Namespace) -> dict:
    """Runs the sweep in this process in one mode and returns its measurements."""
    agents = Agents.load(args.model)
    task = load_task(args.task, args.data)
    ranking = calibrate(agents, task, task.items[:1], progress=False, rule="paper").ranking

    def methods() -> list:
        shared = [m for r in args.ratios for m in build_methods(["kvcomm"], layers=tuple(top_layers(ranking, r)))]
        return build_methods(["baseline", "skyline"]) + shared

    config = dict(limit=args.items, calib_size=0)
    rss_before = rss_bytes()
    began = time.perf_counter()
    if args.mode == "one-by-one":
        runs = [run for m in methods() for run in evaluate(
            agents, task, [m], EvalConfig(batch_size=1, **config), progress=False).runs]
    else:
        runs = evaluate(agents, task, methods(), EvalConfig(
            batch_size=int(args.batch_size), max_memory_gb=args.max_memory, **config), progress=False).runs
    seconds = time.perf_counter() - began
    return {
        "mode": args.mode, "seconds": seconds, "answers": {r.label: [i.answer for i in r.items] for r in runs},
        "answers_per_second": sum(r.n for r in runs) / seconds, "items_per_second": args.items / seconds,
        "batch_size": 1 if args.mode == "one-by-one" else int(args.batch_size), "rss_before_gib": rss_before / GIB,
        "rss_after_gib": rss_bytes() / GIB, "peak_rss_gib": peak_rss_bytes() / GIB,
        "allocator": allocator_state(),  # this child's (the parent loads no model: its record says "not set")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="countries")
    parser.add_argument("--data", default=None)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--batch-size", default="16",
                        help="items per batch of the optimised run; several (16,50) run it once per size")
    parser.add_argument("--max-memory", type=float, default=None)
    parser.add_argument("--bracket", action="store_true",
                        help="run the optimised runs both before and after the one-by-one run and take the mean "
                             "of each pair: a machine whose speed drifts over the run (linearly) then drifts out "
                             "of the ratio")
    parser.add_argument("--mode", choices=["one-by-one", "optimised"], help=argparse.SUPPRESS)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    if args.mode:  # child process
        print(json.dumps(one_run(args)))
        return

    try:
        sizes = [int(x) for x in args.batch_size.split(",")]
    except ValueError:
        parser.error(f"--batch-size must be counts separated by commas, not {args.batch_size!r}")
    if min(sizes) < 1:
        parser.error("--batch-size must be positive counts")
    if not all(0 < r <= 1 for r in args.ratios):
        parser.error("--ratios are fractions of the layers, 0 < RATIO <= 1")
    if args.max_memory is not None and args.max_memory <= 0:
        parser.error("--max-memory must be a positive number of GB")
    try:  # a mistyped model, task or data file, or too many items, is refused here, not in the first child
        resolve_model(args.model)
        available = len(load_task(args.task, args.data).items)
    except KvcommError as err:
        parser.error(str(err))
    if not 1 <= args.items <= available:
        parser.error(f"--items must be between 1 and {available} (the task's items), not {args.items}")
    record = run_record(args)
    results: dict[str, dict] = {}
    optimised = [("optimised", size) for size in sizes]
    order = [*(optimised if args.bracket else []), ("one-by-one", 1), *optimised]
    for mode, size in order:
        name = mode if mode == "one-by-one" or len(sizes) == 1 else f"optimised ×{size}"
        if args.bracket and mode == "optimised":  # the bracket's first run of this size, then its second
            name += " (after)" if f"{name} (before)" in results else " (before)"
        command = [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--bracket"], "--mode", mode,
                   "--batch-size", str(size)]
        print(f"running {name} …", file=sys.stderr)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its stderr (errors) shows as it comes
        if done.returncode != 0:
            raise SystemExit(f"error: the {name} run exited with {done.returncode} (its error is above)")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.bracket:  # each size's two runs as one, at their mean time (the one-by-one run sits between them)
        for mode, size in optimised:
            name = mode if len(sizes) == 1 else f"optimised ×{size}"
            before, after = results[f"{name} (before)"], results[f"{name} (after)"]
            seconds = (before["seconds"] + after["seconds"]) / 2
            answers = sum(len(v) for v in before["answers"].values())
            results[name] = {**after, "seconds": seconds, "answers_per_second": answers / seconds,
                             "items_per_second": args.items / seconds, "bracket": [before["seconds"], after["seconds"]],
                             "bracket_answers_equal": before["answers"] == after["answers"]}
    slow = results["one-by-one"]
    total = sum(len(v) for v in slow["answers"].values())
    fast_runs = {name: run for name, run in results.items() if name != "one-by-one" and "(" not in name}
    for run in fast_runs.values():
        run["speedup"] = run["answers_per_second"] / slow["answers_per_second"]
        agree = {label: sum(a == b for a, b in zip(slow["answers"][label], run["answers"][label]))
                 for label in slow["answers"]}
        run["identical_answers"], run["agreement_by_config"] = sum(agree.values()), agree
    best = max(fast_runs.values(), key=lambda run: run["speedup"])
    summary = {
        "model": args.model, "task": args.task, "items": args.items, "ratios": args.ratios,
        "batch_sizes": sizes, "bracket": args.bracket, "speedup": best["speedup"],
        "identical_answers": best["identical_answers"],
        "total_answers": total, "agreement_by_config": best["agreement_by_config"],
        "runs": {k: {x: y for x, y in v.items() if x != "answers"} for k, v in results.items()}, **record,
    }
    table = Table(title=f"sweep throughput · {args.model} · {args.task} · {args.items} items · "
                        f"{len(slow['answers'])} configurations")
    for column in ("run", "seconds", "answers/s", "items/s", "peak RSS GiB", "RSS growth GiB", "speed-up",
                   "identical answers"):
        table.add_column(column, justify="right")
    for mode, run in results.items():
        same = f"{run['identical_answers']}/{total}" if "identical_answers" in run else ""
        table.add_row(mode, f"{run['seconds']:.1f}", f"{run['answers_per_second']:.2f}",
                      f"{run['items_per_second']:.3f}", f"{run['peak_rss_gib']:.2f}",
                      f"{run['rss_after_gib'] - run['rss_before_gib']:+.2f}",
                      f"×{run['speedup']:.2f}" if "speedup" in run else "", same)
    console = Console(width=160)
    console.print(table)
    write_json(args.out, summary)
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
