"""Message stores, by kind: ``memory``, ``disk:/path`` (survives restarts) and ``redis://…`` (shared)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvcomm.errors import ConfigError
from kvcomm.registry import Registry
from kvcomm.serve.stores.base import (
    ID_PATTERN,
    MessageStore,
    Pingable,
    Sized,
    StoreError,
    StoreFull,
    StoreUnavailable,
    check_given_id,
    check_id,
)
from kvcomm.serve.stores.disk import DiskStore
from kvcomm.serve.stores.memory import MemoryStore
from kvcomm.serve.stores.redis import RedisStore


@dataclass(frozen=True)
class StoreLimits:
    """Bounds every store kind takes: memory bytes, disk bytes, time to live."""

    memory_bytes: int = 1 << 30
    disk_bytes: int = 10 << 30
    ttl_s: float | None = None


StoreFactory = Callable[[str, StoreLimits], MessageStore]
STORES: Registry[StoreFactory] = Registry("store")
STORES.add("memory", lambda spec, limits: MemoryStore(limits.memory_bytes, limits.ttl_s))
STORES.add("disk", lambda spec, limits: DiskStore(_disk_path(spec), limits.disk_bytes, limits.ttl_s))
STORES.add("redis", lambda spec, limits: RedisStore(spec, ttl_s=limits.ttl_s))
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


def store_kind_of(store: MessageStore) -> str:
    """The registered kind of a store object (``memory``, ``disk``, ``redis``) or its class name."""
    kinds = {MemoryStore: "memory", DiskStore: "disk", RedisStore: "redis"}
    return kinds.get(type(store), type(store).__name__)


def open_store(spec: str | None, limits: StoreLimits | None = None) -> MessageStore:
    """``None``/``memory`` (in process), ``disk:/path`` (on disk, bounded), or ``redis://…``."""
    return STORES.get(store_kind(spec))(spec or "memory", limits or StoreLimits())


__all__ = [
    "ID_PATTERN", "STORES", "STORE_FORMS", "DiskStore", "MemoryStore", "MessageStore", "Pingable", "RedisStore",
    "Sized", "StoreError", "StoreFull", "StoreLimits", "StoreUnavailable", "check_given_id", "check_id", "open_store",
    "store_kind", "store_kind_of",
]
