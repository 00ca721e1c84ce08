"""On-disk store that survives restarts: bounded in size, least recently used evicted, optional TTL.

Built on ``diskcache`` (SQLite index plus files, writes are transactions, so a crash never leaves a
partial message under an id). Values are stored as raw bytes only: a disk whose rows ask to be
unpickled is refused, so nothing read back is ever unpickled.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from kvcomm.errors import ConfigError
from kvcomm.serve.stores.base import StoreError, StoreFull, check_id


@cache
def _bytes_only_disk() -> type:
    """diskcache's storage with pickling switched off both ways (diskcache is imported when a disk
    store is made: the service's extra, ``kvcomm[serve]``, not the base install)."""
    try:
        import diskcache
    except ImportError:
        raise ConfigError("the disk store needs the diskcache package: pip install 'kvcomm[serve]'") from None

    class BytesOnlyDisk(diskcache.Disk):
        def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
            if type(value) is not bytes:
                raise StoreError("the disk store holds bytes only")
            return super().store(value, read, key)

        def fetch(self, mode: int, filename: str, value: Any, read: bool) -> Any:
            if mode == diskcache.core.MODE_PICKLE:
                raise StoreError("the disk store holds a pickled row; refusing to unpickle it")
            return super().fetch(mode, filename, value, read)

        def get(self, key: Any, raw: bool) -> Any:
            if not raw:
                raise StoreError("the disk store holds a pickled key; refusing to unpickle it")
            return super().get(key, raw)

    return BytesOnlyDisk


class DiskStore:
    """Messages in ``directory``, at most ``max_bytes`` of them (LRU eviction), each for ``ttl_s`` if set."""

    def __init__(self, directory: str | Path, max_bytes: int = 10 << 30, ttl_s: float | None = None) -> None:
        self.directory, self.max_bytes, self.ttl_s = Path(directory), max_bytes, ttl_s
        # each write evicts the least recently used message while the store is full (cull_limit 1);
        # a write that still leaves it over its bound (a large message replacing small ones) culls more
        import diskcache  # importable: _bytes_only_disk checked it

        disk = _bytes_only_disk()
        self._cache = diskcache.Cache(str(directory), disk=disk, size_limit=max_bytes,
                                      eviction_policy="least-recently-used", cull_limit=1)

    def put(self, message_id: str, data: bytes) -> None:
        check_id(message_id)
        if len(data) > self.max_bytes:
            raise StoreFull(f"message of {len(data)} bytes exceeds the store's {self.max_bytes} bytes")
        self._cache.set(message_id, bytes(data), expire=self.ttl_s)
        if self._cache.volume() > self.max_bytes:
            self._cache.cull()

    def get(self, message_id: str) -> bytes | None:
        value = self._cache.get(check_id(message_id))
        return value if isinstance(value, bytes) else None

    def exists(self, message_id: str) -> bool:
        return check_id(message_id) in self._cache

    def delete(self, message_id: str) -> bool:
        return bool(self._cache.delete(check_id(message_id)))

    def list(self) -> list[str]:
        return sorted(str(key) for key in self._cache.iterkeys() if key in self._cache)

    def count(self) -> int:
        return len(self._cache)

    def size_bytes(self) -> int:
        return int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()
