"""Message stores: where agents keep KV messages between requests, and share them across machines.

One small interface (:class:`MessageStore`): ``put``, ``get``, ``exists``, ``delete``, ``list``,
``close``. Values are whole, verified message bytes; a ``put`` is all-or-nothing, so a reader never
sees a partial message.

- :class:`MemoryStore`: in-process, bounded by bytes with least-recently-used eviction, and an
  optional on-disk tier (files written atomically) that survives restarts.
- :class:`RedisStore`: ``redis://host:port/db``, for agents on different machines.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from kvcomm.errors import ConfigError, KvcommError
from kvcomm.files import atomic_write, is_temporary
from kvcomm.registry import Registry

_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_RESERVED_SUFFIXES = (".partial", ".tmp")  # what interrupted writes were (or are) called


class StoreError(KvcommError):
    """A store cannot hold or return a message (bad id, too large, backend failure)."""


def check_id(message_id: str) -> str:
    """Returns ``message_id`` if it is a valid id: 1-128 letters, digits, ``_``, ``.``, ``-``, not
    starting with a dot and not ending in ``.partial`` or ``.tmp`` (names of interrupted writes)."""
    if (not isinstance(message_id, str) or not _ID.fullmatch(message_id) or message_id.startswith(".")
            or message_id.endswith(_RESERVED_SUFFIXES)):
        raise StoreError(f"invalid message id {message_id!r}: use 1-128 letters, digits, '_', '.', '-', not "
                         f"starting with '.' nor ending in {' or '.join(_RESERVED_SUFFIXES)}")
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
            for stale in self.disk.iterdir():  # a crash mid-write leaves these; never valid
                if is_temporary(stale):
                    stale.unlink()

    def put(self, message_id: str, data: bytes) -> None:
        check_id(message_id)
        if len(data) > self.max_bytes and self.disk is None:
            raise StoreError(f"message of {len(data)} bytes exceeds the store's {self.max_bytes} bytes")
        if self.disk is not None:
            atomic_write(self.disk / message_id, data)
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
            names.update(p.name for p in self.disk.iterdir() if not is_temporary(p))
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
        data = cast(bytes | None, self._client.get(self.prefix + check_id(message_id)))
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


StoreFactory = Callable[[str, int], MessageStore]  # (spec, memory bound in bytes) -> store
STORES: Registry[StoreFactory] = Registry("store")
STORES.add("memory", lambda spec, max_bytes: MemoryStore(max_bytes))
STORES.add("disk", lambda spec, max_bytes: MemoryStore(max_bytes, disk=_disk_path(spec)))
STORES.add("redis", lambda spec, max_bytes: RedisStore(spec))
STORE_FORMS = {"memory": "memory", "disk": "disk:/path", "redis": "redis://host:port/db"}


def _disk_path(spec: str) -> str:
    path = spec.partition(":")[2]
    if not path:
        raise ConfigError("a disk store needs a folder: disk:/path")
    return path


def store_kind(spec: str | None) -> str:
    """Which registered store a spec names (``memory``, ``disk:/path``, ``redis://…``, ``rediss://``,
    ``unix://``), checked without connecting.

    Raises:
        ConfigError: an unknown kind of store, with the forms that are valid.
    """
    if spec in (None, "", "memory"):
        return "memory"
    assert spec is not None
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return "redis"
    kind = spec.partition(":")[0]
    if kind not in STORES or kind == "redis":
        raise ConfigError(f"unknown store {spec!r}: use {', '.join(STORE_FORMS.values())}")
    if kind == "disk":
        _disk_path(spec)
    return kind


def open_store(spec: str | None, max_bytes: int = 1 << 30) -> MessageStore:
    """``None``/``memory`` (in process), ``disk:/path`` (memory + disk tier), or ``redis://…``."""
    return STORES.get(store_kind(spec))(spec or "memory", max_bytes)
