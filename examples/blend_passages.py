"""Passages stored once as KV, combined per question, blended so that they attend to each other.

Starts one `kvcomm serve` agent, has it prefill eight short passages once each (stored as KV
messages with their token ids), and then answers questions that each need two or three of the
passages: the passages a question needs are sent as `kv_messages` in any order, joined with
consistent positions, and blended (`kv_blend`: 15% of their tokens recomputed, chosen where the
reused KV deviates most). For comparison it also asks with the passages only joined (nothing
recomputed) and with the passages as plain text in the prompt.

    python examples/blend_passages.py --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse

import httpx

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


def ask(http: httpx.Client, question: str, refs: list[str], blend: float | None) -> str:
    body: dict = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "kv_messages": refs}
    if blend is not None:
        body["kv_blend"] = {"ratio": blend}
    reply = http.post("/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return str(reply.json()["choices"][0]["message"]["content"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--port", type=int, default=8103)
    args = parser.parse_args()
    with agents(args.model, [args.port], ["--codec", "fp16"]) as (url,), Client(url) as client, \
            httpx.Client(base_url=url) as http:
        ids = [client.create_context(p)["id"] for p in PASSAGES]  # each passage prefilled once
        print(f"stored {len(ids)} passages as KV messages")
        for question, needed, gold in QUESTIONS:
            refs = [ids[i] for i in needed]
            text = " ".join(PASSAGES[i] for i in needed)
            as_text = ask(http, f"Context: {text} Question: {question}", [], None)
            joined = ask(http, question, refs, 0.0)
            blended = ask(http, question, refs, 0.15)
            print(f"\n{question} (needs passages {needed}; answer: {gold})\n"
                  f"  passages as text:    {as_text!r}\n  KV joined:           {joined!r}\n"
                  f"  KV blended (15%):    {blended!r}")

if __name__ == "__main__":
    main()
