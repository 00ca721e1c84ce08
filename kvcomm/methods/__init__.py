"""Communication methods behind one interface (:class:`Method`), looked up by name in ``METHODS``."""

from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, Output, Setup
from kvcomm.methods.kvcomm import ContiguousLayers, KVCommMethod, RandomLayers
from kvcomm.methods.prompt import Baseline, Skyline

__all__ = [
    "METHODS", "Baseline", "ContiguousLayers", "Method", "Output", "RandomLayers", "Setup", "KVCommMethod", "Skyline",
    "build_methods",
]


def build_methods(
    names: list[str], ratios: list[float] | None = None, layers: list[int] | None = None,
    mode: str = "causal", seed: int = 42, codecs: list[str | None] | None = None,
) -> list[Method]:
    """Method instances for names × ratios × codecs: methods that share KV get one per ratio and
    codec (``None`` = in-process, no wire).

    ``layers`` (explicit indices) replaces the ratios for ``kvcomm``.
    """
    built: list[Method] = []
    for name in names:
        cls = METHODS.get(name)
        if not issubclass(cls, KVCommMethod):
            built.append(cls())
        elif layers is not None and name == "kvcomm":
            built.extend(cls(layers=layers, mode=mode, seed=seed, codec=c) for c in codecs or [None])
        elif ratios:
            built.extend(cls(ratio=r, mode=mode, seed=seed, codec=c) for r in ratios for c in codecs or [None])
        else:
            raise ConfigError(f"{name} needs --ratio (or, for kvcomm, --layers)")
    return built
