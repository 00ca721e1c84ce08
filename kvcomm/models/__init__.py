"""Model loading and the embedded model registry."""

from kvcomm.cache import cache_root
from kvcomm.models.fingerprint import Fingerprint, check_fingerprint, make_fingerprint
from kvcomm.models.loading import LoadedModel, Turn, check_compatible, install, load_model, load_pair
from kvcomm.models.registry import DEFAULT_MODEL, EMBEDDED, EmbeddedModel
from kvcomm.models.source import DTYPES, ModelSource, resolve_model

__all__ = [
    "DEFAULT_MODEL", "DTYPES", "EMBEDDED", "EmbeddedModel", "Fingerprint", "LoadedModel", "ModelSource", "Turn",
    "cache_root", "check_compatible", "check_fingerprint", "install", "load_model", "load_pair", "make_fingerprint",
    "resolve_model",
]
