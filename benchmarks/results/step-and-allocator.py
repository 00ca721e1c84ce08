"""Issue 19 part 6: the one-thread Countries run (kvcomm@0.5, the paper rule, batch 64) with the
decoding step's attention and the allocator thresholds of 2026-11-24 switched off and on, each
variant in its own process, one torch thread, in float32 and bfloat16. Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/results/step-and-allocator.py ../shared/data/countries.jsonl \\
        benchmarks/results/item-cost-step-allocator.json

Variants: ``before`` (the SDPA kernel for one-token queries, glibc's adaptive allocator), ``step``
(the float32 one-query path for bfloat16 models; float32 models are untouched by it), ``both``
(that and ``KVCOMM_MALLOC=keep``). Rounds alternate the order; answers are compared with each
dtype's ``before``. Each run's peak and final resident size are recorded too (the JSON of
2026-11-24 morning predates them; ``item-cost-step-allocator-memory.json`` has them, one round).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys
from argparse import Namespace
from kvcomm.protocol import attention
dtype, variant, data, benchmarks = sys.argv[1:5]
sys.path.insert(0, benchmarks)
from item_cost import one_run  # the per-item benchmark's own run, so the setup is the same
if variant == "before":
    attention.REDUCED = ()
run = one_run(Namespace(model="smollm2-135m", task="countries", data=data, items=199, ratio=0.5, batch=64,
                        dtype=dtype, threads=1, no_bucket=False))
print(json.dumps({"dtype": dtype, "variant": variant, "seconds": run["seconds"], "sender": run["sender_seconds"],
                  "receiver": run["receiver_seconds"], "n": run["items"], "peak_rss_gib": run["peak_rss_gib"],
                  "end_rss_gib": run["end_rss_gib"], "answers": run["answers"]}))
"""

BENCHMARKS = str(Path(__file__).resolve().parents[1])  # where item_cost.py lives
data, out = sys.argv[1], Path(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
rows = []
for r in range(rounds):
    for dtype in ("float32", "bfloat16"):
        variants = ("before", "step", "both") if r % 2 == 0 else ("both", "step", "before")
        for variant in variants:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "KVCOMM_MALLOC": "keep" if variant == "both" else "system"}
            done = subprocess.run([sys.executable, "-c", CHILD, dtype, variant, data, BENCHMARKS], env=env,
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["round"] = r
            rows.append(row)
            memory = f"  peak RSS {row['peak_rss_gib']:.2f} GiB, at the end {row['end_rss_gib']:.2f}" \
                if "peak_rss_gib" in row else ""
            print(f"round {r} {dtype:8} {variant:6} {row['seconds']:6.1f} s  sender {row['sender']:5.1f}  "
                  f"receiver {row['receiver']:5.1f}{memory}", flush=True)

print("\n| dtype | variant | seconds (each round) | mean | × official (122 s) | answers equal to before |")
print("|---|---|---|---|---|---|")
summary = []
for dtype in ("float32", "bfloat16"):
    base = next(row["answers"] for row in rows if row["dtype"] == dtype and row["variant"] == "before")
    for variant in ("before", "step", "both"):
        mine = [row for row in rows if row["dtype"] == dtype and row["variant"] == variant]
        mean = sum(row["seconds"] for row in mine) / len(mine)
        equal = min(sum(a == b for a, b in zip(row["answers"], base)) for row in mine)
        summary.append({"dtype": dtype, "variant": variant, "seconds": [row["seconds"] for row in mine],
                        "mean": mean, "answers_equal": equal, "n": mine[0]["n"]})
        each = ", ".join(f"{row['seconds']:.1f}" for row in mine)
        print(f"| {dtype} | {variant} | {each} | {mean:.1f} | "
              f"{122 / mean:.2f} | {equal}/{mine[0]['n']} |")
out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}, indent=1))
