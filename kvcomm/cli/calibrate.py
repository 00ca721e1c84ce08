"""``kvcomm calibrate``: rank layers on held-out items and write a profile JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from kvcomm.agents import Agents
from kvcomm.cli.common import (
    Alpha,
    BatchSize,
    Data,
    Dtype,
    Model,
    Mu,
    Overwrite,
    Quiet,
    Receiver,
    Selection,
    Sigma,
    TaskName,
    check_output,
    console,
    quiet_libraries,
)
from kvcomm.eval import EvalConfig, split_items
from kvcomm.eval.outputs import safe_name
from kvcomm.models import DEFAULT_MODEL, resolve_model
from kvcomm.selection import calibrate, format_layers, layer_count
from kvcomm.tasks import load_task


def calibrate_command(
    model: Model = DEFAULT_MODEL, receiver: Receiver = None, task: TaskName = "facts", data: Data = None,
    calib_size: Annotated[int, typer.Option(min=1, help="Calibration items, taken from the end of the task.")] = 1,
    batch_size: BatchSize = None, selection: Selection = None, alpha: Alpha = None, mu: Mu = None,
    sigma: Sigma = None,
    tolerance: Annotated[float | None, typer.Option(
        min=0, max=1, help="Also find the budget: the smallest ratio whose score on the calibration items is within "
                           "this of all layers' (e.g. 0.02 = 2 points).")] = None,
    dtype: Dtype = "float32", quiet: Quiet = False, overwrite: Overwrite = False,
    out: Annotated[Path | None, typer.Option(help="Profile JSON. (default: results/profile-<task>.json)")] = None,
) -> None:
    """Rank layers on held-out items (by --selection) and save the profile for `eval --profile`."""
    resolve_model(model)
    if receiver is not None:
        resolve_model(receiver)
    given: dict[str, Any] = dict(batch_size=batch_size, alpha=alpha, mu=mu, sigma=sigma, calib_size=calib_size,
                                 selection=selection)
    config = EvalConfig(**{k: v for k, v in given.items() if v is not None})
    the_task = load_task(task, data)
    _, items = split_items(the_task.items, len(the_task.items) - calib_size, calib_size)
    out = check_output(out or Path("results") / f"profile-{safe_name(the_task.name)}.json", "profile", overwrite)
    with quiet_libraries(quiet):
        agents = Agents.load(model, receiver, dtype)
        profile = calibrate(agents, the_task, items, config.alpha, config.mu, config.sigma, config.batch_size,
                            progress=not quiet, rule=config.selection, tolerance=tolerance)
    profile.save(out)
    cost = profile.cost
    spent = f"{cost.get('seconds', 0):.0f} s, {cost.get('forwards_per_item', 0):.0f} forwards per item"
    table = Table(title=Text(f"layer ranking · rule {profile.rule} · {the_task.name} · {len(items)} item(s) · {spent}"))
    for column in ("ratio", "layers"):
        table.add_column(column)
    for ratio in (0.3, 0.5, 0.7):
        count = layer_count(ratio, profile.num_layers)
        table.add_row(f"{ratio} ({count})", format_layers(profile.ranking[:count]))
    console.print(table)
    if (budget := profile.details.get("budget")) is not None:
        console.print(f"budget: ratio {budget['ratio']:g} keeps the calibration score within "
                      f"{budget['tolerance']:g} of all layers' ({budget['all_layers']:.3f} on {budget['items']} items)",
                      markup=False)
    console.print(f"profile: {out}", markup=False)
