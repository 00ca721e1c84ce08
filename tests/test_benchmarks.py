"""Benchmark scripts' own logic, without a model: what their results files record, the latency
tail's honest name, the event-loop hang count, the fuzz's private codebook folder, the selection
run's own rule, the options refused before any work, and that the model-free ones run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/<name>.py`` as a module; the folder is put at the end of the path (the scripts
    import their neighbours, e.g. ``record``), so that it shadows nothing."""
    monkeypatch.setattr(sys, "path", [*sys.path, str(BENCHMARKS)])
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_record_names_the_command_the_code_and_the_threads(monkeypatch):
    record = script("record", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["benchmarks/ttft.py", "--lengths", "256,1024", "--out", "a b.json"])
    got = record.run_record(argparse.Namespace(lengths="256,1024", out=Path("a b.json"), beside=[Path("x.json")]))
    assert got["provenance"]["command"] == "python benchmarks/ttft.py --lengths 256,1024 --out 'a b.json'"
    assert got["provenance"]["args"] == {"lengths": "256,1024", "out": "a b.json", "beside": ["x.json"]}
    assert got["provenance"]["date"]
    assert {"kvcomm", "torch", "transformers", "python", "torch_threads"} <= set(got["environment"])


def test_a_latency_tail_is_called_p99_only_with_100_samples(monkeypatch):
    ttft = script("ttft", monkeypatch)
    few = ttft.latency_summary([0.1 * i for i in range(1, 65)])
    assert few["requests"] == 64 and "p99_s" not in few and few["max_s"] == pytest.approx(6.4)
    many = ttft.latency_summary([float(i) for i in range(1, 201)])
    assert "max_s" not in many and many["p99_s"] == 198.0 and many["p50_s"] == 100.5


def test_event_loop_hangs_count_only_that_phases_samples(monkeypatch):
    attack = script("attack", monkeypatch)
    samples = [("idle", 5.0, 200), ("later", 3.0, 0), ("upload", 2.5, 200), ("decode128", 0.1, 200),
               ("redis-paused", 2.1, 200), ("after", 1.9, 200)]
    assert attack.event_loop_hangs(samples) == 2


def test_the_fuzz_keeps_its_codebook_in_a_folder_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path / "users"))
    fuzz = script("fuzz_decoder", monkeypatch)  # importing it sets nothing and makes no folder
    assert os.environ["KVCOMM_CODEBOOKS"] == str(tmp_path / "users")
    with fuzz.private_codebooks() as folder:
        assert os.environ["KVCOMM_CODEBOOKS"] == str(folder) and folder.is_dir()
        fuzz.seeds()
        assert list(folder.glob("*.safetensors"))
    assert not folder.exists()
    assert os.environ["KVCOMM_CODEBOOKS"] == str(tmp_path / "users")
    assert not (tmp_path / "users").exists()


def test_all_layers_take_a_compared_rules_ranking(monkeypatch):
    selection = script("selection", monkeypatch)
    args = argparse.Namespace(limit=4, calib_size=1, batch_size=8, objective="likelihood")
    assert selection.run_config(args, ("answer",)).selection == "answer"
    labels = [m.label for m in selection.methods([0.5], 42, ("answer",))]
    assert labels == ["baseline", "skyline", "kvcomm@1", "kvcomm@0.5~answer", "random@0.5"]


@pytest.mark.parametrize(("name", "argv", "message"), [
    ("selection_stability", ["--sizes", "4", "--out", "x.json"], "at least two sizes"),
    ("selection_stability", ["--rules", "paper,nope", "--out", "x.json"], "unknown: ['nope']"),
    ("sweep_throughput", ["--model", "no-such-model", "--out", "x.json"], "not a known model"),
    ("sweep_throughput", ["--task", "no-such-task", "--out", "x.json"], "unknown task"),
    ("item_cost", ["--task", "facts", "--items", "500", "--out", "x.json"], "--items must be between 1 and 99"),
    ("selection", ["--rules", "paper,nope", "--out", "x.json"], "unknown rules ['nope']"),
    ("ttft", ["--lengths", "256,x", "--out", "x.json"], "--lengths must be token counts"),
    ("fuzz_decoder", ["--seconds", "1"], "the following arguments are required: --out"),  # it overwrote a result
    ("selection", ["--budget", "-1", "--out", "x.json"], "--budget: a budget's tolerance"),  # after the whole run
    ("ttft", ["--ratio", "2", "--out", "x.json"], "0 < value <= 1, not 2"),  # layers -15…44, refused late
    ("codecs", ["--repeats", "0", "--out", "x.json"], "must be at least 1, not 0"),  # wrote speeds of 0
    ("selection", ["--report", "x.json", "--budget", "0.1", "--out", "y.json"], "leave --out out"),
    ("decode_release", ["--codecs", "int4-ans,klt", "--out", "x.json"], "klt needs binding to the sender"),
    ("decode_release", ["--codecs", "int4-nope", "--out", "x.json"], "unknown codec 'int4-nope'"),
])
def test_bad_options_are_refused_before_any_work(monkeypatch, capsys, name, argv, message):
    module = script(name, monkeypatch)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_the_droidspeak_plots_beside_the_results_are_replaced_only_with_overwrite(monkeypatch, capsys, tmp_path):
    module = script("droidspeak", monkeypatch)
    plot = tmp_path / "pair-blocks-smollm2-135m-to-tiny.png"
    plot.write_bytes(b"a plot of an earlier run")
    monkeypatch.setattr(sys, "argv", ["benchmarks/droidspeak.py", "--pair", "tiny,smollm2-135m",
                                      "--out", str(tmp_path / "pair.json")])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == 2 and f"{plot} exists: pass --overwrite" in capsys.readouterr().err
    assert plot.read_bytes() == b"a plot of an earlier run"


def test_the_network_results_record_their_run_and_the_layers_sent(monkeypatch, tmp_path):
    """``network.py``'s JSON says which command, code and threads made it and which layers were
    sent (before: the model, ratio, runs and rows alone)."""
    import json

    network, record = script("network", monkeypatch), script("record", monkeypatch)
    args = argparse.Namespace(model="m", ratio=0.5, runs=3, threads=1, out=tmp_path / "n.json")
    rows = [{"rate_mbit": 100.0, "context_tokens": 10, "method": "skyline", "bytes": 40, "ttft_s": 0.2,
             "speedup_vs_skyline": 1.0},
            {"rate_mbit": 100.0, "context_tokens": 10, "method": "kvcomm fp16", "bytes": 400, "ttft_s": 0.1,
             "speedup_vs_skyline": 2.0}]
    network.report(args, rows, {**record.run_record(args), "layers": [1, 2]})
    written = json.loads(args.out.read_text())
    assert written["layers"] == [1, 2] and written["threads"] == 1 and written["rows"] == rows
    assert written["provenance"]["args"]["ratio"] == 0.5 and "torch_threads" in written["environment"]


def test_the_anchor_benchmark_runs(monkeypatch, tmp_path):
    """It called AnchorPool.shareable without the step a later change added: every run crashed."""
    import json

    module = script("anchors", monkeypatch)
    out = tmp_path / "anchors.json"
    monkeypatch.setattr(sys, "argv", ["benchmarks/anchors.py", "--layers", "2", "--heads", "1", "--dim", "8",
                                      "--question", "3", "--closing", "2", "--anchors", "1,2", "--repeats", "1",
                                      "--out", str(out)])
    module.main()
    assert [row["anchors"] for row in json.loads(out.read_text())["rows"]] == [1, 2]


def test_results_files_are_checked_before_any_work_and_written_whole(monkeypatch, tmp_path):
    record = script("record", monkeypatch)
    parser = argparse.ArgumentParser()
    record.add_out(parser)
    out = tmp_path / "r.json"
    out.write_text('{"old": 1}')
    with pytest.raises(SystemExit):  # an existing --out without --overwrite
        record.check_out(parser, parser.parse_args(["--out", str(out)]))
    with pytest.raises(SystemExit):  # a folder, even with --overwrite
        record.check_out(parser, parser.parse_args(["--out", str(tmp_path), "--overwrite"]))
    record.check_out(parser, parser.parse_args(["--out", str(out), "--overwrite"]))
    with pytest.raises(SystemExit):  # under a file: refused before the work (before: the write failed after it)
        record.check_out(parser, parser.parse_args(["--out", str(out / "r.json"), "--overwrite"]))
    with pytest.raises(SystemExit):  # a file written in --out's stead (blend.py's per task) is checked alike
        record.check_out(parser, parser.parse_args(["--out", str(tmp_path / "x.json")]), [out])
    record.check_out(parser, parser.parse_args(["--out", str(tmp_path / "x.json")]), [tmp_path / "x-facts.json"])
    with pytest.raises(TypeError):  # what JSON cannot hold: the old results stay as they were
        record.write_json(out, {"rows": [object()]})
    assert out.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    record.write_json(tmp_path / "new" / "r.json", {"rows": [1]})
    assert (tmp_path / "new" / "r.json").read_text() == '{\n "rows": [\n  1\n ]\n}\n'
    from kvcomm.models import allocator

    monkeypatch.setattr(allocator, "_state", None)
    made = record.run_record()  # before a model loads, as every script makes it
    assert made["environment"]["allocator"] == "not set"
    monkeypatch.setattr(allocator, "_state", "keep")  # what loading a model sets
    record.write_json(tmp_path / "env.json", made)
    assert json.loads((tmp_path / "env.json").read_text())["environment"]["allocator"] == "keep"


def test_a_second_network_run_leaves_the_first_ones_namespaces_alone(monkeypatch, tmp_path):
    import fcntl

    network = script("network", monkeypatch)
    monkeypatch.setattr(network, "LOCK", tmp_path / "network.lock")
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(network, "sh", lambda *args, check=True: calls.append(args))
    with (tmp_path / "network.lock").open("w") as first:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run measuring
        with pytest.raises(SystemExit, match="another network.py run"):
            network.Link().__enter__()
    assert calls == []  # nothing deleted, nothing made
    with network.Link():
        assert ("ip", "netns", "add", network.SENDER_NS) in calls
    with network.Link():  # the lock was given back
        pass
    # a link planted where the lock goes (/run/lock is anyone's): refused, its target left whole
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "network.lock").unlink()
    (tmp_path / "network.lock").symlink_to(victim)
    with pytest.raises(OSError):
        network.Link().__enter__()
    assert victim.read_text() == "keep me"


def test_chats_over_accepted_crafted_messages_count_in_the_row(monkeypatch):
    from collections import Counter

    attack = script("attack", monkeypatch)
    got = attack.row("crafted messages", Counter({200: 3, 400: 5}), 0, chats=Counter({200: 2, 500: 1}))
    assert got["accepted"] == 3 and got["accepted_chats_failed"] == 1 and got["undocumented_5xx"] == 1
    assert got["chat_statuses"] == {"200": 2, "500": 1}
    other = attack.row("bounded requests", Counter({400: 2}), 0)
    assert other["accepted_chats_failed"] is None and "chat_statuses" not in other


def test_the_selection_tables_find_random_runs_of_any_seed(monkeypatch):
    """``--seed 7`` labels random ``random@0.5~seed7``: the table looked up ``random@0.5`` and
    failed after the whole run, before it was saved."""
    from types import SimpleNamespace

    module = script("selection", monkeypatch)
    report = SimpleNamespace(runs=[SimpleNamespace(method="kvcomm", options={"ratio": 0.5}, label="kvcomm@0.5~paper"),
                                   SimpleNamespace(method="random", options={"ratio": 0.5}, label="random@0.5~seed7")])
    assert module.random_label(report, 0.5) == "random@0.5~seed7"
    with pytest.raises(KeyError, match="no random run at ratio 0.3"):
        module.random_label(report, 0.3)


def test_the_release_benchmark_decodes_one_kv_with_two_codes(monkeypatch, tmp_path):
    """Without a model: an export of this checkout's HEAD and the checkout itself encode the same KV
    (in children, as the benchmark runs them), decode it, and their values are compared."""
    import math

    import torch
    from safetensors.torch import save_file

    module = script("decode_release", monkeypatch)
    if not (module.ROOT / ".git").exists():
        pytest.skip("not a git checkout: there is no older commit to export")
    kv = tmp_path / "kv"
    kv.mkdir()
    generator = torch.Generator().manual_seed(0)
    layers = 2
    save_file({f"{i}.{part}": torch.randn(2, 40, 16, generator=generator) for i in range(layers)
               for part in ("keys", "values")}, str(kv / "kv-0.safetensors"))
    (kv / "kv-0.json").write_text(json.dumps({"fingerprint": {"model_type": "test", "num_layers": layers},
                                              "context_len": 40, "sink_position": 0, "mode": "causal",
                                              "full": [True] * layers}))
    commit = module.export("HEAD", tmp_path / "then")
    assert len(commit) == 40 and (tmp_path / "then" / "kvcomm" / "__init__.py").is_file()
    for label, code in (("then", tmp_path / "then"), ("now", module.ROOT)):
        module.child(code, "encode", str(kv), str(tmp_path / label), "int4-ans")
        out = module.child(code, "decode", str(tmp_path / label), "int4-ans", "2")
        assert out["messages"] == 1 and out["seconds"] > 0 and out["bytes"] == (tmp_path / label /
                                                                                "int4-ans-kv-0.bin").stat().st_size
    then, now = (tmp_path / label / "decoded-int4-ans.safetensors" for label in ("then", "now"))
    assert module.compare(then, now) == (True, 0.0)  # one code, one reconstruction
    bits = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0])}
    for changed, expected in (({"a": torch.tensor([-0.0, 1.0])}, False), ({"b": torch.tensor([float("nan")])}, False)):
        save_file({**bits, **changed}, str(tmp_path / "x.safetensors"))
        save_file(bits, str(tmp_path / "y.safetensors"))
        same, largest = module.compare(tmp_path / "x.safetensors", tmp_path / "y.safetensors")
        assert same is expected and (math.isnan(largest) if "b" in changed else largest == 0.0)
    save_file({"a": torch.zeros(1), "b": torch.tensor([2.0])}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SystemExit, match="decoded as"):  # no broadcasting
        module.compare(tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    (tmp_path / "then" / "kvcomm" / "errors.py").unlink()  # the installed checkout's may stand in: refused
    with pytest.raises(SystemExit, match="ran modules from elsewhere: .*kvcomm.errors|failed"):
        module.child(tmp_path / "then", "decode", str(tmp_path / "then"), "int4-ans", "1")
    with pytest.raises(SystemExit, match="cannot export 'no-such-revision'"):
        module.export("no-such-revision", tmp_path / "nothing")
