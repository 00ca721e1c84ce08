"""Which layers to share: importance, prior, calibration profiles and alternative rules."""

from kvcomm.selection.calibrate import Profile, calibrate
from kvcomm.selection.rules import (
    combined_scores,
    contiguous_layers,
    default_alpha,
    format_layers,
    gaussian_prior,
    layer_count,
    minmax,
    parse_layers,
    random_layers,
    rank_layers,
    top_layers,
)

__all__ = [
    "Profile", "calibrate", "combined_scores", "contiguous_layers", "default_alpha", "format_layers", "gaussian_prior",
    "layer_count", "minmax", "parse_layers", "random_layers", "rank_layers", "top_layers",
]
