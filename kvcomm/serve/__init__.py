"""Agents as services: the HTTP app, message stores and the client."""

from kvcomm.serve.client import Client, ServiceError
from kvcomm.serve.stores import (
    DiskStore,
    MemoryStore,
    MessageStore,
    RedisStore,
    StoreError,
    StoreLimits,
    StoreUnavailable,
    open_store,
)

__all__ = ["Client", "DiskStore", "MemoryStore", "MessageStore", "RedisStore", "ServiceError", "StoreError",
           "StoreLimits", "StoreUnavailable", "open_store"]
