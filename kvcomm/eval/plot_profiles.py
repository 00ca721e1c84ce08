"""Plots of what profiling measures before any answer is generated: DroidSpeak's block profile
(quality against layers recomputed) and a variant pair's per-layer drift."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kvcomm.files import save_figure  # noqa: E402

if TYPE_CHECKING:
    from kvcomm.eval.drift import Drift
    from kvcomm.selection.blocks import BlockProfile


def plot_blocks(profile: BlockProfile, path: str | Path, tolerance: float | None = None) -> Path:
    """Left: the best block of each length against the receiver's own prefill and plain reuse.
    Right: every block's score by start layer and length."""
    fig, (curve_ax, map_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    curve = profile.curve()
    xs = [0] + [p["layers"] for p in curve]
    ys = [profile.reuse] + [p["loglik"] for p in curve]
    curve_ax.plot(xs, ys, marker="o", color="tab:blue", label="best block of each length")
    for point in curve:
        curve_ax.annotate(f"{point['start']}:{point['stop']}", (point["layers"], point["loglik"]), fontsize=7,
                          xytext=(3, -10), textcoords="offset points")
    curve_ax.axhline(profile.own, color="black", linestyle="--", label="receiver's own prefill")
    curve_ax.axhline(profile.reuse, color="grey", linestyle=":", label="sender's KV at every layer")
    if tolerance is not None:
        picked = profile.pick(tolerance)
        curve_ax.scatter([picked.stop - picked.start], [picked.loglik], s=120, facecolors="none",
                         edgecolors="tab:red", zorder=5,
                         label=f"picked {picked.start}:{picked.stop} (tol {tolerance:g})")
    curve_ax.set_xlabel(f"layers recomputed (of {profile.num_layers}; cap {profile.max_block})")
    target = "the receiver's own answer" if profile.objective == "own" else "the gold answer"
    curve_ax.set_ylabel(f"log-likelihood per token of {target}")
    curve_ax.set_title(f"{profile.sender} → {profile.receiver} · {profile.task} · "
                       f"{len(profile.calibration_items)} items", fontsize=9)
    curve_ax.legend(fontsize=7)
    curve_ax.margins(x=0.1)  # room for the last block's label
    grid = np.full((profile.max_block, profile.num_layers), np.nan)
    for block in profile.blocks:
        grid[block.stop - block.start - 1, block.start] = block.loglik
    image = map_ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                          extent=(-0.5, profile.num_layers - 0.5, 0.5, profile.max_block + 0.5))
    map_ax.set_xlabel("block start layer")
    map_ax.set_ylabel("block length (layers)")
    map_ax.set_title("every block's score", fontsize=9)
    fig.colorbar(image, ax=map_ax, label="log-likelihood per token")
    return _save(fig, path)


def plot_drift(drift: Drift, path: str | Path) -> Path:
    """Relative difference of keys, values and hidden states per layer."""
    fig, ax = plt.subplots(figsize=(7.5, 4), constrained_layout=True)
    layers = list(range(len(drift.keys)))
    ax.plot(layers, drift.keys, marker="o", label="keys")
    ax.plot(layers, drift.values, marker="s", label="values")
    ax.plot(layers, drift.hidden, marker="^", label="hidden state after the layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative L2 difference")
    ax.set_title(f"{drift.a} vs {drift.b} · {drift.task} · {drift.items} items", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    saved = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return saved
