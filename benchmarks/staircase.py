"""Answer-aware calibration's cost: every layer set run whole, against the staircase.

Greedy selection scores "the chosen layers plus one" for many candidates, backward elimination
(``prune``) "the kept layers but one". Run whole, each set is a full forward of the receiver's
prompt and the gold answer; the staircase runs one base set once (the sets' common layers, or
their union) and each set only from the first layer where it departs from it
(:func:`kvcomm.selection.likelihood.answer_loglik`). This times both on real calibration items, side
by side in one process (alternating, best of ``--repeats``), for each search's first step and a
later one (8 candidates), and checks that both give the same values.

    python benchmarks/staircase.py --model smollm2-135m --task facts --items 4 \\
        --out benchmarks/results/selection/staircase-smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, at_least_one, check_out, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, load_task  # noqa: E402
from kvcomm.eval.batch import Batch  # noqa: E402
from kvcomm.selection.likelihood import Scored, Work, answer_ids, answer_loglik  # noqa: E402
from kvcomm.tasks import TASKS  # noqa: E402


def steps(layers: int) -> dict[str, list[frozenset[int]]]:
    """Greedy's first step, and a later one: a third of the layers chosen (every third), 8 others
    tried; elimination's first step, and a later one: half the layers kept (every other), 8 of them
    left out in turn."""
    chosen = frozenset(range(0, layers, 3))
    others = [layer for layer in range(layers) if layer not in chosen]
    tried = others[:: max(1, len(others) // 8)][:8]
    everything, kept = frozenset(range(layers)), sorted(range(0, layers, 2))
    out = kept[:: max(1, len(kept) // 8)][:8]
    return {"greedy: first step (every layer alone)": [frozenset([layer]) for layer in range(layers)],
            "greedy: later step (8 candidates)": [chosen | {layer} for layer in tried],
            "prune: first step (every layer but one)": [everything - {layer} for layer in range(layers)],
            "prune: later step (8 candidates)": [frozenset(kept) - {layer} for layer in out]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--items", type=int, default=4, help="calibration items (the task's last ones)")
    parser.add_argument("--repeats", type=at_least_one, default=2)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    record = run_record(args)

    generated = {"items": max(args.items, 8)} if TASKS.get(args.task).source == "generated" else {}
    task = load_task(args.task, args.data, **generated)
    agents = Agents.load(args.model)
    batch = Batch(agents, task, task.items[-args.items:])
    prompt = batch.prompt("receiver", task.receiver_message)
    kv = batch.sender_kv()
    items = [Scored(kv.row(i), prompt.ids[i], answer_ids(agents.receiver, item)) for i, item in enumerate(batch.items)]
    rows = []
    for name, sets in steps(agents.num_layers).items():
        seconds: dict[bool, float] = {}
        work: dict[bool, Work] = {}
        values: dict[bool, torch.Tensor] = {}
        for _ in range(args.repeats):
            for staircase in (False, True):
                done = Work()
                began = time.perf_counter()
                got = torch.stack([answer_loglik(agents.receiver.model, item, sets, staircase=staircase, work=done)
                                   for item in items])
                spent = time.perf_counter() - began
                seconds[staircase] = min(spent, seconds.get(staircase, float("inf")))
                work[staircase], values[staircase] = done, got
        rows.append({
            "step": name, "sets": len(sets), "items": len(items),
            "whole_s": seconds[False], "staircase_s": seconds[True], "speedup": seconds[False] / seconds[True],
            "whole_layer_rows": work[False].layer_rows, "staircase_layer_rows": work[True].layer_rows,
            "whole_calls": work[False].calls, "staircase_calls": work[True].calls,
            "max_abs_diff": float((values[True] - values[False]).abs().max()),
        })
    table = Table(title=f"answer-likelihood calibration · {args.model} · {args.task} · {len(items)} items · "
                        f"{torch.get_num_threads()} threads · best of {args.repeats}")
    for column in ("step", "sets", "whole s", "staircase s", "×", "layer passes whole → staircase",
                   "calls whole → staircase", "max |Δ|"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["step"], str(r["sets"]), f"{r['whole_s']:.2f}", f"{r['staircase_s']:.2f}",
                      f"{r['speedup']:.2f}", f"{r['whole_layer_rows']} → {r['staircase_layer_rows']}",
                      f"{r['whole_calls']} → {r['staircase_calls']}", f"{r['max_abs_diff']:.1e}")
    Console(width=200).print(table)
    write_json(args.out, {"model": args.model, "task": args.task, "threads": torch.get_num_threads(),
                          "repeats": args.repeats, "rows": rows, **record})
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
