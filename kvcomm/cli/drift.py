"""``kvcomm drift``: where two models of one shape (a variant pair) diverge, layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from kvcomm.agents import Agents
from kvcomm.cli.common import (
    BatchSize,
    Data,
    Dtype,
    Overwrite,
    Quiet,
    TaskName,
    TaskOptions,
    check_output_and_plot,
    console,
    quiet_libraries,
    task_options_for,
)
from kvcomm.cli.group import command_line
from kvcomm.errors import ConfigError
from kvcomm.eval.drift import measure_drift
from kvcomm.eval.outputs import safe_name
from kvcomm.eval.plot_profiles import plot_drift
from kvcomm.eval.provenance import code_version, utc_now
from kvcomm.models import resolve_model
from kvcomm.tasks import load_task


def drift_command(
    a: Annotated[str, typer.Argument(help="First model (e.g. the sender): embedded, derived, directory, .gguf "
                                     "or hub id.")],
    b: Annotated[str, typer.Argument(help="Second model, of the same shape (e.g. the receiver).")],
    task: TaskName = "facts", data: Data = None, task_option: TaskOptions = None,
    items: Annotated[int | None, typer.Option(
        min=1, help="Contexts compared, from the front of the task. (default: 32, or all of a smaller task)")] = None,
    batch_size: BatchSize = None, dtype: Dtype = "float32", quiet: Quiet = False, overwrite: Overwrite = False,
    out: Annotated[Path | None, typer.Option(
        help="Drift JSON; the plot is written beside it. (default: results/drift-<a>-<b>-<task>.json)")] = None,
) -> None:
    """Per layer, the relative L2 difference of B's keys, values and hidden states from A's on the same contexts."""
    resolve_model(a)
    resolve_model(b)
    the_task = load_task(task, data, **task_options_for(task, task_option or [], [task]))
    if items is not None and items > len(the_task.items):  # given: more than there are is a mistake
        raise ConfigError(f"--items {items}: {the_task.name} has {len(the_task.items)} items (a generated task "
                          "makes more with --task-option items=N)")
    items = items or min(32, len(the_task.items))
    out, plot_path = check_output_and_plot(
        out or Path("results") / f"drift-{safe_name(a)}-{safe_name(b)}-{safe_name(the_task.name)}.json", "drift",
        overwrite)
    with quiet_libraries(quiet):
        agents = Agents.load(a, b, dtype)  # refuses models of different shapes, naming the fields
        drift = measure_drift(agents, the_task, the_task.items[:items], batch_size or 8, progress=not quiet)
    drift.provenance = {"command": command_line(), "date": utc_now(), "code": code_version(), "dtype": dtype}
    drift.save(out, replace=overwrite)  # a file that appeared meanwhile is kept
    plot = plot_drift(drift, plot_path)
    table = Table(title=Text(f"drift of {b} from {a} · {the_task.name} · {drift.items} contexts, "
                             f"{drift.tokens} tokens (sinks left out) · relative L2"))
    for column in ("layer", "keys", "values", "hidden after"):
        table.add_column(column, justify="right")
    for layer, (k, v, h) in enumerate(zip(drift.keys, drift.values, drift.hidden)):
        table.add_row(str(layer), f"{k:.3f}", f"{v:.3f}", f"{h:.3f}")
    console.print(table)
    console.print(f"drift: {out}\nplot: {plot}", markup=False, soft_wrap=True)
