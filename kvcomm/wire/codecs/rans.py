"""Table-driven range asymmetric numeral systems (rANS), compiled with numba: kvcomm's entropy coder
from message format version 5 on (four states per categorical stream from version 6, two or four small
codes to a symbol from version 7, pairs where the codes span up to 32 values from version 8).

Messages up to version 4 were coded with ``constriction``, whose decoder evaluates its model per
symbol (about 6 million symbols a second here); a KV message is millions of symbols, so decoding
cost more than the link it saved. This coder looks every symbol up in a table instead:

- **States**: k 32-bit states in ``[2**16, 2**32)``, renormalised by 16-bit words; symbol ``i``
  uses state ``i % k``, so that k look-ups are in flight at once. Laplace streams have two (twice
  the speed of one state on this CPU), categorical streams four from format version 6 (two in
  version 5): with branch-free renormalisation, in blocks where words enough remain, 1.6-1.7x
  the speed of two. All start at ``2**16``: a decoder that ends elsewhere, or before the last
  word, read a corrupt stream (a check for free).
- **Tables**: one entry per slot holds the symbol, its frequency and the slot's offset within it
  (the four-state decoder splits it in two narrow tables), so a symbol costs one look-up, one
  multiply and one add.
- **Categorical** (``int4-ans``, ``int2-ans``, ``cachegen``, hidden states): the symbol counts
  travel with the stream, as before, and become frequencies out of ``2**14`` by integer
  arithmetic alone, so encoder and decoder derive the same table on any machine.
- **Grouped codes** (format version 7 on): where a stream's codes span at most :data:`PAIRS` values
  (32 from format version 8, 16 in version 7; lowest to highest code), one rANS symbol carries two
  of them (a span of at most 4: four), its frequency the product of theirs brought back to ``2**14``
  (again by integer arithmetic), and its table entry the codes' bytes, written in one store. The
  symbol rate is what limits decoding, so a 4-bit stream decodes in half the steps (an int2 stream
  in a quarter) for 0.1-0.2% more bytes: the products' rounding. Version 8 pairs ``cachegen``'s
  deltas too (spans of 17-32 on Qwen's shallow layers), for about 0.4% more of its bytes. A stream
  whose length is not a multiple of the group is padded with the lowest code present, and the
  decoder checks that the padding decoded to it.
- **Laplace** (``klt``): each symbol has a scale level (one byte per component). Per level there
  is a fixed table: the code ``s`` is split into a high part ``s >> r`` (Laplace with a scale of at
  most 8, looked up in a ``2**12``-slot table over a window ``[-W, W]`` plus an escape) and ``r``
  low bits (nearly uniform once the scale is large). Values outside the window follow the escape
  as an exponent (5 bits), a mantissa and a sign, so any int32 code is coded. The 256 tables are
  built once per process from the levels' scales (float64 ``exp``, then rounded: a table could
  differ between machines only if a probability fell within an ulp of a rounding boundary).

A stream is a sequence of uint16 words: the final states (two words each, high first), the
renormalisation words in the order the decoder reads them and, for Laplace streams, the raw bits
(escapes and low bits, packed least significant first), which the decoder reads in a second pass
so that its hot loop holds table look-ups only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import numba
import numpy as np

STATE_LOW = 1 << 16  # each state lives in [STATE_LOW, 2**32)
CATEGORICAL_BITS = 14
LAPLACE_BITS = 12
MAX_SCALE = 8.0  # largest scale the high part's table is built for: larger scales shift bits out
EXPONENT_BITS = 5  # escaped values: exponent, mantissa, sign
MAX_CATEGORICAL = 1 << (CATEGORICAL_BITS - 1)  # distinct symbols a categorical table holds
HEAD = 4  # words of the two final states (format version 5, and klt's Laplace streams)
LANES = 4  # states of a categorical stream from format version 6
PAIRS = 32  # a stream whose codes span at most this many values codes two to a symbol (format version 8; 7: 16)
NO_TABLE = "symbol counts give no table of frequencies: they cannot be an encoder's"
ROUNDS = {1: 0, 2: 1, 4: 2}  # codes to a symbol -> rounds of pairing their frequencies


# ----------------------------------------------------------------------------------------------
# The compiled kernels. Decoders return -1 where the stream is not a valid encoding.

@numba.njit(cache=True, nogil=True, inline="always")
def _put(x: Any, freq: Any, cum: Any, bits: Any, out: np.ndarray, pos: Any):
    if x >= ((np.uint32(STATE_LOW) >> np.uint32(bits)) << np.uint32(16)) * freq:
        pos -= 1
        out[pos] = np.uint16(x & np.uint32(0xFFFF))
        x >>= np.uint32(16)
    quotient = x // freq
    return (quotient << np.uint32(bits)) + (x - quotient * freq) + cum, pos


@numba.njit(cache=True, nogil=True)
def _encode(freqs: np.ndarray, cums: np.ndarray, bits: Any, out: np.ndarray, lanes: Any = 2) -> Any:
    """Symbols given as their frequencies and cumulative frequencies (uint32, out of ``2**bits``),
    encoded backwards into the end of ``out`` on ``lanes`` interleaved states (symbol ``i`` on
    state ``i % lanes``); returns where the stream starts (the final states first, two words
    each, high first)."""
    x = np.full(lanes, STATE_LOW, dtype=np.uint32)
    pos = np.int64(out.size)
    for i in range(freqs.size - 1, -1, -1):
        lane = i % lanes
        x[lane], pos = _put(x[lane], freqs[i], cums[i], bits, out, pos)
    pos -= 2 * lanes
    for lane in range(lanes):
        out[pos + 2 * lane] = np.uint16(x[lane] >> np.uint32(16))
        out[pos + 2 * lane + 1] = np.uint16(x[lane] & np.uint32(0xFFFF))
    return pos


# The decoders' hot loops are written out by hand with 32-bit states: helper functions returning
# (state, position) tuples, or 64-bit states, ran 4x slower under numba here.

@numba.njit(cache=True, nogil=True)
def _decode_categorical(words: np.ndarray, table: np.ndarray, out: np.ndarray) -> Any:
    """``table``: uint64 entries ``symbol | freq << 16 | offset << 32``, one per slot."""
    n, size = words.size, out.size
    if n < HEAD:
        return -1
    x0 = (np.uint32(words[0]) << np.uint32(16)) | np.uint32(words[1])
    x1 = (np.uint32(words[2]) << np.uint32(16)) | np.uint32(words[3])
    pos, mask, low = np.int64(HEAD), np.uint32((1 << CATEGORICAL_BITS) - 1), np.uint32(STATE_LOW)
    for i in range(0, size - 1, 2):
        e0, e1 = table[x0 & mask], table[x1 & mask]
        x0 = np.uint32((e0 >> np.uint64(16)) & np.uint64(0xFFFF)) * (x0 >> np.uint32(CATEGORICAL_BITS)) \
            + np.uint32(e0 >> np.uint64(32))
        x1 = np.uint32((e1 >> np.uint64(16)) & np.uint64(0xFFFF)) * (x1 >> np.uint32(CATEGORICAL_BITS)) \
            + np.uint32(e1 >> np.uint64(32))
        if x0 < low:
            if pos >= n:
                return -1
            x0 = (x0 << np.uint32(16)) | np.uint32(words[pos])
            pos += 1
        if x1 < low:
            if pos >= n:
                return -1
            x1 = (x1 << np.uint32(16)) | np.uint32(words[pos])
            pos += 1
        out[i] = e0 & np.uint64(0xFFFF)  # fits out's type: the caller chose it for these symbols
        out[i + 1] = e1 & np.uint64(0xFFFF)
    if size & 1:
        e0 = table[x0 & mask]
        x0 = np.uint32((e0 >> np.uint64(16)) & np.uint64(0xFFFF)) * (x0 >> np.uint32(CATEGORICAL_BITS)) \
            + np.uint32(e0 >> np.uint64(32))
        if x0 < low:
            if pos >= n:
                return -1
            x0 = (x0 << np.uint32(16)) | np.uint32(words[pos])
            pos += 1
        out[size - 1] = e0 & np.uint64(0xFFFF)
    return 0 if x0 == low and x1 == low and pos == n else -1


@numba.njit(cache=True, nogil=True)
def _decode_categorical4(words: np.ndarray, sym: np.ndarray, step: np.ndarray, out: np.ndarray) -> Any:
    """Four states (format version 6 on): ``sym`` (uint8 or int32; for grouped codes, their bytes as
    one uint16 or uint32, ``out`` a view of the bytes alike) and ``step`` (uint32 ``freq | offset
    << 16``) per slot, two narrow tables instead of one uint64, so four look-ups fit in flight;
    1.7x the two-state loop's speed on this CPU."""
    n, size = words.size, out.size
    if n < 2 * LANES:
        return -1
    x0 = (np.uint32(words[0]) << np.uint32(16)) | np.uint32(words[1])
    x1 = (np.uint32(words[2]) << np.uint32(16)) | np.uint32(words[3])
    x2 = (np.uint32(words[4]) << np.uint32(16)) | np.uint32(words[5])
    x3 = (np.uint32(words[6]) << np.uint32(16)) | np.uint32(words[7])
    # the hot loop's indices are unsigned (``pos``, ``j``): numba then reads and writes without
    # wrapping negative indices (one cachegen and one int2-ans tensor decoded 1.15x as fast on an
    # AVX2 host, 2026-11-26)
    pos, mask, low = np.uint64(2 * LANES), np.uint32((1 << CATEGORICAL_BITS) - 1), np.uint32(STATE_LOW)
    bits, half, one = np.uint32(CATEGORICAL_BITS), np.uint32(16), np.uint64(1)
    i: Any = 0
    while True:
        symbols_left, words_left = size - i, n - np.int64(pos)
        rounds = (symbols_left if symbols_left < words_left else words_left) // 4  # words for any renormalisation
        if rounds == 0:
            break
        for k in range(rounds):
            j = np.uint64(i + 4 * k)
            s0, s1, s2, s3 = x0 & mask, x1 & mask, x2 & mask, x3 & mask
            e0, e1, e2, e3 = step[s0], step[s1], step[s2], step[s3]
            out[j], out[j + one], out[j + 2 * one], out[j + 3 * one] = sym[s0], sym[s1], sym[s2], sym[s3]
            x0 = (e0 & np.uint32(0xFFFF)) * (x0 >> bits) + (e0 >> half)
            x1 = (e1 & np.uint32(0xFFFF)) * (x1 >> bits) + (e1 >> half)
            x2 = (e2 & np.uint32(0xFFFF)) * (x2 >> bits) + (e2 >> half)
            x3 = (e3 & np.uint32(0xFFFF)) * (x3 >> bits) + (e3 >> half)
            # branch-free renormalisation (a word is read whether or not it is taken: pos + 4 <= n)
            f = x0 < low
            w = np.uint32(words[pos])
            x0 = ((x0 << half) | w) if f else x0
            pos += np.uint64(f)
            f = x1 < low
            w = np.uint32(words[pos])
            x1 = ((x1 << half) | w) if f else x1
            pos += np.uint64(f)
            f = x2 < low
            w = np.uint32(words[pos])
            x2 = ((x2 << half) | w) if f else x2
            pos += np.uint64(f)
            f = x3 < low
            w = np.uint32(words[pos])
            x3 = ((x3 << half) | w) if f else x3
            pos += np.uint64(f)
        i += 4 * rounds
    at = np.int64(pos)  # signed again: compared with sizes below
    states = np.array([x0, x1, x2, x3], dtype=np.uint32)
    for k in range(i, size):  # the rest (the last few words), one symbol at a time, checked
        lane = k % 4
        x = states[lane]
        e = step[x & mask]
        out[k] = sym[x & mask]
        x = (e & np.uint32(0xFFFF)) * (x >> bits) + (e >> half)
        if x < low:
            if at >= n:
                return -1
            x = (x << half) | np.uint32(words[at])
            at += 1
        states[lane] = x
    for lane in range(4):
        if states[lane] != low:
            return -1
    return 0 if at == n else -1


@numba.njit(cache=True, nogil=True, inline="always")
def _write_bits(acc: Any, count: Any, value: Any, bits: Any, out: np.ndarray, pos: Any):
    acc |= np.uint64(value) << np.uint64(count)
    count += bits
    while count >= 16:
        out[pos] = np.uint16(acc & np.uint64(0xFFFF))
        pos += 1
        acc >>= np.uint64(16)
        count -= 16
    return acc, count, pos


@numba.njit(cache=True, nogil=True, inline="always")
def _read_bits(acc: Any, count: Any, bits: Any, words: np.ndarray, pos: Any):
    while count < bits:
        if pos < 0 or pos >= words.size:
            return np.int64(0), acc, count, np.int64(-1)
        acc |= np.uint64(words[pos]) << np.uint64(count)
        pos += 1
        count += 16
    return np.int64(acc & np.uint64((1 << bits) - 1)), acc >> np.uint64(bits), count - bits, pos


@numba.njit(cache=True, nogil=True)
def _split_laplace(codes: np.ndarray, levels: np.ndarray, window: np.ndarray, shift: np.ndarray,
                   table: np.ndarray, raw: np.ndarray) -> Any:
    """Each code's table symbol into ``table``; the raw bits into ``raw`` (returns their words)."""
    acc, count, end = np.uint64(0), np.int64(0), np.int64(0)
    for i in range(codes.size):  # in decoding order
        level, s = levels[i], np.int64(codes[i])
        r, w = shift[level], window[level]
        v = s >> r
        if -w <= v <= w:
            table[i] = v + w
        else:
            table[i] = 2 * w + 1
            u = (v - w - 1) if v > 0 else (-v - w - 1)  # >= 0
            e = np.int64(0)
            while (u + 1) >> (e + 1):
                e += 1
            mantissa = (u + 1) - (np.int64(1) << e)
            acc, count, end = _write_bits(acc, count, e, EXPONENT_BITS, raw, end)
            if e > 16:
                acc, count, end = _write_bits(acc, count, mantissa >> 16, e - 16, raw, end)
                acc, count, end = _write_bits(acc, count, mantissa & 0xFFFF, 16, raw, end)
            elif e > 0:
                acc, count, end = _write_bits(acc, count, mantissa, e, raw, end)
            acc, count, end = _write_bits(acc, count, 1 if v < 0 else 0, 1, raw, end)
        if r > 0:
            acc, count, end = _write_bits(acc, count, s & ((1 << r) - 1), r, raw, end)
    if count > 0:
        raw[end] = np.uint16(acc & np.uint64(0xFFFF))
        end += 1
    return end


@numba.njit(cache=True, nogil=True)
def _decode_laplace(words: np.ndarray, levels: np.ndarray, table: np.ndarray, window: np.ndarray,
                    shift: np.ndarray, out: np.ndarray) -> Any:
    """``table``: uint32 entries ``symbol | raw << 7 | freq << 8 | offset << 20`` per level and slot
    (``raw``: the symbol has raw bits: an escape, or a level with low bits)."""
    n, size = words.size, out.size
    if n < HEAD:
        return -1
    x0 = (np.uint32(words[0]) << np.uint32(16)) | np.uint32(words[1])
    x1 = (np.uint32(words[2]) << np.uint32(16)) | np.uint32(words[3])
    pos, mask, low = np.int64(HEAD), np.uint32((1 << LAPLACE_BITS) - 1), np.uint32(STATE_LOW)
    rare, n_rare = np.empty(size + 1, dtype=np.int32), np.int64(0)  # the symbols with raw bits (flagged in the table)
    for i in range(0, size - 1, 2):  # the hot loop: table symbols only
        l0, l1 = levels[i], levels[i + 1]
        e0, e1 = table[l0, x0 & mask], table[l1, x1 & mask]
        x0 = ((e0 >> np.uint32(8)) & np.uint32(0xFFF)) * (x0 >> np.uint32(LAPLACE_BITS)) + (e0 >> np.uint32(20))
        x1 = ((e1 >> np.uint32(8)) & np.uint32(0xFFF)) * (x1 >> np.uint32(LAPLACE_BITS)) + (e1 >> np.uint32(20))
        if x0 < low:
            if pos >= n:
                return -1
            x0 = (x0 << np.uint32(16)) | np.uint32(words[pos])
            pos += 1
        if x1 < low:
            if pos >= n:
                return -1
            x1 = (x1 << np.uint32(16)) | np.uint32(words[pos])
            pos += 1
        out[i] = np.int32(e0 & np.uint32(0x7F)) - window[l0]
        rare[n_rare] = i
        n_rare += np.int64((e0 >> np.uint32(7)) & np.uint32(1))
        out[i + 1] = np.int32(e1 & np.uint32(0x7F)) - window[l1]
        rare[n_rare] = i + 1
        n_rare += np.int64((e1 >> np.uint32(7)) & np.uint32(1))
    if size & 1:
        l0 = levels[size - 1]
        e0 = table[l0, x0 & mask]
        x0 = ((e0 >> np.uint32(8)) & np.uint32(0xFFF)) * (x0 >> np.uint32(LAPLACE_BITS)) + (e0 >> np.uint32(20))
        if x0 < low:
            if pos >= n:
                return -1
            x0 = (x0 << np.uint32(16)) | np.uint32(words[pos])
            pos += 1
        out[size - 1] = np.int32(e0 & np.uint32(0x7F)) - window[l0]
        rare[n_rare] = size - 1
        n_rare += np.int64((e0 >> np.uint32(7)) & np.uint32(1))
    if x0 != low or x1 != low:
        return -1
    acc, count = np.uint64(0), np.int64(0)
    for k in range(n_rare):  # escapes and low bits, from the raw bits after the rANS words
        i = rare[k]
        level = levels[i]
        v = np.int64(out[i])
        w, r = window[level], shift[level]
        if v > w:  # the escape
            e, acc, count, pos = _read_bits(acc, count, EXPONENT_BITS, words, pos)
            mantissa = np.int64(0)
            if e > 16:
                high, acc, count, pos = _read_bits(acc, count, e - 16, words, pos)
                low, acc, count, pos = _read_bits(acc, count, 16, words, pos)
                mantissa = (high << 16) | low
            elif e > 0:
                mantissa, acc, count, pos = _read_bits(acc, count, e, words, pos)
            negative, acc, count, pos = _read_bits(acc, count, 1, words, pos)
            u = (np.int64(1) << e) + mantissa - 1
            v = -(u + w + 1) if negative else u + w + 1
        if r > 0:
            low, acc, count, pos = _read_bits(acc, count, r, words, pos)
            v = (v << r) | low
        if pos < 0 or v < -(1 << 31) or v >= (1 << 31):
            return -1
        out[i] = v
    return 0 if pos == n and acc == np.uint64(0) and count < 16 else -1


# ----------------------------------------------------------------------------------------------
# Tables.

def categorical_frequencies(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to ``2**14``, every present symbol at least 1, by integer
    arithmetic alone (the decoder derives the same table from the counts that travel)."""
    return _frequencies(np.ascontiguousarray(counts, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _frequencies(counts: np.ndarray) -> np.ndarray:
    scale = 1 << CATEGORICAL_BITS
    freq = counts * scale // counts.sum()
    for i in range(freq.size):
        if counts[i] > 0 and freq[i] == 0:
            freq[i] = 1
    excess = freq.sum() - scale
    while excess != 0:  # give to, or take from, the most frequent symbols (ties: the first)
        top = np.argmax(freq)
        change = excess if excess < 0 else min(excess, freq[top] - 1)
        freq[top] -= change
        excess -= change
    return freq


def _cum(freq: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _entries(freq: np.ndarray, sym_bits: Any, freq_bits: Any) -> np.ndarray:
    """One table entry per slot: ``symbol | freq << sym_bits | offset << (sym_bits + freq_bits)`` (uint64)."""
    out = np.empty(freq.sum(), dtype=np.uint64)
    slot = 0
    for symbol in range(freq.size):
        for offset in range(freq[symbol]):
            out[slot] = np.uint64(symbol) | (np.uint64(freq[symbol]) << np.uint64(sym_bits)) \
                | (np.uint64(offset) << np.uint64(sym_bits + freq_bits))
            slot += 1
    return out


@numba.njit(cache=True, nogil=True)
def _slots(freq: np.ndarray, values: np.ndarray, symbols: np.ndarray, steps: np.ndarray) -> None:
    """The four-state decoder's tables: per slot its symbol's value (``values``), and ``freq |
    offset << 16``."""
    slot = 0
    for symbol in range(freq.size):
        for offset in range(freq[symbol]):
            symbols[slot] = values[symbol]
            steps[slot] = np.uint32(freq[symbol]) | (np.uint32(offset) << np.uint32(16))
            slot += 1


@numba.njit(cache=True, nogil=True)
def _decode_tabled(words: np.ndarray, freq: np.ndarray, values: np.ndarray, out: np.ndarray) -> Any:
    """:func:`_slots`' tables, then :func:`_decode_categorical4` with them: one compiled call, so
    that building the table (a sizeable part of a small tensor's decoding) runs without the GIL
    too, beside the other lane's Python."""
    symbols = np.empty(1 << CATEGORICAL_BITS, dtype=values.dtype)
    steps = np.empty(1 << CATEGORICAL_BITS, dtype=np.uint32)
    _slots(freq, values, symbols, steps)
    return _decode_categorical4(words, symbols, steps, out)


@numba.njit(cache=True, nogil=True)
def _table_frequencies(counts: np.ndarray, rounds: Any) -> np.ndarray:
    """:func:`_grouped_frequencies`, or none (an empty array) where they are no table's: a negative
    frequency, or a sum other than ``2**14`` (counts no encoder wrote)."""
    freq = _grouped_frequencies(counts, rounds)
    total = 0
    for f in freq:
        if f < 0:
            return freq[:0]
        total += f
    return freq if total == 1 << CATEGORICAL_BITS else freq[:0]


def group_size(alphabet: int, pairs: int = PAIRS) -> int:
    """How many codes one symbol of a stream carries: 4 for at most 4 distinct codes, 2 for at most
    ``pairs`` (:data:`PAIRS` from format version 8, 16 in version 7; 0: never grouped, versions 5
    and 6), else 1 (a pair then has at most 1,024 values, well inside the ``2**14`` slots, and the
    table entry one byte per code)."""
    if pairs == 0:
        return 1
    return 4 if alphabet <= 4 else 2 if alphabet <= pairs else 1


def grouped_frequencies(counts: np.ndarray, group: int) -> np.ndarray:
    """Frequencies out of ``2**14`` of the ``group``-tuples of codes (the first code most
    significant), from the codes' own counts: pairs from the product of two codes' frequencies,
    fours from the product of two pairs', each brought back by :func:`categorical_frequencies`
    (integer arithmetic: products stay below ``2**28``)."""
    return _grouped_frequencies(np.ascontiguousarray(counts, dtype=np.int64), ROUNDS[group])


@numba.njit(cache=True, nogil=True)
def _grouped_frequencies(counts: np.ndarray, rounds: Any) -> np.ndarray:
    freq = _frequencies(counts)
    for _ in range(rounds):
        n = freq.size
        products = np.empty(n * n, dtype=np.int64)
        for a in range(n):
            for b in range(n):
                products[a * n + b] = freq[a] * freq[b]
        freq = _frequencies(products)
    return freq


def _padding(counts: np.ndarray) -> int:
    """The code a grouped stream's last group is padded with: the lowest present (counts are a few
    dozen at most: a Python scan is quicker than numpy's calls on them)."""
    return next((code for code, count in enumerate(counts.tolist()) if count > 0), 0)


def _tuples(symbols: np.ndarray, counts: np.ndarray, group: int) -> np.ndarray:
    """Symbols -> one index per ``group`` of them (the last group padded: :func:`_padding`)."""
    padded = np.full(-(-symbols.size // group) * group, _padding(counts), dtype=np.int64)
    padded[: symbols.size] = symbols
    alphabet = counts.size
    return padded.reshape(-1, group) @ (alphabet ** np.arange(group - 1, -1, -1, dtype=np.int64))


@lru_cache(maxsize=64)  # bounded: a message chooses its alphabet sizes
def _symbol_values(alphabet: int, group: int, dtype: np.dtype) -> np.ndarray:
    """What the decoder's table holds per symbol: the code itself as ``dtype``, or for grouped
    codes (``group`` > 1) the tuple's codes as ``group`` bytes read as one uint16 or uint32 (the
    first code in the first byte on any byte order: the bytes are laid out, then viewed)."""
    index = np.arange(alphabet ** group, dtype=np.int64)
    if group == 1:
        values = index.astype(dtype)
    else:
        codes = np.stack([(index // alphabet ** (group - 1 - i)) % alphabet for i in range(group)], axis=1)
        values = np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint16 if group == 2 else np.uint32).ravel()
    values.flags.writeable = False
    return values


def _check_categorical(counts: np.ndarray, lanes: int, pairs: int) -> None:
    """What a categorical stream can hold: at most 2**13 distinct codes, on 2 or 4 states (grouped:
    4), pairs of codes spanning at most 32 values."""
    if (distinct := np.count_nonzero(counts > 0)) > MAX_CATEGORICAL:
        raise ValueError(f"{distinct} distinct codes; an entropy-coded stream holds at most {MAX_CATEGORICAL}")
    if lanes not in (2, LANES):
        raise ValueError(f"a categorical stream has 2 or {LANES} states, not {lanes}")
    if pairs and lanes != LANES:
        raise ValueError(f"a grouped categorical stream has {LANES} states, not {lanes}")
    if not 0 <= pairs <= PAIRS:
        raise ValueError(f"pairs (the widest span of codes coded two to a symbol) is 0 to {PAIRS}, not {pairs}")


def rans_encode_categorical(symbols: np.ndarray, counts: np.ndarray, lanes: int = LANES,
                            pairs: int = PAIRS) -> np.ndarray:
    """Symbols ``0 .. len(counts) - 1`` with these counts (at most 2**13 distinct) -> uint16 words,
    on ``lanes`` interleaved states (4 from format version 6; 2 in version 5), several codes to a
    symbol where the alphabet is small (:func:`group_size` with ``pairs``: format version 7 on)."""
    _check_categorical(counts, lanes, pairs)
    group = group_size(counts.size, pairs)
    freq = grouped_frequencies(counts, group)
    if group > 1:
        symbols = _tuples(symbols, counts, group)
    out = np.empty(symbols.size + 2 * lanes, dtype=np.uint16)
    start = _encode(freq.astype(np.uint32)[symbols], _cum(freq).astype(np.uint32)[symbols], CATEGORICAL_BITS, out,
                    lanes)
    return out[start:].copy()


def rans_categorical_decoder(words: np.ndarray, counts: np.ndarray, size: int, dtype: type[np.integer] = np.int32,
                             lanes: int = LANES, pairs: int = PAIRS) -> Callable[[], np.ndarray]:
    """The inverse of :func:`rans_encode_categorical`, in two steps: the arguments are checked now;
    the returned call derives the frequencies, builds the table and decodes ``size`` symbols as
    ``dtype`` (uint8 where there are at most 256 symbols, or int32) in compiled code alone, which
    releases the GIL (so that another thread's Python runs meanwhile; version 5's two-state
    streams derive their table now). A four-state stream's call is a :class:`FourStates`, whose
    decoding a codec's kernel can also run itself, in the same compiled call as its own work.

    Raises:
        ValueError: a ``dtype`` too narrow for these symbols, or another number of states than 2
            or 4 (grouped: 4) (now); counts that give no table of frequencies, or a stream that is
            not an encoding of ``size`` symbols under these counts (from the call).
    """
    _check_categorical(counts, lanes, pairs)
    if dtype not in (np.uint8, np.int32) or (dtype is np.uint8 and counts.size > 256):
        raise ValueError(f"{counts.size} symbols do not decode to {np.dtype(dtype)}")
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    words = np.ascontiguousarray(words, dtype=np.uint16)
    if lanes == LANES:
        return FourStates(words, counts, size, np.dtype(dtype), pairs)
    freq = _table_frequencies(counts, 0)
    if freq.size == 0:
        raise ValueError(NO_TABLE)
    entries = _entries(freq, 16, 16)

    def decode() -> np.ndarray:
        out = np.empty(size, dtype=dtype)
        check_status(_decode_categorical(words, entries, out))
        return out

    return decode


class FourStates:
    """A four-state stream (format version 6 on), checked and ready to decode: call it for its
    ``size`` symbols, or hand :meth:`arguments` to a compiled kernel that decodes them with
    :func:`symbols_into` and uses them in the same call (the quantisers' and ``cachegen``'s: one
    call per tensor, no Python and no second wait for the GIL between decoding and using)."""

    def __init__(self, words: np.ndarray, counts: np.ndarray, size: int, dtype: np.dtype, pairs: int) -> None:
        self.size, self.dtype = size, dtype
        self.group = group_size(counts.size, pairs)
        # grouped: each tuple's codes as bytes, decoded as one uint16 or uint32 into the bytes
        self.values = _symbol_values(counts.size, self.group, dtype)
        self.padding = _padding(counts) if self.group > 1 else 0
        self.words, self.counts = words, counts

    def arguments(self) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, int, np.ndarray, np.ndarray, int]:
        """:func:`symbols_into`'s arguments, its output buffers new: the symbols end up in
        ``codes``, the second to last (uint8 or int32; for grouped codes the padding follows the
        first ``size``)."""
        if self.group > 1:
            codes = np.empty(-(-self.size // self.group) * self.group, dtype=np.uint8)
            units = codes.view(self.values.dtype)
        else:
            codes = units = np.empty(self.size, dtype=self.dtype)
        return self.words, self.counts, ROUNDS[self.group], self.values, self.padding, units, codes, self.size

    def __call__(self) -> np.ndarray:
        arguments = self.arguments()
        check_status(symbols_into(*arguments))
        codes = arguments[-2][: self.size]
        return codes if codes.dtype == self.dtype else codes.astype(self.dtype)


@numba.njit(cache=True, nogil=True)
def symbols_into(words: np.ndarray, counts: np.ndarray, rounds: Any, values: np.ndarray, padding: Any,
                 units: np.ndarray, codes: np.ndarray, size: Any) -> Any:
    """The whole of a four-state stream's decoding, without the GIL: the frequencies
    (:func:`_table_frequencies`; -2 where the counts give none), :func:`_decode_tabled` into
    ``units`` (a view of ``codes``), then the check that a grouped stream's padding decoded to the
    padding code: 0, or :func:`check_status`'s negative status."""
    freq = _table_frequencies(counts, rounds)
    if freq.size == 0:
        return -2
    status = _decode_tabled(words, freq, values, units)
    if status == 0:
        for i in range(size, codes.size):
            if codes[i] != padding:
                return -1
    return status


def check_status(status: int) -> None:
    """Raises the error a categorical decoder's negative status stands for.

    Raises:
        ValueError: counts that give no table (-2), or a corrupt stream (any other negative).
    """
    if status == -2:
        raise ValueError(NO_TABLE)
    if status < 0:
        raise ValueError("entropy-coded stream is corrupt (it does not decode to its declared symbols)")


def rans_decode_categorical(words: np.ndarray, counts: np.ndarray, size: int, dtype: type[np.integer] = np.int32,
                            lanes: int = LANES, pairs: int = PAIRS) -> np.ndarray:
    """Inverse of :func:`rans_encode_categorical`: ``size`` symbols as ``dtype``
    (:func:`rans_categorical_decoder` at once).

    Raises:
        ValueError: as :func:`rans_categorical_decoder`.
    """
    return rans_categorical_decoder(words, counts, size, dtype, lanes, pairs)()


class LaplaceTables:
    """One rANS table per scale level: built once from the levels' scales (in code units)."""

    def __init__(self, scales: np.ndarray) -> None:
        self.shift = np.array([max(0, math.ceil(math.log2(s / MAX_SCALE))) for s in scales], dtype=np.int64)
        reduced = [s / 2.0 ** r for s, r in zip(scales, self.shift)]
        size = 1 << LAPLACE_BITS
        self.window = np.array([max(1, math.ceil(b * math.log(size / (2 * b)))) if 2 * b < size else 1
                                for b in reduced], dtype=np.int64)
        width = int(2 * self.window.max() + 2)
        if width > 128:
            raise ValueError("a Laplace window wider than a table entry's symbol field")
        self.freq = np.zeros((len(scales), width), dtype=np.uint32)
        self.cum = np.zeros((len(scales), width), dtype=np.uint32)
        self.table = np.zeros((len(scales), size), dtype=np.uint32)
        for level, (scale, r, w) in enumerate(zip(scales, self.shift, self.window)):
            freq = _laplace_frequencies(float(scale), int(r), int(w))
            self.freq[level, : freq.size], self.cum[level, : freq.size] = freq, _cum(freq)
            entries = _entries(freq, 8, 12)
            raw = (entries & np.uint64(0xFF)) == 2 * w + 1 if r == 0 else np.ones(size, dtype=bool)
            self.table[level] = (entries | (raw.astype(np.uint64) << np.uint64(7))).astype(np.uint32)

    def encode(self, codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """int codes, each with its level (uint8, same size) -> uint16 words.

        Raises:
            ValueError: a code outside int32 (what decoding returns; beyond it the escape's exponent
                field and the raw words' room overflow).
        """
        flat = codes.astype(np.int64).ravel()
        if flat.size and (int(flat.min()) < -(2**31) or int(flat.max()) > 2**31 - 1):
            raise ValueError("a Laplace-coded code outside int32 (were the values finite?)")
        level = np.ascontiguousarray(levels, dtype=np.uint8).ravel()
        symbols, raw = np.empty(flat.size, dtype=np.int64), np.empty(3 * flat.size + 1, dtype=np.uint16)
        raw_words = _split_laplace(flat, level, self.window, self.shift, symbols, raw)
        out = np.empty(flat.size + HEAD, dtype=np.uint16)
        start = _encode(self.freq[level, symbols], self.cum[level, symbols], LAPLACE_BITS, out)
        return np.concatenate((out[start:], raw[:raw_words]))

    def decode(self, words: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`encode`: one int32 code per level (``levels``' shape).

        Raises:
            ValueError: a stream that is not an encoding of that many codes.
        """
        if levels.dtype != np.uint8:
            raise ValueError(f"scale levels are uint8, not {levels.dtype}")
        out = np.empty(levels.size, dtype=np.int32)
        if _decode_laplace(np.ascontiguousarray(words, dtype=np.uint16), np.ascontiguousarray(levels).ravel(),
                           self.table, self.window, self.shift, out) < 0:
            raise ValueError("entropy-coded stream is corrupt (it does not decode to one code per scale)")
        return out.reshape(levels.shape)


def _laplace_frequencies(scale: float, shift: Any, window: Any) -> np.ndarray:
    """Frequencies (out of ``2**12``) of the high part ``s >> shift`` over ``[-window, window]`` and the
    escape, for codes ``s`` from a Laplace of ``scale`` rounded to integers."""
    def cdf(x: np.ndarray) -> np.ndarray:
        return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0) / scale), 1 - 0.5 * np.exp(-np.maximum(x, 0) / scale))

    high = np.arange(-window, window + 1, dtype=np.float64)
    width = float(1 << shift)
    p = cdf((high + 1) * width - 0.5) - cdf(high * width - 0.5)
    probabilities = np.append(p, max(0.0, 1.0 - float(p.sum())))
    size = 1 << LAPLACE_BITS
    freq = np.maximum(1, np.round(probabilities * size)).astype(np.int64)
    freq[np.argmax(freq)] -= int(freq.sum()) - size
    return freq


@cache
def laplace_tables(scales: tuple[float, ...]) -> LaplaceTables:
    """The tables for these level scales, built once per process."""
    return LaplaceTables(np.array(scales, dtype=np.float64))
