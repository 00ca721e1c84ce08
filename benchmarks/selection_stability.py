"""How many calibration items does each selection rule need before its choice stops changing?

For one model and task, each rule (``paper``, ``prior``, ``answer``, ``prune``) is calibrated on the first
``n`` items of one fixed calibration pool, for each ``n`` of ``--sizes`` (the pool is the task's
first ``max(sizes)`` items). At each ratio the chosen layer set is compared with the set chosen on the whole pool
(Jaccard overlap, 1 = the same layers). A rule *settles* at the smallest ``n`` from which every
larger size chooses the same set as the whole pool; if it does not settle before the largest
size, more items might still change it, and the table says so. Prints the table, writes JSON.

    python benchmarks/selection_stability.py --model smollm2-135m --task facts --sizes 1,2,4,8 \\
        --out benchmarks/results/selection/stability-smollm2-facts.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, check_out, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, load_task  # noqa: E402
from kvcomm.selection.calibrate import OBJECTIVES, RULES, calibrate  # noqa: E402
from kvcomm.selection.rules import top_layers  # noqa: E402
from kvcomm.tasks import TASKS  # noqa: E402


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def settles(sets: list[list[int]]) -> int | None:
    """Index of the first size from which every set equals the last one (None: only the last)."""
    first = len(sets) - 1
    while first > 0 and sets[first - 1] == sets[-1]:
        first -= 1
    return first if first < len(sets) - 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--items", type=int, default=200, help="generated tasks: how many items to make")
    parser.add_argument("--sizes", default="1,2,4,8",
                        help="calibration pool sizes, increasing, at least two (the last is the whole pool)")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--objective", choices=OBJECTIVES, default="likelihood",
                        help="what the answer-fitted rules maximise, the same at every size (auto, the library's "
                             "default with 8 items, searches on half of them)")
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--sizes must be counts and --ratios fractions, separated by commas, not {args.sizes!r} and "
                     f"{args.ratios!r}")
    if sizes != sorted(set(sizes)) or sizes[0] < 1:
        parser.error("--sizes must be increasing positive counts")
    if len(sizes) < 2:
        parser.error("--sizes needs at least two sizes: each is compared with the last (the whole pool)")
    if not all(0 < r <= 1 for r in ratios):
        parser.error("--ratios must be fractions of the layers, 0 < RATIO <= 1")
    rules = [rule for rule in args.rules.split(",") if rule]
    if not rules or (unknown := sorted(set(rules) - set(RULES))):
        parser.error(f"--rules must name rules of {', '.join(RULES)}" + (f"; unknown: {unknown}" if rules else ""))
    generated = {"items": args.items} if TASKS.get(args.task).source == "generated" else {}
    task = load_task(args.task, args.data, **generated)
    if len(task.items) < sizes[-1]:
        parser.error(f"--sizes: the task has {len(task.items)} items, fewer than the largest size {sizes[-1]}")
    pool = task.items[: sizes[-1]]
    record = run_record(args)
    agents = Agents.load(args.model)
    console = Console(width=200)
    rows = []
    for rule in rules:
        rankings, seconds = [], []
        for n in sizes:
            began = time.perf_counter()
            profile = calibrate(agents, task, pool[:n], rule=rule, batch_size=args.batch_size, progress=False,
                                objective=args.objective)
            seconds.append(time.perf_counter() - began)
            rankings.append(profile.ranking)
            console.print(f"{rule} on {n} item(s): {seconds[-1]:.1f} s", markup=False)
        for ratio in ratios:
            sets = [top_layers(r, ratio) for r in rankings]
            first = settles(sets)
            rows.append({"rule": rule, "ratio": ratio, "sizes": sizes, "layers": sets,
                         "jaccard_to_largest": [jaccard(s, sets[-1]) for s in sets],
                         "settled_at": None if first is None else sizes[first], "seconds": seconds})
    table = Table(title=f"{args.task} · {args.model}: layer sets against the set chosen on {sizes[-1]} items "
                        "(Jaccard); settles = items from which the choice no longer changes")
    for column in ("rule", "ratio", *[f"n={n}" for n in sizes], "settles at", "calibration s"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for row in rows:
        settled = f"{row['settled_at']}" if row["settled_at"] is not None else f"> {sizes[-2]} (not seen)"
        table.add_row(row["rule"], f"{row['ratio']:g}", *[f"{j:.2f}" for j in row["jaccard_to_largest"]], settled,
                      " / ".join(f"{s:.0f}" for s in row["seconds"]))
    console.print(table)
    write_json(args.out, {"model": args.model, "task": args.task, "objective": args.objective,
                          "pool": [i.id for i in pool],
                          "rows": rows, **record})
    console.print(f"results: {args.out}", markup=False)


if __name__ == "__main__":
    main()
