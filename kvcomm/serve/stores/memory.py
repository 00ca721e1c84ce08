"""In-process store: bounded by bytes with least-recently-used eviction, and an optional time to live."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from kvcomm.serve.stores.base import StoreFull, check_id


class MemoryStore:
    """LRU store bounded by ``max_bytes``; messages older than ``ttl_s`` (if set) are gone."""

    def __init__(self, max_bytes: int = 1 << 30, ttl_s: float | None = None) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # id -> (data, stored at)
        self._size = 0
        self._lock = threading.Lock()

    def put(self, message_id: str, data: bytes) -> None:
        check_id(message_id)
        if len(data) > self.max_bytes:
            raise StoreFull(f"message of {len(data)} bytes exceeds the store's {self.max_bytes} bytes")
        with self._lock:
            self._drop(message_id)
            self._items[message_id] = (data, time.monotonic())
            self._size += len(data)
            if self._size > self.max_bytes:  # what is past its time to live goes before anything live
                for held in list(self._items):
                    self._live(held)
            while self._size > self.max_bytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self._size -= len(evicted)

    def get(self, message_id: str) -> bytes | None:
        check_id(message_id)
        with self._lock:
            entry = self._live(message_id)
            if entry is None:
                return None
            self._items.move_to_end(message_id)
            return entry[0]

    def exists(self, message_id: str) -> bool:
        check_id(message_id)
        with self._lock:
            return self._live(message_id) is not None

    def delete(self, message_id: str) -> bool:
        check_id(message_id)
        with self._lock:
            return self._live(message_id) is not None and self._drop(message_id)

    def list(self) -> list[str]:
        with self._lock:
            return sorted(m for m in list(self._items) if self._live(m) is not None)

    def count(self) -> int:
        return len(self.list())

    def size_bytes(self) -> int:
        """The bytes of the messages :meth:`list` gives (those past their time to live dropped)."""
        with self._lock:
            for held in list(self._items):
                self._live(held)
            return self._size

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    def _live(self, message_id: str) -> tuple[bytes, float] | None:
        entry = self._items.get(message_id)
        if entry is not None and self.ttl_s is not None and time.monotonic() - entry[1] > self.ttl_s:
            self._drop(message_id)
            return None
        return entry

    def _drop(self, message_id: str) -> bool:
        entry = self._items.pop(message_id, None)
        if entry is not None:
            self._size -= len(entry[0])
        return entry is not None
