"""Uncompressed KV in a floating-point type, and the same bytes through zstd as a yardstick."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zstandard

from kvcomm.errors import ConfigError
from kvcomm.wire.codecs.base import CODECS, FLOAT16_MAX, Codec, Tensors, half_or_refuse, preset

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@CODECS.register("raw")
class RawCodec(Codec):
    """Keys and values cast to ``dtype``: exact in float32, half the bytes in float16/bfloat16."""

    name = "raw"

    def __init__(self, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"raw codec dtype must be one of {', '.join(DTYPES)}")
        self.dtype = dtype

    def params(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def largest_value(self) -> float | None:
        return {"float16": FLOAT16_MAX, "bfloat16": torch.finfo(torch.bfloat16).max}.get(self.dtype)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        return {"k": keys.to(DTYPES[self.dtype]).contiguous(), "v": values.to(DTYPES[self.dtype]).contiguous()}

    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors["k"].float().reshape(shape), tensors["v"].float().reshape(shape)

    def decoders(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
                 num_layers: int) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        keys, values = tensors["k"], tensors["v"]  # a missing tensor is refused now; the copies run in the calls
        return (lambda: keys.float().reshape(shape)), (lambda: values.float().reshape(shape))

    def encode_hidden(self, hidden: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        if self.dtype == "float16":
            return {"h": half_or_refuse(hidden, f"the hidden state entering layer {layer}")}
        return {"h": hidden.to(DTYPES[self.dtype]).contiguous()}


@CODECS.register("zstd")
class ZstdCodec(Codec):
    """float16 keys and values compressed by zstd: what a generic compressor gets from KV."""

    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def params(self) -> dict[str, Any]:
        return {"level": self.level}

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        raw = torch.cat([keys.flatten(), values.flatten()]).half().numpy().tobytes()
        packed = zstandard.ZstdCompressor(level=self.level).compress(raw)
        return {"zstd": torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).copy())}

    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = 2 * 2 * int(np.prod(shape))
        raw = _inflate(tensors["zstd"], size)
        both = torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy()).float()
        return both[: size // 4].reshape(shape), both[size // 4:].reshape(shape)

    def encode_hidden(self, hidden: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        packed = zstandard.ZstdCompressor(level=self.level).compress(
            half_or_refuse(hidden, f"the hidden state entering layer {layer}").numpy().tobytes())
        return {"zstd": torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).copy())}

    def decode_hidden(self, tensors: Tensors, shape: tuple[int, int], layer: int, num_layers: int) -> torch.Tensor:
        size = 2 * int(np.prod(shape))
        raw = _inflate(tensors["zstd"], size)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy()).float().reshape(shape)


def _inflate(packed: torch.Tensor, size: int) -> bytes:
    """A zstd payload's ``size`` bytes, never more read (a frame that states a larger content size
    was decompressed in full before the length was checked: 64 KB made 2 GiB).

    Raises:
        ValueError: the payload holds another number of bytes.
    """
    blob = packed.numpy().tobytes()
    try:
        stated = zstandard.frame_content_size(blob)
        if stated not in (size, -1, zstandard.CONTENTSIZE_UNKNOWN):
            raise ValueError(f"zstd payload states {stated} bytes, expected {size}")
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            raw = reader.read(size + 1)
    except zstandard.ZstdError as err:
        raise ValueError(f"zstd payload does not decode: {err}") from None
    if len(raw) != size:
        raise ValueError(f"zstd payload holds {len(raw) if len(raw) <= size else 'more than ' + str(size)} bytes, "
                         f"expected {size}")
    return raw


preset("fp32", "raw", dtype="float32")
preset("fp16", "raw", dtype="float16")
preset("bf16", "raw", dtype="bfloat16")
preset("zstd", "zstd", level=3)
