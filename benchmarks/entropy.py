"""The entropy coders alone, on real codes: kvcomm's rANS against constriction, symbols per second.

`benchmarks/codecs.py` times whole messages (framing, checks, the transform, the entropy coder);
this isolates the entropy stage. It prefills a task's contexts, turns every layer's keys and
values into the codes `klt` entropy-codes (Laplace, one scale level per component) and the codes
`int4-ans` entropy-codes (categorical, 4-bit), and times encoding and decoding them with each
coder, on one thread (best of ``--repeats``), checking both round-trip exactly.

    OMP_NUM_THREADS=1 python benchmarks/entropy.py --model smollm2-135m --task tipsheets \\
        --data ../shared/data/tipsheets.jsonl --items 8 --out benchmarks/results/codecs/entropy-smollm2.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from record import add_out, at_least_one, check_out, run_record, write_json  # benchmarks/record.py, beside this file
from rich.console import Console
from rich.table import Table

from kvcomm import Agents, Batch, load_task
from kvcomm.protocol import share
from kvcomm.wire.bootstrap import codebook_from_items
from kvcomm.wire.codecs import klt
from kvcomm.wire.codecs.entropy import ans_decode, ans_encode, laplace_decode, laplace_encode


def klt_codes(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What ``klt`` entropy-codes for one ``[H, T, D]`` tensor: int codes and their scale levels."""
    _, codes, levels = klt.transform_codes(x[:, 1:], basis, mean, 0.5)
    return codes.numpy().ravel(), np.broadcast_to(levels.numpy()[:, None], codes.shape).ravel().copy()


def best(work, repeats: int) -> float:
    fastest = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        fastest = min(fastest, time.perf_counter() - began)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="tipsheets")
    parser.add_argument("--data", default=None)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--repeats", type=at_least_one, default=3)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    record = run_record(args)

    agents = Agents.load(args.model)
    task = load_task(args.task, args.data)
    batch = Batch(agents, task, task.items[: args.items])
    shared = share(agents.sender.model, batch.sender_kv(), range(agents.num_layers))
    book = codebook_from_items(agents.sender, task, task.items[-16:])
    laplace, categorical = [], []
    for i in range(len(batch.items)):
        row = shared.row(i)
        for layer in range(agents.num_layers):
            for x, basis, mean in ((row.keys[layer][0], book.keys[layer], book.key_means[layer]),
                                   (row.values[layer][0], book.values[layer], book.value_means[layer])):
                laplace.append(klt_codes(x, basis, mean))
                low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)  # 4-bit codes per channel
                categorical.append(((x - low) / (high - low).clamp(min=1e-6) * 15).round().to(torch.int64)
                                   .numpy().ravel())
    tables = klt._tables()
    rows = []
    symbols = sum(c.size for c, _ in laplace)
    scales = [klt._scales(torch.from_numpy(levels)) for _, levels in laplace]
    ours = [tables.encode(c, levels) for c, levels in laplace]
    theirs = [laplace_encode(c, s) for (c, _), s in zip(laplace, scales)]
    assert all(np.array_equal(tables.decode(w, levels), c) for w, (c, levels) in zip(ours, laplace))
    assert all(np.array_equal(np.asarray(laplace_decode(lo, hi, s, w)).reshape(c.shape), c)  # both sides round trip
               for (lo, hi, w), s, (c, _) in zip(theirs, scales, laplace))
    rows.append({"stream": "Laplace (klt)", "symbols": symbols,
                 "bytes": {"rans": sum(w.nbytes for w in ours), "constriction": sum(s.nbytes for *_, s in theirs)},
                 "encode_msym_s": {
                     "rans": symbols / 1e6 / best(lambda: [tables.encode(c, v) for c, v in laplace], args.repeats),
                     "constriction": symbols / 1e6 / best(
                         lambda: [laplace_encode(c, s) for (c, _), s in zip(laplace, scales)], args.repeats)},
                 "decode_msym_s": {
                     "rans": symbols / 1e6 / best(lambda: [tables.decode(w, v) for w, (_, v) in zip(ours, laplace)],
                                                  args.repeats),
                     "constriction": symbols / 1e6 / best(
                         lambda: [laplace_decode(lo, hi, s, w) for (lo, hi, w), s in zip(theirs, scales)],
                         args.repeats)}})
    symbols = sum(c.size for c in categorical)
    coded = {coder: [ans_encode(c, coder) for c in categorical] for coder in ("rans", "constriction")}
    assert all(np.array_equal(ans_decode(lo, n, w, c.size, coder), c)
               for coder in coded for (lo, n, w), c in zip(coded[coder], categorical))
    rows.append({"stream": "categorical (4-bit)", "symbols": symbols,
                 "bytes": {coder: sum(w.nbytes for *_, w in streams) for coder, streams in coded.items()},
                 "encode_msym_s": {coder: symbols / 1e6 / best(lambda c=coder: [ans_encode(x, c) for x in categorical],
                                                              args.repeats) for coder in coded},
                 "decode_msym_s": {coder: symbols / 1e6 / best(
                     lambda c=coder: [ans_decode(lo, n, w, x.size, c) for (lo, n, w), x in zip(coded[c], categorical)],
                     args.repeats) for coder in coded}})

    table = Table(title=f"entropy coders · {args.model} · {args.task} · {len(batch.items)} contexts · "
                        f"{torch.get_num_threads()} torch threads · best of {args.repeats}")
    for column in ("stream", "symbols", "bytes rans / constriction", "encode Msym/s rans / constr.",
                   "decode Msym/s rans / constr.", "decode ×"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["stream"], f"{r['symbols']:,}",
                      f"{r['bytes']['rans']:,} / {r['bytes']['constriction']:,}",
                      f"{r['encode_msym_s']['rans']:.1f} / {r['encode_msym_s']['constriction']:.1f}",
                      f"{r['decode_msym_s']['rans']:.1f} / {r['decode_msym_s']['constriction']:.1f}",
                      f"{r['decode_msym_s']['rans'] / r['decode_msym_s']['constriction']:.1f}")
    Console(width=150).print(table)
    write_json(args.out, {"model": args.model, "task": args.task, "items": len(batch.items),
                          "torch_threads": torch.get_num_threads(), "rows": rows, **record})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
