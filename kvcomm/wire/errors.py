"""Every way a KV message can be refused; all are :class:`WireError`, so one ``except`` suffices.

The classes live in :mod:`kvcomm.errors` (one tree for the package); this module names the wire's share.
"""

from kvcomm.errors import (
    CorruptMessage,
    FingerprintMismatch,
    MessageTooLarge,
    MissingCodebook,
    TruncatedMessage,
    UnsupportedVersion,
    WireError,
)

__all__ = ["CorruptMessage", "FingerprintMismatch", "MessageTooLarge", "MissingCodebook", "TruncatedMessage",
           "UnsupportedVersion", "WireError"]
