"""Two agents on loopback: the sender reads a context, the receiver answers from its KV message.

Starts two `kvcomm serve` processes sharing one message store (a directory here; pass
--store redis://host:port/0 to share through Redis, e.g. across machines), asks the sender to
prefill a context and store its KV at the deeper half of the layers (a sink token elsewhere), and
asks the receiver a question on top of the stored message. With the default model it printed,
in one run (the message's id and size, about 554,000 bytes, vary a little with the versions of
torch and transformers; the round trip depends on the machine; the script prints what it measures):

    context (65 tokens) -> KV message kv-fe0b849b…: 554,096 bytes (int8, layers 15-29 of 30)
    receiver answer: 'The meeting with the Oslo team is scheduled for Tuesday at 10 am.'

The temporary store is removed at the end.

    python examples/two_agents.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

from kvcomm import Client
from kvcomm.selection import format_layers, parse_layers
from kvcomm.serve.launch import agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None, help="shared store (default: a temporary directory)")
    parser.add_argument("--port", type=int, default=0,
                        help="the first agent's port; the others take the next (2 in all, on 127.0.0.1; "
                             "default: free ports the system picks)")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--layers", default="15-29", help="layers shared in full (the rest send one sink token)")
    parser.add_argument("--context", default="The meeting with the Oslo team is on Tuesday at 10 am.")
    parser.add_argument("--question", default="When is the meeting with the Oslo team?")
    args = parser.parse_args()
    ports = [args.port + i if args.port else 0 for i in range(2)]
    with contextlib.ExitStack() as stack:  # left in reverse: clients closed, agents stopped, store removed
        store = args.store or f"disk:{stack.enter_context(tempfile.TemporaryDirectory(prefix='kvcomm-store-'))}"
        first, second = stack.enter_context(agents(args.model, ports, ["--store", store]))
        sender, receiver = stack.enter_context(Client(first)), stack.enter_context(Client(second))
        began = time.perf_counter()
        sent = sender.create_context(args.context, layers=parse_layers(args.layers, None), codec=args.codec)
        reply = receiver.chat([{"role": "user", "content": args.question}], [sent["id"]], max_tokens=24)
        elapsed = time.perf_counter() - began
        depth = sent["fingerprint"]["num_layers"]
    print(f"context ({sent['context_tokens']} tokens) -> KV message {sent['id']}: {sent['bytes']:,} bytes "
          f"({args.codec}, layers {format_layers(sent['layers'])} of {depth})")
    print(f"receiver answer: {reply['choices'][0]['message']['content']!r}")
    print(f"receiver usage: {reply['usage']}; round trip {elapsed:.2f} s")


if __name__ == "__main__":
    main()
