"""``kvcomm eval`` (one method) and ``kvcomm sweep`` (methods × ratios, with a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvcomm.cli.common import (
    DEFAULTS,
    Alpha,
    BatchSize,
    CalibSize,
    Data,
    Dtype,
    Fuse,
    Interval,
    LayerJ,
    LayerK,
    Limit,
    MaxMemory,
    Mode,
    Model,
    Mu,
    ProfilePath,
    Quiet,
    Receiver,
    RoundOne,
    Seed,
    Senders,
    Sigma,
    TaskName,
    console,
    run_eval,
)
from kvcomm.eval import EvalConfig, plot_sweep
from kvcomm.methods import build_methods
from kvcomm.models import load_model
from kvcomm.selection import parse_layers
from kvcomm.tasks import load_task


def eval_command(
    method: Annotated[str, typer.Option(
        help="baseline, skyline, kvcomm, random, contiguous, nld, cipher, ac or online.")] = "kvcomm",
    ratio: Annotated[float | None, typer.Option(help="Fraction of layers to share.")] = None,
    layers: Annotated[str | None, typer.Option(help="Explicit layers for kvcomm, e.g. '0,4,10-14'.")] = None,
    codec: Annotated[str | None, typer.Option(help="Send KV through a message with this codec (fp16, int8, "
                                              "int4, klt, cachegen, zstd …); bytes are the message's size. klt "
                                              "builds its codebook from the calibration items: use "
                                              "--calib-size 16 or more.")] = None,
    model: Model = DEFAULTS["model"], receiver: Receiver = None, task: TaskName = DEFAULTS["task"],
    data: Data = None, limit: Limit = None, batch_size: BatchSize = DEFAULTS["batch_size"],
    calib_size: CalibSize = DEFAULTS["calib_size"], profile: ProfilePath = None, alpha: Alpha = None,
    mu: Mu = DEFAULTS["mu"], sigma: Sigma = DEFAULTS["sigma"], mode: Mode = DEFAULTS["mode"],
    seed: Seed = DEFAULTS["seed"], dtype: Dtype = DEFAULTS["dtype"], max_memory: MaxMemory = None,
    senders: Senders = 1, round_one_tokens: RoundOne = 256, ac_fuse: Fuse = "mean", ac_k: LayerK = None,
    ac_j: LayerJ = None, interval: Interval = 8, quiet: Quiet = False,
    out: Annotated[Path | None, typer.Option(help="Results JSON (default results/<task>-<method>.json).")] = None,
) -> None:
    """Evaluate one method on one task and write a results JSON."""
    the_task = load_task(task, data)
    if method in ("kvcomm", "random", "contiguous", "online") and ratio is None and layers is None:
        ratio = 0.5
    explicit = parse_layers(layers, load_model(model, dtype).num_layers) if layers else None
    methods = build_methods([method], [ratio] if ratio is not None else None, explicit, mode, seed,
                            [codec] if codec else None, senders, round_one_tokens, ac_fuse, ac_k, ac_j, interval)
    config = EvalConfig(limit, batch_size, calib_size, alpha, mu, sigma, max_memory)
    out = out or Path("results") / f"{the_task.name}-{methods[0].label}.json"
    run_eval(model, receiver, the_task, methods, config, profile, dtype, quiet, out)


def sweep_command(
    methods: Annotated[str, typer.Option(
        help="Comma-separated methods; 'name@0.5' runs a KV method at that ratio only."
    )] = "baseline,skyline,kvcomm,random@0.5",
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions for KV methods.")] = "0.3,0.5,0.7,1.0",
    codecs: Annotated[str, typer.Option(help="Comma-separated codecs for KV methods; 'none' = in-process "
                                        "(e.g. 'none,int8,klt,cachegen'). klt builds its codebook from the "
                                        "calibration items: use --calib-size 16 or more.")] = "none",
    model: Model = DEFAULTS["model"], receiver: Receiver = None, task: TaskName = DEFAULTS["task"],
    data: Data = None, limit: Limit = None, batch_size: BatchSize = DEFAULTS["batch_size"],
    calib_size: CalibSize = DEFAULTS["calib_size"], profile: ProfilePath = None, alpha: Alpha = None,
    mu: Mu = DEFAULTS["mu"], sigma: Sigma = DEFAULTS["sigma"], mode: Mode = DEFAULTS["mode"],
    seed: Seed = DEFAULTS["seed"], dtype: Dtype = DEFAULTS["dtype"], max_memory: MaxMemory = None,
    senders: Senders = 1, round_one_tokens: RoundOne = 256, ac_fuse: Fuse = "mean", ac_k: LayerK = None,
    ac_j: LayerJ = None, interval: Interval = 8, quiet: Quiet = False,
    out_dir: Annotated[Path, typer.Option(help="Where sweep.json and sweep.png go.")] = Path("results"),
) -> None:
    """Evaluate methods × ratios on one task; write a results JSON and a score-vs-layers plot."""
    the_task = load_task(task, data)
    try:
        fractions = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise typer.BadParameter(f"--ratios must be numbers, got {ratios!r}") from None
    wire = [None if c.strip() == "none" else c.strip() for c in codecs.split(",") if c.strip()]
    built = []
    for token in filter(None, (m.strip() for m in methods.split(","))):
        name, _, only = token.partition("@")
        try:
            chosen = [float(only)] if only else fractions
        except ValueError:
            raise typer.BadParameter(f"bad ratio in {token!r}") from None
        built += build_methods([name], chosen, None, mode, seed, wire, senders, round_one_tokens, ac_fuse, ac_k,
                               ac_j, interval)
    config = EvalConfig(limit, batch_size, calib_size, alpha, mu, sigma, max_memory)
    stem = f"sweep-{the_task.name}-{Path(model).name}"
    report = run_eval(model, receiver, the_task, built, config, profile, dtype, quiet, out_dir / f"{stem}.json")
    console.print(f"plots: {plot_sweep(report, out_dir / f'{stem}.png')}, "
                  f"{plot_sweep(report, out_dir / f'{stem}-bytes.png', x='bytes')}")
