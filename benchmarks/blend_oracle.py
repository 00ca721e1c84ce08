"""How far can any token choice take blend? An oracle bound on the multi-hop passages.

Blend (``kvcomm.protocol.blend``) chooses the tokens to recompute by their KV deviation at an
early check layer, before it knows what a full prefill would give. The oracle here knows: it runs
the full prefill of the joined context and chooses each row's tokens by their value deviation
from it, summed over every layer (each layer's deviation scaled by that layer's mean squared value,
so that no layer's scale dominates), then recomputes them exactly as blend does
(``recompute_tokens``). Nobody can deploy it (it costs a full prefill); it bounds what a better
choice of tokens could recover at a given ratio. Same items, same passages, one run:

- ``blend@R``: the rule (deviation on values at check layer 1), R in ``--ratios``;
- ``oracle@R``: the oracle's tokens, the same R;
- full reuse (``blend@0``) and full recompute (``blend@1``).

    python benchmarks/blend_oracle.py --model qwen2.5-coder-1.5b --items 33 \\
        --out benchmarks/results/blend/oracle-qwen.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import add_out, check_out, command, run_record, write_json  # noqa: E402  (benchmarks/record.py, beside this file)

from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method  # noqa: E402
from kvcomm.methods.base import METHODS, Output  # noqa: E402
from kvcomm.methods.blend import BlendMethod  # noqa: E402
from kvcomm.protocol.blend import (  # noqa: E402
    _fresh_until,
    blendable,
    recompute_tokens,
    top_fraction,
)
from kvcomm.tasks.multihop import DISTRACTOR_KINDS  # noqa: E402


def oracle_tokens(model, joined, ratio: float, exact: int | torch.Tensor = 0) -> torch.Tensor:
    """``[B, C]``: each row's top ``floor(ratio · n)`` context tokens by value deviation from a full
    prefill of the joined context, summed over the layers (each scaled by its mean squared value),
    among the tokens blend chooses from: those after each row's first ``exact`` (an opening that
    is already a full prefill's), so that the same ratio is the same number of tokens."""
    valid = joined.valid[0]
    fresh_k, fresh_v = _fresh_until(model, joined.token_ids, valid, joined.positions[0], joined.num_layers - 1)
    score = torch.zeros(valid.shape, dtype=torch.float64)
    for layer in range(joined.num_layers):
        old = joined.values[layer].float()
        scale = old.pow(2).sum(dim=(1, 3)).clamp(min=1e-9).mean(dim=1, keepdim=True)
        score += ((fresh_v[layer].float() - old).pow(2).sum(dim=(1, 3)) / scale).double()
    return top_fraction(score, blendable(valid, exact), ratio)  # chosen as blend chooses, from another score


@METHODS.register("blend-oracle")
class OracleBlend(BlendMethod):
    """Blend with the oracle's tokens (this benchmark only: it needs a full prefill)."""

    name = "blend-oracle"

    @property
    def label(self) -> str:
        return "oracle" + super().label.removeprefix("blend")

    def run(self, batch) -> Output:
        o = self.options
        joined, sent = self._joined(batch, o.senders, o.pieces)
        model = batch.agents.receiver.model
        exact = batch.sender_pieces(o.senders, o.pieces)[0].context_len if o.pieces == "passages" else 0  # as blend
        blended, stats = recompute_tokens(model, joined, oracle_tokens(model, joined, o.ratio, exact))
        self._record(stats)
        return self._answer(batch, blended, sent, o.senders, o.pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--items", type=int, default=33, help="generated items (one is held out for calibration)")
    parser.add_argument("--pieces", type=int, default=4)
    parser.add_argument("--facts-per-piece", type=int, default=2)
    parser.add_argument("--filler", type=int, default=0, help="sentences per piece that link to nothing")
    parser.add_argument("--distractor-kind", choices=DISTRACTOR_KINDS, default="pairs",
                        help="distractors that are hops of other pairs, or facts that link to nothing")
    parser.add_argument("--ratios", default="0.15,0.3,0.5")
    parser.add_argument("--batch-size", type=int, default=8)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    ratios = [float(r) for r in args.ratios.split(",")]
    record = run_record(args)
    agents = Agents.load(args.model)
    task = load_task("multihop", items=args.items, pieces=args.pieces, facts_per_piece=args.facts_per_piece,
                     filler_per_piece=args.filler, distractor_kind=args.distractor_kind)
    shape = dict(senders=args.pieces, pieces="passages")
    methods = [make_method("blend", ratio=r, **shape) for r in (0.0, 1.0, *ratios)]
    methods += [make_method("blend-oracle", ratio=r, **shape) for r in ratios]
    report = evaluate(agents, task, methods, EvalConfig(calib_size=1, batch_size=args.batch_size), command=command())
    metric = report.config["metric"]
    table = Table(title=f"multihop · {args.model} · n={report.config['test_items']} · {metric}")
    for column in ("method", metric, "95% CI", "recomputed tokens"):
        table.add_column(column, justify="left" if column == "method" else "right")
    rows = []
    for run in report.runs:
        score, details = run.scores[metric], run.details or {}
        recomputed = f"{details.get('mean_recomputed_tokens', 0):.0f}/{details.get('mean_context_tokens', 0):.0f}"
        table.add_row(run.label, f"{score.mean:.3f}", f"{score.ci95[0]:.2f}–{score.ci95[1]:.2f}", recomputed)
        rows.append({"method": run.label, "score": score.mean, "ci95": list(score.ci95), "recomputed": recomputed,
                     "per_item": [item.scores[metric] for item in run.items]})
    Console(width=120).print(table)
    write_json(args.out, {"model": args.model, "items": report.config["test_items"], "metric": metric,
                          "pieces": args.pieces, "facts_per_piece": args.facts_per_piece,
                          "filler_per_piece": args.filler, "distractor_kind": args.distractor_kind,
                          "rows": rows, **record})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
