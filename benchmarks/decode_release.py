r"""Decoding speed against the code of an earlier day: the same KV, encoded and decoded by both.

Issue 19 asks for entropy decoding "10× faster than today", and ``benchmarks/codecs.py``'s
``constriction`` rows are only a stand-in for that day's decoder: they run today's reader (its
frames, checksums, tensor loading and two decoding lanes) around the old entropy coder, so every
improvement to the reader speeds them up too. This script measures the day's own code instead:

1. the sender prefills a generated context of about ``--context-tokens`` tokens
   (``benchmarks/ttft.py``'s) for ``--items`` rows and shares every layer; the float32 KV is
   written to a temporary folder;
2. ``git archive`` exports the ``--baseline`` commit's ``kvcomm`` package beside it (default: the
   commit before kvcomm's own rANS coder, the code issue 19 was filed against);
3. a child process per code (``benchmarks/release_child.py``; ``PYTHONPATH`` chooses the code)
   encodes the KV as whole messages with each codec, in its own format version;
4. each round, for each codec, a child decodes that code's messages (``KVMessage.from_bytes``,
   best of ``--repeats``), the baseline's then this checkout's, so that a slow spell of the shared
   machine hits both alike. Both children get the memory thresholds this checkout's
   ``load_model`` sets (``models/allocator.py``), through glibc's environment variables;
5. the KV each code decoded is compared: whether every value has the same bits, and the largest
   absolute difference.

Speeds are MB of float16 KV per second; the ratio is per round. Needs a git checkout (for the
baseline) and the model.

    python benchmarks/decode_release.py --model smollm2-135m --context-tokens 1024 --items 2 \
        --codecs int4-ans,int2-ans,cachegen --rounds 3 --out benchmarks/results/codecs/release.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from record import add_out, at_least_one, check_out, run_record, write_json  # benchmarks/record.py, beside this file
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from kvcomm import Agents, Batch, load_task
from kvcomm.errors import KvcommError
from kvcomm.models.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD
from kvcomm.protocol import share
from kvcomm.wire import KVMessage, make_codec
from kvcomm.wire.codecs import Codec

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("release_child.py")
CHILD_TIMEOUT_S = 1800  # one child: imports, and --repeats decodes of the messages
CHILDREN_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
BASELINE = "15c6fa3^"  # the last commit before kvcomm's own rANS coder: issue 19's "today"


def export(revision: str, into: Path) -> str:
    """``revision``'s ``kvcomm`` package under ``into``; its full commit hash."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                                check=True, capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "kvcomm"], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or ""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        raise SystemExit(f"cannot export {revision!r} from {ROOT} (a git checkout is needed): "
                         f"{detail.strip() or err}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return commit


def write_kv(args: argparse.Namespace, folder: Path) -> int:
    """The rows' float32 KV and what a message needs besides, in ``folder``; the float16 bytes of that KV."""
    from ttft import context_of  # benchmarks/ttft.py

    agents = Agents.load(args.model)
    task = load_task("facts", None)
    context = context_of(agents.sender, args.context_tokens)
    batch = Batch(agents, task, [replace(item, context=context) for item in task.items[: args.items]])
    shared = share(agents.sender.model, batch.sender_kv(), range(agents.num_layers))
    fp16_bytes = 0
    for i in range(len(batch.items)):
        row = shared.row(i)
        message = KVMessage.from_shared(row, agents.sender.fingerprint, make_codec("fp16"))
        fp16_bytes += int(row.kv_bytes[0]) // 2  # the model runs in float32
        tensors = {}
        for layer in message.layers:
            tensors[f"{layer.index}.keys"] = layer.keys.float().contiguous()
            tensors[f"{layer.index}.values"] = layer.values.float().contiguous()
        save_file(tensors, str(folder / f"kv-{i}.safetensors"))
        (folder / f"kv-{i}.json").write_text(json.dumps({
            "fingerprint": dict(message.fingerprint), "context_len": message.context_len,
            "sink_position": message.sink_position, "mode": message.mode,
            "full": [layer.full for layer in message.layers]}))
    return fp16_bytes


def compare(then: Path, now: Path) -> tuple[bool, float]:
    """Whether two codes decoded the same KV to the same float32 bits (every tensor of the same
    shape, every value's bits equal: a NaN or a signed zero counts), and the largest absolute
    difference (NaN where either holds a NaN)."""
    a, b = load_file(str(then)), load_file(str(now))
    if a.keys() != b.keys():
        raise SystemExit(f"{then.name}: the two codes decoded different layers")
    same, largest = True, 0.0
    for key in a:
        if a[key].shape != b[key].shape:
            raise SystemExit(f"{then.name}: {key} decoded as {tuple(a[key].shape)} and {tuple(b[key].shape)}")
        same = same and torch.equal(a[key].view(torch.int32), b[key].view(torch.int32))
        if a[key].numel():
            gap = float((a[key] - b[key]).abs().max())
            largest = gap if math.isnan(gap) or math.isnan(largest) else max(largest, gap)
    return same, largest


def child(code: Path, *arguments: str) -> dict[str, Any]:
    """Runs ``release_child.py`` with ``code`` first on the path; what it reports (its last line of
    output, JSON), once every ``kvcomm`` module it loaded came from ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code), **CHILDREN_MALLOC}
    try:
        done = subprocess.run([sys.executable, str(CHILD), *arguments], env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{CHILD.name} {' '.join(arguments)} with {code} ran past {CHILD_TIMEOUT_S} s") from None
    if done.returncode:
        raise SystemExit(f"{CHILD.name} {' '.join(arguments)} with {code} failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if report["strays"]:
        raise SystemExit(f"{CHILD.name} with {code} ran modules from elsewhere: {', '.join(report['strays'])}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context-tokens", type=at_least_one, default=1024)
    parser.add_argument("--items", type=at_least_one, default=2, help="rows (messages) of the generated context")
    parser.add_argument("--codecs", default="int4-ans,int2-ans,cachegen",
                        help="codecs both codes have (not klt or auto, which bind to the sender)")
    parser.add_argument("--baseline", default=BASELINE, help="the older commit (default: issue 19's day)")
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument("--repeats", type=at_least_one, default=10, help="decodes per child; the fastest counts")
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    codecs = args.codecs.split(",")
    for name in codecs:
        try:
            bound = type(make_codec(name)).bind is not Codec.bind  # klt (a codebook), auto (its candidates)
        except KvcommError as err:
            parser.error(f"--codecs: {err}")
        if bound:
            parser.error(f"--codecs: {name} needs binding to the sender (a codebook); pick codecs without")
    record = run_record(args)

    with tempfile.TemporaryDirectory(prefix="kvcomm-release-") as tmp:
        folder = Path(tmp)
        baseline = folder / "baseline"
        commit = export(args.baseline, baseline)
        (folder / "kv").mkdir()
        fp16_bytes = write_kv(args, folder / "kv")
        codes = {"baseline": baseline, "current": ROOT}
        for label, code in codes.items():
            child(code, "encode", str(folder / "kv"), str(folder / label), *codecs)
            print(f"encoded with the {label} code", flush=True)
        seconds: dict[str, dict[str, list[float]]] = {name: {label: [] for label in codes} for name in codecs}
        size: dict[str, dict[str, int]] = {name: {} for name in codecs}
        for round_ in range(args.rounds):
            for name in codecs:
                for label, code in codes.items():
                    out = child(code, "decode", str(folder / label), name, str(args.repeats))
                    seconds[name][label].append(out["seconds"])
                    size[name][label] = out["bytes"]
                ratio = seconds[name]["baseline"][-1] / seconds[name]["current"][-1]
                print(f"round {round_ + 1}/{args.rounds} {name}: {ratio:.2f}×", flush=True)
        compared = {name: compare(*(folder / label / f"decoded-{name}.safetensors" for label in codes))
                    for name in codecs}

    results = []
    for name in codecs:
        ratios = [b / c for b, c in zip(seconds[name]["baseline"], seconds[name]["current"])]
        results.append({
            "codec": name, "bytes": size[name],
            "decode_mb_s": {label: [fp16_bytes / 1e6 / s for s in runs] for label, runs in seconds[name].items()},
            "ratio_per_round": ratios, "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
            "same_bits": compared[name][0], "largest_difference": compared[name][1]})
    table = Table(title=f"decoding against {args.baseline} ({commit[:7]}) · {args.model} · {args.items} × "
                        f"{args.context_tokens}-token context · fp16 KV {fp16_bytes / 1e6:.2f} MB · "
                        f"{torch.get_num_threads()} torch threads · best of {args.repeats}, {args.rounds} rounds")
    for column in ("codec", "bytes then → now", "MB/s then (rounds)", "MB/s now (rounds)", "× per round", "× least",
                   "same bits", "largest |Δ|"):
        table.add_column(column, justify="right")
    for r in results:
        mb = r["decode_mb_s"]
        table.add_row(r["codec"], f"{r['bytes']['baseline']:,} → {r['bytes']['current']:,}",
                      ", ".join(f"{v:.1f}" for v in mb["baseline"]), ", ".join(f"{v:.1f}" for v in mb["current"]),
                      ", ".join(f"{v:.2f}" for v in r["ratio_per_round"]), f"{r['ratio_min']:.2f}",
                      "yes" if r["same_bits"] else "no", f"{r['largest_difference']:.3g}")
    Console(width=160).print(table, soft_wrap=True)
    write_json(args.out, {"model": args.model, "context_tokens": args.context_tokens, "items": args.items,
                          "baseline": {"revision": args.baseline, "commit": commit}, "fp16_bytes": fp16_bytes,
                          "repeats": args.repeats, "rounds": args.rounds, "children_malloc": CHILDREN_MALLOC,
                          "codecs": results, **record})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
