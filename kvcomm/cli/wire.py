"""``kvcomm encode``, ``kvcomm inspect`` and ``kvcomm answer``: KV messages as files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvcomm.agents import answer, encode_context
from kvcomm.cli.common import (
    CODEC_HELP,
    Data,
    Dtype,
    Mode,
    Model,
    Overwrite,
    TaskName,
    check_layers,
    check_output,
    console,
    fraction,
)
from kvcomm.errors import ConfigError, CorruptMessage
from kvcomm.models import DEFAULT_MODEL, load_model, resolve_model
from kvcomm.selection import format_layers, top_layers
from kvcomm.selection.blocks import read_ranking
from kvcomm.selection.calibrate import check_pair
from kvcomm.tasks import load_task
from kvcomm.wire import KVMessage, MessageReader, codebook_dir, make_codec
from kvcomm.wire.bootstrap import codebook_from_items
from kvcomm.wire.codecs import preset_of
from kvcomm.wire.codecs.auto import MAX_BANDWIDTH_MBIT, MIN_BANDWIDTH_MBIT

Codec = Annotated[str, typer.Option(help=CODEC_HELP)]
MessageFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="Message file.")]


def encode_command(
    out: Annotated[Path, typer.Argument(help="Message file to write.")],
    context: Annotated[str | None, typer.Option(help="Context text.")] = None,
    context_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, help="Read the context from a file.")] = None,
    layers: Annotated[str | None, typer.Option(
        help="Layers to share in full, e.g. '0,4,10-14'. (default: every layer, unless --ratio)")] = None,
    ratio: Annotated[float | None, typer.Option(
        parser=fraction, metavar="RATIO", help="Share the top fraction of a --profile's ranking (0 < RATIO <= 1).")]
    = None,
    profile: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="Profile from `kvcomm calibrate`, or results of `kvcomm eval`/`sweep` (their ranking).")] = None,
    codec: Codec = "fp16", model: Model = DEFAULT_MODEL, mode: Mode = None,
    dtype: Dtype = "float32",
    bandwidth: Annotated[float | None, typer.Option(
        min=MIN_BANDWIDTH_MBIT, max=MAX_BANDWIDTH_MBIT,
        help="With --codec auto: the link's bandwidth in Mbit/s the codec is chosen for (default 100).")] = None,
    receiver_compute: Annotated[float | None, typer.Option(
        min=0, max=3600, help="With --codec auto, for a receiver that prefills while the layers arrive: the seconds "
                              "of that prefill, which decoding competes with for the CPU (default 0).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Prefill a context on the sender and write its KV (chosen layers) as a message file."""
    if (context is None) == (context_file is None):
        raise ConfigError("give exactly one of --context or --context-file")
    if ratio is not None and layers is not None:
        raise ConfigError("give --layers or --ratio (with --profile), not both")
    if profile is not None and ratio is None:  # before, every layer was sent and the profile never read
        raise ConfigError("--profile ranks layers for a --ratio: give --ratio with it, or --layers without it")
    told = {"bandwidth_mbit": bandwidth, "receiver_compute_s": receiver_compute}
    for option, value in zip(("--bandwidth", "--receiver-compute"), told.values()):
        if value is not None and make_codec(codec).name != "auto":
            raise ConfigError(f"{option} chooses a codec: it goes with --codec auto, not {codec!r}")
    chosen_codec = make_codec(codec, **{k: v for k, v in told.items() if v is not None})
    depth = resolve_model(model).num_layers
    chosen: list[int] | None = None
    ranked = None
    if ratio is not None:
        if profile is None:
            raise ConfigError("--ratio needs --profile (layers ranked by `kvcomm calibrate`)")
        ranked = read_ranking(profile)
        if ranked.num_layers != depth:
            raise ConfigError(f"{profile} ranks {ranked.num_layers} layers; {model} has {depth}: calibrate it "
                              "(kvcomm calibrate)")
        chosen = top_layers(ranked.ranking, ratio)
    elif layers:
        chosen = check_layers(layers, depth)
    check_output(out, "message", overwrite, "OUT")
    text = context if context is not None else _read_text(context_file)
    sender = load_model(model, dtype)
    if ranked is not None:  # a ranking for other weights under this name is refused, as eval refuses it
        check_pair(ranked, (sender.weights_digest, sender.weights_digest), (model, model))
    size = encode_context(sender, text, chosen, chosen_codec, mode or "causal").save(out)
    choice = MessageReader(io.BytesIO(out.read_bytes())).header.meta.get("codec_choice")
    how = f" ({choice['chosen']}: {choice['reason']})" if choice else ""
    console.print(f"wrote {out}: {size:,} bytes{how}", markup=False, soft_wrap=True)


def _read_text(path: Path | None) -> str:
    assert path is not None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def inspect_command(
    path: MessageFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print the header as JSON.")] = False,
) -> None:
    """Show a message's header, layers, sizes, codec and fingerprint (and verify it fully)."""
    with path.open("rb") as f:
        reader = MessageReader(f)
        header = reader.header.model_dump(mode="json")
        list(reader.layers(whole=True))  # verifies every checksum and decodes every layer
        if f.read(1):  # as KVMessage.load refuses it: bytes after the end
            raise CorruptMessage(f"{path}: trailing bytes after the end of the message")
    if as_json:
        print(json.dumps(header, indent=1))
        return
    layers = header["layers"]
    fp16_all = 2 * 2 * header["heads"] * header["head_dim"] * header["context_len"] * len(layers)
    total = path.stat().st_size
    out = Console()
    named = preset_of(header["codec"]["name"], header["codec"]["params"])
    spec = f"{header['codec']['name']} {header['codec']['params']}"
    out.print(f"{path}: {total:,} bytes, valid (format version {reader.version}); codec "
              f"{f'{named} ({spec})' if named else spec}; context {header['context_len']} tokens; mode {header['mode']}"
              + (f"; layers not shared keep an opening of {header['opening']} tokens" if header["opening"] else ""),
              markup=False, soft_wrap=True)
    ratio = f"{fp16_all / total:.1f}x smaller than" if fp16_all >= total else f"{total / fp16_all:.1f}x larger than"
    out.print(f"shared layers: {format_layers([e['index'] for e in layers if e['full']]) or 'none'} "
              f"({sum(e['full'] for e in layers)}/{len(layers)}); {ratio} all layers in fp16 ({fp16_all:,} bytes)",
              markup=False, soft_wrap=True)
    table = Table("field", "value", title="fingerprint")
    for key, value in header["fingerprint"].items():
        table.add_row(Text(key), Text(str(value)))  # the sender's text: never read as markup
    out.print(table)
    sizes = Table("layer", "kind", "tokens", "bytes", title="layers")
    for entry in layers:
        kind = ("full" if entry["full"] else "left out (receiver recomputes)" if entry["tokens"] == 0
                else "opening" if header["opening"] else "sink")
        sizes.add_row(str(entry["index"]), kind, str(entry["tokens"]), f"{entry['bytes']:,}")
    out.print(sizes)
    if header.get("extras"):
        extras = Table("frame", "layer", "tokens", "width", "bytes", title="extra frames")
        for extra in header["extras"]:
            extras.add_row(Text(extra["kind"]), "" if extra.get("layer") is None else str(extra["layer"]),
                           str(extra["tokens"]), "" if extra.get("width") is None else str(extra["width"]),
                           f"{extra['bytes']:,}")
        out.print(extras)


def answer_command(
    path: MessageFile,
    question: Annotated[str, typer.Option(help="The question for the receiver.")],
    model: Annotated[str, typer.Option(
        "--model", "-m", envvar="KVCOMM_MODEL",
        help="The receiver that answers (the message's sender's shape): an embedded name (`kvcomm models list`), a "
             "model directory, a .gguf file or a hub id.")] = DEFAULT_MODEL,
    dtype: Dtype = "float32",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer budget in tokens.")] = 32,
) -> None:
    """Answer a question on the receiver using a message's KV (fingerprint checked first)."""
    resolve_model(model)
    message = KVMessage.load(path)  # a damaged file is refused before the model loads
    print(answer(load_model(model, dtype), message, question, max_new_tokens))


def codebook_command(
    model: Model = DEFAULT_MODEL, dtype: Dtype = "float32", task: TaskName = "facts", data: Data = None,
    items: Annotated[int, typer.Option(min=1, help="How many contexts, taken from the end of the task.")] = 32,
) -> None:
    """Build the codebook of the `klt` codec for a model and make it that model's default.

    Receivers decode `klt` messages only with the sender's codebook.
    On another machine, copy the printed file into that machine's codebook folder.
    """
    resolve_model(model)
    source = load_task(task, data, items=items, facts_per_item=20) if task == "facts" else load_task(task, data)
    if items > len(source.items):
        raise ConfigError(f"--items must be in 1..{len(source.items)}")
    sender = load_model(model, dtype)
    book = codebook_from_items(sender, source, source.items[-items:], default=True)
    console.print(f"codebook {book.id}: {book.meta['tokens']:,} tokens of {task}; default for {model}\n"
                  f"file: {codebook_dir() / (book.id + '.safetensors')}", markup=False, soft_wrap=True)
