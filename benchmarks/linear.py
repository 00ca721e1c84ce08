"""Packed linear layers against torch's own products (``load_model(..., linear="packed")``).

One table of two parts, dense and packed measured in turn in one process, best of ``--repeats``
(each row is also printed as it is measured, for long runs):

- every distinct linear shape of the model at several row counts (one product each, the packed
  path forced at every count: this is where ``PACKED_ROWS`` comes from);
- the model: a prompt's prefill at batch 1 (``--prompts``, token counts; one logit row kept, as
  the harness does), and one decoding step at each ``--batches`` size behind a 64-token prompt.

The model is packed once; "dense" rows run the same layers with the packed path switched off
(every call takes torch's product), so both sides use the same weights and nothing else changes.
The model rows pack what ``load_model(..., linear="packed")`` packs (layers of at least
``PACKED_MIN_WEIGHT`` weights, up to ``PACKED_ROWS`` rows).

    python benchmarks/linear.py --model qwen2.5-coder-1.5b --out benchmarks/results/linear/linear-qwen.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, at_least_one, check_out, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm.models import load_model  # noqa: E402
from kvcomm.models.packing import PACKED_MIN_WEIGHT, PACKED_ROWS, PackedLinear, pack_linears  # noqa: E402
from kvcomm.protocol.sender import cache_argument  # noqa: E402


def once(run: Callable[[], object]) -> float:
    """One timed call after an untimed one (first calls create oneDNN primitives and fill caches)."""
    run()
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def decoding_step(model: torch.nn.Module, step: torch.Tensor, cache: Any, position: torch.Tensor) -> None:
    model(step, **{cache_argument(type(model)): cache}, position_ids=position, use_cache=True)
    cache.crop(-1)  # drop the step: the next one sees the same 64 tokens


def side_by_side(
    layers: list[PackedLinear], run: Callable[[], object], repeats: int, limit: int = PACKED_ROWS,
) -> dict[str, float]:
    """Dense and packed (up to ``limit`` rows) in turn, ``repeats`` rounds, best of each: a slow
    spell of the machine hits both alike, and each goes first in every other round."""
    times: dict[str, list[float]] = {"dense": [], "packed": []}
    for round_ in range(repeats):
        for way in ("dense", "packed") if round_ % 2 == 0 else ("packed", "dense"):  # neither always first
            for layer in layers:
                layer.rows = limit if way == "packed" else 0
            times[way].append(once(run))
    return {way: min(values) for way, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,16,68,128,256,1058",
                        help="row counts of the per-shape products ('' for none: the model rows only)")
    parser.add_argument("--prompts", default="45,1058", help="prompt lengths (tokens) prefilled at batch 1")
    parser.add_argument("--batches", default="1,16", help="batch sizes of one decoding step")
    parser.add_argument("--repeats", type=at_least_one, default=5)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    record = run_record(args)

    model = load_model(args.model).model  # packed here, small layers too, to show every shape
    pack_linears(model, min_weight=0)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    shapes = sorted({(m.out_features, m.in_features) for m in layers}, reverse=True)
    torch.manual_seed(0)
    rows_out: list[dict] = []
    with torch.inference_mode():
        for out_features, in_features in shapes:
            layer = next(m for m in layers if (m.out_features, m.in_features) == (out_features, in_features))
            for rows in (int(r) for r in args.rows.split(",") if r):
                x = torch.randn(rows, in_features)
                got = side_by_side([layer], partial(layer, x), args.repeats, limit=1 << 30)
                rows_out.append({"what": f"{out_features}×{in_features}", "rows": rows, **got})
                print(rows_out[-1], flush=True)
        big = [m for m in layers if m.weight.numel() >= PACKED_MIN_WEIGHT]  # what load_model packs
        for layer in layers:
            layer.rows = 0
        vocab = int(model.config.get_text_config().vocab_size)
        for length in (int(t) for t in args.prompts.split(",")):
            ids = torch.randint(100, min(vocab, 20000), (1, length))
            got = side_by_side(big, partial(model, ids, logits_to_keep=1), args.repeats)
            rows_out.append({"what": f"prefill of {length} tokens", "rows": length, **got})
            print(rows_out[-1], flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(100, min(vocab, 20000), (batch, 64))
            cache = getattr(model(ids, use_cache=True), cache_argument(type(model)))
            step = torch.randint(100, min(vocab, 20000), (batch, 1))
            position = torch.full((batch, 1), 64)

            got = side_by_side(big, partial(decoding_step, model, step, cache, position), args.repeats)
            rows_out.append({"what": f"decoding step, batch {batch}", "rows": batch, **got})
            print(rows_out[-1], flush=True)

    table = Table(title=f"linear layers: torch's product (dense) and oneDNN-packed · {args.model} · "
                        f"{torch.get_num_threads()} threads · best of {args.repeats}")
    for column in ("what", "rows", "dense ms", "packed ms", "× packed"):
        table.add_column(column, justify="right")
    for row in rows_out:
        row["speedup"] = row["dense"] / row["packed"]
        table.add_row(row["what"], str(row["rows"]), f"{row['dense'] * 1e3:.2f}", f"{row['packed'] * 1e3:.2f}",
                      f"{row['speedup']:.2f}")
    Console(width=120).print(table)
    write_json(args.out, {"model": args.model, "threads": torch.get_num_threads(),
                          "packed_rows": PACKED_ROWS, "repeats": args.repeats, "rows": rows_out, **record})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
