"""The message-store interface, its ids, and its errors.

One small interface (:class:`MessageStore`): ``put``, ``get``, ``exists``, ``delete``, ``list``,
``close``. Values are whole, verified message bytes; a ``put`` is all-or-nothing, so a reader never
sees a partial message. Capabilities some stores have are separate protocols: :class:`Sized`
(how much is held, for metrics) and :class:`Pingable` (a health check, for ``/healthz``).
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from kvcomm.errors import KvcommError

_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
ID_PATTERN = r"^(?!.*\.(partial|tmp)$)[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$"  # the same rule, for OpenAPI
_RESERVED_SUFFIXES = (".partial", ".tmp")  # what interrupted writes were (or are) called


class StoreError(KvcommError):
    """A store cannot hold or return a message (a bad id, too large)."""


class StoreFull(StoreError):
    """A message larger than the store can hold at all (its whole bound)."""


class StoreUnavailable(StoreError):
    """The store's backend cannot be reached or timed out (a service answers 503 and retries later)."""


def check_id(message_id: str) -> str:
    """Returns ``message_id`` if it is a valid id: 1-128 letters, digits, ``_``, ``.``, ``-``, not
    starting with a dot and not ending in ``.partial`` or ``.tmp`` (names of interrupted writes).

    Raises:
        StoreError: any other id (``\\n`` at the end included).
    """
    if (not isinstance(message_id, str) or not _ID.fullmatch(message_id) or message_id.startswith(".")
            or message_id.endswith(_RESERVED_SUFFIXES)):
        raise StoreError(f"invalid message id {message_id!r}: use 1-128 letters, digits, '_', '.', '-', not "
                         f"starting with '.' nor ending in {' or '.join(_RESERVED_SUFFIXES)}")
    return message_id


def is_id(message_id: object) -> bool:
    """Whether :func:`check_id` takes ``message_id``."""
    try:
        check_id(message_id)  # type: ignore[arg-type]
    except StoreError:
        return False
    return True


CONTENT_PREFIX = "kv-"  # ids the service makes from what a message holds (``POST /v1/contexts``)


def check_given_id(message_id: str) -> str:
    """:func:`check_id` for an id a client chooses (an upload, a context's ``id``): a content
    address (``kv-…``) is the service's own, so that a message found under one is what its id says.

    Raises:
        StoreError: an invalid id, or one starting ``kv-``.
    """
    if check_id(message_id).startswith(CONTENT_PREFIX):
        raise StoreError(f"ids starting {CONTENT_PREFIX!r} are the service's content addresses; store "
                         f"{message_id!r} under an id of your own")
    return message_id


class MessageStore(Protocol):
    def put(self, message_id: str, data: bytes) -> None: ...
    def get(self, message_id: str) -> bytes | None: ...
    def exists(self, message_id: str) -> bool: ...
    def delete(self, message_id: str) -> bool: ...
    def list(self) -> list[str]: ...
    def close(self) -> None: ...


@runtime_checkable
class Sized(Protocol):
    """A store that knows how much it holds."""

    def count(self) -> int: ...
    def size_bytes(self) -> int: ...


@runtime_checkable
class Pingable(Protocol):
    """A store whose backend can be down; ``ping`` raises :class:`StoreUnavailable` if it is."""

    def ping(self) -> None: ...
