"""Chat completion responses in the ``openai`` package's own types, whole or streamed as events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from kvcomm.models.loading import LoadedModel
from kvcomm.serve.errors import describe_error, error_json
from kvcomm.serve.metrics import ServiceMetrics
from kvcomm.serve.worker import Job, ModelWorker

logger = logging.getLogger(__name__)


def _usage(prompt: int, completion: int, extra: dict[str, int]) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, **extra}


def completion(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
               extra: dict[str, int]) -> ChatCompletion:
    """A whole chat completion (``usage`` adds ``kv_bytes_received`` and ``kv_tokens_received``)."""
    return ChatCompletion.model_validate({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": finish}],
        "usage": _usage(prompt_tokens, completion_tokens, extra),
    })


def _new_text(text: str, sent: str, final: bool) -> str:
    """What a stream sends of ``text`` (the reply decoded so far) after ``sent``: nothing while the
    last character is still incomplete (a character split across tokens decodes to U+FFFD until
    its last byte comes; sent early, no later text would extend what was sent), the rest once
    ``final``, so the deltas add up to the whole reply's text."""
    if not text.startswith(sent) or (not final and text.endswith("\ufffd")):
        return ""
    return text[len(sent):]


async def stream_events(worker: ModelWorker, job: Job, agent: LoadedModel, work: Callable[..., tuple[list[int], str]],
                        prompt_tokens: int, model: str, extra: Callable[[], dict[str, int]], began: float,
                        metrics: ServiceMetrics, ended: Callable[[], None] = lambda: None,
                        include_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, the text growing token by token.

    ``include_usage`` (``stream_options``), as OpenAI's: every chunk carries ``"usage": null`` and
    one more chunk, with no choices, the usage, before ``[DONE]``; without it no chunk has a usage.
    If the client goes away the generator is closed, the job is cancelled, and the model thread
    stops at its next step; an error after the stream started is sent as an error event.
    ``ended`` is called once the model thread has let go of the request's work (the decoded
    budget's share given back).
    """
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def emit(token: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, token)

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        """A chunk of ``delta`` (None: the usage chunk, with no choices)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {ChatCompletionChunk.model_validate(body).model_dump_json(exclude_unset=True)}\n\n"

    task = asyncio.create_task(worker.run(job, partial(work, emit=emit)))
    task.add_done_callback(lambda done: loop.call_soon_threadsafe(queue.put_nowait, None))
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
    tokens: list[int] = []
    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (token := await queue.get()) is not None:
            tokens.append(token)
            if delta := _new_text(agent.decode(tokens), sent, final=False):
                yield chunk({"content": delta})
                sent += delta
        try:
            _, finish = await task
        except Exception as err:  # a refusal after the stream began (deadline): say so in the stream
            status, type_, code, message = describe_error(err)
            metrics.stream_errors.labels(code or type_).inc()
            if status == 500:  # a bug: no handler sees it once the stream began, so log it here
                logger.exception("a streamed chat completion failed")
            yield f"data: {json.dumps(error_json(status, message, code, kind=type_))}\n\n"
            return
        if delta := _new_text(agent.decode(tokens), sent, final=True):
            yield chunk({"content": delta})
        yield chunk({}, finish)
        if include_usage:
            yield chunk(None, usage=_usage(prompt_tokens, len(tokens), extra()))
        yield "data: [DONE]\n\n"
        metrics.e2e.observe(time.monotonic() - began)
    finally:
        job.cancelled.set()  # the client went away (or we are done): the model thread stops at its next step
        task.add_done_callback(lambda done: ended())  # at once if it is done, else when the model thread lets go
