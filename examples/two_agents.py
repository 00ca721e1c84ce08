"""Two agents on loopback: the sender reads a context, the receiver answers from its KV message.

Starts two `kvcomm serve` processes sharing one message store (a directory here; pass
--store redis://host:port/0 to share through Redis, e.g. across machines), asks the sender to
prefill a context and store its KV at the deeper half of the layers (a sink token elsewhere), and
asks the receiver a question on top of the stored message. With the default model it prints
(measured; the round trip depends on the machine):

    context (65 tokens) -> KV message kv-e4913545…: 553,662 bytes (int8, layers 15-29 of 30)
    receiver answer: 'The meeting with the Oslo team is scheduled for Tuesday at 10 am.'

    python examples/two_agents.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import httpx

from kvcomm import Client
from kvcomm.selection import format_layers, parse_layers


def start(model: str, port: int, store: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "kvcomm", "serve", "--model", model, "--port", str(port), "--store", store]
    process = subprocess.Popen(command, env={**os.environ, "KVCOMM_LOG_LEVEL": "warning"})
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            if process.poll() is not None:
                raise SystemExit(f"agent on port {port} exited with {process.returncode}") from None
            time.sleep(0.5)
    raise SystemExit(f"agent on port {port} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None, help="shared store (default: a temporary directory)")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--layers", default="15-29", help="layers shared in full (the rest send one sink token)")
    parser.add_argument("--context", default="The meeting with the Oslo team is on Tuesday at 10 am.")
    parser.add_argument("--question", default="When is the meeting with the Oslo team?")
    args = parser.parse_args()
    store = args.store or f"disk:{tempfile.mkdtemp(prefix='kvcomm-store-')}"
    agents = [start(args.model, 8101, store), start(args.model, 8102, store)]
    try:
        with Client("http://127.0.0.1:8101") as sender, Client("http://127.0.0.1:8102") as receiver:
            began = time.perf_counter()
            sent = sender.create_context(args.context, layers=parse_layers(args.layers, None), codec=args.codec)
            reply = receiver.chat([{"role": "user", "content": args.question}], [sent["id"]], max_tokens=24)
            elapsed = time.perf_counter() - began
            depth = sent["fingerprint"]["num_layers"]
        print(f"context ({sent['context_tokens']} tokens) -> KV message {sent['id']}: {sent['bytes']:,} bytes "
              f"({args.codec}, layers {format_layers(sent['layers'])} of {depth})")
        print(f"receiver answer: {reply['choices'][0]['message']['content']!r}")
        print(f"receiver usage: {reply['usage']}; round trip {elapsed:.2f} s")
    finally:
        for process in agents:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
