"""On-disk store that survives restarts: bounded in size, least recently used evicted, optional TTL.

Built on ``diskcache`` (SQLite index plus files, writes are transactions, so a crash never leaves a
partial message under an id). Values are stored as raw bytes only: a disk whose rows ask to be
unpickled is refused, so nothing read back is ever unpickled.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from kvcomm.errors import ConfigError
from kvcomm.serve.stores.base import StoreError, StoreFull, StoreUnavailable, check_id, is_id

T = TypeVar("T")
LOCK_TIMEOUT_S = 5.0  # how long a write waits for the index another process holds (diskcache: 60)


# the bytes of the rows selected: a value under diskcache's file threshold is held in the index itself
_HELD = "COALESCE(SUM(CASE WHEN value IS NULL THEN size ELSE length(value) END), 0)"
ROW_SLACK = 8192  # what a message's row may add to the index beside its bytes: two SQLite pages


@cache
def _empty_volume() -> int:
    """What an empty store's index takes (its SQLite pages), measured once on a store made aside."""
    import tempfile

    import diskcache

    with tempfile.TemporaryDirectory() as folder, diskcache.Cache(folder) as empty:
        return int(empty.volume())


PICKLED_KEY = object()
"""What the disk store reads a pickled key as (it never unpickles one)."""


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
            if not raw:  # a key some other writer pickled: never unpickled, and no id of a message
                return PICKLED_KEY
            return super().get(key, raw)

    return BytesOnlyDisk


class DiskStore:
    """Messages in ``directory``, at most ``max_bytes`` of them (LRU eviction), each for ``ttl_s`` if set."""

    def __init__(self, directory: str | Path, max_bytes: int = 10 << 30, ttl_s: float | None = None) -> None:
        self.directory, self.max_bytes, self.ttl_s = Path(directory), max_bytes, ttl_s
        # diskcache culls nothing itself (cull_limit 0): its cull could take the message just written
        # (it deletes in batches, and counts the index); :meth:`put` evicts one message at a time
        disk = _bytes_only_disk()  # first: where diskcache is missing, it says which extra brings it
        import diskcache
        self._timeout = diskcache.Timeout
        try:
            self._cache = diskcache.Cache(str(directory), disk=disk, size_limit=max_bytes, timeout=LOCK_TIMEOUT_S,
                                          eviction_policy="least-recently-used", cull_limit=0)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot open a disk store at {directory}: {type(err).__name__}: {err}") from None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, where a full disk is :class:`StoreFull` (507) and any other fault of the disk
        or its SQLite index :class:`StoreUnavailable` (503), not an unhandled error."""
        try:
            return fn()
        except self._timeout:
            raise StoreUnavailable(f"the disk store at {self.directory} failed ({what}): its index stayed locked "
                                   f"for {LOCK_TIMEOUT_S:g} s") from None
        except (OSError, sqlite3.Error) as err:
            full = (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) if isinstance(err, OSError)
                    else "full" in str(err).lower())  # SQLite says "database or disk is full"; a path may say "full"
            where = f"the disk store at {self.directory} failed ({what}): {type(err).__name__}: {err}"
            raise (StoreFull if full else StoreUnavailable)(where) from None

    def put(self, message_id: str, data: bytes) -> None:
        check_id(message_id)
        if len(data) > self.max_bytes:
            raise StoreFull(f"message of {len(data)} bytes exceeds the store's {self.max_bytes} bytes")

        def oldest() -> str | None:
            row = self._cache._sql("SELECT key FROM Cache WHERE raw = 1 AND typeof(key) = 'text' AND key != ? "
                                   "ORDER BY access_time LIMIT 1", (message_id,)).fetchone()
            return None if row is None else str(row[0])

        def write() -> None:
            # what cannot fit even alone beside an empty store's index is refused before anything
            # is evicted (before, every other message went first, then it was refused too)
            if (floor := _empty_volume()) + len(data) + ROW_SLACK > self.max_bytes:
                raise StoreFull(f"message of {len(data)} bytes does not fit the store's {self.max_bytes} bytes "
                                f"beside its index ({floor} bytes when empty)")
            self._cache.expire()  # what is past its time to live goes before anything live
            replaced = self._cache._sql(  # what this id holds now goes with the write: no room to make for it
                f"SELECT {_HELD} FROM Cache WHERE key = ? AND raw = 1", (message_id,)).fetchone()[0]
            while self._cache.volume() - replaced + len(data) + ROW_SLACK > self.max_bytes and \
                    (key := oldest()) is not None:
                self._cache.delete(key)  # room first, one message at a time (the index counts: SQLite's pages)
            self._cache.set(message_id, bytes(data), expire=self.ttl_s)
            while self._cache.volume() > self.max_bytes:  # the index grew more than ROW_SLACK: rare
                if (key := oldest()) is None:
                    self._cache.delete(message_id)
                    raise StoreFull(f"message of {len(data)} bytes does not fit the store's {self.max_bytes} bytes "
                                    "beside its index")
                self._cache.delete(key)

        self._call("put", write)

    def ping(self) -> None:
        """The index answers (``/healthz`` after a fault: the store is seen to recover)."""
        self._call("ping", lambda: self._cache._sql("SELECT 1").fetchone())

    def get(self, message_id: str) -> bytes | None:
        check_id(message_id)
        value = self._call("get", lambda: self._cache.get(message_id))
        return value if isinstance(value, bytes) else None

    def exists(self, message_id: str) -> bool:
        check_id(message_id)
        return self._call("exists", lambda: message_id in self._cache)

    def delete(self, message_id: str) -> bool:
        check_id(message_id)
        return bool(self._call("delete", lambda: self._cache.delete(message_id)))

    def list(self) -> list[str]:
        """The ids held; a key some other writer pickled (never unpickled, and no id of a message:
        ids are text) is left out, where before it refused the whole listing."""
        def keys() -> list[str]:
            return [key for key in self._cache.iterkeys() if isinstance(key, str) and is_id(key) and key in self._cache]

        return sorted(self._call("list", keys))

    def count(self) -> int:
        """How many ids :meth:`list` gives: not a pickled key, nor a message past its time to live
        that is not yet evicted (both of which the index's own count holds); one query on the
        index, not a read per key (``/metrics`` asks on every scrape)."""
        def query() -> int:
            rows = self._cache._sql("SELECT COUNT(*) FROM Cache WHERE raw = 1 AND typeof(key) = 'text' AND "
                                    "(expire_time IS NULL OR expire_time > ?)", (time.time(),))
            return int(rows.fetchone()[0])

        return self._call("count", query)

    def size_bytes(self) -> int:
        """Bytes of the messages :meth:`list` gives, as the other stores count them (the bound,
        ``max_bytes``, also counts the SQLite index and what expired but is not yet evicted)."""
        def query() -> int:
            rows = self._cache._sql(f"SELECT {_HELD} FROM Cache WHERE raw = 1 AND typeof(key) = 'text' AND "
                                    "(expire_time IS NULL OR expire_time > ?)", (time.time(),))
            return int(rows.fetchone()[0])

        return int(self._call("size", query))

    def close(self) -> None:
        self._cache.close()
