"""``kvcomm encode``, ``kvcomm inspect`` and ``kvcomm answer``: KV messages as files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvcomm.agents import answer, codebook_from_items, encode_context
from kvcomm.cli.common import DEFAULTS, Dtype, Mode, Model, console
from kvcomm.errors import ConfigError
from kvcomm.models import load_model
from kvcomm.selection import Profile, format_layers, parse_layers, top_layers
from kvcomm.tasks import load_task
from kvcomm.wire import KVMessage, MessageReader, codebook_dir

Codec = Annotated[str, typer.Option(help="fp32, fp16, bf16, int8, int4, int2, int4-ans, int2-ans, klt, klt-coarse, "
                                         "cachegen or zstd.")]


def encode_command(
    out: Annotated[Path, typer.Argument(help="Message file to write.")],
    context: Annotated[str | None, typer.Option(help="Context text.")] = None,
    context_file: Annotated[Path | None, typer.Option(help="Read the context from a file.")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers to share in full, e.g. '0,4,10-14'.")] = None,
    ratio: Annotated[float | None, typer.Option(help="Share the top fraction of a --profile's ranking.")] = None,
    profile: Annotated[Path | None, typer.Option(help="Profile from `kvcomm calibrate`.")] = None,
    codec: Codec = "fp16", model: Model = DEFAULTS["model"], mode: Mode = DEFAULTS["mode"],
    dtype: Dtype = DEFAULTS["dtype"],
) -> None:
    """Prefill a context on the sender and write its KV (chosen layers) as a message file."""
    if (context is None) == (context_file is None):
        raise ConfigError("give exactly one of --context or --context-file")
    text = context if context is not None else context_file.read_text(encoding="utf-8")
    sender = load_model(model, dtype)
    if ratio is not None:
        if profile is None:
            raise ConfigError("--ratio needs --profile (layers ranked by `kvcomm calibrate`)")
        chosen = top_layers(Profile.load(profile).ranking, ratio)
    else:
        chosen = parse_layers(layers, sender.num_layers) if layers else None
    size = encode_context(sender, text, chosen, codec, mode).save(out)
    console.print(f"wrote {out}: {size:,} bytes")


def inspect_command(
    path: Annotated[Path, typer.Argument(help="Message file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the header as JSON.")] = False,
) -> None:
    """Show a message's header, layers, sizes, codec and fingerprint (and verify it fully)."""
    with path.open("rb") as f:
        reader = MessageReader(f)
        header = reader.header
        list(reader.layers())  # verifies every checksum and decodes every layer
    if as_json:
        print(json.dumps(header, indent=1))
        return
    layers = header["layers"]
    fp16_all = 2 * 2 * header["heads"] * header["head_dim"] * header["context_len"] * len(layers)
    total = path.stat().st_size
    out = Console()
    out.print(f"[bold]{path}[/bold]: {total:,} bytes, valid; codec {header['codec']['name']} "
              f"{header['codec']['params']}; context {header['context_len']} tokens")
    out.print(f"shared layers: {format_layers([e['index'] for e in layers if e['full']]) or 'none'} "
              f"({sum(e['full'] for e in layers)}/{len(layers)}); {fp16_all / total:.1f}x smaller than "
              f"all layers in fp16 ({fp16_all:,} bytes)")
    table = Table("field", "value", title="fingerprint")
    for key, value in header["fingerprint"].items():
        table.add_row(key, str(value))
    out.print(table)
    sizes = Table("layer", "kind", "tokens", "bytes", title="layers")
    for entry in layers:
        sizes.add_row(str(entry["index"]), "full" if entry["full"] else "sink", str(entry["tokens"]),
                      f"{entry['bytes']:,}")
    out.print(sizes)


def answer_command(
    path: Annotated[Path, typer.Argument(help="Message file from `kvcomm encode`.")],
    question: Annotated[str, typer.Option(help="The question for the receiver.")],
    model: Model = DEFAULTS["model"], dtype: Dtype = DEFAULTS["dtype"],
    max_new_tokens: Annotated[int, typer.Option(help="Answer budget in tokens.")] = 32,
) -> None:
    """Answer a question on the receiver using a message's KV (fingerprint checked first)."""
    print(answer(load_model(model, dtype), KVMessage.load(path), question, max_new_tokens))


def codebook_command(
    model: Model = DEFAULTS["model"], dtype: Dtype = DEFAULTS["dtype"],
    task: Annotated[str, typer.Option(help="Task whose contexts calibrate the codebook (facts: generated).")] = "facts",
    data: Annotated[Path | None, typer.Option(help="The task's data file (Countries, Tipsheets, JSONL).")] = None,
    items: Annotated[int, typer.Option(help="How many contexts, taken from the end of the task.")] = 32,
) -> None:
    """Build the codebook of the `klt` codec for a model and make it that model's default.

    Receivers decode `klt` messages only with the sender's codebook.
    On another machine, copy the printed file into that machine's codebook folder.
    """
    sender = load_model(model, dtype)
    source = load_task(task, data, items=items, facts_per_item=20) if task == "facts" else load_task(task, data)
    if items < 1 or items > len(source.items):
        raise ConfigError(f"--items must be in 1..{len(source.items)}")
    book = codebook_from_items(sender, source, source.items[-items:], default=True)
    console.print(f"codebook {book.id}: {book.meta['tokens']:,} tokens of {task}; default for {model}\n"
                  f"file: {codebook_dir() / (book.id + '.safetensors')}")
