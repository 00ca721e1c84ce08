r"""Codecs on real KV: size against float16, reconstruction error, encode and decode throughput.

Prefills the sender on a task's contexts, shares every layer, and passes each item's KV through
every codec as a whole KV message (header, framing and checksums included). Throughput is MB of
float16 KV per second (the same yardstick for every codec), on one process of this machine, the
best of ``--repeats`` passes (the codecs take turns, pass by pass). Entropy-coded codecs run once
per entropy coder in ``--coders`` (``rans``: today's, format versions 8 and 9; ``rans-v7``, ``rans-v6``,
``rans-v5``: versions 7, 6 and 5; ``constriction``: the coder of versions 1–4), side by side.
"decode" reads whole messages (``KVMessage.from_bytes``: every frame first, then every payload's
tensors, then the codec's calls two at a time when torch has two threads); "streamed" reads them
layer by layer, as a streaming receiver does (each large layer's keys and values side by side).
The ``constriction`` rows run today's reader around the old coder; ``benchmarks/decode_release.py``
measures an older commit's own code instead.

    python benchmarks/codecs.py --model qwen2.5-coder-1.5b --task tipsheets \
        --data ../shared/data/tipsheets.jsonl --items 16 --out benchmarks/results/codecs-qwen.json
"""

from __future__ import annotations

import argparse
import functools
import io
import time
from dataclasses import replace

import torch
from record import add_out, at_least_one, check_out, run_record, write_json  # benchmarks/record.py, beside this file
from rich.console import Console
from rich.table import Table

from kvcomm import Agents, Batch, load_task
from kvcomm.models.allocator import allocator_state
from kvcomm.protocol import share
from kvcomm.wire import PRESETS, KVMessage, MessageReader, make_codec
from kvcomm.wire.bootstrap import codebook_from_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--data", default=None)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--codecs", default=",".join(sorted(PRESETS)))
    parser.add_argument("--codebook-items", type=int, default=16,
                        help="contexts from the end of the task that build the klt codebook")
    parser.add_argument("--context-tokens", type=int, default=0,
                        help="instead of the task's contexts, --items copies of one generated context of about "
                             "this many tokens (benchmarks/ttft.py's), e.g. 1024")
    parser.add_argument("--coders", default="rans", help="entropy coders to run entropy-coded codecs with, "
                        "e.g. rans,rans-v7,constriction")
    parser.add_argument("--repeats", type=at_least_one, default=3, help="passes per codec; the fastest is reported")
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    record = run_record(args)

    agents = Agents.load(args.model)
    task = load_task(args.task, args.data)
    items = task.items[: args.items]
    if args.context_tokens:
        from ttft import context_of  # benchmarks/ttft.py

        context = context_of(agents.sender, args.context_tokens)
        items = [replace(item, context=context) for item in items]
    batch = Batch(agents, task, items)
    shared = share(agents.sender.model, batch.sender_kv(), range(agents.num_layers))
    rows = [shared.row(i) for i in range(len(batch.items))]
    fp16_bytes = sum(int(r.kv_bytes[0]) // 2 for r in rows)  # the model runs in float32
    codebook = functools.cache(lambda: codebook_from_items(agents.sender, task, task.items[-args.codebook_items:]))
    results = []
    runs = []
    for name in args.codecs.split(","):
        coded = make_codec(name).entropy_coded and "coder" in make_codec(name).params()
        runs += [(f"{name} ({c})", make_codec(name, coder=c)) for c in args.coders.split(",")] if coded \
            else [(name, make_codec(name))]
    messages = {name: [KVMessage.from_shared(r, agents.sender.fingerprint, unbound.bind(codebook)) for r in rows]
                for name, unbound in runs}
    encode_s, decode_s = dict.fromkeys(messages, float("inf")), dict.fromkeys(messages, float("inf"))
    streamed_s = dict.fromkeys(messages, float("inf"))
    for _ in range(args.repeats):  # the codecs take turns, so that a slow spell of the machine hits them alike
        for name in messages:
            began = time.perf_counter()
            blobs = [m.to_bytes() for m in messages[name]]
            encode_s[name] = min(encode_s[name], time.perf_counter() - began)
            began = time.perf_counter()
            decoded = [KVMessage.from_bytes(b) for b in blobs]
            decode_s[name] = min(decode_s[name], time.perf_counter() - began)
            del decoded
            began = time.perf_counter()  # layer by layer, as a streaming receiver reads
            streamed = [list(MessageReader(io.BytesIO(b)).layers()) for b in blobs]
            streamed_s[name] = min(streamed_s[name], time.perf_counter() - began)
            del streamed
    for name, _ in runs:
        codec = messages[name][0].codec
        blobs = [m.to_bytes() for m in messages[name]]
        decoded = [KVMessage.from_bytes(b) for b in blobs]
        error, cosine, count = 0.0, 0.0, 0
        for original, back in zip(messages[name], decoded):
            for a, b in zip(original.layers, back.layers):
                for x, y in ((a.keys, b.keys), (a.values, b.values)):
                    error += ((x - y).norm() / x.norm().clamp(min=1e-12)).item()
                    cosine += torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
                    count += 1
        size = sum(len(b) for b in blobs)
        results.append({
            "codec": name, "params": codec.params(), "bytes": size, "ratio_vs_fp16": fp16_bytes / size,
            "relative_error": error / count, "cosine": cosine / count,
            "encode_mb_s": fp16_bytes / 1e6 / encode_s[name], "decode_mb_s": fp16_bytes / 1e6 / decode_s[name],
            "decode_streamed_mb_s": fp16_bytes / 1e6 / streamed_s[name],
        })

    what = f"{args.context_tokens}-token generated context" if args.context_tokens else args.task
    table = Table(title=f"codecs · {args.model} · {what} · {len(rows)} contexts, all "
                        f"{agents.num_layers} layers · fp16 KV {fp16_bytes / 1e6:.2f} MB · "
                        f"{torch.get_num_threads()} torch threads · best of {args.repeats}")
    for column in ("codec", "bytes", "× vs fp16", "rel. error", "cosine", "encode MB/s", "decode MB/s",
                   "streamed MB/s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["codec"], f"{r['bytes']:,}", f"{r['ratio_vs_fp16']:.2f}", f"{r['relative_error']:.4f}",
                      f"{r['cosine']:.5f}", f"{r['encode_mb_s']:.1f}", f"{r['decode_mb_s']:.1f}",
                      f"{r['decode_streamed_mb_s']:.1f}")
    Console(width=140).print(table)
    write_json(args.out, {"model": args.model, "task": args.task, "context_tokens": args.context_tokens,
                          "items": len(rows),
                          "fp16_bytes": fp16_bytes, "torch_threads": torch.get_num_threads(),
                          "repeats": args.repeats, "allocator": allocator_state(),
                          "codecs": results, **record})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
