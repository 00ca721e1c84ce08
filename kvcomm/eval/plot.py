"""The sweep plot: score against the fraction of layers shared, one line per method."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from kvcomm.eval.results import Report  # noqa: E402


def plot_sweep(report: Report, path: str | Path, metric: str | None = None) -> Path:
    """Writes a PNG: KV methods as lines over the shared fraction, others as horizontal lines.

    ``metric`` defaults to the task's primary metric.
    """
    metric = metric or report.config["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lines: dict[str, list[tuple[float, float, tuple[float, float]]]] = defaultdict(list)
    for run in report.runs:
        score = run.scores[metric]
        if run.fraction is None:
            ax.axhline(score.mean, linestyle="--", linewidth=1.2, label=f"{run.label} ({score.mean:.2f})",
                       color="grey" if run.method == "baseline" else "black")
        else:
            key = run.method if run.mode in (None, "causal") else f"{run.method} [{run.mode}]"
            lines[key].append((run.fraction, score.mean, score.ci95))
    for name, points in sorted(lines.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        ax.fill_between(xs, [p[2][0] for p in points], [p[2][1] for p in points], alpha=0.12)
    cfg = report.config
    ax.set(xlabel="fraction of layers shared", ylabel=metric, xlim=(0, 1.05),
           title=f"{cfg['task']} · {cfg['receiver']} · n={cfg['test_items']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
