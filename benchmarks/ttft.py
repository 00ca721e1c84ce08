"""Receiver time to first token: a KV message fetched over loopback against the context as text.

A sender agent (`kvcomm serve`, a separate process) prefills each context once and stores its KV
message. This process is the receiver and measures, per run:

- kvcomm: HTTP GET of the message over loopback + decode and checks + cache building + prefill
  of the question + the first token;
- skyline: tokenising context and question together + their prefill + the first token.

Then the store's transfer rate (GET of the largest message) and request latency under 8
concurrent clients. Medians of --runs runs.

    python benchmarks/ttft.py --model smollm2-135m --lengths 256,1024,4096 --runs 5 \
        --out benchmarks/results/ttft-smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table

from kvcomm import Client, load_model
from kvcomm.protocol import empty_input, greedy_generate, pad_left, receiver_input
from kvcomm.tasks.loaders import load_task
from kvcomm.wire import KVMessage, check_fingerprint

QUESTION = "Which city does Omar live in? Answer with the city name only."


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--codecs", default="int8,fp16")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of layers shared (middle block)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ttft.json"))
    args = parser.parse_args()

    model = load_model(args.model)
    count = max(1, round(args.ratio * model.num_layers))
    first = (model.num_layers - count) // 2
    layers = list(range(first, first + count))
    env = {**os.environ, "KVCOMM_LOG_LEVEL": "warning"}
    sender = subprocess.Popen([sys.executable, "-m", "kvcomm", "serve", "--model", args.model, "--port",
                               str(args.port), "--max-request-mb", "1024", "--timeout", "3000"], env=env)
    url = f"http://127.0.0.1:{args.port}"
    rows, store = [], {}
    try:
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if sender.poll() is not None:
                    raise SystemExit("sender agent exited") from None
                time.sleep(0.5)
        client = Client(url, timeout=3000)
        first_token(model, empty_input(model.model, 1), model.encode_message("warm up"))
        largest = None
        for length in (int(x) for x in args.lengths.split(",")):
            context = context_of(model, length)
            skyline = statistics.median(skyline_ttft(model, context) for _ in range(args.runs))
            for codec in args.codecs.split(","):
                sent = client.create_context(context, layers=layers, codec=codec)
                kv = statistics.median(kvcomm_ttft(model, client, sent["id"]) for _ in range(args.runs))
                rows.append({"context_tokens": sent["context_tokens"], "codec": codec, "message_bytes": sent["bytes"],
                             "kvcomm_ttft_s": kv, "skyline_ttft_s": skyline, "speedup": skyline / kv})
                largest = sent
        began = time.perf_counter()
        for _ in range(args.runs):
            client.get_message(largest["id"])
        store["get_mb_s"] = largest["bytes"] * args.runs / 1e6 / (time.perf_counter() - began)
        latencies = sorted(asyncio.run(concurrent_gets(url, largest["id"], 8, 8)))
        store.update({"concurrent_clients": 8, "message_bytes": largest["bytes"], "requests": len(latencies),
                      "p50_s": latencies[len(latencies) // 2], "p99_s": latencies[min(len(latencies) - 1,
                                                                                     int(0.99 * len(latencies)))]})
    finally:
        sender.terminate()
        sender.wait(timeout=30)

    table = Table(title=f"receiver TTFT · {args.model} · {len(layers)}/{model.num_layers} layers shared · "
                        f"median of {args.runs}")
    for column in ("context tokens", "codec", "message bytes", "kvcomm TTFT s", "skyline TTFT s", "speed-up"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["context_tokens"]), r["codec"], f"{r['message_bytes']:,}", f"{r['kvcomm_ttft_s']:.3f}",
                      f"{r['skyline_ttft_s']:.3f}", f"{r['speedup']:.1f}x")
    console = Console(width=140)
    console.print(table)
    console.print(f"store: GET {store['get_mb_s']:.0f} MB/s; 8 concurrent clients, {store['requests']} requests of "
                  f"{store['message_bytes']:,} bytes: p50 {store['p50_s'] * 1000:.0f} ms, "
                  f"p99 {store['p99_s'] * 1000:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "layers": layers, "runs": args.runs, "rows": rows,
                                    "store": store}, indent=1) + "\n")
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
