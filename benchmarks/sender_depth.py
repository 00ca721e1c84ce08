"""The sender's prefill when it computes only what it shares, against the whole prefill.

A message holds the context in full at the shared layers and only the sink token above the
deepest of them, so :func:`kvcomm.protocol.shallow.shallow_share` (what ``encode_context``,
``encode_ids`` and the service's ``/v1/contexts`` run) takes the context through that
layer only. This times ``encode_ids`` (prefill, share, fp16 message) both ways on the same
context, alternating, for the layers the service benchmarks share (the middle ``--ratio`` of
the layers), the first ``--ratio`` and every layer, and checks that the two messages' KV agree
(shared layers bit for bit, the sink-only layers within float rounding).

    OMP_NUM_THREADS=1 python benchmarks/sender_depth.py --model qwen2.5-coder-1.5b --lengths 1024 --runs 3 \\
        --out benchmarks/results/sender-depth-qwen.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from record import add_out, check_out, layer_fraction, run_record, write_json  # benchmarks/record.py, beside this file
from rich.console import Console
from rich.table import Table
from ttft import context_of, middle_layers

from kvcomm import encode_ids
from kvcomm.errors import KvcommError
from kvcomm.models.loading import load_model
from kvcomm.protocol import pad_left, prefill, share
from kvcomm.protocol.shallow import depth_needed
from kvcomm.tasks.base import QA_INSTRUCTION, Item, Task
from kvcomm.wire import KVMessage


def whole(model, ids: list[int], layers: list[int]) -> KVMessage:
    """``encode_ids`` as it was: every layer prefilled, then shared."""
    input_ids, valid = pad_left([ids], model.pad_id)
    shared = share(model.model, prefill(model.model, input_ids, valid), layers, "causal")
    return KVMessage.from_shared(shared, model.fingerprint, "fp16", {"sender": model.name})


def largest_difference(a: KVMessage, b: KVMessage) -> tuple[float, float]:
    """Max |Δ| over the shared layers' KV and over the sink-only layers' (decoded, float32)."""
    x, y = a.to_shared(torch.float32), b.to_shared(torch.float32)
    full, sink = 0.0, 0.0
    for layer, shared in enumerate(x.full):
        delta = max((x.keys[layer] - y.keys[layer]).abs().max().item(),
                    (x.values[layer] - y.values[layer]).abs().max().item())
        full, sink = (max(full, delta), sink) if shared else (full, max(sink, delta))
    return full, sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="1024", help="context tokens, comma-separated (the sender's prompt "
                        "adds its template's)")
    parser.add_argument("--ratio", type=layer_fraction, default=0.5, help="fraction of the layers shared")
    parser.add_argument("--runs", type=int, default=3)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be token counts separated by commas, not {args.lengths!r}")
    if not lengths or min(lengths) < 2 or args.runs < 1 or not 0 < args.ratio <= 1:
        parser.error("--lengths must be ≥ 2 tokens, --runs ≥ 1 and 0 < --ratio ≤ 1")
    record = run_record(args)
    try:
        model = load_model(args.model)
    except KvcommError as err:
        parser.error(str(err))
    middle = middle_layers(model.num_layers, args.ratio)
    sets = {"middle": middle, "first": list(range(len(middle))), "every": list(range(model.num_layers))}
    table = Table(title=f"sender prefill + share + fp16 message · {args.model} · median of {args.runs}")
    for column in ("sender prompt tokens", "layers", "deepest", "whole s", "shallow s", "×", "max |Δ| shared",
                   "max |Δ| sink"):
        table.add_column(column, justify="right")
    rows = []
    for length in lengths:
        item = Item("0", context_of(model, length), "", ())
        ids = model.encode_message(Task("encode", [item], 1, QA_INSTRUCTION).sender_message(item))
        encode_ids(model, ids[:16], sets["middle"])  # warm up
        for name, layers in sets.items():
            times: dict[str, list[float]] = {"whole": [], "shallow": []}
            for _ in range(args.runs):  # alternating, so a drift of the machine's speed hits both
                for way, encode in (("whole", whole), ("shallow", encode_ids)):
                    began = time.perf_counter()
                    message = encode(model, ids, layers)
                    times[way].append(time.perf_counter() - began)
                    if way == "whole":
                        reference = message
            full, sink = largest_difference(reference, message)
            depth = depth_needed(layers, "causal", model.num_layers)
            medians = {way: statistics.median(values) for way, values in times.items()}
            rows.append({"context_tokens": len(ids), "layers": name, "shared": layers, "depth": depth,
                         "whole_s": medians["whole"], "shallow_s": medians["shallow"], "times": times,
                         "speedup": medians["whole"] / medians["shallow"], "max_diff_shared": full,
                         "max_diff_sink": sink})
            table.add_row(f"{len(ids):,}", f"{name} ({layers[0]}–{layers[-1]})", f"{depth} of {model.num_layers}",
                          f"{medians['whole']:.3f}", f"{medians['shallow']:.3f}",
                          f"{medians['whole'] / medians['shallow']:.2f}", f"{full:.1e}", f"{sink:.1e}")
    Console(width=140).print(table)
    write_json(args.out, {"model": args.model, "ratio": args.ratio, "runs": args.runs, "rows": rows,
                          **record})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
