"""Codecs for KV payloads, registered by name; presets are the names users type."""

from kvcomm.wire.codecs import auto, cachegen, klt, quant, raw  # noqa: F401  (registration)
from kvcomm.wire.codecs.base import (
    CODECS,
    PRESETS,
    Codec,
    CodecName,
    codec_names,
    known_codec,
    make_codec,
    preset_of,
)

__all__ = ["CODECS", "PRESETS", "Codec", "CodecName", "codec_names", "known_codec", "make_codec", "preset_of"]
