"""Sweeps on a local Ray cluster (issue 17): the serial run's results, a dead worker retried,
methods that cannot run apart refused, and the command line."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvcomm import Agents, EvalConfig, build_methods, evaluate
from kvcomm.cli import app
from kvcomm.errors import ClusterError, ConfigError
from kvcomm.eval import Report
from kvcomm.eval.cluster import EXIT_ONCE, Cluster, RayCluster
from kvcomm.graphs.compare import compare, edge_grid
from kvcomm.models import DEFAULT_MODEL, EMBEDDED
from kvcomm.tasks import load_task

runner = CliRunner()
METHODS = ["baseline", "skyline", "kvcomm", "random@0.5", "blend"]


def same_results(serial: Report, remote: Report) -> None:
    """Answers, scores, layers and method details equal; only the times may differ."""
    assert [r.label for r in serial.runs] == [r.label for r in remote.runs]
    for a, b in zip(serial.runs, remote.runs):
        assert [i.model_dump() for i in a.items] == [i.model_dump() for i in b.items], a.label
        assert (a.scores, a.layers, a.kv_bytes_mean, a.details, a.n) == (b.scores, b.layers, b.kv_bytes_mean,
                                                                         b.details, b.n), a.label
    timeless = lambda profile: {key: value for key, value in (profile or {}).items() if key != "cost"}
    assert timeless(serial.profile) == timeless(remote.profile) and serial.profile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Agents, str]:
    from tests.conftest import tiny_loaded

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    loaded = tiny_loaded("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return Agents.load(str(folder)), str(folder)


def run_both(agents: Agents, name: str, threads: int = 1) -> tuple[Report, Report]:
    task = load_task("facts", items=14)
    config = EvalConfig(limit=12, batch_size=3, calib_size=2)
    serial = evaluate(agents, task, build_methods(METHODS, [0.5]), config, progress=False)
    with Cluster(RayCluster(workers=2, threads=threads), name, name, "float32") as cluster:
        remote = evaluate(agents, task, build_methods(METHODS, [0.5]), config, progress=False, cluster=cluster)
    return serial, remote


def test_two_workers_give_the_serial_results(tiny):
    serial, remote = run_both(*tiny, threads=torch.get_num_threads())
    same_results(serial, remote)
    assert "ray" not in serial.environment and "2 workers" in remote.environment["ray"]
    # the workers' own machine, not only the driver's (here the same: one kind, named once)
    assert remote.environment["ray"].endswith(f"workers on {platform.machine()}: {remote.environment['cpu']}; "
                                              f"allocator {remote.environment['allocator']}")
    assert remote.runs[0].n == 12 and remote.runs[-1].details["mean_recomputed_tokens"] > 0


def test_a_graph_on_two_workers_gives_the_serial_replies_and_counts(tiny):
    agents, name = tiny
    task = load_task("relay", items=5, hops=2)
    edges = edge_grid(["kv", "text"], [None, 0.5], ["fp16"], [0.15])
    run = lambda cluster: compare(agents.sender, task, task.items, "chain", 2, edges, batch_size=2,  # noqa: E731
                                  reply_tokens=4, progress=False, cluster=cluster)
    serial = run(None)
    with Cluster(RayCluster(workers=2, threads=torch.get_num_threads()), name, name, "float32") as cluster:
        remote = run(cluster)
    untimed = {"ttft_s", "seconds"}
    for a, b in zip(serial.runs, remote.runs, strict=True):
        assert a.items == b.items and a.scores == b.scores and a.bytes_per_item == b.bytes_per_item, a.label
        assert [s.model_dump(exclude=untimed) for s in a.steps] == [s.model_dump(exclude=untimed) for s in b.steps]


def test_a_dead_worker_is_started_again_and_its_batch_counted_once(tiny, tmp_path, monkeypatch):
    marker = tmp_path / "exited"
    monkeypatch.setenv(EXIT_ONCE, str(marker))  # workers start with it: the first to begin a batch exits
    serial, remote = run_both(*tiny, threads=torch.get_num_threads())
    assert marker.exists()  # a worker did die
    same_results(serial, remote)


def test_a_method_that_learns_from_earlier_batches_is_refused_before_anything_starts(tiny):
    agents, _ = tiny

    class Unreachable:
        def submit(self, *args: object) -> None:
            raise AssertionError("nothing may be sent")

    with pytest.raises(ConfigError, match="online@0.5/8 learns from the batches before"):
        evaluate(agents, load_task("facts", items=6), build_methods(["online"], [0.5]), EvalConfig(limit=4),
                 progress=False, cluster=Unreachable())  # type: ignore[arg-type]
    result = runner.invoke(app, ["sweep", "--methods", "online", "--ratios", "0.5", "--ray", "local"])
    assert result.exit_code == 2 and "cannot run apart on a cluster" in result.output


def test_a_worker_that_cannot_load_the_model_is_reported_before_any_work(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a model folder by its look, which no worker can load
    with pytest.raises(ClusterError, match="a worker could not load"):
        Cluster(RayCluster(workers=1, retries=0), str(broken), str(broken), "float32")


def test_a_mistyped_model_or_dtype_is_refused_here_before_ray_starts(monkeypatch):
    """They were found inside each worker: three retries, a worker's traceback, no nearest name."""
    from kvcomm.errors import ModelError
    from kvcomm.eval import cluster as cluster_module

    def no_ray():
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster_module, "require_ray", no_ray)
    with pytest.raises(ModelError, match="smollm2-135m"):
        Cluster(RayCluster(workers=1), "smollm2-135", "smollm2-135", "float32")
    with pytest.raises(ConfigError, match="unknown dtype 'fp32'"):
        Cluster(RayCluster(workers=1), DEFAULT_MODEL, DEFAULT_MODEL, "fp32")


class _Reached(Exception):
    pass


class _FakeRay:
    """What :class:`Cluster` asks of Ray, recorded: no cluster starts."""

    def __init__(self, cpus: int) -> None:
        self.cpus, self.inits, self.remotes = cpus, [], 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)

    def cluster_resources(self) -> dict:
        return {"CPU": float(self.cpus)}

    def remote(self, **kwargs):
        self.remotes += 1
        raise _Reached  # the workers would be asked for here

    def shutdown(self) -> None:
        pass


def test_a_local_cluster_is_started_here_and_workers_beyond_the_cpus_are_refused(monkeypatch):
    """``local`` starts an instance even where ``RAY_ADDRESS`` names another cluster (Ray reads the
    variable when it is given no address); workers whose threads exceed the cluster's CPUs are
    refused at once (Ray would keep the extra ones waiting for CPUs forever)."""
    import sys

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    fake = _FakeRay(cpus=2)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(ClusterError, match="fewer than the 3 that 3 worker"):
        Cluster(RayCluster(address="auto", workers=3), DEFAULT_MODEL, DEFAULT_MODEL, "float32")
    with pytest.raises(ClusterError, match="fewer than the 4 that 1 worker.* of 4 thread"):
        Cluster(RayCluster(address="auto", threads=4), DEFAULT_MODEL, DEFAULT_MODEL, "float32")
    assert fake.remotes == 0
    with pytest.raises(_Reached):  # 1 worker of 2 threads on 2 CPUs: asked for
        Cluster(RayCluster(address="local", threads=2), DEFAULT_MODEL, DEFAULT_MODEL, "float32")
    assert [i["address"] for i in fake.inits] == ["auto", "auto", "local"]


def test_without_ray_installed_the_error_says_how_to_install_it(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    with pytest.raises(ConfigError, match=r'pip install "kvcomm\[ray\]"'):
        Cluster(RayCluster(workers=1), "smollm2-135m", "smollm2-135m", "float32")
    result = runner.invoke(app, ["sweep", "-m", tiny[1], "--ray", "local"])
    assert result.exit_code == 2 and 'pip install "kvcomm[ray]"' in result.output, result.output


def test_worker_options_without_ray_are_refused():
    result = runner.invoke(app, ["sweep", "--workers", "2"])
    assert result.exit_code == 2 and "--workers and --worker-threads are for --ray" in result.output


def sweep(model: str, folder: Path, *extra: str) -> dict:
    args = ["sweep", "-m", model, "-t", "facts", "--limit", "9", "--batch-size", "3", "--calib-size", "1",
            "--methods", "baseline,kvcomm", "--ratios", "0.5", "--out-dir", str(folder), "-q", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((folder / "facts.json").read_text())


def answers(results: dict) -> list[tuple[str, list[tuple[str, str]], dict]]:
    return [(run["label"], [(i["id"], i["answer"]) for i in run["items"]], run["scores"]) for run in results["runs"]]


def test_the_command_line_runs_on_ray_and_records_every_batch(tiny, tmp_path):
    _, name = tiny
    threads = str(torch.get_num_threads())
    serial = sweep(name, tmp_path / "serial")
    remote = sweep(name, tmp_path / "ray", "--ray", "local", "--workers", "2", "--worker-threads", threads)
    assert answers(serial) == answers(remote)
    assert sorted(p.name for p in (tmp_path / "ray" / "facts.checkpoint").iterdir()) == [
        "batch-00000.json", "batch-00001.json", "batch-00002.json", "run.json"]


def test_the_graph_command_runs_on_ray(tiny, tmp_path):
    _, name = tiny
    args = ["graph", "-m", name, "--agents", "2", "--limit", "4", "--via", "kv", "--blends", "none", "--no-single",
            "--reply-tokens", "4", "--batch-size", "2", "-q"]
    replies = []
    for out, extra in ((tmp_path / "serial.json", []), (tmp_path / "ray.json", ["--ray", "local", "--workers", "2",
                                                                               "--worker-threads",
                                                                               str(torch.get_num_threads())])):
        result = runner.invoke(app, [*args, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        replies.append([item["replies"] for run in json.loads(out.read_text())["runs"] for item in run["items"]])
    assert replies[0] == replies[1] and len(replies[0]) == 4


@pytest.mark.model
@pytest.mark.skipif(not EMBEDDED.get(DEFAULT_MODEL).is_installed(),
                    reason=f"run `kvcomm models install {DEFAULT_MODEL}`")
def test_smollm2_on_two_workers_answers_as_the_serial_run(tmp_path):
    threads = str(torch.get_num_threads())
    serial = sweep(DEFAULT_MODEL, tmp_path / "serial")
    remote = sweep(DEFAULT_MODEL, tmp_path / "ray", "--ray", "local", "--workers", "2", "--worker-threads", threads)
    assert answers(serial) == answers(remote)


class _BackwardsCluster:
    """Stands in for a :class:`Cluster`: runs the batches here and hands them back last first; the
    driver is interrupted while waiting for the first (a slow early batch, then Ctrl-C)."""

    def __init__(self, agents: Agents) -> None:
        self.agents = agents

    def describe(self) -> str:
        return "backwards"

    def check_models(self, weights, dtype, linear) -> None:  # it runs the driver's own models
        pass

    def submit(self, task, job, work, progress, arrived=None):
        results = {index: job.run_batch(self.agents, task, chunk, labels) for index, chunk, labels in work}
        cluster = self

        class Backwards:
            def take(self, index, default=None):
                if index == min(results):
                    for later in sorted(results, reverse=True)[:-1]:
                        if arrived is not None:
                            arrived(later, results[later])
                    raise KeyboardInterrupt
                return results.pop(index, default)

        cluster.pending = Backwards()
        return cluster.pending


def test_batches_that_came_back_before_an_earlier_one_are_recorded_and_not_run_again(tiny, tmp_path, monkeypatch):
    """Batches were recorded only in batch order: interrupted while batch 0 was still out, every
    later batch that had come back was lost and run again."""
    from kvcomm.eval import harness
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    agents, name = tiny
    task = load_task("facts", items=10)
    config = EvalConfig(limit=8, batch_size=2, calib_size=1, bucket=False)
    methods = lambda: build_methods(["baseline", "kvcomm"], [0.5])  # noqa: E731
    identity = run_identity(task, methods(), config.model_dump(mode="json"), name, name, "float32", None)
    serial = evaluate(agents, task, methods(), config, progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity),
                 cluster=_BackwardsCluster(agents))  # type: ignore[arg-type]
    assert len(list((tmp_path / "c").glob("batch-*.json"))) == 3  # batches 3, 2 and 1, as they came
    ran = []
    real = harness._run_one
    monkeypatch.setattr(harness, "_run_one", lambda method, batch: ran.append(batch.items[0].id) or real(method, batch))
    resumed = evaluate(agents, task, methods(), config, progress=False,
                       checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))
    assert set(ran) == {serial.runs[0].items[0].id}  # only batch 0 runs again
    same_results(serial, resumed)


def test_a_cluster_holding_other_models_than_the_run_is_refused(tiny, tmp_path):
    """The workers answered with whatever they held, and the report named the driver's weights."""
    from tests.conftest import tiny_loaded

    agents, name = tiny
    other = tiny_loaded("llama", seed=1)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    task = load_task("facts", items=6)
    with Cluster(RayCluster(workers=1, threads=1), str(tmp_path / "other"), str(tmp_path / "other"),
                 "float32") as cluster:
        with pytest.raises(ClusterError, match="other models than this run's \\(weights"):
            evaluate(agents, task, build_methods(["baseline"]), EvalConfig(limit=4, calib_size=0), progress=False,
                     cluster=cluster)
    with pytest.raises(ClusterError, match="this cluster was closed"):  # was Ray's StopIteration
        evaluate(agents, task, build_methods(["baseline"]), EvalConfig(limit=4, calib_size=0), progress=False,
                 cluster=cluster)


def test_a_workers_error_is_reported_by_its_cause_not_rays_header():
    """Ray's text opens with a coloured ``ray::_Worker.run()`` header, the pid and the actor's repr:
    the first 300 characters, all that was kept, never reached the exception the worker raised."""
    from kvcomm.eval.cluster import ray_cause

    class TaskError(Exception):  # as Ray's RayTaskError: its text, and the worker's exception as ``cause``
        cause = ValueError("batch blew up")

    header = "\x1b[36mray::_Worker.run()\x1b[39m (pid=4242, actor_id=abc, repr=<_Worker object>) " + "^" * 600
    assert ray_cause(TaskError(header)) == "ValueError: batch blew up"
    plain = ray_cause(RuntimeError(header))  # no cause, no traceback: Ray's text, without colour codes
    assert plain.startswith("ray::_Worker.run() (pid=4242") and "\x1b" not in plain and len(plain) == 500
    died = ("The actor died because of an error raised in its creation task, \x1b[36mray::_Worker.__init__()\x1b[39m "
            "(pid=7, repr=<_Worker>)\n  File \"loading.py\", line 10, in load\n    raise OSError(name)\n"
            "OSError: broken is not a model folder\n")  # an ActorDiedError: no cause, the error at the end
    assert ray_cause(RuntimeError(died)) == "OSError: broken is not a model folder"
