"""Errors in OpenAI's shape on every route: ``{"error": {"message", "type", "param", "code"}}``.

The ``openai`` client (and tools built on it) shows ``error.message`` from that shape, so every
refusal reaches the user as a sentence. kvcomm's own errors map to statuses here, once.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from kvcomm.errors import (
    ConfigError,
    FingerprintMismatch,
    KvcommError,
    MessageTooLarge,
    MissingCodebook,
    WireError,
)
from kvcomm.serve.stores import StoreError, StoreFull, StoreUnavailable

# kvcomm errors as (status, type, code); the first match wins
_KINDS: tuple[tuple[type[KvcommError], int, str, str], ...] = (
    (MessageTooLarge, 413, "invalid_request_error", "message_too_large"),
    (FingerprintMismatch, 409, "invalid_request_error", "incompatible_model"),
    (MissingCodebook, 422, "invalid_request_error", "missing_codebook"),
    (WireError, 422, "invalid_request_error", "invalid_kv_message"),
    (StoreUnavailable, 503, "service_unavailable", "store_unavailable"),
    (StoreFull, 507, "server_error", "store_full"),
    (StoreError, 400, "invalid_request_error", "invalid_id"),
    (ConfigError, 400, "invalid_request_error", "invalid_value"),
    (KvcommError, 400, "invalid_request_error", "invalid_request"),
)
UNRECOGNIZED = "Unrecognized request argument supplied"  # OpenAI's words for an argument it does not know
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error",
          503: "service_unavailable", 504: "timeout", 507: "server_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ServiceRefusal(HTTPException):
    """An HTTP refusal with an OpenAI error ``code`` (and ``param``)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers=headers)
        self.code, self.param = code, param


def error_json(status: int, message: str, code: str | None = None, param: str | None = None,
               kind: str | None = None) -> dict[str, Any]:
    """The error body for ``status`` (messages are made printable: no lone surrogates)."""
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return ErrorResponse(error=ErrorDetail(message=safe, type=kind or _TYPES.get(status, "invalid_request_error"),
                                           param=param, code=code)).model_dump()


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(status, message, code, param), status, headers=headers)


def describe_kvcomm_error(err: KvcommError) -> tuple[int, str, str, str]:
    """``(status, type, code, message)`` of a kvcomm error."""
    for kind, status, type_, code in _KINDS:
        if isinstance(err, kind):
            return status, type_, code, f"{type(err).__name__}: {err}"
    raise AssertionError("unreachable: KvcommError is the last entry")


def describe_error(err: BaseException) -> tuple[int, str, str | None, str]:
    """``(status, type, code, message)`` of whatever a request's work raised: a refusal as it
    is, a kvcomm error by its kind, anything else a 500 (named, without its text)."""
    if isinstance(err, HTTPException):
        return err.status_code, _TYPES.get(err.status_code, "invalid_request_error"), getattr(err, "code", None), \
            str(err.detail)
    if isinstance(err, KvcommError):
        return describe_kvcomm_error(err)
    return 500, "server_error", "internal_error", f"internal error ({type(err).__name__}); the service logged it"


def _validation_message(err: RequestValidationError) -> tuple[int, str, str, str | None]:
    """``(status, message, code, param)``: unknown arguments and a body that is not JSON are 400 (as
    OpenAI says); other schema errors 422, without echoing input."""
    errors = err.errors()
    if errors and errors[0].get("type") == "json_invalid":  # before: 422 "1: JSON decode error", param "1"
        at = (errors[0].get("loc") or (None,))[-1]
        why = (errors[0].get("ctx") or {}).get("error")
        where = f", at character {at}" if isinstance(at, int) else ""
        return 400, f"the request body is not valid JSON{f' ({why}{where})' if why else ''}", "invalid_json", None
    unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown and len(unknown) == len(errors):
        return 400, f"{UNRECOGNIZED}: {', '.join(unknown)}", "unrecognized_argument", unknown[0]
    parts = []
    for entry in errors[:5]:
        where = ".".join(str(p) for p in entry["loc"] if p != "body") or "body"
        parts.append(f"{where}: {entry['msg']}")
    first = errors[0]["loc"][-1] if errors else None
    return 422, "; ".join(parts), "invalid_value", str(first) if first is not None else None


def carrying(err: BaseException, **fields: Any) -> BaseException:
    """``err``, marked to carry ``fields`` beside ``error`` in its response's body: work done before
    a later step failed (a generated completion whose turn could not be stored) goes back to the
    caller with the refusal instead of being lost with it."""
    err.carried = {**getattr(err, "carried", {}), **fields}  # type: ignore[attr-defined]
    return err


def _carried(err: BaseException) -> dict[str, Any]:
    return dict(getattr(err, "carried", {}))


async def respond(err: BaseException) -> JSONResponse:
    """The error response of a kvcomm error (or of an unexpected one: :func:`describe_error`)."""
    status, type_, code, message = describe_error(err)
    return JSONResponse(error_json(status, message, code, kind=type_) | _carried(err), status)


def install(app: FastAPI) -> None:
    """Registers the handlers that give every error the OpenAI shape."""

    @app.exception_handler(KvcommError)
    async def kvcomm_error(request: Request, err: KvcommError) -> JSONResponse:
        return await respond(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = getattr(err, "code", None)
        param = getattr(err, "param", None)
        headers = dict(getattr(err, "headers", None) or {})
        if err.status_code == 405:  # every method the path has, not only those of the first route matched
            headers["Allow"] = ", ".join(_methods_of(app, request))
        return JSONResponse(error_json(err.status_code, str(err.detail), code, param) | _carried(err), err.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:  # a bug: still OpenAI's shape
        return await respond(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message, code, param = _validation_message(err)
        return error_response(status, message, code, param)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``statuses``, all with the error body."""
    return {status: {"model": ErrorResponse, "description": _TYPES.get(status, "error")} for status in statuses}


def _methods_of(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match.name != "NONE" and route_methods:
            methods |= set(route_methods)
    return sorted(methods)
