"""Starting a ``kvcomm serve`` process and waiting until it answers (examples, benchmarks, scripts).

The process's output (stdout and stderr) is passed on to this process's stderr as it comes; its
last lines are kept for the error that says why it stopped.

A port is checked before anything starts, and ``kvcomm serve`` binds it as soon as its arguments
are checked, before the model loads (``cli/serve.py``, ``_listen``). Another program can still take
the port in the second or two in between (the new process's imports): the agent then exits with
``cannot listen``, and that exit is the error, unless the other program's /healthz answered before
the agent had exited.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import IO

import httpx

from kvcomm.errors import ConfigError

TAIL_LINES = 20  # of a process's output, in the error when it exits
STOP_GRACE_S = 5.0  # a process asked to stop (SIGTERM) gets this long before it is killed


class _Output:
    """A process's output, passed on to this process's stderr line by line on a thread of its own
    (so that the pipe never fills); the last :data:`TAIL_LINES` lines are kept."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._thread = threading.Thread(target=self._pass_on, args=(stream,), daemon=True, name="kvcomm-agent-output")
        self._thread.start()

    def _pass_on(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace")
                self._lines.append(line.rstrip("\n"))
                with contextlib.suppress(AttributeError, OSError, ValueError):  # no stderr, or closed: keep draining
                    sys.stderr.write(line)
                    sys.stderr.flush()

    def tail(self) -> str:
        """The last lines, once the process's output has ended (a few seconds at most)."""
        self._thread.join(timeout=STOP_GRACE_S)
        return "\n".join(self._lines)


def spawn(model: str, port: int, options: Sequence[str] = (), timeout_s: float = 300.0) -> subprocess.Popen[bytes]:
    """Starts ``kvcomm serve --model MODEL --port PORT OPTIONS…`` on loopback and returns once its
    ``/healthz`` answers and the process still runs.

    Raises:
        ConfigError: something already listens on the port (before anything is started); the
            process exits (the error ends with its last output); or it does not answer within
            ``timeout_s`` (it is then stopped: SIGTERM, and SIGKILL after :data:`STOP_GRACE_S`).
    """
    if _listened_on(port):
        raise ConfigError(f"port {port} on 127.0.0.1 is in use already (another agent or program answers there): "
                          "give the agent a free port")
    command = [sys.executable, "-m", "kvcomm", "serve", "--model", model, "--port", str(port), *options]
    process = subprocess.Popen(command, env={**os.environ, "KVCOMM_LOG_LEVEL": "warning"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = _Output(process.stdout)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            except httpx.HTTPError:
                if process.poll() is not None:
                    raise _exited(port, process, output) from None
                time.sleep(0.5)
                continue
            if process.poll() is not None:  # what answered was not this process
                raise _exited(port, process, output)
            return process
        raise ConfigError(f"the agent on port {port} did not answer within {timeout_s:g} s (it was stopped)")
    except BaseException:  # not answering, or interrupted: nothing is left running
        if process.poll() is None:
            process.terminate()
            _reap(process, STOP_GRACE_S)
        raise


@contextlib.contextmanager
def agents(model: str, ports: Sequence[int], options: Sequence[str] = ()) -> Iterator[list[str]]:
    """Several agents of ``model`` (one per port, the same ``options``), stopped on leaving (SIGTERM,
    and SIGKILL for one still running 30 s later); yields their base URLs."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            started.append(spawn(model, port, options))
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in started:
            process.terminate()
        for process in started:
            _reap(process, 30.0)


def _listened_on(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _reap(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """Waits for a process asked to stop, killing it once ``grace_s`` has passed."""
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _exited(port: int, process: subprocess.Popen[bytes], output: _Output) -> ConfigError:
    tail = output.tail()
    return ConfigError(f"the agent on port {port} exited with {process.returncode}"
                       + (f"; its last output:\n{tail}" if tail else " and wrote nothing"))
