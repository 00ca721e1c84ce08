"""Attack a running agent as an attacker and an operator would, and count what gets through.

Starts a real redis-server and ``kvcomm serve`` agents (loopback only, temporary folders, all
stopped at the end) and replays, bounded in count and time:

- **crafted**: hostile KV messages with valid checksums (wrong layer counts, huge sizes, bombs,
  wrong types) and header/payload mutations of a valid message, uploaded; every accepted message
  is then used in a chat, which must succeed;
- **requests**: bodies over the limit without a Content-Length, an unauthenticated 40 MB upload,
  too many KV messages, prompts over the model's context, zero budgets, empty and non-Unicode text;
- **event loop**: ``/healthz`` probed every 20 ms while a large upload trickles in, while one chat
  decodes 128 KV messages, and while Redis is paused;
- **schemathesis** against the agent's own OpenAPI (every check but positive-data acceptance,
  which a binary message format and deliberate 400s for OpenAI parameters cannot satisfy);
- **redis**: Redis stopped mid-operation, then restarted: every route must answer 503, then recover;
- **disconnects**: abandoned long generations and streams; the next caller must not wait for them;
- **kill -9**: an agent on a disk store killed during a stream of uploads and restarted: every
  acknowledged message must be there, byte for byte.

Prints one table (inputs, clean errors, accepted inputs, chats over accepted messages that failed,
other exceptions, 5xx, hangs, RSS growth, data lost) and writes JSON.

    python benchmarks/attack.py --model smollm2-135m --out benchmarks/results/attack.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz_decoder import frame, mutate_header, mutate_header_text, mutate_payload, split  # noqa: E402
from record import add_out, check_out, run_record, write_json  # noqa: E402

from kvcomm.wire import KVMessage  # noqa: E402

TOKEN = "attack-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCUMENTED_5XX = {503, 504}
EVENT_LOOP_PHASES = ("upload", "decode128", "redis-paused", "after")  # the probe's labels in phase_event_loop


class StartError(RuntimeError):
    """A process this benchmark starts did not come up (its port taken, or it exited or hung)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A redis-server with an append-only file (acknowledged writes survive a restart)."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        refuse_busy(self.port, "redis-server")
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                         "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
        try:
            wait_port(self.port, self.process, "redis-server", seconds=30)
        except BaseException:  # interrupted too: nothing is left running
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.process, 10)


def listened_on(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def refuse_busy(port: int, what: str) -> None:
    """Stops the run if another program already answers on ``port`` (it would be measured instead)."""
    if listened_on(port):
        raise StartError(f"{what}: port {port} on 127.0.0.1 is in use already (another program answers there)")


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, seconds: float = 120,
              log: Path | None = None) -> None:
    """Returns once ``process`` listens on ``port``; raises at once if it exits, or after ``seconds``
    (it is then stopped). The error holds the end of ``log``, where the process writes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"{what} exited with {process.returncode} before it listened on port {port}"
                               + last_lines(log))
        if listened_on(port):
            if process.poll() is not None:  # what answered was not this process
                raise StartError(f"{what} exited with {process.returncode}; something else answers on port {port}"
                                   + last_lines(log))
            return
        time.sleep(0.1)
    stop_process(process, 10)
    raise StartError(f"{what} did not listen on port {port} within {seconds:g} s (it was stopped)" + last_lines(log))


def last_lines(log: Path | None, count: int = 15) -> str:
    if log is None or not log.is_file():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-count:]
    return ("; its last output:\n" + "\n".join(lines)) if lines else ""


def stop_process(process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGCONT (it may be paused), SIGTERM, and SIGKILL once ``grace_s`` has passed."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Agent:
    """A ``kvcomm serve`` process; its stderr is kept to count tracebacks."""

    def __init__(self, model: str, store: str, log: Path, *extra: str) -> None:
        self.port, self.log, self.model, self.store, self.extra = free_port(), log, model, store, extra
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KVCOMM_LOG_LEVEL": "warning"}
        command = [sys.executable, "-m", "kvcomm", "serve", "-m", self.model, "--port", str(self.port),
                   "--store", self.store, "--token", TOKEN, *self.extra]
        refuse_busy(self.port, "the agent")
        with self.log.open("ab") as log:  # the child keeps its own copy of the file
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_port(self.port, self.process, f"the agent ({self.model})", log=self.log)
        except BaseException:  # interrupted too: nothing is left running
            self.stop()
            raise

    @property
    def running(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, "the agent was not started"
        return self.process

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.running.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def kill9(self) -> None:
        self.running.send_signal(signal.SIGKILL)
        self.running.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.process, 20)


class HealthProbe:
    """``GET /healthz`` every 20 ms in a thread; latencies recorded per phase label."""

    def __init__(self, url: str) -> None:
        self.url, self.phase, self.samples = url, "idle", []  # (phase, seconds, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                phase, began = self.phase, time.monotonic()  # a sample counts for the phase it began in
                try:
                    status = client.get(f"{self.url}/healthz").status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((phase, time.monotonic() - began, status))
                time.sleep(0.02)

    def stats(self, phase: str) -> dict[str, float]:
        times = sorted(s for p, s, _ in self.samples if p == phase)
        if not times:
            return {"n": 0}
        return {"n": len(times), "p50_ms": 1000 * statistics.median(times),
                "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))], "max_ms": 1000 * times[-1],
                "non_200": sum(1 for p, _, st in self.samples if p == phase and st != 200)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def row(phase: str, statuses: Counter[int], tracebacks: int, hangs: int = 0, rss_mb: float | None = None,
        lost: int | None = None, notes: str = "", chats: Counter[int] | None = None) -> dict[str, Any]:
    """One phase's row; ``chats``: the statuses of chats over the messages the phase had accepted
    (a message stored is one the service checked: any of its chats that fails counts, and its 5xx
    beside the phase's own)."""
    five = sum(n for s, n in (statuses + (chats or Counter())).items() if s >= 500 and s not in DOCUMENTED_5XX)
    clean = sum(n for s, n in statuses.items() if 400 <= s < 500 or s in DOCUMENTED_5XX)
    return {"phase": phase, "inputs": sum(statuses.values()), "clean_errors": clean,
            "accepted": sum(n for s, n in statuses.items() if s < 400), "other_exceptions": tracebacks,
            "undocumented_5xx": five, "hangs": hangs, "rss_growth_mb": rss_mb, "data_lost": lost,
            "accepted_chats_failed": None if chats is None else sum(n for s, n in chats.items() if s != 200),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            **({} if chats is None else {"chat_statuses": {str(k): v for k, v in sorted(chats.items())}}),
            "notes": notes}


def post(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response | None:
    try:
        return client.post(path, **kwargs)
    except httpx.TimeoutException:
        return None


# -- phases ------------------------------------------------------------------------------------------

def hostile(valid: bytes) -> dict[str, bytes]:
    """Messages an attacker can make from a valid one: each keeps valid checksums."""
    version, blob, payloads = split(valid)
    base = json.loads(blob)
    fp, layers = base["fingerprint"], base["layers"]

    def edit(**changes: Any) -> bytes:
        return frame(version, json.dumps({**base, **changes}).encode(), payloads)

    many = [{**layers[0], "index": i} for i in range(1000)]
    return {
        "2 layers instead of all": frame(version, json.dumps({**base, "layers": layers[:2]}).encode(), payloads[:2]),
        "1,000 layers": frame(version, json.dumps({**base, "fingerprint": {**fp, "num_layers": 1000},
                                                   "layers": many}).encode(), payloads[:1] * 1000),
        "context_len 10**12": edit(context_len=10**12),
        "sink_position 10**30": edit(sink_position=10**30),
        "context_len 3*10**8": edit(context_len=3 * 10**8),
        "fingerprint not a dict": edit(fingerprint="llama"),
        "meta not a dict": edit(meta=[1, 2]),
        "wrong head size": edit(head_dim=base["head_dim"] * 2),
        "deep JSON": frame(version, b'{"meta":' + b"[" * 50_000 + b"]" * 50_000 + b"}", payloads),
        "4,300-digit integer": frame(version, blob.replace(b'"context_len":', b'"context_len":1' + b"0" * 4300, 1),
                                     payloads),
        "bomb (335 KB claiming GBs)": frame(version, json.dumps({**base, "context_len": 1 << 22, "layers": [
            {**entry, "full": True, "tokens": 1 << 22, "bytes": len(payloads[0])} for entry in layers]}).encode(),
            payloads[:1] * len(layers)),
    }


def phase_crafted(agent: Agent, valid: bytes, mutations: int, rng: random.Random) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    accepted, largest = [], 0
    tb = agent.tracebacks()
    inputs = list(hostile(valid).values())
    mutators = [mutate_header, mutate_header_text, mutate_payload]
    inputs += [rng.choice(mutators)(rng, valid) for _ in range(mutations)]
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=60) as client:
        warm = client.put("/v1/messages/warm-up", content=valid)  # a legitimate upload and chat first,
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Where?"}],
                                                  "max_tokens": 2, "kv_messages": ["warm-up"]})  # so pools are warm
        assert warm.status_code == 200
        rss_before = agent.rss_mb("VmHWM")
        for i, data in enumerate(inputs):
            response = client.put(f"/v1/messages/crafted-{i}", content=data)
            statuses[response.status_code] += 1
            if response.status_code == 200:
                accepted.append(f"crafted-{i}")
                message = KVMessage.from_bytes(data)
                largest = max(largest, sum(8 * layer.keys.numel() for layer in message.layers))
        growth = agent.rss_mb("VmHWM") - rss_before  # peak growth from the uploads themselves
        chats: Counter[int] = Counter()
        for message_id in accepted:
            reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Where?"}],
                                                              "max_tokens": 2, "kv_messages": [message_id]})
            chats[reply.status_code] += 1
    failed = sum(n for s, n in chats.items() if s != 200)
    return row("crafted messages", statuses, agent.tracebacks() - tb, rss_mb=growth, chats=chats,
               notes=f"{len(accepted)} accepted, {failed} of their chats failed; peak RSS grew "
                     f"{growth:.1f} MB during the uploads; the largest accepted message decodes to "
                     f"{largest / 2**20:.1f} MB (limit 2x = {2 * largest / 2**20:.1f} MB)")


def phase_requests(agent: Agent, context_id: str) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    tb, hangs = agent.tracebacks(), 0
    cases: list[tuple[str, dict[str, Any]]] = [
        ("empty messages", {"messages": []}),
        ("max_tokens 0", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        ("n=2", {"messages": [{"role": "user", "content": "hi"}], "n": 2}),
        ("sampling", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.9}),
        ("tool role", {"messages": [{"role": "tool", "content": "42"}]}),
        ("too many kv", {"messages": [{"role": "user", "content": "hi"}], "kv_messages": [context_id] * 200}),
        ("prompt over the context", {"messages": [{"role": "user", "content": "word " * 9000}]}),
        ("unknown model", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}),
    ]
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=60) as client:
        for _, body in cases:
            response = post(client, "/v1/chat/completions", json=body)
            hangs += response is None
            statuses[response.status_code if response else 0] += 1
        raw = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
        statuses[client.post("/v1/chat/completions", content=raw,
                             headers={"content-type": "application/json"}).status_code] += 1
        big = b"x" * (1 << 20)
        statuses[client.put("/v1/messages/chunked", content=iter([big] * 12)).status_code] += 1  # no length
        statuses[client.post("/v1/contexts", json={"context": "word " * 7000, "codec": "fp32"}).status_code] += 1
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as raw_socket:  # 40 MB, no token
        raw_socket.sendall(b"PUT /v1/messages/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"100000\r\n" + b"x" * 0x100000 + b"\r\n")
        answer = raw_socket.recv(64)
    statuses[int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0] += 1
    return row("bounded requests", statuses, agent.tracebacks() - tb, hangs,
               notes=f"unauthenticated 40 MB upload refused after {1000 * (time.monotonic() - began):.0f} ms "
                     "(1 MB sent)")


def phase_event_loop(agent: Agent, redis: Redis, probe: HealthProbe, context_ids: list[str]) -> dict[str, Any]:
    """``/healthz`` latency while the agent works hard on something else."""
    statuses: Counter[int] = Counter()
    tb = agent.tracebacks()
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=300) as client:
        probe.phase = "upload"

        def trickle() -> Any:
            for _ in range(32):
                time.sleep(0.05)
                yield b"y" * (256 << 10)  # 8 MB over ~1.6 s

        statuses[client.put("/v1/messages/trickled", content=trickle()).status_code] += 1
        probe.phase = "decode128"
        refs = [context_ids[i % len(context_ids)] for i in range(128)]
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who?"}],
                                                          "max_tokens": 2, "kv_messages": refs})
        statuses[reply.status_code] += 1
        kv_bytes = reply.json().get("usage", {}).get("kv_bytes_received", 0) if reply.status_code == 200 else 0
        probe.phase = "redis-paused"
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(redis.process.pid, signal.SIGCONT)
        probe.phase = "after"
        time.sleep(1.5)
        probe.phase = "later"  # the other phases' samples are not this phase's
    stats = {phase: probe.stats(phase) for phase in EVENT_LOOP_PHASES}
    hangs = event_loop_hangs(probe.samples)
    notes = "; ".join(f"{p}: p99 {s.get('p99_ms', float('nan')):.0f} ms (n={s['n']})" for p, s in stats.items())
    result = row("event loop (/healthz)", statuses, agent.tracebacks() - tb, hangs,
                 notes=f"{notes}; the 128-message chat used {kv_bytes / 2**20:.0f} MB of KV")
    result["healthz"] = stats
    return result


def event_loop_hangs(samples: list[tuple[str, float, int]], seconds: float = 2.0) -> int:
    """The ``/healthz`` probes of the event-loop phases (:data:`EVENT_LOOP_PHASES`) that took over
    ``seconds``; the probes of the other phases, which run throughout, are not theirs to count."""
    return sum(1 for phase, took, _ in samples if phase in EVENT_LOOP_PHASES and took > seconds)


def phase_schemathesis(agent: Agent, examples: int, folder: Path) -> dict[str, Any]:
    tb = agent.tracebacks()
    report = folder / "schemathesis.xml"
    command = ["st", "run", f"{agent.url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
               "-n", str(examples), "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--seed", "1", "-w", "1", "--report", "junit", "--report-junit-path", str(report),
               "--request-timeout", "120", "--max-response-time", "120"]
    done = subprocess.run([schemathesis(), *command[1:]], capture_output=True, text=True, timeout=1800)
    cases = re.search(r"(\d+) generated", done.stdout)
    generated = int(cases.group(1)) if cases else 0
    suites = ElementTree.parse(report).getroot() if report.is_file() else None
    failures = int(suites.attrib.get("failures", 0)) + int(suites.attrib.get("errors", 0)) if suites is not None else -1
    summary = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith(("❌", "⚠️"))]
    result = row("schemathesis", Counter(), agent.tracebacks() - tb,
                 notes=f"{examples} examples per operation, {failures} operations failing a check (junit), exit "
                       f"{done.returncode}; " + "; ".join(summary)[-400:])
    result.update(inputs=generated, clean_errors="-", accepted="-", check_failures=failures)
    return result


def schemathesis() -> str:
    """The schemathesis command (``st``): on the PATH, or beside this Python (a virtual environment
    not activated); raises if neither has it."""
    found = shutil.which("st") or shutil.which("st", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("schemathesis is not installed (pip install schemathesis): its `st` command is on neither "
                         f"the PATH nor beside {sys.executable}")
    return found


def phase_redis(agent: Agent, redis: Redis, valid: bytes) -> dict[str, Any]:
    """Redis stopped mid-operation: every route 503, health degraded; then back: every route works."""
    statuses: Counter[int] = Counter()
    tb = agent.tracebacks()
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=60) as client:
        acknowledged = [f"kept-{i}" for i in range(5)]
        for message_id in acknowledged:
            assert client.put(f"/v1/messages/{message_id}", content=valid).status_code == 200
        redis.stop()
        routes = [("GET", "/v1/messages/kept-0", {}), ("PUT", "/v1/messages/new", {"content": valid}),
                  ("DELETE", "/v1/messages/kept-1", {}), ("POST", "/v1/contexts", {"json": {"context": "x"}}),
                  ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "q"}],
                                                             "kv_messages": ["kept-0"]}})]
        down = [client.request(method, path, **kwargs).status_code for method, path, kwargs in routes]
        statuses.update(down)
        degraded = client.get("/healthz").json()["status"]
        redis.start()
        time.sleep(1.2)
        up = [client.request(method, path, **kwargs).status_code for method, path, kwargs in routes[:2]]
        statuses.update(up)
        healthy = client.get("/healthz").json()["status"]
        lost = sum(client.get(f"/v1/messages/{m}").content != valid for m in acknowledged)
    return row("redis stopped and restarted", statuses, agent.tracebacks() - tb, lost=lost,
               notes=f"while down: {down}, /healthz {degraded!r}; after restart: {up}, /healthz {healthy!r}")


def phase_disconnects(agent: Agent) -> dict[str, Any]:
    """Four abandoned 200-token requests and two abandoned streams; then how long a new caller waits."""
    statuses: Counter[int] = Counter()
    tb = agent.tracebacks()
    long = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "max_tokens": 200}
    for _ in range(4):
        try:
            httpx.post(f"{agent.url}/v1/chat/completions", json=long, headers=AUTH, timeout=0.5)
        except httpx.TimeoutException:
            statuses[499] += 1
    for _ in range(2):
        with httpx.stream("POST", f"{agent.url}/v1/chat/completions", json={**long, "stream": True}, headers=AUTH,
                          timeout=60) as response:
            next(response.iter_lines())  # read one event, then hang up
            statuses[499] += 1
    began = time.monotonic()
    reply = httpx.post(f"{agent.url}/v1/chat/completions", headers=AUTH, timeout=300,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    statuses[reply.status_code] += 1
    waited = time.monotonic() - began
    cancelled = [line for line in httpx.get(f"{agent.url}/metrics", headers=AUTH).text.splitlines()
                 if line.startswith("kvcomm:requests_cancelled_total")]
    return row("abandoned requests", statuses, agent.tracebacks() - tb, hangs=int(waited > 30),
               notes=f"the next caller waited {waited:.2f} s; {'; '.join(cancelled)}")


def phase_kill9(model: str, folder: Path, valid: bytes) -> dict[str, Any]:
    """kill -9 during a stream of uploads to a disk store; every acknowledged message must survive."""
    statuses: Counter[int] = Counter()
    log = folder / "agent-disk.log"
    agent = Agent(model, f"disk:{folder / 'disk-store'}", log)
    acknowledged: list[str] = []
    stop = threading.Event()

    def upload() -> None:
        with httpx.Client(base_url=agent.url, headers=AUTH, timeout=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    response = client.put(f"/v1/messages/w{i}", content=valid)
                except httpx.HTTPError:
                    return
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    acknowledged.append(f"w{i}")
                i += 1

    threads = [threading.Thread(target=upload) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(3.0)
        agent.kill9()
        stop.set()
        for t in threads:
            t.join(timeout=15)
        agent.start()
        with httpx.Client(base_url=agent.url, headers=AUTH, timeout=30) as client:
            lost = sum(client.get(f"/v1/messages/{m}").content != valid for m in acknowledged)
        tracebacks = agent.tracebacks()
    finally:
        stop.set()
        agent.stop()
    return row("kill -9 during uploads", statuses, tracebacks, lost=lost,
               notes=f"{len(acknowledged)} uploads acknowledged before the kill; all re-read after a restart")


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    table = Table(title="attack · " + " · ".join(f"{k} {v}" for k, v in meta.items()))
    for column in ("phase", "inputs", "clean errors", "accepted", "accepted's chats failed", "other exceptions",
                   "5xx (not 503/504)", "hangs", "RSS growth MB", "data lost"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for r in rows:
        failed = r.get("accepted_chats_failed")
        table.add_row(r["phase"], str(r["inputs"]), str(r["clean_errors"]), str(r["accepted"]),
                      "-" if failed is None else str(failed), str(r["other_exceptions"]), str(r["undocumented_5xx"]),
                      str(r["hangs"]),
                      "-" if r["rss_growth_mb"] is None else f"{r['rss_growth_mb']:.0f}",
                      "-" if r["data_lost"] is None else str(r["data_lost"]))
    console = Console(width=170)
    console.print(table)
    for r in rows:
        console.print(f"- {r['phase']}: {r['notes']}", markup=False)


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    write_json(out, {"meta": meta, "rows": rows, **record})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mutations", type=int, default=300, help="mutated messages besides the hand-made ones")
    parser.add_argument("--schemathesis-examples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    add_out(parser)
    args = parser.parse_args()
    check_out(parser, args)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    schemathesis()  # before anything starts: its phase comes after three others
    record = run_record(args)
    meta: dict[str, Any] = {"model": args.model, "seed": args.seed, "mutations": args.mutations}
    folder = Path(tempfile.mkdtemp(prefix="kvcomm-attack-"))
    redis: Redis | None = None
    agent: Agent | None = None
    probe: HealthProbe | None = None
    rows: list[dict[str, Any]] = []
    complete = False
    try:
        redis = Redis(folder)
        agent = Agent(args.model, redis.url, folder / "agent.log", "--max-request-mb", "8", "--max-kv-messages",
                      "128", "--max-decoded-mb", "1024", "--codec", "fp16")
        probe = HealthProbe(agent.url)
        with httpx.Client(base_url=agent.url, headers=AUTH, timeout=120) as client:
            facts = [f"Person {i} lives in city {i}. Their friend lives next door." for i in range(8)]
            ids = [client.post("/v1/contexts", json={"context": text}).json()["id"] for text in facts]
            valid = client.get(f"/v1/messages/{ids[0]}").content
            short = [{"messages": [{"role": "user", "content": f"Note {i}: city {i}."}]} for i in range(8)]
            notes = [client.post("/v1/contexts", json=body).json()["id"] for body in short]  # 128 of them fit
        phases = [lambda: phase_crafted(agent, valid, args.mutations, random.Random(args.seed)),
                  lambda: phase_requests(agent, ids[0]), lambda: phase_event_loop(agent, redis, probe, notes),
                  lambda: phase_schemathesis(agent, args.schemathesis_examples, folder),
                  lambda: phase_redis(agent, redis, valid), lambda: phase_disconnects(agent),
                  lambda: phase_kill9(args.model, folder, valid)]
        for phase in phases:
            rows.append(phase())
            print(f"{rows[-1]['phase']}: {rows[-1]['inputs']} inputs, {rows[-1]['undocumented_5xx']} 5xx, "
                  f"{rows[-1]['other_exceptions']} tracebacks", flush=True)
        complete = True
    except BaseException as err:
        meta.update(complete=False, stopped_by=f"{type(err).__name__}: {err}"[:2000])
        if isinstance(err, StartError):
            raise SystemExit(f"error: {err}") from None
        raise
    finally:
        if probe is not None:
            probe.stop()
        if agent is not None:
            agent.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if not complete and rows:  # the phases that finished are kept, marked as an incomplete run
            write(args.out, meta, rows, record)
            print(f"the run stopped after {len(rows)} of 7 phases; their rows: {args.out} (marked incomplete)",
                  file=sys.stderr)
    report(rows, meta)
    write(args.out, {**meta, "complete": True}, rows, record)


if __name__ == "__main__":
    main()
