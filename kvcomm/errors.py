"""One exception tree, so callers can catch everything kvcomm raises with one ``except``.

The rule (as in LMCache's ``kv_codec``): every error kvcomm raises on purpose is a
:class:`KvcommError`; a bare ``ValueError`` or ``RuntimeError`` escaping the package is a bug.
Messages say what was given and what was expected.
"""

from __future__ import annotations


class KvcommError(Exception):
    """Base class of every error kvcomm raises on purpose."""


class ConfigError(KvcommError, ValueError):
    """An option, name or combination of options is not valid."""


class ModelError(KvcommError):
    """A model cannot be found, installed, loaded, or paired with another."""


class IncompatibleModelsError(ModelError):
    """Sender and receiver do not share the KV layout that communication needs."""


class DataError(KvcommError, ValueError):
    """A dataset file or record is missing or malformed."""


class ProtocolError(KvcommError):
    """KV handed to a model does not fit it (a cache and its layout disagree, an unsupported model)."""


class WireError(KvcommError, ValueError):
    """A KV message cannot be used. Nothing of a refused message is ever returned."""


class TruncatedMessage(WireError):
    """The bytes end before the message does."""


class CorruptMessage(WireError):
    """A checksum, a length, a field or a payload does not check out."""


class UnsupportedVersion(WireError):
    """The message was written by an incompatible version of the format."""


class FingerprintMismatch(WireError, IncompatibleModelsError):
    """KV was made by a model whose layout differs from the receiver's (a message, or a sender)."""


class MessageTooLarge(WireError):
    """The message exceeds the size the reader was told to accept."""


class MissingCodebook(WireError):
    """The message names a codebook this machine does not hold."""


class ClusterError(KvcommError):
    """Work sent to a cluster failed: Ray is missing or unreachable, or a batch's worker failed
    more often than the retries allow."""
