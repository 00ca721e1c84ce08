"""Passages stored once as KV, combined per question, blended so that they attend to each other.

Starts one `kvcomm serve` agent, has it prefill eight short passages once each (stored as KV
passages with their token ids: `create_context(text, passage=True)`, prefilled behind the chat's
opening and kept from position 0), and then answers questions that each need two or three of
them: the passages a question needs are sent as `kv_messages` in any order and read at the start
of the user turn, each as one line, then blended (`kv_blend`: 15% of their tokens recomputed,
chosen where the reused KV deviates most). For comparison it also asks with the passages only
joined (nothing recomputed) and with the same lines as plain text in the user turn (what
recomputing every token gives).

    python examples/blend_passages.py --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse

from kvcomm import Client
from kvcomm.serve.launch import agents

PASSAGES = [
    "Omar works at the Blue Harbor Cafe.",
    "The Blue Harbor Cafe is in Velmora.",
    "Velmora is in Drenland.",
    "Lena lives in Ostrik.",
    "Ostrik is in Kalmeria.",
    "Mira works at the Red Mill Bakery.",
    "The Red Mill Bakery is in Ostrik.",
    "The Red Mill Bakery opens at 6 am.",
]
QUESTIONS = [  # (question, the passages it needs, in the order they are sent, the answer)
    ("Which country does Lena live in? Answer with the country name only.", [4, 3], "Kalmeria"),
    ("In which city does Omar work? Answer with the city name only.", [1, 0], "Velmora"),
    ("In which country does Omar work? Answer with the country name only.", [2, 0, 1], "Drenland"),
    ("In which country does Mira work? Answer with the country name only.", [6, 4, 5], "Kalmeria"),
]


def ask(client: Client, question: str, refs: list[str], blend: float | None) -> str:
    reply = client.chat([{"role": "user", "content": question}], refs, max_tokens=12,
                        kv_blend=None if blend is None else {"ratio": blend})
    return str(reply["choices"][0]["message"]["content"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--port", type=int, default=0, help="the agent's port (default: a free one the system picks)")
    args = parser.parse_args()
    with agents(args.model, [args.port], ["--codec", "fp16"]) as (url,), Client(url, timeout=600) as client:
        ids = [client.create_context(p, passage=True)["id"] for p in PASSAGES]  # each passage prefilled once
        print(f"stored {len(ids)} passages as KV messages")
        for question, needed, gold in QUESTIONS:
            refs = [ids[i] for i in needed]
            lines = "".join(f"{PASSAGES[i]}\n" for i in needed)  # how a chat reads passages: one line each
            as_text = ask(client, lines + question, [], None)
            joined = ask(client, question, refs, 0.0)
            blended = ask(client, question, refs, 0.15)
            print(f"\n{question} (needs passages {needed}; answer: {gold})\n"
                  f"  passages as text:    {as_text!r}\n  KV joined:           {joined!r}\n"
                  f"  KV blended (15%):    {blended!r}")

if __name__ == "__main__":
    main()
