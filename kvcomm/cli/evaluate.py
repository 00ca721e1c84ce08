"""``kvcomm eval`` (one method) and ``kvcomm sweep`` (methods × ratios × codecs, with plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvcomm.agents import Agents
from kvcomm.cli.common import CODEC_HELP, METHOD_HELP, RunOptions, check_layers, check_output, console, run_options
from kvcomm.errors import ConfigError
from kvcomm.eval import Report, evaluate, plot_sweep, print_table, split_items
from kvcomm.methods import METHODS, Method, build_methods
from kvcomm.methods.kvcomm import DEFAULT_RATIO, DEFAULT_RATIOS
from kvcomm.selection import Profile


def run_eval(run: RunOptions, methods: list[Method], out: Path) -> Report:
    """Loads the agents, evaluates, prints the table and writes the results JSON."""
    task = run.load_task()
    config = run.eval_config()
    split_items(task.items, config.limit, config.calib_size)  # an impossible split fails before loading
    profile = Profile.load(run.profile) if run.profile else None
    agents = Agents.load(run.model, run.receiver, run.dtype)
    report = evaluate(agents, task, methods, config, profile, progress=not run.quiet)
    print_table(report, Console(width=None if console.is_terminal else 140))
    report.save(out)
    console.print(f"results: {out}", markup=False)
    return report


@run_options
def eval_command(
    run: RunOptions,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "kvcomm",
    ratio: Annotated[float | None, typer.Option(
        min=0, max=1, help=f"Fraction of layers to share. (default: {DEFAULT_RATIO} for methods that share KV)")]
    = None,
    layers: Annotated[str | None, typer.Option(help="Explicit layers for kvcomm, e.g. '0,4,10-14'.")] = None,
    codec: Annotated[str | None, typer.Option(
        help=f"Send KV through a message with this codec; bytes are the message's size. {CODEC_HELP} "
             "klt builds its codebook from the calibration items: use --calib-size 16 or more.")] = None,
    out: Annotated[Path | None, typer.Option(help="Results JSON. (default: results/<task>-<method>.json)")] = None,
) -> None:
    """Evaluate one method on one task and write a results JSON."""
    depth = run.check_models()
    explicit = check_layers(layers, depth) if layers else None
    takes_ratio = "ratio" in METHODS.get(method).option_names()
    if takes_ratio and ratio is None and explicit is None:
        ratio = DEFAULT_RATIO
    methods = build_methods([method], [ratio] if ratio is not None else None, [codec] if codec else None,
                            layers=tuple(explicit) if explicit else None, **run.method_options())
    run.eval_config()
    task = run.load_task()
    out = check_output(out or Path("results") / f"{task.name}-{methods[0].label}.json")
    run_eval(run, methods, out)


@run_options
def sweep_command(
    run: RunOptions,
    methods: Annotated[str, typer.Option(
        help=f"Comma-separated methods; 'name@0.5' runs a method that shares KV at that ratio only. {METHOD_HELP}"
    )] = "baseline,skyline,kvcomm,random@0.5",
    ratios: Annotated[str | None, typer.Option(
        help=f"Comma-separated fractions for methods that share KV. (default: {','.join(map(str, DEFAULT_RATIOS))})")]
    = None,
    codecs: Annotated[str, typer.Option(help=f"Comma-separated codecs for methods that share KV; 'none' = in "
                                        f"process. {CODEC_HELP} klt builds its codebook from the calibration "
                                        "items: use --calib-size 16 or more.")] = "none",
    out_dir: Annotated[Path, typer.Option(file_okay=False, help="Where the sweep's JSON and plots go.")]
    = Path("results"),
) -> None:
    """Evaluate methods × ratios × codecs on one task; write a results JSON and score plots."""
    run.check_models()
    try:
        fractions = [float(r) for r in ratios.split(",") if r.strip()] if ratios is not None else None
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    wire = [None if c.strip() == "none" else c.strip() for c in codecs.split(",") if c.strip()]
    tokens = [m.strip() for m in methods.split(",") if m.strip()]
    if fractions is None and any("@" not in t and "ratio" in METHODS.get(t.partition("@")[0]).option_names()
                                 for t in tokens):
        fractions = list(DEFAULT_RATIOS)  # the default applies to the methods that take a ratio
    built = build_methods(tokens, fractions, wire, **run.method_options())
    run.eval_config()
    task = run.load_task()
    stem = f"sweep-{task.name}-{Path(run.model).name}"
    report = run_eval(run, built, check_output(out_dir / f"{stem}.json"))
    console.print(f"plots: {plot_sweep(report, out_dir / f'{stem}.png')}, "
                  f"{plot_sweep(report, out_dir / f'{stem}-bytes.png', x='bytes')}", markup=False)
