"""What a request must pass before any route sees it: the token, then the size of its body.

A pure ASGI middleware, so it works on the byte stream: the bearer token is checked before a
single body byte is read (an unauthenticated upload is refused at once, however large), and the
body limit holds whether or not the client sent a ``Content-Length`` (a chunked body is counted as
it arrives and refused the moment it passes the limit).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kvcomm.serve.errors import ServiceRefusal, error_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ALWAYS_OPEN = ("/health", "/healthz")
DOCS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class BodyTooLarge(ServiceRefusal):
    """Raised into the app when the body passes the limit: a 413 wherever the body is being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes", "request_too_large")


class RequestLimits:
    """Bearer-token check and a body-size limit, applied before routing.

    Args:
        token: the bearer token; None leaves every route open.
        public_docs: whether ``/metrics``, ``/docs`` and ``/openapi.json`` stay open with a token.
        max_body: most bytes of a request body.
    """

    def __init__(self, app: ASGIApp, token: str | None, public_docs: bool, max_body: int) -> None:
        self.app, self.token, self.public_docs, self.max_body = app, token, public_docs, max_body

    def _protected(self, path: str) -> bool:
        if self.token is None or path in ALWAYS_OPEN:
            return False
        return not (self.public_docs and path in DOCS)

    def _authorised(self, scope: Scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.token}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # open routes answer in full only to a caller who could use the others (``/healthz``'s details)
        scope.setdefault("state", {})["authorised"] = self.token is None or self._authorised(scope)
        if self._protected(scope["path"]) and not scope["state"]["authorised"]:
            await _answer(send, 401, "missing or wrong bearer token", "invalid_api_key",
                          [(b"www-authenticate", b"Bearer")])
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _answer(send, 413, f"request body over {self.max_body} bytes", "request_too_large")
            return
        started = False
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, f"request body over {self.max_body} bytes", "request_too_large")


async def _answer(send: Send, status: int, message: str, code: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_json(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
