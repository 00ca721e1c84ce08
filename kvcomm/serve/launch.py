"""Starting a ``kvcomm serve`` process and waiting until it answers (examples, benchmarks, scripts)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import httpx

from kvcomm.errors import ConfigError


def spawn(model: str, port: int, options: Sequence[str] = (), timeout_s: float = 300.0) -> subprocess.Popen[bytes]:
    """Starts ``kvcomm serve --model MODEL --port PORT OPTIONS…`` on loopback and returns once its
    ``/healthz`` answers.

    Raises:
        ConfigError: the process exits, or does not answer within ``timeout_s``.
    """
    command = [sys.executable, "-m", "kvcomm", "serve", "--model", model, "--port", str(port), *options]
    process = subprocess.Popen(command, env={**os.environ, "KVCOMM_LOG_LEVEL": "warning"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            if process.poll() is not None:
                raise ConfigError(f"the agent on port {port} exited with {process.returncode}") from None
            time.sleep(0.5)
    process.terminate()
    raise ConfigError(f"the agent on port {port} did not answer within {timeout_s:g} s")


@contextlib.contextmanager
def agents(model: str, ports: Sequence[int], options: Sequence[str] = ()) -> Iterator[list[str]]:
    """Several agents of ``model`` (one per port, the same ``options``), stopped on leaving; yields
    their base URLs."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            started.append(spawn(model, port, options))
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=30)
