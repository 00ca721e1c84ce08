"""KV messages on the wire: a self-describing binary format, codecs, fingerprints, errors."""

from kvcomm.wire.codebook import (
    Codebook,
    MissingCodebook,
    build_codebook,
    codebook_dir,
    default_codebook_id,
    load_codebook,
    save_codebook,
)
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
    "CODECS", "PRESETS", "Codebook", "Codec", "CorruptMessage", "FingerprintMismatch", "KVMessage", "LayerKV",
    "MessageReader", "MessageTooLarge", "MissingCodebook", "TruncatedMessage", "UnsupportedVersion", "WireError",
    "build_codebook", "check_fingerprint", "codebook_dir", "default_codebook_id", "load_codebook", "make_codec",
    "save_codebook",
]
