"""The sweep plot: score against the fraction of layers shared (or bytes sent), one line per method.

Made to be read: every series keeps one colour and marker in both plots of a report (no colour
is the baseline's grey or the skyline's black); series that coincide stay visible (later ones are
drawn with smaller markers on top, and the legend says which they equal); 95% intervals are shown
for every series or for none (``bands``: bands around lines, error bars on points, the interval
in the legend of horizontal lines); the score axis starts at 0; the bytes axis is logarithmic
with short labels (``20 kB``) that do not collide.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from kvcomm.errors import ConfigError  # noqa: E402
from kvcomm.eval.results import Report, RunResult  # noqa: E402
from kvcomm.files import save_figure  # noqa: E402

MARKERS = "osD^vP*X<>"
FIXED = {"baseline": "0.5", "skyline": "black"}
REFERENCE_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))
Point = tuple[float, float, tuple[float, float]]  # x, score, 95% interval


@dataclass(frozen=True)
class Style:
    color: str | tuple[float, ...]
    marker: str
    size: float


def series_name(run: RunResult) -> str:
    """Runs that share KV form one line per configuration but its fraction: their label without
    what follows ``@`` up to the next part (``kvcomm@0.5x2+int8`` → ``kvcomm x2+int8``, random
    layers of two seeds two lines); any other run is its own series, a run given its layers
    (``kvcomm@0-3``) too."""
    if run.fraction is None or run.options.get("layers") is not None:
        return run.label
    head, _, rest = run.label.partition("@")
    rest = re.sub(r"^[^x+\[~/]*", "", rest)
    return head + (f" {rest}" if rest else "")


def series_styles(report: Report) -> dict[str, Style]:
    """One colour and marker per series, in the order the report lists them (baseline grey, skyline black)."""
    names = list(dict.fromkeys(series_name(run) for run in report.runs))
    others = [n for n in names if n not in FIXED]
    colors = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]  # type: ignore[attr-defined]
    palette = [c for c in colors if len(set(c)) > 1]  # saturated colours, without tab10's grey
    styles = {name: Style(color, "", 0.0) for name, color in FIXED.items()}
    for i, name in enumerate(others):
        styles[name] = Style(palette[i % len(palette)], MARKERS[i % len(MARKERS)], max(3.5, 9.0 - 1.1 * i))
    return styles


X_AXES = ("fraction", "bytes")


def plot_sweep(report: Report, path: str | Path, metric: str | None = None, x: str = "fraction",
               bands: bool = True) -> Path:
    """Writes a PNG of score against ``x``: ``fraction`` of layers shared, or ``bytes`` sent per item
    (see :func:`sweep_figure`)."""
    fig = sweep_figure(report, metric, x, bands)
    saved = save_figure(fig, path)
    plt.close(fig)
    return saved


def sweep_figure(report: Report, metric: str | None = None, x: str = "fraction", bands: bool = True) -> Figure:
    """The figure of score against ``x``: ``fraction`` of layers shared, or ``bytes`` sent per item.

    Methods that share KV are lines; NLD, CIPHER and AC are single points against bytes; runs that
    have no place on the x axis (baseline, skyline, and the point methods against fraction) are
    horizontal lines. ``bands``: 95% intervals as bands, spans or error bars, for every series.
    ``metric`` defaults to the task's primary metric.
    """
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis {x!r}; valid: {', '.join(X_AXES)}")
    metric = metric or report.config["metric"]
    if missing := [run.label for run in report.runs if metric not in run.scores]:
        scored = sorted({name for run in report.runs for name in run.scores})
        raise ConfigError(f"metric {metric!r} is not among the report's scores ({', '.join(scored)}; missing in "
                          f"{', '.join(missing[:3])})")
    styles = series_styles(report)
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    lines: dict[str, list[Point]] = defaultdict(list)
    drawn: dict[tuple[float, ...], str] = {}  # what each drawn series showed, to name coinciding ones
    highs = [0.0]
    for run in report.runs:
        name, score = series_name(run), run.scores[metric]
        highs.append(score.ci95[1] if bands else score.mean)
        style = styles[name]
        if run.fraction is None and x == "bytes" and run.kv_bytes_mean > 0:  # NLD, CIPHER, AC: one point
            error = [[score.mean - score.ci95[0]], [score.ci95[1] - score.mean]] if bands else None
            ax.errorbar([run.kv_bytes_mean], [score.mean], yerr=error, fmt=style.marker, color=style.color,
                        markersize=style.size, capsize=3, clip_on=False, zorder=3,
                        label=name + _twin(drawn, (run.kv_bytes_mean, score.mean), name))
        elif run.fraction is None:
            dash = REFERENCE_STYLES[sum(1 for key in drawn if len(key) == 1) % len(REFERENCE_STYLES)]
            interval = f" [{score.ci95[0]:.2f}, {score.ci95[1]:.2f}]" if bands else ""
            ax.axhline(score.mean, linestyle=dash, linewidth=1.3, color=style.color,
                       label=f"{name} {score.mean:.2f}{interval}" + _twin(drawn, (score.mean,), name))
        else:
            lines[name].append((run.fraction if x == "fraction" else run.kv_bytes_mean, score.mean, score.ci95))
    shade = max(0.04, 0.2 / max(len(lines), 1))  # bands stay light however many lines overlap
    for name, points in lines.items():
        _line(ax, name, sorted(points), styles[name], drawn, shade if bands else 0.0)
    _axes(ax, report, metric, x, [p[0] for ps in lines.values() for p in ps] + [
        r.kv_bytes_mean for r in report.runs if r.fraction is None and r.kv_bytes_mean > 0], max(highs))
    fig.tight_layout()
    return fig


def _line(ax: Axes, name: str, points: list[Point], style: Style, drawn: dict[tuple[float, ...], str],
          shade: float) -> None:
    """One series as a line with markers and, if ``shade`` > 0, its 95% band at that opacity (a
    series of one point, e.g. ``random@0.5``, has an error bar: a band of no width is not seen)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, marker=style.marker, markersize=style.size, color=style.color, linewidth=1.5, clip_on=False,
            label=name + _twin(drawn, tuple(xs + ys), name))
    if shade > 0 and len(points) == 1:
        (low, high), y = points[0][2], ys[0]
        ax.errorbar(xs, ys, yerr=[[max(0.0, y - low)], [max(0.0, high - y)]], fmt="none", color=style.color,
                    elinewidth=1.2, capsize=4, clip_on=False)
    elif shade > 0:
        ax.fill_between(xs, [p[2][0] for p in points], [p[2][1] for p in points], color=style.color, alpha=shade,
                        linewidth=0)


def _twin(drawn: dict[tuple[float, ...], str], key: tuple[float, ...], name: str) -> str:
    """`` (= other)`` when a series shows exactly what an earlier one showed; records this one."""
    if key in drawn:
        return f" (= {drawn[key]})"
    drawn[key] = name
    return ""


def _axes(ax: Axes, report: Report, metric: str, x: str, xs: list[float], high: float) -> None:
    cfg = report.config
    if x == "bytes":
        positive = [v for v in xs if v > 0]
        if positive:
            _bytes_axis(ax, min(positive), max(positive))
        ax.set_xlabel("bytes sent per item (log scale)")
    else:
        ax.set(xlabel="fraction of layers shared", xlim=(0, 1.05))
    ax.set_ylim(0, max(0.1, min(1.0, high)) * 1.05)
    ax.set(ylabel=metric, title=f"{cfg['task']} · {cfg['receiver']} · n={cfg['test_items']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _bytes_axis(ax: Axes, low: float, high: float) -> None:
    """A log axis labelled at decades (at 1-2-5 steps, or every step, when the data span less)."""
    ax.set_xscale("log")
    ax.set_xlim(low / 1.6, high * 1.6)
    decades = math.log10(ax.get_xlim()[1] / ax.get_xlim()[0])
    # every step 1-9 only where the axis spans well under a decade (their labels collide near its end)
    subs = (1.0,) if decades >= 2.5 else (1.0, 2.0, 5.0) if decades >= 0.6 else tuple(float(s) for s in range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: byte_label(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def byte_label(value: float) -> str:
    """``512 B``, ``20 kB``, ``1.5 MB`` (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"
