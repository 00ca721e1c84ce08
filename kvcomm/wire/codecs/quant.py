"""Group-wise integer quantisation (KIVI-style): keys per channel, values per token.

Keys have outlier *channels*, so each channel gets its own range over a group of tokens; values
vary per token, so each token gets its own range over a group of channels. Ranges are stored in
float16 and the codes are rounded against those stored ranges, so decoding reproduces exactly
what the encoder measured its error against.

With ``entropy=True`` the codes are ANS-coded against their own distribution instead of packed at
a fixed width: same reconstruction, fewer bytes (codes cluster mid-range), and larger groups
then pay off because the per-group ranges become the dominant cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F

from kvcomm.errors import ConfigError
from kvcomm.wire.codecs.base import CODECS, Codec, Tensors, half_or_refuse, prefixed, preset, side_by_side
from kvcomm.wire.codecs.entropy import (
    Coder,
    ans_encode,
    check_coder,
    lowest_code,
    stream_tensor,
    stream_words,
    symbols_decoder,
)
from kvcomm.wire.codecs.rans import FourStates, check_status, symbols_into


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs unsigned ``bits``-bit codes (any shape) into a flat uint8 tensor."""
    per_byte = 8 // bits
    flat = codes.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % per_byte))
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def check_packed(packed: torch.Tensor, bits: int, count: int) -> None:
    """Raises ValueError unless ``packed`` holds at least ``count`` packed ``bits``-bit codes."""
    if packed.dtype != torch.uint8 or packed.numel() * (8 // bits) < count:
        raise ValueError(f"{packed.numel()} {packed.dtype} values cannot hold {count} packed {bits}-bit codes")


def unpack(packed: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` codes, as uint8."""
    per_byte = 8 // bits
    check_packed(packed, bits, count)
    if bits == 8:
        return packed.numpy().view(np.uint8)[:count]
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (packed.to(torch.uint8)[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten()[:count].numpy()


def _grouped(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, int]:
    """Moves ``dim`` last and splits it into groups: ``[..., n_groups, group]`` (edge-padded)."""
    moved = x.movedim(dim, -1)
    length = moved.shape[-1]
    group = min(group, length)  # a group never spans more than the axis (no padding waste)
    pad = (-length) % group
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    return moved.reshape(*moved.shape[:-1], -1, group), length


def quantize(x: torch.Tensor, bits: int, dim: int, group: int, entropy: bool = False,
             coder: Coder = "rans") -> Tensors:
    """Asymmetric uniform quantisation of ``x`` in groups of ``group`` along ``dim``; the codes are
    packed at ``bits`` bits each, or ANS-coded (by ``coder``) when ``entropy``."""
    groups, length = _grouped(x.float(), dim, group)
    low = groups.amin(dim=-1, keepdim=True).half()
    scale = ((groups.amax(dim=-1, keepdim=True) - low.float()) / ((1 << bits) - 1)).clamp(min=1e-6).half()
    codes = ((groups - low.float()) / scale.float()).round().clamp(0, (1 << bits) - 1)
    out = {"low": low.squeeze(-1), "scale": scale.squeeze(-1)}
    if not entropy:
        return {"q": pack(codes, bits), **out}
    if in_tensor_order(coder):
        codes = codes.reshape(*codes.shape[:-2], -1)[..., :length].movedim(-1, dim)
    first, counts, stream = ans_encode(codes.flatten().to(torch.int64).numpy(), coder)
    return {"q.low": torch.tensor([first], dtype=torch.int32), "q.counts": torch.from_numpy(counts.astype(np.int32)),
            "q.stream": stream_tensor(stream), **out}


def in_tensor_order(coder: Coder) -> bool:
    """Whether an entropy-coded stream holds the codes in the tensor's own order (``rans``,
    ``rans-v7`` and ``rans-v6``: format version 6 on), not group by group (keys channel by channel, with each
    axis's last group edge-padded: versions 1–5 and packed codes). The same codes but the
    padding's, so no more bytes (fewer where an axis's last group was padded); in the tensor's
    order the decoder writes its output front to back instead of transposing keys."""
    return coder in ("rans", "rans-v7", "rans-v6")


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(symbols: np.ndarray, first: Any, scale: np.ndarray, low: np.ndarray, group: Any, span: Any,
                     out: np.ndarray) -> None:
    """``out`` ``[A, L]`` quantised in groups along ``L`` (``scale``, ``low``: ``[A, groups]``), row
    ``a``'s symbols starting at ``a * span``: ``(symbol + first) * scale + low`` in float32, one
    multiply, then one add, each rounded, as torch computes it (``symbol + first`` is a small
    integer, exact in float32 either way, and the float addition vectorises)."""
    rows, length = out.shape
    shift = np.float32(first)
    for a in range(rows):
        for g in range(scale.shape[1]):
            s, m, begin = scale[a, g], low[a, g], g * group
            end = min(length, begin + group)
            row, source = out[a, begin:end], symbols[a * span + begin: a * span + end]
            for j in range(end - begin):
                row[j] = (np.float32(source[j]) + shift) * s + m


@numba.njit(cache=True, nogil=True)
def dequantize_grouped(symbols: np.ndarray, first: Any, scale: np.ndarray, low: np.ndarray, group: Any,
                        out: np.ndarray) -> None:
    """``out`` ``[A, L, B]`` from symbols in group order (``[A, B, groups, group]``, the last group
    edge-padded), ranges ``[A, B, groups]``; written front to back (strided reads of the one-byte
    symbols), with :func:`_dequantize_rows`' arithmetic."""
    outer, length, inner = out.shape
    span = scale.shape[2] * group
    shift = np.float32(first)
    for a in range(outer):
        for t in range(length):
            g, j = t // group, t % group
            row, s, m = out[a, t], scale[a, :, g], low[a, :, g]
            for b in range(inner):
                row[b] = (np.float32(symbols[(a * inner + b) * span + g * group + j]) + shift) * s[b] + m[b]


@numba.njit(cache=True, nogil=True)
def _dequantize_ordered(symbols: np.ndarray, first: Any, scale: np.ndarray, low: np.ndarray, group: Any,
                        out: np.ndarray) -> None:
    """``out`` ``[A, L, B]`` from symbols in its own order, ranges ``[A, groups, B]``, with
    :func:`_dequantize_rows`' arithmetic: both run front to back."""
    outer, length, inner = out.shape
    shift = np.float32(first)
    for a in range(outer):
        for t in range(length):
            row, s, m = out[a, t], scale[a, t // group], low[a, t // group]
            source = symbols[(a * length + t) * inner: (a * length + t + 1) * inner]
            for b in range(inner):
                row[b] = (np.float32(source[b]) + shift) * s[b] + m[b]


@functools.cache
def _float16_table() -> np.ndarray:
    """The float32 value of every float16 bit pattern (256 KiB), for :func:`_widen`."""
    table = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    table.flags.writeable = False
    return table


@numba.njit(cache=True, nogil=True)
def _widen(bits: np.ndarray, table: np.ndarray, out: np.ndarray) -> Any:
    """``out`` = the float16 values whose bit patterns are ``bits``, as float32 (exactly: a look-up);
    whether every one is finite."""
    finite = True
    for i in range(bits.size):
        value = table[bits[i]]
        out[i] = value
        finite = finite and np.isfinite(value)
    return finite


def finite_float32(tensor: torch.Tensor, what: str) -> np.ndarray:
    """A float16 tensor's values as a flat float32 array, once every one is finite: one compiled
    pass (numpy's float16 conversion takes ~3 ns a value on a CPU without AVX-512, and ranges and
    steps are a sizeable part of a payload's Python).

    Raises:
        ValueError: another dtype (a wider one could reach infinity), or a value that is not finite.
    """
    if tensor.dtype != torch.float16:
        raise ValueError(f"{what} are float16, not {tensor.dtype}")
    out = np.empty(tensor.numel(), dtype=np.float32)
    if not _widen(tensor.numpy().view(np.uint16).reshape(-1), _float16_table(), out):
        raise ValueError(f"{what} are not finite")
    return out


@numba.njit(cache=True, nogil=True)
def _decode_rows(words: np.ndarray, counts: np.ndarray, rounds: Any, values: np.ndarray, padding: Any,
                 units: np.ndarray, codes: np.ndarray, size: Any, first: Any, scale: np.ndarray, low: np.ndarray,
                 group: Any, span: Any, out: np.ndarray) -> Any:
    """:func:`~kvcomm.wire.codecs.rans.symbols_into`, then :func:`_dequantize_rows`: a four-state
    stream's tensor in one compiled call; the decoder's status."""
    status = symbols_into(words, counts, rounds, values, padding, units, codes, size)
    if status == 0:
        _dequantize_rows(codes, first, scale, low, group, span, out)
    return status


@numba.njit(cache=True, nogil=True)
def _decode_ordered(words: np.ndarray, counts: np.ndarray, rounds: Any, values: np.ndarray, padding: Any,
                    units: np.ndarray, codes: np.ndarray, size: Any, first: Any, scale: np.ndarray, low: np.ndarray,
                    group: Any, out: np.ndarray) -> Any:
    """As :func:`_decode_rows`, with :func:`_dequantize_ordered`."""
    status = symbols_into(words, counts, rounds, values, padding, units, codes, size)
    if status == 0:
        _dequantize_ordered(codes, first, scale, low, group, out)
    return status


def checked_ranges(t: Tensors, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``scale`` and ``low`` of ``groups`` quantisation groups as flat float32 arrays.

    Raises:
        ValueError: ranges that are not float16, another number of them, or one that is not finite.
    """
    if t["scale"].dtype != torch.float16 or t["low"].dtype != torch.float16:  # wider ones could reach infinity
        raise ValueError(f"quantisation ranges are float16, not {t['scale'].dtype} and {t['low'].dtype}")
    if t["scale"].numel() != groups or t["low"].numel() != groups:
        raise ValueError(f"{t['scale'].numel()} quantisation ranges for {groups} groups")
    # finite float16 ranges and codes below 256 give finite values, far below float32's max
    return finite_float32(t["scale"], "quantisation ranges"), finite_float32(t["low"], "quantisation ranges")


def dequantizer(t: Tensors, bits: int, dim: int, group: int, shape: tuple[int, ...],
                coder: Coder = "rans") -> Callable[[], torch.Tensor]:
    """The inverse of :func:`quantize` for a tensor of ``shape``, in two steps: the tensors are
    checked (and an entropy coder's table built) now; the returned call decodes and dequantises
    (for rANS streams: compiled code alone, without the GIL) into a contiguous float32 tensor.

    Raises:
        ValueError: malformed tensors (now), or a corrupt stream (from the call).
    """
    length = shape[dim]
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    group = min(group, length)
    groups = -(-length // group)
    scale, low = checked_ranges(t, outer * inner * groups)
    scale, low = scale.reshape(outer, inner, groups), low.reshape(outer, inner, groups)
    ordered = "q" not in t and in_tensor_order(coder)
    count = outer * inner * (length if ordered else groups * group)
    if "q" in t:
        first, packed = 0, t["q"]
        check_packed(packed, bits, count)  # now, not when the call runs
        symbols: Callable[[], np.ndarray] = lambda: unpack(packed, bits, count)  # noqa: E731
    else:  # entropy-coded: the symbols decode and dequantise without an int64 or float copy between
        first, counts = lowest_code(t["q.low"]), t["q.counts"].numpy()
        if first < 0 or first + counts.size > 1 << bits:
            raise ValueError(f"entropy-coded codes outside {bits}-bit range")
        symbols = symbols_decoder(counts, stream_words(t["q.stream"], coder), count, coder)
    if ordered and inner > 1:
        scale, low = np.ascontiguousarray(scale.transpose(0, 2, 1)), np.ascontiguousarray(low.transpose(0, 2, 1))

    def decode() -> torch.Tensor:
        out = np.empty((outer, length, inner), dtype=np.float32)
        plain: Callable[..., None]
        fused: Callable[..., int] | None
        after: tuple[Any, ...]
        if inner == 1:  # grouped along the last axis: group order is the tensor's order (but the padding)
            plain, fused = _dequantize_rows, _decode_rows
            after = (first, scale.reshape(outer, groups), low.reshape(outer, groups), group,
                     length if ordered else groups * group, out.reshape(outer, length))  # C-ordered views
        else:  # group order (versions 1-5, never four states) or the tensor's
            plain, fused = (_dequantize_ordered, _decode_ordered) if ordered else (dequantize_grouped, None)
            after = (first, scale, low, group, out)
        if fused is not None and isinstance(symbols, FourStates):  # decoded and dequantised in one compiled call
            check_status(fused(*symbols.arguments(), *after))
        else:
            plain(symbols(), *after)
        return torch.from_numpy(out).view(shape)

    return decode


def dequantize(t: Tensors, bits: int, dim: int, group: int, shape: tuple[int, ...],
               coder: Coder = "rans") -> torch.Tensor:
    """Inverse of :func:`quantize` for a tensor of ``shape`` (contiguous float32):
    :func:`dequantizer` at once."""
    return dequantizer(t, bits, dim, group, shape, coder)()


def quantize_hidden(hidden: torch.Tensor, bits: int, group: int, entropy: bool, coder: Coder = "rans") -> Tensors:
    """A hidden state ``[T, W]``: the first token (the attention sink, whose activations are
    outliers) in float16, the others per channel over groups of ``group`` tokens (like keys)."""
    out: Tensors = {"first": half_or_refuse(hidden[:1], "a hidden state's first token")}
    if hidden.shape[0] > 1:
        out.update({f"rest.{n}": t for n, t in quantize(hidden[None, 1:], bits, 1, group, entropy, coder).items()})
    return out


def dequantize_hidden(t: Tensors, bits: int, group: int, shape: tuple[int, int], coder: Coder = "rans") -> torch.Tensor:
    """Inverse of :func:`quantize_hidden`."""
    tokens, width = shape
    first = t["first"].float()
    if first.shape != (1, width):
        raise ValueError(f"the hidden state's first token has shape {tuple(first.shape)}")
    if tokens == 1:
        return first
    rest = dequantize(prefixed(t, "rest"), bits, 1, group, (1, tokens - 1, width), coder)[0]
    return torch.cat([first, rest])


@CODECS.register("quant")
class QuantCodec(Codec):
    """``bits``-bit integer codes (8, 4 or 2), in groups of ``group`` tokens (keys) or channels
    (values), with a float16 minimum and step per group; ``entropy`` ANS-codes the codes (with
    ``coder``: ``rans``; ``rans-v7``, ``rans-v6``, ``rans-v5`` or ``constriction`` as messages of format
    version 7, 6, 5, or before, were)."""

    name = "quant"
    entropy_coded = True
    finite_by_construction = True  # the dequantiser refuses ranges that are not finite

    def __init__(self, bits: int = 8, group: int = 32, entropy: bool = False, coder: str = "rans") -> None:
        if bits not in (2, 4, 8):
            raise ConfigError("quant codec bits must be 2, 4 or 8")
        if group < 1:
            raise ConfigError("quant codec group must be positive")
        self.bits, self.group, self.entropy, self.coder = bits, group, bool(entropy), check_coder(coder)

    def params(self) -> dict[str, Any]:
        # ``entropy`` and its coder only when set, so packed messages keep the header they always had
        entropy = {"entropy": True, "coder": self.coder} if self.entropy else {}
        return {"bits": self.bits, "group": self.group, **entropy}

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        k = quantize(keys, self.bits, 1, self.group, self.entropy, self.coder)  # per channel: token groups
        v = quantize(values, self.bits, 2, self.group, self.entropy, self.coder)  # per token: channel groups
        return {**{f"k.{n}": t for n, t in k.items()}, **{f"v.{n}": t for n, t in v.items()}}

    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        return side_by_side(*self.decoders(tensors, shape, layer, num_layers), shape)

    def decoders(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
                 num_layers: int) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        return (dequantizer(prefixed(tensors, "k"), self.bits, 1, self.group, shape, self.coder),
                dequantizer(prefixed(tensors, "v"), self.bits, 2, self.group, shape, self.coder))

    def encode_hidden(self, hidden: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        return quantize_hidden(hidden, self.bits, self.group, self.entropy, self.coder)

    def decode_hidden(self, tensors: Tensors, shape: tuple[int, int], layer: int, num_layers: int) -> torch.Tensor:
        return dequantize_hidden(tensors, self.bits, self.group, shape, self.coder)


preset("int8", "quant", bits=8, group=32)
preset("int4", "quant", bits=4, group=32)
preset("int2", "quant", bits=2, group=32)
preset("int4-ans", "quant", bits=4, group=128, entropy=True)
preset("int2-ans", "quant", bits=2, group=128, entropy=True)
