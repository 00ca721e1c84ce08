r"""Receiver time to first token: a KV message fetched over loopback against the context as text.

A sender agent (`kvcomm serve`, a separate process) prefills each context once and stores its KV
message. This process is the receiver and measures, per run:

- kvcomm: HTTP GET of the message over loopback + decode and checks + cache building + prefill
  of the question + the first token;
- skyline: tokenising context and question together + their prefill + the first token.

Then the store's transfer rate (GET of the largest message, by bytes) and request latency under 8
concurrent clients (the median, and the 99th percentile where there are at least 100 requests,
else the maximum). Medians of --runs runs. The sender is started on --port (default: a free one the system picks),
which must be free: a server already there is refused, not measured.

    python benchmarks/ttft.py --model smollm2-135m --lengths 256,1024,4096 --runs 5 \
        --out benchmarks/results/ttft-smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/record.py, beside this file

from record import add_out, at_least_one, check_out, layer_fraction, run_record, write_json  # noqa: E402

from kvcomm import Client, load_model  # noqa: E402
from kvcomm.errors import KvcommError  # noqa: E402
from kvcomm.protocol import empty_input, greedy_generate, pad_left, receiver_input  # noqa: E402
from kvcomm.serve.launch import agents  # noqa: E402
from kvcomm.tasks.loaders import load_task  # noqa: E402
from kvcomm.wire import KVMessage, check_fingerprint  # noqa: E402

QUESTION = "Which city does Omar live in? Answer with the city name only."


def middle_layers(num_layers: int, ratio: float) -> list[int]:
    """The middle ``ratio`` of the layers (at least one): what the service benchmarks share."""
    count = max(1, round(ratio * num_layers))
    first = (num_layers - count) // 2
    return list(range(first, first + count))


def context_of(model, tokens: int) -> str:
    """Generated facts repeated until the context is about ``tokens`` tokens long."""
    facts = " ".join(item.context for item in load_task("facts", items=400, facts_per_item=8).items)
    words = facts.split()
    low, high = 1, len(words)
    while low < high:  # the longest word prefix within the token count
        mid = (low + high + 1) // 2
        if len(model.tokenizer(" ".join(words[:mid]))["input_ids"]) <= tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low]) + " Omar lives in Cairo."


@torch.inference_mode()
def first_token(model, start, ids: list[int]) -> None:
    input_ids, valid = pad_left([ids], model.pad_id)
    greedy_generate(model.model, start, input_ids, valid, 1, model.stop_ids, model.pad_id)


def kvcomm_ttft(model, client: Client, message_id: str) -> float:
    began = time.perf_counter()
    message = KVMessage.from_bytes(client.get_message(message_id))
    check_fingerprint(message.fingerprint, model.fingerprint)
    start = receiver_input(message.to_shared(model.dtype))
    first_token(model, start, model.encode_message(f"Question: {QUESTION}"))
    return time.perf_counter() - began


def skyline_ttft(model, context: str) -> float:
    began = time.perf_counter()
    first_token(model, empty_input(model.model, 1), model.encode_message(f"Context: {context} Question: {QUESTION}"))
    return time.perf_counter() - began


async def concurrent_gets(url: str, message_id: str, clients: int, requests: int) -> list[float]:
    latencies: list[float] = []

    async def worker(http: httpx.AsyncClient) -> None:
        for _ in range(requests):
            began = time.perf_counter()
            (await http.get(f"/v1/messages/{message_id}")).raise_for_status()
            latencies.append(time.perf_counter() - began)

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return latencies


def latency_summary(latencies: list[float]) -> dict[str, float | int]:
    """The median and the tail of request latencies: the 99th percentile where there are at least
    100 samples, else the maximum (fewer samples do not tell a 99th percentile)."""
    ordered = sorted(latencies)
    out: dict[str, float | int] = {"requests": len(ordered), "p50_s": statistics.median(ordered)}
    if len(ordered) >= 100:
        out["p99_s"] = ordered[math.ceil(0.99 * len(ordered)) - 1]  # nearest rank (with 100: not the maximum)
    else:
        out["max_s"] = ordered[-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--codecs", default="int8,fp16")
    parser.add_argument("--ratio", type=layer_fraction, default=0.5, help="fraction of layers shared (middle block)")
    parser.add_argument("--runs", type=at_least_one, default=5)
    parser.add_argument("--port", type=int, default=0, help="the agent's port (default: a free one the system picks)")
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be token counts separated by commas, not {args.lengths!r}")
    if not lengths or min(lengths) < 1:
        parser.error("--lengths must be positive token counts")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    codecs = [c for c in args.codecs.split(",") if c]
    if not codecs:
        parser.error("--codecs must name at least one codec")
    record = run_record(args)

    model = load_model(args.model)
    layers = middle_layers(model.num_layers, args.ratio)
    rows, store = [], {}
    try:  # spawn refuses a port another program holds and holds it itself from before the agent starts
        with agents(args.model, [args.port], ["--max-request-mb", "1024", "--timeout", "3000"]) as (url,), \
                Client(url, timeout=3000) as client:
            first_token(model, empty_input(model.model, 1), model.encode_message("warm up"))
            largest = None
            for length in lengths:
                context = context_of(model, length)
                skyline = statistics.median(skyline_ttft(model, context) for _ in range(args.runs))
                for codec in codecs:
                    sent = client.create_context(context, layers=layers, codec=codec)
                    kv = statistics.median(kvcomm_ttft(model, client, sent["id"]) for _ in range(args.runs))
                    rows.append({"requested_tokens": length, "context_tokens": sent["context_tokens"], "codec": codec,
                                 "message_bytes": sent["bytes"], "kvcomm_ttft_s": kv, "skyline_ttft_s": skyline,
                                 "speedup": skyline / kv})
                    if largest is None or sent["bytes"] > largest["bytes"]:
                        largest = sent
            assert largest is not None
            began = time.perf_counter()
            for _ in range(args.runs):
                client.get_message(largest["id"])
            store["get_mb_s"] = largest["bytes"] * args.runs / 1e6 / (time.perf_counter() - began)
            latencies = asyncio.run(concurrent_gets(url, largest["id"], 8, 8))
            store.update({"concurrent_clients": 8, "message_id": largest["id"], "message_bytes": largest["bytes"],
                          **latency_summary(latencies)})
    except KvcommError as err:  # the agent did not start, or the port is taken
        raise SystemExit(f"error: {err}") from None

    table = Table(title=f"receiver TTFT · {args.model} · {len(layers)}/{model.num_layers} layers shared · "
                        f"median of {args.runs}")
    for column in ("requested tokens", "context tokens", "codec", "message bytes", "kvcomm TTFT s", "skyline TTFT s",
                   "speed-up"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["requested_tokens"]), str(r["context_tokens"]), r["codec"], f"{r['message_bytes']:,}",
                      f"{r['kvcomm_ttft_s']:.3f}", f"{r['skyline_ttft_s']:.3f}", f"{r['speedup']:.1f}x")
    console = Console(width=140)
    console.print(table)
    tail = (f"p99 {store['p99_s'] * 1000:.0f} ms" if "p99_s" in store
            else f"max {store['max_s'] * 1000:.0f} ms (too few requests for a p99)")
    console.print(f"store: GET {store['get_mb_s']:.0f} MB/s (the largest message, {args.runs} GETs); 8 concurrent "
                  f"clients, {store['requests']} requests of {store['message_bytes']:,} bytes: "
                  f"p50 {store['p50_s'] * 1000:.0f} ms, {tail}")
    write_json(args.out, {"model": args.model, "layers": layers, "lengths": lengths, "codecs": codecs,
                          "runs": args.runs, "rows": rows, "store": store, **record})
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
