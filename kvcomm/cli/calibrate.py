"""``kvcomm calibrate``: rank layers on held-out items and write a profile JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kvcomm.agents import Agents
from kvcomm.cli.common import (
    DEFAULTS,
    Alpha,
    BatchSize,
    Data,
    Dtype,
    Model,
    Mu,
    Quiet,
    Receiver,
    Sigma,
    TaskName,
    console,
)
from kvcomm.eval import split_items
from kvcomm.selection import calibrate, format_layers, layer_count
from kvcomm.tasks import load_task


def calibrate_command(
    model: Model = DEFAULTS["model"], receiver: Receiver = None, task: TaskName = DEFAULTS["task"],
    data: Data = None,
    calib_size: Annotated[int, typer.Option(help="Calibration items, taken from the end of the task.")] = 1,
    batch_size: BatchSize = DEFAULTS["batch_size"], alpha: Alpha = None, mu: Mu = DEFAULTS["mu"],
    sigma: Sigma = DEFAULTS["sigma"], dtype: Dtype = DEFAULTS["dtype"], quiet: Quiet = False,
    out: Annotated[Path | None, typer.Option(help="Profile JSON (default results/profile-<task>.json).")] = None,
) -> None:
    """Measure per-layer attention importance and save the ranking for `eval --profile`."""
    the_task = load_task(task, data)
    _, items = split_items(the_task.items, len(the_task.items) - calib_size, calib_size)
    agents = Agents.load(model, receiver, dtype)
    profile = calibrate(agents, the_task, items, alpha, mu, sigma, batch_size, progress=not quiet)
    out = out or Path("results") / f"profile-{the_task.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    table = Table(title=f"layer ranking · {the_task.name} · {len(items)} item(s) · alpha={profile.alpha}")
    for column in ("ratio", "layers"):
        table.add_column(column)
    for ratio in (0.3, 0.5, 0.7):
        count = layer_count(ratio, profile.num_layers)
        table.add_row(f"{ratio} ({count})", format_layers(profile.ranking[:count]))
    console.print(table)
    console.print(f"profile: {out}")
