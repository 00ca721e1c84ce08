"""``kvcomm eval`` (one method) and ``kvcomm sweep`` (methods × ratios × codecs, with plots), each on
one task or several; where their files go and how a run resumes: :mod:`kvcomm.cli.runner`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated

import typer

from kvcomm.cli.common import (
    CODEC_HELP,
    METHOD_HELP,
    RayAddress,
    RunOptions,
    Workers,
    WorkerThreads,
    check_layers,
    check_output,
    ray_cluster,
    run_options,
)
from kvcomm.cli.runner import run_tasks
from kvcomm.errors import ConfigError
from kvcomm.methods import METHODS, base_name, build_methods
from kvcomm.methods.base import check_depths
from kvcomm.methods.kvcomm import DEFAULT_RATIO, DEFAULT_RATIOS
from kvcomm.protocol import MASK_MODES


@run_options
def eval_command(
    run: RunOptions,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "kvcomm",
    ratio: Annotated[float | None, typer.Option(
        min=0, max=1, help="Fraction of layers to share, above 0 (blend: of context tokens to recompute, 0 = "
                           "full reuse where layers 0 and 1 are shared). (default: "
                           f"{DEFAULT_RATIO} for methods that share KV; blend's own 0.15)")]
    = None,
    layers: Annotated[str | None, typer.Option(help="Explicit layers for kvcomm, e.g. '0,4,10-14'.")] = None,
    codec: Annotated[str | None, typer.Option(
        help=f"Send KV through a message with this codec; bytes are the message's size. {CODEC_HELP} "
             "klt builds its codebook from the calibration items (use --calib-size 16 or more); with "
             "--calib-size 0 it takes the model's default codebook (`kvcomm codebook`), built from generated "
             "text on first use where there is none.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Results JSON of a one-task run; the samples file and checkpoint go beside it. "
             "(default: <task>.json in the run folder, see --out-dir)")] = None,
    ray: RayAddress = None, workers: Workers = None, worker_threads: WorkerThreads = 1,
) -> None:
    """Evaluate one method on one or more tasks; write a results JSON and a samples file per task."""
    depth = run.check_models()
    explicit = check_layers(layers, depth) if layers else None
    if METHODS.get(method).takes_layer_ratio() and ratio is None and explicit is None:
        ratio = DEFAULT_RATIO
    build = lambda: build_methods(
        [method], [ratio] if ratio is not None else None, [codec] if codec else None,
        layers=tuple(explicit) if explicit else None, **run.method_options())
    check_depths(build(), depth)
    run_tasks(run, build, check_output(out) if out is not None else None, ray=ray_cluster(ray, workers, worker_threads))


@run_options
def sweep_command(
    run: RunOptions,
    methods: Annotated[str, typer.Option(
        help="Comma-separated methods; 'name@0.5' runs a method that shares KV at that ratio only; "
             f"'kvcomm~paper' ranks its layers by another rule than --selection's. {METHOD_HELP}"
    )] = "baseline,skyline,kvcomm,random@0.5",
    ratios: Annotated[str | None, typer.Option(
        help="Comma-separated fractions for methods that share KV (blend: of context tokens to recompute). "
             f"(default: {','.join(map(str, DEFAULT_RATIOS))} for the methods that share layers; blend's own 0.15)")]
    = None,
    codecs: Annotated[str, typer.Option(help=f"Comma-separated codecs for methods that share KV; 'none' = in "
                                        f"process. {CODEC_HELP} klt builds its codebook from the calibration "
                                        "items (use --calib-size 16 or more; with 0, the model's default "
                                        "codebook).")] = "none",
    modes: Annotated[str | None, typer.Option(
        help=f"Comma-separated mask modes for methods that share KV, one configuration each "
             f"({', '.join(MASK_MODES)}); instead of --mode.")] = None,
    ray: RayAddress = None, workers: Workers = None, worker_threads: WorkerThreads = 1,
) -> None:
    """Evaluate methods × ratios × codecs on one or more tasks.

    Per task: a results JSON, a samples file and score plots.
    """
    depth = run.check_models()
    try:
        fractions = [float(r) for r in ratios.split(",") if r.strip()] if ratios is not None else None
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    wire = [None if c.strip() == "none" else c.strip() for c in codecs.split(",") if c.strip()]
    tokens = [m.strip() for m in methods.split(",") if m.strip()]
    defaulted = fractions is None and any("@" not in t and METHODS.get(base_name(t)).takes_layer_ratio()
                                          for t in tokens)
    if defaulted:
        fractions = list(DEFAULT_RATIOS)  # the default applies to the methods whose ratio is of layers
    masks = [m.strip() for m in modes.split(",") if m.strip()] if modes is not None else None
    for mask in masks or []:
        if mask not in MASK_MODES:
            close = difflib.get_close_matches(mask, MASK_MODES, n=1)
            raise ConfigError(f"--modes: unknown mask mode {mask!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
                              f"Valid: {', '.join(MASK_MODES)}")
    build = lambda: build_methods(tokens, fractions, wire, masks, layer_ratios_only=defaulted,
                                  **run.method_options())
    check_depths(build(), depth)
    run_tasks(run, build, plots=True, ray=ray_cluster(ray, workers, worker_threads))
