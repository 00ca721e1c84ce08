"""Entropy coding of integer codes with asymmetric numeral systems.

Quantised KV codes are far from uniform (most fall near the middle of their range or near zero
delta), so coding them with their own measured distribution takes fewer bits than fixed-width
packing. The symbol counts travel with the stream and are checked before decoding (integers, each
at most the symbols' number, summing to it); a decoded stream is checked too: rANS's states must
end where encoding began, and ``constriction``'s symbols must match the counts. (A stream altered
to decode to other symbols with the right end state is the frame checksums' and the message
digest's to catch, before any decoding.)

Five coders: ``rans`` (kvcomm's table-driven coder, :mod:`~kvcomm.wire.codecs.rans`, a stream of
uint16 words on four interleaved states, two or four codes to a symbol where a stream's codes span
at most 32 or 4 values: message format version 8 on), ``rans-v7`` (pairs where they span at most
16: how version 7 coded, and how a version 7 header's ``rans`` is read), ``rans-v6`` (one code
to a symbol: version 6), ``rans-v5`` (one code to a symbol on two states: version 5) and
``constriction`` (versions 1–4, uint32 words), kept so that older messages decode and so that the
coders can be measured side by side. ``klt``'s Laplace streams are the same under every rANS name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import constriction
import numba
import numpy as np
import torch

from kvcomm.errors import ConfigError, WireError
from kvcomm.wire.codecs.rans import LANES, PAIRS, rans_categorical_decoder, rans_encode_categorical

MAX_SYMBOLS = 1 << 16
Coder = Literal["rans", "rans-v7", "rans-v6", "rans-v5", "constriction"]
"""The entropy coders, newest first (the module's docstring says which format versions each reads)."""
CODERS: tuple[str, ...] = get_args(Coder)
# a rANS categorical stream's interleaved states, and the widest span of codes it codes two to a symbol
_LAYOUT = {"rans": (LANES, PAIRS), "rans-v7": (LANES, 16), "rans-v6": (LANES, 0), "rans-v5": (2, 0)}
_WORD = {**{coder: np.uint16 for coder in _LAYOUT}, "constriction": np.uint32}
_STORED = {**{coder: torch.int16 for coder in _LAYOUT}, "constriction": torch.int32}  # no unsigned 16/32-bit


def check_coder(coder: str) -> Coder:
    """``coder`` if it names an entropy coder, else a :class:`ConfigError` naming the valid ones."""
    if coder not in CODERS:
        raise ConfigError(f"unknown entropy coder {coder!r}; valid: {', '.join(CODERS)}")
    return coder  # type: ignore[return-value]


def stream_tensor(stream: np.ndarray) -> torch.Tensor:
    """A coder's words as the tensor a message stores (int16 or int32, the same bits)."""
    return torch.from_numpy(stream.view(np.int16 if stream.dtype == np.uint16 else np.int32).copy())


def stream_words(tensor: torch.Tensor, coder: Coder) -> np.ndarray:
    """Inverse of :func:`stream_tensor` for ``coder``'s words.

    Raises:
        ValueError: a stored stream of another type than ``coder`` writes.
    """
    if tensor.dtype != _STORED[coder] or tensor.dim() != 1:
        raise ValueError(f"a {coder} stream is stored as 1-D {_STORED[coder]}, not {tensor.dtype}")
    return tensor.numpy().view(_WORD[coder])


def ans_encode(codes: np.ndarray, coder: Coder = "rans") -> tuple[int, np.ndarray, np.ndarray]:
    """Integer codes -> (smallest code, count of each code from there, the coder's stream of words)."""
    if codes.size == 0:
        return 0, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=_WORD[coder])
    low = int(codes.min())
    symbols = (codes - low).astype(np.int32)
    counts = np.bincount(symbols).astype(np.int64)
    if counts.size == 1:  # one distinct code: the counts say it all (and ANS needs two symbols)
        return low, counts, np.zeros(0, dtype=_WORD[coder])
    if coder in _LAYOUT:
        try:
            return low, counts, rans_encode_categorical(symbols, counts, *_LAYOUT[coder])
        except ValueError as err:
            raise WireError(str(err)) from None
    ans = constriction.stream.stack.AnsCoder()
    ans.encode_reverse(symbols, constriction.stream.model.Categorical(counts / counts.sum(), perfect=False))
    return low, counts, ans.get_compressed()


def lowest_code(stored: torch.Tensor) -> int:
    """The smallest code of an entropy-coded stream, as :func:`ans_encode`'s callers store it: one int32.

    Raises:
        ValueError: anything else.
    """
    if stored.dtype != torch.int32 or tuple(stored.shape) != (1,):
        raise ValueError(f"an entropy-coded stream's lowest code is one int32, not {stored.dtype} "
                         f"{tuple(stored.shape)}")
    return int(stored.numpy()[0])


def symbols_decoder(counts: np.ndarray, stream: np.ndarray, size: int,
                    coder: Coder = "rans") -> Callable[[], np.ndarray]:
    """What :func:`ans_encode` coded, before its smallest code is added back, in two steps: the
    counts are checked (and rANS's table built) now; the returned call decodes ``size`` symbols
    ``0 .. len(counts) - 1``, as uint8 where ``counts`` has at most 256 entries (the 2-, 4- and
    8-bit codecs: a quarter of the memory traffic of int32) and int32 otherwise. For rANS the
    call runs compiled code alone, without the GIL: codecs prepare keys and values on one thread,
    then decode them on two.

    Raises:
        ValueError: counts that cannot describe ``size`` codes (now), or a stream that is no
            encoding under them (from the call: rANS's end state, ``constriction``'s histogram).
    """
    dtype = np.uint8 if counts.size <= 256 else np.int32
    if size == 0:
        return lambda: np.zeros(0, dtype=dtype)
    if counts.dtype.kind not in "iu" or counts.ndim != 1 or counts.size > MAX_SYMBOLS:  # before any compiled code
        raise ValueError("symbol counts do not match the number of coded symbols")  # (one build per rank)
    counts = counts.astype(np.int64)
    if not _describe(counts, size):
        raise ValueError("symbol counts do not match the number of coded symbols")
    if counts.size == 1:
        if stream.size:
            raise ValueError("a single-symbol stream must be empty")
        return lambda: np.zeros(size, dtype=dtype)
    if coder in _LAYOUT:  # checks its own end state: a corrupt stream does not end where encoding began
        return rans_categorical_decoder(stream, counts, size, dtype, *_LAYOUT[coder])

    def decode() -> np.ndarray:
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
        symbols = constriction.stream.stack.AnsCoder(stream.astype(np.uint32)).decode(model, size)
        if not np.array_equal(np.bincount(symbols, minlength=counts.size), counts):
            raise ValueError("entropy-coded stream does not decode to its declared symbols")
        return symbols.astype(dtype)

    return decode


@numba.njit(cache=True)
def _describe(counts: np.ndarray, size: int) -> bool:
    """Whether ``counts`` can be the counts of ``size`` symbols: none negative or above ``size``,
    summing to it (in int64: at most 2**16 counts of at most ``size`` cannot wrap)."""
    total = 0
    for count in counts:
        if count < 0 or count > size:
            return False
        total += count
    return total == size


def ans_decode(low: int, counts: np.ndarray, stream: np.ndarray, size: int, coder: Coder = "rans") -> np.ndarray:
    """Inverse of :func:`ans_encode`: ``size`` codes as int64 (:func:`symbols_decoder`'s plus ``low``).

    Raises:
        ValueError: as :func:`symbols_decoder`.
    """
    return symbols_decoder(counts, stream, size, coder)().astype(np.int64) + low


def laplace_encode(codes: np.ndarray, scales: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Integer codes, each with its own Laplace scale (in code units, same shape, > 0) -> (lowest
    code, highest code, ANS stream). No histogram travels: the scales are the model.

    Suits transform coefficients, whose spread differs by orders of magnitude between components
    but is known per component; one shared histogram would cost up to several bits more per code.
    """
    if codes.size == 0:
        return 0, 0, np.zeros(0, dtype=np.uint32)
    low, high = int(codes.min()), int(codes.max())
    if high - low >= MAX_SYMBOLS:
        raise WireError(f"codes span {high - low + 1} values; at most {MAX_SYMBOLS} can be entropy-coded")
    model = constriction.stream.model.QuantizedLaplace(low, max(high, low + 1))
    flat = scales.astype(np.float64).ravel()
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(codes.astype(np.int32).ravel(), model, np.zeros_like(flat), flat)
    return low, high, coder.get_compressed()


def laplace_decode(low: int, high: int, scales: np.ndarray, stream: np.ndarray) -> np.ndarray:
    """Inverse of :func:`laplace_encode`: one int64 code per scale (``scales``' shape).

    Raises:
        ValueError: a code range or scales no encoder produces.
    """
    if scales.size == 0:
        return np.zeros(scales.shape, dtype=np.int64)
    flat = scales.astype(np.float64).ravel()
    if not 0 <= high - low < MAX_SYMBOLS or not np.isfinite(flat).all() or (flat <= 0).any():
        raise ValueError("code range or Laplace scales out of bounds")
    model = constriction.stream.model.QuantizedLaplace(low, max(high, low + 1))
    coder = constriction.stream.stack.AnsCoder(stream.astype(np.uint32))
    codes = coder.decode(model, np.zeros_like(flat), flat).astype(np.int64)
    if codes.size and int(codes.max()) > high:
        raise ValueError("entropy-coded stream decodes outside its declared range")
    return codes.reshape(scales.shape)
