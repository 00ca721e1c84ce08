"""Turns sweep results JSON files into the markdown tables that docs/results.md quotes.

    cd benchmarks/results/sweeps && python ../../report.py methods qwen-cty.json qwen-tip.json > methods.md
    python ../../report.py codecs klt-qwen-tip.json > codecs.md
    python ../../report.py modes ../padded/qwen-facts.json > modes.md

``methods``: one row per configuration (score, interval, layers, bytes per item, wall time), and
for every layer selection its difference to random layers at the same ratio, ✗ where it is not above;
``--uncompressed`` leaves out the runs that went through a wire codec.
``codecs``: one row per KV ratio × codec, with the compression against all layers in float16
(from an uncompressed kvcomm run: its bytes per item in the run's dtype and context length give the
bytes of every layer at float16; or the ratio-1.0 run's bytes scaled to float16, halved for float32,
when the items carry no token ids) and the paired score change against the uncompressed run at the
same layers, mask mode, layout and number of senders (two such runs are refused: which one is the
baseline would be a guess); ✓ marks the wire goal (≥ 12× and at most 1 point lower).
``modes``: per ratio, the correct per-layer masks (``causal``) against the paged-engine layouts
(``padded-sink``, ``padded-zero``) of the same run (same layers, layout and senders): paired score
difference and unchanged answers.
``goals``: issue 18's grid for one selection rule (``--rule``, default the default rule, ``prune``): per model, task,
layout and ratio (0.3, 0.5, 0.7), the rule's score against random layers, every layer and the
skyline, runs matched by item id across all the files given (so a rule's own sweep pairs with an
earlier sweep's random and all-layer runs on the same items); the paired differences with 95%
intervals, the share of the skyline, and whether the cell meets the goal: at least random, and
above it outside the interval wherever every layer is. Only runs made on the same items are paired:
a cell is also keyed by the task's options (all but the item count), the data file's sha256, the
dtype, the linear layers and the number of senders (a file from before one was recorded: its
default); files that differ in one of them make separate cells, with a warning naming which file
went where. ``--json`` also writes the grid.
``--pool`` first merges files of the same model and task whose runs share labels and layers (e.g.
a sweep extended to more items), item lists concatenated; files of the same receiver and task that
differ in sender, task options, data, dtype or linear layers are refused, naming which file has
which.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from kvcomm.eval.results import bootstrap_ci, share, share_ci, summarize
from kvcomm.selection import format_layers
from kvcomm.selection.calibrate import DEFAULT_RULE, RULES
from kvcomm.tasks import TASKS

GOAL_RATIO, GOAL_LOSS = 12.0, 0.01
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
COUNT_OPTIONS = ("items",)  # how many items a generated task makes: item i is the same whatever the count


def _options(run: dict) -> dict:
    return run.get("options") or {}  # results of version 1 record none


def _ratio(run: dict) -> float | None:
    """The run's ratio of layers: its options', else (results of version 1 record no options) the
    one its label names (``kvcomm@0.5``, ``random@0.3~seed7``); before, such runs were skipped."""
    if (options := _options(run)) or "options" in run:
        return options.get("ratio")
    found = re.match(r"^[a-z]+@(\d+(?:\.\d+)?)(?![\d,-])", run.get("label", ""))
    return float(found.group(1)) if found else None


def _pieces(run: dict) -> str:
    return _options(run).get("pieces") or "chats"


def _senders(run: dict) -> int:
    return _options(run).get("senders") or 1


def _task_options(cfg: dict) -> tuple[tuple[str, Any], ...]:
    """The options the task's items were made with, less the item count; one a file does not record
    (files from before options were recorded, or before the option existed) is the loader's default,
    the seed the file's recorded task seed."""
    known = TASKS.get(cfg["task"]).options if cfg["task"] in TASKS else {}
    options = {name: default for name, (_, default) in known.items()}
    if "seed" in options and (cfg.get("seeds") or {}).get("task") is not None:
        options["seed"] = cfg["seeds"]["task"]
    options |= cfg.get("task_options") or {}
    return tuple(sorted((name, value) for name, value in options.items() if name not in COUNT_OPTIONS))


def _setup(cfg: dict) -> dict[str, Any]:
    """What besides the models and the task decides whether two files' items (and their KV) can be
    compared: the task's options, the data file, the dtype and the linear layers (missing: the default)."""
    return {"task options": _task_options(cfg), "data": (cfg.get("data") or {}).get("sha256"),
            "dtype": cfg.get("dtype") or "float32", "linear": cfg.get("linear") or "dense"}


def _describe(setup: dict[str, Any], fields: list[str]) -> str:
    def text(field: str) -> str:
        value = setup[field]
        if field == "task options":
            return ", ".join(f"{name}={option}" for name, option in value) or "no task options"
        if field == "data":
            return f"data sha256 {str(value)[:12]}" if value else "no data sha256"
        return f"{field} {value}"

    return " · ".join(text(field) for field in fields)


def _apart(groups: dict[tuple, list[str]], setups: dict[tuple, dict[str, Any]]) -> tuple[list[str], str]:
    """The fields in which ``groups`` (files by setup) differ, and a line naming each group's files."""
    fields = [field for field in next(iter(setups.values())) if len({str(s[field]) for s in setups.values()}) > 1]
    return fields, "; ".join(f"{_describe(setups[key], fields)}: {', '.join(files)}" for key, files in groups.items())


def methods_table(reports: list[dict], uncompressed: bool = False) -> None:
    print("| model | task | n | method | paper F1 [95% CI] | contains | vs random at its ratio | layers | bytes/item "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        cfg = report["config"]
        for run in report["runs"]:
            if uncompressed and run.get("codec"):
                continue
            f1, contains = run["scores"]["paper_f1"], run["scores"]["contains"]
            layers = "–" if run["layers"] is None else format_layers(run["layers"])
            print(f"| {cfg['receiver']} | {cfg['task']} | {run['n']} | {run['label']} | {f1['mean']:.3f} "
                  f"[{f1['ci95'][0]:.2f}, {f1['ci95'][1]:.2f}] | {contains['mean']:.3f} | "
                  f"{against_random(report, run)} | {layers} | "
                  f"{run['kv_bytes_mean']:,.0f} | {run['seconds'] + run['sender_seconds']:.0f} |")


def against_random(report: dict, run: dict) -> str:
    """A selection run's score minus random's at the same fraction of layers, mask mode, layout and
    number of senders (the task's metric); ✗ marks one that is not above random. Empty where there
    is no such pair; two such random runs are refused."""
    if run["method"] not in ("kvcomm", "online") or run.get("fraction") in (None, 1.0) or run.get("codec"):
        return ""
    metric = report["config"]["metric"]
    twins = [r for r in report["runs"] if r["method"] == "random" and r.get("fraction") == run["fraction"]
             and r.get("mode") == run.get("mode") and _pieces(r) == _pieces(run) and _senders(r) == _senders(run)
             and not r.get("codec")]
    if len(twins) > 1:
        raise SystemExit(f"{report['config']['task']}: {' and '.join(r['label'] for r in twins)} are both random at "
                         f"{run['fraction']:g} in {run['label']}'s mode, layout and senders; which one it is "
                         "compared with would be a guess")
    if not twins:
        return ""
    twin = twins[0]
    diff = run["scores"][metric]["mean"] - twin["scores"][metric]["mean"]
    return f"{diff:+.3f}" + ("" if diff > 0 else " ✗ not above random")


def item_scores(run: dict) -> dict[str, float]:
    return {item["id"]: item["scores"]["paper_f1"] for item in run["items"]}


def to_fp16(cfg: dict) -> float:
    """What turns an uncompressed run's bytes (in its dtype; files that do not say: float32) into float16's."""
    dtype = cfg.get("dtype") or "float32"
    if dtype not in ELEMENT_BYTES:
        raise SystemExit(f"{cfg['task']}: runs in {dtype}; the codec table knows the element size of "
                         f"{', '.join(ELEMENT_BYTES)} only")
    return 2 / ELEMENT_BYTES[dtype]


def fp16_all_layers(cfg: dict, plain: list[dict], like: dict | None = None) -> float | None:
    """Mean bytes per item of every layer's KV in float16, from uncompressed kvcomm runs (in the
    file's dtype) read as ``like`` is (its layout and number of senders; default: the file's, one
    sender): the ratio 1.0 causal run's bytes where there is one, else (the paper's layout only: a
    layer not shared sends one sink token) the bytes per token and layer of a run that recorded its
    token ids; None where neither is in the file."""
    scale = to_fp16(cfg)
    pieces, senders = (_pieces(like), _senders(like)) if like is not None else (cfg.get("pieces", "chats"), 1)
    plain = [r for r in plain if _pieces(r) == pieces and _senders(r) == senders]
    full = [r for r in plain if r["fraction"] == 1.0 and (r.get("mode") or "causal") == "causal"]
    if full:
        return full[0]["kv_bytes_mean"] * scale
    if pieces != "chats":  # a layer not shared sends the whole opening: its width is not recorded
        return None
    for run in plain:
        if all(item.get("sender_ids") for item in run["items"]):
            shared, layers = len(run["layers"]), cfg["num_layers"]
            total = 0.0
            for item in run["items"]:  # bytes = per-token-layer bytes * (shared * T + sinks elsewhere)
                tokens = len(item["sender_ids"])
                total += item["kv_bytes"] / (shared * tokens + layers - shared) * layers * tokens * scale
            return total / len(run["items"])
    return None


def baseline_key(run: dict) -> tuple:
    """What an uncompressed run must share with the run it is the baseline of."""
    return tuple(run["layers"]), run.get("mode") or "causal", _pieces(run), _senders(run)


def uncompressed(cfg: dict, runs: list[dict]) -> dict[tuple, dict]:
    """``runs`` (uncompressed) by :func:`baseline_key`; two under one key are refused."""
    out: dict[tuple, dict] = {}
    for run in runs:
        key = baseline_key(run)
        if key in out:
            layers, mode, pieces, senders = key
            raise SystemExit(f"{cfg['receiver']} · {cfg['task']}: {out[key]['label']} and {run['label']} are both "
                             f"uncompressed at layers {format_layers(list(layers))} ({mode}, {pieces}, {senders} "
                             "sender(s)); which one is the baseline would be a guess")
        out[key] = run
    return out


def codecs_table(reports: list[dict]) -> None:
    print("| model | task | n | ratio | layers | codec | bytes/item | × vs fp16 all layers | paper F1 | "
          "Δ vs uncompressed | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        cfg = report["config"]
        kv = [r for r in report["runs"] if r["method"] == "kvcomm" and r["fraction"] is not None]
        in_process = SHORT_DTYPE.get(cfg.get("dtype") or "float32", cfg.get("dtype"))
        plain = uncompressed(cfg, [r for r in kv if r["codec"] is None])
        for run in sorted(kv, key=lambda r: (r["fraction"], r["codec"] or "")):
            # every layer in float16, read as this run is (its layout and senders): a file of several
            # holds one such run each, and the first of them is not every run's reference
            reference = fp16_all_layers(cfg, [r for r in kv if r["codec"] is None], like=run)
            twin = plain.get(baseline_key(run))
            scores, base = item_scores(run), None if twin is None else item_scores(twin)
            delta = None if base is None else sum(scores[i] - base[i] for i in scores) / len(scores)
            ratio = None if reference is None else reference / run["kv_bytes_mean"]
            met = run["codec"] is not None and delta is not None and ratio is not None and ratio >= GOAL_RATIO \
                and delta >= -GOAL_LOSS
            print(f"| {cfg['receiver']} | {cfg['task']} | {run['n']} | {run['fraction']:.2f} | "
                  f"{len(run['layers'])} | {run['codec'] or f'none ({in_process}, in process)'} | "
                  f"{run['kv_bytes_mean']:,.0f} | {'–' if ratio is None else f'{ratio:.1f}'} | "
                  f"{run['scores']['paper_f1']['mean']:.3f} | "
                  f"{'–' if delta is None else f'{delta:+.3f}'} | {'✓' if met else ''} |")


def modes_table(reports: list[dict]) -> None:
    """Per model, task and layers: the correct masks (``causal``) against each other mask mode of the
    same run: score, paired difference with its 95% interval, and how many answers are unchanged."""
    print("| model | task | n | ratio | layers | mode | score | Δ vs causal [95% CI] | answers as causal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        cfg = report["config"]
        metric = cfg["metric"]
        kv = [r for r in report["runs"] if r["method"] == "kvcomm" and not r.get("codec")]
        causal = uncompressed(cfg, [r for r in kv if r["mode"] == "causal"])
        for run in sorted(kv, key=lambda r: (r["fraction"], MODE_ORDER.get(r["mode"], 9))):
            base = causal.get((tuple(run["layers"]), "causal", _pieces(run), _senders(run)))
            if base is None:
                continue
            mine = {i["id"]: i for i in run["items"]}
            pairs = [(mine[i["id"]], i) for i in base["items"] if i["id"] in mine]
            deltas = [a["scores"][metric] - b["scores"][metric] for a, b in pairs]
            same = sum(a["answer"] == b["answer"] for a, b in pairs)
            low, high = bootstrap_ci(deltas)
            delta = "–" if run is base else f"{sum(deltas) / len(deltas):+.3f} [{low:+.3f}, {high:+.3f}]"
            print(f"| {cfg['receiver']} | {cfg['task']} | {len(pairs)} | {run['fraction']:.1f} | "
                  f"{len(run['layers'])}/{cfg['num_layers']} | {run['mode']} | "
                  f"{run['scores'][metric]['mean']:.3f} ({metric}) | {delta} | {same}/{len(pairs)} |")


MODE_ORDER = {"causal": 0, "padded-sink": 1, "padded-zero": 2}



def ranked_on(report: dict) -> set[str]:
    """The items any ranking of ``report`` was made on: those it held out to calibrate, and those
    of a profile it was given (``--profile``: before, only the first were read, so a profile made
    on test items passed as disjoint) or of every rule's profile it used."""
    profiles = [report.get("profile") or {}, *(report.get("profiles") or {}).values()]
    return set(report["config"].get("calibration_items") or ()).union(
        *(profile.get("calibration_items") or () for profile in profiles))


def pooled(reports: list[dict], names: list[str] | None = None) -> list[dict]:
    """Reports of the same model and task merged into one: the runs every file has (same label and
    layers), their items concatenated and every statistic computed again over them (means and
    intervals of every metric, bytes, seconds summed); an item id seen twice is refused, and so are
    files of the same receiver and task from another sender, task options, data, dtype or linear
    layers (:func:`_setup`), naming which file has which."""
    names = names or [f"file {n + 1}" for n in range(len(reports))]
    groups: dict[tuple[str, str], dict[tuple, list[str]]] = {}
    setups: dict[tuple, dict[str, Any]] = {}
    for name, report in zip(names, reports):
        cfg = report["config"]
        setup = {"sender": cfg["sender"]} | _setup(cfg)
        setups[key := tuple(map(str, setup.values()))] = setup
        groups.setdefault((cfg["receiver"], cfg["task"]), {}).setdefault(key, []).append(name)
    for where, files in groups.items():
        if len(files) > 1:
            fields, which = _apart(files, {key: setups[key] for key in files})
            raise SystemExit(f"{' · '.join(where)}: the files differ in {', '.join(fields)}; their items cannot be "
                             f"pooled ({which})")
    holding: dict[tuple[str, str], dict[str, list[str]]] = {}  # the labels of each model and task: who has them
    for name, report in zip(names, reports):
        for run in report["runs"]:
            holding.setdefault((report["config"]["receiver"], report["config"]["task"]), {}).setdefault(
                run["label"], []).append(name)
    for key, labels in holding.items():  # said once each, not silently left out of the tables
        files = {name for holders in labels.values() for name in holders}
        for label, holders in labels.items():
            if missing := sorted(files - set(holders)):
                print(f"warning: {' · '.join(key)}: {label} is not in {', '.join(missing)}: left out of the pool",
                      file=sys.stderr)
    merged: dict[tuple[str, str], dict] = {}
    for name, report in zip(names, reports):
        key = (report["config"]["receiver"], report["config"]["task"])
        if key not in merged:
            merged[key] = copy.deepcopy(report) | {"pooled_from": [name]}
            continue
        merged[key]["pooled_from"].append(name)
        merged[key]["config"]["calibration_items"] = sorted(ranked_on(merged[key]) | ranked_on(report))
        if report["config"].get("codebook") != merged[key]["config"].get("codebook"):
            raise SystemExit(f"{' · '.join(key)}: the files used different codebooks; their items cannot be pooled")
        incoming = {run["label"]: run for run in report["runs"]}
        merged[key]["runs"] = [run for run in merged[key]["runs"] if run["label"] in incoming]
        for run in merged[key]["runs"]:
            if incoming[run["label"]]["layers"] != run["layers"]:
                raise SystemExit(f"{' · '.join(key)}: {run['label']} shares different layers in different files")
            run["items"] += incoming[run["label"]]["items"]
            for clock in ("seconds", "sender_seconds"):
                run[clock] = run.get(clock, 0.0) + incoming[run["label"]].get(clock, 0.0)
    for report in merged.values():
        for run in report["runs"]:
            if len({item["id"] for item in run["items"]}) != len(run["items"]):
                raise SystemExit(f"{report['config']['task']}: {run['label']} has an item twice; nothing pooled")
    for report in merged.values():
        for run in report["runs"]:
            items = run["items"]
            run["n"] = len(items)
            run["kv_bytes_mean"] = sum(item["kv_bytes"] for item in items) / len(items)
            scores = summarize([item["scores"] for item in items])
            run["scores"] = {name: score.model_dump() for name, score in scores.items()}
    return list(merged.values())


GOAL_RATIOS = (0.3, 0.5, 0.7)


def _rule(report: dict, run: dict) -> str:
    """The selection rule a kvcomm run used: its own option, else the profile the file's runs took
    (a ``--profile`` run: that profile's rule), else the file's default (old files: the paper's)."""
    profile = report.get("profile") or {}
    return run["options"].get("selection") or profile.get("rule") or report["config"].get("selection") or "paper"


def _layout(run: dict) -> str:
    """How the context was read (``chats`` or ``passages``), and the mask mode when not the correct one."""
    layout = _pieces(run)
    return layout if run.get("mode", "causal") == "causal" else f"{layout}, {run['mode']}"


def _scores(report: dict, run: dict) -> dict[str, float]:
    metric = report["config"]["metric"]
    return {item["id"]: item["scores"][metric] for item in run["items"]}


def _join(into: dict[str, float], scores: dict[str, float]) -> None:
    """Adds another file's items of the same configuration; an item already there keeps its score."""
    into.update({i: v for i, v in scores.items() if i not in into})


def _model(cfg: dict) -> str:
    return cfg["receiver"] if cfg["sender"] == cfg["receiver"] else f"{cfg['sender']} → {cfg['receiver']}"


def goals_grid(reports: list[dict], rule: str, names: list[str] | None = None) -> list[dict]:
    """One row per model, task, layout and ratio where ``rule`` ran: see the module's docstring.

    Runs of one kind for a cell in several files (e.g. random layers on items 0-89 in one and 90-249
    in another) are joined item by item when they share the same layers (an item in both: the first
    file's score). A run of that kind with other layers (another calibration, another seed) is left
    out, and a warning on stderr names it: the first file given decides. Files of other task
    options, data, dtype or linear layers (:func:`_setup`), and runs of another number of senders,
    make cells of their own: a warning on stderr names the files of each where the model, task and
    layout are the same, and the table tells such cells apart."""
    names = names or [f"file {n + 1}" for n in range(len(reports))]
    cells: dict[tuple, dict] = {}
    skylines: dict[tuple, dict[str, float]] = {}
    for name, report in zip(names, reports):
        cfg = report["config"]
        setup = _setup(cfg)
        same = tuple(map(str, setup.values()))  # the items and their KV are comparable within it
        for run in report["runs"]:
            if run.get("codec"):
                continue
            ratio = _ratio(run)
            if run["method"] == "skyline":  # the context as text: one per receiver and task, whatever the layout
                _join(skylines.setdefault((cfg["receiver"], cfg["task"], same), {}), _scores(report, run))
                continue
            key = (_model(cfg), cfg["task"], _layout(run), same, _senders(run))
            cell = cells.setdefault(key, {"metric": cfg["metric"], "receiver": cfg["receiver"],
                                          "setup": setup | {"senders": _senders(run)}, "files": [],
                                          "calibrated_on": {}})
            if name not in cell["files"]:
                cell["files"].append(name)
            if run["method"] == "kvcomm" and ratio == 1.0:
                kind = "all"
            elif run["method"] == "kvcomm" and ratio in GOAL_RATIOS and _rule(report, run) == rule:
                kind = f"rule@{ratio:g}"
            elif run["method"] == "random" and ratio in GOAL_RATIOS:
                kind = f"random@{ratio:g}"
            else:
                continue
            scores, layers = cell.setdefault(kind, ({}, run.get("layers")))
            if layers == run.get("layers"):  # the same configuration in another file: more items
                _join(scores, _scores(report, run))
                if kind.startswith("rule@"):  # the layers were chosen on these: no test items of theirs
                    cell["calibrated_on"].setdefault(kind, set()).update(ranked_on(report))
            else:
                print(f"warning: {' · '.join(key[:3])}: {run['label']} in {name} shares other layers than the "
                      "first file's run of that kind; left out", file=sys.stderr)
    variants: dict[tuple, dict[tuple, dict]] = {}
    for key, cell in cells.items():
        variants.setdefault(key[:3], {})[key[3:]] = cell
    for where, apart in variants.items():
        if len(apart) > 1:
            fields, which = _apart({key: cell["files"] for key, cell in apart.items()},
                                   {key: cell["setup"] for key, cell in apart.items()})
            print(f"warning: {' · '.join(where)}: runs of other {', '.join(fields)} are not paired; each makes "
                  f"cells of its own ({which})", file=sys.stderr)
            for cell in apart.values():
                cell["variant"] = _describe(cell["setup"], fields)
    rows = []
    for (model, task, layout, same, senders), cell in cells.items():
        skyline = skylines.get((cell["receiver"], task, same))
        # read as one passage by its own model, every layer shared is the skyline's own computation
        # (several passages are each prefilled alone; another sender's KV is its own)
        alike = layout == "passages" and senders == 1 and model == cell["receiver"]
        all_layers = cell["all"][0] if "all" in cell else skyline if alike else None
        for ratio in GOAL_RATIOS:
            if f"rule@{ratio:g}" not in cell:
                continue
            mine, layers = cell[f"rule@{ratio:g}"]
            # the rule's layers were chosen on its files' calibration items: another file's run of the
            # same layers may have tested some of them (joined, the rule would be judged on them)
            calibrated = cell["calibrated_on"].get(f"rule@{ratio:g}", set())
            if dropped := sorted(set(mine) & calibrated):
                print(f"warning: {model} · {task} · {layout} @{ratio:g}: {len(dropped)} item(s) the rule's layers "
                      f"were calibrated on left out ({', '.join(dropped[:4])}{'…' if len(dropped) > 4 else ''})",
                      file=sys.stderr)
                mine = {i: v for i, v in mine.items() if i not in calibrated}
            if not mine:
                continue
            row: dict = {"model": model, "task": task, "layout": layout, "ratio": ratio, "metric": cell["metric"],
                         "layers": layers, "all_is_skyline": "all" not in cell and all_layers is not None,
                         "n": len(mine), "rule": sum(mine.values()) / len(mine)}
            if "variant" in cell:
                row["variant"] = cell["variant"]
            random = cell.get(f"random@{ratio:g}")
            for name, other in (("random", random and random[0]), ("all", all_layers), ("skyline", skyline)):
                ids = [i for i in mine if i in other] if other else []
                if not ids:
                    continue
                a, b = [mine[i] for i in ids], [other[i] for i in ids]
                row[name], row[f"n_{name}"] = sum(b) / len(b), len(ids)
                diff = [x - y for x, y in zip(a, b)]
                row[f"rule_minus_{name}"] = (sum(diff) / len(diff), *bootstrap_ci(diff))
                if name == "skyline":
                    row["share_of_skyline"] = (share(a, b), *share_ci(a, b))
            if "rule_minus_random" in row and all_layers is not None and random is not None:
                both = [i for i in mine if i in random[0] and i in all_layers]
                if both:  # every layer's own lead over random, on the items the rule is judged on
                    lead = [all_layers[i] - random[0][i] for i in both]
                    row["all_minus_random"] = (sum(lead) / len(lead), *bootstrap_ci(lead))
                    row["n_lead"] = len(both)
            row["verdict"] = _verdict(row)
            rows.append(row)
    return rows


MIN_JUDGED = 10
"""Items a cell's rule and random must share before ``goals`` judges it (one item's interval is a point)."""


def _verdict(row: dict) -> str:
    """The goal for one cell: at least random, and above it outside the interval where every layer is."""
    if "rule_minus_random" not in row:
        return "no random run on these items"
    if row["n_random"] < MIN_JUDGED:
        return f"– {row['n_random']} item(s) paired with random: too few to judge"
    diff, low, _ = row["rule_minus_random"]
    if row["rule"] == 0 and row.get("random") == 0 and row.get("all", 0) == 0:
        return "– uninformative: nothing answers"  # ≥ random by 0 = 0, which says nothing of the rule
    if diff < 0:
        return "✗ below random"
    lead = row.get("all_minus_random")
    if lead is None:
        return "≥ random (no all-layer run)"
    if row.get("n_lead", 0) < row["n_random"]:  # a lead on a few items can hide what the rest would show
        return f"≥ random (every layer's lead measured on {row.get('n_lead', 0)} of its {row['n_random']} items only)"
    if lead[1] > 0 and low <= 0:
        return "✗ not outside the interval (every layer is)"
    return "✓"


def goals_table(rows: list[dict], rule: str) -> None:
    def pm(value: tuple[float, float, float] | None) -> str:
        return "–" if value is None else f"{value[0]:+.3f} [{value[1]:+.2f}…{value[2]:+.2f}]"

    def num(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    print(f"| model | task | layout | ratio | n | {rule}: layers | {rule} | random | all layers | skyline | "
          f"{rule} − random | all − random | ÷ skyline | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        share = row.get("share_of_skyline")
        every = num(row.get("all")) + (" (= skyline)" if row["all_is_skyline"] else "")
        paired = {row.get(f"n_{name}", row["n"]) for name in ("random", "all", "skyline")} - {row["n"]}
        n = f"{row['n']}" + (f" (paired: {', '.join(map(str, sorted(paired)))})" if paired else "")
        layers = "–" if row["layers"] is None else format_layers(row["layers"])
        layout = row["layout"] + (f" ({row['variant']})" if "variant" in row else "")
        print(f"| {row['model']} | {row['task']} ({row['metric']}) | {layout} | {row['ratio']:g} | {n} | "
              f"{layers} | "
              f"{row['rule']:.3f} | {num(row.get('random'))} | {every} | {num(row.get('skyline'))} | "
              f"{pm(row.get('rule_minus_random'))} | {pm(row.get('all_minus_random'))} | "
              f"{_share_text(share)} | {row['verdict']} |")


def _finite(value):
    """``value`` with every infinite or undefined float as None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _share_text(share: tuple[float, float, float] | None) -> str:
    """A share of the skyline with its interval; "–" without one, and where the skyline answers nothing."""
    if share is None or not math.isfinite(share[0]):
        return "–" if share is None else "– (the skyline answers nothing)"
    return f"{share[0]:.3f} ({share[1]:.2f}–{share[2]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["methods", "codecs", "modes", "goals"])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--uncompressed", action="store_true", help="methods: skip runs through a wire codec")
    parser.add_argument("--pool", action="store_true", help="merge files of the same model and task first")
    parser.add_argument("--rule", default=DEFAULT_RULE, choices=RULES, help="goals: the selection rule to judge")
    parser.add_argument("--json", type=Path, help="goals: also write the grid here")
    parser.add_argument("--overwrite", action="store_true", help="replace --json where it exists")
    args = parser.parse_args()
    from record import check_out, run_record, write_json  # benchmarks/record.py, beside this file (on the path)

    for option, table, given in (("--json", "goals", args.json is not None), ("--rule", "goals",
                                 args.rule != DEFAULT_RULE), ("--uncompressed", "methods", args.uncompressed)):
        if given and args.table != table:  # before: accepted, and nothing done with it
            parser.error(f"{option} is for the {table} table, not {args.table}")
    check_out(parser, args, option="json")
    reports = [json.loads(path.read_text()) for path in args.paths]
    names = [str(path) for path in args.paths]
    if args.pool:
        reports = pooled(reports, names)
        names = [" + ".join(report["pooled_from"]) for report in reports]
    if args.table == "methods":
        methods_table(reports, args.uncompressed)
    elif args.table == "modes":
        modes_table(reports)
    elif args.table == "goals":
        rows = goals_grid(reports, args.rule, names)
        goals_table(rows, args.rule)
        if args.json:  # the rule judged and the files read beside the rows (a grid of one rule was another's twin)
            write_json(args.json, {"rule": args.rule, "files": names, **run_record(args), "rows": _finite(rows)})
    else:
        codecs_table(reports)


if __name__ == "__main__":
    main()
