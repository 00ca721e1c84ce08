"""The ``kvcomm`` command line: with no command it runs a short demo on the default model."""

from __future__ import annotations

import typer

from kvcomm.cli import models
from kvcomm.cli.calibrate import calibrate_command
from kvcomm.cli.demo import demo
from kvcomm.cli.evaluate import eval_command, sweep_command
from kvcomm.cli.serve import remote, serve_command
from kvcomm.cli.wire import answer_command, codebook_command, encode_command, inspect_command
from kvcomm.errors import KvcommError

app = typer.Typer(
    help="LLM agents that communicate through selected layers of their KV caches (KVComm).",
    pretty_exceptions_enable=False, add_completion=False,
)
app.command("eval")(eval_command)
app.command("sweep")(sweep_command)
app.command("calibrate")(calibrate_command)
app.command("encode")(encode_command)
app.command("inspect")(inspect_command)
app.command("answer")(answer_command)
app.command("codebook")(codebook_command)
app.command("serve")(serve_command)
app.add_typer(remote, name="remote")
app.add_typer(models.app, name="models")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """Without a command: run the demo (embedded default model, generated task, < 2 minutes)."""
    if ctx.invoked_subcommand is None:
        demo()


def run() -> None:
    """Console entry point: kvcomm errors become one red line and exit code 2, not a traceback."""
    try:
        app()
    except KvcommError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise SystemExit(2) from None
