"""What a Tipsheets score is made of: answers that list several firms against answers that name one.

The paper's F1 credits an answer that lists several firms whenever the gold one is among them, so a
configuration can score well by listing. This splits each run's answers (from a results JSON) into
those that copy the instruction or name no firm, those that name one firm (their points, and how
many name the right one) and those that list two or more (their points). A firm is named when the
answer holds its first word, or ends on a cut-off start of it ("Lum" for "Lumo LLC").

    python benchmarks/tipsheets_answers.py benchmarks/results/selection/smollm2-tipsheets-prune.json \\
        --data ../shared/data/tipsheets.jsonl --labels skyline,kvcomm@0.5,random@0.5
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

INSTRUCTION = ("you must", "which do you")  # how the receiver's instruction opens, when an answer copies it


def named(answer: str, options: list[str]) -> set[str]:
    """The options ``answer`` names: by their first word, or a cut-off start of it at the very end."""
    words = re.findall(r"[A-Za-z]+", answer)
    tail = words[-1] if words and answer.rstrip().endswith(words[-1]) else ""
    out = set()
    for option in options:
        head = option.split()[0]
        if head in words or (len(tail) >= 2 and head.startswith(tail)):
            out.add(option)
    return out


def split(run: dict, items: dict[str, dict], metric: str = "paper_f1") -> dict[str, float]:
    """One run's answers counted by kind, with their points."""
    out = {"n": 0, "listing": 0, "listing_points": 0.0, "one": 0, "one_points": 0.0, "one_right": 0, "none": 0}
    for item in run["items"]:
        source = items[item["id"]]
        score = item["scores"][metric]
        out["n"] += 1
        if item["answer"].strip().lower().startswith(INSTRUCTION):
            out["none"] += 1
            continue
        firms = named(item["answer"], source["options"])
        if len(firms) >= 2:
            out["listing"] += 1
            out["listing_points"] += score
        elif firms:
            out["one"] += 1
            out["one_points"] += score
            out["one_right"] += source["label"] in firms
        else:
            out["none"] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the Tipsheets JSONL the run read")
    parser.add_argument("--labels", default="", help="comma-separated run labels (default: every run)")
    args = parser.parse_args()
    report = json.loads(args.results.read_text())
    if report["config"]["task"] != "tipsheets":
        raise SystemExit(f"{args.results}: a {report['config']['task']} run, not Tipsheets")
    lines = args.data.read_text().splitlines()
    items = {f"tipsheets_{index:04d}": json.loads(line) for index, line in enumerate(lines) if line.strip()}
    wanted = [label for label in args.labels.split(",") if label]
    runs = {run["label"]: run for run in report["runs"]}
    missing = [label for label in wanted if label not in runs]
    if missing:
        raise SystemExit(f"no run labelled {', '.join(missing)}; the file has {', '.join(runs)}")
    print("| run | paper F1 | answers listing 2+ firms (their points) | naming one firm (points; the right one) "
          "| copying the instruction or naming none |")
    print("|---|---|---|---|---|")
    for label in wanted or list(runs):
        run = runs[label]
        c = split(run, items)
        print(f"| {label} | {run['scores']['paper_f1']['mean']:.3f} | {c['listing']} ({c['listing_points']:.0f}) | "
              f"{c['one']} ({c['one_points']:.0f}; {c['one_right']}) | {c['none']} |")


if __name__ == "__main__":
    main()
