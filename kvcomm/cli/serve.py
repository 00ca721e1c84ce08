"""``kvcomm serve`` (run an agent) and ``kvcomm remote …`` (drive one)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcomm.cli.common import (
    CODEC_HELP,
    Dtype,
    LinearOption,
    Mode,
    Model,
    Overwrite,
    Selection,
    check_output,
    console,
    fraction,
)
from kvcomm.cli.group import KvcommGroup
from kvcomm.errors import ConfigError
from kvcomm.models import DEFAULT_MODEL
from kvcomm.wire import MessageReader

remote = typer.Typer(cls=KvcommGroup, help="Drive a running agent (`kvcomm serve`) over HTTP.", no_args_is_help=True)
Url = Annotated[str, typer.Option(envvar="KVCOMM_URL", help="Agent base URL.")]
Token = Annotated[str | None, typer.Option(envvar="KVCOMM_TOKEN", help="Bearer token.")]
Timeout = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the agent's answer (a first --ratio "
                                                      "context calibrates, minutes on a CPU); connecting waits at "
                                                      "most 10.")]


Ratio = Annotated[float | None, typer.Option(parser=fraction, metavar="RATIO",
                                             help="Share the top fraction of the layer ranking (0 < RATIO <= 1).")]
ProfileFile = Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                  help="Layer ranking from `kvcomm calibrate`, or the results of "
                                                       "`kvcomm eval`/`sweep` (their ranking).")]


def serve_command(
    model: Model = DEFAULT_MODEL, dtype: Dtype = "float32", linear: LinearOption = "dense",
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port to listen on (default: 8000).")] = None,
    fd: Annotated[int | None, typer.Option(
        min=0, help="Serve on this inherited socket, already bound and listening (a file descriptor), instead of "
                    "binding --host and --port: a launcher that holds the port from the start "
                    "(kvcomm.serve.launch.spawn) hands it over so.")] = None,
    store: Annotated[str, typer.Option(envvar="KVCOMM_STORE",
                                       help="memory, disk:/path (survives restarts) or redis://host:port/db.")]
    = "memory",
    store_mb: Annotated[int, typer.Option(min=1, help="Memory store bound (MB), least recently used evicted.")]
    = 1024,
    disk_mb: Annotated[int, typer.Option(min=1, help="Disk store bound (MB), least recently used evicted.")]
    = 10240,
    ttl: Annotated[float | None, typer.Option(min=1, help="Seconds a stored message lives (memory, disk, redis).")]
    = None,
    token: Token = None,
    public_docs: Annotated[bool, typer.Option(help="Serve /metrics, /docs and /openapi.json without the token.")]
    = False,
    served_model_name: Annotated[list[str] | None, typer.Option(
        help="Name(s) clients use in `model` (repeatable), as vLLM's --served-model-name.")] = None,
    codec: Annotated[str, typer.Option(help=f"Default codec of stored messages. {CODEC_HELP}")] = "int8",
    ratio: Ratio = None,
    profile: Annotated[list[Path] | None, typer.Option(
        exists=True, dir_okay=False,
        help="Layer ranking from `kvcomm calibrate` (or a results file's), for contexts; repeat it with one made "
             "by `kvcomm calibrate --pieces passages` for passages (each file says its layout).")] = None,
    selection: Selection = None,
    mode: Mode = None,
    max_request_mb: Annotated[int, typer.Option(min=1, help="Largest request body (MB).")] = 64,
    max_decoded_mb: Annotated[int, typer.Option(min=1, help="Most MB the KV of one request may decode to.")]
    = 2048,
    max_decoded_total_mb: Annotated[int | None, typer.Option(
        min=1, help="Most MB the KV of all requests in flight (waiting for the model or answering) may decode to "
                    "together; one more gets 503 and Retry-After. Default: 4 × --max-decoded-mb.")] = None,
    max_kv_messages: Annotated[int, typer.Option(min=1, help="Most KV messages one chat may use.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Largest answer budget a request may ask.")] = 512,
    timeout: Annotated[float, typer.Option(
        min=0.001, help="Per-request deadline (s): waiting for the model, prefill and decoding; an upload's "
                        "whole body.")] = 300.0,
    max_uploads: Annotated[int, typer.Option(min=1, help="Most message uploads (PUT) received at once; one more is "
                                                         "refused (503) until one ends.")] = 8,
    upload_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds an upload may send nothing before it is "
                                                                  "refused (408) and nothing of it stored.")] = 30.0,
) -> None:
    """Run one agent (one model) as an HTTP service with an OpenAI-compatible chat endpoint.

    With --ratio, contexts share the top fraction of layers by the --profile ranking, or by a
    ranking the agent calibrates at start on generated text when no profile is given. Passages have
    a ranking of their own: a --profile made with `kvcomm calibrate --pieces passages`, else one
    calibrated when the first passage is stored at a ratio (about three minutes on SmolLM2-135M with
    the default rule).
    """
    try:
        import uvicorn

        from kvcomm.serve.app import create_app
    except ImportError as err:
        raise ConfigError(f"kvcomm serve needs the service's packages ({err.name} is missing): "
                          "pip install 'kvcomm[serve]'") from None
    from kvcomm.models import load_model, resolve_model
    from kvcomm.selection.blocks import read_ranking
    from kvcomm.serve.config import ServeConfig
    from kvcomm.serve.contexts import by_layout
    from kvcomm.serve.sockets import inherited, listen, url_of
    from kvcomm.serve.stores import StoreLimits, open_store, store_kind

    if fd is not None and (host is not None or port is not None):
        raise ConfigError("--fd serves a socket already bound: give it without --host and --port")
    resolve_model(model)
    store_kind(store)
    given: dict[str, Any] = dict(mode=mode, ratio=ratio, selection=selection)
    config = ServeConfig(token=token, public_docs=public_docs, served_model_names=tuple(served_model_name or ()),
                         max_request_bytes=max_request_mb << 20, max_message_bytes=max_request_mb << 20,
                         max_decoded_bytes=max_decoded_mb << 20, max_kv_messages=max_kv_messages,
                         max_decoded_total_bytes=None if max_decoded_total_mb is None else max_decoded_total_mb << 20,
                         max_new_tokens=max_new_tokens, default_max_tokens=min(256, max_new_tokens),
                         timeout_s=timeout, max_uploads=max_uploads, upload_idle_s=upload_timeout,
                         codec=codec, **{k: v for k, v in given.items() if v is not None})
    loaded = [read_ranking(path) for path in profile or []]
    by_layout(loaded)  # two of one layout: refused before the model loads
    if fd is not None:
        listening = [inherited(fd)]
    else:
        listening = listen("127.0.0.1" if host is None else host, 8000 if port is None else port)
    with contextlib.ExitStack() as held:  # the port is this agent's from now on, while the store opens and the
        for bound in listening:           # model loads
            held.enter_context(bound)
        limits = StoreLimits(memory_bytes=store_mb << 20, disk_bytes=disk_mb << 20, ttl_s=ttl)
        opened = open_store(store, limits)  # before the model loads: a store whose package is missing says so now
        agent = load_model(model, dtype, linear)
        app = create_app(agent, opened, config, loaded)
        if ratio is not None and all(p.pieces != "chats" for p in loaded):
            console.print(f"calibrating the contexts' layer ranking for --ratio {ratio} (once, "
                          f"{config.selection} rule; a --profile calibrated on chats skips this) …")
            app.state.contexts.prepare("chats")
        server = uvicorn.Server(uvicorn.Config(app, log_level=os.environ.get("KVCOMM_LOG_LEVEL", "info")))
        # uvicorn names its address only where it binds it itself
        console.print(f"serving {model} on {', '.join(map(url_of, listening))} (Ctrl+C stops it)", soft_wrap=True)
        server.run(sockets=listening)


def _client(url: str, token: str | None, timeout: float) -> Any:
    from kvcomm.serve.client import Client

    return Client(url, token, timeout)


@remote.command("context")
def remote_context(
    context: Annotated[str, typer.Argument(help="Context text for the agent to read.")],
    url: Url = "http://127.0.0.1:8000", token: Token = None, timeout: Timeout = 300.0,
    codec: Annotated[str | None, typer.Option(help="Codec (agent default if omitted).")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers to share in full, e.g. '0,4,10-14'.")] = None,
    ratio: Ratio = None, profile: ProfileFile = None, mode: Mode = None,
    message_id: Annotated[str | None, typer.Option("--id", help="Store under this id (default: content address).")]
    = None,
    passage: Annotated[bool, typer.Option(help="Store it as a passage: read by a chat at the start of its last user "
                                               "turn, joined with other passages (--blend restores their attention "
                                               "to each other).")] = False,
) -> None:
    """Have an agent prefill a context; prints the stored message's id, size and layers."""
    from kvcomm.selection import parse_layers
    from kvcomm.selection.blocks import read_ranking

    chosen = parse_layers(layers, None) if layers else None
    ranking = None
    if profile:
        read, wanted = read_ranking(profile), "passages" if passage else "chats"
        if read.pieces != wanted:
            raise ConfigError(f"{profile} was calibrated on items read as {read.pieces}: a "
                              f"{'passage' if passage else 'context'} needs a profile calibrated with "
                              f"--pieces {wanted}")
        ranking = read  # sent with its layout: the agent checks it too
    with _client(url, token, timeout) as client:
        print(json.dumps(client.create_context(context, layers=chosen, ratio=ratio, ranking=ranking, codec=codec,
                                               mode=mode, message_id=message_id, passage=passage), indent=1))


@remote.command("chat")
def remote_chat(
    question: Annotated[str, typer.Argument(help="The user's message.")],
    kv: Annotated[list[str] | None, typer.Option(help="Stored KV message id to use (repeatable).")] = None,
    url: Url = "http://127.0.0.1:8000", token: Token = None, timeout: Timeout = 300.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Answer budget.")] = 64,
    blend: Annotated[float | None, typer.Option(min=0, max=1, help="Recompute this fraction of the KV messages' "
                                                                   "tokens where reused KV deviates most (kv_blend).")]
    = None,
) -> None:
    """Ask an agent, optionally on top of KV messages; prints the answer and the usage."""
    with _client(url, token, timeout) as client:
        reply = client.chat([{"role": "user", "content": question}], kv or [], max_tokens,
                            kv_blend=None if blend is None else {"ratio": blend})
    print(reply["choices"][0]["message"]["content"])  # the shape is checked by Client.chat
    console.print(f"usage: {reply.get('usage')}", markup=False, soft_wrap=True)


@remote.command("models")
def remote_models(url: Url = "http://127.0.0.1:8000", token: Token = None, timeout: Timeout = 300.0) -> None:
    """List the model names an agent serves."""
    with _client(url, token, timeout) as client:
        print(json.dumps(client.models(), indent=1))


@remote.command("fetch")
def remote_fetch(message_id: str, out: Path, url: Url = "http://127.0.0.1:8000", token: Token = None,
                 timeout: Timeout = 300.0, overwrite: Overwrite = False) -> None:
    """Download a stored message to a file."""
    from kvcomm.files import atomic_write

    check_output(out, "message", overwrite, "OUT")
    with _client(url, token, timeout) as client:
        data = client.get_message(message_id)
    # a KV message's header, whole (not an error page a proxy sent); its payload is checked where it is read
    # (no decoding, nor this side's limits, here: a klt message needs a codebook this side may lack)
    MessageReader(io.BytesIO(data), max_bytes=max(1, len(data)), max_decoded_bytes=sys.maxsize)
    atomic_write(out, data)
    console.print(f"wrote {out}", markup=False, soft_wrap=True)


@remote.command("push")
def remote_push(message_id: str, path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
                url: Url = "http://127.0.0.1:8000", token: Token = None, timeout: Timeout = 300.0) -> None:
    """Upload a message file under an id (the agent verifies it before storing); a message already
    stored under that id is replaced, as HTTP PUT does."""
    with _client(url, token, timeout) as client:
        print(json.dumps(client.put_message(message_id, path.read_bytes())))
