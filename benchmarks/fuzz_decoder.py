"""Fuzz the KV message decoder: only ``WireError`` may come out, for as long as you let it run.

Seeds are valid messages (several codecs, both format versions). Four mutators make inputs:

- ``bytes``: flips, inserts, deletes, truncations and splices anywhere (checksums catch most);
- ``header``: one header field replaced by hostile JSON (huge or negative numbers, wrong types,
  deep nesting, long strings), re-framed with valid checksums: what an attacker can send;
- ``header-text``: byte edits inside the header JSON, re-framed with valid checksums;
- ``payload``: byte edits inside one layer's safetensors payload, with its CRC and the digest fixed.

Every input goes through ``KVMessage.from_bytes`` (with a 256 MB decoded-bytes limit, so a run
stays bounded). Any other exception is counted by type and its input saved for a repro. A table is
printed and JSON written. The ``klt`` seeds' codebook is saved in a temporary folder of the run's
own (``$KVCOMM_CODEBOOKS`` for the run, removed at the end; ``seeds()`` makes the same one again).

    python benchmarks/fuzz_decoder.py --seconds 600 --out benchmarks/results/fuzz-decoder.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import random
import resource
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/record.py, beside this file

from record import add_out, check_out, run_record, write_json  # noqa: E402

from kvcomm.errors import WireError  # noqa: E402
from kvcomm.wire import Codebook, KVMessage, LayerKV, make_codec, save_codebook  # noqa: E402

GOLDEN_V1 = Path(__file__).resolve().parents[1] / "tests" / "golden" / "message_v1.kvcm"
LIMIT = 1 << 28
HOSTILE = [0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1.5, float("1e308"), True, None, "", "x" * 10_000, [], {},
           [1, 2, 3], {"a": 1}, "causal", "legacy", "shift-back", "fp16", ["k"] * 100]


def seeds() -> list[bytes]:
    """Valid messages; the ``klt`` ones with a codebook this saves under ``$KVCOMM_CODEBOOKS`` (set it
    to a private folder first: :func:`private_codebooks`)."""
    g = torch.Generator().manual_seed(0)
    book = Codebook([torch.linalg.qr(torch.randn(2, 8, 8, generator=g))[0] for _ in range(3)],
                    [torch.linalg.qr(torch.randn(2, 8, 8, generator=g))[0] for _ in range(3)],
                    [torch.zeros(2, 8)] * 3, [torch.zeros(2, 8)] * 3, {"fingerprint": {}})
    save_codebook(book)
    out = [GOLDEN_V1.read_bytes()]
    fingerprint = {"model_type": "llama", "num_layers": 3, "num_kv_heads": 2, "head_dim": 8,
                   "rope": {"rope_theta": 10000.0}, "vocab_sha256": "0" * 32}
    for codec in ("fp16", "fp32", "int8", "int4", "int4-ans", "int2-ans", "cachegen", "zstd", "klt"):
        for tokens in (1, 7, 40):
            layers = [LayerKV(i, i != 1, torch.randn(2, tokens if i != 1 else 1, 8, generator=g),
                              torch.randn(2, tokens if i != 1 else 1, 8, generator=g)) for i in range(3)]
            bound = make_codec(codec).bind(lambda: book)
            out.append(KVMessage(fingerprint, tokens, 0, layers, bound, {"seed": codec}).to_bytes())
    return out


def split(data: bytes) -> tuple[int, bytes, list[bytes]]:
    """(version, header blob, payloads) of a valid message."""
    version, size = struct.unpack("<HI", data[4:10])
    blob, at, payloads = data[10:10 + size], 10 + size + 4, []
    while at < len(data) - 20:
        (length,) = struct.unpack("<I", data[at:at + 4])
        payloads.append(data[at + 4:at + 4 + length])
        at += 4 + length + 4
    return version, blob, payloads


def frame(version: int, blob: bytes, payloads: list[bytes]) -> bytes:
    body = b"KVCM" + struct.pack("<HI", version, len(blob)) + blob + struct.pack("<I", zlib.crc32(blob))
    for payload in payloads:
        body += struct.pack("<I", len(payload)) + payload + struct.pack("<I", zlib.crc32(payload))
    return body + b"KEND" + hashlib.blake2b(body, digest_size=16).digest()


def edit_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice, at = rng.random(), rng.randrange(max(1, len(b)))
        if choice < 0.4 and b:
            b[at] = rng.randrange(256)
        elif choice < 0.6:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif choice < 0.8 and b:
            del b[at:at + rng.randint(1, 16)]
        else:
            b = b[:at]
    return bytes(b)


def hostile_value(rng: random.Random) -> object:
    if rng.random() < 0.1:
        depth = rng.choice([20, 1000, 100_000])
        return json.loads("[" * min(depth, 500) + "]" * min(depth, 500)) if depth <= 500 else "DEEP"
    return rng.choice(HOSTILE)


def mutate_header(rng: random.Random, data: bytes) -> bytes:
    version, blob, payloads = split(data)
    header = json.loads(blob)
    target = header
    path = [rng.choice(list(header))]
    if path[0] == "layers" and header["layers"] and rng.random() < 0.7:
        target = rng.choice(header["layers"])
        path = [rng.choice(list(target))]
    elif path[0] in ("fingerprint", "codec") and rng.random() < 0.7:
        target = header[path[0]]
        path = [rng.choice(list(target) or ["x"])]
    value = hostile_value(rng)
    if rng.random() < 0.1:
        target.pop(path[0], None)
    else:
        target[path[0]] = value
    text = json.dumps(header)
    if '"DEEP"' in text:
        text = text.replace('"DEEP"', "[" * 100_000 + "]" * 100_000, 1)
    if rng.random() < 0.05:
        text = text.replace("1", "1" + "0" * 5000, 1)  # an integer of 5,000 digits
    return frame(version, text.encode(), payloads)


def mutate_header_text(rng: random.Random, data: bytes) -> bytes:
    version, blob, payloads = split(data)
    return frame(version, edit_bytes(rng, blob), payloads)


def mutate_payload(rng: random.Random, data: bytes) -> bytes:
    version, blob, payloads = split(data)
    if not payloads:
        return data
    index = rng.randrange(len(payloads))
    payloads[index] = edit_bytes(rng, payloads[index])
    header = json.loads(blob)
    header["layers"][index]["bytes"] = len(payloads[index])  # keep the frame lengths honest
    return frame(version, json.dumps(header).encode(), payloads)


MUTATORS = {"bytes": edit_bytes, "header": mutate_header, "header-text": mutate_header_text,
            "payload": mutate_payload}


@contextlib.contextmanager
def private_codebooks() -> Iterator[Path]:
    """``$KVCOMM_CODEBOOKS`` set to a new temporary folder, removed on leaving (with the variable's
    old value back): the fuzz's codebook never lands among the user's, and a mutated codebook id
    never finds one of theirs."""
    before = os.environ.get("KVCOMM_CODEBOOKS")
    with tempfile.TemporaryDirectory(prefix="kvcomm-fuzz-books-") as folder:
        os.environ["KVCOMM_CODEBOOKS"] = folder
        try:
            yield Path(folder)
        finally:
            if before is None:
                os.environ.pop("KVCOMM_CODEBOOKS", None)
            else:
                os.environ["KVCOMM_CODEBOOKS"] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    record = run_record(args)
    with private_codebooks():
        fuzz(args, record)


def fuzz(args: argparse.Namespace, record: dict) -> None:
    rng, pool = random.Random(args.seed), seeds()
    counts: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in MUTATORS}
    crashes: list[dict[str, str]] = []
    began = last = time.monotonic()
    while time.monotonic() - began < args.seconds:
        name = rng.choice(list(MUTATORS))
        data = MUTATORS[name](rng, rng.choice(pool))
        try:
            KVMessage.from_bytes(data, max_decoded_bytes=LIMIT)
            counts[name]["decoded"] += 1
        except WireError as err:
            counts[name][f"refused:{type(err).__name__}"] += 1
        except Exception as err:  # the finding: anything that is not a WireError
            counts[name][f"OTHER:{type(err).__name__}"] += 1
            path = args.out.with_name(f"fuzz-crash-{len(crashes)}.kvcm")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            crashes.append({"mutator": name, "error": f"{type(err).__name__}: {err}"[:300], "input": str(path)})
        counts[name]["inputs"] += 1
        if time.monotonic() - last > 30:
            last = time.monotonic()
            total = sum(c["inputs"] for c in counts.values())
            print(f"{last - began:6.0f} s  {total:,} inputs  {len(crashes)} non-WireError", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = Table(title=f"decoder fuzz · {args.seconds:.0f} s · seed {args.seed}")
    for column in ("mutator", "inputs", "refused (WireError)", "decoded", "other exceptions"):
        table.add_column(column, justify="right")
    for name, c in counts.items():
        refused = sum(v for k, v in c.items() if k.startswith("refused:"))
        other = sum(v for k, v in c.items() if k.startswith("OTHER:"))
        table.add_row(name, f"{c['inputs']:,}", f"{refused:,}", f"{c['decoded']:,}", str(other))
    Console().print(table)
    print(f"peak RSS {peak_mb:.0f} MB; non-WireError exceptions: {len(crashes)}")
    write_json(args.out, {"seconds": args.seconds, "seed": args.seed, "peak_rss_mb": peak_mb,
                          "counts": {k: dict(v) for k, v in counts.items()}, "crashes": crashes,
                          **record})


if __name__ == "__main__":
    main()
