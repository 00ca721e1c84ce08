"""Layer selection rules: attention importance with a Gaussian depth prior, and the alternatives.

KVComm's score for layer ``l`` (paper §3.2) is ``alpha * minmax(importance)_l + (1 - alpha) *
minmax(prior)_l`` with ``prior_l = exp(-(l - mu)^2 / (2 sigma^2))``; the top ``ceil(ratio * L)``
layers are shared. ``mu`` is given as a fraction of depth: the centre is ``mu * (L - 1)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from kvcomm.errors import ConfigError

DEFAULT_MU = 0.5
DEFAULT_SIGMA = 10.0


def default_alpha(model_type: str) -> float:
    """The paper's weight on attention: 1.0 for Llama-family models, 0.8 for Qwen and Falcon."""
    return 0.8 if model_type.startswith(("qwen", "falcon")) else 1.0


def minmax(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scales to [0, 1]; a constant vector (range below 1e-9) becomes all zeros."""
    arr = np.asarray(values, dtype=np.float64)
    span = arr.max() - arr.min()
    return np.zeros_like(arr) if span < 1e-9 else (arr - arr.min()) / span


def check_prior(mu: float, sigma: float) -> None:
    """The depth prior's centre ``mu`` is a fraction of the depth, in [0, 1]; its width ``sigma``
    (layers) is positive. Raises ``ConfigError`` naming the one that is not."""
    if not 0.0 <= mu <= 1.0:
        raise ConfigError(f"mu (the prior's centre, a fraction of the depth) must be in [0, 1], got {mu}")
    if not 0 < sigma < math.inf:  # a profile records it, and refuses one it cannot hold
        raise ConfigError(f"sigma must be positive and finite, got {sigma}")


def gaussian_prior(num_layers: int, mu: float = DEFAULT_MU, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Unnormalised prior over depths: a Gaussian centred at ``mu * (L - 1)``, width ``sigma`` layers."""
    check_prior(mu, sigma)
    depth = np.arange(num_layers, dtype=np.float64)
    return np.exp(-0.5 * ((depth - mu * (num_layers - 1)) / sigma) ** 2)


def combined_scores(importance: Sequence[float] | np.ndarray, alpha: float, mu: float = DEFAULT_MU,
                    sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """``alpha * minmax(importance) + (1 - alpha) * minmax(prior)``, one score per layer."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    prior = gaussian_prior(len(importance), mu, sigma)
    return np.asarray(alpha * minmax(importance) + (1.0 - alpha) * minmax(prior), dtype=np.float64)


def rank_layers(scores: Sequence[float]) -> list[int]:
    """Layer indices by descending score (ties: the lower index first)."""
    return sorted(range(len(scores)), key=lambda layer: (-scores[layer], layer))


def layer_count(ratio: float, num_layers: int) -> int:
    """How many layers a ratio shares: ``ceil(ratio * L)`` as in the paper (the reference floors)."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * num_layers - 1e-9))


def top_layers(ranking: Sequence[int], ratio: float) -> list[int]:
    """The first ``ceil(ratio * L)`` layers of a ranking, sorted by index."""
    return sorted(ranking[: layer_count(ratio, len(ranking))])


def check_layer_choice(ratio: float | None, layers: Sequence[int] | None) -> None:
    """Options that choose layers take a ratio or a layer list, not both; a list names at least one
    layer, each >= 0. Raises ``ValueError`` (inside an option model's validator)."""
    if ratio is not None and layers is not None:
        raise ValueError("give a ratio or a layer list, not both")
    if layers is not None and (not layers or min(layers) < 0):
        raise ValueError("a layer list names one or more layers, each >= 0")


def random_layers(num_layers: int, ratio: float, seed: int = 42) -> list[int]:
    """``ceil(ratio * L)`` layers drawn uniformly without replacement (the paper's Random rows)."""
    return sorted(random.Random(seed).sample(range(num_layers), layer_count(ratio, num_layers)))


def contiguous_layers(num_layers: int, ratio: float, mu: float = DEFAULT_MU) -> list[int]:
    """One block of ``ceil(ratio * L)`` consecutive layers centred at ``mu * (L - 1)``."""
    count = layer_count(ratio, num_layers)
    start = round(mu * (num_layers - 1) - (count - 1) / 2)
    start = min(max(start, 0), num_layers - count)
    return list(range(start, start + count))


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """Parses ``"3,5,7-9"`` (ranges inclusive; a negative index counts from the end).

    ``num_layers`` None (a depth not known yet) checks the syntax only; negative indices then wait
    for the depth and are refused.
    """
    layers: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, dash, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            if dash:
                if int(hi) < int(lo):
                    raise ConfigError(f"layer range {part!r} runs backwards")
                layers.update(range(int(lo), int(hi) + 1))
            elif int(lo) < 0:
                if num_layers is None:
                    raise ConfigError(f"layer {lo} counts from the end of a model whose depth is not known yet")
                layers.add(int(lo) + num_layers)
            else:
                layers.add(int(lo))
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot parse layer list {spec!r}; use e.g. '0,4,10-14'") from None
    top = num_layers if num_layers is not None else 1 << 16
    bad = sorted(layer for layer in layers if not 0 <= layer < top)
    if bad or not layers:
        raise ConfigError(f"layer list {spec!r} must name layers in 0..{top - 1}")
    return sorted(layers)


def format_layers(layers: Sequence[int]) -> str:
    """The inverse of :func:`parse_layers`: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
