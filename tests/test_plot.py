"""Sweep plots people can read: one colour per series in both plots, coinciding series named,
bands for all or none, a score axis from 0, log-axis labels that do not collide."""

from __future__ import annotations

import itertools
import re

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PolyCollection

from kvcomm.eval.plot import byte_label, plot_sweep, sweep_figure
from kvcomm.eval.results import Report, RunResult, Score


def run(label: str, method: str, fraction: float | None, mean: float, kv_bytes: float,
        codec: str | None = None) -> RunResult:
    return RunResult(method=method, label=label, layers=None, fraction=fraction, mode="causal", codec=codec, n=10,
                     scores={"paper_f1": Score(mean=mean, ci95=(max(0.0, mean - 0.1), min(1.0, mean + 0.1)))},
                     kv_bytes_mean=kv_bytes, seconds=1.0, sender_seconds=0.0, items=[])


@pytest.fixture
def report() -> Report:
    runs = [run("baseline", "baseline", None, 0.2, 0), run("skyline", "skyline", None, 0.7, 0),
            run("nld", "nld", None, 0.5, 300.0), run("ac", "ac", None, 0.45, 8000.0)]
    for fraction in (0.25, 0.5, 1.0):
        score = 0.3 + 0.3 * fraction
        runs += [run(f"kvcomm@{fraction:g}", "kvcomm", fraction, score, 2e6 * fraction),
                 run(f"random@{fraction:g}", "random", fraction, score, 2e6 * fraction),  # coincides with kvcomm
                 run(f"kvcomm@{fraction:g}+int8", "kvcomm", fraction, score - 0.05, 5e5 * fraction, "int8")]
    return Report(config={"metric": "paper_f1", "task": "t", "receiver": "m", "test_items": 10}, environment={},
                  profile=None, runs=runs)


def series(label: str) -> str:
    """The series a legend entry names (less any "(= other)" note and a horizontal line's score)."""
    return re.sub(r" \d\.\d\d( \[.*\])?$", "", label.split(" (=")[0])


def colours(fig) -> dict[str, tuple]:
    """Each legend entry's colour (lines, horizontal lines and error-bar points alike)."""
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    out = {}
    for handle, label in zip(handles, labels):
        artist = handle.lines[0] if hasattr(handle, "lines") else handle
        out[series(label)] = tuple(plt.matplotlib.colors.to_rgba(artist.get_color()))
    return out


def test_each_series_keeps_one_distinct_colour_in_both_plots(report):
    by_fraction, by_bytes = sweep_figure(report), sweep_figure(report, x="bytes")
    a, b = colours(by_fraction), colours(by_bytes)
    assert set(a) == set(b) == {"baseline", "skyline", "nld", "ac", "kvcomm", "random", "kvcomm +int8"}
    assert a == b
    assert len(set(a.values())) == len(a)  # no two series share a colour
    plt.close("all")


def test_coinciding_series_are_named_and_the_score_axis_starts_at_zero(report):
    for x in ("fraction", "bytes"):
        fig = sweep_figure(report, x=x)
        ax = fig.axes[0]
        assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 0.8  # the highest interval shows
        labels = ax.get_legend_handles_labels()[1]
        assert "random (= kvcomm)" in labels
        sizes = {series(line.get_label()): line.get_markersize() for line in ax.get_lines()}
        assert sizes["random"] < sizes["kvcomm"]  # drawn later and smaller: both stay visible
        plt.close(fig)


@pytest.mark.parametrize("bands", [True, False])
def test_bands_are_drawn_for_every_line_or_for_none(report, bands):
    ax = sweep_figure(report, bands=bands).axes[0]
    drawn = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(drawn) == (3 if bands else 0)  # kvcomm, random, kvcomm +int8
    references = [label for label in ax.get_legend_handles_labels()[1] if label.startswith(("baseline", "nld"))]
    assert all(("[" in label) == bands for label in references)  # the interval, in the legend
    plt.close("all")


def labels_shown(fig) -> list:
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]


def test_log_axis_labels_do_not_collide(report, tmp_path):
    fig = sweep_figure(report, x="bytes")
    shown = labels_shown(fig)
    assert len(shown) >= 3
    boxes = [t.get_window_extent() for t in shown]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert {t.get_text() for t in shown} >= {"1 kB", "1 MB"}
    plt.close(fig)
    assert plot_sweep(report, tmp_path / "p.png", x="bytes").stat().st_size > 1000


def test_a_short_bytes_axis_and_a_series_of_one_point_are_readable():
    """Under a decade of bytes every step 1-9 was labelled and 700 kB, 800 kB, 900 kB, 1 MB collided;
    a series of one point (the default sweep's random@0.5) had a band of no width: no interval."""
    runs = [run(f"kvcomm@{f:g}", "kvcomm", f, 0.3 + f / 4, 1e6 * f) for f in (0.7, 0.8, 0.9, 1.0)]
    runs.append(run("random@0.5", "random", 0.5, 0.3, 5e5))
    short = Report(config={"metric": "paper_f1", "task": "t", "receiver": "m", "test_items": 10}, environment={},
                   profile=None, runs=runs)
    fig = sweep_figure(short, x="bytes")
    shown = labels_shown(fig)
    assert len(shown) >= 2
    assert not any(a.overlaps(b) for a, b in itertools.combinations([t.get_window_extent() for t in shown], 2))
    bars = [c for c in fig.axes[0].collections if not isinstance(c, PolyCollection)]
    assert len(bars) == 1 and bars[0].get_segments()[0][:, 1].tolist() == pytest.approx([0.2, 0.4])
    plt.close("all")


def test_byte_labels():
    assert [byte_label(v) for v in (512, 2e4, 1.5e6, 3e9)] == ["512 B", "20 kB", "1.5 MB", "3 GB"]


def test_a_figure_is_saved_atomically(tmp_path):
    """A plot replaces its file whole or not at all (before, savefig wrote in place: an interrupted
    write left half a PNG where the last good one was)."""
    import matplotlib.pyplot as plt

    from kvcomm.files import save_figure

    fig = plt.figure()
    path = tmp_path / "p.png"
    assert save_figure(fig, path) == path and path.read_bytes().startswith(b"\x89PNG")
    before = path.read_bytes()

    class Failing:
        def savefig(self, out, **options):
            out.write(b"half a pn")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        save_figure(Failing(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.png"]
    plt.close(fig)


def test_configurations_that_differ_in_more_than_their_fraction_are_their_own_lines():
    """A sweep's line joins one configuration's fractions: random layers of two seeds, one sender
    and two, are separate lines (before, every random run was one line, zig-zagging)."""
    from types import SimpleNamespace

    from kvcomm.eval.plot import series_name

    def named(label: str) -> str:
        return series_name(SimpleNamespace(label=label, fraction=0.5, options={}))  # type: ignore[arg-type]

    assert named("random@0.25~seed1") == named("random@0.5~seed1") != named("random@0.5~seed2")
    assert named("kvcomm@0.3") == named("kvcomm@1") == "kvcomm" != named("kvcomm@0.5x2") == "kvcomm x2"
    assert named("kvcomm@0.5x2+int8") == "kvcomm x2+int8" and named("kvcomm@0.5[legacy]") == "kvcomm [legacy]"


def test_an_unknown_axis_or_metric_is_refused_naming_the_valid_ones(report, tmp_path):
    """``x="layers"`` drew byte counts on the fraction axis (points off the plot) and an unknown
    metric was a raw KeyError."""
    from kvcomm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown x axis 'layers'; valid: fraction, bytes"):
        plot_sweep(report, tmp_path / "p.png", x="layers")
    with pytest.raises(ConfigError, match="metric 'f1' is not among the report's scores"):
        plot_sweep(report, tmp_path / "p.png", metric="f1")
    assert not (tmp_path / "p.png").exists()


def test_runs_given_their_layers_are_series_of_their_own():
    """Two explicit layer lists were drawn as one line with the ratio runs (the label's layers cut off)."""
    from kvcomm.eval.plot import series_name
    from kvcomm.methods import make_method

    names = []
    for options in (dict(ratio=0.5), dict(ratio=0.3), dict(layers=(0, 1, 2, 3)), dict(layers=(20, 21, 22, 23))):
        method = make_method("kvcomm", **options)
        names.append(series_name(RunResult(method="kvcomm", label=method.label, options=method.options.model_dump(),
                                           layers=[0], fraction=0.5, mode="causal", n=1,
                                           scores={"contains": Score(mean=0, ci95=(0, 0))}, kv_bytes_mean=1,
                                           seconds=0, sender_seconds=0, items=[])))
    assert names[0] == names[1] == "kvcomm" and names[2:] == ["kvcomm@0-3", "kvcomm@20-23"]
