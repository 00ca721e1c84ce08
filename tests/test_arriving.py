"""A receiver that prefills while the message arrives: the logits of receiving it whole, layer l
used before the last byte is in, nothing computed from the last layer before the digest passed,
and every refusal of a whole read."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

import kvcomm
from kvcomm.errors import CorruptMessage, FingerprintMismatch, ProtocolError
from kvcomm.protocol import pad_left, prefill_logits, receiver_input
from kvcomm.protocol.arriving import ArrivingCache
from kvcomm.serve import Client, MemoryStore
from kvcomm.serve.app import ServeConfig, create_app
from kvcomm.wire import KVMessage
from kvcomm.wire.streaming import Arrival, ChunkStream, StreamClosed
from tests.conftest import running, tiny_loaded
from tests.test_streaming import pieces

CONTEXT = "Mira lives in Oslo. Tom lives in Rome. Ada lives in Lima."
QUESTION = "Where does Tom live?"


def question(agent) -> tuple[torch.Tensor, torch.Tensor]:
    """The receiver's prompt, as ids and validity (one row)."""
    return pad_left([agent.encode_message(QUESTION)], agent.pad_id)


@pytest.mark.parametrize("mode", ["causal", "shift-back", "legacy", "padded-sink"])
@pytest.mark.parametrize("codec", ["fp32", "int4-ans"])
def test_logits_equal_those_of_the_whole_message(family, mode, codec):
    agent = tiny_loaded(family)
    data = kvcomm.encode_context(agent, CONTEXT, layers=[1, 2], codec=codec, mode=mode).to_bytes()
    ids, valid = question(agent)
    whole = prefill_logits(agent.model, receiver_input(KVMessage.from_bytes(data).to_shared(agent.dtype)), ids, valid)
    with Arrival(pieces(data, [97, 1000, 13]), receiver=agent.fingerprint) as arrival:
        assert torch.equal(whole, prefill_logits(agent.model, arrival.receiver_input(agent.dtype), ids, valid))


def test_layer_l_is_used_before_the_last_byte_is_sent(family):
    agent = tiny_loaded(family)
    message = kvcomm.encode_context(agent, CONTEXT, layers=[0, 2], codec="fp16")
    data = message.to_bytes()
    layers = len(message.layers)
    held: dict[str, ArrivingCache] = {}

    def held_back():  # everything but the last 600 bytes, then the rest once the forward is at the last layer
        yield data[:-600]
        deadline = time.monotonic() + 30
        while "cache" not in held or held["cache"].arrived < layers - 1:
            assert time.monotonic() < deadline, "the forward never started on the layers that were in"
            time.sleep(0.01)
        yield data[-600:]

    ids, valid = question(agent)
    with Arrival(held_back(), receiver=agent.fingerprint) as arrival:
        start = arrival.receiver_input(agent.dtype)
        assert isinstance(start.cache, ArrivingCache)
        held["cache"] = start.cache
        arriving = prefill_logits(agent.model, start, ids, valid)
    decoded = KVMessage.from_bytes(data).to_shared(agent.dtype)
    assert torch.equal(prefill_logits(agent.model, receiver_input(decoded), ids, valid), arriving)
    assert start.cache.arrived == layers


def test_the_last_layer_waits_for_the_digest_and_a_bad_one_abandons_the_forward(family):
    agent = tiny_loaded(family)
    data = bytearray(kvcomm.encode_context(agent, CONTEXT, layers=[1], codec="fp16").to_bytes())
    data[-1] ^= 0xFF  # the whole-message digest
    ids, valid = question(agent)
    with Arrival(pieces(bytes(data), [500]), receiver=agent.fingerprint) as arrival:
        start = arrival.receiver_input(agent.dtype)
        with pytest.raises(CorruptMessage, match="digest"):
            prefill_logits(agent.model, start, ids, valid)
        assert isinstance(start.cache, ArrivingCache) and start.cache.arrived == agent.num_layers - 1


def test_a_corrupt_frame_stops_the_forward_at_that_layer():
    agent = tiny_loaded("llama")
    message = kvcomm.encode_context(agent, CONTEXT, layers=[0, 1, 2, 3], codec="fp16")
    data = bytearray(message.to_bytes())
    data[-200] ^= 0xFF  # inside the last layer's payload: its CRC fails
    ids, valid = question(agent)
    with Arrival(pieces(bytes(data), [300]), receiver=agent.fingerprint) as arrival:
        start = arrival.receiver_input(agent.dtype)
        with pytest.raises(CorruptMessage, match="checksum"):
            prefill_logits(agent.model, start, ids, valid)
        with pytest.raises(CorruptMessage):
            arrival.message()


def test_closing_mid_message_stops_both_threads():
    agent = tiny_loaded("llama")
    data = kvcomm.encode_context(agent, CONTEXT, layers=[0, 1, 2, 3], codec="fp32").to_bytes()

    def slow():
        for chunk in pieces(data, [200]):
            time.sleep(0.02)
            yield chunk

    arrival = Arrival(slow(), receiver=agent.fingerprint)
    arrival.layer(0)
    began = time.perf_counter()
    arrival.close()
    assert time.perf_counter() - began < 5 and not arrival._thread.is_alive()
    with pytest.raises(StreamClosed):
        arrival.message()


def stalling(data: bytes, keep: int, release: threading.Event):
    """All but the last ``keep`` bytes, then a link that stalls until ``release`` (at most 60 s)."""
    yield data[:-keep]
    release.wait(60)
    yield data[-keep:]


def test_a_stalled_link_neither_delays_an_error_nor_blocks_closing():
    agent = tiny_loaded("llama")
    data = kvcomm.encode_context(agent, CONTEXT, layers=[0, 1, 2, 3], codec="fp32").to_bytes()
    bad = bytearray(data)
    header = int.from_bytes(data[6:10], "little")
    bad[10 + header + 4 + 4 + 20] ^= 0xFF  # inside layer 0's payload (after the header, its CRC, the frame length)
    release = threading.Event()
    try:
        began = time.perf_counter()
        with Arrival(stalling(bytes(bad), 500, release), receiver=agent.fingerprint) as arrival:
            with pytest.raises(CorruptMessage, match="checksum"):
                arrival.layer(agent.num_layers - 1)
        assert time.perf_counter() - began < 10  # not the stall's 60 s
        began = time.perf_counter()
        arrival = Arrival(stalling(data, 500, release), receiver=agent.fingerprint)
        arrival.layer(0)
        arrival.close()
        assert time.perf_counter() - began < 10 and not arrival._thread.is_alive()
        with pytest.raises(StreamClosed):
            arrival.message()
    finally:
        release.set()


def read_until_it_fails(stream: ChunkStream, got: list[BaseException]) -> None:
    try:
        while stream.read(1):
            pass
    except BaseException as err:  # what closing gave the reader
        got.append(err)


def test_closing_wakes_a_reader_even_with_a_full_queue():
    for _ in range(50):
        stream = ChunkStream(itertools.repeat(b"x"), ahead=1)
        got: list[BaseException] = []
        reader = threading.Thread(target=read_until_it_fails, args=(stream, got))
        reader.start()
        time.sleep(0.002)
        stream.close()
        reader.join(5)
        assert not reader.is_alive() and isinstance(got[0], StreamClosed)


def test_prefilling_while_it_arrives_needs_the_receiver_checked():
    agent, other = tiny_loaded("llama"), tiny_loaded("qwen2")
    data = kvcomm.encode_context(agent, CONTEXT, layers=[1], codec="fp16").to_bytes()
    with Arrival(pieces(data, [700])) as arrival:
        with pytest.raises(ProtocolError, match="fingerprint"):
            arrival.receiver_input(agent.dtype)
        with pytest.raises(FingerprintMismatch):
            arrival.receiver_input(agent.dtype, other.fingerprint)
        assert isinstance(arrival.receiver_input(agent.dtype, agent.fingerprint).cache, ArrivingCache)


def test_the_client_answers_while_the_message_arrives():
    agent = tiny_loaded("qwen2")
    app = create_app(agent, MemoryStore(1 << 24), ServeConfig())
    with running(app) as url, Client(url) as client:
        created = client.create_context(CONTEXT, codec="int8")
        whole = kvcomm.answer(agent, KVMessage.from_bytes(client.get_message(created["id"])), QUESTION, 6)
        with client.arriving(created["id"], receiver=agent.fingerprint) as arrival:
            text = kvcomm.answer(agent, arrival, QUESTION, 6)
            assert arrival.message().context_len == created["context_tokens"]
        assert text == whole


def test_a_layer_the_message_does_not_have_is_refused_at_once():
    agent = tiny_loaded("llama")
    data = kvcomm.encode_context(agent, CONTEXT, layers=[1], codec="fp16").to_bytes()
    with Arrival(pieces(data, [700]), receiver=agent.fingerprint) as arrival:
        for index in (-1, agent.num_layers):
            with pytest.raises(IndexError, match="layer"):
                arrival.layer(index)
        assert arrival.layer(agent.num_layers - 1).index == agent.num_layers - 1


@pytest.mark.parametrize("mode", ["padded-sink", "padded-zero"])
def test_a_padded_mask_mode_is_refused_for_kv_that_arrives(mode):
    """Padded modes widen the sink-only layers before the forward, which KV still arriving cannot
    be: refused, where before the causal result came back under the padded mode's name."""
    from kvcomm.errors import ProtocolError
    from kvcomm.protocol.arriving import arriving_input

    with pytest.raises(ProtocolError, match=f"not {mode}"):
        arriving_input(lambda layer: None, [torch.zeros(1, 1, dtype=torch.long)], 1, mode, 4, 1, 2)
