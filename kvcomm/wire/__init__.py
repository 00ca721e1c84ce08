"""KV messages on the wire: a self-describing binary format, codecs, codebooks, errors."""

from kvcomm.errors import (
    CorruptMessage,
    FingerprintMismatch,
    MessageTooLarge,
    MissingCodebook,
    TruncatedMessage,
    UnsupportedVersion,
    WireError,
)
from kvcomm.wire.codebook import (
    Codebook,
    build_codebook,
    codebook_dir,
    default_codebook_id,
    load_codebook,
    save_codebook,
)
from kvcomm.wire.codecs import CODECS, PRESETS, Codec, make_codec
from kvcomm.wire.fingerprint import check_fingerprint
from kvcomm.wire.header import VERSION, Header
from kvcomm.wire.message import KVMessage, LayerKV, MessageReader

__all__ = [
    "CODECS", "PRESETS", "VERSION", "Codebook", "Codec", "CorruptMessage", "FingerprintMismatch", "Header",
    "KVMessage", "LayerKV", "MessageReader", "MessageTooLarge", "MissingCodebook", "TruncatedMessage",
    "UnsupportedVersion", "WireError", "build_codebook", "check_fingerprint", "codebook_dir", "default_codebook_id",
    "load_codebook", "make_codec", "save_codebook",
]
