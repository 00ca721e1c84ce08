"""A chat completion on top of received KV: the messages it uses, the decoding, and the stream.

Messages are fetched and decoded off the event loop, each checked against this agent's model and
against what is left of the request's decoded-bytes budget before a tensor is made. Generation
runs in the model thread (:mod:`kvcomm.serve.worker`) with chunked prefill and per-step checks.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn

import torch

from kvcomm.errors import ConfigError, KvcommError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import (
    ReceiverInput,
    SharedKV,
    check_joinable,
    concat_shared,
    empty_input,
    greedy_generate,
    pad_left,
    prefill,
    receiver_input,
    splice,
)
from kvcomm.protocol.blend import blend, check_token_ids, unblendable
from kvcomm.protocol.reply import generate_turn, outgoing
from kvcomm.serve.budget import Hold
from kvcomm.serve.config import ServeConfig
from kvcomm.serve.errors import ServiceRefusal
from kvcomm.serve.metrics import ServiceMetrics
from kvcomm.serve.schemas import BlendRequest, InlineMessage, KVReturn, MessageRef
from kvcomm.serve.stores import MessageStore, check_id
from kvcomm.serve.worker import Job
from kvcomm.wire import KVMessage
from kvcomm.wire.codecs.auto import encoded_on_demand
from kvcomm.wire.header import Header


@dataclass
class Received:
    """The KV messages a request uses, decoded and checked. Passages (every message or none) are
    read inside the chat's last user turn: ``opening`` holds the chat's tokens before them."""

    messages: list[KVMessage] = field(default_factory=list)
    bytes: int = 0
    recomputed: int = 0  # context tokens recomputed by blending
    opening: list[int] | None = None

    @property
    def tokens(self) -> int:
        return sum(m.context_len for m in self.messages)

    def prompt_tokens(self, ids: list[int]) -> int:
        """The tokens a chat prefills: ``ids``, after the opening before passages (prefilled too)."""
        return len(ids) + len(self.opening or [])

    @property
    def passages(self) -> bool:
        return bool(self.messages) and self.messages[0].meta.get("passage") is True


def load_messages(refs: list[MessageRef], agent: LoadedModel, store: MessageStore, config: ServeConfig,
                  metrics: ServiceMetrics, blending: BlendRequest | None = None, hold: Hold | None = None) -> Received:
    """Fetches and decodes ``refs`` (run in a thread). The decoded-bytes budget is shared by all of
    them, and each message's share is taken into ``hold`` (the service's budget for every request in
    flight) from its header, before it is decoded. Everything the model thread would refuse is
    refused here, before any answer begins (a stream's 200 included): messages that do not fit the
    model (:func:`check_usable`), cannot be joined, or cannot be blended as ``blending`` asks.

    Raises:
        ServiceRefusal: bad base64, a stored id that does not exist (404), the service's budget
            busy (503), or one of the above.
        WireError: a message that is corrupt, foreign, too large, or over the budget.
    """
    received = Received()
    budget = config.max_decoded_bytes
    for ref in refs:
        data = _fetch(ref, store, config, metrics)
        headers: list[Header] = []
        message = KVMessage.from_bytes(data, max_bytes=config.max_message_bytes, receiver=agent.fingerprint,
                                       max_decoded_bytes=budget, admit=partial(_readable, agent, headers, hold))
        check_usable(message, agent)
        budget -= headers[0].decoded_bytes  # every frame as the header counts it: KV, hidden states, token ids
        received.messages.append(message)
        received.bytes += len(data)
    if len({m.meta.get("passage") is True for m in received.messages}) > 1:
        raise ServiceRefusal(400, "kv_messages mixes passages (read inside the last user turn) with contexts (read "
                                  "before the chat): send one kind", "mixed_kv_messages", "kv_messages")
    _check_joinable(received.messages)
    if blending is not None:
        _check_blendable(received.messages, blending)
    return received  # its bytes are counted once the model uses them (a request refused after this used none)


def check_header(header: Header, agent: LoadedModel) -> None:
    """What a message's fingerprint does not vouch for and its header shows, checked against
    ``agent``'s model before any payload is decoded (``admit`` of the readers): hidden states as
    wide as the model's, a passage in causal masks (the only mode a passage is read in), a context
    the model's positions can hold.

    Raises:
        ServiceRefusal: 422 (``invalid_kv_message``) naming what does not fit.
    """
    width = int(agent.config.hidden_size)
    longest = agent.max_positions or 0
    if wrong := [extra.layer for extra in header.extras if extra.kind == "hidden" and extra.width != width]:
        _unfit(f"the hidden state entering layer {wrong[0]} is not {width} wide (the model's hidden size)")
    if header.meta.get("passage") is True and header.mode != "causal":
        _unfit(f"a passage is read in causal masks, not {header.mode!r}")
    if longest and header.context_len > longest:
        _unfit(f"its context is {header.context_len} tokens; the model takes {longest}")


def check_usable(message: KVMessage, agent: LoadedModel) -> None:
    """What only the decoded message shows, checked before it is stored or used: its token ids
    inside ``agent``'s vocabulary (:func:`check_header` checked the rest before decoding).

    Raises:
        WireError: 422 (``invalid_kv_message``).
    """
    if message.token_ids is not None:
        check_token_ids(agent.model, message.token_ids)


def check_readable(header: Header, agent: LoadedModel) -> None:
    """:func:`check_header`, and a chat's own refusal from the header, before anything is decoded:
    a message leaving layers out (a droidspeak message) is read only by a droidspeak receiver.

    Raises:
        ServiceRefusal: 422 (``invalid_kv_message``).
    """
    check_header(header, agent)
    if any(entry.tokens == 0 for entry in header.layers):
        raise ServiceRefusal(422, "a KV message leaves layers out (a droidspeak message): only a droidspeak receiver, "
                                  "which recomputes them, can read it", "invalid_kv_message", "kv_messages")


def _readable(agent: LoadedModel, headers: list[Header], hold: Hold | None, header: Header) -> None:
    """:func:`check_readable`, with the header kept in ``headers`` (for the request's decoded-bytes
    budget) and its decoded size taken into ``hold``."""
    headers.append(header)
    check_readable(header, agent)
    if hold is not None:
        hold.take(header.decoded_bytes)


def _unfit(problem: str) -> NoReturn:
    raise ServiceRefusal(422, f"the KV message does not fit this model: {problem}", "invalid_kv_message",
                         "kv_messages")


def _check_joinable(messages: list[KVMessage]) -> None:
    """Refuses, before any answer begins (a stream's 200 included), messages the model thread could
    not join: several where one carries hidden states, or contexts (read one after the other, not
    passages, which may differ) that :func:`check_joinable` refuses (a message leaving layers out
    was refused from its header: :func:`_readable`)."""
    if len(messages) > 1 and any(m.hidden for m in messages):
        raise ServiceRefusal(400, "a KV message carrying hidden states is read alone, not joined with others",
                             "unjoinable_kv_messages", "kv_messages")
    if messages and messages[0].meta.get("passage") is not True:
        try:
            check_joinable([[layer.full for layer in m.layers] for m in messages], [m.mode for m in messages])
        except ConfigError as err:
            raise ServiceRefusal(400, str(err), "unjoinable_kv_messages", "kv_messages") from None


def _check_blendable(messages: list[KVMessage], blending: BlendRequest) -> None:
    """Refuses, before any answer begins, messages ``kv_blend`` cannot blend (the protocol's own
    :func:`~kvcomm.protocol.blend.unblendable`, on every message's layers)."""
    if not messages:
        return
    full = [all(m.layers[layer].full for m in messages) for layer in range(len(messages[0].layers))]
    refusal = unblendable(all(m.token_ids is not None for m in messages), [m.mode for m in messages], full,
                          blending.check_layer)
    if refusal is not None:
        kind, why = refusal
        raise ServiceRefusal(400, f"kv_blend: {why}" + (" (messages made by kvcomm 0.1 with format version 3 on "
                                                           "carry them)" if kind == "token_ids" else ""),
                             "no_token_ids" if kind == "token_ids" else "invalid_value", "kv_blend")


def _fetch(ref: MessageRef, store: MessageStore, config: ServeConfig, metrics: ServiceMetrics) -> bytes:
    if isinstance(ref, InlineMessage):
        if len(ref.data) > 4 * (config.max_message_bytes // 3 + 1):
            raise ServiceRefusal(413, f"inline KV message over {config.max_message_bytes} bytes", "message_too_large")
        try:
            return base64.b64decode(ref.data, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceRefusal(400, "inline KV message is not valid base64", "invalid_base64") from None
    data = store.get(check_id(ref))
    metrics.lookups.labels("hit" if data is not None else "miss").inc()
    if data is None:
        raise ServiceRefusal(404, f"no KV message {ref!r}", "message_not_found", "kv_messages")
    return data


def context_of(agent: LoadedModel, received: Received, blending: BlendRequest | None, config: ServeConfig,
               job: Job) -> ReceiverInput:
    """The receiver's starting cache: the messages joined (passages after the chat's opening,
    prefilled here ``prefill_chunk`` tokens at a time, the deadline checked between), blended if
    asked (its first layers' pass over the context chunked alike, the deadline checked between and
    before the recompute) (model thread)."""
    model = agent.model
    if not received.messages:
        return empty_input(model, 1)
    parts = [m.to_shared(agent.dtype) for m in received.messages]
    if received.opening is not None:
        opening = prefill(model, *pad_left([received.opening], agent.pad_id), chunk=config.prefill_chunk,
                          check=job.check)
        joined = splice(model, [SharedKV.whole(opening), *parts])
    else:
        joined = concat_shared(model, parts)
    if blending is None:
        return receiver_input(joined)
    exact = len(received.opening) if received.opening is not None else 0  # prefilled here: never recomputed
    blended, stats = blend(model, joined, blending.ratio, blending.check_layer, blending.deviation, exact=exact,
                           chunk=config.prefill_chunk, check=job.check)
    received.recomputed = stats.recomputed[0]
    return receiver_input(blended)


def _observer(metrics: ServiceMetrics, job: Job, emit: Callable[[int], None] | None,
              prompt: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The per-step hook: time to first token and per token into the metrics, the ``prompt``
    tokens (the chat's opening before passages included) once prefilled and each token as it is
    generated (a request stopped later, by its deadline or its client, is counted for what it
    did), tokens to ``emit``."""
    last = time.monotonic()
    first = True

    def on_step(token: torch.Tensor, done: torch.Tensor) -> None:
        nonlocal last, first
        now = time.monotonic()
        (metrics.ttft if first else metrics.per_token).observe(now - (job.started if first else last))
        if first:
            metrics.prompt_tokens.inc(prompt)
        first, last = False, now
        if not bool(done[0]):
            metrics.generation_tokens.inc()
            if emit is not None:
                emit(int(token[0]))

    return on_step


def generate(agent: LoadedModel, received: Received, ids: list[int], budget: int, config: ServeConfig,
             metrics: ServiceMetrics, job: Job, emit: Callable[[int], None] | None = None,
             blending: BlendRequest | None = None) -> tuple[list[int], str]:
    """Greedy decoding on top of the received KV (model thread); ``emit(token)`` streams each token."""
    model = agent.model
    metrics.kv_received.inc(received.bytes)
    start = context_of(agent, received, blending, config, job)
    input_ids, valid = pad_left([ids], agent.pad_id)
    out = greedy_generate(model, start, input_ids, valid, budget, agent.stop_ids, agent.pad_id,
                          _observer(metrics, job, emit, received.prompt_tokens(ids)),
                          prefill_chunk=config.prefill_chunk, check=job.check)[0]
    return out, "length" if len(out) >= budget else "stop"


def generate_returning(agent: LoadedModel, received: Received, ids: list[int], budget: int, config: ServeConfig,
                       metrics: ServiceMetrics, job: Job, blending: BlendRequest | None,
                       keep: KVReturn) -> tuple[list[int], str, bytes | KvcommError]:
    """:func:`generate`, keeping the turn's KV: also returns it as an encoded KV message (``keep``
    says which part, at which layers, with which codec), or why it could not be encoded (values a
    codec cannot carry): the reply is returned either way."""
    from kvcomm.wire.bootstrap import model_codebook

    model = agent.model
    metrics.kv_received.inc(received.bytes)
    start = context_of(agent, received, blending, config, job)
    input_ids, valid = pad_left([ids], agent.pad_id)
    turn = generate_turn(model, start, input_ids, valid, budget, agent.stop_ids, agent.pad_id,
                         _observer(metrics, job, None, received.prompt_tokens(ids)),
                         prefill_chunk=config.prefill_chunk, check=job.check)
    out = turn.replies[0]
    layers = keep.layers if keep.layers is not None else range(agent.num_layers)
    shared = outgoing(model, turn.kv[0], len(out), keep.content, layers)
    codec = encoded_on_demand(keep.codec).bind(lambda: model_codebook(agent))  # the caller waits on it
    finish = "length" if len(out) >= budget else "stop"
    try:
        data = KVMessage.from_shared(shared, agent.fingerprint, codec, {"sender": agent.name,
                                                                        "kv_return": keep.content}).to_bytes()
    except KvcommError as err:
        return out, finish, err
    return out, finish, data
