"""The results schema (versioned JSON), confidence intervals and the terminal table.

Version 2 added ``provenance`` (the command line, the UTC date the run started, its
resumptions), the data file and its sha256, the dtype, the seeds, the alpha actually used
(``alpha`` was null in version 1 when the per-family default applied) and the git commit.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvcomm.errors import ConfigError
from kvcomm.files import atomic_write

if TYPE_CHECKING:
    from kvcomm.eval.cluster import Cluster

RESULTS_VERSION = 2
BOOTSTRAP_SEED = 0  # the seed of every confidence interval, so reports are reproducible


class ItemResult(BaseModel):
    id: str
    sender_ids: list[int] | None
    receiver_ids: list[int]
    answer: str
    gold: list[str]
    scores: dict[str, float]
    kv_bytes: int  # bytes the receiver was sent: KV (sinks included), text, or vectors
    message: str | None = None  # readable form of a text or vector message


class Score(BaseModel):
    """A metric's mean over a run's items and its 95% bootstrap interval."""

    mean: float
    ci95: tuple[float, float]


class RunResult(BaseModel):
    """One method configuration over the test items."""

    method: str
    label: str
    options: dict[str, Any] = {}  # the method's options as given (defaults filled in)
    layers: list[int] | None
    fraction: float | None  # shared layers / all layers; None for methods that send no KV
    mode: str | None
    codec: str | None = None  # wire codec the KV went through (None: in process)
    n: int
    scores: dict[str, Score]
    kv_bytes_mean: float
    seconds: float  # receiver-side wall time of this configuration
    sender_seconds: float  # sender-side time this configuration used (a shared prefill is charged in full)
    details: dict[str, Any] | None = None  # method-specific (e.g. online calibration drift)
    items: list[ItemResult]


class Report(BaseModel):
    """Everything a run or sweep produced, with the configuration that produced it."""

    version: int = RESULTS_VERSION
    config: dict[str, Any]
    provenance: dict[str, Any] = {}  # command, date (UTC, when the run started), resumed
    environment: dict[str, str]
    profile: dict[str, Any] | None
    profiles: dict[str, dict[str, Any]] = {}  # every rule's ranking the run used (kvcomm's `selection` option)
    runs: list[RunResult]

    def save(self, path: str | Path) -> None:
        """Writes the report as JSON to ``path`` (whole or not at all; an existing file is replaced:
        the command line's ``--overwrite`` guards its own run folders)."""
        atomic_write(path, self.model_dump_json(indent=1) + "\n")


def environment(cluster: Cluster | None = None) -> dict[str, str]:
    """Versions of kvcomm (and its git commit, when it runs from a repository), torch,
    transformers and Python, the machine, the CPU's vector capability and whether it computes
    bfloat16 and float16 natively (``models/native.py``), the allocator setting (``models/allocator.py``); and the
    Ray cluster the batches ran on, if any."""
    import transformers

    from kvcomm import __version__
    from kvcomm.eval.provenance import git_commit
    from kvcomm.models.allocator import allocator_state
    from kvcomm.models.native import describe_cpu

    commit = git_commit()
    return {
        "kvcomm": __version__, **({"git_commit": commit} if commit else {}), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "cpu": describe_cpu(),
        "allocator": allocator_state(),
    } | ({"ray": cluster.describe()} if cluster is not None else {})


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded, so reports are reproducible)."""
    if not values:
        return (float("nan"), float("nan"))
    arr = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def share(values: list[float], reference: list[float]) -> float:
    """``sum(values) / sum(reference)`` (e.g. a configuration's share of the skyline): infinite
    where the reference sums to 0 and the values do not, undefined (NaN) where both do."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(sum(values)) / np.float64(sum(reference)))


def share_ci(values: list[float], reference: list[float], resamples: int = 2000,
             seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of :func:`share`, items resampled in pairs (seeded).
    Resamples where both sums are 0 have no share and are left out; where only the reference's
    is, the share is infinite (so is the upper bound, where they are more than 2.5%); NaN when no
    resample has a share."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if not len(a):
        return (float("nan"), float("nan"))
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = a[picks].sum(axis=1) / b[picks].sum(axis=1)
    if np.isnan(ratios).all():
        return (float("nan"), float("nan"))
    # linear interpolation between an infinite share and another is undefined: take the nearest there
    if np.isinf(ratios).any():
        low, high = np.nanpercentile(ratios, [2.5, 97.5], method="nearest")
    else:
        low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return (float(low), float(high))


def summarize(items: Sequence[ItemResult] | Sequence[dict[str, float]]) -> dict[str, Score]:
    """Each metric's mean and 95% interval over items (results, or their score dictionaries)."""
    scores = [i if isinstance(i, dict) else i.scores for i in items]
    metrics = scores[0].keys() if scores else []
    return {m: Score(mean=float(np.mean([s[m] for s in scores])), ci95=bootstrap_ci([s[m] for s in scores]))
            for m in metrics}


def print_table(report: Report, console: Console | None = None) -> None:
    """Prints one row per configuration: primary score with its interval, the other metrics,
    layers shared, KV bytes given to the receiver and wall time (sender prefill included).

    Every cell and the title are printed literally (a label like ``kvcomm@0.5[shift-back]`` is
    not read as a style tag) and in full (folded, never cut short). Without ``console``: standard
    output, 140 columns wide when it is not a terminal.

    Raises:
        ConfigError: ``report`` is not a :class:`Report` (a saved one reads back with
            ``Report.model_validate_json(path.read_text())``).
    """
    if not isinstance(report, Report):
        raise ConfigError(f"print_table prints a Report (evaluate's, or a saved one read back with "
                          f"Report.model_validate_json), not {type(report).__name__}")
    cfg = report.config
    primary = cfg["metric"]
    others = [m for m in (report.runs[0].scores if report.runs else {}) if m != primary]
    table = Table(title=Text(f"{cfg['task']} · {cfg['sender']} → {cfg['receiver']} · n={cfg['test_items']}"))
    for column in ("method", primary, "95% CI", *others, "layers", "KV bytes/item", "time s"):
        table.add_column(Text(column), justify="left" if column in ("method", "layers") else "right",
                         overflow="fold")
    for run in report.runs:
        score = run.scores[primary]
        layers = "-" if run.layers is None else f"{len(run.layers)}/{cfg['num_layers']}"
        cells = [run.label, f"{score.mean:.3f}", f"{score.ci95[0]:.2f}–{score.ci95[1]:.2f}",
                 *(f"{run.scores[m].mean:.3f}" for m in others),
                 layers, f"{run.kv_bytes_mean:,.0f}", f"{run.seconds + run.sender_seconds:.1f}"]
        table.add_row(*(Text(cell) for cell in cells))
    (console or Console(width=None if sys.stdout.isatty() else 140)).print(table)
