"""The KV message format: round trips, a golden file, and clean refusal of bad bytes (fuzzed)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcomm.errors import ConfigError
from kvcomm.protocol import prefill, prefill_logits, receiver_input, share
from kvcomm.wire import (
    PRESETS,
    VERSION,
    CorruptMessage,
    FingerprintMismatch,
    KVMessage,
    LayerKV,
    MessageReader,
    MessageTooLarge,
    TruncatedMessage,
    UnsupportedVersion,
    WireError,
    check_fingerprint,
    make_codec,
)
from kvcomm.wire.checksum import crc32
from kvcomm.wire.header import parse_header
from tests.conftest import random_codebook, tiny_model

GOLDEN = {version: Path(__file__).parent / "golden" / f"message_v{version}.kvcm" for version in range(1, 10)}
ENTROPY_CODECS = ["int4-ans", "int2-ans", "cachegen", "klt"]
# Worst relative error each codec may show on smooth, KV-like data: the worst of a scan over shapes and
# seeds here (cachegen 0.19; klt 0.19 and klt-coarse 0.30 with random bases and zero means), with margin.
TOLERANCE = {"fp32": 1e-7, "fp16": 1e-3, "bf16": 1e-2, "zstd": 1e-3, "int8": 0.02, "int4": 0.2, "int2": 0.6,
             "int4-ans": 0.2, "int2-ans": 0.6, "cachegen": 0.25, "klt": 0.25, "klt-coarse": 0.4,
             "auto": 0.25}  # auto: one of fp16, int8, int4-ans, klt


def kv_like(heads: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    """Channel offsets plus a slow drift over tokens plus noise: roughly how real keys look."""
    g = torch.Generator().manual_seed(seed)
    channel = torch.randn(heads, 1, dim, generator=g) * 3
    drift = torch.cumsum(torch.randn(heads, tokens, dim, generator=g) * 0.1, dim=1)
    return channel + drift + torch.randn(heads, tokens, dim, generator=g) * 0.3


def message(codec: str = "fp32", layers: int = 3, tokens: int = 5, seed: int = 0, mode: str = "causal") -> KVMessage:
    entries = [LayerKV(i, i != 1, kv_like(2, tokens if i != 1 else 1, 4, seed + i),
                       kv_like(2, tokens if i != 1 else 1, 4, seed + 10 + i)) for i in range(layers)]
    return KVMessage({"model_type": "test", "num_layers": layers}, tokens, 0, entries, make_codec(codec),
                     {"note": "golden"}, mode)


@pytest.mark.parametrize("codec", sorted(PRESETS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=st.integers(1, 3), tokens=st.integers(1, 40), dim=st.sampled_from([2, 8, 16]),
       seed=st.integers(0, 1000))
def test_every_codec_round_trips_within_its_stated_error(codec, heads, tokens, dim, seed):
    keys, values = kv_like(heads, tokens, dim, seed), kv_like(heads, tokens, dim, seed + 1)
    layers = [LayerKV(0, True, keys, values), LayerKV(1, False, keys[:, :1], values[:, :1])]
    bound = make_codec(codec).bind(lambda: random_codebook(heads, dim, layers=2, seed=seed))
    original = KVMessage({"m": 1}, tokens, 0, layers, bound)
    back = KVMessage.from_bytes(original.to_bytes())
    for a, b in zip(original.layers, back.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert x.shape == y.shape
            assert ((x - y).norm() / x.norm().clamp(min=1e-6)).item() <= TOLERANCE[codec]
    if codec == "auto":  # the header names the codec chosen
        assert back.codec.name in ("raw", "quant", "klt") and back.meta["codec_choice"]["chosen"] in bound.candidates
    else:
        assert back.codec.params() == original.codec.params()
    assert back.fingerprint == {"m": 1}


@given(st.binary(max_size=70_000), st.integers(0, 2**32 - 1))
def test_frame_checksum_is_zlibs_crc32(data, start):
    assert crc32(data) == zlib.crc32(data)  # messages written before zlib-ng still read, and the other way
    assert crc32(data, start) == zlib.crc32(data, start)


@pytest.mark.parametrize("codec", sorted(PRESETS))
def test_payload_tensors_read_what_safetensors_torch_reads(codec):
    """The reader's own wrapping of safetensors' parse (``wire/payload.py``) against the library's
    torch loader, on every codec's layer and hidden-state payloads: names, dtypes, shapes, values."""
    from safetensors.torch import load, save

    from kvcomm.wire.payload import payload_tensors

    bound = make_codec(codec).bind(lambda: random_codebook(2, 8, layers=2, seed=0))
    keys, values = kv_like(2, 40, 8, 0), kv_like(2, 40, 8, 1)
    chosen = bound.for_message([LayerKV(0, True, keys, values), LayerKV(1, True, values, keys)],
                               float(keys.abs().max()))[0]
    for tensors in (chosen.encode(keys, values, 0, 2), chosen.encode_hidden(kv_like(1, 40, 8, 2)[0], 1, 2),
                    {"bf16": torch.randn(3, 2).bfloat16(), "empty": torch.zeros(0, 4), "scalar": torch.tensor(3)}):
        blob = save(tensors)
        ours, theirs = payload_tensors(blob), load(blob)
        assert ours.keys() == theirs.keys()
        for name, tensor in theirs.items():
            assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
            assert torch.equal(ours[name], tensor), (codec, name)
    with pytest.raises(ValueError, match="no codec writes"):
        payload_tensors(save({"x": torch.zeros(2, dtype=torch.float8_e4m3fn)}))


@pytest.mark.parametrize("bits", [2, 4])
def test_entropy_coding_is_lossless_over_the_packed_codes_and_smaller(bits):
    keys, values = kv_like(2, 300, 16, 1), kv_like(2, 300, 16, 2)
    packed, coded = (make_codec("quant", bits=bits, group=128, entropy=e) for e in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(packed.decode(packed.encode(keys, values, 0, 1), keys.shape, 0, 1),
                                                 coded.decode(coded.encode(keys, values, 0, 1), keys.shape, 0, 1)))
    size = lambda codec: len(KVMessage({"m": 1}, 300, 0, [LayerKV(0, True, keys, values)], codec).to_bytes())
    assert size(coded) < size(packed)


@pytest.mark.parametrize("codec", ["int4-ans", "int2-ans", "cachegen"])
def test_entropy_coded_codecs_handle_constant_tensors(codec):
    """One distinct code (e.g. all-equal deltas) is a degenerate distribution ANS cannot model."""
    keys = torch.ones(2, 12, 4)
    original = KVMessage({"m": 1}, 12, 0, [LayerKV(0, True, keys, keys * 2)], make_codec(codec))
    back = KVMessage.from_bytes(original.to_bytes()).layers[0]
    assert torch.allclose(back.keys, keys, atol=1e-3) and torch.allclose(back.values, keys * 2, atol=1e-3)


def golden_message() -> KVMessage:
    """Layers 0 and 2 full, 1 a sink, 3 left out with the hidden state entering it (a droidspeak block)."""
    today = message(mode="legacy", layers=4)
    today.layers[3] = LayerKV(3, False, torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))
    today.token_ids = torch.tensor([17, 4, 250, 0, 9])
    today.hidden = {3: kv_like(1, 5, 6, 7)[0]}
    return today


def test_golden_file_pins_todays_encoding():
    expected = golden_message().to_bytes()
    if os.environ.get("KVCOMM_REGENERATE_GOLDEN"):  # only when the format version is bumped on purpose
        GOLDEN[VERSION].write_bytes(expected)
    assert GOLDEN[VERSION].read_bytes() == expected, \
        f"the v{VERSION} byte layout changed: bump VERSION (and keep reading v{VERSION}) instead of editing it"


@pytest.mark.parametrize("version, mode, ids", [(1, "causal", None), (2, "legacy", None),
                                               (3, "legacy", [17, 4, 250, 0, 9])])
def test_golden_files_of_every_version_decode(version, mode, ids):
    golden = GOLDEN[version].read_bytes()
    assert struct.unpack("<H", golden[4:6])[0] == version
    decoded = KVMessage.from_bytes(golden)
    assert decoded.meta == {"note": "golden"} and decoded.shared_layers == [0, 2] and decoded.mode == mode
    assert (decoded.token_ids.tolist() if decoded.token_ids is not None else None) == ids
    assert torch.equal(decoded.layers[2].values, message().layers[2].values)
    assert MessageReader(io.BytesIO(golden)).version == version
    assert decoded.hidden == {}


def golden_codebook():
    """A saved klt codebook whose bases are exact in float32 (scaled Hadamard): the same on every machine."""
    from kvcomm.wire import Codebook, save_codebook

    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    basis = (h / 4).expand(2, 16, 16).contiguous()
    means = [torch.zeros(2, 16)] * 2
    book = Codebook([basis] * 2, [basis.flip(-1).contiguous()] * 2, means, means, {"fingerprint": {}})
    save_codebook(book)
    return book


def entropy_golden_message(codec: str) -> KVMessage:
    """40 tokens at layer 0, a sink at layer 1 with the hidden state entering it: every stream kind."""
    book = golden_codebook()
    layers = [LayerKV(0, True, kv_like(2, 40, 16, 3), kv_like(2, 40, 16, 4)),
              LayerKV(1, False, kv_like(2, 1, 16, 5), kv_like(2, 1, 16, 6))]
    return KVMessage({"m": 1}, 40, 0, layers, make_codec(codec).bind(lambda: book), {"note": "golden"},
                     hidden={1: kv_like(1, 40, 24, 7)[0] * 4})


def golden_entropy_file(codec: str, version: int, suffix: str = "kvcm") -> Path:
    return Path(__file__).parent / "golden" / f"entropy_v{version}_{codec}.{suffix}"


@pytest.mark.parametrize("codec", ENTROPY_CODECS)
def test_golden_entropy_files_pin_todays_coder(codec):
    """Today's rANS streams are pinned byte for byte: a coder change must bump the version."""
    expected = entropy_golden_message(codec).to_bytes()
    if os.environ.get("KVCOMM_REGENERATE_GOLDEN"):
        golden_entropy_file(codec, VERSION).write_bytes(expected)
    assert golden_entropy_file(codec, VERSION).read_bytes() == expected, \
        f"the v{VERSION} {codec} stream changed: bump VERSION (and keep reading v{VERSION}) instead of editing it"


@pytest.mark.parametrize("version", [4, 5, 6, 7, 8, VERSION])
@pytest.mark.parametrize("codec", ENTROPY_CODECS)
def test_golden_entropy_files_of_every_coder_decode(codec, version):
    """v4 streams (constriction) still decode to what v4 decoded them to (kept as an fp32 message);
    v5 (two-state rANS, keys' codes channel by channel), v6 (four states, the tensor's order), v7
    (two or four small codes to a symbol) and v8 (pairs where the codes span up to 32) decode alike."""
    golden_codebook()
    decoded = KVMessage.from_bytes(golden_entropy_file(codec, version).read_bytes())
    coders = {4: "constriction", 5: "rans-v5", 6: "rans-v6", 7: "rans-v7", 8: "rans", 9: "rans"}
    assert decoded.codec.params()["coder"] == coders[version]
    expected = KVMessage.from_bytes(golden_entropy_file(codec, 4, "decoded.kvcm").read_bytes())
    pairs = [(a.keys, b.keys) for a, b in zip(decoded.layers, expected.layers)]
    pairs += [(a.values, b.values) for a, b in zip(decoded.layers, expected.layers)]
    for got, want in [*pairs, (decoded.hidden[1], expected.hidden[1])]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # klt's matmul: BLAS may differ by an ulp


def test_golden_v8_pairs_streams_whose_codes_span_up_to_32_values():
    """Version 8 codes two codes to a symbol where a stream's codes span 17-32 values (version 7
    coded them one by one): pinned byte for byte on a cachegen message whose deltas span 22-25 codes, and
    decoding to exactly what the same codes decode to under version 7's coder."""
    golden_codebook()
    sent = entropy_golden_message("int4-ans")
    sent.codec = make_codec("cachegen", steps=(0.3, 0.3, 0.3))
    spans = [t.numel() for n, t in sent.codec.encode(sent.layers[0].keys, sent.layers[0].values, 0, 2).items()
             if n.endswith("counts")]
    assert all(16 < span <= 32 for span in spans), spans
    path = golden_entropy_file("cachegen-pairs", VERSION)
    if os.environ.get("KVCOMM_REGENERATE_GOLDEN"):
        path.write_bytes(sent.to_bytes())
    assert path.read_bytes() == sent.to_bytes(), "the v8 pair coding changed: bump VERSION instead of editing it"
    decoded = KVMessage.from_bytes(path.read_bytes())
    v8 = KVMessage.from_bytes(golden_entropy_file("cachegen-pairs", 8).read_bytes())  # version 9 codes alike
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(v8.layers, decoded.layers))
    sent.codec = make_codec("cachegen", steps=(0.3, 0.3, 0.3), coder="rans-v7")
    as_v7 = sent.to_bytes()
    assert len(as_v7) > len(path.read_bytes()) * 0.99  # the pairs cost at most a little
    back = KVMessage.from_bytes(as_v7)
    assert back.codec.params()["coder"] == "rans-v7"
    for a, b in zip(decoded.layers, back.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(decoded.hidden[1], back.hidden[1])
    assert ((decoded.layers[0].keys - sent.layers[0].keys).norm() / sent.layers[0].keys.norm()) < TOLERANCE["cachegen"]


def edited_header(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with ``old`` replaced by ``new`` once in its header, the header's length and CRC fixed."""
    size = struct.unpack("<I", data[6:10])[0]
    header = data[10:10 + size].replace(old, new, 1)
    assert header != data[10:10 + size]
    return data[:6] + struct.pack("<I", len(header)) + header + struct.pack("<I", zlib.crc32(header)) \
        + data[14 + size:]


def test_frames_swapped_with_their_checksums_are_caught_by_the_digest():
    """v6's digest hashes each frame's length and CRC, not its bytes: two frames swapped whole (each
    still passing its own CRC) or a frame taken from another message must still be refused."""
    data = message(layers=3, tokens=5).to_bytes()  # layers 0 and 2 full (frames of one size), 1 a sink
    head = 14 + struct.unpack("<I", data[6:10])[0]
    frames, start = [], head
    for _ in range(3):
        size = struct.unpack("<I", data[start:start + 4])[0]
        frames.append(data[start:start + 8 + size])
        start += 8 + size
    assert len(frames[0]) == len(frames[2]) and frames[0] != frames[2]
    swapped = data[:head] + frames[2] + frames[1] + frames[0] + data[start:]
    with pytest.raises(CorruptMessage, match="digest"):
        KVMessage.from_bytes(swapped)
    other = message(layers=3, tokens=5, seed=7).to_bytes()
    foreign = data[:head] + other[head:head + len(frames[0])] + data[head + len(frames[0]):]
    with pytest.raises(CorruptMessage, match="digest"):
        KVMessage.from_bytes(foreign)


def test_a_v4_header_naming_a_coder_is_refused():
    fixed = edited_header(golden_entropy_file("klt", 4).read_bytes(), b'"codebook":', b'"coder":"rans","codebook":')
    with pytest.raises(CorruptMessage, match="names no entropy coder"):
        KVMessage.from_bytes(fixed)


@pytest.mark.parametrize("version, named", [(5, "rans-v5"), (5, "rans-v6"), (6, "rans-v6"), (6, "rans-v7"),
                                            (7, "rans-v7")])
def test_a_header_naming_a_coder_its_version_did_not_write_is_refused(version, named):
    fixed = edited_header(golden_entropy_file("int4-ans", version).read_bytes(), b'"coder":"rans"',
                          f'"coder":"{named}"'.encode())
    with pytest.raises(CorruptMessage, match=f"names no coder '{named}'"):
        KVMessage.from_bytes(fixed)


def test_todays_message_may_name_the_older_coders_it_was_written_with():
    """Benchmarks write today's format with the older coders side by side: each reads back as itself."""
    golden_codebook()
    for coder in ("rans-v7", "rans-v6", "rans-v5", "constriction"):
        sent = entropy_golden_message("int4-ans")
        sent.codec = make_codec("int4-ans", coder=coder)
        back = KVMessage.from_bytes(sent.to_bytes())
        assert back.codec.params()["coder"] == coder
        torch.testing.assert_close(back.layers[0].keys, KVMessage.from_bytes(
            entropy_golden_message("int4-ans").to_bytes()).layers[0].keys, rtol=0, atol=0)


@pytest.mark.parametrize("version", [4, 5, 6, 7, 8, 9])
def test_golden_v4_on_carries_a_left_out_layer_and_a_hidden_state(version):
    decoded = KVMessage.from_bytes(GOLDEN[version].read_bytes())
    assert decoded.shared_layers == [0, 2] and decoded.layers[3].keys.shape == (2, 0, 4)
    assert decoded.token_ids.tolist() == [17, 4, 250, 0, 9] and list(decoded.hidden) == [3]
    assert torch.equal(decoded.hidden[3], kv_like(1, 5, 6, 7)[0])  # fp32 codec: exact
    shared = decoded.to_shared()
    assert shared.keys[3].shape == (1, 2, 0, 4) and shared.hidden[3].shape == (1, 5, 6)


@pytest.mark.parametrize("codec", sorted(PRESETS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.integers(1, 40), width=st.sampled_from([6, 32, 200]), seed=st.integers(0, 1000))
def test_hidden_states_round_trip_through_every_codec(codec, tokens, width, seed):
    keys, values = kv_like(2, tokens, 8, seed), kv_like(2, tokens, 8, seed + 1)
    hidden = kv_like(1, tokens, width, seed + 2)[0] * 4
    layers = [LayerKV(0, True, keys, values), LayerKV(1, False, keys[:, :0], values[:, :0])]
    bound = make_codec(codec).bind(lambda: random_codebook(2, 8, layers=2, seed=seed))
    back = KVMessage.from_bytes(KVMessage({"m": 1}, tokens, 0, layers, bound, hidden={1: hidden}).to_bytes())
    assert back.layers[1].keys.shape == (2, 0, 8) and back.hidden[1].shape == hidden.shape
    error = ((back.hidden[1] - hidden).norm() / hidden.norm()).item()
    assert error <= max(TOLERANCE[codec], 1e-3), error


def header_json(data: bytes) -> dict:
    """The header of an encoded message, as JSON."""
    size = struct.unpack("<I", data[6:10])[0]
    return json.loads(data[10:10 + size])


def test_hidden_frames_and_left_out_layers_need_v4():
    data = golden_message().to_bytes()
    with pytest.raises(WireError, match="version 3 header has no 'opening'"):
        KVMessage.from_bytes(data[:4] + struct.pack("<H", 3) + data[6:])  # refused, not misread
    raw = header_json(data)
    del raw["opening"]
    with pytest.raises(WireError, match="version 3 message has no hidden"):
        parse_header(json.dumps(raw).encode(), 3)


def test_an_opening_needs_v9_and_must_be_consistent():
    """Version 9 layers not shared may hold an opening (positions 0..n-1) instead of one sink; the
    header says how many tokens, and every such layer holds that many (or none)."""
    keys, values = kv_like(2, 6, 4, 1), kv_like(2, 6, 4, 2)
    layers = [LayerKV(0, True, keys, values), LayerKV(1, False, keys[:, :3], values[:, :3])]
    sent = KVMessage({"m": 1}, 6, 0, layers, make_codec("fp32"))
    data = sent.to_bytes()
    pinned = Path(__file__).parent / "golden" / "message_v9_opening.kvcm"
    if os.environ.get("KVCOMM_REGENERATE_GOLDEN"):
        pinned.write_bytes(data)
    assert pinned.read_bytes() == data, "the v9 opening layout changed: bump VERSION instead of editing it"
    assert header_json(data)["opening"] == 3 == sent.opening
    back = KVMessage.from_bytes(data)
    assert torch.equal(back.layers[1].keys, keys[:, :3])
    assert back.to_shared().positions[1].tolist() == [[0, 1, 2]]
    assert header_json(golden_message().to_bytes())["opening"] == 0  # a sink: not an opening
    raw = header_json(data)
    with pytest.raises(WireError, match="has no 'opening'"):
        parse_header(json.dumps(raw).encode(), 8)
    for change, refusal in [({"opening": 1}, "must be 0"), ({"opening": 7}, "must be 0"),
                            ({"opening": 2}, "holds 3 tokens"), ({"opening": 0}, "holds 3 tokens"),
                            ({"sink_position": 5}, "starts at position 0"),
                            ({"mode": "shift-back"}, "in causal mode"), ({"mode": "legacy"}, "in causal mode")]:
        with pytest.raises(WireError, match=refusal):
            parse_header(json.dumps({**raw, **change}).encode(), 9)
    with pytest.raises(WireError, match="lacks the 'opening'"):
        parse_header(json.dumps({k: v for k, v in raw.items() if k != "opening"}).encode(), 9)
    uneven = KVMessage({"m": 1}, 6, 0, [*layers, LayerKV(2, False, keys[:, :2], values[:, :2])], make_codec("fp32"))
    with pytest.raises(WireError, match="one sink, or one opening"):
        uneven.to_bytes()


def test_hidden_state_must_match_the_context():
    bad = golden_message()
    bad.hidden = {3: torch.zeros(4, 6)}
    with pytest.raises(WireError, match="hidden state must be"):
        bad.to_bytes()
    bad.hidden = {9: torch.zeros(5, 6)}
    with pytest.raises(WireError, match="enter a layer"):
        bad.to_bytes()


def test_receiver_through_the_wire_equals_in_process():
    model = tiny_model("llama")
    s_ids, r_ids = torch.randint(0, 99, (1, 11)), torch.randint(0, 99, (1, 5))
    shared = share(model, prefill(model, s_ids, s_ids >= 0), [0, 2])
    wire = KVMessage.from_bytes(KVMessage.from_shared(shared, {"m": 1}, "fp32").to_bytes()).to_shared()
    direct = prefill_logits(model, receiver_input(shared), r_ids, r_ids >= 0)
    through = prefill_logits(model, receiver_input(wire), r_ids, r_ids >= 0)
    assert torch.allclose(direct, through, atol=1e-6)


def test_streaming_reader_yields_layers_in_order():
    data = message(layers=4).to_bytes()
    reader = MessageReader(io.BytesIO(data))
    assert reader.header.context_len == 5
    assert [layer.index for layer in reader.layers()] == [0, 1, 2, 3]


def test_every_truncation_is_refused():
    data = message("int4").to_bytes()
    for cut in range(len(data)):
        with pytest.raises((TruncatedMessage, CorruptMessage)):
            KVMessage.from_bytes(data[:cut])


def test_every_single_byte_corruption_is_refused():
    data = message("cachegen").to_bytes()
    for position in range(0, len(data), 3):
        mutated = bytearray(data)
        mutated[position] ^= 0x41
        with pytest.raises(WireError):
            KVMessage.from_bytes(bytes(mutated))


def test_wrong_version_oversize_and_trailing_bytes():
    data = message().to_bytes()
    with pytest.raises(UnsupportedVersion):
        KVMessage.from_bytes(data[:4] + struct.pack("<H", 99) + data[6:])
    with pytest.raises(MessageTooLarge):
        KVMessage.from_bytes(data, max_bytes=len(data) - 1)
    with pytest.raises(CorruptMessage, match="trailing"):
        KVMessage.from_bytes(data + b"x")


def test_fingerprint_mismatch_names_the_fields():
    with pytest.raises(FingerprintMismatch, match="num_layers: message 3, receiver 4"):
        check_fingerprint({"model_type": "test", "num_layers": 3}, {"model_type": "test", "num_layers": 4})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_wire_errors(data):
    with pytest.raises(WireError):
        KVMessage.from_bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_messages_only_raise_wire_errors_or_decode_exactly(data):
    original = message(data.draw(st.sampled_from(["fp16", "int8", "cachegen", "zstd"]))).to_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    candidate = bytes(mutated[:cut]) + data.draw(st.binary(max_size=8))
    try:
        KVMessage.from_bytes(candidate)
    except WireError:
        return
    assert candidate == original  # only the unmodified message may decode


def test_save_and_load_are_atomic(tmp_path):
    path = tmp_path / "m.kvcm"
    size = message().save(path)
    assert path.stat().st_size == size and not list(tmp_path.glob("*.partial"))
    assert KVMessage.load(path).context_len == 5


def test_token_ids_travel_and_bad_ones_are_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, 99, (1, 9))
    shared = share(model, prefill(model, ids, ids >= 0), [0, 2])
    back = KVMessage.from_bytes(KVMessage.from_shared(shared, {"m": 1}, "int8").to_bytes())
    assert back.token_ids.tolist() == ids[0].tolist() and torch.equal(back.to_shared().token_ids, ids)
    bad = KVMessage.from_shared(shared, {"m": 1}, "fp16")
    bad.token_ids = torch.tensor([1, 2])  # not one per context token
    with pytest.raises(WireError, match="token ids"):
        bad.to_bytes()


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count set to ``count`` inside, and restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def large_layers(count: int) -> list[LayerKV]:
    """``count`` full layers of 2 heads × 16 channels, each tensor above the two-thread threshold."""
    from kvcomm.wire.codecs.base import PARALLEL_FROM

    tokens = PARALLEL_FROM // 32 + 1
    return [LayerKV(i, True, kv_like(2, tokens, 16, i), kv_like(2, tokens, 16, 10 + i)) for i in range(count)]


@pytest.mark.parametrize("name", ENTROPY_CODECS)
def test_entropy_codecs_decode_keys_and_values_on_two_threads_as_on_one(name):
    """Large layers decode keys on a helper thread beside values: the same tensors either way."""
    from kvcomm.wire.codecs.base import PARALLEL_FROM

    tokens = PARALLEL_FROM // 32 + 1
    keys, values = kv_like(2, tokens, 16, 1), kv_like(2, tokens, 16, 2)
    book = random_codebook(2, 16, layers=1, seed=3)
    codec = make_codec(name).bind(lambda: book)
    data = KVMessage({"m": 1}, tokens, 0, [LayerKV(0, True, keys, values)], codec).to_bytes()
    with torch_threads(1):
        one = KVMessage.from_bytes(data).layers[0]
    with torch_threads(2):
        two = KVMessage.from_bytes(data).layers[0]
    exact = 0.0 if name != "klt" else None  # klt's basis product may round apart by an ulp; the others do not
    torch.testing.assert_close(one.keys, two.keys, rtol=exact, atol=exact)
    torch.testing.assert_close(one.values, two.values, rtol=exact, atol=exact)


@pytest.mark.parametrize("name", [*ENTROPY_CODECS, "fp16", "int8"])
def test_a_whole_message_decodes_two_layers_at_a_time_as_layer_by_layer(name, monkeypatch):
    """``read`` (every layer wanted) hands the helper thread a lane of layers; streaming layer by
    layer does not. The same tensors either way, and the helper got one lane per message."""
    from kvcomm.wire.codecs import base

    layers = large_layers(5)
    book = random_codebook(2, 16, layers=5, seed=3)
    tokens = layers[0].keys.shape[1]
    data = KVMessage({"m": 1}, tokens, 0, layers, make_codec(name).bind(lambda: book)).to_bytes()
    pool = base._helper()
    submitted: list[str] = []

    class Spy:
        def submit(self, job, *args):
            submitted.append(getattr(job, "__name__", ""))
            return pool.submit(job, *args)

    monkeypatch.setattr(base, "_helper", lambda: Spy())
    with torch_threads(2):
        whole = KVMessage.from_bytes(data).layers
        assert submitted == ["lane"]  # one lane; nothing side by side inside it
        streamed = list(MessageReader(io.BytesIO(data)).layers())
    exact = 0.0 if name != "klt" else None  # klt's basis product may round apart by an ulp
    assert [layer.index for layer in whole] == list(range(5))
    for a, b in zip(whole, streamed):
        torch.testing.assert_close(a.keys, b.keys, rtol=exact, atol=exact)
        torch.testing.assert_close(a.values, b.values, rtol=exact, atol=exact)


def test_two_lanes_raise_the_first_error_in_order_after_the_jobs_before_it():
    from kvcomm.wire.codecs.base import PARALLEL_FROM, in_two_lanes

    ran: list[int] = []

    def job(i):
        def run():
            ran.append(i)
            if i in (1, 2):
                raise CorruptMessage(f"layer {i}")
            return i
        return run

    for count in (1, 2):
        with torch_threads(count):
            ran.clear()
            jobs = [job(i) for i in (0, 3, 4, 5)]
            assert in_two_lanes(jobs, PARALLEL_FROM) == [0, 3, 4, 5] and jobs == []  # the list is emptied
            assert sorted(ran) == [0, 3, 4, 5]
            ran.clear()
            with pytest.raises(CorruptMessage, match="layer 1"):  # on two lanes 1 and 2 may run side by side
                in_two_lanes([job(i) for i in range(6)], PARALLEL_FROM)
            assert {0, 1} <= set(ran)
            if count == 1:
                assert ran == [0, 1]  # one lane stops at the error


def split_message(data: bytes) -> tuple[bytes, int, list[bytes]]:
    """A message's header blob, version and layer payloads (no extras), to craft variants of it."""
    version, size = struct.unpack("<HI", data[4:10])
    blob, at, payloads = data[10:10 + size], 14 + size, []
    while data[at:at + 4] != b"KEND":
        (length,) = struct.unpack("<I", data[at:at + 4])
        payloads.append(data[at + 4:at + 4 + length])
        at += 8 + length
    return blob, version, payloads


def test_a_frame_declared_huge_allocates_only_what_arrives(tmp_path):
    """A one-token layer whose header declares a frame of almost 2 GiB, followed by 100 bytes: the
    reader (a file, as ``load`` and the service read) is refused as truncated after taking memory
    for what came, not for what was declared; declared frames over the limit are refused at the header."""
    import tracemalloc

    from tests.conftest import craft

    message = KVMessage({"m": 1}, 1, 0, [LayerKV(0, True, kv_like(2, 1, 16, 0), kv_like(2, 1, 16, 1))],
                        make_codec("fp16"))
    blob, version, _ = split_message(message.to_bytes())
    header = json.loads(blob)
    declared = (1 << 31) - 4096
    header["layers"][0]["bytes"] = declared
    crafted = craft(json.dumps(header).encode(), [b""], version)
    (size,) = struct.unpack("<I", crafted[6:10])
    path = tmp_path / "hostile.kvm"
    path.write_bytes(crafted[:14 + size] + struct.pack("<I", declared) + b"x" * 100)
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedMessage, match=f"100 of {declared} bytes"):
            KVMessage.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    with pytest.raises(MessageTooLarge, match="the header declares"):
        KVMessage.load(path, max_bytes=1 << 20)


def test_a_bad_layer_of_a_whole_message_with_valid_checksums_is_refused_and_named():
    """Layer 1 (the helper's lane) holds a garbled stream under valid checksums: its own error is
    raised, and neither thread is left marked as a lane."""
    from kvcomm.wire.codecs import base
    from tests.conftest import craft

    layers = large_layers(4)
    message = KVMessage({"m": 1}, layers[0].keys.shape[1], 0, layers, make_codec("int4-ans"))
    blob, version, payloads = split_message(message.to_bytes())
    payloads[1] = payloads[1][:-256] + bytes(256)  # the same length: only the decoder can tell
    data = craft(blob, payloads, version)
    with torch_threads(2), pytest.raises(CorruptMessage, match="layer 1"):
        KVMessage.from_bytes(data)
    assert not getattr(base._lane, "active", False)
    assert not base._helper().submit(lambda: getattr(base._lane, "active", False)).result()


@pytest.mark.parametrize("coder", ["rans", "rans-v5", None])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim,length", [(1, 300), (2, 16), (1, 7), (2, 200)])
def test_compiled_dequantisation_equals_torchs_arithmetic(bits, dim, length, coder):
    """The compiled dequantiser computes, bit for bit, ``code * scale + low`` in torch's float32
    over the codes the message holds: packed (``None``), or entropy-coded in the tensor's order
    (``rans``, v6) or group by group (``rans-v5``); any group split, padded or not."""
    from kvcomm.wire.codecs.entropy import ans_decode
    from kvcomm.wire.codecs.quant import dequantize, quantize, unpack

    x = (kv_like(2, length, 16, bits) if dim == 1 else kv_like(2, 5, length, bits)) * 3  # shape[dim] == length
    shape = tuple(x.shape)
    coded = quantize(x, bits, dim, 128, entropy=coder is not None, coder=coder or "rans")
    lead = [n for axis, n in enumerate(shape) if axis != dim]
    group = min(128, length)
    groups = -(-length // group)

    def per_value(t: torch.Tensor) -> torch.Tensor:  # [*lead, groups*group] in group order -> shape
        return t.reshape(*lead, groups * group)[..., :length].movedim(-1, dim)

    def expand(r: torch.Tensor) -> torch.Tensor:  # a range per group -> one per value
        return per_value(r.float().view(*lead, groups, 1).expand(*lead, groups, group))

    if coder is None:
        codes = per_value(torch.from_numpy(unpack(coded["q"], bits, math.prod(lead) * groups * group)).long())
    else:
        count = math.prod(shape) if coder == "rans" else math.prod(lead) * groups * group
        flat = torch.from_numpy(ans_decode(int(coded["q.low"][0]), coded["q.counts"].numpy().astype("int64"),
                                           coded["q.stream"].numpy().view("uint16"), count, coder))
        codes = flat.view(shape) if coder == "rans" else per_value(flat)
    want = codes.float() * expand(coded["scale"]) + expand(coded["low"])
    got = dequantize(coded, bits, dim, 128, shape, coder or "rans")
    assert got.is_contiguous() and torch.equal(got, want)


def test_cachegen_reconstruction_equals_torchs_arithmetic():
    """cachegen's compiled reconstruction is, bit for bit, the anchor plus ``code * step`` in torch."""
    from kvcomm.wire.codecs.entropy import ans_decode
    from kvcomm.wire.codecs.quant import dequantize

    codec = make_codec("cachegen")
    x = kv_like(2, 47, 16, 9)
    coded = codec._encode_one(x, 0, 4)
    anchor_of, is_delta = codec._layout(47)
    anchors = dequantize({n: coded[f"anchor.{n}"] for n in ("q", "low", "scale")}, 8, 1, 5, (2, 5, 16))
    codes = ans_decode(int(coded["low"][0]), coded["counts"].numpy().astype("int64"),
                       coded["stream"].numpy().view("uint16"), 2 * int(is_delta.sum()) * 16)
    want = anchors[:, anchor_of].clone()
    want[:, is_delta] += torch.from_numpy(codes).float().view(2, -1, 16) * coded["step"].float()[:, None]
    assert torch.equal(codec._decoder(coded, (2, 47, 16), 0, 4)(), want)


@pytest.mark.parametrize("broken, match", [("anchor.q", "cannot hold"), ("anchor.scale", "ranges"),
                                           ("step", "steps have shape")])
def test_cachegen_refuses_malformed_parameters_before_any_decoding(broken, match):
    """Everything cachegen reads besides the symbols is checked when a tensor's decoding is
    prepared, on the caller's thread, not inside the call that runs on the decoding thread."""
    codec = make_codec("cachegen")
    coded = codec._encode_one(kv_like(2, 47, 16, 9), 0, 4)
    with pytest.raises(ValueError, match=match):
        codec._decoder({**coded, broken: coded[broken][..., :-1]}, (2, 47, 16), 0, 4)


def auto_message(**params) -> KVMessage:
    book = random_codebook(2, 16, layers=2, seed=5)
    layers = [LayerKV(0, True, kv_like(2, 300, 16, 1), kv_like(2, 300, 16, 2)),
              LayerKV(1, False, kv_like(2, 1, 16, 3), kv_like(2, 1, 16, 4))]
    return KVMessage({"m": 1}, 300, 0, layers, make_codec("auto", **params).bind(lambda: book))


def test_auto_sends_small_codes_over_a_slow_link_and_plain_floats_over_a_fast_one():
    slow = KVMessage.from_bytes(auto_message(bandwidth_mbit=0.01).to_bytes())
    fast = KVMessage.from_bytes(auto_message(bandwidth_mbit=1e6, candidates=["fp16", "klt"]).to_bytes())
    choice = slow.meta["codec_choice"]
    assert choice["chosen"] in ("klt", "int4-ans") and slow.codec.name in ("klt", "quant")
    assert set(choice["candidates"]) == {"fp16", "int8", "int4-ans", "klt"}
    smallest = min(choice["candidates"], key=lambda n: choice["candidates"][n]["bytes"])
    assert choice["chosen"] == smallest  # at 10 kbit/s the transfer outweighs everything
    assert fast.meta["codec_choice"]["chosen"] == "fp16" and fast.codec.name == "raw"
    estimate = fast.meta["codec_choice"]["candidates"]["fp16"]
    # each figure is rounded to 5 decimals on its own
    assert estimate["seconds"] >= max(estimate["transfer_seconds"], estimate["decode_seconds"]) - 1e-5


def _wait(auto, measured, weights):
    """``auto``'s expected wait for a message whose ``measured`` totals (transfer, decode and encode
    seconds) are spread over frames in proportion to ``weights``."""
    total, per_second = sum(weights) or 1, auto.bandwidth_mbit * 1e6 / 8
    travel = [{"bytes": measured["transfer_seconds"] * per_second * w / total,
               "encode_seconds": measured["encode_seconds"] * w / total,
               "decode_seconds": measured["decode_seconds"] * w / total} for w in weights]
    return auto._estimate(travel, measured["error"])


@pytest.mark.parametrize("params, wait", [({}, 2.0 + 0.5 / 4), ({"streamed": False}, 2.5),
                                          ({"count_encode": True}, 3.0 + 2.0 + 0.5 / 4),
                                          ({"streamed": False, "count_encode": True}, 5.5)])
def test_auto_expects_the_wait_of_a_streaming_receiver_of_a_stored_message(params, wait):
    measured = {"bytes": 1, "encode_seconds": 3.0, "decode_seconds": 0.5, "transfer_seconds": 2.0, "error": 0.1}
    assert _wait(make_codec("auto", **params), measured, [1] * 4)["seconds"] == pytest.approx(wait)
    slow_decoder = {**measured, "decode_seconds": 2.0, "transfer_seconds": 0.5}  # decode outlasts the transfer
    assert _wait(make_codec("auto", **params), slow_decoder, [1] * 4)["seconds"] == pytest.approx(wait)


@pytest.mark.parametrize("streamed", [True, False])
def test_auto_with_no_receiver_compute_expects_what_it_did_without_it(streamed):
    measured = {"bytes": 1, "encode_seconds": 3.0, "decode_seconds": 0.5, "transfer_seconds": 2.0, "error": 0.1}
    for decode, transfer in ((0.5, 2.0), (2.0, 0.5), (1.0, 1.0)):
        given = {**measured, "decode_seconds": decode, "transfer_seconds": transfer}
        plain = _wait(make_codec("auto", streamed=streamed, receiver_compute_s=0.0), given, [3] * 7)["seconds"]
        assert plain == pytest.approx(max(transfer, decode) + min(transfer, decode) / 7 if streamed
                                      else transfer + decode, abs=1e-5)  # rounded to 5 decimals


def test_auto_counts_the_receivers_computing_against_decoding_not_against_the_link():
    """Receiver compute R shares the CPU with decoding D while the transfer T runs beside them:
    streamed over L frames, the wait is max(T + (D + R) / L, D + R + T / L)."""
    measured = {"bytes": 1, "encode_seconds": 0.0, "decode_seconds": 0.1, "transfer_seconds": 0.2, "error": 0.1}
    auto = make_codec("auto", receiver_compute_s=1.0)
    assert _wait(auto, measured, [1] * 10)["seconds"] == pytest.approx(max(0.2 + 1.1 / 10, 1.1 + 0.2 / 10))
    whole = make_codec("auto", receiver_compute_s=1.0, streamed=False)
    assert _wait(whole, measured, [1] * 10)["seconds"] == pytest.approx(1.3)
    # a link slower than all the computing: the computing hides behind it but for one frame's share
    slow_link = {**measured, "transfer_seconds": 5.0}
    assert _wait(auto, slow_link, [1] * 10)["seconds"] == pytest.approx(5.0 + 1.1 / 10)
    # computing that merely adds to the wait (R + the same T and D) would give 1.3: the overlap matters
    assert _wait(auto, measured, [1] * 10)["seconds"] < 1.2


def test_auto_follows_the_frames_of_a_message_that_shares_some_layers():
    """Unshared layers travel as one-token sink frames: the shared frames carry the bytes and the
    decoding, while the receiver computes every layer. Frames [sink, shared, shared, sink]: the
    first shared frame is in at T/2, the sink frames cost nothing to fetch or decode."""
    measured = {"bytes": 1, "encode_seconds": 0.0, "decode_seconds": 0.4, "transfer_seconds": 1.0, "error": 0.1}
    auto = make_codec("auto", receiver_compute_s=0.8)
    frames = [0, 1, 1, 0]  # weights of the values each frame holds (a sink's share rounds to nothing)
    # layer 0: 0.2 at once; layer 1: in at 0.5, +0.2 decode +0.2 -> 0.9; layer 2: in at 1.0, +0.4 -> 1.4; layer 3: 1.6
    assert _wait(auto, measured, frames)["seconds"] == pytest.approx(1.6)
    # spread evenly over four frames the same message would be expected later: max(1 + 1.2/4, 1.2 + 1/4)
    assert _wait(auto, measured, [1] * 4)["seconds"] == pytest.approx(1.45)


def test_auto_rounds_the_declared_compute_and_leaves_it_out_when_none():
    assert "receiver_compute_s" not in make_codec("auto").params()  # stored contexts keep their address
    assert make_codec("auto", receiver_compute_s=0.8561).params()["receiver_compute_s"] == 0.86
    near = make_codec("auto", receiver_compute_s=0.857)
    assert make_codec("auto", receiver_compute_s=0.8561).params() == near.params()


def test_auto_prefers_the_cheaper_decoder_once_the_receiver_computes_longer_than_the_link_takes():
    """Fewer bytes that cost more decoding win while the receiver waits on the link, and lose once
    its own computing (the question's prefill) outlasts the transfer: the decoding is then on the
    critical path. The codecs are stand-ins with fixed estimates, so the choice is deterministic."""
    from kvcomm.wire.codecs import auto as auto_module

    small_slow = {"bytes": 2_700_000, "encode_seconds": 0.0, "decode_seconds": 0.10, "transfer_seconds": 0.216,
                  "error": 0.1}
    large_fast = {**small_slow, "bytes": 3_800_000, "decode_seconds": 0.02, "transfer_seconds": 0.307}

    def fake_measure(codec, layer, num_layers):  # one of the message's 10 frames
        whole = small_slow if codec.name == "klt" else large_fast
        return {"bytes": whole["bytes"] / 10, "encode_seconds": 0.0, "decode_seconds": whole["decode_seconds"] / 10,
                "error": 0.1}

    layers = [LayerKV(i, True, kv_like(2, 30, 16, 2 * i), kv_like(2, 30, 16, 2 * i + 1)) for i in range(10)]
    book = random_codebook(2, 16, layers=10, seed=5)
    original = auto_module._measure
    auto_module._measure = fake_measure
    try:
        chosen = {compute: make_codec("auto", candidates=["int4-ans", "klt"], receiver_compute_s=compute)
                  .bind(lambda: book).for_message(layers, 1.0)[1]["codec_choice"] for compute in (0.0, 1.0)}
    finally:
        auto_module._measure = original
    assert chosen[0.0]["chosen"] == "klt" and chosen[1.0]["chosen"] == "int4-ans"
    assert chosen[1.0]["receiver_compute_s"] == 1.0 and "receiver compute" in chosen[1.0]["reason"]
    assert "receiver compute" not in chosen[0.0]["reason"]


def test_auto_keeps_to_the_quality_budget():
    strict = KVMessage.from_bytes(auto_message(bandwidth_mbit=0.01, max_error=0.01).to_bytes())
    choice = strict.meta["codec_choice"]
    assert all(choice["candidates"][n]["error"] > 0.01 for n in ("int4-ans", "klt"))
    assert choice["chosen"] in ("fp16", "int8") and choice["candidates"][choice["chosen"]]["error"] <= 0.01
    none = KVMessage.from_bytes(auto_message(max_error=1e-9, candidates=["int4-ans", "klt"]).to_bytes())
    assert none.meta["codec_choice"]["reason"].startswith("no candidate within")


def test_a_message_encoded_on_demand_counts_its_encoding_only_with_auto():
    from kvcomm.wire.codecs.auto import encoded_on_demand

    waited = encoded_on_demand("auto")
    assert waited.params() == {**make_codec("auto").params(), "count_encode": True}
    assert encoded_on_demand("int8").params() == make_codec("int8").params()
    stored = KVMessage.from_bytes(auto_message().to_bytes()).meta["codec_choice"]["reason"]
    assert stored.startswith("shortest expected wait (each frame arriving, then its decode, in turn)")


@pytest.mark.parametrize("params, match", [({"bandwidth_mbit": 0}, "bandwidth"), ({"candidates": ["auto"]}, "other"),
                                           ({"candidates": ["fp9"]}, "presets"), ({"max_error": -1}, "max_error"),
                                           ({"streamed": "no"}, "true or false"),
                                           ({"count_encode": 1}, "true or false"),
                                           ({"receiver_compute_s": -0.5}, "receiver_compute_s"),
                                           ({"receiver_compute_s": True}, "receiver_compute_s")])
def test_auto_refuses_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        make_codec("auto", **params)


def test_a_header_that_never_closes_its_quote_is_one_linear_scan():
    """A header of ``"`` and escaped quotes (no closing quote) took minutes to strip of strings
    (a regular expression rescanning from every quote, holding the GIL): now refused at once."""
    import time

    from kvcomm.wire.header import nesting_depth
    from tests.conftest import craft

    blob = b'"' + b'\\"' * 131_000
    began = time.perf_counter()
    assert nesting_depth(blob) == 0 and nesting_depth(b'{"a": "[[[ never closed') == 1
    with pytest.raises(CorruptMessage):
        KVMessage.from_bytes(craft(blob, [], version=9))
    assert time.perf_counter() - began < 5  # quadratic: 18.7 s for a quarter of this
    assert nesting_depth(b'{"a": [1, {"b": "x]]] \\" ["}]}') == 3


@pytest.mark.parametrize("codec", sorted(PRESETS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_keys_or_values_that_are_not_finite_are_refused_by_the_writer(codec, bad):
    """Refused with a WireError before any codec sees them (klt's coder wrote past its buffer on
    a NaN; others raised bare errors or wrote messages no reader accepts)."""
    keys, values = kv_like(2, 12, 8, 0), kv_like(2, 12, 8, 1)
    keys[1, 3, 2] = bad
    bound = make_codec(codec).bind(lambda: random_codebook(2, 8, layers=1, seed=0))
    with pytest.raises(WireError, match="NaN or infinity"):
        KVMessage({"m": 1}, 12, 0, [LayerKV(0, True, keys, values)], bound).to_bytes()


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4-ans", "cachegen", "zstd"])
def test_kv_beyond_float16s_range_is_refused_by_codecs_that_store_float16(codec):
    keys, values = kv_like(2, 12, 8, 0), kv_like(2, 12, 8, 1)
    keys[0, 5, 1] = -1e5
    with pytest.raises(WireError, match="float16's range"):
        KVMessage({"m": 1}, 12, 0, [LayerKV(0, True, keys, values)], make_codec(codec)).to_bytes()
    back = KVMessage.from_bytes(KVMessage({"m": 1}, 12, 0, [LayerKV(0, True, keys, values)],
                                          make_codec("fp32")).to_bytes())
    assert back.layers[0].keys[0, 5, 1].item() == -1e5


def test_a_laplace_code_outside_int32_is_refused_not_written_past_the_buffer():
    from kvcomm.wire.codecs.klt import _tables

    with pytest.raises(ValueError, match="outside int32"):
        _tables().encode(np.full(100, -(2**63), dtype=np.int64), np.full(100, 255, dtype=np.uint8))


@pytest.mark.parametrize("codec, name", [("int8", "k.scale"), ("int4-ans", "v.low"), ("cachegen", "k.step"),
                                         ("cachegen", "v.anchor.scale")])
def test_ranges_or_steps_wider_than_float16_are_refused(codec, name):
    """Quantisation ranges and cachegen steps are float16, which is what makes their codecs finite by
    construction (the reader skips its finiteness check for them): a float32 one could reach
    infinity under valid checksums."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from tests.conftest import craft

    keys, values = kv_like(2, 40, 8, 0), kv_like(2, 40, 8, 1)
    data = KVMessage({"m": 1}, 40, 0, [LayerKV(0, True, keys, values)], make_codec(codec)).to_bytes()
    blob, version, payloads = split_message(data)
    tensors = st_load(payloads[0])
    tensors[name] = torch.full(tensors[name].shape, 3e38, dtype=torch.float32)
    payloads[0] = st_save(tensors)
    header = json.loads(blob)
    header["layers"][0]["bytes"] = len(payloads[0])
    with pytest.raises(CorruptMessage, match="float16"):
        KVMessage.from_bytes(craft(json.dumps(header).encode(), payloads, version))


def test_the_writer_refuses_what_no_reader_would_accept():
    """Constant KV that zstd shrinks past the readers' bomb guard, layers of other shapes, no
    layers: each a WireError for the sender, not a message every receiver refuses as corrupt."""
    still = torch.full((2, 300, 64), 0.5)
    with pytest.raises(WireError, match="nearly constant"):
        KVMessage({"m": 1}, 300, 0, [LayerKV(0, True, still, still)], make_codec("zstd")).to_bytes()
    KVMessage.from_bytes(KVMessage({"m": 1}, 300, 0, [LayerKV(0, True, still, still)], make_codec("fp16")).to_bytes())
    layers = [LayerKV(0, True, kv_like(2, 5, 4, 0), kv_like(2, 5, 4, 1)),
              LayerKV(1, True, kv_like(4, 5, 4, 2), kv_like(4, 5, 4, 3))]
    with pytest.raises(WireError, match=r"layers \[1\] have other heads"):
        KVMessage({"m": 1}, 5, 0, layers, make_codec("fp16")).to_bytes()
    with pytest.raises(WireError, match="at least one layer"):
        KVMessage({"m": 1}, 5, 0, [], make_codec("fp16")).to_bytes()


def test_a_header_number_beyond_a_finite_float_is_refused():
    """``1e999`` parses as infinity, which the header could not be written back with (not JSON)."""
    from tests.conftest import craft

    data = message("fp16").to_bytes()
    blob, version, payloads = split_message(data)
    header = json.loads(blob)
    header["meta"]["note"] = 1.5
    edited = json.dumps(header).replace("1.5", "1e999").encode()
    with pytest.raises(CorruptMessage, match="1e999"):
        KVMessage.from_bytes(craft(edited, payloads, version))


def test_auto_leaves_out_the_candidates_a_messages_values_exceed():
    """KV beyond float16's range: ``auto`` over fp32 and fp16 sends fp32; over float16 codecs only
    it is refused with the reason."""
    keys, values = kv_like(2, 12, 8, 0), kv_like(2, 12, 8, 1)
    keys[0, 3, 3] = 1e5
    layers = [LayerKV(0, True, keys, values)]
    sent = KVMessage({"m": 1}, 12, 0, layers, make_codec("auto", candidates=["fp16", "fp32"])).to_bytes()
    back = KVMessage.from_bytes(sent)
    assert back.meta["codec_choice"]["chosen"] == "fp32" and back.layers[0].keys[0, 3, 3].item() == 1e5
    with pytest.raises(WireError, match="float16's range"):
        KVMessage({"m": 1}, 12, 0, layers, make_codec("auto", candidates=["fp16", "int8"])).to_bytes()


def test_auto_and_the_writer_check_hidden_states_as_keys_and_values():
    """A hidden state beyond float16's range: ``auto`` over fp16 and fp32 sends fp32 (before, the fp16
    candidate's error ended it); NaN, or a value a codec cannot carry, is one WireError before any
    codec runs (before, a bare error from the codec, or a message every reader refused)."""
    layers = [LayerKV(0, True, kv_like(2, 12, 8, 0), kv_like(2, 12, 8, 1))]
    hidden = torch.randn(12, 16)
    hidden[4, 2] = 1e5
    sent = KVMessage({"m": 1}, 12, 0, layers, make_codec("auto", candidates=["fp16", "fp32"]), hidden={0: hidden})
    back = KVMessage.from_bytes(sent.to_bytes())
    assert back.meta["codec_choice"]["chosen"] == "fp32" and back.hidden[0][4, 2].item() == 1e5
    for name in ("fp16", "int4-ans", "cachegen"):
        with pytest.raises(WireError, match="hidden state entering layer 0.*float16's range"):
            KVMessage({"m": 1}, 12, 0, layers, make_codec(name), hidden={0: hidden}).to_bytes()
    hidden[4, 2] = float("nan")
    for name in ("fp32", "int8", "int4-ans", "cachegen"):
        with pytest.raises(WireError, match="hidden state entering layer 0 hold NaN"):
            KVMessage({"m": 1}, 12, 0, layers, make_codec(name), hidden={0: hidden}).to_bytes()


def test_auto_leaves_out_a_candidate_whose_bytes_readers_would_take_for_a_bomb():
    """Constant KV: zstd squeezes it under 1/256 of its size, which readers refuse; ``auto`` over fp16
    and zstd sent nothing (the writer refused its choice), and now sends fp16."""
    layers = [LayerKV(i, True, torch.ones(2, 1200, 8), torch.ones(2, 1200, 8)) for i in range(4)]
    with pytest.raises(WireError, match="decompression bomb"):
        KVMessage({"m": 1}, 1200, 0, layers, make_codec("zstd")).to_bytes()
    sent = KVMessage({"m": 1}, 1200, 0, layers, make_codec("auto", candidates=["fp16", "zstd"])).to_bytes()
    assert KVMessage.from_bytes(sent).meta["codec_choice"]["chosen"] == "fp16"


@pytest.mark.parametrize("meta, match", [({"n": 10 ** 25}, "integer of 26 digits"), ({"s": "x" * 300_000}, "bytes"),
                                         ({"d": functools.reduce(lambda inner, _: {"a": inner}, range(20), {})},
                                          "nests deeper")])
def test_the_writer_refuses_a_header_every_reader_would_refuse(meta, match):
    message = golden_message()
    message.meta = {**message.meta, **meta}
    with pytest.raises(WireError, match=match):
        message.to_bytes()


def test_a_header_with_a_lone_surrogate_is_refused():
    """``"\\ud800"`` is valid JSON but no text: accepted, it crashed ``inspect`` when printed."""
    with pytest.raises(CorruptMessage, match="lone surrogate"):
        parse_header(b'{"mode": "causal", "meta": {"a": "te\\ud800st"}}', 9)


@pytest.mark.parametrize("name", ["klt", "auto"])
def test_a_pickled_codec_carries_its_codebook_and_no_model(name, tmp_path, monkeypatch):
    """A codec pickled to a cluster's worker on another machine (no codebook there) decodes what the
    driver encoded: it carries its codebook; ``auto`` carries the codebook it was bound to, made at
    once, not the call that makes it (before, that call held the run's models and went with every
    job, and a worker elsewhere refused ``klt`` for want of the codebook)."""
    import pickle

    from kvcomm.wire import codebook as codebooks

    heads, dim, tokens = 2, 8, 6
    book = random_codebook(heads, dim, layers=2, seed=3)
    heavy = torch.zeros(1 << 20)  # what a bound call may reach (the run's models)
    codec = make_codec(name, **({"bandwidth_mbit": 1.0} if name == "auto" else {}))
    codec = codec.bind(lambda: (heavy, book)[1])
    data = pickle.dumps(codec)
    assert len(data) < len(book.to_bytes()) + 4096  # the codebook, not the heavy tensor
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(heads, tokens, dim, generator=g) for _ in range(2))
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path / "elsewhere"))  # another machine: no codebooks
    monkeypatch.setattr(codebooks, "_LOADED", {})
    arrived = pickle.loads(data)
    if name == "auto":  # its klt candidate, bound to the codebook the arrived codec carries
        assert arrived._codebook is not None
        arrived = make_codec("klt").bind(arrived._codebook)
    encoded = make_codec("klt").bind(lambda: book).encode(keys, values, 0, 2)
    out_k, out_v = arrived.decode(encoded, (heads, tokens, dim), 0, 2)
    want_k, want_v = make_codec("klt").bind(lambda: book).decode(encoded, (heads, tokens, dim), 0, 2)
    assert torch.equal(out_k, want_k) and torch.equal(out_v, want_v)
    assert (tmp_path / "elsewhere" / f"{book.id}.safetensors").is_file()
    if name == "auto":  # no candidate rotating with a codebook: none is made to be carried
        def refuses():
            raise AssertionError("no codebook is made for candidates that need none")

        plain = make_codec("auto", bandwidth_mbit=1.0, candidates=["fp16", "int8"]).bind(refuses)
        assert pickle.loads(pickle.dumps(plain)).candidates == ["fp16", "int8"]


def test_a_carried_codebook_that_is_not_the_named_one_is_refused(tmp_path, monkeypatch):
    from kvcomm.wire import codebook as codebooks

    book, other = random_codebook(2, 8, layers=2, seed=3), random_codebook(2, 8, layers=2, seed=4)
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path))
    monkeypatch.setattr(codebooks, "_LOADED", {})
    with pytest.raises(WireError, match=f"hashes to {other.id}, not the {book.id}"):
        codebooks.arrived(other.to_bytes(), book.id)


def test_auto_estimates_each_frame_so_sinks_and_hidden_states_count():
    """Each frame's fixed cost (safetensors header, scales, rANS tables) and the hidden-state and
    token-id frames are counted: a message of a few short shared layers and many one-token sink
    frames was estimated at a fraction of its bytes, and ``auto`` could send a lossy codec whose
    message was larger than fp16's."""
    def message(codec, hidden=False):
        layers = [LayerKV(i, i < 2, kv_like(2, 12 if i < 2 else 1, 64, i), kv_like(2, 12 if i < 2 else 1, 64, 50 + i))
                  for i in range(20)]
        return KVMessage({"m": 1}, 12, 0, layers, codec, token_ids=torch.arange(12),
                         hidden={3: kv_like(1, 12, 96, 7)[0]} if hidden else {})

    for hidden in (False, True):
        sent = KVMessage.from_bytes(message(make_codec("auto", bandwidth_mbit=1.0), hidden).to_bytes())
        choice = sent.meta["codec_choice"]
        for name, estimate in choice["candidates"].items():
            real = len(message(make_codec(name), hidden).to_bytes())  # the header (a few hundred bytes) aside
            assert 0.9 * real <= estimate["bytes"] <= real, (name, hidden)
        fastest = min(choice["candidates"], key=lambda n: choice["candidates"][n]["seconds"])
        assert choice["chosen"] == fastest  # within the budget: every candidate here is


def test_loading_a_message_that_is_not_a_readable_file_is_a_wire_error(tmp_path):
    with pytest.raises(WireError, match="cannot read the message .*No such file"):
        KVMessage.load(tmp_path / "missing.kvc")
    with pytest.raises(WireError, match="Is a directory"):
        KVMessage.load(tmp_path)


def test_a_zstd_payload_is_never_inflated_past_its_declared_size():
    """A frame that states a larger content size was decompressed in full before its length was
    checked (64 KB of message made 2 GiB); one that states none is read only to the size + 1."""
    import resource

    import numpy as np
    import zstandard

    codec = make_codec("zstd")
    shape = (1, 4, 8)  # 64 float16 values, keys and values: 128 bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for stated in (True, False):
        packed = zstandard.ZstdCompressor(write_content_size=stated).compress(bytes(64 << 20))
        tensors = {"zstd": torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).copy())}
        with pytest.raises(ValueError, match="zstd payload (states|holds more than)"):
            codec.decode(tensors, shape, 0, 1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10  # KiB: below the 64 MiB


def test_what_a_codec_writes_its_readers_take_even_at_the_edge_of_float16():
    """cachegen's and klt's steps (float16) could overflow to infinity on values float16 holds:
    the writer wrote messages every reader refused as corrupt. bf16 took float32 values above
    bfloat16's range (infinite once cast)."""
    alternating = torch.full((2, 30, 16), 60000.0) * (torch.arange(30) % 2 * 2 - 1)[None, :, None]
    book = random_codebook(2, 16, layers=1, seed=3)
    for codec in (make_codec("cachegen"), make_codec("klt", step=16.0).bind(lambda: book)):
        layers = [LayerKV(0, True, alternating, -alternating)]
        back = KVMessage.from_bytes(KVMessage({"m": 1}, 30, 0, layers, codec).to_bytes())
        assert back.layers[0].keys.isfinite().all(), codec.name
    huge = torch.full((1, 2, 4), 3.4e38)
    with pytest.raises(WireError, match="bfloat16's range.*send it with fp32$"):
        KVMessage({"m": 1}, 2, 0, [LayerKV(0, True, huge, huge)], make_codec("bf16")).to_bytes()


def test_auto_spreads_the_receivers_computing_over_layer_frames_only():
    """A token-id or hidden-state frame is no layer: the receiver's per-layer computing does not
    follow it (before, each such frame took a layer's share and the last share came after the end)."""
    auto = make_codec("auto", receiver_compute_s=1.0, bandwidth_mbit=1.0)  # 125,000 bytes a second
    layer = {"bytes": 10.0, "encode_seconds": 0.0, "decode_seconds": 0.0}
    ids = {"bytes": 250_000.0, "encode_seconds": 0.0, "decode_seconds": 0.0, "layer": 0.0}  # 2 s, last
    # the two layers are computed (0.5 s each) while the ids arrive; nothing is left to compute after
    assert auto._estimate([layer, layer, ids], 0.1)["seconds"] == pytest.approx(2.0, abs=1e-3)  # before: 2.33


def test_float16_ranges_widen_bit_for_bit_and_refuse_what_is_not_finite():
    """Ranges and steps are widened by look-up in compiled code (``quant.finite_float32``): every
    finite float16, subnormals and both zeros included, gives torch's float32 bit for bit, and an
    infinity or NaN anywhere, or a wider dtype, is refused."""
    from kvcomm.wire.codecs.quant import finite_float32

    every = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.float16))
    finite = every[torch.isfinite(every)]
    assert finite.numel() == (1 << 16) - 2 * 1024  # 2 x 1,024 patterns are infinities or NaN
    widened = finite_float32(finite.reshape(62, -1), "ranges")
    assert widened.shape == (finite.numel(),)
    assert np.array_equal(widened.view(np.uint32), finite.float().numpy().view(np.uint32))
    for bad in (float("inf"), float("-inf"), float("nan")):
        values = torch.ones(3, 5, dtype=torch.float16)
        values[2, 4] = bad
        with pytest.raises(ValueError, match="ranges are not finite"):
            finite_float32(values, "ranges")
    with pytest.raises(ValueError, match="ranges are float16, not torch.float32"):
        finite_float32(torch.ones(3), "ranges")
