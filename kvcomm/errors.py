"""One exception tree, so callers can catch everything kvcomm raises with one ``except``."""

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
