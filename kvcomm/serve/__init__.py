"""Agents as services: the HTTP app, message stores and the client."""

from kvcomm.serve.client import Client, ServiceError
from kvcomm.serve.store import MemoryStore, MessageStore, RedisStore, StoreError, open_store

__all__ = ["Client", "MemoryStore", "MessageStore", "RedisStore", "ServiceError", "StoreError", "open_store"]
