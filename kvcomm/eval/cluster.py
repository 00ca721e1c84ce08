"""Batches of a run on a Ray cluster: one model copy per worker, the serial run's results.

The driver plans the batches and does everything that decides a result once (a sweep calibrates
and sets its methods up, as in a serial run); a :class:`Job` (the set-up methods, or a graph),
the task and each batch's items go to the workers, which load the models once each and run whole
batches. Their work comes back and is taken in batch order (a sweep takes it as recorded work,
as from a checkpoint), so answers, scores, the results JSON and the checkpoint are those of the
serial run; only the times differ.

Ray starts its workers at nice 15, so that they yield to its own daemons; a local instance
started here runs them at 0 instead: they do the run's work, and at 15 they lose the cores to
anything else on the machine (measured here: a worker's matrix products 11× slower beside one
other busy process). On a cluster of your own, start Ray with ``RAY_worker_niceness=0``.

A worker that dies is started again (its models reloaded) and its batch run again: a batch counts
once, when its results arrive. Ray is an optional extra (``pip install "kvcomm[ray]"``).

``KVCOMM_WORKER_EXIT_ONCE=<file>``, in the environment the workers start with, makes the first
worker to begin a batch exit at once, if ``<file>`` does not exist yet (it creates it): the tests,
and anyone checking a deployment, use it to see a dead worker retried.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import Field

from kvcomm.config import Options
from kvcomm.errors import ClusterError, ConfigError
from kvcomm.tasks.base import Item, Task

if TYPE_CHECKING:
    from kvcomm.agents import Agents
    from kvcomm.methods.base import Method

EXIT_ONCE = "KVCOMM_WORKER_EXIT_ONCE"
Work = tuple[int, list[Item], Any]  # a batch's index, its items, what the job needs to know of this batch

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)")  # "OSError: …" in a traceback


def ray_cause(err: BaseException, limit: int = 500) -> str:
    """What went wrong on a worker, in one line: the exception a task raised there (Ray's own text
    opens with a coloured ``ray::_Worker.run()`` header, its pid and the actor's repr, which hid it
    within the first 300 characters), else Ray's message, without colour codes."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:  # an actor that died in its creation (a model it could not load): the traceback's last error line
        lines = _ANSI.sub("", str(err)).splitlines()
        raised = [line.strip() for line in lines if _RAISED.match(line.strip())]
        text = raised[-1] if raised else str(err)
    line = " ".join(_ANSI.sub("", text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


class Job(Protocol):
    """What the workers do with a batch (pickled once per submission, so it holds no model)."""

    def run_batch(self, agents: Agents, task: Task, items: list[Item], extra: Any) -> Any:
        """The batch's results; ``extra`` is the batch's own part of the work."""

    def answers(self, result: Any) -> int:
        """How many answers a result holds (for progress)."""


class RayCluster(Options):
    """Where a run's batches go.

    Attributes:
        address: ``local`` starts a Ray instance on this machine (stopped when the run ends);
            ``auto`` joins the cluster this machine belongs to; ``ray://host:10001`` a remote one.
        workers: how many workers (each loads the models once). Default: the cluster's CPUs
            divided by ``threads``.
        threads: torch threads of each worker, and the CPUs Ray reserves for it.
        retries: how often each worker is started again after it died, over the whole run
            (Ray's ``max_restarts``; the batch it was running runs again each time).
    """

    what = "ray cluster"
    address: str = "local"
    workers: int | None = Field(default=None, ge=1)
    threads: int = Field(default=1, ge=1)
    retries: int = Field(default=2, ge=0)


def require_ray() -> Any:
    """The ``ray`` module; without it, a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError('running on a Ray cluster needs Ray: pip install "kvcomm[ray]"') from None
    return ray


def check_apart(methods: Sequence[Method]) -> None:
    """Refuses methods whose batches cannot run apart (they learn from the batches before)."""
    if sequential := [m.label for m in methods if m.sequential]:
        raise ConfigError(f"{', '.join(sequential)} learns from the batches before, so its batches cannot run "
                          "apart on a cluster; run it without --ray")


class _Worker:
    """One copy of the models on a worker, running whole batches."""

    def __init__(self, sender: str, receiver: str, dtype: str, threads: int, linear: str | None = None) -> None:
        from kvcomm.agents import Agents

        torch.set_num_threads(threads)
        self.agents = Agents.load(sender, receiver, dtype, linear)

    def ready(self) -> tuple[tuple[tuple[str, str], str, str], str]:
        """What this worker holds (the sender's and receiver's weights digests, dtype and linear
        layers), and its machine as results describe it (CPU and allocator: the driver's own
        need not be the workers')."""
        from kvcomm.models.allocator import allocator_state
        from kvcomm.models.native import describe_cpu

        receiver = self.agents.receiver
        machine = f"{platform.machine()}: {describe_cpu()}; allocator {allocator_state()}"
        return (self.agents.weights, receiver.dtype_name, receiver.linear), machine

    def run(self, task: Task, job: Job, index: int, items: list[Item], extra: Any) -> tuple[int, Any]:
        marker = os.environ.get(EXIT_ONCE)
        if marker and not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)
        return index, job.run_batch(self.agents, task, items, extra)


class Cluster:
    """Workers on a Ray cluster, each holding the models ``sender`` and ``receiver`` in ``dtype``.

    Use it as a context manager (or call :meth:`close`): a Ray instance it started is stopped.

    Raises:
        ConfigError: Ray is not installed.
        ClusterError: the cluster cannot be reached, or has too few CPUs for one worker.
    """

    def __init__(
        self, options: RayCluster, sender: str, receiver: str, dtype: str, linear: str | None = None,
    ) -> None:
        from kvcomm.models.source import DTYPES, resolve_model

        for name in (sender, receiver):  # here, with the nearest name, not in every worker's traceback
            if not isinstance(name, str):
                raise ConfigError(f"a cluster's models are named by a string, not {type(name).__name__}")
            resolve_model(name)
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        ray = self._ray = require_ray()
        self.options = options
        self._started = False
        self._actors: list[Any] = []
        if not ray.is_initialized():
            local = options.address == "local"
            cpus = None if not local or options.workers is None else options.workers * options.threads
            try:  # "local", not None: None would join the cluster RAY_ADDRESS or an earlier `ray start` names
                ray.init(address=options.address, num_cpus=cpus, include_dashboard=False,
                         log_to_driver=False, configure_logging=False,
                         _system_config={"worker_niceness": 0} if local else None)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ClusterError(f"cannot reach the Ray cluster {options.address!r}: {err}") from None
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        self.workers = options.workers or cpus // options.threads
        if (wanted := max(self.workers, 1)) * options.threads > cpus:
            self.close()  # more would wait for CPUs forever: Ray schedules an actor only where its CPUs are free
            raise ClusterError(f"the Ray cluster has {cpus} CPUs, fewer than the {wanted * options.threads} that "
                               f"{wanted} worker(s) of {options.threads} thread(s) reserve: ask for fewer --workers "
                               "or --worker-threads")
        actor = ray.remote(num_cpus=options.threads, max_restarts=options.retries,
                           max_task_retries=options.retries)(_Worker)
        self._actors = [actor.remote(sender, receiver, dtype, options.threads, linear) for _ in range(self.workers)]
        try:  # every worker has its models before anything is sent (a worker that cannot load them says so now)
            held = ray.get([a.ready.remote() for a in self._actors])
        except ray.exceptions.RayError as err:
            self.close()
            raise ClusterError(f"a worker could not load {sender}: {ray_cause(err)}") from None
        models = {tuple(holds) for holds, _ in held}
        if len(models) > 1:  # machines whose files under one name differ
            self.close()
            raise ClusterError(f"the workers hold different models under {sender!r}: {sorted(models)}")
        self.holds: tuple[tuple[str, str], str, str] = tuple(held[0][0])
        self.machines: list[str] = sorted({machine for _, machine in held})  # the workers' CPUs, each once

    def _check_open(self) -> None:
        if not self._actors:
            raise ClusterError("this cluster was closed (its workers are gone): make a new Cluster")

    def check_models(self, weights: tuple[str, str], dtype: str, linear: str) -> None:
        """Refuses a run whose models are not the workers': its report and checkpoint would name
        the driver's weights beside the workers' answers.

        Raises:
            ClusterError: naming what differs.
        """
        self._check_open()
        theirs, mine = self.holds, (tuple(weights), dtype, linear)
        names = ("weights", "dtype", "linear layers")
        if differ := [f"{name} {a} against {b}" for name, a, b in zip(names, theirs, mine) if a != b]:
            raise ClusterError(f"the cluster's workers hold other models than this run's ({'; '.join(differ)})")

    def submit(self, task: Task, job: Job, work: list[Work], progress: Callable[[int], object],
               arrived: Callable[[int, Any], object] | None = None) -> Pending:
        """Sends every batch of ``work`` to the workers; ``progress`` hears of the answers as they
        arrive, and ``arrived`` of each batch's index and result (in the order they come back)."""
        from ray.util import ActorPool

        self._check_open()
        pool = ActorPool(self._actors)
        task_ref, job_ref = self._ray.put(task), self._ray.put(job)
        for piece in work:
            pool.submit(lambda actor, batch: actor.run.remote(task_ref, job_ref, *batch), piece)
        return Pending(pool, {index for index, _, _ in work}, progress, job, self._ray, arrived)

    def describe(self) -> str:
        """Where the batches ran, for a report's environment: Ray's version, the workers, the
        address, and the workers' machines (each kind once: the report's ``cpu`` is the driver's)."""
        return (f"ray {self._ray.__version__}, {self.workers} workers x {self.options.threads} thread(s), "
                f"address {self.options.address}; workers on {' | '.join(self.machines)}")

    def close(self) -> None:
        """Stops the workers (their models leave the cluster), and a Ray instance started here."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pending:
    """Batches on their way back from the workers, taken in any order."""

    def __init__(self, pool: Any, indices: set[int], progress: Callable[[int], object], job: Job, ray: Any,
                 arrived: Callable[[int, Any], object] | None = None) -> None:
        self._pool, self._waiting, self._progress, self._job, self._ray = pool, indices, progress, job, ray
        self._arrived: dict[int, Any] = {}
        self._on_arrival = arrived

    def take(self, index: int, default: Any = None) -> Any:
        """Batch ``index``'s result once it has arrived (``default`` if it was not sent).

        Raises:
            ClusterError: its worker failed more often than the retries allow.
        """
        while index in self._waiting and index not in self._arrived:
            try:
                done, result = self._pool.get_next_unordered()
            except self._ray.exceptions.RayError as err:
                raise ClusterError(f"a batch failed on the cluster: {ray_cause(err)}") from None
            self._arrived[done] = result
            self._progress(self._job.answers(result))
            if self._on_arrival is not None:
                self._on_arrival(done, result)
        self._waiting.discard(index)
        return self._arrived.pop(index, default)
