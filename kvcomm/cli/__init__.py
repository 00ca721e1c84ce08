"""The ``kvcomm`` command line: with no command it runs a short demo on the default model."""

from __future__ import annotations

from typing import Annotated

import typer

from kvcomm import __version__
from kvcomm.cli import models
from kvcomm.cli.calibrate import calibrate_command
from kvcomm.cli.demo import demo
from kvcomm.cli.drift import drift_command
from kvcomm.cli.evaluate import eval_command, sweep_command
from kvcomm.cli.graph import graph_command
from kvcomm.cli.group import KvcommGroup
from kvcomm.cli.serve import remote, serve_command
from kvcomm.cli.tasks import tasks_command
from kvcomm.cli.wire import answer_command, codebook_command, encode_command, inspect_command

app = typer.Typer(
    cls=KvcommGroup, help="LLM agents that communicate through selected layers of their KV caches (KVComm). "
                          "Without a command: a demo (the embedded default model on a generated task, 2-3 "
                          "minutes on a CPU; results in a new folder under results/).",
    pretty_exceptions_enable=False, add_completion=False,
)
app.command("eval")(eval_command)
app.command("sweep")(sweep_command)
app.command("calibrate")(calibrate_command)
app.command("tasks")(tasks_command)
app.command("drift")(drift_command)
app.command("graph")(graph_command)
app.command("encode")(encode_command)
app.command("inspect")(inspect_command)
app.command("answer")(answer_command)
app.command("codebook")(codebook_command)
app.command("serve")(serve_command)
app.add_typer(remote, name="remote")
app.add_typer(models.app, name="models")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"kvcomm {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Without a command: run the demo (embedded default model, generated task; 2-3 minutes on a CPU)."""
    if ctx.invoked_subcommand is None:
        demo()


def run() -> None:
    """Console entry point (errors are one line and exit code 2: see :mod:`kvcomm.cli.group`)."""
    app()
