"""Does the gold answer's likelihood on items no search read tell which of two rankings answers
better? For each test item: the receiver's mean log-likelihood per gold-answer token with the top
layers of each ranking (profiles of earlier sweeps) at ratios 0.3, 0.5 and 0.7, and with every
layer; then, paired with those sweeps' scores on the same items, how often a held-out set of N
items, drawn from them, ranks ``prob`` above ``lik`` by each criterion (likelihood, probability).

    python benchmarks/results/selection/heldout-likelihood.py measure countries countries.jsonl 72 \
        benchmarks/results/selection/heldout-qwen-countries.json \
        lik=benchmarks/results/selection/qwen-countries-prune.json \
        prob=benchmarks/results/selection/qwen-countries-prune-probability.json
    python benchmarks/results/selection/heldout-likelihood.py analyse \
        benchmarks/results/selection/heldout-qwen-countries.json

(``measure`` writes after every 8 items; ``--first`` starts at another item, e.g. the held-out
calibration items.)
"""
import argparse
import json
import time

import numpy as np

RATIOS = (0.3, 0.5, 0.7)


def measure(args: argparse.Namespace) -> None:
    from kvcomm import Agents, Batch, load_task
    from kvcomm.selection.likelihood import Scored, answer_ids, answer_loglik
    from kvcomm.selection.rules import top_layers

    profiles = dict(arg.split("=", 1) for arg in args.profiles)
    agents = Agents.load(args.model)
    task = load_task(args.task, args.data)
    sets = {"all": frozenset(range(agents.num_layers))}
    for name, path in profiles.items():
        ranking = json.load(open(path))["profile"]["ranking"]
        sets |= {f"{name}@{ratio}": frozenset(top_layers(ranking, ratio)) for ratio in RATIOS}
    names, rows, began = list(sets), [], time.time()
    items = task.items[args.first:args.first + args.items]
    for start in range(0, len(items), 8):
        read = Batch(agents, task, items[start:start + 8]).reading(1, "chats")
        for i, item in enumerate(items[start:start + 8]):
            scored = Scored(read.kv.row(i), read.prompt.ids[i], answer_ids(agents.receiver, item))
            rows.append({"id": item.id, **dict(zip(names, answer_loglik(agents.receiver.model, scored,
                                                                         [sets[n] for n in names]).tolist()))})
        print(f"{len(rows)}/{len(items)} {time.time() - began:.0f} s", flush=True)
        json.dump({"profiles": profiles, "sets": {n: sorted(v) for n, v in sets.items()}, "items": rows},
                  open(args.out, "w"), indent=1)


def analyse(args: argparse.Namespace) -> None:
    data = json.load(open(args.file))
    rows, profiles = data["items"], data["profiles"]
    ids = [r["id"] for r in rows]
    ratios = sorted({float(key.split("@")[1]) for key in data["sets"] if "@" in key})  # what was measured
    print(f"{len(rows)} items; ratios {ratios}")
    for name, path in profiles.items():
        report = json.load(open(path))
        metric = report["config"]["metric"]
        for ratio in ratios:
            run = next((r for r in report["runs"] if r["label"] == f"kvcomm@{ratio}"), None)
            scores = {i["id"]: i["scores"][metric] for i in run["items"]} if run else {}
            got = [scores[i] for i in ids if i in scores]
            loglik = np.array([r[f"{name}@{ratio}"] for r in rows])
            score = f"{np.mean(got):.3f} (n={len(got)})" if got else "not run"
            print(f"{name}@{ratio}: score {score}, likelihood {loglik.mean():+.3f}, probability "
                  f"{np.exp(loglik).mean():.4f}")
    rng = np.random.default_rng(0)
    for criterion, f in (("likelihood", lambda x: x), ("probability", np.exp)):
        per = {n: np.array([np.mean([f(r[f"{n}@{ratio}"]) for ratio in ratios]) for r in rows]) for n in profiles}
        for n in (4, 8, 16):
            picks = [per["prob"][idx].mean() > per["lik"][idx].mean()
                     for idx in (rng.choice(len(rows), n, replace=False) for _ in range(4000))]
            print(f"{criterion}, {n} held-out items: prob's ranking chosen in {np.mean(picks):.2f} of 4,000 draws")


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
sub = parser.add_subparsers(required=True)
m = sub.add_parser("measure")
for field in ("task", "data", "items", "out"):
    m.add_argument(field, type=int if field == "items" else str)
m.add_argument("profiles", nargs="+", help="name=results.json (names lik and prob are compared)")
m.add_argument("--model", default="qwen2.5-coder-1.5b")
m.add_argument("--first", type=int, default=0)
m.set_defaults(run=measure)
a = sub.add_parser("analyse")
a.add_argument("file")
a.set_defaults(run=analyse)
args = parser.parse_args()
args.run(args)
