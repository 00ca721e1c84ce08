"""``kvcomm serve`` (run an agent) and ``kvcomm remote …`` (drive one)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from kvcomm.cli.common import CODEC_HELP, Dtype, Model, console
from kvcomm.errors import ConfigError
from kvcomm.models import DEFAULT_MODEL

remote = typer.Typer(help="Drive a running agent (`kvcomm serve`) over HTTP.", no_args_is_help=True)
Url = Annotated[str, typer.Option(envvar="KVCOMM_URL", help="Agent base URL.")]
Token = Annotated[str | None, typer.Option(envvar="KVCOMM_TOKEN", help="Bearer token.")]


def serve_command(
    model: Model = DEFAULT_MODEL, dtype: Dtype = "float32",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    store: Annotated[str, typer.Option(envvar="KVCOMM_STORE",
                                       help="memory, disk:/path (survives restarts) or redis://host:port/db.")]
    = "memory",
    store_mb: Annotated[int, typer.Option(min=1, help="In-memory store bound (MB), least recently used evicted.")]
    = 1024,
    token: Token = None,
    codec: Annotated[str, typer.Option(help=f"Default codec of stored messages. {CODEC_HELP}")] = "int8",
    max_request_mb: Annotated[int, typer.Option(min=1, help="Largest request body (MB).")] = 64,
    timeout: Annotated[float, typer.Option(min=0.001, help="Per-request deadline (s).")] = 300.0,
) -> None:
    """Run one agent (one model) as an HTTP service with an OpenAI-compatible chat endpoint."""
    import uvicorn

    from kvcomm.models import load_model, resolve_model
    from kvcomm.serve.app import ServeConfig, create_app
    from kvcomm.serve.store import open_store, store_kind
    from kvcomm.wire import make_codec

    resolve_model(model)
    store_kind(store)
    make_codec(codec)
    config = ServeConfig(token=token, max_request_bytes=max_request_mb << 20, max_message_bytes=max_request_mb << 20,
                         timeout_s=timeout, codec=codec)
    _check_port_free(host, port)
    app = create_app(load_model(model, dtype), open_store(store, store_mb << 20), config)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("KVCOMM_LOG_LEVEL", "info"))


def _check_port_free(host: str, port: int) -> None:
    """Refuses a port another process listens on, before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}: {err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err} (is another agent there?)") \
                from None


def _client(url: str, token: str | None):
    from kvcomm.serve.client import Client

    return Client(url, token)


@remote.command("context")
def remote_context(
    context: Annotated[str, typer.Argument(help="Context text for the agent to read.")],
    url: Url = "http://127.0.0.1:8000", token: Token = None,
    codec: Annotated[str | None, typer.Option(help="Codec (agent default if omitted).")] = None,
) -> None:
    """Have an agent prefill a context; prints the stored message's id and size."""
    with _client(url, token) as client:
        print(json.dumps(client.create_context(context, codec=codec), indent=1))


@remote.command("chat")
def remote_chat(
    question: Annotated[str, typer.Argument(help="The user's message.")],
    kv: Annotated[list[str] | None, typer.Option(help="Stored KV message id to use (repeatable).")] = None,
    url: Url = "http://127.0.0.1:8000", token: Token = None,
    max_tokens: Annotated[int, typer.Option(help="Answer budget.")] = 64,
) -> None:
    """Ask an agent, optionally on top of KV messages; prints the answer and the usage."""
    with _client(url, token) as client:
        reply = client.chat([{"role": "user", "content": question}], kv or [], max_tokens)
    print(reply["choices"][0]["message"]["content"])
    console.print(f"usage: {reply['usage']}")


@remote.command("fetch")
def remote_fetch(message_id: str, out: Path, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """Download a stored message to a file."""
    with _client(url, token) as client:
        out.write_bytes(client.get_message(message_id))
    console.print(f"wrote {out}")


@remote.command("push")
def remote_push(message_id: str, path: Path, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """Upload a message file under an id (the agent verifies it before storing)."""
    with _client(url, token) as client:
        print(json.dumps(client.put_message(message_id, path.read_bytes())))
