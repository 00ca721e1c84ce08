"""``kvcomm serve``: one agent (one model) behind HTTP, exchanging KV messages.

Routes: ``POST /v1/contexts`` (prefill a context, store its KV message at chosen layers),
``GET``/``PUT``/``DELETE /v1/messages/{id}``, ``POST /v1/chat/completions`` (OpenAI-compatible; the
extension field ``kv_messages`` names stored ids or carries base64 messages), ``GET /v1/models``,
``GET /v1/profile``, ``GET /health`` and ``/healthz``, ``GET /metrics`` (Prometheus).

Every request passes :class:`~kvcomm.serve.limits.RequestLimits` first (token, then body size);
store I/O, decoding and tokenising run off the event loop; the model serves one request at a time
(:mod:`kvcomm.serve.worker`); every error has OpenAI's shape (:mod:`kvcomm.serve.errors`). Uploads
are bounded apart from the rest: at most ``max_uploads`` at once, each checked on a thread of its
own, and one that sends nothing for ``upload_idle_s`` seconds is refused (``ServeConfig``).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Path, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from openai.types import Model
from openai.types.chat import ChatCompletion
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from kvcomm import __version__
from kvcomm.errors import ConfigError, KvcommError, MessageTooLarge
from kvcomm.models.loading import LoadedModel
from kvcomm.selection import Profile
from kvcomm.serve import errors
from kvcomm.serve.budget import DecodedBudget, Hold
from kvcomm.serve.chat import Received, check_header, check_usable, generate, generate_returning, load_messages
from kvcomm.serve.config import ServeConfig
from kvcomm.serve.contexts import ContextMaker, own_header, raw_payload_bytes
from kvcomm.serve.errors import UNRECOGNIZED, ServiceRefusal, documented
from kvcomm.serve.health import StoreHealth
from kvcomm.serve.limits import RequestLimits
from kvcomm.serve.metrics import ServiceMetrics
from kvcomm.serve.responses import completion, stream_events
from kvcomm.serve.retry import busy_headers
from kvcomm.serve.schemas import ChatRequest, ContextCreated, ContextRequest, Deleted, Health, MessageStored
from kvcomm.serve.stores import ID_PATTERN, MessageStore, StoreError, StoreUnavailable, check_given_id, check_id
from kvcomm.serve.worker import Job, ModelWorker
from kvcomm.tasks.base import Pieces
from kvcomm.wire import KVMessage, make_codec
from kvcomm.wire.codecs import preset_of
from kvcomm.wire.header import Header
from kvcomm.wire.streaming import receive

V1 = (400, 401, 413, 422, 503)  # what any /v1 route may answer besides its own statuses
MessageId = Annotated[str, Path(description="1-128 letters, digits, '_', '.', '-'; not starting with '.', "
                                            "not ending in .partial or .tmp",
                                json_schema_extra={"pattern": ID_PATTERN})]


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]


def create_app(agent: LoadedModel, store: MessageStore, config: ServeConfig | None = None,
               profile: Profile | Sequence[Profile] | None = None) -> FastAPI:
    """The FastAPI application of one agent holding ``agent`` and using ``store``.

    Args:
        profile: the layer ranking(s) a ratio takes, at most one per layout (its ``details.pieces``:
            contexts or passages); a layout without one is calibrated once on first need.
    """
    config = config or ServeConfig()
    if (bound := getattr(store, "max_bytes", None)) is not None and bound < config.max_message_bytes:
        # a message the store cannot hold is refused as too large before any prefill, not after
        config = config.model_copy(update={"max_message_bytes": int(bound)})
    names = config.served_model_names or (agent.name,)
    app = FastAPI(title="kvcomm agent", version=__version__,
                  description="An LLM agent that exchanges attention KV caches (KVComm).")
    # the token and body checks inside the metrics' middleware (added after: outer), so their 401s and 413s are counted
    app.add_middleware(RequestLimits, token=config.token, public_docs=config.public_docs,
                       max_body=config.max_request_bytes)
    metrics = ServiceMetrics(app, store)
    worker = ModelWorker(metrics)
    decoded = DecodedBudget(config.decoded_total_bytes)
    contexts = ContextMaker(agent, config, [profile] if isinstance(profile, Profile) else list(profile or ()))
    health = StoreHealth(store)
    errors.install(app)
    created = int(time.time())
    max_len = agent.max_positions

    @app.get("/health", responses=documented(503))
    async def live() -> dict[str, str]:
        """Liveness, as vLLM's ``/health``: 200 while the process serves."""
        return {"status": "ok"}

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True)
    async def healthz(request: Request) -> Health:
        """Readiness with details: the model, and the store (``degraded`` while its backend is down).
        With ``--token``, a caller without it gets the status and the store's kind only (the
        store's address and errors, and the model, are the token's)."""
        store_state = await health.state()
        status: Literal["ok", "degraded"] = "ok" if store_state["ok"] else "degraded"
        if not getattr(request.state, "authorised", True):
            return Health(status=status, store={"kind": store_state["kind"], "ok": store_state["ok"]})
        return Health(status=status, model=agent.name, layers=agent.num_layers, store=store_state)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, err: StoreUnavailable) -> Response:
        health.record_failure(str(err))  # /healthz says degraded at once, not after its next probe
        return await errors.respond(err)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={**documented(401, 413), 200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        # off the event loop: collecting asks the store how much it holds
        scraped = await anyio.to_thread.run_sync(generate_latest, metrics.registry)
        return Response(scraped, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=documented(401, 413))
    async def models() -> ModelList:
        """The served model under each of its names (``--served-model-name``)."""
        extra = {"root": agent.name, "max_model_len": max_len, "num_layers": agent.num_layers}
        return ModelList(data=[Model.model_validate({"id": n, "object": "model", "created": created,
                                                     "owned_by": "kvcomm", **extra}) for n in names])

    @app.get("/v1/profile", responses=documented(401, 404, 413, 422))
    async def current_profile(pieces: Pieces = "chats") -> dict[str, Any]:
        """The layer ranking contexts (``pieces=chats``) or passages (``pieces=passages``) use for a
        ratio (404 until one is loaded or calibrated)."""
        if pieces not in contexts.profiles:
            raise ServiceRefusal(404, f"no layer ranking for {pieces} yet: the service calibrates one on the first "
                                      f"ratio asked for {'a passage' if pieces == 'passages' else 'a context'}",
                                 "profile_not_found")
        return contexts.profiles[pieces].model_dump()

    @app.post("/v1/contexts", response_model=ContextCreated, responses=documented(*V1, 404, 409, 504))
    async def create_context(body: ContextRequest, request: Request) -> ContextCreated:
        """Prefill a context and store its KV message (content-addressed: the same content, once)."""
        await health.require()  # a store that is down is found before a prefill is spent
        if role := next((m.role for m in body.messages or [] if m.role in ("tool", "function")), None):
            raise ServiceRefusal(400, f"the {role!r} role is not supported", "unsupported_parameter", "messages")
        ids = await anyio.to_thread.run_sync(contexts.tokens, body)
        if max_len is not None and len(ids) > max_len:
            raise ServiceRefusal(400, f"the context is {len(ids)} tokens; the model takes {max_len}",
                                 "context_length_exceeded", "context")
        job = Job(config.timeout_s)

        def work(job: Job) -> tuple[Any, bytes | None, tuple[bytes, KVMessage] | None]:
            plan = contexts.plan(body, ids)
            hold = decoded.hold()  # what checking a stored entry decodes counts as any chat's decoding does
            try:
                existing = contexts.existing(plan, store, hold, job.check)
            finally:
                hold.release()
            if existing is not None:
                return plan, existing, None
            job.check()
            made = contexts.encode(plan, job.check)
            store.put(plan.message_id, made[0])  # before the next request's lookup: the same content, one prefill
            return plan, None, made

        plan, existing, made = await worker.run_watched(request, job, work)  # a client that left stops the prefill
        if existing is not None:  # stored under its content address: its header says what the reply needs
            metrics.contexts.labels("no").inc()
            data = existing
        else:
            assert made is not None
            data = made[0]
            metrics.contexts.labels("yes").inc()
            metrics.prompt_tokens.inc(len(plan.ids))  # a context's prefill is prompt work too
        header = own_header(data)  # names the codec 'auto' chose, and why
        choice = header.meta.get("codec_choice")
        if existing is None:
            _count_choice(metrics, header)
        return ContextCreated(id=plan.message_id, bytes=len(data), cached=existing is not None,
                              fingerprint=agent.fingerprint, context_tokens=header.context_len,
                              layers=[entry.index for entry in header.layers if entry.full], mode=header.mode,
                              codec=preset_of(header.codec.name, header.codec.params) or header.codec.name,
                              codec_choice=choice, bandwidth_mbit=plan.bandwidth[0] if plan.bandwidth else None,
                              bandwidth_source=plan.bandwidth[1] if plan.bandwidth else None)

    @app.get("/v1/messages/{message_id}", responses={**documented(*V1, 404),
                                                     200: {"content": {"application/octet-stream": {}}}})
    async def get_message(message_id: MessageId) -> Response:
        data = await anyio.to_thread.run_sync(store.get, check_id(message_id))
        metrics.lookups.labels("hit" if data is not None else "miss").inc()
        if data is None:
            raise ServiceRefusal(404, f"no KV message {message_id!r}", "message_not_found")
        metrics.kv_sent.inc(len(data))
        return Response(data, media_type="application/octet-stream")

    # Uploads hold a slot each while their body arrives: at most config.max_uploads at once, so that
    # slow or stalled uploaders cannot take what the other routes need (anyio's shared threads).
    uploads = anyio.CapacityLimiter(config.max_uploads)

    @app.put("/v1/messages/{message_id}", response_model=MessageStored, responses=documented(*V1, 408, 409),
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}}})
    async def put_message(message_id: MessageId, request: Request) -> MessageStored:
        """Store a message after verifying it fully against this agent's model. Layers are
        checked and decoded while later ones are still arriving; a message found bad is refused
        without reading the rest, and nothing is stored before the final digest has passed. An id
        starting ``kv-`` is refused: those are the service's content addresses. At most
        ``max_uploads`` uploads are received at once (one more: 503, ``too_many_uploads``), and an
        upload that sends nothing for ``upload_idle_s`` seconds is refused (408, ``upload_timeout``)."""
        check_given_id(message_id)
        try:
            uploads.acquire_nowait()
        except anyio.WouldBlock:
            raise ServiceRefusal(503, f"{config.max_uploads} uploads are being received already (the most at once); "
                                      "retry once one has ended", "too_many_uploads",
                                 headers=busy_headers()) from None
        hold = decoded.hold()  # what its check decodes counts with the chats' KV
        try:
            return await _receive_upload(message_id, request, hold)
        finally:
            hold.release()
            uploads.release()

    async def _receive_upload(message_id: str, request: Request, hold: Hold) -> MessageStored:
        """The body of one admitted upload, checked on a thread of its own while it arrives (its
        limiter is its own: the upload's slot in ``uploads`` is what bounds these threads)."""
        feed: queue.Queue[bytes | BaseException | None] = queue.Queue()

        def admit(header: Header) -> None:
            check_header(header, agent)
            hold.take(header.decoded_bytes)

        checking = asyncio.ensure_future(anyio.to_thread.run_sync(partial(
            receive, _fed(feed), receiver=agent.fingerprint, max_bytes=config.max_message_bytes,
            max_decoded_bytes=config.max_decoded_bytes, admit=admit), limiter=anyio.CapacityLimiter(1)))
        chunks, size, ended = [], 0, False
        body = aiter(request.stream())
        deadline = time.monotonic() + config.timeout_s  # a trickle just inside the idle limit ends too
        try:
            while True:
                left = deadline - time.monotonic()
                arriving = asyncio.ensure_future(anext(body, None))
                done, _ = await asyncio.wait({arriving, checking}, timeout=max(0.0, min(config.upload_idle_s, left)),
                                             return_when=asyncio.FIRST_COMPLETED)
                if arriving not in done:
                    arriving.cancel()
                    with contextlib.suppress(BaseException):
                        await arriving
                    if checking in done:  # refused before its end (by what arrived): its error is the answer
                        break
                    why = (f"sent nothing for {config.upload_idle_s:g} s" if left > config.upload_idle_s
                           else f"did not end within {config.timeout_s:g} s (the request deadline)")
                    raise ServiceRefusal(408, f"the upload {why}; nothing of it was stored", "upload_timeout",
                                         headers={"Connection": "close"})
                chunk = arriving.result()
                if chunk is None:
                    break
                size += len(chunk)
                if size > config.max_message_bytes:
                    raise ServiceRefusal(413, f"message over {config.max_message_bytes} bytes", "message_too_large")
                chunks.append(chunk)
                feed.put(chunk)
                if checking.done():  # refused before its end: its error is the answer
                    break
            ended = True
        except ClientDisconnect:  # nothing was stored: a partial upload never becomes visible
            raise ServiceRefusal(400, "client disconnected during upload", "client_disconnected") from None
        finally:
            feed.put(None if ended else _UploadStopped())
            if not ended:
                with contextlib.suppress(Exception):
                    await checking
        message = await checking
        check_usable(message, agent)  # what the fingerprint does not cover: nothing unusable is stored
        data = b"".join(chunks)
        await anyio.to_thread.run_sync(store.put, message_id, data)
        return MessageStored(id=message_id, bytes=len(data), layers=message.shared_layers)

    @app.delete("/v1/messages/{message_id}", response_model=Deleted, responses=documented(*V1, 404))
    async def delete_message(message_id: MessageId) -> Deleted:
        if not await anyio.to_thread.run_sync(store.delete, check_id(message_id)):
            raise ServiceRefusal(404, f"no KV message {message_id!r}", "message_not_found")
        return Deleted(id=message_id, deleted=True)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_unset=True,
              responses={**documented(*V1, 404, 409, 499, 504), 200: {"content": {"text/event-stream": {}}}})
    async def chat(body: ChatRequest, request: Request) -> Any:
        """OpenAI chat completion; ``kv_messages`` adds KV contexts (stored ids or inline messages)."""
        began = time.monotonic()
        budget = _check_chat(body, names, config, agent.num_layers)
        job = Job(config.timeout_s)  # the deadline counts from here: fetching and decoding its KV messages too
        hold = decoded.hold()  # this request's share of what every request in flight may decode to
        try:
            received: Received = await anyio.to_thread.run_sync(load_messages, body.kv_messages, agent, store,
                                                                 config, metrics, body.kv_blend, hold)
        except BaseException:
            hold.release()
            raise
        hold.tie(received)  # given back when the request's messages are dropped, if not before
        streaming = False
        try:
            response = await _chat_on(body, request, received, budget, began, hold, job)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:
            if not streaming:  # a stream gives it back when it ends
                hold.release()

    async def _chat_on(body: ChatRequest, request: Request, received: Received, budget: int, began: float,
                       hold: Hold, job: Job) -> Any:
        """The chat once its KV messages are decoded and checked."""
        turns = [m.turn() for m in body.messages]
        if received.passages:  # read inside the last user turn: the chat's opening, then them, then the rest
            received.opening, ids = await anyio.to_thread.run_sync(agent.chat_after_passages, turns)
        else:
            ids = await anyio.to_thread.run_sync(agent.chat_ids, turns)
        prompt = received.prompt_tokens(ids)
        if max_len is not None and body.max_completion_tokens is None and body.max_tokens is None:
            # no budget asked for: the default shrinks to the positions left, as vLLM's does (before, a
            # prompt that fitted with room to answer was refused for the default's 256 tokens)
            budget = max(1, min(budget, max_len - received.tokens - prompt))
        total = received.tokens + prompt + budget
        if max_len is not None and total > max_len:
            raise ServiceRefusal(400, f"this request needs {total} positions ({received.tokens} KV, {prompt} prompt, "
                                      f"{budget} answer tokens); the model takes {max_len}",
                                 "context_length_exceeded", "messages")
        name = body.model or names[0]

        def usage() -> dict[str, int]:
            extra = {"kv_bytes_received": received.bytes, "kv_tokens_received": received.tokens}
            return extra | ({"kv_tokens_recomputed": received.recomputed} if body.kv_blend is not None else {})

        if body.kv_return is not None:
            return await _chat_returning(body, request, job, received, ids, budget, name, usage, began)
        work = partial(generate, agent, received, ids, budget, config, metrics, blending=body.kv_blend)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
            return StreamingResponse(stream_events(worker, job, agent, work, prompt, name, usage, began, metrics,
                                                   hold.release, include_usage), media_type="text/event-stream")
        tokens, finish = await worker.run_watched(request, job, work)
        metrics.e2e.observe(time.monotonic() - began)
        return completion(name, agent.decode(tokens), finish, prompt, len(tokens), usage())

    async def _chat_returning(body: ChatRequest, request: Request, job: Job, received: Received, ids: list[int],
                              budget: int, name: str, usage: Any, began: float) -> Any:
        """A completion that also stores its turn as a KV message (``kv_return``) and names it; a
        message sure to be over the size limit is refused before any generation."""
        assert body.kv_return is not None
        keep = body.kv_return
        if keep.content == "turn" and received.passages:  # the turn's own KV starts inside its last user turn
            raise ServiceRefusal(400, "kv_return: content 'turn' after passages: the chat's opening and the passages "
                                      "are other messages, so no one message holds the whole turn; ask for content "
                                      "'reply'", "unsupported_parameter", "kv_return")
        longest = (len(ids) if keep.content == "turn" else 0) + budget
        most = raw_payload_bytes(agent, make_codec(keep.codec), keep.layers, longest)
        if most is not None and most > config.max_message_bytes:
            raise ServiceRefusal(413, f"kv_return: the turn's message could be {most:,} bytes; the service stores at "
                                      f"most {config.max_message_bytes:,} (fewer layers, a smaller codec, content "
                                      "'reply' or a smaller max_tokens)", "message_too_large", "kv_return")
        try:  # stored, a turn no chat could read would be refused by every chat that names it
            contexts.check_decoded(contexts.decoded_size(keep.layers, longest))
        except MessageTooLarge as err:
            raise ServiceRefusal(413, f"kv_return: {err} (or content 'reply', or a smaller max_tokens)",
                                 "message_too_large", "kv_return") from None
        work = partial(generate_returning, agent, received, ids, budget, config, metrics, blending=body.kv_blend,
                       keep=body.kv_return)
        tokens, finish, data = await worker.run_watched(request, job, work)
        prompt = received.prompt_tokens(ids)  # passages: the chat's opening was prefilled too
        reply = completion(name, agent.decode(tokens), finish, prompt, len(tokens), usage()).model_dump(
            exclude_unset=True)
        message_id = f"turn-{uuid.uuid4().hex}"
        if isinstance(data, KvcommError):  # the turn could not be encoded (values its codec cannot carry)
            raise errors.carrying(data, completion=reply)
        header = own_header(data)  # its decoded size, and the codec 'auto' chose
        try:
            if len(data) > config.max_message_bytes:  # a compressing codec that did not compress
                raise ServiceRefusal(413, f"kv_return: the turn's message is {len(data):,} bytes; the service stores "
                                          f"at most {config.max_message_bytes:,}", "message_too_large", "kv_return")
            try:
                contexts.check_decoded(header.decoded_bytes)  # its token ids counted
            except MessageTooLarge as err:
                raise ServiceRefusal(413, f"kv_return: {err}", "message_too_large", "kv_return") from None
            await anyio.to_thread.run_sync(store.put, message_id, data)
        except (ServiceRefusal, StoreError) as err:  # the reply was generated: it goes back with the refusal
            raise errors.carrying(err, completion=reply) from None
        metrics.e2e.observe(time.monotonic() - began)
        choice = _count_choice(metrics, header)
        return reply | {"kv_message": {"id": message_id, "bytes": len(data), "content": body.kv_return.content}
                        | ({"codec_choice": choice} if choice is not None else {})}

    app.state.store, app.state.metrics, app.state.contexts, app.state.decoded = store, metrics, contexts, decoded
    return app


def _count_choice(metrics: ServiceMetrics, header: Header) -> dict[str, Any] | None:
    """What codec ``auto`` chose for a message the service encoded (None: another codec), counted."""
    choice = header.meta.get("codec_choice")
    if choice is not None:
        metrics.codec_chosen.labels(choice["chosen"]).inc()
    return choice


class _UploadStopped(Exception):
    """Ends the check of an upload that stopped early (the client left, or the body was too large)."""


def _fed(feed: queue.Queue[bytes | BaseException | None]) -> Iterator[bytes]:
    """The chunks put on ``feed``, until None (an exception put there is raised)."""
    while (item := feed.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _check_chat(body: ChatRequest, names: tuple[str, ...], config: ServeConfig, num_layers: int) -> int:
    """The answer budget of a chat request, after refusing what the service cannot do."""
    if (problem := body.unsupported()) is not None:
        raise ServiceRefusal(400, f"{problem[0]}: {problem[1]}", "unsupported_parameter", problem[0])
    if body.model is not None and body.model not in names:
        raise ServiceRefusal(404, f"The model `{body.model}` does not exist; this agent serves {', '.join(names)}",
                             "model_not_found", "model")
    if body.stream_options is not None:
        _check_stream_options(body.stream_options, body.stream)
    if len(body.kv_messages) > config.max_kv_messages:
        raise ServiceRefusal(400, f"{len(body.kv_messages)} kv_messages; at most {config.max_kv_messages}",
                             "too_many_kv_messages", "kv_messages")
    if body.kv_return is not None:
        if body.stream:
            raise ServiceRefusal(400, "kv_return: not available with stream; ask without streaming",
                                 "unsupported_parameter", "kv_return")
        try:
            make_codec(body.kv_return.codec)
        except ConfigError as err:
            raise ServiceRefusal(400, f"kv_return.codec: {err}", "invalid_value", "kv_return") from None
        if body.kv_return.layers is not None and not all(0 <= layer < num_layers for layer in body.kv_return.layers):
            raise ServiceRefusal(400, f"kv_return.layers: out of range 0..{num_layers - 1}", "invalid_value",
                                 "kv_return")
    budget = body.max_completion_tokens or body.max_tokens or min(config.default_max_tokens, config.max_new_tokens)
    if budget > config.max_new_tokens:
        raise ServiceRefusal(400, f"max_tokens must be at most {config.max_new_tokens}", "invalid_value", "max_tokens")
    return budget


STREAM_OPTIONS = ("include_usage", "include_obfuscation")  # OpenAI's; obfuscation is accepted and ignored


def _check_stream_options(options: Any, stream: bool) -> None:
    """Refuses ``stream_options`` as OpenAI does: only with ``stream``, an object of its known
    fields, each true, false or null (400 naming what is wrong)."""
    if not stream:
        raise ServiceRefusal(400, "stream_options: only allowed when stream is true", "invalid_value",
                             "stream_options")
    if not isinstance(options, dict):
        raise ServiceRefusal(400, f"stream_options: expected an object, got {_json_type(options)}", "invalid_value",
                             "stream_options")
    if unknown := [key for key in options if key not in STREAM_OPTIONS]:
        raise ServiceRefusal(400, f"{UNRECOGNIZED}: stream_options.{unknown[0][:64]}",
                             "unrecognized_argument", "stream_options")
    if wrong := next((key for key, value in options.items() if value is not None and not isinstance(value, bool)),
                     None):
        raise ServiceRefusal(400, f"stream_options.{wrong}: expected true or false, got {_json_type(options[wrong])}",
                             "invalid_value", "stream_options")


def _json_type(value: Any) -> str:
    """The JSON type of a parsed value, as a refusal names it (the value itself is not echoed)."""
    kinds = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "an array"),
             (dict, "an object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")
