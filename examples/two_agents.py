"""Two agents on loopback: the sender reads a context, the receiver answers from its KV message.

Starts two `kvcomm serve` processes sharing one message store (a directory here; pass
--store redis://host:port/0 to share through Redis, e.g. across machines), asks the sender to
prefill a context, and asks the receiver a question on top of the stored message.

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


def start(model: str, port: int, store: str) -> subprocess.Popen:
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
    parser.add_argument("--context", default="Mira lives in Oslo. Omar lives in Cairo. Lena lives in Lima.")
    parser.add_argument("--question", default="Which city does Omar live in? Answer with the city name only.")
    args = parser.parse_args()
    store = args.store or f"disk:{tempfile.mkdtemp(prefix='kvcomm-store-')}"
    agents = [start(args.model, 8101, store), start(args.model, 8102, store)]
    try:
        with Client("http://127.0.0.1:8101") as sender, Client("http://127.0.0.1:8102") as receiver:
            began = time.perf_counter()
            sent = sender.create_context(args.context, codec=args.codec)
            reply = receiver.chat([{"role": "user", "content": args.question}], [sent["id"]], max_tokens=16)
            elapsed = time.perf_counter() - began
        print(f"context ({sent['context_tokens']} tokens) -> KV message {sent['id']}: {sent['bytes']:,} bytes "
              f"({args.codec}, layers {sent['layers'][0]}..{sent['layers'][-1]})")
        print(f"receiver answer: {reply['choices'][0]['message']['content']!r}")
        print(f"receiver usage: {reply['usage']}; round trip {elapsed:.2f} s")
    finally:
        for process in agents:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
