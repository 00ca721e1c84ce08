"""The agent service on a tiny model: routes, OpenAI compatibility, faults, concurrency, restarts."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from kvcomm.serve import Client, MemoryStore, ServiceError
from kvcomm.serve.app import ServeConfig, create_app
from kvcomm.wire import KVMessage
from tests.conftest import tiny_loaded


@pytest.fixture(scope="module")
def agent():
    return tiny_loaded("llama")


@pytest.fixture
def app(agent):
    return create_app(agent, MemoryStore(1 << 24), ServeConfig(max_request_bytes=1 << 20, max_message_bytes=1 << 20))


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
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]


def test_bad_input_gets_clear_4xx_and_stores_nothing(http, agent):
    assert http.put("/v1/messages/junk", content=b"not a message").status_code == 422
    assert http.put("/v1/messages/../x", content=b"x").status_code in (400, 404)
    assert chat(http, "q", ["missing"]).status_code == 404
    assert chat(http, "q", max_tokens=10_000).status_code == 400
    assert http.post("/v1/contexts", json={"context": "x", "layers": [99]}).status_code == 400
    assert http.post("/v1/contexts", json={"context": "x", "unknown": 1}).status_code == 422
    huge = b"x" * ((1 << 20) + 1)
    assert http.put("/v1/messages/huge", content=huge).status_code == 413
    foreign = KVMessage.from_bytes(http.get(
        f"/v1/messages/{http.post('/v1/contexts', json={'context': 'x'}).json()['id']}").content)
    foreign.fingerprint["vocab_sha256"] = "0" * 32
    assert http.put("/v1/messages/foreign", content=foreign.to_bytes()).status_code == 409
    assert "junk" not in http.app.state.store.list() and "foreign" not in http.app.state.store.list()


def test_bearer_token_is_required_when_configured(agent):
    app = create_app(agent, MemoryStore(), ServeConfig(token="s3cret"))
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/v1/contexts", json={"context": "x"}).status_code == 401
        ok = http.post("/v1/contexts", json={"context": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_metrics_are_prometheus_text(http):
    chat(http, "hello")
    text = http.get("/metrics").text
    assert "kvcomm_requests_total" in text and "kvcomm_ttft_seconds_bucket" in text


def test_restart_with_disk_tier_keeps_messages(agent, tmp_path):
    with TestClient(create_app(agent, MemoryStore(disk=tmp_path), ServeConfig())) as http:
        message_id = http.post("/v1/contexts", json={"context": "Kept."}).json()["id"]
    with TestClient(create_app(agent, MemoryStore(disk=tmp_path), ServeConfig())) as http:
        assert http.get(f"/v1/messages/{message_id}").status_code == 200


@pytest.fixture
def live(app):
    """The app on a real loopback socket, for clients that open their own connections."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


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
