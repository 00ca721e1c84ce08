"""Options shared by the CLI commands, and the one function that runs an evaluation from them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvcomm.agents import Agents
from kvcomm.eval import EvalConfig, Report, evaluate, print_table
from kvcomm.methods import Method
from kvcomm.models import DEFAULT_MODEL
from kvcomm.selection import Profile
from kvcomm.tasks import Task

console = Console(stderr=True)

Model = Annotated[str, typer.Option("--model", "-m", envvar="KVCOMM_MODEL",
                                    help="Sender model: embedded name, directory, .gguf file or hub id.")]
Receiver = Annotated[str | None, typer.Option(envvar="KVCOMM_RECEIVER",
                                              help="Receiver model if different (same KV shapes).")]
TaskName = Annotated[str, typer.Option("--task", "-t", envvar="KVCOMM_TASK",
                                       help="countries, tipsheets, jsonl or facts (generated).")]
Data = Annotated[Path | None, typer.Option(envvar="KVCOMM_DATA",
                                           help="Local dataset file (countries/tipsheets/jsonl).")]
Limit = Annotated[int | None, typer.Option(help="Test items (from the front). Default: all but calibration.")]
BatchSize = Annotated[int, typer.Option(envvar="KVCOMM_BATCH_SIZE", help="Items per forward pass.")]
CalibSize = Annotated[int, typer.Option(help="Calibration items, taken from the end, disjoint from test.")]
ProfilePath = Annotated[Path | None, typer.Option("--profile", help="Layer ranking from `kvcomm calibrate`.")]
Alpha = Annotated[float | None, typer.Option(help="Attention weight vs. depth prior (default: 1.0 Llama, 0.8 Qwen).")]
Mu = Annotated[float, typer.Option(help="Prior centre as a fraction of depth.")]
Sigma = Annotated[float, typer.Option(help="Prior width in layers.")]
Mode = Annotated[str, typer.Option(help="Masks: causal (correct), legacy (reference parity), shift-back (KVComm-S).")]
Seed = Annotated[int, typer.Option(help="Seed for random layer selection.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
MaxMemory = Annotated[float | None, typer.Option(envvar="KVCOMM_MAX_MEMORY",
                                                 help="Memory budget in GiB; batches shrink to fit it.")]
Senders = Annotated[int, typer.Option(help="Split each context among this many senders (KV methods).")]
RoundOne = Annotated[int, typer.Option(help="NLD/CIPHER round-1 budget in tokens (or vectors).")]
Fuse = Annotated[str, typer.Option(help="AC fusion: replace, sum or mean.")]
LayerK = Annotated[int | None, typer.Option(help="AC: sender hidden state after this many layers (<0 from the end).")]
LayerJ = Annotated[int | None, typer.Option(help="AC: receiver layer the vector enters before (<0 from the end).")]
Interval = Annotated[int, typer.Option(help="Online calibration: rebuild the ranking every N items.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

DEFAULTS = dict(model=DEFAULT_MODEL, task="facts", batch_size=8, calib_size=1, mu=0.5, sigma=10.0,
                mode="causal", seed=42, dtype="float32")


def run_eval(
    model: str, receiver: str | None, task: Task, methods: list[Method], config: EvalConfig,
    profile: Path | None, dtype: str, quiet: bool, out: Path,
) -> Report:
    """Loads the agents, evaluates, prints the table and writes the results JSON."""
    agents = Agents.load(model, receiver, dtype)
    loaded = Profile.load(profile) if profile else None
    report = evaluate(agents, task, methods, config, loaded, progress=not quiet)
    print_table(report, Console(width=None if console.is_terminal else 140))
    report.save(out)
    console.print(f"results: {out}")
    return report
