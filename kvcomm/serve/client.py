"""``kvcomm.Client``: drive a remote agent (``kvcomm serve``) from Python."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import httpx

from kvcomm.config import listed
from kvcomm.errors import ConfigError, KvcommError, MessageTooLarge
from kvcomm.models.fingerprint import Fingerprint
from kvcomm.protocol.shared import layer_indices
from kvcomm.selection.calibrate import Profile
from kvcomm.serve.links import LinkMeter
from kvcomm.serve.retry import retry_after
from kvcomm.serve.stores.base import check_id
from kvcomm.wire.message import DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODED, KVMessage
from kvcomm.wire.streaming import Arrival, Timeline

T = TypeVar("T")

class ServiceError(KvcommError):
    """The agent answered with an error status, or could not be reached or its answer could not be
    read (``status`` 0); ``status``, ``detail`` and ``code`` say which and why. ``carried`` holds
    what the error's body carried beside the error: a chat whose ``kv_return`` turn could not be
    stored still gives its ``completion`` there."""

    def __init__(self, status: int, detail: str, code: str | None = None,
                 carried: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status, self.detail, self.code = status, detail, code
        self.carried: dict[str, Any] = carried or {}


class Client:
    """A thin synchronous client of one agent.

    The agent's refusals, a link that fails and an answer that cannot be read are
    :class:`ServiceError`; a received message that fails its checks is a
    :class:`~kvcomm.errors.WireError`; a message id the agent would refuse is a
    :class:`~kvcomm.serve.stores.StoreError`, raised before any request (ids go into the URL).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: bearer token, if the agent was started with one.
        timeout: seconds to wait for each read of the agent's answer; connecting waits at most 10.
        retries: times one call may send its request again where nothing of it was done, for
            either reason, counted together: a connection that could not be made (after
            :data:`CONNECT_BACKOFF_S`, doubled each time), or the agent's own refusal made before
            any work (503 with ``Retry-After`` and :data:`~kvcomm.serve.retry.NOTHING_DONE_HEADER`:
            its decoded-KV budget or upload slots were full), after the seconds it asks, at most
            :data:`~kvcomm.serve.retry.RETRY_AFTER_MAX_S` (a longer wait is the error at once). A 503
            without that header (a proxy's) is the error at once: the agent may have done the work.
            So a call sends its request at most ``retries + 1`` times. 0: none.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0, retries: int = 2) -> None:
        if token and not token.isascii():  # no HTTP header carries it (the agent refuses one at start too)
            raise ConfigError("the token must be ASCII: an HTTP header cannot carry other characters")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be a whole number from 0, not {retries!r}")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        try:
            self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)))
        except (httpx.InvalidURL, ValueError, TypeError) as err:
            raise ConfigError(f"{base_url!r} is not an agent's URL ({err}); e.g. http://127.0.0.1:8000") from None
        self.link = LinkMeter()  # the link to this agent, timed on every large message fetched

    @property
    def measured_mbit(self) -> float | None:
        """The link to the agent in Mbit/s, as measured by the messages fetched so far (see
        :mod:`kvcomm.serve.links`); None before any message of 1 MiB or more was timed. A streamed
        message whose decoding held its reading back is not timed: it measured the decoder."""
        return self.link.mbit

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections; a call after it is a :class:`~kvcomm.errors.ConfigError`."""
        self._http.close()

    def _check_open(self) -> None:
        if self._http.is_closed:
            raise ConfigError(f"this client of {self._http.base_url} was closed: open a new one")

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request (its body bytes or JSON, so it can be sent again), sent again after the
        agent's refusal that asks for it (:func:`~kvcomm.serve.retry.retry_after`) or a
        connection that could not be made: :attr:`retries` times at most, the two counted together."""
        self._check_open()
        left = _Retries(self.retries)
        while True:
            try:
                response = self._connected(lambda: self._http.request(method, path, **kwargs), left)
            except _HTTPX_ERRORS as err:
                raise self._failed(err) from None
            wait = retry_after(response)
            if wait is None or not left.take():
                break
            time.sleep(wait)
        _raise_for(response)
        return response

    def _connected(self, send: Callable[[], T], left: _Retries | None = None) -> T:
        """``send()``, called again where it could not connect (nothing was sent) while ``left``
        (one call's retries; :attr:`retries` fresh if None) allows, waiting
        :data:`CONNECT_BACKOFF_S` and then twice as long each time. (Not httpx's transport
        retries: a transport given to the client turns off the proxies the environment names.)"""
        left = _Retries(self.retries) if left is None else left
        while True:
            try:
                return send()
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if not left.take():
                    raise
                time.sleep(CONNECT_BACKOFF_S * 2**left.unreached)
                left.unreached += 1

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`_call`'s answer read as a JSON object; an answer that is not one is a :class:`ServiceError`."""
        response = self._call(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:  # not JSON (a proxy's HTML page, a cut body)
            body = None
        if not isinstance(body, dict):
            raise ServiceError(0, f"the answer of the agent at {self._http.base_url} to {method} {path} is not a "
                                  f"JSON object: {response.text[:200]!r}")
        return body

    def get_message(self, message_id: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        """A stored message's bytes, whole (unchecked: :meth:`KVMessage.from_bytes` checks them).

        Raises:
            MessageTooLarge: the agent sends (or announces) more than ``max_bytes``; the reading
                stops there, so an agent cannot fill this process's memory.
        """
        try:
            with self._streamed(_message_path(message_id)) as response:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise MessageTooLarge(f"message {message_id!r} is {int(declared):,} bytes, the limit is "
                                          f"{max_bytes:,}")
                data = bytearray()
                for chunk in self.link.timed(response.iter_bytes(), streamed=False):
                    data += chunk
                    if len(data) > max_bytes:
                        raise MessageTooLarge(f"message {message_id!r} is more than {max_bytes:,} bytes, the limit")
        except _HTTPX_ERRORS as err:
            raise self._failed(err) from None
        return bytes(data)

    def receive_message(self, message_id: str, receiver: Fingerprint | None = None,
                        timeline: Timeline | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                        max_decoded_bytes: int = DEFAULT_MAX_DECODED) -> KVMessage:
        """A stored message, decoded layer by layer while the rest still arrives (checked against
        ``receiver``'s fingerprint as soon as the header is in, and against ``max_bytes`` on the
        wire and ``max_decoded_bytes`` decoded; see :mod:`kvcomm.wire.streaming`)."""
        with self.arriving(message_id, receiver, timeline, max_bytes, max_decoded_bytes) as arrival:
            return arrival.message()

    @contextmanager
    def arriving(self, message_id: str, receiver: Fingerprint | None = None,
                 timeline: Timeline | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED) -> Iterator[Arrival]:
        """A stored message as it arrives: the header at once, layers as they are decoded. A
        receiver prefills on ``arrival.receiver_input(dtype)`` while the rest is on the wire::

            with client.arriving(message_id, receiver=agent.fingerprint) as arrival:
                text = kvcomm.answer(agent, arrival, question)

        The body is read until the block ends; the message is checked in full before the
        model's last layer uses it (see :class:`~kvcomm.wire.streaming.Arrival`). A block left
        before the body's end (an error in it, a refused header, only the header wanted) hangs up:
        the connection is shut at once, and the thread reading it ends.
        """
        path = _message_path(message_id)
        with ExitStack() as opened:
            try:
                response = opened.enter_context(self._streamed(path))
                arrival = opened.enter_context(Arrival(self._timed(response.iter_bytes()), receiver,
                                                       max_bytes, max_decoded_bytes, timeline))
            except _HTTPX_ERRORS as err:
                raise self._failed(err) from None
            yield arrival  # the body's own errors come from the arrival, as ServiceError (see _timed)

    @contextmanager
    def _streamed(self, path: str) -> Iterator[httpx.Response]:
        """A GET of ``path`` whose body is read as it comes; an error status is a
        :class:`ServiceError`. Left before the body's end, the connection is hung up (after what
        the block opened on it stopped, before the response closes)."""
        self._check_open()
        with ExitStack() as opened:
            response = self._connected(lambda: opened.enter_context(self._http.stream("GET", path)))
            try:
                if response.status_code >= 400:  # its first ERROR_BODY bytes: a peer's error need not be small
                    head = b""
                    for chunk in response.iter_bytes():
                        head += chunk
                        if len(head) >= ERROR_BODY:
                            break
                    _raise_for(response, head[:ERROR_BODY].decode(response.encoding or "utf-8", errors="replace"))
                yield response
            finally:
                _hang_up(response)

    def _timed(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``chunks``, timed by :meth:`LinkMeter.timed <kvcomm.serve.links.LinkMeter.timed>`; a
        broken link or an unreadable body is a :class:`ServiceError`."""
        try:
            yield from self.link.timed(chunks)
        except _HTTPX_ERRORS as err:
            raise self._failed(err) from None

    def _failed(self, err: httpx.RequestError | httpx.StreamError) -> ServiceError:
        if isinstance(err, httpx.TransportError):
            return ServiceError(0, f"cannot reach the agent at {self._http.base_url}: {err}")
        return ServiceError(0, f"the answer of the agent at {self._http.base_url} cannot be read: "
                               f"{type(err).__name__}: {err}")

    def health(self) -> dict[str, Any]:
        """The agent's ``/healthz``: its status, model and store."""
        return self._object("GET", "/healthz")

    def models(self) -> list[str]:
        """The names the agent serves its model under."""
        listed = self._object("GET", "/v1/models").get("data")
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise ServiceError(0, f"the agent at {self._http.base_url} answered /v1/models without a list of models")
        return [m["id"] for m in listed]

    def create_context(self, context: str | None = None, messages: list[dict[str, str]] | None = None,
                       layers: Sequence[int] | None = None, ratio: float | None = None,
                       ranking: Sequence[int] | Profile | None = None, codec: str | None = None,
                       mode: str | None = None, message_id: str | None = None, bandwidth_mbit: float | None = None,
                       passage: bool = False, receiver_compute_s: float | None = None) -> dict[str, Any]:
        """Has the agent prefill a context and store its KV message; returns id, bytes, layers, …

        Args:
            layers: layers to share in full; or ``ratio`` of a ranking (``ranking``, else the agent's
                for the layout: contexts, or passages with ``passage``).
            ranking: a :class:`~kvcomm.selection.calibrate.Profile` (from ``kvcomm calibrate``) is
                sent with the layout it was calibrated on, and the agent refuses it for the other
                layout (a profile of passages for a context, or the reverse); a bare list of layers
                claims no layout.
            message_id: store under this id; by default the id is the content's address (the same
                content, model, layers and codec give the same id, and no second prefill).
            bandwidth_mbit: with ``codec="auto"``, the link the codec is chosen for; by default the
                link this client measured fetching messages from the agent (:attr:`measured_mbit`),
                declared as measured, else the agent's default.
            receiver_compute_s: with ``codec="auto"``, for a receiver that prefills while the layers
                arrive (:meth:`arriving`): the seconds of that prefill, which its decoding competes
                with for the CPU; a cheaper decoder then beats fewer bytes once it outlasts the link.
            passage: store ``context`` as a passage, read by a chat at the start of its last user
                turn and joined with other passages in any order (``kv_blend`` restores their
                attention to each other); passages and contexts do not mix in one chat.
        """
        measured = codec == "auto" and bandwidth_mbit is None and self.measured_mbit is not None
        if measured:
            bandwidth_mbit = self.measured_mbit
        body = {"context": context, "messages": messages,
                "layers": layer_indices(layers) if layers is not None else None,
                "ratio": ratio, "profile": _profile_body(ranking),
                "codec": codec, "mode": mode, "id": message_id, "bandwidth_mbit": bandwidth_mbit,
                "bandwidth_measured": measured or None, "passage": passage or None,
                "receiver_compute_s": receiver_compute_s}
        return self._object("POST", "/v1/contexts", json={k: v for k, v in body.items() if v is not None})

    def put_message(self, message_id: str, data: bytes | KVMessage) -> dict[str, Any]:
        """Uploads a message (its bytes, or a :class:`~kvcomm.wire.KVMessage`) under ``message_id``;
        the agent checks it in full before storing it."""
        return self._object("PUT", _message_path(message_id), content=_message_bytes(data),
                            headers={"Content-Type": "application/octet-stream"})

    def chat(self, messages: list[dict[str, str]], kv_messages: Sequence[str | bytes | KVMessage] = (),
             max_tokens: int = 64, kv_return: dict[str, Any] | None = None,
             kv_blend: dict[str, Any] | None = None) -> dict[str, Any]:
        """An OpenAI-style chat completion using stored message ids or raw message bytes.

        ``kv_return`` (e.g. ``{"content": "reply", "codec": "fp16"}``, or ``{}`` for the defaults)
        also stores the reply as a KV message; its id is in the response's ``kv_message``, for
        another agent's ``kv_messages``; a turn that could not be stored (over the agent's size limit,
        or its store full or down) is a :class:`ServiceError` whose ``carried["completion"]`` is the
        reply generated before. ``kv_blend`` (e.g. ``{"ratio": 0.15}``) recomputes that
        fraction of the joined messages' tokens where reused KV deviates most (CacheBlend)."""
        refs = [m if isinstance(m, str) else {"data": base64.b64encode(_message_bytes(m)).decode()}
                for m in listed(kv_messages, "kv_messages")]
        body: dict[str, Any] = {"messages": messages, "kv_messages": refs, "max_tokens": max_tokens}
        if kv_return is not None:
            body["kv_return"] = kv_return
        if kv_blend is not None:
            body["kv_blend"] = kv_blend
        answer = self._object("POST", "/v1/chat/completions", json=body)
        choices = answer.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and isinstance(choices[0].get("message"), dict)
                and isinstance(choices[0]["message"].get("content"), str)):
            raise ServiceError(0, f"the agent at {self._http.base_url} answered a chat completion without "
                                  "choices[0].message.content")
        return answer


def _profile_body(ranking: Sequence[int] | Profile | None) -> dict[str, Any] | None:
    """The request's ``profile``: a bare ranking, or a profile's with the layout it was calibrated on."""
    if ranking is None:
        return None
    if isinstance(ranking, Profile):
        return {"ranking": list(ranking.ranking), "details": {"pieces": ranking.pieces}}
    return {"ranking": list(ranking)}


_HTTPX_ERRORS = (httpx.RequestError, httpx.StreamError)  # the link, or a body that cannot be read
CONNECT_BACKOFF_S = 0.5  # the first wait before connecting again; doubled each time


class _Retries:
    """One call's budget of sends again, whatever the reason (a connection not made, a refusal)."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.unreached = 0  # connections not made so far: the backoff doubles with each, refusals between or not

    def take(self) -> bool:
        """One more send, if the budget has it."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _message_path(message_id: str) -> str:
    """The URL path of a stored message; an id the agent would refuse is refused here, before any
    request (it goes into the URL unescaped: ``a?b``, ``../x`` would name other resources).

    Raises:
        StoreError: the id is not one :func:`~kvcomm.serve.stores.check_id` accepts.
    """
    return f"/v1/messages/{check_id(message_id)}"


def _hang_up(response: httpx.Response) -> None:
    """Shuts the socket under a response whose body is still coming, so that a thread blocked
    reading it wakes now instead of at the read timeout. A body read to its end has closed the
    response and freed the connection for the next request: that one is left alone."""
    if response.is_closed:
        return
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


ERROR_BODY = 64 << 10
"""The most bytes of an error's body a streamed GET reads (an agent's errors are a few hundred)."""


def _raise_for(response: httpx.Response, text: str | None = None) -> None:
    """A :class:`ServiceError` for an error status, with the service's message and code when the
    body (``text``, where the caller read it) has OpenAI's error shape, else with the body's text."""
    if response.status_code < 400:
        return
    detail, code = response.text if text is None else text, None
    try:
        body = json.loads(detail)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    carried: dict[str, Any] = {}
    if isinstance(error, dict):
        detail = str(error.get("message", detail))
        code = error["code"] if isinstance(error.get("code"), str) else None
        carried = {key: value for key, value in body.items() if key != "error"}
    raise ServiceError(response.status_code, detail, code, carried)


def _message_bytes(message: object) -> bytes:
    """A message's bytes: given as bytes, or a :class:`KVMessage` encoded.

    Raises:
        ConfigError: anything else, named.
    """
    if isinstance(message, KVMessage):
        return message.to_bytes()
    if isinstance(message, bytes | bytearray | memoryview):
        return bytes(message)
    raise ConfigError(f"a KV message is its bytes or a KVMessage (a stored one: its id, a str), "
                      f"not {type(message).__name__}")
