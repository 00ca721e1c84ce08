"""Throughput of a sweep: one configuration and one item at a time, against kvcomm's batched path.

Both runs answer the same items with the same configurations (baseline, skyline, kvcomm at each
ratio) and the same layers (ranked on the first item, not timed; quality is not the point here,
so the ranking is passed as explicit layer lists). The one-by-one run
evaluates each configuration separately with batch size 1, so every kvcomm configuration redoes
the sender prefill of every item, as the reference implementation does; the optimised run
batches items and computes each sender prefill once for all configurations. Each run is a
separate process so its peak resident memory is its own.

    python benchmarks/sweep_throughput.py --model smollm2-135m --task countries \
        --data ../shared/data/countries.jsonl --items 200 --out benchmarks/results/throughput-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvcomm import Agents, EvalConfig, build_methods, calibrate, evaluate, load_task
from kvcomm.eval.memory import GIB, peak_rss_bytes, rss_bytes
from kvcomm.selection import top_layers


def one_run(args: argparse.Namespace) -> dict:
    """Runs the sweep in this process in one mode and returns its measurements."""
    agents = Agents.load(args.model)
    task = load_task(args.task, args.data)
    ranking = calibrate(agents, task, task.items[:1], progress=False).ranking

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
            batch_size=args.batch_size, max_memory_gb=args.max_memory, **config), progress=False).runs
    seconds = time.perf_counter() - began
    return {
        "mode": args.mode, "seconds": seconds, "answers": {r.label: [i.answer for i in r.items] for r in runs},
        "answers_per_second": sum(r.n for r in runs) / seconds, "items_per_second": args.items / seconds,
        "rss_before_gib": rss_before / GIB, "rss_after_gib": rss_bytes() / GIB, "peak_rss_gib": peak_rss_bytes() / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="countries")
    parser.add_argument("--data", default=None)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-memory", type=float, default=None)
    parser.add_argument("--mode", choices=["one-by-one", "optimised"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    if args.mode:  # child process
        print(json.dumps(one_run(args)))
        return

    results = {}
    for mode in ("one-by-one", "optimised"):
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        print(f"running {mode} …", file=sys.stderr)
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    slow, fast = results["one-by-one"], results["optimised"]
    agree = {label: sum(a == b for a, b in zip(slow["answers"][label], fast["answers"][label]))
             for label in slow["answers"]}
    total = sum(len(v) for v in slow["answers"].values())
    summary = {
        "model": args.model, "task": args.task, "items": args.items, "ratios": args.ratios,
        "batch_size": args.batch_size, "speedup": fast["answers_per_second"] / slow["answers_per_second"],
        "identical_answers": sum(agree.values()), "total_answers": total, "agreement_by_config": agree,
        "runs": {k: {x: y for x, y in v.items() if x != "answers"} for k, v in results.items()},
    }
    table = Table(title=f"sweep throughput · {args.model} · {args.task} · {args.items} items · "
                        f"{len(slow['answers'])} configurations")
    for column in ("run", "seconds", "answers/s", "items/s", "peak RSS GiB", "RSS growth GiB"):
        table.add_column(column, justify="right")
    for mode, run in results.items():
        table.add_row(mode, f"{run['seconds']:.1f}", f"{run['answers_per_second']:.2f}",
                      f"{run['items_per_second']:.3f}", f"{run['peak_rss_gib']:.2f}",
                      f"{run['rss_after_gib'] - run['rss_before_gib']:+.2f}")
    console = Console(width=140)
    console.print(table)
    console.print(f"speed-up ×{summary['speedup']:.2f}; identical answers "
                  f"{summary['identical_answers']}/{total} ({100 * summary['identical_answers'] / total:.1f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
