"""Communication methods behind one interface (:class:`Method`), looked up by name in ``METHODS``."""

from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, Output, Setup
from kvcomm.methods.kvcomm import ContiguousLayers, RandomLayers, SharedKV
from kvcomm.methods.prompt import Baseline, Skyline

__all__ = [
    "METHODS", "Baseline", "ContiguousLayers", "Method", "Output", "RandomLayers", "Setup", "SharedKV", "Skyline",
    "build_methods",
]


def build_methods(
    names: list[str], ratios: list[float] | None = None, layers: list[int] | None = None,
    mode: str = "causal", seed: int = 42,
) -> list[Method]:
    """Method instances for names × ratios: methods that share KV get one per ratio.

    ``layers`` (explicit indices) replaces the ratios for ``kvcomm``.
    """
    built: list[Method] = []
    for name in names:
        cls = METHODS.get(name)
        if not issubclass(cls, SharedKV):
            built.append(cls())
        elif layers is not None and name == "kvcomm":
            built.append(cls(layers=layers, mode=mode, seed=seed))
        elif ratios:
            built.extend(cls(ratio=r, mode=mode, seed=seed) for r in ratios)
        else:
            raise ConfigError(f"{name} needs --ratio (or, for kvcomm, --layers)")
    return built
