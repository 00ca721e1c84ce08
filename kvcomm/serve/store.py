"""Message stores: where agents keep KV messages between requests, and share them across machines.

One small interface (:class:`MessageStore`): ``put``, ``get``, ``exists``, ``delete``, ``list``,
``close``. Values are whole, verified message bytes; a ``put`` is all-or-nothing, so a reader never
sees a partial message.

- :class:`MemoryStore`: in-process, bounded by bytes with least-recently-used eviction, and an
  optional on-disk tier (files written atomically) that survives restarts.
- :class:`RedisStore`: ``redis://host:port/db``, for agents on different machines.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from kvcomm.errors import ConfigError, KvcommError

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class StoreError(KvcommError):
    """A store cannot hold or return a message (bad id, too large, backend failure)."""


def check_id(message_id: str) -> str:
    if not _ID.match(message_id) or message_id.startswith("."):
        raise StoreError(f"invalid message id {message_id!r}: use 1-128 letters, digits, '_', '.', '-'")
    return message_id


class MessageStore(Protocol):
    def put(self, message_id: str, data: bytes) -> None: ...
    def get(self, message_id: str) -> bytes | None: ...
    def exists(self, message_id: str) -> bool: ...
    def delete(self, message_id: str) -> bool: ...
    def list(self) -> list[str]: ...
    def close(self) -> None: ...


class MemoryStore:
    """LRU store bounded by ``max_bytes``; with ``disk`` set, every message is also kept on disk and
    evicted messages are read back from there."""

    def __init__(self, max_bytes: int = 1 << 30, disk: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.disk = Path(disk) if disk is not None else None
        if self.disk is not None:
            self.disk.mkdir(parents=True, exist_ok=True)
            for stale in self.disk.glob("*.partial"):  # a crash mid-write leaves these; never valid
                stale.unlink()

    def put(self, message_id: str, data: bytes) -> None:
        check_id(message_id)
        if len(data) > self.max_bytes and self.disk is None:
            raise StoreError(f"message of {len(data)} bytes exceeds the store's {self.max_bytes} bytes")
        if self.disk is not None:
            partial = self.disk / f"{message_id}.partial"
            partial.write_bytes(data)
            os.replace(partial, self.disk / message_id)
        with self._lock:
            self._drop(message_id)
            if len(data) <= self.max_bytes:
                self._items[message_id] = data
                self._size += len(data)
                while self._size > self.max_bytes:
                    _, evicted = self._items.popitem(last=False)
                    self._size -= len(evicted)

    def get(self, message_id: str) -> bytes | None:
        check_id(message_id)
        with self._lock:
            data = self._items.get(message_id)
            if data is not None:
                self._items.move_to_end(message_id)
                self.hits += 1
                return data
        path = self.disk / message_id if self.disk is not None else None
        if path is not None and path.is_file():
            with self._lock:
                self.hits += 1
            return path.read_bytes()
        with self._lock:
            self.misses += 1
        return None

    def exists(self, message_id: str) -> bool:
        check_id(message_id)
        with self._lock:
            if message_id in self._items:
                return True
        return self.disk is not None and (self.disk / message_id).is_file()

    def delete(self, message_id: str) -> bool:
        check_id(message_id)
        with self._lock:
            found = self._drop(message_id)
        if self.disk is not None and (self.disk / message_id).is_file():
            (self.disk / message_id).unlink()
            found = True
        return found

    def list(self) -> list[str]:
        with self._lock:
            names = set(self._items)
        if self.disk is not None:
            names.update(p.name for p in self.disk.iterdir() if not p.name.endswith(".partial"))
        return sorted(names)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    def _drop(self, message_id: str) -> bool:
        data = self._items.pop(message_id, None)
        if data is not None:
            self._size -= len(data)
        return data is not None


class RedisStore:
    """Messages in Redis under ``prefix`` + id, for agents on several machines."""

    def __init__(self, url: str, prefix: str = "kvcomm:msg:") -> None:
        try:
            import redis
        except ImportError:
            raise ConfigError("the redis store needs the redis package: pip install 'kvcomm[serve]'") from None
        self._client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.hits = self.misses = 0
        try:
            self._client.ping()
        except redis.RedisError as err:
            raise StoreError(f"cannot reach Redis at {url}: {err}") from err

    def put(self, message_id: str, data: bytes) -> None:
        self._client.set(self.prefix + check_id(message_id), data)  # one SET: atomic

    def get(self, message_id: str) -> bytes | None:
        data = self._client.get(self.prefix + check_id(message_id))
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def exists(self, message_id: str) -> bool:
        return bool(self._client.exists(self.prefix + check_id(message_id)))

    def delete(self, message_id: str) -> bool:
        return bool(self._client.delete(self.prefix + check_id(message_id)))

    def list(self) -> list[str]:
        return sorted(k.decode()[len(self.prefix):] for k in self._client.scan_iter(match=self.prefix + "*"))

    def close(self) -> None:
        self._client.close()


def open_store(spec: str | None, max_bytes: int = 1 << 30) -> MessageStore:
    """``None``/``memory`` (in process), ``disk:/path`` (memory + disk tier), or ``redis://…``."""
    if spec in (None, "", "memory"):
        return MemoryStore(max_bytes)
    if spec.startswith("disk:"):
        return MemoryStore(max_bytes, disk=spec[len("disk:"):])
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec)
    raise ConfigError(f"unknown store {spec!r}: use memory, disk:/path or redis://host:port/db")
