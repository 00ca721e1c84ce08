"""Messages in Redis, for agents on several machines: every backend fault is a StoreUnavailable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvcomm.errors import ConfigError
from kvcomm.serve.stores.base import StoreUnavailable, check_id, is_id

T = TypeVar("T")


def without_password(url: str) -> str:
    """``url`` with its user and password replaced by ``***``, in the address and in the query
    (``?password=…``, which redis-py reads too): errors show the store's address, and ``/healthz``
    shows errors to anyone."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        parts = parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port is not None else ""))
    query = [(key, "***" if key.lower() in ("password", "username") else value)
             for key, value in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


class RedisStore:
    """Messages under ``prefix`` + id; each expires after ``ttl_s`` if set. Redis bounds its own memory
    (``maxmemory`` and an eviction policy such as ``allkeys-lru``).

    Every Redis error (connection, time-out after ``timeout_s``, a full or read-only Redis) raises
    :class:`StoreUnavailable`; the client reconnects by itself on the next call once Redis is back.
    """

    def __init__(self, url: str, prefix: str = "kvcomm:msg:", ttl_s: float | None = None,
                 timeout_s: float = 2.0, connect: bool = True) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigError("the redis store needs the redis package: pip install 'kvcomm[serve]'") from None
        # every Redis fault, not only the connection's: a full Redis (OOM under noeviction) or a
        # read-only replica refuses writes with errors of their own
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._response_error: type[BaseException] = redis.ResponseError
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                health_check_interval=30)
        except ValueError as err:  # a malformed address (a port that is no number, an unknown scheme)
            raise ConfigError(f"not a Redis address: {without_password(url)} ({err})") from None
        self.url, self.prefix, self.ttl_s = without_password(url), prefix, ttl_s  # url: what errors may show
        if connect:
            self.ping()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as err:
            raise StoreUnavailable(f"Redis at {self.url} failed ({what}): {type(err).__name__}: {err}") from None

    def ping(self) -> None:
        self._call("ping", self._client.ping)

    def put(self, message_id: str, data: bytes) -> None:
        key = self.prefix + check_id(message_id)
        expire = None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))  # ms, as the other stores keep it
        self._call("put", lambda: self._client.set(key, data, px=expire))  # one SET: atomic

    def get(self, message_id: str) -> bytes | None:
        """The message, or None, also where another program keeps a value of another type (a list,
        a hash) under its key: no message is there, and Redis is not down."""
        key = self.prefix + check_id(message_id)

        def fetch() -> bytes | None:
            try:
                return cast(bytes | None, self._client.get(key))
            except self._response_error as err:
                if str(err).startswith("WRONGTYPE"):
                    return None
                raise

        return self._call("get", fetch)

    # exists, delete and list see only strings, as get does: another program's list or hash under
    # the prefix is no message (before, DELETE removed it and the listing named it)
    def _is_message(self, key: str) -> bool:
        return self._client.type(key) in (b"string", "string")

    def exists(self, message_id: str) -> bool:
        key = self.prefix + check_id(message_id)
        return self._call("exists", lambda: self._is_message(key))

    def delete(self, message_id: str) -> bool:
        key = self.prefix + check_id(message_id)
        # TYPE, then DEL (no script: managed Redis may forbid EVAL)
        return self._call("delete", lambda: self._is_message(key) and bool(self._client.delete(key)))

    def list(self) -> list[str]:
        def scan() -> list[Any]:
            try:
                return list(self._client.scan_iter(match=self.prefix + "*", _type="STRING"))
            except self._response_error as err:  # Redis before 6.0 has no SCAN … TYPE: each key's TYPE asked
                if "syntax" not in str(err).lower():
                    raise
                return [key for key in self._client.scan_iter(match=self.prefix + "*") if self._is_message(key)]

        ids = (key.decode("utf-8", errors="replace")[len(self.prefix):] for key in self._call("list", scan))
        return sorted(message_id for message_id in ids if is_id(message_id))  # not what other writers put there

    def close(self) -> None:
        self._client.close()
