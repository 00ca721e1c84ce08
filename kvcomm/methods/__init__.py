"""Communication methods behind one interface (:class:`Method`), looked up by name in ``METHODS``."""

from kvcomm.errors import ConfigError
from kvcomm.methods.ac import ActivationCommunication
from kvcomm.methods.base import METHODS, Method, Output, Setup
from kvcomm.methods.debate import Cipher, Debate, NaturalLanguageDebate
from kvcomm.methods.kvcomm import ContiguousLayers, KVCommMethod, RandomLayers
from kvcomm.methods.online import OnlineKVComm
from kvcomm.methods.prompt import Baseline, Skyline

__all__ = [
    "METHODS", "ActivationCommunication", "Baseline", "Cipher", "ContiguousLayers", "KVCommMethod", "Method",
    "NaturalLanguageDebate", "OnlineKVComm", "Output", "RandomLayers", "Setup", "Skyline", "build_methods",
]


def build_methods(
    names: list[str], ratios: list[float] | None = None, layers: list[int] | None = None,
    mode: str = "causal", seed: int = 42, codecs: list[str | None] | None = None, senders: int = 1,
    round_one_tokens: int = 256, fuse: str = "mean", layer_k: int | None = None, layer_j: int | None = None,
    interval: int = 8,
) -> list[Method]:
    """Method instances for names × ratios × codecs.

    Methods that share KV get one instance per ratio and codec (``None`` = in process, no wire);
    ``layers`` (explicit indices) replaces the ratios for ``kvcomm``. The other arguments go to
    the methods that take them: ``senders`` (KV methods), ``round_one_tokens`` (nld, cipher),
    ``fuse``/``layer_k``/``layer_j`` (ac), ``interval`` (online).
    """
    built: list[Method] = []
    for name in names:
        cls = METHODS.get(name)
        if cls is OnlineKVComm:
            if not ratios:
                raise ConfigError("online needs a ratio")
            built.extend(cls(ratio=r, interval=interval, mode=mode, seed=seed) for r in ratios)
        elif issubclass(cls, KVCommMethod):
            wire = codecs or [None]
            if layers is not None and name == "kvcomm":
                built.extend(cls(layers=layers, mode=mode, seed=seed, codec=c, senders=senders) for c in wire)
            elif ratios:
                built.extend(cls(ratio=r, mode=mode, seed=seed, codec=c, senders=senders)
                             for r in ratios for c in wire)
            else:
                raise ConfigError(f"{name} needs --ratio (or, for kvcomm, --layers)")
        elif issubclass(cls, Debate):
            built.append(cls(round_one_tokens=round_one_tokens))
        elif cls is ActivationCommunication:
            built.append(cls(fuse=fuse, layer_k=layer_k, layer_j=layer_j))
        else:
            built.append(cls())
    return built
