"""Entropy coding of integer codes with asymmetric numeral systems (``constriction``).

Quantised KV codes are far from uniform (most fall near the middle of their range or near zero
delta), so coding them with their own measured distribution takes fewer bits than fixed-width
packing. The symbol counts travel with the stream; decoding checks they match what it produced.
"""

from __future__ import annotations

import constriction
import numpy as np

MAX_SYMBOLS = 1 << 16


def ans_encode(codes: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Integer codes -> (smallest code, count of each code from there, ANS stream of uint32 words)."""
    if codes.size == 0:
        return 0, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint32)
    low = int(codes.min())
    symbols = (codes - low).astype(np.int32)
    counts = np.bincount(symbols).astype(np.int64)
    if counts.size == 1:  # one distinct code: the counts say it all (and ANS needs two symbols)
        return low, counts, np.zeros(0, dtype=np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, constriction.stream.model.Categorical(counts / counts.sum(), perfect=False))
    return low, counts, coder.get_compressed()


def ans_decode(low: int, counts: np.ndarray, stream: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`ans_encode`: ``size`` codes as int64.

    Raises:
        ValueError: counts that cannot describe ``size`` codes, or a stream that decodes to
            other codes than the counts declare (corruption the checksums did not catch).
    """
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    if counts.sum() != size or (counts < 0).any() or counts.size > MAX_SYMBOLS:
        raise ValueError("symbol counts do not match the number of coded symbols")
    if counts.size == 1:
        if stream.size:
            raise ValueError("a single-symbol stream must be empty")
        return np.full(size, low, dtype=np.int64)
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    symbols = constriction.stream.stack.AnsCoder(stream.astype(np.uint32)).decode(model, size)
    if not np.array_equal(np.bincount(symbols, minlength=counts.size), counts):
        raise ValueError("entropy-coded stream does not decode to its declared symbols")
    return symbols.astype(np.int64) + low
