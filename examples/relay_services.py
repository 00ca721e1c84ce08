"""Three agents in three processes pass a relay along as KV: each reply travels as a KV message.

Starts three `kvcomm serve` agents that share one message store (a directory here; pass --store
redis://host:port/0 to share through Redis, e.g. across machines; the temporary directory is
removed at the end). Each item of the generated
3-hop relay task gives agent i one hop ("Bela's friend is Nadia." among other people's friends).
Agent 1 answers its hop and asks its service to keep the turn as KV (`kv_return`); agent 2 hears
that turn through `kv_messages` (the stored id: the KV of agent 1's prompt and reply, read before
agent 2's chat, which continues that conversation), answers its hop and returns its own turn;
agent 3 hears agent 2 and answers the question. The same chain with the replies as text runs
beside it. Prints each hop, the bytes each KV message weighed, and the accuracy on the items run.

    python examples/relay_services.py --model qwen2.5-coder-1.5b --items 8
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

from kvcomm import Client, load_task
from kvcomm.serve.launch import agents
from kvcomm.tasks import contains


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None, help="shared store (default: a temporary directory)")
    parser.add_argument("--port", type=int, default=0,
                        help="the first agent's port; the others take the next (3 in all, on 127.0.0.1; "
                             "default: free ports the system picks)")
    parser.add_argument("--codec", default="fp16")
    parser.add_argument("--items", type=int, default=4)
    args = parser.parse_args()
    task = load_task("relay", items=args.items, hops=3)
    right = {"kv": 0, "text": 0}
    ports = [args.port + i if args.port else 0 for i in range(3)]
    with contextlib.ExitStack() as stack:  # left in reverse: clients closed, agents stopped, store removed
        store = args.store or f"disk:{stack.enter_context(tempfile.TemporaryDirectory(prefix='kvcomm-store-'))}"
        urls = stack.enter_context(agents(args.model, ports, ["--store", store]))
        clients = [stack.enter_context(Client(url)) for url in urls]
        for item in task.items:
            heard: list[str] = []  # the previous agent's stored turn (KV chain)
            said = ""  # the previous agent's reply (text chain)
            kv_replies, text_replies, sizes = [], [], []
            for hop, (client, piece, ask) in enumerate(zip(clients, item.pieces, item.asks)):
                prompt = f"Instruction: {task.instruction} Context: {piece} Question: {ask}"
                keep = {"content": "turn", "codec": args.codec} if hop < 2 else None
                reply = client.chat(user(prompt), heard, max_tokens=task.max_new_tokens, kv_return=keep)
                kv_replies.append(reply["choices"][0]["message"]["content"])
                if keep is not None:
                    heard = [reply["kv_message"]["id"]]
                    sizes.append(reply["kv_message"]["bytes"])
                message = f"Message from agent{hop}: {said} " if hop else ""
                text = client.chat(user(f"Instruction: {task.instruction} Context: {piece} {message}Question: {ask}"),
                                   max_tokens=task.max_new_tokens)
                said = text["choices"][0]["message"]["content"]
                text_replies.append(said)
            right["kv"] += int(contains(kv_replies[-1], item.answers))
            right["text"] += int(contains(text_replies[-1], item.answers))
            print(f"{item.question}  (hops {' → '.join(item.ask_answers)})\n"
                  f"  KV chain:   {' → '.join(kv_replies)}   messages {', '.join(f'{s:,} B' for s in sizes)}\n"
                  f"  text chain: {' → '.join(text_replies)}")
    print(f"\ncorrect on {len(task.items)} items: KV chain {right['kv']}, text chain {right['text']}")


if __name__ == "__main__":
    main()
