"""KVComm and DroidSpeak on one variant pair, both directions: quality, bytes and receiver TTFT.

For a pair of models of one shape (e.g. two derived fine-tunes of one base, ``kvcomm models
derive``) and each direction sender → receiver, on the same test items:

- baseline (receiver alone), skyline (receiver reads the context as text);
- kvcomm across the variants at ratios 0.3/0.5/0.7/1.0 (the run's ranking) and at the bytes
  droidspeak sends (``kvcomm@eq``: as many layers as fit in droidspeak's bytes per token);
- droidspeak with the block profiled on the calibration items (cap ``--max-recompute``).

Then, at about ``--ttft-tokens`` context tokens, the receiver's time to first token (medians of
``--runs``): skyline (prefill of context and question), kvcomm@1 and droidspeak, each from an fp16
message's bytes (decode and checks + the block's recompute + the question's prefill + one token).
Each direction's block profile is also drawn (``<out>-blocks-<sender>-to-<receiver>.png``).

    python benchmarks/droidspeak.py --pair smollm2-135m-terse,smollm2-135m-lowercase --task facts \\
        --items 108 --calib-size 8 --out benchmarks/results/droidspeak/smollm2-facts.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, at_least_one, check_out, command, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method  # noqa: E402
from kvcomm.eval.plot_profiles import plot_blocks  # noqa: E402
from kvcomm.protocol import empty_input, greedy_generate, pad_left, prefill, receiver_input, share  # noqa: E402
from kvcomm.protocol.droidspeak import recompute_block, send_block  # noqa: E402
from kvcomm.selection.blocks import BlockProfile, profile_blocks  # noqa: E402
from kvcomm.wire import KVMessage  # noqa: E402

RATIOS = (0.3, 0.5, 0.7, 1.0)
QUESTION = "Which city does Omar live in? Answer with the city name only."


def equal_bytes_layers(agents: Agents, block: tuple[int, int]) -> int:
    """Layers kvcomm can share in droidspeak's bytes per token (KV outside the block + one hidden state)."""
    config = agents.receiver.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer = 2 * config.num_key_value_heads * head_dim
    sent = (agents.num_layers - (block[1] - block[0])) * per_layer + config.hidden_size
    return max(1, min(agents.num_layers, round(sent / per_layer)))


def quality(agents: Agents, task: Any, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    config = EvalConfig(limit=args.limit, calib_size=args.calib_size, batch_size=args.batch_size)
    _, calib = config.split(task.items)
    blocks = profile_blocks(agents, task, calib, args.max_recompute, args.batch_size, objective=args.objective)
    picked = blocks.pick(args.tolerance)
    equal = equal_bytes_layers(agents, (picked.start, picked.stop))
    methods = [make_method("baseline"), make_method("skyline"),
               *(make_method("kvcomm", ratio=r) for r in RATIOS),
               make_method("droidspeak", max_recompute=args.max_recompute, tolerance=args.tolerance)]
    if equal / agents.num_layers not in RATIOS:
        methods.append(make_method("kvcomm", ratio=equal / agents.num_layers))
    report = evaluate(agents, task, methods, config, blocks=blocks, command=command())
    metric = report.config["metric"]
    rows = []
    for run in report.runs:
        score = run.scores[metric]
        rows.append({"label": run.label, "score": score.mean, "ci95": list(score.ci95), "kv_bytes": run.kv_bytes_mean,
                     "layers": run.layers, "receiver_seconds": run.seconds, "sender_seconds": run.sender_seconds,
                     "equal_bytes": run.fraction is not None and round(run.fraction * agents.num_layers) == equal
                     and run.method == "kvcomm"})
    table = Table(title=f"{agents.sender.name} → {agents.receiver.name} · {task.name} · n={report.config['test_items']}"
                        f" · {metric} (95% CI) · block {picked.start}:{picked.stop} "
                        f"({picked.stop - picked.start}/{agents.num_layers} layers recomputed)")
    for column in ("method", metric, "bytes/item", "receiver s", "sender s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        mark = " (= droidspeak's bytes)" if row["equal_bytes"] else ""
        table.add_row(row["label"] + mark, f"{row['score']:.3f} ({row['ci95'][0]:.2f}–{row['ci95'][1]:.2f})",
                      f"{row['kv_bytes']:,.0f}", f"{row['receiver_seconds']:.1f}", f"{row['sender_seconds']:.1f}")
    console.print(table)
    return {"metric": metric, "test_items": report.config["test_items"], "calibration_items": len(calib),
            "block": [picked.start, picked.stop], "pick": picked.model_dump(), "equal_bytes_layers": equal,
            "block_profile": blocks.model_dump(), "runs": rows}


def context_of(agents: Agents, tokens: int) -> str:
    """Generated facts until the context is about ``tokens`` tokens long, ending with the answer's fact."""
    facts = " ".join(item.context for item in load_task("facts", items=400, facts_per_item=8).items).split()
    low, high = 1, len(facts)
    while low < high:
        mid = (low + high + 1) // 2
        if len(agents.sender.tokenizer(" ".join(facts[:mid]))["input_ids"]) <= tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(facts[:low]) + " Omar lives in Cairo."


@torch.inference_mode()
def ttft(agents: Agents, block: tuple[int, int], tokens: int, runs: int) -> dict[str, Any]:
    sender, receiver = agents.sender, agents.receiver
    context = context_of(agents, tokens)
    ids = sender.encode_message(f"Context: {context}")
    input_ids, valid = pad_left([ids], sender.pad_id)
    kv = prefill(sender.model, input_ids, valid, [block[0]])
    messages = {
        "kvcomm@1": KVMessage.from_shared(share(sender.model, kv, range(agents.num_layers)), sender.fingerprint,
                                          "fp16").to_bytes(),
        f"droidspeak[{block[0]}:{block[1]}]": KVMessage.from_shared(send_block(kv, *block), sender.fingerprint,
                                                                    "fp16").to_bytes(),
    }
    question = receiver.encode_message(f"Question: {QUESTION}")

    def first(start: Any, prompt: list[int]) -> None:
        q_ids, q_valid = pad_left([prompt], receiver.pad_id)
        greedy_generate(receiver.model, start, q_ids, q_valid, 1, receiver.stop_ids, receiver.pad_id)

    def skyline() -> float:
        began = time.perf_counter()
        first(empty_input(receiver.model, 1), receiver.encode_message(f"Context: {context} Question: {QUESTION}"))
        return time.perf_counter() - began

    def from_message(data: bytes, recompute: bool) -> float:
        began = time.perf_counter()
        shared = KVMessage.from_bytes(data, receiver=receiver.fingerprint).to_shared(receiver.dtype)
        if recompute:
            shared = recompute_block(receiver.model, shared, *block)
        first(receiver_input(shared), question)
        return time.perf_counter() - began

    skyline()  # warm up
    out: dict[str, Any] = {"context_tokens": len(ids), "runs": runs,
                           "skyline_s": statistics.median(skyline() for _ in range(runs))}
    for label, data in messages.items():
        seconds = statistics.median(from_message(data, label.startswith("droidspeak")) for _ in range(runs))
        out[label] = {"message_bytes": len(data), "ttft_s": seconds, "speedup": out["skyline_s"] / seconds}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", required=True, help="A,B: two models of one shape; runs A→B and B→A")
    parser.add_argument("--task", default="facts")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--items", type=int, default=108, help="generated tasks: how many items to make")
    parser.add_argument("--limit", type=int, default=None, help="test items (default: all but calibration)")
    parser.add_argument("--calib-size", type=int, default=8)
    parser.add_argument("--max-recompute", type=float, default=0.25)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--objective", choices=["own", "gold"], default="own",
                        help="what profiled blocks are scored by: the receiver's own answer, or the gold answer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ttft-tokens", type=int, default=1024, help="0: skip the TTFT measurement")
    parser.add_argument("--runs", type=at_least_one, default=5)
    parser.add_argument("--one-way", action="store_true", help="only A→B")
    add_out(parser)
    args = parser.parse_args()
    if len(pair := args.pair.split(",")) != 2 or not all(pair):
        parser.error(f"--pair is two models, SENDER,RECEIVER (names, folders or files), not {args.pair!r}")
    a, b = pair
    from kvcomm.errors import ModelError
    from kvcomm.eval.outputs import safe_name
    from kvcomm.models.source import resolve_model

    directions = [(a, b)] if args.one_way else [(a, b), (b, a)]
    # a pair given as folders names its plot by the models' names, not their paths (a '/' in the name failed)
    plots = {(s, r): args.out.with_name(f"{args.out.stem}-blocks-{safe_name(s)}-to-{safe_name(r)}.png")
             for s, r in directions}
    check_out(parser, args, written=[args.out, *plots.values()])  # the plots are replaced only with --overwrite too

    for name in (a, b):  # before any work: a variant not derived here yet
        try:
            resolve_model(name)
        except ModelError as err:
            parser.error(f"{err} (a variant pair is derived on this machine first: kvcomm models derive …, see "
                         "the README)")
    generated = {"items": args.items} if args.task in ("facts", "multihop") else {}
    task = load_task(args.task, args.data, **generated)
    console = Console(width=200)
    results: dict[str, Any] = {"pair": [a, b], "task": task.name, "args": {k: str(v) for k, v in vars(args).items()},
                               "torch_threads": torch.get_num_threads(), "directions": [], **run_record(args)}
    for sender, receiver in directions:
        agents = Agents.load(sender, receiver)
        direction = {"sender": sender, "receiver": receiver, **quality(agents, task, args, console)}
        if args.ttft_tokens:
            direction["ttft"] = ttft(agents, tuple(direction["block"]), args.ttft_tokens, args.runs)
            t = direction["ttft"]
            console.print(f"TTFT at {t['context_tokens']} tokens (median of {t['runs']}): skyline "
                          f"{t['skyline_s'] * 1000:.0f} ms; " + "; ".join(
                              f"{label} {v['ttft_s'] * 1000:.0f} ms ({v['speedup']:.2f}×, {v['message_bytes']:,} B)"
                              for label, v in t.items() if isinstance(v, dict)), markup=False)
        results["directions"].append(direction)
        write_json(args.out, results)  # after each direction: partial results survive
        plot_blocks(BlockProfile.model_validate(direction["block_profile"]), plots[sender, receiver], args.tolerance)
    console.print(f"results: {args.out}", markup=False)


if __name__ == "__main__":
    main()
