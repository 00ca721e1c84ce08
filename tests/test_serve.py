"""The agent service on a tiny model: routes, OpenAI compatibility, faults, concurrency, restarts."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time
from dataclasses import replace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from kvcomm.errors import ConfigError, MessageTooLarge
from kvcomm.serve import Client, DiskStore, MemoryStore, ServiceError
from kvcomm.serve.app import ServeConfig, create_app
from kvcomm.serve.errors import ServiceRefusal
from kvcomm.serve.retry import NOTHING_DONE_HEADER, busy_headers, retry_after
from kvcomm.wire import KVMessage
from tests.conftest import running, tiny_loaded


@pytest.fixture(scope="module")
def agent():
    return tiny_loaded("llama")


@pytest.fixture
def app(agent):
    return create_app(agent, MemoryStore(1 << 24), ServeConfig(max_request_bytes=1 << 20, max_message_bytes=1 << 20,
                                                               served_model_names=("tiny",)))


@pytest.fixture
def http(app):
    with TestClient(app) as client:
        yield client


def chat(http, question, kv=(), max_tokens=5, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "kv_messages": list(kv), **extra}
    return http.post("/v1/chat/completions", json=body)


def test_context_message_round_trip_and_chat(http, agent):
    created = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "layers": [0, 2], "codec": "fp16"})
    assert created.status_code == 200, created.text
    info = created.json()
    assert info["layers"] == [0, 2] and info["fingerprint"] == agent.fingerprint
    data = http.get(f"/v1/messages/{info['id']}").content
    assert len(data) == info["bytes"] and KVMessage.from_bytes(data).shared_layers == [0, 2]
    assert http.put("/v1/messages/copy", content=data).json()["bytes"] == len(data)
    by_id = chat(http, "Where?", [info["id"]]).json()
    inline = chat(http, "Where?", [{"data": base64.b64encode(data).decode()}]).json()
    assert by_id["choices"][0]["message"] == inline["choices"][0]["message"]
    assert by_id["usage"]["kv_bytes_received"] == len(data) and by_id["usage"]["kv_tokens_received"] > 0
    assert by_id["object"] == "chat.completion" and by_id["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_messages_as_context(http):
    created = http.post("/v1/contexts", json={"messages": [{"role": "user", "content": "Remember: Oslo."}]})
    assert created.status_code == 200 and created.json()["context_tokens"] > 0


def test_streaming_equals_non_streaming(http):
    whole = chat(http, "Tell me", max_tokens=6).json()["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me"}],
                                                           "max_tokens": 6, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any("usage" in c for c in chunks)  # OpenAI's: no usage unless stream_options asks


def _streamed(http, **extra):
    body = {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 6, "stream": True, **extra}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        return response.status_code, [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_stream_sends_its_usage_as_one_last_chunk_only_when_stream_options_asks(http):
    """Before, every stream's finishing chunk carried the usage, and stream_options was ignored:
    OpenAI's sends it only with include_usage, as one more chunk with no choices (the others null)."""
    whole = chat(http, "Tell me", max_tokens=6).json()
    for options in ({"include_usage": True}, {"include_usage": True, "include_obfuscation": False}):
        status, events = _streamed(http, stream_options=options)
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    for options in ({"include_usage": False}, {"include_usage": None}, {}, None):
        status, events = _streamed(http, stream_options=options)
        assert status == 200 and not any("usage" in json.loads(e) for e in events[:-1])


@pytest.mark.parametrize("extra, message", [
    ({"stream_options": {"include_usage": "y"}}, "stream_options.include_usage: expected true or false, got a string"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage: expected true or false, got a number"),
    ({"stream_options": 5}, "stream_options: expected an object, got a number"),
    ({"stream_options": [True]}, "stream_options: expected an object, got an array"),
    ({"stream_options": {"usage": True}}, "Unrecognized request argument supplied: stream_options.usage"),
    ({"stream_options": {"include_usage": True}, "stream": False}, "stream_options: only allowed when stream is true"),
])
def test_malformed_stream_options_are_a_400_naming_them(http, extra, message):
    refused = chat(http, "Tell me", **({"stream": True} | extra))
    assert refused.status_code == 400 and refused.json()["error"]["message"] == message
    assert refused.json()["error"]["param"] == "stream_options"


def test_bad_input_gets_clear_4xx_and_stores_nothing(http, agent):
    assert http.put("/v1/messages/junk", content=b"not a message").status_code == 422
    assert http.put("/v1/messages/../x", content=b"x").status_code in (400, 404)
    assert chat(http, "q", ["missing"]).status_code == 404
    assert chat(http, "q", max_tokens=10_000).status_code == 400
    lone = chat(http, "q", kv_blend={"ratio": 0.5})  # nothing to blend
    assert lone.status_code == 400 and lone.json()["error"]["param"] == "kv_blend"
    assert http.post("/v1/contexts", json={"context": "x", "layers": [99]}).status_code == 400
    unknown = http.post("/v1/contexts", json={"context": "x", "unknown": 1})
    assert unknown.status_code == 400 and "Unrecognized request argument supplied: unknown" in unknown.text
    huge = b"x" * ((1 << 20) + 1)
    assert http.put("/v1/messages/huge", content=huge).status_code == 413
    foreign = KVMessage.from_bytes(http.get(
        f"/v1/messages/{http.post('/v1/contexts', json={'context': 'x'}).json()['id']}").content)
    foreign.fingerprint["vocab_sha256"] = "0" * 32
    assert http.put("/v1/messages/foreign", content=foreign.to_bytes()).status_code == 409
    assert "junk" not in http.app.state.store.list() and "foreign" not in http.app.state.store.list()


def test_a_character_split_across_tokens_streams_whole_and_the_deltas_add_up_to_the_reply():
    """A stream sent U+FFFD for a character's first bytes, after which no decode extended what it
    had sent: everything after the first emoji or CJK character was lost, and [DONE] still came."""
    from fastapi import FastAPI

    from kvcomm.serve.metrics import ServiceMetrics
    from kvcomm.serve.responses import stream_events
    from kvcomm.serve.worker import Job, ModelWorker

    pieces = [b"I", b" love", b" \xf0", b"\x9f", b"\x8d", b"\x95", b" and", b" \xe6", b"\x9d\xb1", b"\xe4\xba\xac",
              b".",
              b" \xe6"]  # the last character never completes

    class Agent:
        def decode(self, ids):
            return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace").strip()

    def work(job, emit):
        for token in range(len(pieces)):
            emit(token)
        return list(range(len(pieces))), "length"

    async def run():
        metrics = ServiceMetrics(FastAPI(), MemoryStore())
        return [event async for event in stream_events(ModelWorker(metrics), Job(30), Agent(), work, 3, "m",
                                                       lambda: {}, time.monotonic(), metrics)]

    events = asyncio.run(run())
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events
              if e.startswith("data: {") and "choices" in e]
    assert "".join(deltas) == Agent().decode(range(len(pieces))) == "I love 🍕 and 東京. \ufffd"
    assert not any(d.endswith("\ufffd") for d in deltas[:-2]) and events[-1] == "data: [DONE]\n\n"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_messages_that_cannot_be_joined_are_refused_before_the_answer_begins(http, stream):
    """Contexts at other layers or in another mask mode are refused with a 4xx before any 200,
    streamed or not (before, a stream answered 200 and then a server error)."""
    def context(text, **options):
        return http.post("/v1/contexts", json={"context": text, "codec": "fp32", **options}).json()["id"]

    first, other_layers = context("Mira lives in Oslo.", layers=[0, 2]), context("Oslo is cold.", layers=[1, 3])
    other_mode = context("Oslo is cold.", layers=[0, 2], mode="shift-back")
    for pair in ([first, other_layers], [first, other_mode]):
        answer = chat(http, "Where?", pair, stream=stream)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "unjoinable_kv_messages"
    assert chat(http, "Where?", [first, context("Oslo is cold.", layers=[0, 2])], stream=stream).status_code == 200


def test_a_message_larger_than_the_store_is_refused_as_too_large_before_the_prefill(agent, monkeypatch):
    """A store smaller than the service's message limit lowers the limit: the context is refused
    (413) before any prefill, not stored-and-failed after it as a bad id."""
    from kvcomm.serve.errors import describe_kvcomm_error
    from kvcomm.serve.stores import StoreFull

    app = create_app(agent, MemoryStore(8192), ServeConfig(served_model_names=("tiny",)))
    from kvcomm.serve import contexts as contexts_module

    prefills = []
    real = contexts_module.encode_ids
    monkeypatch.setattr(contexts_module, "encode_ids", lambda *a, **k: prefills.append(a) or real(*a, **k))
    with TestClient(app) as client:
        refused = client.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 5, "codec": "fp32"})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "message_too_large"
        assert "8,192" in refused.json()["error"]["message"] and not prefills
    assert describe_kvcomm_error(StoreFull("x"))[:3] == (507, "server_error", "store_full")
    with pytest.raises(StoreFull):
        MemoryStore(10).put("m", b"x" * 11)


def counting_checks(agent, monkeypatch):
    """An app that prefills 4 tokens at a time, the list its jobs' deadline checks are counted in,
    and the real check (to put back)."""
    from kvcomm.serve import worker as worker_module

    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(served_model_names=("tiny",), prefill_chunk=4))
    checks: list[int] = []
    real = worker_module.Job.check

    def counted(job):
        checks.append(1)
        real(job)

    monkeypatch.setattr(worker_module.Job, "check", counted)
    return app, checks, real


def test_a_contexts_prefill_keeps_the_deadline_and_the_same_content_is_prefilled_once(agent, monkeypatch):
    """/v1/contexts prefills in chunks, checking the request's deadline between them (504), and
    stores its message before the next request looks: identical requests at once, one prefill."""
    import concurrent.futures

    from kvcomm.serve import worker as worker_module

    app, checks, real = counting_checks(agent, monkeypatch)
    with TestClient(app) as client:
        made = client.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 3, "codec": "fp32"})
        assert made.status_code == 200 and len(checks) > made.json()["context_tokens"] // 4  # every chunk checked
        def expires_after_the_first_chunk(job):
            checks.append(1)
            if len(checks) > 2:  # the worker's check before the work, then the first chunk's
                raise worker_module.Stopped("deadline")

        monkeypatch.setattr(worker_module.Job, "check", expires_after_the_first_chunk)
        checks.clear()
        late = client.post("/v1/contexts", json={"context": "Lena lives in Rome. " * 3, "codec": "fp32"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        monkeypatch.setattr(worker_module.Job, "check", real)
        body = {"context": "Omar lives in Cairo.", "codec": "fp32"}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/contexts", json=body).json(), range(4)))
        assert len({a["id"] for a in answers}) == 1 and sum(not a["cached"] for a in answers) == 1


def test_kv_blend_is_chunked_and_keeps_the_deadline(agent, monkeypatch):
    """kv_blend's pass over every context token runs ``prefill_chunk`` tokens at a time, with the
    request's deadline checked before each chunk and before the recompute: a deadline that passes
    during the blend answers 504."""
    from kvcomm.serve import worker as worker_module

    app, checks, _ = counting_checks(agent, monkeypatch)
    with TestClient(app) as client:
        made = [client.post("/v1/contexts", json={"context": text, "codec": "fp32"}).json()
                for text in ("Mira lives in Oslo. " * 2, "Oslo is in Norway. " * 2)]
        tokens = sum(m["context_tokens"] for m in made)
        checks.clear()
        assert chat(client, "Where?", [m["id"] for m in made], max_tokens=1).status_code == 200
        without = len(checks)
        checks.clear()
        blended = chat(client, "Where?", [m["id"] for m in made], max_tokens=1, kv_blend={"ratio": 0.5})
        assert blended.status_code == 200, blended.text
        assert len(checks) - without == -(-tokens // 4) + 1  # one per chunk of the context, one before the recompute

        def expires_in_the_blend(job):
            checks.append(1)
            if len(checks) > 2:  # the worker's check before the work, then the blend's first chunk's
                raise worker_module.Stopped("deadline")

        monkeypatch.setattr(worker_module.Job, "check", expires_in_the_blend)
        checks.clear()
        late = chat(client, "Where?", [m["id"] for m in made], max_tokens=1, kv_blend={"ratio": 0.5})
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"


def test_an_unexpected_error_keeps_openai_s_shape(agent, monkeypatch, caplog):
    from kvcomm.serve import chat as chat_module

    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(served_model_names=("tiny",)))

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(chat_module, "context_of", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = chat(client, "Where?")
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
        caplog.clear()  # the stream's failure, once its 200 went out, is logged by the stream itself
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "Where?"}], "stream": True}) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert any("a bug" in str(record.exc_info[1]) for record in caplog.records if record.exc_info)  # logged


def test_an_upload_streamed_in_small_chunks_is_checked_as_it_arrives_and_stored_whole(app, live):
    with Client(live) as client:
        data = client.get_message(client.create_context("Mira lives in Oslo. " * 10, codec="int8")["id"])

    def pieces(body: bytes, size: int = 97):
        for start in range(0, len(body), size):
            yield body[start:start + size]

    stored = httpx.put(f"{live}/v1/messages/streamed", content=pieces(data))
    assert stored.status_code == 200 and app.state.store.get("streamed") == data
    damaged = bytearray(data)
    damaged[-40] ^= 0xFF  # inside the last frame or the final digest: caught only at the end
    refused = httpx.put(f"{live}/v1/messages/damaged", content=pieces(bytes(damaged)))
    cut = httpx.put(f"{live}/v1/messages/cut", content=pieces(data[: len(data) // 2]))
    bad_header = httpx.put(f"{live}/v1/messages/bad", content=pieces(b"KVCM" + b"\xff" * 4000))
    assert refused.status_code == 422 and cut.status_code == 422 and bad_header.status_code == 422
    assert not {"damaged", "cut", "bad"} & set(app.state.store.list())


def _answer(raw: socket.socket) -> tuple[int, dict, bytes]:
    """The status, headers and body of one HTTP answer read off ``raw`` (its Content-Length)."""
    head = b""
    while b"\r\n\r\n" not in head:
        more = raw.recv(4096)
        assert more, head
        head += more
    head, body = head.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += raw.recv(4096)
    return int(lines[0].split()[1]), headers, body


def test_stalled_uploads_are_bounded_and_refused_and_leave_the_other_routes_alone(agent):
    """Uploads that stall after their first bytes, more than anyio's 40 shared threads: before, each
    held one of those threads until its body ended (never), and every route that runs on one (a
    message's GET, contexts, chat) waited while /healthz said ok. Now they hold at most
    ``max_uploads`` threads of their own, the others are refused at once (503), and a stalled
    one is refused after ``upload_idle_s`` (408) with its connection closed; nothing is stored."""
    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(max_uploads=2, upload_idle_s=1.0))
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = []
        try:
            for i in range(45):
                raw = socket.create_connection((host, int(port)), timeout=15)
                raw.sendall(b"PUT /v1/messages/up%d HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
                            b"\r\nContent-Length: 100000\r\n\r\nKVCM" % i)  # 4 bytes of the body, then silence
                stalled.append(raw)
            time.sleep(0.3)
            began = time.monotonic()
            assert httpx.get(f"{url}/v1/messages/nope", timeout=5).status_code == 404  # runs on a worker thread
            assert time.monotonic() - began < 3
            answers = [_answer(raw) for raw in stalled]
            statuses = [status for status, _, _ in answers]
            assert statuses.count(503) == 43 and statuses.count(408) == 2, statuses
            for (status, headers, body), raw in zip(answers, stalled):
                error = json.loads(body)["error"]
                if status == 503:
                    assert error["code"] == "too_many_uploads" and "2 uploads" in error["message"]
                    assert headers["retry-after"] == "1"
                else:
                    assert error["code"] == "upload_timeout" and "nothing for 1 s" in error["message"]
                    assert raw.recv(1) == b""  # and the connection was closed
        finally:
            for raw in stalled:
                raw.close()
        assert app.state.store.list() == []
        with Client(url) as client:  # the slots were given back: an upload is received again
            data = client.get_message(client.create_context("Mira lives in Oslo.")["id"])
            assert client.put_message("after", data)["bytes"] == len(data)


def test_an_upload_that_pauses_less_than_the_idle_timeout_is_received(agent):
    """The timeout is on silence, not on the whole upload: pauses under it, longer in all, are fine."""
    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(upload_idle_s=1.0))
    with running(app) as url, Client(url) as client:
        data = client.get_message(client.create_context("Mira lives in Oslo.")["id"])

        def paced():
            for start in range(0, len(data), len(data) // 4 + 1):
                time.sleep(0.4)
                yield data[start:start + len(data) // 4 + 1]

        began = time.monotonic()
        stored = httpx.put(f"{url}/v1/messages/paced", content=paced(), timeout=30)
        assert stored.status_code == 200 and time.monotonic() - began > 1.0
        assert app.state.store.get("paced") == data


def test_a_trickling_upload_ends_at_the_request_deadline_and_a_refused_one_is_answered_at_once(agent):
    """A byte just inside the idle limit, again and again, held an upload slot for ever; and a body
    its first bytes had refused was answered only when its next bytes came."""
    import threading

    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(upload_idle_s=1.0, timeout_s=2.0))
    with running(app) as url:
        with Client(url) as client:
            data = client.get_message(client.create_context("Mira lives in Oslo.")["id"])
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=15) as raw:
            raw.sendall(b"PUT /v1/messages/slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data)
                        + data[:200])
            began, answered = time.monotonic(), threading.Event()

            def trickle():  # the message's next byte every 0.5 s: never silent for 1 s
                for at in range(200, len(data) - 1):
                    if answered.wait(0.5):
                        return
                    try:
                        raw.sendall(data[at:at + 1])
                    except OSError:
                        return

            sender = threading.Thread(target=trickle)
            sender.start()
            status, _, body = _answer(raw)
            answered.set()
            sender.join()
            assert status == 408 and "did not end within 2 s" in json.loads(body)["error"]["message"]
            assert time.monotonic() - began < 4.5
        with socket.create_connection((host, int(port)), timeout=15) as raw:
            raw.sendall(b"PUT /v1/messages/bad HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nNOTAKVMESSAGE")
            began = time.monotonic()
            status, _, _ = _answer(raw)
            assert status == 422 and time.monotonic() - began < 0.9  # before the idle limit, with no more bytes
    assert "slow" not in app.state.store.list() and "bad" not in app.state.store.list()


def _mocked(handler) -> Client:
    """A client whose requests ``handler`` answers (httpx's mock transport: no network)."""
    client = Client("http://agent.invalid")
    client._http = httpx.Client(base_url="http://agent.invalid", transport=httpx.MockTransport(handler))
    return client


@pytest.mark.parametrize(("retry_after", "nothing_done", "retries", "requests", "stored"), [
    ("0", True, 2, 3, True),     # refused twice, then stored
    ("0", True, 1, 2, False),    # refused more often than it may be sent again: the refusal is the error
    ("0", True, 0, 1, False),    # no retries
    (None, True, 2, 1, False),   # a 503 without Retry-After (e.g. the store is down): something may have been done
    ("60", True, 2, 1, False),   # a longer wait than RETRY_AFTER_MAX_S is the error at once
    ("Wed, 21 Oct 2026 07:28:00 GMT", True, 2, 1, False),
    ("0", False, 2, 1, False),   # not the agent's word (a proxy's 503 after the agent did the work): never again
])
def test_the_client_sends_a_request_again_only_where_the_agent_asks_and_did_nothing(retry_after, nothing_done, retries,
                                                                                      requests, stored):
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) < 3:
            headers = {} if retry_after is None else {"Retry-After": retry_after}
            if nothing_done:
                headers[NOTHING_DONE_HEADER] = "1"
            return httpx.Response(503, headers=headers, json={"error": {
                "message": "2 uploads are being received already", "code": "too_many_uploads"}})
        return httpx.Response(200, json={"id": "m", "bytes": 5})

    client = _mocked(answer)
    client.retries = retries
    if stored:
        assert client.put_message("m", b"KVCM!")["bytes"] == 5
    else:
        with pytest.raises(ServiceError, match="HTTP 503: 2 uploads"):
            client.put_message("m", b"KVCM!")
    assert seen == [b"KVCM!"] * requests  # the same body each time


@pytest.mark.parametrize(("failure", "retries", "requests", "answered"), [
    (httpx.ConnectError("refused"), 2, 3, True),      # could not connect twice: nothing was sent
    (httpx.ConnectTimeout("slow"), 1, 2, False),      # more often than it may connect again
    (httpx.ReadTimeout("sent, no answer"), 2, 1, False),  # sent: the agent may have done it
])
def test_the_client_connects_again_only_where_nothing_was_sent(failure, retries, requests, answered, monkeypatch):
    from kvcomm.serve import client as client_module

    monkeypatch.setattr(client_module, "CONNECT_BACKOFF_S", 0.001)
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) < 3:
            raise failure
        return httpx.Response(200, json={"status": "ok"})

    client = _mocked(answer)
    client.retries = retries
    if answered:
        assert client.health() == {"status": "ok"}
    else:
        with pytest.raises(ServiceError, match="cannot reach the agent"):
            client.health()
    assert seen == ["/healthz"] * requests


def test_one_budget_of_retries_covers_both_reasons_to_send_again(monkeypatch):
    """Connections not made and the agent's refusals draw on one count: before, each reason had its
    own ``retries``, so a call could send its request 9 times with ``retries=2``."""
    from kvcomm.serve import client as client_module

    monkeypatch.setattr(client_module, "CONNECT_BACKOFF_S", 0.001)
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) % 2:
            raise httpx.ConnectError("refused")
        return httpx.Response(503, headers={"Retry-After": "0", NOTHING_DONE_HEADER: "1"},
                              json={"error": {"message": "busy", "code": "too_many_uploads"}})

    client = _mocked(answer)
    client.retries = 2
    with pytest.raises(ServiceError, match="cannot reach the agent"):
        client.health()
    assert len(seen) == 3  # not connected, refused, not connected with the budget spent: the error
    seen.clear()
    client.retries = 3
    with pytest.raises(ServiceError, match="HTTP 503: busy"):
        client.health()
    assert len(seen) == 4


def test_the_agent_marks_its_refusals_made_before_any_work():
    """Both refusals that ask for a retry carry the header the client believes (a proxy's 503 does not)."""
    from kvcomm.serve.budget import DecodedBudget

    with pytest.raises(ServiceRefusal) as refused:
        DecodedBudget(10).hold().take(11)
    assert refused.value.headers == busy_headers() and busy_headers()[NOTHING_DONE_HEADER] == "1"
    assert retry_after(httpx.Response(503, headers=refused.value.headers)) == 1.0


def test_a_retry_after_that_is_no_ascii_number_is_not_waited_for():
    """``"²".isdigit()`` is true and ``int("²")`` fails: a bare ValueError reached the caller."""
    client = _mocked(lambda request: httpx.Response(503, headers={"Retry-After": b"\xb2", NOTHING_DONE_HEADER: "1"},
                                                    json={"error": {"message": "busy", "code": "decoded_budget_busy"}}))
    with pytest.raises(ServiceError, match="HTTP 503: busy"):
        client.health()


@pytest.mark.parametrize("retries", [-1, 1.5, True, "2"])
def test_the_client_refuses_retries_that_are_no_count(retries):
    with pytest.raises(ConfigError, match="retries must be a whole number from 0"):
        Client("http://agent.invalid", retries=retries)


@pytest.mark.parametrize("message_id", ["mine?v=2", "../../healthz", "x/../other", "a#b", "..", ".hidden", "",
                                        "x" * 129, "half.partial", "line\n"])
def test_the_client_refuses_an_id_the_agent_would_before_any_request(message_id):
    """Ids go into the URL: before, ``mine?v=2`` fetched ``mine`` and ``../../healthz`` the health route."""
    from kvcomm.serve import StoreError

    seen = []
    client = _mocked(lambda request: seen.append(request) or httpx.Response(200, content=b"{}"))
    for call in (lambda: client.get_message(message_id), lambda: client.put_message(message_id, b"KVCM"),
                 lambda: client.receive_message(message_id)):
        with pytest.raises(StoreError, match="invalid message id"):
            call()
    assert seen == []
    client.get_message("fine_id.v2-1")
    assert [request.url.path for request in seen] == ["/v1/messages/fine_id.v2-1"]


@pytest.mark.parametrize("body, detail, code", [
    (b'["upstream down"]', '["upstream down"]', None),
    (b'"Bad Gateway"', '"Bad Gateway"', None),
    (b"null", "null", None),
    (b'{"error": "plain words"}', '{"error": "plain words"}', None),
    (b'{"detail": "Not Found"}', '{"detail": "Not Found"}', None),
    (b'{"error": {"message": "no KV message", "code": 404}}', "no KV message", None),
    (b'{"error": {"message": "no KV message", "code": "message_not_found"}}', "no KV message", "message_not_found"),
    (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>", None),
])
def test_any_error_body_is_a_service_error(body, detail, code):
    """A proxy's error body need not be OpenAI's shape: before, JSON that was not an object (a
    list, a string, null) raised AttributeError."""
    client = _mocked(lambda request: httpx.Response(502, content=body, headers={"content-type": "application/json"}))
    for call in (client.health, lambda: client.get_message("m"), lambda: client.receive_message("m")):
        with pytest.raises(ServiceError) as err:
            call()
        assert (err.value.status, err.value.detail, err.value.code) == (502, detail, code)


def test_a_body_that_cannot_be_read_is_a_service_error():
    """A body its Content-Encoding does not decode is a ServiceError, whole or streamed (before,
    httpx's DecodingError escaped)."""
    client = _mocked(lambda request: httpx.Response(200, content=b"not gzip at all",
                                                     headers={"content-encoding": "gzip"}))
    for call in (lambda: client.get_message("m"), lambda: client.receive_message("m")):
        with pytest.raises(ServiceError, match="cannot be read: DecodingError") as err:
            call()
        assert err.value.status == 0


def test_the_client_stops_reading_a_message_larger_than_it_accepts():
    """``get_message`` takes at most ``max_bytes``: a body announced larger is refused before it
    is read, and one that does not announce its size is cut off once it passes the limit."""
    from kvcomm.errors import MessageTooLarge

    sent = []

    def endless():
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 1024

    announced = _mocked(lambda request: httpx.Response(200, content=b"x" * 5000))
    with pytest.raises(MessageTooLarge, match="5,000 bytes, the limit is 4,096"):
        announced.get_message("m", max_bytes=4096)
    assert announced.get_message("m", max_bytes=5000) == b"x" * 5000
    unannounced = _mocked(lambda request: httpx.Response(200, content=endless()))
    with pytest.raises(MessageTooLarge, match="more than 4,096 bytes"):
        unannounced.get_message("m", max_bytes=4096)
    assert len(sent) < 10  # stopped near the limit, not after the 1,000 chunks


def test_the_client_bounds_what_a_streamed_message_and_an_error_may_take(agent):
    """``receive_message`` (and ``arriving``) take the reader's limits on the wire and decoded; a
    streamed GET's error body is read for its first 64 KiB only, however long it is."""
    from kvcomm.errors import MessageTooLarge

    data = _kv_message(agent, tokens=64).to_bytes()
    client = _mocked(lambda request: httpx.Response(200, content=data))
    assert client.receive_message("m", receiver=agent.fingerprint).context_len == 64
    with pytest.raises(MessageTooLarge):
        client.receive_message("m", max_bytes=len(data) // 2)
    with pytest.raises(MessageTooLarge):
        client.receive_message("m", max_decoded_bytes=1000)
    sent = []

    def endless():
        for _ in range(10_000):
            sent.append(1)
            yield b"e" * 1024

    failing = _mocked(lambda request: httpx.Response(502, content=endless()))
    with pytest.raises(ServiceError) as err:
        failing.receive_message("m")
    assert err.value.status == 502 and len(err.value.detail) == 64 << 10 and len(sent) < 100


def test_bearer_token_is_required_when_configured(agent):
    app = create_app(agent, MemoryStore(), ServeConfig(token="s3cret"))
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/v1/contexts", json={"context": "x"}).status_code == 401
        ok = http.post("/v1/contexts", json={"context": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_healthz_tells_a_caller_without_the_token_only_the_status(agent):
    """/healthz is open (probes carry no token); it showed anyone the store's address and driver
    errors and the model's name, which /v1/models keeps behind the token."""
    from kvcomm.serve import StoreUnavailable

    def down(message_id):
        raise StoreUnavailable("the message store is unavailable: Redis at redis://10.0.0.7:6379/3 failed")

    app = create_app(agent, MemoryStore(), ServeConfig(token="s3cret"))
    app.state.store.get = down
    with TestClient(app) as http:
        http.post("/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                  json={"messages": [{"role": "user", "content": "q"}], "kv_messages": ["m"]})
        anyone = http.get("/healthz").json()
        holder = http.get("/healthz", headers={"Authorization": "Bearer s3cret"}).json()
    assert anyone == {"status": "degraded", "store": {"kind": "memory", "ok": False}}
    assert holder["model"] == agent.name and "10.0.0.7" in holder["store"]["error"]


def test_refusals_before_the_routes_are_counted_in_the_metrics(agent):
    """The token and body-size refusals (401, 413) happened outside the metrics' middleware."""
    app = create_app(agent, MemoryStore(), ServeConfig(token="s3cret", public_docs=True, max_request_bytes=2048))
    with TestClient(app) as http:
        assert http.post("/v1/chat/completions", json={}).status_code == 401
        assert http.post("/v1/chat/completions", content=b"x" * 5000,
                         headers={"Authorization": "Bearer s3cret"}).status_code == 413
        text = http.get("/metrics").text
    for status in ("401", "413"):
        assert f'http_requests_total{{handler="/v1/chat/completions",method="POST",status="{status}"}} 1.0' in text


def test_metrics_are_prometheus_text_with_route_templates(http):
    chat(http, "hello")
    for path in ("/v1/messages/a", "/v1/messages/b", "/random/path/1", "/random/path/2"):
        http.get(path)
    text = http.get("/metrics").text
    for name in ("kvcomm:time_to_first_token_seconds_bucket", "kvcomm:num_requests_running",
                 "kvcomm:num_requests_waiting", "kvcomm:prompt_tokens_total", "kvcomm:generation_tokens_total",
                 "kvcomm:e2e_request_latency_seconds_bucket", "kvcomm:store_messages", "kvcomm:store_bytes",
                 "kvcomm:store_lookups_total"):
        assert name in text, name
    handlers = {line.split('handler="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("http_requests_total{")}
    assert "/v1/messages/{message_id}" in handlers and "none" in handlers  # templates, and untemplated grouped
    assert not any("/v1/messages/a" in h or "/random" in h for h in handlers)


def test_restart_with_disk_store_keeps_messages(agent, tmp_path):
    with TestClient(create_app(agent, DiskStore(tmp_path), ServeConfig())) as http:
        message_id = http.post("/v1/contexts", json={"context": "Kept."}).json()["id"]
    with TestClient(create_app(agent, DiskStore(tmp_path), ServeConfig())) as http:
        assert http.get(f"/v1/messages/{message_id}").status_code == 200


@pytest.fixture
def live(app):
    with running(app) as url:
        yield url


def test_fifty_concurrent_requests_each_get_their_own_answer(live):
    questions = [f"Question number {i}?" for i in range(50)]
    with Client(live) as client:
        expected = {q: client.chat([{"role": "user", "content": q}], max_tokens=4)["choices"][0]["message"]["content"]
                    for q in questions}  # one at a time first

    async def ask_all():
        async with httpx.AsyncClient(base_url=live, timeout=120) as http:
            replies = await asyncio.gather(*(http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": q}], "max_tokens": 4}) for q in questions))
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    answers = asyncio.run(ask_all())
    assert answers == [expected[q] for q in questions]


def test_official_openai_client_works_unchanged(live):
    from openai import OpenAI

    with Client(live) as ours:
        message_id = ours.create_context("Mira lives in Oslo.")["id"]
    client = OpenAI(base_url=f"{live}/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where?"}],
                                           max_tokens=4, extra_body={"kv_messages": [message_id]})
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where?"}],
                                            max_tokens=4, stream=True, extra_body={"kv_messages": [message_id]})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content
    counted = [chunk for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Where?"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_messages": [message_id]})]
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_client_errors_and_disconnected_upload(live):
    with Client(live) as client:
        with pytest.raises(ServiceError) as err:
            client.get_message("nope")
        assert err.value.status == 404
        data = client.get_message(client.create_context("Some context.")["id"])
    host, port = live.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:  # half a body, then hang up
        raw.sendall(f"PUT /v1/messages/torn HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                    + data[: len(data) // 2])
    time.sleep(0.5)
    with Client(live) as client:
        with pytest.raises(ServiceError):
            client.get_message("torn")


def test_the_python_client_sends_a_profile_with_its_layout_and_the_agent_checks_it(live):
    from kvcomm.selection import Profile

    chats = Profile(sender="t", receiver="t", task="facts", num_layers=4, alpha=1.0, mu=0.5, sigma=10.0,
                    calibration_items=[], importance=[0.0] * 4, scores=[0.0] * 4, ranking=[2, 0, 3, 1])
    passages = chats.model_copy(update={"ranking": [3, 1, 0, 2], "details": {"pieces": "passages"}})
    with Client(live) as client:
        assert client.create_context("Mira lives in Oslo.", ratio=0.5, ranking=chats)["layers"] == [0, 2]
        assert client.create_context("Mira lives in Oslo.", ratio=0.5, ranking=passages,
                                     passage=True)["layers"] == [1, 3]
        for profile, passage in ((passages, False), (chats, True)):
            with pytest.raises(ServiceError, match=f"--pieces {'passages' if passage else 'chats'}") as err:
                client.create_context("Mira lives in Oslo.", ratio=0.5, ranking=profile, passage=passage)
            assert err.value.status == 400
        bare = client.create_context("Mira lives in Oslo.", ratio=0.5, ranking=passages.ranking)  # claims no layout
        assert bare["layers"] == [1, 3]


def test_contexts_take_a_ratio_layers_or_a_profile_and_are_content_addressed(http, agent, monkeypatch):
    assert http.get("/v1/profile").status_code == 404  # nothing calibrated yet
    spent = []
    real = http.app.state.contexts.encode
    monkeypatch.setattr(http.app.state.contexts, "encode",
                        lambda plan, check=None: spent.append(plan) or real(plan, check))
    first = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "ratio": 0.5}).json()
    profile = http.get("/v1/profile").json()  # calibrated once, on the first ratio
    assert first["layers"] == sorted(profile["ranking"][:2]) and not first["cached"]
    # by the default rule and objective, as a run would: prune with auto, on the 8 items auto takes
    assert profile["rule"] == "prune" and len(profile["calibration_items"]) == 8
    assert profile["details"]["objective"].startswith("auto: ")
    again = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "ratio": 0.5}).json()
    assert again["id"] == first["id"] and again["cached"] and len(spent) == 1  # no second prefill
    ranking = [3, 2, 1, 0]
    mine = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "ratio": 0.25,
                                           "profile": {"ranking": ranking}}).json()
    assert mine["layers"] == [3] and mine["id"] != first["id"]
    other_codec = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "ratio": 0.5, "codec": "fp16"})
    assert other_codec.json()["id"] != first["id"] and len(spent) == 3
    named = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "layers": [0], "id": "mine"}).json()
    assert named["id"] == "mine" and named["layers"] == [0]
    bad = http.post("/v1/contexts", json={"context": "x", "ratio": 0.5, "profile": {"ranking": [0, 0, 1, 2]}})
    assert bad.status_code == 400 and "each of the model's 4 layers once" in bad.json()["error"]["message"]
    both = http.post("/v1/contexts", json={"context": "x", "ratio": 0.5, "layers": [1]})
    assert both.status_code == 422
    unused = http.post("/v1/contexts", json={"context": "x", "profile": {"ranking": [99]}})  # no ratio anywhere
    assert unused.status_code == 400 and "give 'ratio' with it" in unused.json()["error"]["message"]


def test_agents_of_other_weights_sharing_a_store_keep_their_own_content_addresses(agent):
    """Two checkpoints of one architecture (their fingerprints agree) get their own KV, never the
    other's as ``cached``; and a content address (``kv-…``) cannot be taken by an upload or a
    client's id, so what is found under one is what its id says."""
    store = MemoryStore(1 << 24)
    other = tiny_loaded("llama", seed=1)
    assert other.fingerprint == agent.fingerprint and other.weights_digest != agent.weights_digest
    mine = TestClient(create_app(agent, store, ServeConfig(served_model_names=("tiny",))))
    theirs = TestClient(create_app(other, store, ServeConfig(served_model_names=("tiny",))))
    body = {"context": "Mira lives in Oslo.", "codec": "fp32"}
    first, second = mine.post("/v1/contexts", json=body).json(), theirs.post("/v1/contexts", json=body).json()
    assert first["id"] != second["id"] and not second["cached"]
    data = mine.get(f"/v1/messages/{first['id']}").content
    taken = mine.put(f"/v1/messages/{first['id']}", content=data)
    assert taken.status_code == 400 and "content addresses" in taken.json()["error"]["message"]
    named = mine.post("/v1/contexts", json={**body, "id": "kv-mine"})
    assert named.status_code == 400 and "content addresses" in named.json()["error"]["message"]
    assert mine.put("/v1/messages/copy-of-it", content=data).status_code == 200  # any other id is the client's


def test_codec_auto_chooses_for_the_declared_bandwidth_and_says_why(http):
    slow = http.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 20, "codec": "auto",
                                           "bandwidth_mbit": 0.01}).json()
    choice = slow["codec_choice"]
    assert choice["bandwidth_mbit"] == 0.01 and choice["chosen"] in choice["candidates"]
    assert choice["chosen"] == min(choice["candidates"], key=lambda n: choice["candidates"][n]["seconds"])
    assert slow["codec"] == choice["chosen"]  # the name a request gives (before, the class: quant for int8)
    stored = KVMessage.from_bytes(http.get(f"/v1/messages/{slow['id']}").content)
    assert stored.meta["codec_choice"]["chosen"] == choice["chosen"]
    assert f'kvcomm:codec_chosen_total{{codec="{choice["chosen"]}"}} 1.0' in http.get("/metrics").text
    wrong = http.post("/v1/contexts", json={"context": "x", "codec": "int8", "bandwidth_mbit": 10})
    assert wrong.status_code == 400 and "goes with codec 'auto'" in wrong.json()["error"]["message"]
    tiny = http.post("/v1/contexts", json={"context": "x", "codec": "auto", "bandwidth_mbit": 1e-315})
    assert tiny.status_code == 422 and "bandwidth_mbit" in tiny.text  # its transfer estimate would be infinite
    returned = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "kv_return": {"codec": "auto"}}).json()["kv_message"]
    assert returned["codec_choice"]["chosen"] in returned["codec_choice"]["candidates"]
    counted = returned["codec_choice"]["chosen"]
    assert f'kvcomm:codec_chosen_total{{codec="{counted}"}}' in http.get("/metrics").text  # kv_return's too
    busy = http.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 20, "codec": "auto",
                                           "receiver_compute_s": 2.5}).json()["codec_choice"]
    assert busy["receiver_compute_s"] == 2.5 and "receiver compute" in busy["reason"]
    assert all(estimate["seconds"] >= 2.5 for estimate in busy["candidates"].values())
    wrong = http.post("/v1/contexts", json={"context": "x", "codec": "int8", "receiver_compute_s": 1})
    assert wrong.status_code == 400 and "'receiver_compute_s' chooses a codec" in wrong.json()["error"]["message"]
    negative = http.post("/v1/contexts", json={"context": "x", "codec": "auto", "receiver_compute_s": -1})
    assert negative.status_code == 422


def test_link_meter_takes_the_median_of_large_transfers():
    from kvcomm.serve.links import LinkMeter, two_figures

    meter = LinkMeter(min_bytes=1000, samples=3)
    meter.record(999, 0.001)  # too small to say anything about bandwidth
    assert meter.mbit is None
    for seconds in (0.008, 0.0008, 0.004, 0.002):  # 1, 10, 2, 4 Mbit/s; the first falls out of 3 samples
        meter.record(1000, seconds)
    assert meter.mbit == 4.0
    assert two_figures(94.37) == 94 and two_figures(1234) == 1200 and two_figures(0.01234) == 0.012


def test_a_streamed_transfer_its_consumer_held_back_is_not_taken_for_the_link():
    """The link sends a chunk every 5 ms. A consumer that keeps up times the link; one that takes
    20 ms a chunk (a slow decoder behind a full queue) holds the reading back, and its transfer
    (which measured the decoder) is not recorded. Before, it was: the link looked 4 times slower."""
    from kvcomm.serve.links import LinkMeter

    def link(chunks: int = 20, size: int = 10_000):
        for _ in range(chunks):
            time.sleep(0.005)
            yield b"x" * size

    meter = LinkMeter(min_bytes=1, samples=3)
    assert sum(map(len, meter.timed(link()))) == 200_000
    assert meter.mbit is not None and 5 < meter.mbit <= 16  # 10 kB per 5 ms: 16 Mbit/s, less the overheads
    kept = list(meter._rates)
    for _ in meter.timed(link()):
        time.sleep(0.02)
    assert list(meter._rates) == kept

    def waited(delay: float = 0.2):  # 200 ms before the first byte (a store lookup, a queue): latency
        time.sleep(delay)
        yield from link()

    late = LinkMeter(min_bytes=1, samples=3)
    assert sum(map(len, late.timed(waited()))) == 200_000
    assert late.mbit is not None and 5 < late.mbit <= 16  # before: the 200 ms counted, about 6 Mbit/s


def test_codec_auto_chooses_for_the_link_the_client_measured(agent, monkeypatch):
    from kvcomm.serve import links

    context = "Mira lives in Oslo. " * 20
    monkeypatch.setattr(links, "MIN_BYTES", 1)  # the tiny model's messages are small: time them all
    whole = httpx.Response.iter_bytes  # and come in one read, which times nothing (it is all latency)
    monkeypatch.setattr(httpx.Response, "iter_bytes", lambda self, chunk_size=None: whole(self, 4096))
    with running(create_app(agent, MemoryStore(1 << 24), ServeConfig())) as url, Client(url) as client:
        first = client.create_context(context, codec="auto")
        assert first["bandwidth_source"] == "default" and first["bandwidth_mbit"] == 100  # nothing measured yet
        client.get_message(first["id"])  # a real transfer over loopback
        rate = client.measured_mbit
        assert rate is not None and rate > 0
        second = client.create_context(context, codec="auto")
        assert second["bandwidth_source"] == "measured" and second["bandwidth_mbit"] == rate
        assert second["codec_choice"]["bandwidth_mbit"] == rate
        timed = []
        real = links.LinkMeter.timed
        monkeypatch.setattr(links.LinkMeter, "timed", lambda self, chunks, streamed=True: timed.append(streamed) or
                            real(self, chunks, streamed))
        client.receive_message(second["id"])  # streamed bodies are timed too (recorded where the link was
        assert timed == [True]  # the slower: over loopback, the decoder often is, so this one may not be)
        declared = client.create_context(context, codec="auto", bandwidth_mbit=5)
        assert declared["bandwidth_source"] == "declared" and declared["bandwidth_mbit"] == 5
        busy = client.create_context(context, codec="auto", bandwidth_mbit=5, receiver_compute_s=0.75)
        assert busy["codec_choice"]["receiver_compute_s"] == 0.75 and busy["id"] != declared["id"]
        plain = client.create_context(context, codec="int8")
        assert plain["bandwidth_mbit"] is None and plain["bandwidth_source"] is None
        lone = httpx.post(f"{url}/v1/contexts", json={"context": "x", "codec": "auto", "bandwidth_measured": True})
        assert lone.status_code == 422 and "give one" in lone.text


def test_the_service_default_ratio_uses_a_loaded_profile(agent):
    from kvcomm.selection import Profile

    profile = Profile(sender=agent.name, receiver=agent.name, task="facts", num_layers=4, alpha=1.0, mu=0.5,
                      sigma=10.0, calibration_items=[], importance=[0.0] * 4, scores=[0.0] * 4, ranking=[2, 0, 3, 1])
    with TestClient(create_app(agent, MemoryStore(), ServeConfig(ratio=0.5), profile)) as http:
        created = http.post("/v1/contexts", json={"context": "Mira lives in Oslo."}).json()
        assert created["layers"] == [0, 2] and http.get("/v1/profile").json()["ranking"] == [2, 0, 3, 1]
        assert http.post("/v1/contexts", json={"context": "x", "layers": [1, 2, 3]}).json()["layers"] == [1, 2, 3]

    passages = profile.model_copy(update={"ranking": [3, 1, 0, 2], "details": {"pieces": "passages"}})
    with TestClient(create_app(agent, MemoryStore(), ServeConfig(ratio=0.5), [profile, passages])) as http:
        stored = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "passage": True}).json()
        assert stored["layers"] == [1, 3] and http.get("/v1/profile?pieces=passages").json()["ranking"] == [3, 1, 0, 2]
        assert http.post("/v1/contexts", json={"context": "Mira lives in Oslo."}).json()["layers"] == [0, 2]
        claimed = {"ranking": [3, 1, 0, 2], "details": {"pieces": "passages"}}
        refused = http.post("/v1/contexts", json={"context": "x", "ratio": 0.5, "profile": claimed})
        assert refused.status_code == 400 and "--pieces chats" in refused.json()["error"]["message"]
        odd = http.post("/v1/contexts", json={"context": "x", "ratio": 0.5,
                                              "profile": {"ranking": [0, 1, 2, 3], "details": {"pieces": [1] * 9}}})
        assert odd.status_code == 422 and "[1, 1" not in odd.text  # checked, not echoed
    with pytest.raises(ConfigError, match="one per layout"):
        create_app(agent, MemoryStore(), ServeConfig(), [passages, passages])
    other = profile.model_copy(update={"weights": ["0" * 32, "0" * 32]})  # as eval refuses it (before, served)
    with pytest.raises(ConfigError, match="calibrated on other weights"):
        create_app(agent, MemoryStore(), ServeConfig(), other)
    mine = profile.model_copy(update={"weights": [agent.weights_digest] * 2})
    create_app(agent, MemoryStore(), ServeConfig(), mine)
    # written before weights were recorded: told by name, as eval does (before, any name was served)
    named = profile.model_copy(update={"weights": None, "sender": "another-model", "receiver": "another-model"})
    with pytest.raises(ConfigError, match="ranks layers for another-model → another-model"):
        create_app(agent, MemoryStore(), ServeConfig(), named)


def test_models_errors_and_unsupported_parameters_behave_as_against_vllm(live):
    """The official client: models.list(), a chat with extra_body, and errors it can show."""
    import openai

    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    message_id = Client(live).create_context("Mira lives in Oslo.", layers=[0, 1])["id"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where?"}],
                                           max_tokens=3, extra_body={"kv_messages": [message_id]})
    assert reply.usage.model_extra["kv_bytes_received"] > 0
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "does not exist" in missing.value.message and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as sampled:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0.8)
    assert "greedy" in sampled.value.message and sampled.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as unknown_kv:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"kv_messages": ["nope"]})
    assert "no KV message 'nope'" in unknown_kv.value.message


def test_health_both_ways(http):
    assert http.get("/health").json() == {"status": "ok"}
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["store"] == {"kind": "memory", "ok": True, "error": None}


def test_remote_commands_drive_a_live_agent(live, tmp_path):
    from typer.testing import CliRunner

    from kvcomm.cli import app as cli

    runner = CliRunner()
    models = runner.invoke(cli, ["remote", "models", "--url", live])
    assert models.exit_code == 0 and json.loads(models.stdout) == ["tiny"]
    created = runner.invoke(cli, ["remote", "context", "Mira lives in Oslo.", "--url", live, "--layers", "0-1"])
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    assert info["layers"] == [0, 1] and info["id"].startswith("kv-")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"sender": "t", "receiver": "t", "task": "t", "num_layers": 4, "alpha": 1.0,
                                   "mu": 0.5, "sigma": 10.0, "calibration_items": [], "importance": [0] * 4,
                                   "scores": [0] * 4, "ranking": [1, 3, 0, 2]}))
    ranked = runner.invoke(cli, ["remote", "context", "Mira lives in Oslo.", "--url", live, "--ratio", "0.5",
                                 "--profile", str(profile)])
    assert json.loads(ranked.stdout)["layers"] == [1, 3]
    answered = runner.invoke(cli, ["remote", "chat", "Where?", "--url", live, "--kv", info["id"], "--max-tokens", "3"])
    assert answered.exit_code == 0 and "kv_bytes_received" in answered.stderr
    passages = [json.loads(runner.invoke(cli, ["remote", "context", text, "--url", live, "--passage"]).stdout)["id"]
                for text in ("Mira lives in Oslo.", "Oslo is in Norway.")]
    blended = runner.invoke(cli, ["remote", "chat", "Which country?", "--url", live, "--kv", passages[1], "--kv",
                                  passages[0], "--blend", "0.5", "--max-tokens", "3"])
    assert blended.exit_code == 0 and "'kv_tokens_recomputed': " in blended.stderr, blended.output
    kept = tmp_path / "kept.kvcm"
    kept.write_bytes(b"mine")
    refused = runner.invoke(cli, ["remote", "fetch", info["id"], str(kept), "--url", live])
    assert refused.exit_code == 2 and "exists; pass --overwrite" in refused.output and kept.read_bytes() == b"mine"
    fetched = runner.invoke(cli, ["remote", "fetch", info["id"], str(kept), "--url", live, "--overwrite"])
    assert fetched.exit_code == 0 and KVMessage.from_bytes(kept.read_bytes()).shared_layers == [0, 1]


def test_stored_pieces_blend_in_any_order_and_combination(http, agent):
    """kv_blend: pieces stored once are joined in any order; recompute 0 is plain joining, and every
    token recomputed equals the model reading the pieces in sequence."""
    from kvcomm.protocol import empty_input, greedy_generate, pad_left

    passages = ["Omar lives in Velmora.", "Velmora is in Drenland.", "Lena lives in Ostrik."]
    ids = [http.post("/v1/contexts", json={"context": p, "codec": "fp32"}).json()["id"] for p in passages]

    def ask(refs, blend=None, question="Which country?"):
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 6, "kv_messages": refs}
        if blend is not None:
            body["kv_blend"] = blend
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    plain = ask([ids[1], ids[0]])
    none = ask([ids[1], ids[0]], {"ratio": 0.0})
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    assert none["usage"]["kv_tokens_recomputed"] == 0
    every = ask([ids[2], ids[0]], {"ratio": 1.0})
    assert every["usage"]["kv_tokens_recomputed"] == every["usage"]["kv_tokens_received"]
    pieces = [KVMessage.from_bytes(http.get(f"/v1/messages/{i}").content).token_ids.tolist() for i in (ids[2], ids[0])]
    question = agent.chat_ids([{"role": "user", "content": "Which country?"}])
    whole, valid = pad_left([pieces[0] + pieces[1] + question], agent.pad_id)
    expected = greedy_generate(agent.model, empty_input(agent.model, 1), whole, valid, 6, agent.stop_ids, agent.pad_id)
    assert every["choices"][0]["message"]["content"] == agent.decode(expected[0])
    bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}], "kv_messages": ids,
                                                  "kv_blend": {"ratio": 2}})
    assert bad.status_code == 422


def test_stored_passages_are_read_inside_the_last_user_turn(http, agent):
    """Passages: prefilled behind the chat's opening and stored from position 0; a chat reads them,
    in any order, at the start of its last user turn. Every token recomputed equals the model
    reading the chat whose turn begins with the passages' lines."""
    from kvcomm.protocol import empty_input, greedy_generate, pad_left

    passages = ["Omar lives in Velmora.", "Velmora is in Drenland.", "Lena lives in Ostrik."]
    made = [http.post("/v1/contexts", json={"context": p, "codec": "fp32", "passage": True}).json() for p in passages]
    assert made[0]["context_tokens"] == len(agent.passage_parts(passages[0])[1])
    message = KVMessage.from_bytes(http.get(f"/v1/messages/{made[0]['id']}").content)
    assert message.meta["passage"] is True and message.token_ids.tolist() == agent.passage_parts(passages[0])[1]
    context = http.post("/v1/contexts", json={"context": passages[0], "codec": "fp32"}).json()
    assert context["id"] != made[0]["id"]  # the same text as a context is another message

    def ask(refs, blend=None):
        body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which country?"}],
                "max_tokens": 6, "kv_messages": refs} | ({"kv_blend": blend} if blend is not None else {})
        return http.post("/v1/chat/completions", json=body)

    every = ask([made[1]["id"], made[0]["id"]], {"ratio": 1.0})
    assert every.status_code == 200, every.text
    as_text = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": f"{passages[1]}\n{passages[0]}\nWhich country?"}]
    whole, valid = pad_left([agent.chat_ids(as_text)], agent.pad_id)
    expected = greedy_generate(agent.model, empty_input(agent.model, 1), whole, valid, 6, agent.stop_ids, agent.pad_id)
    assert every.json()["choices"][0]["message"]["content"] == agent.decode(expected[0])
    assert every.json()["usage"]["prompt_tokens"] + every.json()["usage"]["kv_tokens_received"] == whole.shape[1]
    usage = every.json()["usage"]  # every passage token recomputed, none of the opening (prefilled here, exact)
    assert usage["kv_tokens_recomputed"] == sum(m["context_tokens"] for m in made[:2])
    assert ask([made[2]["id"], made[0]["id"]]).status_code == 200  # joined without recompute too
    body = {"messages": [{"role": "user", "content": "Which country?"}], "max_tokens": 2,
            "kv_messages": [made[0]["id"]]}
    turn = http.post("/v1/chat/completions", json=body | {"kv_return": {"content": "turn"}})
    assert turn.status_code == 400 and "content 'turn' after passages" in turn.json()["error"]["message"]
    reply = http.post("/v1/chat/completions", json=body | {"kv_return": {"content": "reply"}})
    assert reply.status_code == 200 and reply.json()["kv_message"]["content"] == "reply"  # (before: a turn cut short)
    mixed = ask([made[0]["id"], context["id"]])
    assert mixed.status_code == 400 and mixed.json()["error"]["code"] == "mixed_kv_messages"
    refused = http.post("/v1/contexts", json={"messages": [{"role": "user", "content": "x"}], "passage": True})
    assert refused.status_code == 422


def test_a_passage_at_a_ratio_is_ranked_on_passages_and_read_as_kvcomm_over_passages(monkeypatch):
    """A passage stored at a ratio takes the service's ranking for passages (calibrated once, on
    items read as passages, apart from the contexts' ranking). A chat reads it as ``kvcomm
    --pieces passages`` does: the chat's opening at every layer, the passage at the shared layers
    only; the same answer as that layout computed in process from the chat cut in two (a template
    whose opening is several tokens, so that the opening is not a sink alone)."""
    from kvcomm.protocol import greedy_generate, pad_left, prefill, receiver_input, share

    agent = tiny_loaded("llama")
    agent.tokenizer.chat_template = ("{% for m in messages %}<|user|>Use what you read. {{ m['content'] }}<|end|>"
                                     "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with TestClient(create_app(agent, MemoryStore(1 << 24), ServeConfig())) as http:
        contexts = http.app.state.contexts
        layouts: list[str] = []
        real = contexts.calibrate
        monkeypatch.setattr(contexts, "calibrate", lambda pieces="chats": layouts.append(pieces) or real(pieces))
        text = "Omar lives in Velmora."
        made = http.post("/v1/contexts", json={"context": text, "codec": "fp32", "passage": True, "ratio": 0.5}).json()
        profile = http.get("/v1/profile", params={"pieces": "passages"}).json()
        assert layouts == ["passages"] and profile["details"]["pieces"] == "passages"
        assert made["layers"] == sorted(profile["ranking"][:2])
        missing = http.get("/v1/profile")  # the contexts' ranking is another one, not calibrated yet
        assert missing.status_code == 404 and "chats" in missing.json()["error"]["message"]
        again = http.post("/v1/contexts", json={"context": "Lena lives in Ostrik.", "passage": True, "ratio": 0.5})
        assert again.status_code == 200 and layouts == ["passages"]  # calibrated once

        turns = [{"role": "user", "content": "Which country?"}]
        opening, rest = agent.chat_after_passages(turns)
        assert len(opening) > 1 and opening == agent.passage_parts(text)[0]
        kv = prefill(agent.model, *pad_left([opening + agent.passage_parts(text)[1]], agent.pad_id))
        named = http.post("/v1/contexts", json={"context": text, "codec": "fp32", "passage": True, "layers": [1, 3]})
        for message in (made, named.json()):
            reply = http.post("/v1/chat/completions",
                              json={"messages": turns, "max_tokens": 6, "kv_messages": [message["id"]]})
            assert reply.status_code == 200, reply.text
            expected = {}
            for kept in (len(opening), 0):  # the opening kept at layers not shared, or a sink alone
                shared = share(agent.model, kv, message["layers"], opening=kept)
                tokens = greedy_generate(agent.model, receiver_input(shared), *pad_left([rest], agent.pad_id), 6,
                                         agent.stop_ids, agent.pad_id)
                expected[kept] = agent.decode(tokens[0])
            assert reply.json()["choices"][0]["message"]["content"] == expected[len(opening)]
        assert expected[len(opening)] != expected[0]  # layers 1 and 3: the two layouts answer apart here

        for_contexts = {"ranking": [3, 2, 1, 0], "details": {"search": "greedy forward"}}  # a profile of chats
        refused = http.post("/v1/contexts", json={"context": text, "passage": True, "ratio": 0.5,
                                                  "profile": for_contexts})
        assert refused.status_code == 400 and "--pieces passages" in refused.json()["error"]["message"]
        bare = http.post("/v1/contexts", json={"context": text, "passage": True, "ratio": 0.25,
                                               "profile": {"ranking": [3, 2, 1, 0]}})
        assert bare.json()["layers"] == [3]  # a bare ranking makes no claim about its layout


def test_a_completion_returns_its_turn_as_a_kv_message_that_another_agent_hears(http, agent):
    """kv_return: the turn's KV is stored and named; heard by a second request at every layer
    (fp32), it reads exactly as the turn's tokens followed by the second question."""
    from kvcomm.protocol import empty_input, greedy_generate, pad_left

    first = chat(http, "Mira lives in Oslo. Where?", max_tokens=4, kv_return={"content": "turn", "codec": "fp32"})
    assert first.status_code == 200, first.text
    body = first.json()
    returned = body["kv_message"]
    message = KVMessage.from_bytes(http.get(f"/v1/messages/{returned['id']}").content, receiver=agent.fingerprint)
    assert returned["bytes"] > 0 and returned["content"] == "turn" and message.shared_layers == list(range(4))
    prompt = agent.chat_ids([{"role": "user", "content": "Mira lives in Oslo. Where?"}])
    ids = message.token_ids.tolist()
    reply = ids[len(prompt):]
    assert ids[:len(prompt)] == prompt and agent.decode(reply) == body["choices"][0]["message"]["content"]
    heard = chat(http, "And then?", [returned["id"]], max_tokens=5).json()
    question = agent.chat_ids([{"role": "user", "content": "And then?"}])
    tokens, valid = pad_left([ids + question], agent.pad_id)
    expected = greedy_generate(agent.model, empty_input(agent.model, 1), tokens, valid, 5, agent.stop_ids,
                               agent.pad_id)[0]
    assert heard["choices"][0]["message"]["content"] == agent.decode(expected)
    only = chat(http, "Where?", max_tokens=3, kv_return={"layers": [1, 2]}).json()["kv_message"]
    reply_message = KVMessage.from_bytes(http.get(f"/v1/messages/{only['id']}").content)
    assert reply_message.shared_layers == [1, 2] and 1 <= reply_message.context_len <= 3
    chosen = chat(http, "Where?", max_tokens=3, kv_return={"codec": "auto"}).json()["kv_message"]
    choice = KVMessage.from_bytes(http.get(f"/v1/messages/{chosen['id']}").content).meta["codec_choice"]
    assert choice["reason"].startswith("shortest expected wait (encode + ")  # the caller waits on the encoding


def test_kv_return_refuses_what_it_cannot_do_and_stores_nothing(http, app):
    before = len(app.state.store.list())
    for extra, what in (({"stream": True}, "not available with stream"), ({"kv_return": {"codec": "mp3"}}, "codec"),
                        ({"kv_return": {"layers": [9]}}, "out of range 0..3")):
        body = {"kv_return": {}, **extra}
        refused = chat(http, "Where?", **body)
        assert refused.status_code == 400 and what in refused.json()["error"]["message"], refused.text
    assert len(app.state.store.list()) == before
    assert chat(http, "Where?", kv_return={}).status_code == 200 and len(app.state.store.list()) == before + 1


def test_kv_return_over_the_message_size_limit_is_refused_before_generating(agent):
    config = ServeConfig(max_message_bytes=1024, served_model_names=("tiny",))
    with TestClient(create_app(agent, MemoryStore(), config)) as http:
        refused = chat(http, "Mira lives in Oslo. Where?", max_tokens=8, kv_return={"content": "turn"})
        assert refused.status_code == 413 and "could be" in refused.json()["error"]["message"], refused.text
        assert refused.json()["error"]["param"] == "kv_return"
        assert http.app.state.store.list() == []
        assert "kvcomm:generation_tokens_total 0.0" in http.get("/metrics").text  # nothing was generated


@pytest.mark.parametrize("failure", ["over the limit", "store full", "store down", "not encodable"])
def test_a_turn_that_cannot_be_stored_still_gives_back_its_reply(agent, monkeypatch, failure):
    """kv_return: where the turn's message cannot be stored after the reply was generated (a codec
    that did not compress as bounded, a full or unreachable store), the refusal carries the
    completion (before, the generated reply was lost with it); the client gives it in ``carried``."""
    import kvcomm.serve.app as app_module
    from kvcomm.serve.stores import StoreFull, StoreUnavailable

    store = MemoryStore()
    if failure == "over the limit":  # the bound before generating says it fits; the message does not
        monkeypatch.setattr(app_module, "raw_payload_bytes", lambda *args: 0)
    elif failure == "not encodable":  # values the codec cannot carry (e.g. past float16's range)
        import kvcomm.serve.chat as chat_module
        from kvcomm.errors import WireError

        def refuse(*args, **kwargs):
            raise WireError("layer 0: raw stores float16 values")
        monkeypatch.setattr(chat_module.KVMessage, "from_shared", refuse)
    else:
        def put(message_id, data):
            raise (StoreFull if failure == "store full" else StoreUnavailable)("no room" if failure == "store full"
                                                                               else "down")
        monkeypatch.setattr(store, "put", put)
    config = ServeConfig(max_message_bytes=1024 if failure == "over the limit" else 1 << 20,
                         served_model_names=("tiny",))
    with TestClient(create_app(agent, store, config)) as http:
        plain = chat(http, "Mira lives in Oslo. Where?", max_tokens=4).json()
        refused = chat(http, "Mira lives in Oslo. Where?", max_tokens=4, kv_return={"content": "turn", "codec": "fp32"})
        status = {"over the limit": 413, "store full": 507, "store down": 503, "not encodable": 422}[failure]
        assert refused.status_code == status, refused.text
        body = refused.json()
        assert body["error"]["code"] in ("message_too_large", "store_full", "store_unavailable", "invalid_kv_message")
        carried = body["completion"]
        assert carried["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        assert carried["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        assert "kv_message" not in carried and store.list() == []
        client = _mocked(lambda request: httpx.Response(refused.status_code, content=refused.content))
        with pytest.raises(ServiceError) as err:
            client.chat([{"role": "user", "content": "Mira lives in Oslo. Where?"}], kv_return={})
        assert err.value.carried["completion"] == carried


def test_the_launcher_starts_agents_and_stops_them(tiny_dir):
    import socket

    import httpx

    from kvcomm.errors import ConfigError
    from kvcomm.serve.launch import agents, spawn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with agents(str(tiny_dir), [port, 0]) as (url, picked):  # 0: a free port the system picks
        assert url == f"http://127.0.0.1:{port}" and picked != url
        for each in (url, picked):
            assert httpx.get(f"{each}/healthz").status_code == 200
    for each in (url, picked):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{each}/healthz", timeout=1)  # stopped on leaving
    with pytest.raises(ConfigError, match="exited with"):
        spawn("no-such-model-anywhere", port, timeout_s=60)


class _Process:
    """Stands in for a ``kvcomm serve`` process: exits with ``code`` (None: runs until killed, or
    until terminated unless ``ignores_sigterm``), having written ``output``."""

    def __init__(self, code: int | None = None, output: bytes = b"", ignores_sigterm: bool = False) -> None:
        import io

        self.returncode, self.stdout, self.ignores_sigterm = code, io.BytesIO(output), ignores_sigterm
        self.calls: list[str] = []

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.calls.append("terminate")
        if not self.ignores_sigterm:
            self.returncode = -15

    def kill(self) -> None:
        self.calls.append("kill")
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self.calls.append("wait")
        if self.returncode is None:
            raise subprocess.TimeoutExpired("kvcomm serve", timeout or 0)
        return self.returncode


@pytest.fixture
def answering():
    """A port on which another program already answers /healthz with 200."""
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_launcher_refuses_a_port_that_answers_before_starting_anything(answering, monkeypatch):
    """Before, spawn() took another server's /healthz for its agent's, while the agent exited."""
    from kvcomm.serve import launch

    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: started.append(a) or _Process(code=2))
    port = answering.server_address[1]
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: .*another agent there"):
        launch.spawn("tiny", port, timeout_s=5)
    assert started == []


@pytest.mark.parametrize("port, options, message", [
    (70000, [], "ports are 0..65535"),  # before, the launcher's bind took it modulo 65536: port 4464
    (-1, [], "ports are 0..65535"),
    (0, ["--port", "8001"], "not --port among the options"),
    (0, ["--store", "memory", "--host=0.0.0.0"], "not --host=0.0.0.0 among the options"),
])
def test_the_launcher_refuses_an_address_it_cannot_hold_before_starting_anything(monkeypatch, port, options,
                                                                                 message):
    from kvcomm.serve import launch

    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: started.append(a) or _Process(code=2))
    with pytest.raises(ConfigError, match=message):
        launch.spawn("tiny", port, options, timeout_s=5)
    assert started == []


def test_the_launcher_holds_the_port_from_before_the_start_and_hands_it_to_the_agent(monkeypatch):
    """Before, the port was checked, let go, and bound again by the agent a second or two later (its
    imports): another program could take it in between. Now the launcher binds it and the agent
    inherits the listening socket (``--fd``); the launcher's copy is closed once the agent has it."""
    from kvcomm.serve import launch

    seen: dict[str, object] = {}

    def popen(command, **kwargs):
        fd = int(command[command.index("--fd") + 1])
        held = socket.socket(fileno=os.dup(fd))
        with held:
            seen["listens"] = held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            seen["port"] = held.getsockname()[1]
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", seen["port"]))
                seen["another program could bind it"] = True
            except OSError:
                seen["another program could bind it"] = False
        seen["inheritable"] = os.get_inheritable(fd)
        seen["passed"], seen["fd"] = kwargs["pass_fds"], fd
        return _Process(code=2, output=b"loading\n")

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    with pytest.raises(ConfigError, match="exited with 2; its last output:\nloading"):
        launch.spawn("tiny", 0, timeout_s=5)  # 0: a free port the system picks
    assert seen["listens"] is True and seen["another program could bind it"] is False
    assert seen["passed"] == (seen["fd"],) and seen["port"] != 0 and seen["inheritable"] is False  # pass_fds' alone
    with socket.socket() as after:  # the launcher's own copy is closed: the (stand-in) agent held the port alone
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        after.bind(("127.0.0.1", seen["port"]))


def test_serve_holds_its_port_while_the_model_loads_and_hands_that_socket_to_uvicorn(tiny_dir, monkeypatch):
    """Before, the port was checked and let go, and uvicorn bound it once the model had loaded:
    another program could take it meanwhile (a launcher then met that program's /healthz)."""
    import uvicorn
    from typer.testing import CliRunner

    import kvcomm.models
    from kvcomm.cli import app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: dict[str, object] = {}
    loading = kvcomm.models.load_model

    def load_model(*args, **kwargs):
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port))
                seen["port free while loading"] = True
            except OSError:
                seen["port free while loading"] = False
        return loading(*args, **kwargs)

    monkeypatch.setattr(kvcomm.models, "load_model", load_model)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(
        served=[s.getsockname() for s in sockets or []]))
    result = CliRunner().invoke(app, ["serve", "-m", str(tiny_dir), "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert seen == {"port free while loading": False, "served": [("127.0.0.1", port)]}
    assert f"on http://127.0.0.1:{port} (Ctrl+C stops it)" in result.output  # uvicorn does not say it here
    with socket.socket() as after:  # closed once the server returns
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        after.bind(("127.0.0.1", port))


def test_serve_takes_an_inherited_listening_socket_and_refuses_what_is_not_one(tiny_dir, tmp_path, monkeypatch):
    """``--fd``: the socket a launcher bound is the one uvicorn serves; --host/--port beside it, a
    file, a socket that does not listen and a closed descriptor are refused before the model loads."""
    import uvicorn
    from typer.testing import CliRunner

    import kvcomm.models
    from kvcomm.cli import app

    loads: list[object] = []
    monkeypatch.setattr(kvcomm.models, "load_model", lambda *a, **k: loads.append(a) or tiny_loaded("llama"))
    served: list[object] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.extend(
        s.getsockname() for s in sockets or []))
    runner = CliRunner()
    with socket.socket() as idle, open(tmp_path / "file", "w") as file:
        idle.bind(("127.0.0.1", 0))  # bound, never listening
        closed = os.dup(file.fileno())
        os.close(closed)
        for argv, message in [
            (["--fd", str(file.fileno()), "--port", "8001"], "give it without --host and --port"),
            (["--fd", str(file.fileno())], "not an open socket"),
            (["--fd", str(idle.fileno())], "not a TCP socket that listens"),
            (["--fd", str(closed)], "not an open socket"),
        ]:
            result = runner.invoke(app, ["serve", "-m", str(tiny_dir), *argv])
            assert result.exit_code == 2 and message in result.output, (argv, result.output)
        assert idle.getsockname()[1] != 0 and file.writable()  # refused, not closed: not the agent's
    assert loads == [] and served == []
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    result = runner.invoke(app, ["serve", "-m", str(tiny_dir), "--fd", str(listening.fileno())])
    listening.detach()  # the agent (here, in this process) took the descriptor and closed it
    assert result.exit_code == 0, result.output
    assert served == [("127.0.0.1", port)] and f"on http://127.0.0.1:{port} (Ctrl+C stops it)" in result.output
    with socket.socket() as after:  # closed once the server returns
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        after.bind(("127.0.0.1", port))


def test_an_inherited_socket_is_not_handed_on_to_the_agents_own_children():
    from kvcomm.serve.sockets import inherited

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        fd = os.dup(listening.fileno())
        os.set_inheritable(fd, True)  # as pass_fds leaves it in the agent
        with inherited(fd) as held:
            assert held.getsockname() == listening.getsockname() and not os.get_inheritable(fd)


def test_serve_listens_on_every_address_its_host_resolves_to(monkeypatch):
    """``--host localhost`` where localhost is ::1 and 127.0.0.1: uvicorn (asyncio) bound both, the
    first version of ``listen`` only the first; an IPv6 socket is IPv6 alone, beside the IPv4 one."""
    from kvcomm.serve import sockets as serving

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    both = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]  # a resolver's duplicate
    monkeypatch.setattr(serving.socket, "getaddrinfo", lambda *args, **kwargs: both)
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        sockets = serving.listen("localhost", port)
    except ConfigError as err:  # a machine without ::1
        pytest.skip(str(err))
    try:
        assert [serving.url_of(s) for s in sockets] == [f"http://[::1]:{port}", f"http://127.0.0.1:{port}"]
        assert sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # accepted into the IPv4 socket's backlog
    finally:
        for s in sockets:
            s.close()


def test_the_launcher_kills_an_agent_that_neither_answers_nor_stops(monkeypatch):
    from kvcomm.serve import launch

    process = _Process(ignores_sigterm=True)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: process)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    with pytest.raises(ConfigError, match="did not answer within 0.5 s"):
        launch.spawn("tiny", port, timeout_s=0.5)
    assert process.calls == ["terminate", "wait", "kill", "wait"] and process.returncode == -9


def test_stopping_agents_goes_on_past_one_that_will_not_stop(monkeypatch):
    """Before, the first agent that outlived its 30 s raised TimeoutExpired and the rest were not waited for."""
    from kvcomm.serve import launch

    stubborn, polite, last = _Process(ignores_sigterm=True), _Process(), _Process()
    spawned = iter([stubborn, polite, last])
    monkeypatch.setattr(launch, "spawn", lambda model, port, options: launch.Spawned(
        next(spawned), f"http://127.0.0.1:{port}"))
    with launch.agents("tiny", [1, 2, 3]) as urls:
        assert urls == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    assert stubborn.calls == ["terminate", "wait", "kill", "wait"] and stubborn.returncode == -9
    assert polite.calls == last.calls == ["terminate", "wait"]


def _kv_message(agent, tokens=5, full=(True, True, True, True), mode="causal", ids=True, hidden=None, meta=None,
                sink=0, seed=0):
    """A message made by hand (what a peer may send): random KV for ``agent``'s layout."""
    import torch

    from kvcomm.wire.codecs import make_codec
    from kvcomm.wire.message import LayerKV

    fp = agent.fingerprint
    g = torch.Generator().manual_seed(seed)
    layers = [LayerKV(i, f, *(torch.randn(fp["num_kv_heads"], tokens if f else 1, fp["head_dim"], generator=g)
                              for _ in range(2))) for i, f in enumerate(full)]
    token_ids = torch.randint(0, 200, (tokens,), generator=g) if ids is True else ids
    return KVMessage(dict(fp), tokens, sink, layers, make_codec("fp16"), dict(meta or {}), mode, token_ids,
                     dict(hidden or {}))


def test_a_message_that_does_not_fit_the_model_is_refused_before_it_is_stored(http, agent):
    """What the fingerprint does not vouch for is checked against the model at upload, before
    storing (before, these were stored and every chat using them failed): token ids outside the
    vocabulary, hidden states of another width, a passage in other masks than causal, a context
    longer than the model's positions. A context asked as a passage in other masks is refused too."""
    import torch

    width, longest = agent.config.hidden_size, agent.config.max_position_embeddings
    bad = {
        "token id": _kv_message(agent, ids=torch.tensor([5, 6, 7, 99_999, 8])),
        "wide": _kv_message(agent, hidden={0: torch.zeros(5, width + 1)}),
        "causal masks": _kv_message(agent, mode="shift-back", sink=4, meta={"passage": True}),
        f"the model takes {longest}": _kv_message(agent, tokens=longest + 1),
    }
    for i, (why, message) in enumerate(bad.items()):
        answer = http.put(f"/v1/messages/bad{i}", content=message.to_bytes())
        assert answer.status_code == 422 and why in answer.text, (why, answer.text)
        assert answer.json()["error"]["code"] == "invalid_kv_message"
        assert f"bad{i}" not in http.app.state.store.list()
    assert http.put("/v1/messages/good", content=_kv_message(agent, hidden={0: torch.zeros(5, width)}).to_bytes()) \
        .status_code == 200
    answer = http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "passage": True, "mode": "shift-back"})
    assert answer.status_code == 400 and "causal" in answer.text
    assert http.post("/v1/contexts", json={"context": "Mira lives in Oslo.", "passage": True}).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_what_the_model_thread_would_refuse_is_refused_before_the_answer_begins(http, agent, stream):
    """Messages carrying hidden states joined with others, and ``kv_blend`` over messages without
    token ids, in other masks, or with no layer shared in full from the check layer on: a 4xx
    before any 200 (before, a stream answered 200 and then an error event)."""
    import torch

    width = agent.config.hidden_size

    def stored(name, message):
        assert http.put(f"/v1/messages/{name}", content=message.to_bytes()).status_code == 200
        return name

    hidden = [stored(f"h{i}", _kv_message(agent, hidden={0: torch.zeros(5, width)}, seed=i)) for i in range(2)]
    cases = [
        (hidden, {}, "hidden states"),
        ([stored("noids", _kv_message(agent, ids=None))], {"kv_blend": {"ratio": 0.5}}, "token ids"),
        ([stored("back", _kv_message(agent, mode="shift-back", sink=4))], {"kv_blend": {"ratio": 0.5}}, "causal"),
        ([stored("thin", _kv_message(agent, full=(True, False, False, False)))], {"kv_blend": {"ratio": 0.5}},
         "in full"),
    ]
    for refs, extra, why in cases:
        answer = chat(http, "Where?", refs, stream=stream, **extra)
        assert answer.status_code == 400 and why in answer.text, (why, answer.status_code, answer.text)
    assert chat(http, "Where?", [stored("fine", _kv_message(agent))], stream=stream,
                kv_blend={"ratio": 0.5}).status_code == 200


def test_the_decoded_bytes_budget_counts_every_frame(agent):
    """A request's messages may decode to ``max_decoded_bytes`` in all, token ids and hidden
    states counted as the header counts them (before, only keys and values were)."""
    from fastapi import FastAPI

    from kvcomm.serve.chat import load_messages
    from kvcomm.serve.metrics import ServiceMetrics
    from kvcomm.wire.errors import MessageTooLarge
    from kvcomm.wire.message import MessageReader

    store = MemoryStore(1 << 24)
    messages = [_kv_message(agent, tokens=20, seed=i) for i in range(2)]
    for i, message in enumerate(messages):
        store.put(f"m{i}", message.to_bytes())
    sizes = [MessageReader(io.BytesIO(m.to_bytes())).header.decoded_bytes for m in messages]  # as headers count
    config = ServeConfig(max_decoded_bytes=sum(sizes))
    assert len(load_messages(["m0", "m1"], agent, store, config, ServiceMetrics(FastAPI(), store)).messages) == 2
    config = ServeConfig(max_decoded_bytes=sum(sizes) - 1)
    with pytest.raises(MessageTooLarge):
        load_messages(["m0", "m1"], agent, store, config, ServiceMetrics(FastAPI(), store))


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b'["x"]', b"null"])
def test_an_answer_that_is_not_what_was_asked_is_a_service_error(body):
    """A 200 whose body is not a JSON object (a proxy's page) is a ServiceError from every call that
    reads one, as the class promises (before, JSONDecodeError, TypeError or ValueError escaped)."""
    client = _mocked(lambda request: httpx.Response(200, content=body, headers={"content-type": "application/json"}))
    calls = [client.health, client.models, lambda: client.create_context("Mira lives in Oslo."),
             lambda: client.put_message("m", b"x"), lambda: client.chat([{"role": "user", "content": "Hi"}])]
    for call in calls:
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.status == 0
    listing = _mocked(lambda request: httpx.Response(200, json={"data": "x"}))
    with pytest.raises(ServiceError, match="without a list of models"):
        listing.models()


def test_the_chat_s_own_text_cannot_move_where_passages_go(agent):
    """kvcomm cuts a chat at a marker of its own where passages go: a chat whose text holds that
    marker is refused (before, the passages went inside the earlier turn and the real marker stayed
    in the prompt as text)."""
    turns = [{"role": "user", "content": "Be brief.\x00kvcomm-passages\x00"}, {"role": "assistant", "content": "Ok."},
             {"role": "user", "content": "Where does Mira live?"}]
    with pytest.raises(ConfigError, match="reserves"):
        agent.chat_after_passages(turns)
    opening, rest = agent.chat_after_passages(turns[2:])
    assert "kvcomm" not in agent.decode(opening + rest)


def test_what_a_header_shows_is_refused_before_any_layer_is_decoded(http, agent, monkeypatch):
    """A context longer than the model's positions (at upload and in a chat) and a message leaving
    layers out (in a chat) are refused from the header: no layer is decoded for them."""
    import torch

    from kvcomm.wire import message as wire_message

    longest = agent.config.max_position_embeddings
    too_long = _kv_message(agent, tokens=longest + 1).to_bytes()
    droidspeak = _kv_message(agent, full=(True, False, True, True))
    droidspeak.layers[1] = type(droidspeak.layers[1])(1, False, droidspeak.layers[1].keys[:, :0],
                                                       droidspeak.layers[1].values[:, :0])
    droidspeak.hidden[1] = torch.zeros(droidspeak.context_len, agent.config.hidden_size)
    assert http.put("/v1/messages/ds", content=droidspeak.to_bytes()).status_code == 200  # stored for others
    decoded = []
    real = wire_message._decode_layer
    monkeypatch.setattr(wire_message, "_decode_layer", lambda *a: decoded.append(1) or real(*a))
    answer = http.put("/v1/messages/long", content=too_long)
    assert answer.status_code == 422 and "the model takes" in answer.text
    inline = {"data": base64.b64encode(too_long).decode()}
    for refs, why in (([inline], "the model takes"), (["ds"], "leaves layers out")):
        answer = chat(http, "Where?", refs)
        assert answer.status_code == 422 and why in answer.text, answer.text
    assert decoded == []


def test_a_context_whose_client_left_stops_its_prefill_and_stores_nothing(agent, monkeypatch):
    """/v1/contexts ran on after its client had gone, holding the model (a chat's stopped at its next step)."""
    import threading

    from kvcomm.serve import worker as worker_module

    store = MemoryStore(1 << 26)
    app = create_app(agent, store, ServeConfig(served_model_names=("tiny",), prefill_chunk=4))
    checks, started = [0], threading.Event()
    real = worker_module.Job.check

    def slow(job):  # every prefill chunk takes 20 ms
        checks[0] += 1
        started.set()
        time.sleep(0.02)
        real(job)

    monkeypatch.setattr(worker_module.Job, "check", slow)
    body = json.dumps({"context": "fact " * 160, "layers": [0, 1]}).encode()  # ~200 chunks: 4 s
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert started.wait(10)
        began = time.monotonic()
        reply = httpx.post(url + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        waited = time.monotonic() - began
        metrics = httpx.get(url + "/metrics").text
    assert reply.status_code == 200 and waited < 2.0 and checks[0] < 100
    assert 'kvcomm:requests_cancelled_total{reason="disconnected"} 1.0' in metrics and store.list() == []


def test_the_app_served_again_on_a_new_event_loop_takes_concurrent_requests(app):
    """The model's asyncio lock bound to the first loop that waited on it: a second TestClient's
    concurrent requests failed with 500."""
    import concurrent.futures

    for _ in range(2):
        with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda q: chat(client, f"question {q}?", max_tokens=3), range(4)))
        assert [r.status_code for r in replies] == [200] * 4


def test_requests_in_flight_share_one_decoded_budget_and_give_it_back(agent, monkeypatch):
    """Chats waiting for the model held what they had decoded, so a queue multiplied the per-request
    limit (12 chats of 56 MiB held 794 MiB). Now all requests in flight share one budget: one that
    does not fit is refused (503, Retry-After) before it decodes anything, and every way a request
    ends gives its share back (answered, streamed, refused, a client that left)."""
    import threading

    from kvcomm.serve import app as app_module
    from kvcomm.wire import MessageReader

    app = create_app(agent, MemoryStore(1 << 26), ServeConfig(served_model_names=("tiny",)))
    with TestClient(app) as http:
        http_context = http.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 8, "codec": "fp16"}).json()
    size = MessageReader(io.BytesIO(app.state.store.get(http_context["id"]))).header.decoded_bytes
    app = create_app(agent, app.state.store, ServeConfig(served_model_names=("tiny",), max_decoded_bytes=size,
                                                         max_decoded_total_bytes=size + size // 2))
    decoded, inside, go = app.state.decoded, threading.Event(), threading.Event()
    real = app_module.generate

    def waiting(*args, **kwargs):  # the first chat holds the model until told to go on
        inside.set()
        go.wait(10)
        return real(*args, **kwargs)

    with TestClient(app) as http:
        assert chat(http, "Where?", [http_context["id"]]).status_code == 200 and decoded.held == 0
        monkeypatch.setattr(app_module, "generate", waiting)
        first = threading.Thread(target=lambda: chat(http, "Where?", [http_context["id"]]))
        first.start()
        assert inside.wait(10) and decoded.held == size
        second = chat(http, "And?", [http_context["id"]])
        upload = http.put("/v1/messages/copy", content=app.state.store.get(http_context["id"]))
        go.set()
        first.join(10)
        monkeypatch.setattr(app_module, "generate", real)
        assert second.status_code == 503 and second.headers["Retry-After"] == "1"
        assert second.headers[NOTHING_DONE_HEADER] == "1"  # the agent's own word: the client may send it again
        assert second.json()["error"]["code"] == "decoded_budget_busy"
        assert upload.status_code == 503 and "copy" not in app.state.store.list()
        assert decoded.held == 0
        for stream in (False, True):
            assert chat(http, "Where?", [http_context["id"]], stream=stream).status_code == 200
        assert chat(http, "Where?", [http_context["id"], "missing"]).status_code == 404
        assert http.put("/v1/messages/copy", content=app.state.store.get(http_context["id"])).status_code == 200
        assert decoded.held == 0


def test_a_cached_context_is_read_within_the_limits_and_one_no_chat_could_read_is_not_made(agent, monkeypatch):
    """A cached /v1/contexts decoded the whole stored message with ``from_bytes`` (outside the model
    lock, past every limit) only to name its layers; and the service stored contexts its own chats
    then refused. (It is now checked as an upload is: streamed, within the limits, on the model's thread.)"""
    app = create_app(agent, MemoryStore(1 << 26), ServeConfig(served_model_names=("tiny",),
                                                               max_decoded_bytes=64 << 10))
    body = {"context": "Mira lives in Oslo.", "layers": [0, 2], "codec": "fp16"}
    with TestClient(app) as http:
        made = http.post("/v1/contexts", json=body).json()
        decodes = []
        real = KVMessage.from_bytes
        monkeypatch.setattr(KVMessage, "from_bytes", lambda *a, **k: decodes.append(1) or real(*a, **k))
        again = http.post("/v1/contexts", json=body).json()
        assert again == made | {"cached": True} and decodes == []
        monkeypatch.setattr(KVMessage, "from_bytes", real)
        assert chat(http, "Where?", [made["id"]]).status_code == 200
        stored = len(app.state.store.list())
        big = http.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 20, "codec": "int8"})
        assert big.status_code == 413 and "a chat of this service reads at most" in big.json()["error"]["message"]
        assert len(app.state.store.list()) == stored


def test_a_stored_context_that_does_not_hold_what_its_address_promises_is_prefilled_again(agent):
    """A cached /v1/contexts was checked by its header's fingerprint alone: bytes under its content
    address that were corrupt or of another content (a store shared with another writer) were
    answered as cached, and every chat naming them failed."""
    app = create_app(agent, MemoryStore(1 << 26), ServeConfig(served_model_names=("tiny",)))
    body = {"context": "Mira lives in Oslo.", "layers": [0, 2], "codec": "fp16"}
    with TestClient(app) as http:
        made = http.post("/v1/contexts", json=body).json()
        good = app.state.store.get(made["id"])
        other = http.post("/v1/contexts", json=body | {"context": "Omar lives in Cairo."}).json()
        wrong_layers = http.post("/v1/contexts", json=body | {"layers": [1]}).json()
        int8 = http.post("/v1/contexts", json=body | {"codec": "int8"}).json()
        variants = {"droidspeak": KVMessage.from_bytes(good), "hidden": KVMessage.from_bytes(good),
                    "passage": KVMessage.from_bytes(good)}
        left_out = variants["droidspeak"].layers[1]  # layer 1 left out, the hidden state entering it sent
        variants["droidspeak"].layers[1] = replace(left_out, keys=left_out.keys[:, :0], values=left_out.values[:, :0])
        variants["droidspeak"].hidden[1] = torch.zeros(variants["droidspeak"].context_len, agent.config.hidden_size)
        variants["hidden"].hidden[0] = torch.zeros(variants["hidden"].context_len, agent.config.hidden_size)
        variants["passage"].meta = variants["passage"].meta | {"passage": True}
        for bad in (good[: len(good) // 2], good[:-1] + bytes([good[-1] ^ 1]),
                    *(app.state.store.get(entry["id"]) for entry in (other, wrong_layers, int8)),
                    *(message.to_bytes() for message in variants.values())):
            app.state.store.put(made["id"], bad)
            again = http.post("/v1/contexts", json=body)
            assert again.status_code == 200 and again.json() == made  # not cached: prefilled again
            assert app.state.store.get(made["id"]) == good
        assert http.post("/v1/contexts", json=body).json() == made | {"cached": True}
        assert chat(http, "Where?", [made["id"], made["id"]]).status_code == 200
        app.state.store.put(made["id"], good[:-1] + bytes([good[-1] ^ 1]))  # a bad entry whose prefill is refused:
        real = app.state.contexts.encode                                    # gone all the same
        app.state.contexts.encode = lambda *args, **kwargs: (_ for _ in ()).throw(MessageTooLarge("refused"))
        assert http.post("/v1/contexts", json=body).status_code == 413 and app.state.store.get(made["id"]) is None
        app.state.contexts.encode = real
        for codec in ("int8", "auto", "klt"):  # a well-made entry of every kind of codec is taken as it is
            asked = body | {"codec": codec}
            first = http.post("/v1/contexts", json=asked).json()
            assert http.post("/v1/contexts", json=asked).json() == first | {"cached": True}


def test_a_returned_turn_no_chat_of_the_service_could_read_is_not_stored(agent):
    """kv_return checked the turn's message against the byte limit only: a turn that decodes to more
    than a chat reads was stored, and every chat naming it refused (/v1/contexts refuses such a context)."""
    app = create_app(agent, MemoryStore(1 << 26), ServeConfig(served_model_names=("tiny",), max_decoded_bytes=4096))
    question = "Where does Mira live? " * 3
    with TestClient(app) as http:
        ask = {"messages": [{"role": "user", "content": question}], "max_tokens": 5}
        for keep in ({"content": "turn", "codec": "int8"}, {"content": "turn", "codec": "int8", "layers": [0]}):
            refused = http.post("/v1/chat/completions", json=ask | {"kv_return": keep})
            assert refused.status_code == 413 and "a chat of this service reads at most" in refused.text
        assert app.state.store.list() == []
        assert http.post("/v1/contexts", json={"context": question, "codec": "int8"}).status_code == 413
        kept = http.post("/v1/chat/completions", json=ask | {"kv_return": {"content": "reply", "layers": [0]}})
        assert kept.status_code == 200 and chat(http, "Q", [kept.json()["kv_message"]["id"]]).status_code == 200


def test_a_cached_context_over_one_service_s_limits_is_refused_and_kept_for_the_others(agent):
    """Two services share a store; the stricter one, asked for a context the other made, removed
    it as if it were bad (it is only over its own limit)."""
    store = MemoryStore(1 << 26)
    roomy = create_app(agent, store, ServeConfig(served_model_names=("tiny",)))
    strict = create_app(agent, store, ServeConfig(served_model_names=("tiny",), max_decoded_bytes=4096))
    body = {"context": "Mira lives in Oslo. " * 4, "codec": "fp16"}
    with TestClient(roomy) as a, TestClient(strict) as b:
        made = a.post("/v1/contexts", json=body).json()
        refused = b.post("/v1/contexts", json=body)
        assert refused.status_code == 413 and store.get(made["id"]) is not None
        assert a.post("/v1/contexts", json=body).json() == made | {"cached": True}


def test_checking_a_cached_context_counts_in_the_decoded_budget_and_the_deadline(agent, monkeypatch):
    """The check of a cached context decodes it: that decoding took no share of the service's decoded
    budget (a chat and an upload were refused where it went ahead) and ran past the deadline."""
    from kvcomm.serve import contexts as contexts_module

    app = create_app(agent, MemoryStore(1 << 26), ServeConfig(served_model_names=("tiny",), timeout_s=0.5))
    body = {"context": "Mira lives in Oslo.", "layers": [0, 2], "codec": "fp16"}
    with TestClient(app) as http:
        made = http.post("/v1/contexts", json=body).json()
        held = app.state.decoded.hold()
        held.take(app.state.decoded.total - 1)  # all but one byte of the budget taken by requests in flight
        try:
            busy = http.post("/v1/contexts", json=body)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "decoded_budget_busy"
        finally:
            held.release()
        assert http.post("/v1/contexts", json=body).json()["cached"] is True
        monkeypatch.setattr(contexts_module, "SLICE", 64)  # the deadline is checked between slices
        real = contexts_module._slices

        def slow(data, check):
            for piece in real(data, check):
                time.sleep(0.05)
                yield piece

        monkeypatch.setattr(contexts_module, "_slices", slow)
        late = http.post("/v1/contexts", json=body)
        assert late.status_code == 504 and app.state.store.get(made["id"]) is not None


def test_a_stream_stopped_by_its_deadline_counts_what_it_generated_and_its_error(agent, monkeypatch):
    """Tokens were counted only when generation finished, so a stream cut by its deadline counted
    none of those it had sent; and its error, after the 200, showed nowhere in the metrics."""
    from kvcomm.serve import worker as worker_module

    real = worker_module.Job.check

    def slow(job):  # each step takes 50 ms: the 1 s deadline passes mid-answer
        time.sleep(0.05)
        real(job)

    monkeypatch.setattr(worker_module.Job, "check", slow)
    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(served_model_names=("tiny",), timeout_s=1.0))
    with TestClient(app) as http:
        events = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 200, "stream": True}).text
        text = http.get("/metrics").text
    sent = sum(1 for line in events.splitlines() if line.startswith("data: {") and '"content":' in line) - 1
    assert sent > 2 and '"code": "timeout"' in events and "[DONE]" not in events
    counted = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith(("kvcomm:generation_tokens_total", "kvcomm:stream_errors_total",
                                   "kvcomm:prompt_tokens_total"))}
    assert counted["kvcomm:generation_tokens_total"] >= sent and counted["kvcomm:prompt_tokens_total"] > 0
    assert counted['kvcomm:stream_errors_total{code="timeout"}'] == 1.0


def test_the_request_deadline_counts_the_time_its_kv_messages_take_to_load(agent, monkeypatch):
    """The deadline started after the messages were fetched and decoded, so a slow decode was not bounded by it."""
    from kvcomm.serve import app as app_module

    real = app_module.load_messages

    def slow(*args, **kwargs):
        time.sleep(1.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_messages", slow)
    app = create_app(agent, MemoryStore(1 << 24), ServeConfig(served_model_names=("tiny",), timeout_s=1.0))
    with TestClient(app) as http:
        reply = chat(http, "Where?")
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"


def test_the_client_takes_a_kv_message_where_bytes_go_and_refuses_calls_once_closed(live, agent):
    """A KVMessage was not JSON serialisable in chat and not content for put_message; a closed
    client's calls were httpx's RuntimeError."""
    from kvcomm import encode_context

    message = encode_context(agent, "Mira lives in Oslo.")
    client = Client(live)
    by_bytes = client.chat([{"role": "user", "content": "Where?"}], [message.to_bytes()], max_tokens=3)
    by_object = client.chat([{"role": "user", "content": "Where?"}], [message], max_tokens=3)
    assert by_bytes["choices"] == by_object["choices"]
    assert client.put_message("as-object", message)["bytes"] == len(message.to_bytes())
    with pytest.raises(ConfigError, match="its bytes or a KVMessage .* not int"):
        client.chat([{"role": "user", "content": "Where?"}], [5], max_tokens=3)  # type: ignore[list-item]
    client.close()
    for call in (client.health, lambda: client.get_message("as-object")):
        with pytest.raises(ConfigError, match="was closed"):
            call()


def test_two_event_loops_never_run_the_model_at_once():
    """Each loop queued on its own lock, so two loops' requests ran the model in two threads at once."""
    import threading
    from unittest.mock import MagicMock

    from kvcomm.serve.worker import Job, ModelWorker

    worker, guard, state = ModelWorker(MagicMock()), threading.Lock(), {"now": 0, "most": 0}

    def work(job):
        with guard:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.1)
        with guard:
            state["now"] -= 1
        return "ok"

    def loop():
        async def main():
            return await asyncio.gather(*[worker.run(Job(10), work) for _ in range(3)])
        assert asyncio.run(main()) == ["ok"] * 3

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state["most"] == 1


def test_a_share_given_back_by_the_garbage_collector_inside_the_budgets_lock_does_not_deadlock():
    """A dropped request's share is given back during garbage collection, on whatever thread runs
    it: one that held the budget's lock (making a refusal) waited for itself for ever."""
    import threading

    from kvcomm.serve.budget import DecodedBudget

    budget = DecodedBudget(100)
    hold = budget.hold()
    hold.take(60)
    done = threading.Event()

    def collect_inside_the_lock():
        with budget._lock:  # as a collection triggered while _take holds it
            hold.release()
        done.set()

    thread = threading.Thread(target=collect_inside_the_lock, daemon=True)
    thread.start()
    assert done.wait(5) and budget.held == 0


def test_the_client_refuses_a_chat_answer_without_content_and_fetch_keeps_what_is_no_message(tmp_path, monkeypatch):
    """A reply without choices escaped `kvcomm remote chat` as KeyError; `remote fetch` wrote any
    200 body (a proxy's login page) as a message and said so."""
    from typer.testing import CliRunner

    from kvcomm.cli import app

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, json={"id": "x", "object": "chat.completion"})
        return httpx.Response(200, content=b"<html>login page</html>")

    real = Client.__init__

    def mocked(self, base_url, token=None, timeout=300.0):
        real(self, base_url, token, timeout)
        self._http = httpx.Client(base_url=base_url, transport=httpx.MockTransport(answer))

    monkeypatch.setattr(Client, "__init__", mocked)
    with Client("http://agent") as client, pytest.raises(ServiceError, match="without choices"):
        client.chat([{"role": "user", "content": "hi"}])
    fetched = CliRunner().invoke(app, ["remote", "fetch", "abc", str(tmp_path / "m.kvcm"), "--url", "http://agent"])
    assert fetched.exit_code == 2 and "error:" in fetched.output and not (tmp_path / "m.kvcm").exists()
    chatted = CliRunner().invoke(app, ["remote", "chat", "hi", "--url", "http://agent"])
    assert chatted.exit_code == 2 and "without choices" in chatted.output


def test_remote_commands_give_up_on_a_stalled_agent_after_their_timeout():
    """`kvcomm remote` waited 300 s per read on an agent that accepts and never answers; it had no --timeout."""
    from typer.testing import CliRunner

    from kvcomm.cli import app

    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(1)
        began = time.monotonic()
        result = CliRunner().invoke(app, ["remote", "models", "--url", f"http://127.0.0.1:{stalled.getsockname()[1]}",
                                          "--timeout", "0.5"])
    assert result.exit_code == 2 and "timed out" in result.output and time.monotonic() - began < 30


def _counted(http, name: str) -> float:
    return float(next(line.split()[-1] for line in http.get("/metrics").text.splitlines() if line.startswith(name)))


def test_prompt_tokens_count_context_prefills_and_the_opening_before_passages(http):
    """A context's prefill for /v1/contexts counted nothing, and a chat over passages counted its
    prompt without the opening it prefilled: the metric said less than the usage did."""
    before = _counted(http, "kvcomm:prompt_tokens_total")
    made = http.post("/v1/contexts", json={"context": "Omar lives in Cairo. Mira lives in Oslo."}).json()
    after = _counted(http, "kvcomm:prompt_tokens_total")
    assert after - before == made["context_tokens"] > 0
    again = http.post("/v1/contexts", json={"context": "Omar lives in Cairo. Mira lives in Oslo."}).json()
    assert again["cached"] and _counted(http, "kvcomm:prompt_tokens_total") == after  # no prefill, no tokens
    passage = http.post("/v1/contexts", json={"context": "Omar lives in Cairo.", "passage": True}).json()
    start = _counted(http, "kvcomm:prompt_tokens_total")
    answer = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Where?"}], "max_tokens": 2,
        "kv_messages": [passage["id"]]}).json()
    assert _counted(http, "kvcomm:prompt_tokens_total") - start == answer["usage"]["prompt_tokens"]


def test_a_chat_refused_after_its_kv_messages_were_read_counts_no_kv_bytes(http):
    """kvcomm:kv_bytes_received counted a chat's messages once read, before the chat could still be
    refused (400 context_length_exceeded, a stream's too): refused requests showed as KV used."""
    made = http.post("/v1/contexts", json={"context": "Mira lives in Oslo. " * 30}).json()
    inline = {"data": base64.b64encode(http.get(f"/v1/messages/{made['id']}").content).decode()}
    before = _counted(http, "kvcomm:kv_bytes_received_total")
    for kv, stream in ((made["id"], False), (inline, False), (made["id"], True)):
        refused = chat(http, "Where?", [kv], max_tokens=512, stream=stream)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert _counted(http, "kvcomm:kv_bytes_received_total") == before
    served = chat(http, "Where?", [made["id"]], max_tokens=2).json()
    assert _counted(http, "kvcomm:kv_bytes_received_total") - before == served["usage"]["kv_bytes_received"] > 0


def test_a_request_queued_for_the_model_leaves_the_queue_when_its_client_leaves():
    """The wait for the model watched only the deadline: a request whose client had gone stayed
    queued (with its share of the decoded budget, counted as waiting) until the model came to it."""
    import asyncio

    from kvcomm.serve.worker import Job, _acquire

    async def scenario() -> list:
        lock = asyncio.Lock()
        await lock.acquire()  # the model is busy
        left, late = Job(timeout_s=30), Job(timeout_s=0.2)
        waiting = asyncio.ensure_future(_acquire(lock, left))
        await asyncio.sleep(0.1)
        left.cancelled.set()  # its client went away
        began = asyncio.get_running_loop().time()
        said = [await waiting, asyncio.get_running_loop().time() - began < 1.0]
        said.append(await _acquire(lock, late))  # nobody comes: the deadline
        lock.release()
        said += [await _acquire(lock, Job(timeout_s=5)), lock.locked()]  # free: held
        return said

    assert asyncio.run(scenario()) == ["disconnected", True, "deadline", None, True]

    async def cancelled_while_waiting() -> bool:  # the request's own task cancelled (a timeout around it)
        lock = asyncio.Lock()
        await lock.acquire()
        waiting = asyncio.ensure_future(_acquire(lock, Job(timeout_s=30)))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        lock.release()
        await asyncio.sleep(0.05)
        return lock.locked()  # before, its acquire went on and took the lock for no one

    assert asyncio.run(cancelled_while_waiting()) is False


def test_a_store_that_answers_slowly_is_healthy_and_one_that_does_not_answer_is_not():
    """Each /healthz waited 50 ms for a fresh probe: a store 100 ms away was 'degraded' at every poll."""
    import asyncio

    from kvcomm.serve import health as health_module
    from kvcomm.serve.health import StoreHealth

    class Slow(MemoryStore):
        delay = 0.1

        def ping(self) -> None:
            time.sleep(self.delay)

    async def polls(store: Slow, count: int) -> list:
        health, seen = StoreHealth(store, fresh_s=0.0), []
        for _ in range(count):
            seen.append((await health.state())["ok"])
            await asyncio.sleep(0.15)
        return seen

    assert asyncio.run(polls(Slow(1 << 20), 4)) == [True] * 4
    hung = Slow(1 << 20)
    hung.delay = 1.0
    original = health_module.SLOW_S
    health_module.SLOW_S = 0.3
    try:
        assert asyncio.run(polls(hung, 4)) == [True, True, False, False]  # the last answer, then not answering
    finally:
        health_module.SLOW_S = original


def test_a_chat_template_that_refuses_the_turns_is_a_400_not_a_500():
    """Templates of Gemma-it, Mistral or Llama-2-chat raise on turns that do not alternate; that was
    an internal error. /v1/contexts refuses the tool role as the chat route does."""
    agent = tiny_loaded("llama")
    agent.tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "<|user|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with TestClient(create_app(agent, MemoryStore(1 << 24), ServeConfig())) as http:
        for route, body in (("/v1/chat/completions", {"messages": twice, "max_tokens": 2}),
                            ("/v1/contexts", {"messages": twice})):
            answer = http.post(route, json=body)
            assert answer.status_code == 400 and "chat template refuses these turns" in answer.text
            assert "roles must alternate" in answer.json()["error"]["message"]
        tool = http.post("/v1/contexts", json={"messages": [{"role": "tool", "content": "42"}]})
        assert tool.status_code == 400 and tool.json()["error"]["code"] == "unsupported_parameter"  # as a chat's
        assert http.post("/v1/chat/completions", json={"messages": twice[:1], "max_tokens": 2}).status_code == 200


def test_a_service_whose_limits_pass_the_wire_modules_defaults_reads_its_own_messages(monkeypatch):
    """The service read its own messages' headers with the wire module's default limits (8 GiB
    decoded): a service configured above them refused, 413, a context it had already stored. Here the
    wire default is made small instead (50,000 bytes) against the service's 1 GiB."""
    from kvcomm.wire.message import MessageReader

    wire_max, receiver, _, admit = MessageReader.__init__.__defaults__
    monkeypatch.setattr(MessageReader.__init__, "__defaults__", (wire_max, receiver, 50_000, admit))
    agent = tiny_loaded("llama")
    with TestClient(create_app(agent, MemoryStore(1 << 26), ServeConfig(max_decoded_bytes=1 << 30))) as http:
        made = http.post("/v1/contexts", json={"context": "word " * 150, "codec": "fp32"})
        assert made.status_code == 200, made.text
        store = http.app.state.store
        assert made.json()["id"] in store.list()
        turn = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2, "kv_messages": [made.json()["id"]],
                                                       "kv_return": {"codec": "fp32"}})
        assert turn.status_code == 200, turn.text
