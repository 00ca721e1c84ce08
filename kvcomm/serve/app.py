"""``kvcomm serve``: one agent (one model) behind HTTP, exchanging KV messages.

Routes: ``POST /v1/contexts`` (prefill a context, store its KV message), ``GET``/``PUT
/v1/messages/{id}`` (message bytes), ``POST /v1/chat/completions`` (OpenAI-compatible; the
extension field ``kv_messages`` names stored ids or carries base64 messages), ``GET /healthz``
and ``GET /metrics`` (Prometheus text).

The model serves one request at a time: requests queue on a lock and run in a worker thread, so
concurrent requests never mix. Every message is fully verified (checksums, fingerprint) before it
is stored or used; a request past its deadline is stopped between decoding steps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from kvcomm.agents import encode_context, encode_ids
from kvcomm.errors import ConfigError, KvcommError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import concat_shared, empty_input, greedy_generate, pad_left, receiver_input
from kvcomm.serve.store import MessageStore, StoreError, check_id
from kvcomm.wire import FingerprintMismatch, KVMessage, MessageTooLarge, WireError, check_fingerprint, make_codec

# kvcomm errors as HTTP statuses, first match wins.
_STATUS = ((MessageTooLarge, 413), (FingerprintMismatch, 409), (WireError, 422), (StoreError, 400),
           (ConfigError, 400), (KvcommError, 400))


@dataclass
class ServeConfig:
    """Limits and defaults of one agent service."""

    token: str | None = None  # when set, every /v1 route needs "Authorization: Bearer <token>"
    max_request_bytes: int = 64 << 20
    max_message_bytes: int = 64 << 20
    max_new_tokens: int = 512
    timeout_s: float = 300.0
    codec: str = "int8"


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ContextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: str | None = None
    messages: list[ChatMessage] | None = None
    layers: list[int] | None = Field(None, description="Layers shared in full; all if omitted.")
    codec: str | None = None
    mode: Literal["causal", "legacy", "shift-back"] = "causal"
    id: str | None = None


class InlineMessage(BaseModel):
    data: str = Field(description="A KV message, base64-encoded.")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (temperature, …)
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    kv_messages: list[str | InlineMessage] = Field(default_factory=list)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvcomm_requests", "Requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.bytes_in = Counter("kvcomm_bytes_in", "Request body bytes", registry=self.registry)
        self.bytes_out = Counter("kvcomm_bytes_out", "KV message bytes sent", registry=self.registry)
        self.kv_received = Counter("kvcomm_kv_bytes_received", "KV message bytes used by requests",
                                   registry=self.registry)
        self.store_lookups = Counter("kvcomm_store_lookups", "Message store lookups", ["result"],
                                     registry=self.registry)
        self.ttft = Histogram("kvcomm_ttft_seconds", "Time to first token", registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.token_latency = Histogram("kvcomm_token_seconds", "Latency per generated token", registry=self.registry,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


class _Deadline(Exception):
    pass


def create_app(agent: LoadedModel, store: MessageStore, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application of one agent holding ``agent`` and using ``store``."""
    config = config or ServeConfig()
    make_codec(config.codec)  # fail at start-up, not at the first request
    app = FastAPI(title="kvcomm agent", version="1")
    metrics = _Metrics()
    lock = asyncio.Lock()

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        length = int(request.headers.get("content-length") or 0)
        if length > config.max_request_bytes:
            response: Response = JSONResponse({"error": f"request body over {config.max_request_bytes} bytes"}, 413)
        else:
            response = await call_next(request)
        metrics.bytes_in.inc(length)
        metrics.requests.labels(request.url.path.split("/")[2] if request.url.path.startswith("/v1/")
                                else request.url.path.strip("/"), str(response.status_code)).inc()
        return response

    def authorise(request: Request) -> None:
        if config.token and request.headers.get("authorization") != f"Bearer {config.token}":
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def exclusive(work: Any, *args: Any) -> Any:
        """Runs model work in a thread, one request at a time. The deadline bounds the wait for
        the model; generation checks it between steps. The lock is held until the thread ends,
        even if the client goes away, so two requests never share the model."""
        try:
            await asyncio.wait_for(lock.acquire(), timeout=config.timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"no model time within {config.timeout_s} s") from None
        try:
            return await anyio.to_thread.run_sync(work, *args)
        except _Deadline:
            raise HTTPException(504, f"request exceeded {config.timeout_s} s") from None
        finally:
            lock.release()

    def load_message(ref: str | InlineMessage) -> tuple[KVMessage, int]:
        if isinstance(ref, InlineMessage):
            try:
                data = base64.b64decode(ref.data, validate=True)
            except ValueError:
                raise HTTPException(400, "inline KV message is not valid base64") from None
        else:
            stored = store.get(check_id(ref))
            metrics.store_lookups.labels("hit" if stored is not None else "miss").inc()
            if stored is None:
                raise HTTPException(404, f"no KV message {ref!r}")
            data = stored
        message = KVMessage.from_bytes(data, max_bytes=config.max_message_bytes)
        check_fingerprint(message.fingerprint, agent.fingerprint)
        metrics.kv_received.inc(len(data))
        return message, len(data)

    @app.exception_handler(KvcommError)
    async def refuse(request: Request, err: KvcommError) -> JSONResponse:
        status = next(code for kind, code in _STATUS if isinstance(err, kind))
        return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": agent.name, "layers": agent.num_layers}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/contexts", dependencies=[Depends(authorise)])
    async def create_context(body: ContextRequest) -> dict[str, Any]:
        if (body.context is None) == (body.messages is None):
            raise HTTPException(400, "give exactly one of 'context' or 'messages'")
        if body.layers is not None and any(not 0 <= x < agent.num_layers for x in body.layers):
            raise HTTPException(400, f"layers must be in 0..{agent.num_layers - 1}")
        message_id = check_id(body.id) if body.id else uuid.uuid4().hex

        def work() -> tuple[bytes, KVMessage]:
            if body.context is not None:
                message = encode_context(agent, body.context, body.layers, body.codec or config.codec, body.mode)
            else:
                ids = _chat_ids(agent, body.messages or [], generation_prompt=False)
                message = encode_ids(agent, ids, body.layers, body.codec or config.codec, body.mode)
            return message.to_bytes(), message

        data, message = await exclusive(work)
        store.put(message_id, data)
        return {"id": message_id, "bytes": len(data), "fingerprint": agent.fingerprint,
                "context_tokens": message.context_len, "layers": message.shared_layers}

    @app.get("/v1/messages/{message_id}", dependencies=[Depends(authorise)])
    async def get_message(message_id: str) -> Response:
        data = store.get(check_id(message_id))
        metrics.store_lookups.labels("hit" if data is not None else "miss").inc()
        if data is None:
            raise HTTPException(404, f"no KV message {message_id!r}")
        metrics.bytes_out.inc(len(data))
        return Response(data, media_type="application/octet-stream")

    @app.put("/v1/messages/{message_id}", dependencies=[Depends(authorise)])
    async def put_message(message_id: str, request: Request) -> dict[str, Any]:
        check_id(message_id)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_message_bytes:
                    raise HTTPException(413, f"message over {config.max_message_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # nothing was stored: a partial upload never becomes visible
            raise HTTPException(400, "client disconnected during upload") from None
        data = b"".join(chunks)
        message = KVMessage.from_bytes(data, max_bytes=config.max_message_bytes)  # verify fully first
        check_fingerprint(message.fingerprint, agent.fingerprint)
        store.put(message_id, data)
        return {"id": message_id, "bytes": len(data), "layers": message.shared_layers}

    @app.delete("/v1/messages/{message_id}", dependencies=[Depends(authorise)])
    async def delete_message(message_id: str) -> dict[str, Any]:
        if not store.delete(check_id(message_id)):
            raise HTTPException(404, f"no KV message {message_id!r}")
        return {"id": message_id, "deleted": True}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorise)])
    async def chat(body: ChatRequest) -> Any:
        budget = body.max_completion_tokens or body.max_tokens or 256
        if not 1 <= budget <= config.max_new_tokens:
            raise HTTPException(400, f"max_tokens must be in 1..{config.max_new_tokens}")
        loaded = [load_message(ref) for ref in body.kv_messages]
        messages, kv_bytes = [m for m, _ in loaded], sum(size for _, size in loaded)
        ids = _chat_ids(agent, body.messages, generation_prompt=True)
        created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        usage_extra = {"kv_bytes_received": kv_bytes, "kv_tokens_received": sum(m.context_len for m in messages)}
        began = time.perf_counter()
        if not body.stream:
            tokens, finish = await exclusive(_generate, agent, messages, ids, budget, None, began + config.timeout_s,
                                             metrics, began)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": agent.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": agent.decode(tokens)},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                          "total_tokens": len(ids) + len(tokens), **usage_extra},
            }
        return StreamingResponse(_stream(exclusive, agent, messages, ids, budget, config, metrics, began, created,
                                         completion_id, usage_extra), media_type="text/event-stream")

    app.state.store, app.state.metrics = store, metrics
    return app


def _chat_ids(agent: LoadedModel, messages: list[ChatMessage], generation_prompt: bool) -> list[int]:
    return agent.chat_ids([m.model_dump() for m in messages], generation_prompt)


def _generate(agent: LoadedModel, messages: list[KVMessage], ids: list[int], budget: int,
              emit: Any, deadline: float, metrics: _Metrics, began: float) -> tuple[list[int], str]:
    """Greedy decoding on top of the received KV (if any); ``emit(token)`` streams each token."""
    model = agent.model
    dtype = next(model.parameters()).dtype
    if messages:
        start = receiver_input(concat_shared(model, [m.to_shared(dtype) for m in messages]))
    else:
        start = empty_input(model, 1)
    input_ids, valid = pad_left([ids], agent.pad_id)
    last = [began]

    def on_step(token: Any, done: Any) -> None:
        now = time.perf_counter()
        (metrics.ttft if last[0] == began else metrics.token_latency).observe(now - last[0])
        last[0] = now
        if emit is not None and not bool(done[0]):
            emit(int(token[0]))
        if now > deadline:
            raise _Deadline()

    out = greedy_generate(model, start, input_ids, valid, budget, agent.stop_ids, agent.pad_id, on_step)[0]
    return out, "length" if len(out) >= budget else "stop"


async def _stream(exclusive: Any, agent: LoadedModel, messages: list[KVMessage], ids: list[int], budget: int,
                  config: ServeConfig, metrics: _Metrics, began: float, created: int, completion_id: str,
                  usage_extra: dict[str, int]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, the text growing token by token."""
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def emit(token: int) -> None:
        if stop.is_set():
            raise _Deadline()  # the client went away: stop generating
        loop.call_soon_threadsafe(queue.put_nowait, token)

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": agent.name, "choices": [{"index": 0, "delta": delta,
                                                                     "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    task = asyncio.create_task(exclusive(_generate, agent, messages, ids, budget, emit,
                                         began + config.timeout_s, metrics, began))
    task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    yield chunk({"role": "assistant", "content": ""})
    tokens: list[int] = []
    sent = ""
    try:
        while (token := await queue.get()) is not None:
            tokens.append(token)
            text = agent.decode(tokens)
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk({"content": text[len(sent):]})
                sent = text
        try:
            _, finish = await task
        except HTTPException as err:
            yield f"data: {json.dumps({'error': err.detail})}\n\n"
            return
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                 "total_tokens": len(ids) + len(tokens), **usage_extra}
        yield chunk({}, finish, usage)
        yield "data: [DONE]\n\n"
    finally:
        stop.set()
