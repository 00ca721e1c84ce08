"""Model loading and the embedded model registry."""

from kvcomm.models.loading import LoadedModel, cache_root, check_compatible, install, load_model, load_pair
from kvcomm.models.registry import DEFAULT_MODEL, EMBEDDED, EmbeddedModel

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED", "EmbeddedModel", "LoadedModel", "cache_root", "check_compatible", "install",
    "load_model", "load_pair",
]
