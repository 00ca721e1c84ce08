"""kvcomm's rANS coder: lossless on any input (grouped codes too), within 1% of constriction's bytes,
and corrupt streams refused (never misread, never a crash)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvcomm.wire.codecs.entropy import ans_decode, ans_encode, laplace_encode
from kvcomm.wire.codecs.klt import LEVEL_SCALES, _tables
from kvcomm.wire.codecs.rans import (
    categorical_frequencies,
    group_size,
    grouped_frequencies,
    rans_decode_categorical,
    rans_encode_categorical,
)

INT32 = st.integers(-(1 << 31), (1 << 31) - 1)


@pytest.mark.parametrize("coder", ["rans", "rans-v7", "rans-v6", "rans-v5"])
@settings(max_examples=60, deadline=None)
@given(codes=hnp.arrays(np.int64, st.integers(1, 3000), elements=st.integers(-40, 40)))
def test_categorical_round_trips(codes, coder):
    """Four states (v6 on) and two (v5), any length (the four-state loop's tail and its careful end)."""
    low, counts, stream = ans_encode(codes, coder)
    assert stream.dtype == np.uint16
    assert np.array_equal(ans_decode(low, counts, stream, codes.size, coder), codes)


@settings(max_examples=120, deadline=None)
@given(data=st.data(), alphabet=st.integers(1, 40), size=st.integers(1, 3000))
def test_grouped_codes_round_trip_any_small_alphabet_and_length(data, alphabet, size):
    """Four codes to a symbol (at most 4 distinct), two (at most 32; 16 in version 7) or one: any
    length, so the last group's padding too, as uint8 and as int32."""
    symbols = data.draw(hnp.arrays(np.int64, size, elements=st.integers(0, alphabet - 1)))
    counts = np.bincount(symbols)
    if (counts > 0).sum() < 2:
        return  # one distinct code travels as its count alone (no stream)
    for pairs in (32, 16):
        words = rans_encode_categorical(symbols, counts, pairs=pairs)
        for dtype in (np.uint8, np.int32):
            decoded = rans_decode_categorical(words, counts, size, dtype, pairs=pairs)
            assert decoded.dtype == dtype and np.array_equal(decoded, symbols)


@pytest.mark.parametrize("alphabet, group, v7", [(2, 4, 4), (4, 4, 4), (5, 2, 2), (16, 2, 2), (17, 2, 1), (32, 2, 1),
                                                 (33, 1, 1), (255, 1, 1)])
def test_group_size_and_the_tuple_frequencies(alphabet, group, v7):
    assert group_size(alphabet) == group and group_size(alphabet, pairs=16) == v7 and group_size(alphabet, 0) == 1
    counts = np.random.default_rng(alphabet).integers(1, 10**6, alphabet)
    freq = grouped_frequencies(counts, group)
    assert freq.size == alphabet ** group and freq.sum() == 1 << 14 and (freq >= 1).all()


def test_padding_that_does_not_decode_to_the_lowest_code_is_refused():
    symbols = np.array([0, 1, 2, 1, 2])  # five codes: a pair stream pads one
    words = rans_encode_categorical(symbols, np.bincount(symbols))
    assert np.array_equal(rans_decode_categorical(words, np.bincount(symbols), 5), symbols)
    with pytest.raises(ValueError, match="corrupt"):  # read as four codes, the fifth is padding, not code 0
        rans_decode_categorical(words, np.bincount(symbols), 4)


@pytest.mark.parametrize("alphabet", [4, 16, 24, 32])
@pytest.mark.parametrize("spread", [0.5, 2.0])
def test_grouped_streams_cost_at_most_half_a_percent_more(alphabet, spread):
    """Grouping trades a little rounding of the tuples' frequencies for half (a quarter of) the
    decoding steps: the bytes stay within 0.5% of one code to a symbol."""
    rng = np.random.default_rng(alphabet)
    symbols = np.clip(np.round(rng.normal(alphabet / 2, spread * alphabet / 8, 200_000)), 0, alphabet - 1)
    _, _, grouped = ans_encode(symbols.astype(np.int64), "rans")
    _, _, single = ans_encode(symbols.astype(np.int64), "rans-v6")
    assert grouped.nbytes <= single.nbytes * 1.005 + 8


@pytest.mark.parametrize("size", [2, 3, 4, 5, 7, 8, 9, 4096, 100_003])
@pytest.mark.parametrize("skew", [0.05, 1.0])
def test_four_states_round_trip_long_skewed_streams_as_uint8(size, skew):
    """Long, very skewed streams end with many symbols per word: the careful end loop decodes them."""
    rng = np.random.default_rng(size)
    symbols = rng.choice(16, size, p=rng.dirichlet(np.full(16, skew)))
    symbols[:2] = [0, 15]  # at least two distinct symbols
    counts = np.bincount(symbols)
    words = rans_encode_categorical(symbols, counts)
    assert np.array_equal(rans_decode_categorical(words, counts, size, np.uint8), symbols)
    assert np.array_equal(rans_decode_categorical(words, counts, size, np.uint8), symbols)
    single = rans_encode_categorical(symbols, counts, pairs=0)
    assert np.array_equal(rans_decode_categorical(single, counts, size, np.uint8, pairs=0), symbols)
    two = rans_encode_categorical(symbols, counts, lanes=2, pairs=0)
    assert abs(single.size - two.size) <= 8 + two.size // 1000  # two more final states; the rest alike


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(1, 2000))
def test_laplace_round_trips_any_int32_code_at_any_level(data, size):
    """Escapes (codes far outside their level's window), low bits (large levels), odd lengths."""
    levels = data.draw(hnp.arrays(np.uint8, size))
    typical = np.round(np.random.default_rng(size).laplace(0, np.array(LEVEL_SCALES)[levels])).astype(np.int64)
    wild = data.draw(hnp.arrays(np.int64, size, elements=INT32))
    codes = np.where(data.draw(hnp.arrays(np.bool_, size)), wild, typical)
    words = _tables().encode(codes, levels)
    assert np.array_equal(_tables().decode(words, levels), codes)


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])
def test_bytes_within_one_percent_of_constriction(spread):
    rng = np.random.default_rng(0)
    codes = np.round(rng.laplace(0, spread, 200_000)).astype(np.int64)
    _, _, theirs = ans_encode(codes, "constriction")
    _, _, ours = ans_encode(codes, "rans")
    assert abs(ours.nbytes / theirs.nbytes - 1) < 0.01
    levels = rng.integers(0, 200, (2000, 64)).astype(np.uint8)
    scales = np.broadcast_to(np.array(LEVEL_SCALES)[levels[0]], levels.shape)
    codes = np.round(rng.laplace(0, scales)).astype(np.int64)
    _, _, theirs = laplace_encode(codes, scales)
    ours = _tables().encode(codes, np.broadcast_to(levels[0], levels.shape))
    assert abs(ours.nbytes / theirs.nbytes - 1) < 0.01


def test_frequencies_are_integer_and_cover_every_present_symbol():
    counts = np.array([10**9, 1, 0, 3, 0, 1])
    freq = categorical_frequencies(counts)
    assert freq.sum() == 1 << 14 and (freq[counts > 0] >= 1).all() and (freq[counts == 0] == 0).all()


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_corrupt_streams_are_refused_not_misread(data):
    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 9, 500)
    counts = np.bincount(symbols)
    words = rans_encode_categorical(symbols, counts)
    words_v5 = rans_encode_categorical(symbols, counts, lanes=2, pairs=0)
    fours = rng.integers(0, 4, 500)  # four codes to a symbol
    words_4 = rans_encode_categorical(fours, np.bincount(fours))
    levels = rng.integers(0, 256, 500).astype(np.uint8)
    codes = np.round(rng.laplace(0, np.array(LEVEL_SCALES)[levels])).astype(np.int64)
    laplace = _tables().encode(codes, levels)
    for good, decode in ((words, lambda w: rans_decode_categorical(w, counts, symbols.size)),
                         (words_v5, lambda w: rans_decode_categorical(w, counts, symbols.size, lanes=2,
                                                                      pairs=0)),
                         (words_4, lambda w: rans_decode_categorical(w, np.bincount(fours), 500)),
                         (laplace, lambda w: _tables().decode(w, levels))):
        bad = good.copy()
        kind = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if kind == "flip":
            at = data.draw(st.integers(0, bad.size - 1))
            bad[at] ^= np.uint16(1 << data.draw(st.integers(0, 15)))
        elif kind == "cut":
            bad = bad[: data.draw(st.integers(0, bad.size - 1))]
        else:
            bad = np.concatenate([bad, np.array([data.draw(st.integers(0, 65535))], dtype=np.uint16)])
        try:
            decoded = decode(bad)
        except ValueError:
            continue
        # a flipped bit may still decode (rANS has no redundancy); the end-state check makes it rare
        assert kind == "flip" and decoded.shape == (500,)


def test_wrong_level_type_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        _tables().decode(np.zeros(8, dtype=np.uint16), np.zeros(4, dtype=np.int64))


def test_crafted_counts_whose_sum_wraps_are_refused_before_any_table_is_built():
    """int64 counts of 2**63 - 1 wrapped to the declared size, gave negative frequencies summing
    to 2**14, and the table builders (compiled, unchecked) wrote past their tables: a segfault or
    heap corruption from a 2 KB message."""
    from kvcomm.wire.codecs.entropy import symbols_decoder
    from kvcomm.wire.codecs.rans import rans_categorical_decoder

    size = 288
    crafted = np.zeros(40, dtype=np.int64)
    crafted[0] = crafted[1] = (1 << 63) - 1
    crafted[2] = size + 2
    assert int(crafted.sum()) == size  # wrapped
    words = np.zeros(16, dtype=np.uint16)
    with pytest.raises(ValueError, match="symbol counts"):
        symbols_decoder(crafted, words, size, "rans")
    with pytest.raises(ValueError, match="symbol counts"):
        symbols_decoder(np.array([100.0, 188.0]), words, size, "rans")  # counts are integers
    for pairs in (0, 4):  # the compiled decoder's own guard, for callers that skip the one above
        decode = rans_categorical_decoder(words, crafted, size, np.int32 if pairs == 0 else np.uint8, pairs=pairs)
        with pytest.raises(ValueError, match="no table of frequencies"):
            decode()  # the frequencies are derived (and checked) in the call, before any table
