"""Starting a ``kvcomm serve`` process and waiting until it answers (examples, benchmarks, scripts).

The process's output (stdout and stderr) is passed on to this process's stderr as it comes; its
last lines are kept for the error that says why it stopped.

The launcher binds the port itself, before anything starts, and hands the listening socket to
``kvcomm serve --fd`` (the child inherits it): a port in use is refused at once, no other program
can take it while the agent imports and loads its model (connections wait in the socket's
backlog), and port 0 gives the agent a free port the system picks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import httpx

from kvcomm.errors import ConfigError
from kvcomm.serve.sockets import listen, url_of

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


@dataclass(frozen=True)
class Spawned:
    """An agent :func:`spawn` started: its process and the base URL it answers on."""

    process: subprocess.Popen[bytes]
    url: str


def spawn(model: str, port: int = 0, options: Sequence[str] = (), timeout_s: float = 300.0) -> Spawned:
    """Starts ``kvcomm serve --model MODEL OPTIONS…`` on loopback ``port`` (0: a free one the system
    picks) and returns once its ``/healthz`` answers (the launcher holds the port from before the
    start, so what answers is the agent).

    Raises:
        ConfigError: ``options`` name an address (``--host``, ``--port``, ``--fd``: the launcher
            chooses it), or the port cannot be bound on 127.0.0.1 (out of range, or another agent
            or program holds it): nothing is started then; the process exits (the error ends with
            its last output); or it does not answer within ``timeout_s`` (it is then stopped:
            SIGTERM, and SIGKILL after :data:`STOP_GRACE_S`).
    """
    if named := [o for o in options if o.split("=", 1)[0] in ("--host", "--port", "--fd")]:
        raise ConfigError(f"the launcher chooses the agent's address: give the port as its argument, not "
                          f"{' '.join(named)} among the options")
    (listening,) = listen("127.0.0.1", port)
    with listening:
        port, url = listening.getsockname()[1], url_of(listening)
        command = [sys.executable, "-m", "kvcomm", "serve", "--model", model, "--fd", str(listening.fileno()),
                   *options]
        process = subprocess.Popen(command, env={**os.environ, "KVCOMM_LOG_LEVEL": "warning"},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(listening.fileno(),))
    # the child holds the socket now: this process's copy is closed, so the port lives as long as the agent
    assert process.stdout is not None
    output = _Output(process.stdout)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
            except httpx.HTTPError:
                if process.poll() is not None:
                    raise _exited(port, process, output) from None
                time.sleep(0.5)
                continue
            return Spawned(process, url)
        raise ConfigError(f"the agent on port {port} did not answer within {timeout_s:g} s (it was stopped)")
    except BaseException:  # not answering, or interrupted: nothing is left running
        if process.poll() is None:
            process.terminate()
            _reap(process, STOP_GRACE_S)
        raise


@contextlib.contextmanager
def agents(model: str, ports: Sequence[int], options: Sequence[str] = ()) -> Iterator[list[str]]:
    """Several agents of ``model`` (one per port, 0 for a free one; the same ``options``), stopped on
    leaving (SIGTERM, and SIGKILL for one still running 30 s later); yields their base URLs."""
    started: list[Spawned] = []
    try:
        for port in ports:
            started.append(spawn(model, port, options))
        yield [agent.url for agent in started]
    finally:
        for agent in started:
            agent.process.terminate()
        for agent in started:
            _reap(agent.process, 30.0)


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
