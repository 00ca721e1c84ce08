"""``kvcomm calibrate``: rank layers (kvcomm) or score recompute blocks (droidspeak) on held-out
items and write a profile JSON (and, for blocks, a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from rich.text import Text

from kvcomm.agents import Agents
from kvcomm.cli.common import (
    Alpha,
    BatchSize,
    CalibrationObjective,
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
    TaskOptions,
    check_output,
    check_output_and_plot,
    console,
    fraction,
    quiet_libraries,
    task_options_for,
)
from kvcomm.cli.group import command_line
from kvcomm.errors import ConfigError
from kvcomm.eval import EvalConfig
from kvcomm.eval.harness import check_calibration, check_prior_given
from kvcomm.eval.outputs import safe_name
from kvcomm.eval.plot_profiles import plot_blocks
from kvcomm.eval.provenance import code_version, data_record, utc_now
from kvcomm.models import DEFAULT_MODEL, resolve_model
from kvcomm.selection import calibrate, format_layers, layer_count
from kvcomm.selection.blocks import DEFAULT_BLOCK_TOLERANCE, DEFAULT_MAX_RECOMPUTE, profile_blocks
from kvcomm.tasks import Task, load_task
from kvcomm.tasks.base import Item, Pieces


def calibrate_command(
    model: Model = DEFAULT_MODEL, receiver: Receiver = None, task: TaskName = "facts", data: Data = None,
    task_option: TaskOptions = None,
    calib_size: Annotated[int | None, typer.Option(
        min=1, help="Calibration items, taken from the end of the task. (default: 8 for prune and answer with the "
                    "auto objective, their default; 4 for them with another objective, for prior and droidspeak; 1 "
                    "for --selection paper; fewer if the task is smaller)")] = None,
    batch_size: BatchSize = None, selection: Selection = None, objective: CalibrationObjective = None,
    alpha: Alpha = None, mu: Mu = None, sigma: Sigma = None,
    tolerance: Annotated[float | None, typer.Option(
        min=0, max=1, help="Also find the budget: the smallest ratio whose score on the calibration items is within "
                           "this of all layers' (e.g. 0.02 = 2 points).")] = None,
    method: Annotated[Literal["kvcomm", "droidspeak"], typer.Option(
        help="kvcomm: rank layers to share (by --selection); droidspeak: score every block of layers the "
             "receiver could recompute from the sender's hidden state.")] = "kvcomm",
    max_recompute: Annotated[float, typer.Option(
        parser=fraction, metavar="FRACTION",
        help="droidspeak: the longest block scored, as a fraction of the layers (the cap; 0 < FRACTION <= 1).")]
    = DEFAULT_MAX_RECOMPUTE,
    block_tolerance: Annotated[float, typer.Option(
        min=0, help="droidspeak: the pick shown is the fewest layers within this many nats per answer token of "
                    "the receiver's own prefill.")] = DEFAULT_BLOCK_TOLERANCE,
    block_objective: Annotated[Literal["own", "gold"], typer.Option(
        help="droidspeak: blocks are scored by the likelihood of the receiver's own answer (from its own prefill: "
             "fidelity, DroidSpeak's criterion) or of the gold answer.")] = "own",
    pieces: Annotated[Pieces, typer.Option(
        help="kvcomm: read each item as the paper's two chats, or as passages (one chat cut in two, the opening "
             "kept at layers not shared), as `--pieces passages` reads in eval and sweep.")] = "chats",
    dtype: Dtype = "float32", quiet: Quiet = False, overwrite: Overwrite = False,
    out: Annotated[Path | None, typer.Option(
        help="Profile JSON. (default: results/profile-<task>.json, blocks-<task>.json for droidspeak)")] = None,
) -> None:
    """Rank layers (or score droidspeak blocks) on held-out items and save the profile for `eval --profile`."""
    resolve_model(model)
    if receiver is not None:
        resolve_model(receiver)
    if method == "droidspeak" and (selection is not None or tolerance is not None or objective is not None
                                   or pieces != "chats" or any(v is not None for v in (alpha, mu, sigma))):
        raise ConfigError("--selection, --objective, --tolerance, --pieces, --alpha, --mu and --sigma rank kvcomm's "
                          "layers; droidspeak takes --max-recompute and --block-tolerance")
    the_task = load_task(task, data, **task_options_for(task, task_option or [], [task]))
    if method == "droidspeak":
        _blocks(model, receiver, the_task, calib_size, batch_size, max_recompute, block_tolerance, block_objective,
                dtype, quiet, overwrite, out)
        return
    given: dict[str, Any] = dict(batch_size=batch_size, alpha=alpha, mu=mu, sigma=sigma, calib_size=calib_size,
                                 selection=selection, objective=objective)
    config = EvalConfig(**{k: v for k, v in given.items() if v is not None})
    check_calibration(config, [], len(the_task.items))  # an objective the rule does not use, before any model
    if any(value is not None for value in (alpha, mu, sigma)):
        check_prior_given(config, [])
    items = _last_items(the_task, config)
    out = check_output(out or Path("results") / f"profile-{safe_name(the_task.name)}.json", "profile", overwrite)
    with quiet_libraries(quiet):
        agents = Agents.load(model, receiver, dtype)
        profile = calibrate(agents, the_task, items, config.alpha, config.mu, config.sigma, config.batch_size,
                            progress=not quiet, rule=config.selection, tolerance=tolerance,
                            objective=config.objective, pieces=pieces)
    profile.details["provenance"] = {"command": command_line(), "date": utc_now(), "code": code_version(),
                                     "dtype": dtype, "data": data_record(the_task)}  # as a results file records
    profile.save(out, replace=overwrite)  # a file that appeared meanwhile is kept
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
        console.print(f"budget: ratio {budget['ratio']:g} ({budget['layers']} of {profile.num_layers} layers) keeps "
                      f"the calibration score within "
                      f"{budget['tolerance']:g} of all layers' ({budget['all_layers']:.3f} on {budget['items']} items)",
                      markup=False)
    console.print(f"profile: {out}", markup=False, soft_wrap=True)


def _last_items(task: Task, config: EvalConfig) -> list[Item]:
    """The task's last items, as many as ``eval`` and ``sweep`` would hold out on this task with
    ``config`` (which leaves them a test item): the profile then serves their runs, whose test items
    it never read (all of a task's items would include theirs, and be refused)."""
    count = config.calibration_count(len(task.items))
    if not 1 <= count <= len(task.items):
        raise ConfigError(f"--calib-size {count}: the task holds {len(task.items)} items; calibrate on 1 to "
                          f"{len(task.items)} of them")
    return list(task.items[len(task.items) - count:])


def _blocks(model: str, receiver: str | None, the_task: Task, calib_size: int | None, batch_size: int | None,
            max_recompute: float, tolerance: float, objective: Literal["own", "gold"], dtype: str, quiet: bool,
            overwrite: bool, out: Path | None) -> None:
    if not 0 < max_recompute <= 1:  # before the models load (profile_blocks says so too, after)
        raise ConfigError(f"--max-recompute is a fraction of the layers in (0, 1], not {max_recompute:g}")
    items = _last_items(the_task, EvalConfig(calib_size=calib_size, objective="likelihood"))  # 4: no objective chosen
    out, plot_path = check_output_and_plot(out or Path("results") / f"blocks-{safe_name(the_task.name)}.json",
                                           "block profile", overwrite)
    with quiet_libraries(quiet):
        agents = Agents.load(model, receiver, dtype)
        profile = profile_blocks(agents, the_task, items, max_recompute, batch_size or EvalConfig().batch_size,
                                 progress=not quiet, objective=objective)
    profile.data = data_record(the_task)
    profile.save(out, replace=overwrite)  # a file that appeared meanwhile is kept
    plot = plot_blocks(profile, plot_path, tolerance)
    picked = profile.pick(tolerance)
    spent = f"{profile.cost['seconds']:.0f} s, {len(profile.blocks)} blocks"
    table = Table(title=Text(f"droidspeak blocks · {profile.sender} → {profile.receiver} · {the_task.name} · "
                             f"{len(items)} item(s) · cap {profile.max_block} of {profile.num_layers} layers "
                             f"({max_recompute:g}) · {spent}"))
    for column in ("layers recomputed", "best block", f"{profile.objective} answer log-lik/token"):
        table.add_column(column, justify="right")
    table.add_row("0 (sender's KV everywhere)", "-", f"{profile.reuse:.3f}")
    for point in profile.curve():
        table.add_row(str(point["layers"]), f"{point['start']}:{point['stop']}", f"{point['loglik']:.3f}")
    table.add_row(f"{profile.num_layers} (receiver's own prefill)", "-", f"{profile.own:.3f}")
    console.print(table)
    verdict = "within" if picked.within_tolerance else "none within; best at the cap, not within"
    console.print(f"pick: block {picked.start}:{picked.stop} ({picked.stop - picked.start} layers, {verdict} "
                  f"{tolerance:g} of the receiver's own {profile.own:.3f})\nprofile: {out}\nplot: {plot}",
                  markup=False, soft_wrap=True)
