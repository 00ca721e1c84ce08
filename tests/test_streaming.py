"""Receiving a message while it arrives: the same message as reading it whole, layers decoded before
the last byte is in, and every refusal of a whole read."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomm.errors import CorruptMessage, FingerprintMismatch, TruncatedMessage
from kvcomm.serve import Client, MemoryStore, ServiceError
from kvcomm.serve.app import ServeConfig, create_app
from kvcomm.wire import KVMessage, LayerKV, make_codec
from kvcomm.wire.streaming import Timeline, receive
from tests.conftest import running, tiny_loaded
from tests.test_wire import kv_like


def message_bytes(codec: str = "fp16", layers: int = 6, tokens: int = 64) -> bytes:
    entries = [LayerKV(i, True, kv_like(2, tokens, 16, i), kv_like(2, tokens, 16, 50 + i)) for i in range(layers)]
    return KVMessage({"m": 1}, tokens, 0, entries, make_codec(codec), {"n": 1}).to_bytes()


def pieces(data: bytes, sizes: list[int]):
    at, i = 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)]
        yield data[at:at + size]
        at, i = at + size, i + 1


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8), codec=st.sampled_from(["fp16", "int4-ans"]))
def test_any_chunking_gives_the_message_a_whole_read_gives(sizes, codec):
    data = message_bytes(codec)
    whole, streamed = KVMessage.from_bytes(data), receive(pieces(data, sizes))
    assert streamed.meta == whole.meta and streamed.context_len == whole.context_len
    for a, b in zip(whole.layers, streamed.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_layers_decode_while_the_rest_arrives():
    data = message_bytes(layers=8, tokens=256)
    step = len(data) // 16
    arrived = []

    def slow():
        for chunk in pieces(data, [step]):
            time.sleep(0.03)
            arrived.append(time.perf_counter())
            yield chunk

    timeline = Timeline()
    began = time.perf_counter()
    receive(slow(), timeline=timeline)
    last_byte = arrived[-1] - began
    assert len(timeline.layers) == 8 and timeline.layers[0] < last_byte - 0.2  # decoded long before the end
    assert timeline.done >= last_byte


def test_a_stream_is_refused_as_a_whole_read_is():
    data = message_bytes()
    with pytest.raises(TruncatedMessage):
        receive(pieces(data[:-40], [1000]))
    with pytest.raises(CorruptMessage, match="trailing"):
        receive(pieces(data + b"x", [1000]))
    with pytest.raises(FingerprintMismatch):
        receive(pieces(data, [1000]), receiver={"m": 2})

    def broken():
        yield data[:100]
        raise ConnectionResetError("link down")

    with pytest.raises(ConnectionResetError, match="link down"):
        receive(broken())


def test_the_client_receives_a_stored_message_layer_by_layer():
    agent = tiny_loaded("llama")
    app = create_app(agent, MemoryStore(1 << 24), ServeConfig())
    with running(app) as url, Client(url) as client:
        created = client.create_context("Mira lives in Oslo. Tom lives in Rome.", codec="int8")
        timeline = Timeline()
        got = client.receive_message(created["id"], receiver=agent.fingerprint, timeline=timeline)
        whole = KVMessage.from_bytes(client.get_message(created["id"]))
        assert got.shared_layers == whole.shared_layers and len(timeline.layers) == len(got.layers)
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(got.layers, whole.layers))
        with pytest.raises(ServiceError) as missing:
            client.receive_message("nope")
        assert missing.value.status == 404


class Stalling:
    """A one-connection HTTP server that sends a message's first bytes and then stalls (a stuck
    peer, or a link gone quiet); :attr:`hung_up` is set when the client closes its end."""

    def __init__(self, data: bytes, sent: int = 2000) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.hung_up = threading.Event()
        threading.Thread(target=self._serve, args=(data, sent), daemon=True).start()

    def _serve(self, data: bytes, sent: int) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(data) + data[:sent])
            conn.settimeout(90)
            try:
                if conn.recv(1) == b"":
                    self.hung_up.set()
            except OSError:  # reset by the client: hung up too
                self.hung_up.set()

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize("leaving", ["after-the-header", "error-in-the-block", "fingerprint-mismatch"])
def test_leaving_arriving_early_hangs_up_at_once(leaving):
    """A block left before the body's end closes the connection and ends the receiving threads at
    once, not at the read timeout (60 s here): before, both lived on until it."""
    server = Stalling(message_bytes(layers=6, tokens=64))
    before = set(threading.enumerate())
    expected = {"after-the-header": contextlib.nullcontext(), "error-in-the-block": pytest.raises(RuntimeError),
                "fingerprint-mismatch": pytest.raises(FingerprintMismatch)}[leaving]
    try:
        with Client(server.url, timeout=60) as client:
            began = time.monotonic()
            with expected:
                with client.arriving("m", receiver={"m": 2} if leaving == "fingerprint-mismatch" else None) as arrival:
                    assert arrival.header.context_len == 64
                    if leaving == "error-in-the-block":
                        raise RuntimeError("the receiver's own failure")
            assert server.hung_up.wait(5) and time.monotonic() - began < 5
        receiving = [t for t in set(threading.enumerate()) - before if t.name.startswith("kvcomm-")]
        for thread in receiving:
            thread.join(max(0.0, began + 5 - time.monotonic()))
            assert not thread.is_alive(), thread.name
    finally:
        server.close()
