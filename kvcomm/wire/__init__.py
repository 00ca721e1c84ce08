"""KV messages on the wire: a self-describing binary format, codecs, fingerprints, errors."""

from kvcomm.wire.codecs import CODECS, PRESETS, Codec, make_codec
from kvcomm.wire.errors import (
                                CorruptMessage,
                                FingerprintMismatch,
                                MessageTooLarge,
                                TruncatedMessage,
                                UnsupportedVersion,
                                WireError,
)
from kvcomm.wire.fingerprint import check_fingerprint
from kvcomm.wire.message import KVMessage, LayerKV, MessageReader

__all__ = [
    "CODECS", "PRESETS", "Codec", "CorruptMessage", "FingerprintMismatch", "KVMessage", "LayerKV", "MessageReader",
    "MessageTooLarge", "TruncatedMessage", "UnsupportedVersion", "WireError", "check_fingerprint",
    "make_codec",
]
