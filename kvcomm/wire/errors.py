"""Every way a KV message can be refused; all are :class:`WireError`, so one ``except`` suffices."""

from __future__ import annotations

from kvcomm.errors import KvcommError


class WireError(KvcommError, ValueError):
    """A KV message cannot be used. Nothing of a refused message is ever returned."""


class TruncatedMessage(WireError):
    """The bytes end before the message does."""


class CorruptMessage(WireError):
    """A checksum, a length, a field or a payload does not check out."""


class UnsupportedVersion(WireError):
    """The message was written by an incompatible version of the format."""


class FingerprintMismatch(WireError):
    """The message was made by a model whose KV layout differs from the receiver's."""


class MessageTooLarge(WireError):
    """The message exceeds the size the reader was told to accept."""
