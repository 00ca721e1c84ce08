"""The child process of ``benchmarks/decode_release.py``: encodes or decodes messages with whichever
kvcomm its ``PYTHONPATH`` puts first (this checkout's, or an older commit's exported beside it).

It uses only what every message format version's code has: ``KVMessage`` with positional fields
(fingerprint, context length, sink position, layers, codec, meta, mode), ``LayerKV`` and
``make_codec``, so that the same file runs against the code of any day since the wire format
began. Not a benchmark of its own.

    python release_child.py encode KV_DIR OUT_DIR CODEC...   # KV_DIR: kv-N.safetensors + kv-N.json;
                                                              # prints one JSON line
    python release_child.py decode DIR CODEC REPEATS          # prints one JSON line; writes the
                                                              # decoded KV to DIR/decoded-CODEC.safetensors
                                                              # unless it is there
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvcomm.wire.codecs import make_codec
from kvcomm.wire.message import KVMessage, LayerKV


def strays() -> list[str]:
    """The loaded ``kvcomm`` modules that are not under ``$PYTHONPATH``'s code (an editable install
    of another checkout can still supply a module the code on the path lacks)."""
    code = Path(os.environ["PYTHONPATH"]).resolve()
    return sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "kvcomm"
                  and getattr(module, "__file__", None) and not Path(module.__file__).resolve().is_relative_to(code))


def encode(kv_dir: Path, out_dir: Path, codecs: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for meta_path in sorted(kv_dir.glob("kv-*.json")):
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(meta_path.with_suffix(".safetensors")))
        layers = [LayerKV(index, full, tensors[f"{index}.keys"], tensors[f"{index}.values"])
                  for index, full in enumerate(meta["full"])]
        for name in codecs:
            message = KVMessage(meta["fingerprint"], meta["context_len"], meta["sink_position"], layers,
                                make_codec(name), {}, meta["mode"])
            (out_dir / f"{name}-{meta_path.stem}.bin").write_bytes(message.to_bytes())
    print(json.dumps({"strays": strays()}))


def decode(folder: Path, name: str, repeats: int) -> None:
    blobs = [path.read_bytes() for path in sorted(folder.glob(f"{name}-kv-*.bin"))]
    if not blobs:
        raise SystemExit(f"no {name} messages in {folder}")
    messages = [KVMessage.from_bytes(blob) for blob in blobs]  # untimed: imports, compiled code's cache, tables
    decoded = folder / f"decoded-{name}.safetensors"  # compared by the parent: written by the first round only
    if not decoded.exists():
        save_file({f"{m}.{layer.index}.{part}": getattr(layer, part).float().contiguous()
                   for m, message in enumerate(messages) for layer in message.layers for part in ("keys", "values")},
                  str(decoded))
    del messages
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        [KVMessage.from_bytes(blob) for blob in blobs]
        best = min(best, time.perf_counter() - began)
    print(json.dumps({"seconds": best, "bytes": sum(len(blob) for blob in blobs), "messages": len(blobs),
                      "torch_threads": torch.get_num_threads(), "strays": strays()}))


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "encode":
        encode(Path(rest[0]), Path(rest[1]), rest[2:])
    elif command == "decode":
        decode(Path(rest[0]), rest[1], int(rest[2]))
    else:
        raise SystemExit(f"unknown command {command!r}: encode or decode")
