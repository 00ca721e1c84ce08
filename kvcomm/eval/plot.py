"""The sweep plot: score against the fraction of layers shared, one line per method."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from kvcomm.eval.results import Report  # noqa: E402


def plot_sweep(report: Report, path: str | Path, metric: str | None = None, x: str = "fraction") -> Path:
    """Writes a PNG of score against ``x``: ``fraction`` of layers shared, or ``bytes`` sent per item.

    Methods that share KV are lines (one per method, codec and mask mode); the others are
    horizontal lines; 95% bands are drawn while there are few enough lines to tell them apart.
    ``metric`` defaults to the task's primary metric.
    """
    metric = metric or report.config["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lines: dict[str, list[tuple[float, float, tuple[float, float]]]] = defaultdict(list)
    for run in report.runs:
        score = run.scores[metric]
        if run.fraction is None and x == "bytes" and run.kv_bytes_mean > 0:  # NLD, CIPHER, AC: one point
            ax.scatter([run.kv_bytes_mean], [score.mean], marker="s", zorder=3, label=f"{run.label}")
            continue
        if run.fraction is None:
            ax.axhline(score.mean, linestyle="--", linewidth=1.2, label=f"{run.label} ({score.mean:.2f})",
                       color="grey" if run.method == "baseline" else "black")
            continue
        key = run.method + (f" +{run.codec}" if run.codec else "") + (
            f" [{run.mode}]" if run.mode not in (None, "causal") else "")
        lines[key].append((run.fraction if x == "fraction" else run.kv_bytes_mean, score.mean, score.ci95))
    for name, points in sorted(lines.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        if len(lines) <= 3:
            ax.fill_between(xs, [p[2][0] for p in points], [p[2][1] for p in points], alpha=0.12)
    cfg = report.config
    if x == "bytes":
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per item")
    else:
        ax.set(xlabel="fraction of layers shared", xlim=(0, 1.05))
    ax.set(ylabel=metric, title=f"{cfg['task']} · {cfg['receiver']} · n={cfg['test_items']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
