"""A sweep on a local Ray cluster against the serial run: identical answers, Ray's overhead, and the
speed-up to expect from more workers.

Every run answers the same items with the same configurations (calibrated once, in the driver),
each in its own process:

- ``serial``: kvcomm's batched path in one process, ``--threads`` torch threads;
- ``ray-N``: the same run with its batches on N local Ray workers of ``--threads`` threads each
  (``Cluster``; the driver still calibrates and assembles the report).

Ray's overhead is ``ray-1`` against ``serial`` (the same cores doing the same work); its start
(Ray itself, workers loading the model) is measured apart from the evaluation. The projection
takes the measured per-batch cost of ``ray-1`` and the driver's own work, and assumes the
batches spread evenly over the workers and that each worker has cores of its own.

    OMP_NUM_THREADS=1 python benchmarks/ray_sweep.py --model smollm2-135m --task countries \\
        --data ../shared/data/countries.jsonl --items 199 --workers 1,2 \\
        --out benchmarks/results/ray/ray-smollm2-countries.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from record import add_out, check_out, run_record, write_json  # benchmarks/record.py, beside this file
from rich.console import Console
from rich.table import Table

from kvcomm import Agents, EvalConfig, build_methods, evaluate, load_task
from kvcomm.eval.cluster import Cluster, RayCluster
from kvcomm.models.allocator import allocator_state


def one_run(args: argparse.Namespace) -> dict:
    """Runs the sweep in this process (``--run serial`` or ``--run ray-N``) and returns its measurements."""
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    agents = Agents.load(args.model)
    task = load_task(args.task, args.data)
    config = EvalConfig(limit=args.items, batch_size=args.batch_size, calib_size=1, selection="paper")
    methods = build_methods(args.methods.split(","), [args.ratio])
    loaded = time.perf_counter()
    start_s = 0.0
    if args.run == "serial":
        report = evaluate(agents, task, methods, config, progress=False)
    else:
        workers = int(args.run.removeprefix("ray-"))
        with Cluster(RayCluster(workers=workers, threads=args.threads), args.model, args.model, "float32") as cluster:
            start_s = time.perf_counter() - loaded
            report = evaluate(agents, task, methods, config, progress=False, cluster=cluster)
    ended = time.perf_counter()
    eval_s = ended - loaded - start_s
    return {
        "run": args.run, "load_s": loaded - began, "start_s": start_s, "eval_s": eval_s, "total_s": ended - began,
        "calibration_s": (report.profile or {}).get("cost", {}).get("seconds", 0.0),
        "batches": math.ceil(args.items / args.batch_size),
        "answers": {r.label: [i.answer for i in r.items] for r in report.runs},
        "scores": {r.label: r.scores[report.config["metric"]].mean for r in report.runs},
        "allocator": allocator_state(),  # this child's (the parent loads no model: its record says "not set")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="countries")
    parser.add_argument("--data", default=None)
    parser.add_argument("--items", type=int, default=199)
    parser.add_argument("--methods", default="baseline,skyline,kvcomm")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the serial run and of each worker")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to run")
    parser.add_argument("--project", type=int, default=8, help="project the speed-up up to this many workers")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    if args.run:  # child process
        print(json.dumps(one_run(args)))
        return

    torch.set_num_threads(args.threads)  # the serial run's and each worker's count, for the record
    record = run_record(args)
    results = {}
    for run in ["serial", *(f"ray-{n}" for n in args.workers.split(","))]:
        print(f"running {run} …", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", run], check=True,
                             stdout=subprocess.PIPE, text=True).stdout  # a failing child's stderr shows
        results[run] = json.loads(out.strip().splitlines()[-1])
    serial = results["serial"]
    total = sum(len(v) for v in serial["answers"].values())
    for run in results.values():
        run["identical_answers"] = sum(a == b for label, answers in serial["answers"].items()
                                       for a, b in zip(answers, run["answers"][label]))
    one = results.get("ray-1")
    projection = {}
    if one is not None:
        driver = one["calibration_s"]  # the driver's own work; the rest of eval_s is the batches
        per_batch = (one["eval_s"] - driver) / one["batches"]
        for n in range(1, args.project + 1):
            projection[n] = (driver + one["batches"] * per_batch) / (driver + math.ceil(one["batches"] / n) * per_batch)
    summary = {
        "model": args.model, "task": args.task, "items": args.items, "methods": args.methods, "ratio": args.ratio,
        "batch_size": args.batch_size, "threads": args.threads, "total_answers": total,
        "ray_overhead": None if one is None else one["eval_s"] / serial["eval_s"] - 1,
        "projected_speedup": projection,
        "runs": {k: {x: y for x, y in v.items() if x != "answers"} for k, v in results.items()}, **record,
    }
    table = Table(title=f"sweep on Ray · {args.model} · {args.task} · {args.items} items · {args.methods} · "
                        f"{args.threads} thread(s) per process")
    for column in ("run", "load s", "ray start s", "evaluation s", "total s", "×serial (evaluation)",
                   "identical answers"):
        table.add_column(column, justify="right")
    for name, run in results.items():
        table.add_row(name, f"{run['load_s']:.1f}", f"{run['start_s']:.1f}", f"{run['eval_s']:.1f}",
                      f"{run['total_s']:.1f}", f"{serial['eval_s'] / run['eval_s']:.2f}",
                      f"{run['identical_answers']}/{total}")
    console = Console(width=140)
    console.print(table)
    if one is not None:
        console.print(f"Ray's overhead (ray-1 against serial, evaluation): {100 * summary['ray_overhead']:+.1f}%")
        console.print("projected speed-up: " + ", ".join(f"{n} workers ×{s:.2f}" for n, s in projection.items())
                      + (" (the run is one batch: more workers have nothing to share)" if one["batches"] == 1 else ""))
    write_json(args.out, summary)
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
