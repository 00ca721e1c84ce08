"""Turns sweep results JSON files into one markdown table (what docs/results.md quotes).

    python benchmarks/report.py results/sweep-*.json > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvcomm.selection import format_layers


def main(paths: list[str]) -> None:
    print("| model | task | n | method | paper F1 [95% CI] | contains | layers | bytes/item | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        report = json.loads(Path(path).read_text())
        cfg = report["config"]
        for run in report["runs"]:
            f1, contains = run["scores"]["paper_f1"], run["scores"]["contains"]
            layers = "–" if run["layers"] is None else format_layers(run["layers"])
            print(f"| {cfg['receiver']} | {cfg['task']} | {run['n']} | {run['label']} | {f1['mean']:.3f} "
                  f"[{f1['ci95'][0]:.2f}, {f1['ci95'][1]:.2f}] | {contains['mean']:.3f} | {layers} | "
                  f"{run['kv_bytes_mean']:,.0f} | {run['seconds'] + run['sender_seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
