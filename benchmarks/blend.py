"""Composing KV pieces: quality against the fraction recomputed, and receiver TTFT against full recompute.

**Quality** (``quality``): on the generated multi-hop task (each hop in another piece, 4 pieces by
default) and optionally the paper's tasks split in pieces, in one run: the skyline (the receiver
reads everything as text), full recompute (``blend@1``: every token), full reuse (``blend@0``:
pieces only joined; also ``kvcomm@1xN`` with chats), prefix reuse (first piece reused, the rest
recomputed), and ``blend`` at each ratio (deviation on values), plus keys and both at 0.15. Pieces
are passages of the receiver's own prompt by default (``--layout passages``: full recompute is then
the skyline's prompt itself) or sender chats (``--layout chats``). Prints the table with 95%
intervals and the paired difference to full recompute, writes the results JSON and a plot of
score against the fraction recomputed.

**TTFT** (``ttft``): 4 pieces of about N tokens each, stored as KV messages (fp16). Full recompute
= prefill of every piece's tokens and the question + first token; blend = decode the 4 messages +
join (re-rotation) + blend + question prefill + first token. Median of ``--runs``.

    python benchmarks/blend.py quality --model qwen2.5-coder-1.5b --items 104 --out benchmarks/results/blend/qwen.json
    python benchmarks/blend.py ttft --model qwen2.5-coder-1.5b --lengths 256,1024 \\
        --out benchmarks/results/blend/ttft-qwen.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, at_least_one, check_out, command, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, EvalConfig, KVMessage, evaluate, load_model, load_task, make_method  # noqa: E402
from kvcomm.errors import KvcommError  # noqa: E402
from kvcomm.eval.results import Report  # noqa: E402
from kvcomm.protocol import (  # noqa: E402
    concat_shared,
    empty_input,
    greedy_generate,
    pad_left,
    prefill,
    receiver_input,
    share,
)
from kvcomm.protocol.blend import blend  # noqa: E402
from kvcomm.tasks.multihop import DISTRACTOR_KINDS  # noqa: E402

RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)


def quality_methods(pieces: int, layout: str, ratios: tuple[float, ...] = RATIOS,
                    deviations: tuple[str, ...] = ("keys", "both")) -> list:
    built = [make_method("skyline"), make_method("baseline"), make_method("prefix", senders=pieces, pieces=layout)]
    if layout == "chats":  # full reuse through KVComm's own path (blend@0 is the same answers)
        built.append(make_method("kvcomm", ratio=1.0, senders=pieces))
    built += [make_method("blend", ratio=r, senders=pieces, pieces=layout) for r in ratios]
    built += [make_method("blend", ratio=0.15, senders=pieces, deviation=d, pieces=layout) for d in deviations]
    return built


def blend_label(ratio: float, pieces: int, layout: str) -> str:
    return f"blend@{ratio:g}x{pieces}" + ("/passages" if layout == "passages" else "")


def paired(report: Report, a: str, b: str) -> tuple[float, float, float]:
    metric = report.config["metric"]
    runs = {run.label: run for run in report.runs}
    diff = np.array([x.scores[metric] - y.scores[metric] for x, y in zip(runs[a].items, runs[b].items)])
    means = diff[np.random.default_rng(0).integers(0, len(diff), (2000, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def quality_table(report: Report, full: str) -> Table:
    metric = report.config["metric"]
    out = Table(title=Text(f"{report.config['task']} · {report.config['receiver']} · n={report.config['test_items']} "
                           f"· {metric}; paired difference to full recompute ({full})"))
    for column in ("method", metric, "95% CI", "Δ vs full recompute [95% CI]", "recomputed tokens", "flops"):
        out.add_column(column, justify="left" if column == "method" else "right")
    for run in report.runs:
        score, details = run.scores[metric], run.details or {}
        d, low, high = paired(report, run.label, full)
        recomputed = f"{details['mean_recomputed_tokens']:.0f}/{details['mean_context_tokens']:.0f}" \
            if "mean_recomputed_tokens" in details else "-"
        flops = f"{details['mean_flops_fraction']:.2f}" if "mean_flops_fraction" in details else "-"
        out.add_row(Text(run.label), f"{score.mean:.3f}", f"{score.ci95[0]:.2f}–{score.ci95[1]:.2f}",
                    Text(f"{d:+.3f} [{low:+.2f}, {high:+.2f}]"), recomputed, flops)  # literal: labels hold [k]
    return out


def plot(reports: list[Report], pieces: int, layout: str, path: Path, ratios: tuple[float, ...] = RATIOS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for report in reports:
        metric = report.config["metric"]
        by = {run.label: run.scores[metric] for run in report.runs}
        means = [by[blend_label(r, pieces, layout)].mean for r in ratios]
        low = [by[blend_label(r, pieces, layout)].ci95[0] for r in ratios]
        high = [by[blend_label(r, pieces, layout)].ci95[1] for r in ratios]
        line = ax.plot(ratios, means, marker="o", label=f"blend · {report.config['receiver']}")[0]
        ax.fill_between(ratios, low, high, alpha=0.12, color=line.get_color())
        ax.axhline(by["skyline"].mean, linestyle="--", color=line.get_color(), linewidth=1,
                   label=f"skyline · {report.config['receiver']} ({by['skyline'].mean:.2f})")
    ax.set(xlabel="fraction of context tokens recomputed", ylabel=reports[0].config["metric"], ylim=(0, None),
           title=f"{reports[0].config['task']}: {pieces} {'passages' if layout == 'passages' else 'sender chats'}, "
                 "each prefilled alone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_quality(args: argparse.Namespace) -> None:
    try:
        ratios = tuple(sorted({0.0, 1.0, *(float(r) for r in args.ratios.split(",") if r.strip())}))  # both ends
    except ValueError:
        sys.exit(f"error: --ratios must be numbers separated by commas, not {args.ratios!r}")
    deviations = tuple(d.strip() for d in args.deviations.split(",") if d.strip())
    if "values" in deviations:
        sys.exit("error: --deviations lists the signals run besides values (values runs at every ratio)")
    if (args.filler or args.distractor_kind != "pairs") and args.tasks != "multihop":
        print("note: --filler and --distractor-kind apply to the multihop task only", file=sys.stderr)
    try:  # every bad option refused before the model loads, in one line
        quality_methods(args.pieces, args.layout, ratios, deviations)
    except KvcommError as err:
        sys.exit(f"error: {err}")
    agents = Agents.load(args.model)
    console = Console(width=200)
    reports = []
    generated = {"pieces": args.pieces, "facts_per_piece": args.facts_per_piece, "filler_per_piece": args.filler,
                 "distractor_kind": args.distractor_kind}
    written: list[Path] = []
    for task_name in args.tasks.split(","):
        if task_name == "multihop":
            task = load_task("multihop", items=args.items, **generated)
        else:
            task = load_task(task_name, args.data / f"{task_name}.jsonl")
        # the one ranking this run reads is kvcomm@1xN's (chats), all layers, which any ranking serves:
        # the paper's rule, the cheapest (one forward per calibration item; the default rule searches)
        config = EvalConfig(limit=args.limit, calib_size=1, batch_size=args.batch_size, selection="paper")
        report = evaluate(agents, task, quality_methods(args.pieces, args.layout, ratios, deviations), config,
                          command=command())
        console.print(quality_table(report, blend_label(1, args.pieces, args.layout)))
        out = args.out.with_name(f"{args.out.stem}-{task_name}.json")
        report.save(out)
        reports.append(report)
        written.append(out)
        if task_name == "multihop":
            plot([report], args.pieces, args.layout, out.with_suffix(".png"), ratios)
            written.append(out.with_suffix(".png"))
    console.print(f"written (one file per task, named after --out): {', '.join(map(str, written))}", markup=False)


def pieces_of(model, tokens: int, count: int) -> list[str]:
    """``count`` passages of about ``tokens`` tokens each, made of generated multi-hop facts."""
    facts = " ".join(i.context for i in load_task("multihop", items=400, pieces=4, facts_per_piece=6).items).split()
    out, at = [], 0
    for _ in range(count):
        low, high = 1, len(facts) - at
        while low < high:
            mid = (low + high + 1) // 2
            if len(model.tokenizer(" ".join(facts[at:at + mid]))["input_ids"]) <= tokens:
                low = mid
            else:
                high = mid - 1
        out.append(" ".join(facts[at:at + low]))
        at += low
    return out


def time_median(fn, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.inference_mode()
def measure(model, tokens: int, question: list[int], recompute: float, runs: int) -> dict:
    """Full recompute against blending four ~``tokens``-token pieces stored as fp16 messages."""
    ids = [model.encode_message(f"Instruction: read this. Context: {t}") for t in pieces_of(model, tokens, 4)]
    messages = []
    for piece in ids:
        tensor = torch.tensor([piece])
        kv = prefill(model.model, tensor, torch.ones_like(tensor, dtype=torch.bool))
        messages.append(KVMessage.from_shared(share(model.model, kv, range(model.num_layers)), model.fingerprint,
                                              "fp16").to_bytes())

    def full() -> None:
        whole, valid = pad_left([sum(ids, []) + question], model.pad_id)
        greedy_generate(model.model, empty_input(model.model, 1), whole, valid, 1, model.stop_ids, model.pad_id)

    def blended() -> None:
        parts = [KVMessage.from_bytes(m, receiver=model.fingerprint).to_shared(model.dtype) for m in messages]
        cache, _ = blend(model.model, concat_shared(model.model, parts), recompute)
        q, valid = pad_left([question], model.pad_id)
        greedy_generate(model.model, receiver_input(cache), q, valid, 1, model.stop_ids, model.pad_id)

    slow, fast = time_median(full, runs), time_median(blended, runs)
    return {"pieces": 4, "tokens_per_piece": tokens, "context_tokens": sum(len(i) for i in ids),
            "message_bytes": sum(len(m) for m in messages), "full recompute s": slow, f"blend@{recompute:g} s": fast,
            "speed-up": slow / fast}


def run_ttft(args: argparse.Namespace) -> None:
    if not 0 <= args.recompute <= 1:  # before, refused inside blend, after the full recompute's timing
        sys.exit(f"error: --recompute is a fraction of the context's tokens, 0 to 1, not {args.recompute:g}")
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        sys.exit(f"error: --lengths must be token counts separated by commas, not {args.lengths!r}")
    record = run_record(args)
    model = load_model(args.model)
    question = model.encode_message("Which country does Omar live in? Answer with the country name only.")
    rows = [measure(model, n, question, args.recompute, args.runs) for n in lengths]
    table = Table(title=f"receiver TTFT · {args.model} · 4 pieces · median of {args.runs}")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else f"{v:,}" for v in r.values()])
    Console(width=200).print(table)
    write_json(args.out, {"model": args.model, "threads": torch.get_num_threads(), "rows": rows, **record})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["quality", "ttft"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="multihop", help="multihop, countries, tipsheets (comma-separated)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--items", type=int, default=104)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--pieces", type=int, default=4)
    parser.add_argument("--facts-per-piece", type=int, default=3)
    parser.add_argument("--filler", type=int, default=0,
                        help="multihop: sentences per piece that link to nothing (0: the facts alone)")
    parser.add_argument("--distractor-kind", choices=DISTRACTOR_KINDS, default="pairs",
                        help="multihop: distractors that are hops of other pairs, or facts that link to nothing "
                             "(the asked pair the only link)")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS),
                        help="quality: blend ratios (0 and 1, full reuse and full recompute, are always run)")
    parser.add_argument("--deviations", default="keys,both",
                        help="quality: other deviation signals run at 0.15 besides values ('' for none)")
    parser.add_argument("--layout", choices=["chats", "passages"], default="passages",
                        help="pieces as sender chats, or as passages of the receiver's own prompt (retrieval's layout)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--recompute", type=float, default=0.15)
    parser.add_argument("--runs", type=at_least_one, default=3)
    add_out(parser)
    args = parser.parse_args()
    if args.what == "quality":  # one results file per task, named after --out (and the multihop plot)
        per_task = [args.out.with_name(f"{args.out.stem}-{name}.json") for name in args.tasks.split(",")]
        check_out(parser, args, per_task + [path.with_suffix(".png") for path in per_task if "multihop" in path.stem])
    else:
        check_out(parser, args)
    run_quality(args) if args.what == "quality" else run_ttft(args)


if __name__ == "__main__":
    main()
