"""What KVCOMM's anchor correction costs per agent and item: the shareability test and one
correction, against the number of anchors, on KV of a model's shape (random values: the cost does
not depend on them). Best of ``--repeats``.

    OMP_NUM_THREADS=1 python benchmarks/anchors.py --layers 28 --heads 2 --dim 128 --question 21 \\
        --closing 5 --anchors 1,5,20 --out benchmarks/results/graph/anchors-cost-qwen.json

(28 layers, 2 KV heads of 128: Qwen2.5-Coder-1.5B; 21 question tokens and a 5-token closing: a
Countries question.) The correction's time is paid per agent and item that reuses the question,
inside that agent's time to first token.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, at_least_one, check_out, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm.graphs.anchors import Anchor, AnchorOptions, AnchorPool, Segment  # noqa: E402


def best(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--question", type=int, default=21, help="shared text tokens")
    parser.add_argument("--closing", type=int, default=5, help="template tokens after it")
    parser.add_argument("--anchors", default="1,5,20", help="comma-separated anchor counts")
    parser.add_argument("--repeats", type=at_least_one, default=5)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    record = run_record(args)

    generator = torch.Generator().manual_seed(0)

    def segment(length: int) -> Segment:
        shape = (args.layers, args.heads, length + args.closing, args.dim)
        return Segment(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), length,
                       tuple(range(args.closing)))

    rows = []
    for count in (int(c) for c in args.anchors.split(",")):
        pool = AnchorPool(AnchorOptions(max_anchors=max(count, 1), min_anchors=1))
        for i in range(count):
            offsets = segment(args.question + i % 4)
            pool.add(Anchor(segment(args.question + i % 4), {0: (offsets.keys, offsets.values)}))
        base = segment(args.question)
        rows.append({"anchors": count,
                     "shareable_s": best(lambda pool=pool, base=base: pool.shareable(base, 0), args.repeats),
                     "correct_s": best(lambda pool=pool, base=base: pool.correct(0, base), args.repeats)})
    table = Table(title=f"anchor correction, {args.layers} layers × {args.heads} heads × {args.dim}, "
                        f"{args.question}+{args.closing} tokens, {torch.get_num_threads()} thread(s)")
    for column in ("anchors", "shareability test", "one correction"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["anchors"]), f"{row['shareable_s'] * 1e3:.1f} ms", f"{row['correct_s'] * 1e3:.1f} ms")
    Console().print(table)
    write_json(args.out, {"config": {k: str(v) for k, v in vars(args).items()},
                          "threads": torch.get_num_threads(), "rows": rows, **record})
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
