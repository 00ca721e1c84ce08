"""The command line on a tiny local model: eval, sweep (JSON + PNG), calibrate, errors.

Run folders, provenance, samples, resuming and several tasks per run: ``test_runs.py``.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from kvcomm.cli import app

runner = CliRunner()


def test_eval_writes_results(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--task", "facts", "--limit", "3",
                                 "--method", "kvcomm", "--layers", "0,2", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["runs"][0]["label"] == "kvcomm@0,2" and report["runs"][0]["n"] == 3
    assert "kvcomm@0,2" in result.output


def test_online_takes_the_prior_s_shape(tiny_dir, tmp_path):
    """online builds its ranking on the paper's prior: --alpha is its, not refused as unused."""
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--task", "facts", "--method", "online",
                                 "--alpha", "0.5", "--limit", "3", "-q", "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o.json").read_text())["config"]["alpha"] == 0.5


def test_a_run_that_leaves_fewer_calibration_items_than_its_rule_wants_says_so(tiny_dir, tmp_path):
    """--limit can leave the default rule (8 items) one calibration item; the run went ahead silently."""
    base = ["eval", "--model", str(tiny_dir), "--task", "facts", "--task-option", "items=4", "--method", "kvcomm",
            "--ratio", "0.5", "-q"]
    short = runner.invoke(app, [*base, "--limit", "3", "--out", str(tmp_path / "a.json")], env={"COLUMNS": "200"})
    assert short.exit_code == 0, short.output
    assert "note: facts: the layers are ranked on 1 calibration item(s), not the 8" in " ".join(short.output.split())
    assert json.loads((tmp_path / "a.json").read_text())["config"]["calib_size"] == 1
    given = runner.invoke(app, [*base, "--limit", "3", "--calib-size", "1", "--out", str(tmp_path / "b.json")],
                          env={"COLUMNS": "200"})
    assert given.exit_code == 0 and "note:" not in given.output
    base = base[:base.index("--method")]
    for i, rank_free in enumerate((["--method", "random", "--ratio", "0.5"], ["--method", "kvcomm", "--layers", "0,2"],
                                   ["--method", "kvcomm", "--ratio", "1"])):  # nothing is ranked: nothing to note
        ran = runner.invoke(app, [*base, *rank_free, "--limit", "3", "--out", str(tmp_path / f"c{i}.json")],
                            env={"COLUMNS": "200"})
        assert ran.exit_code == 0 and "note:" not in ran.output, (rank_free, ran.output)


def test_sweep_writes_json_and_plot(tiny_dir, tmp_path):
    result = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--task", "facts", "--limit", "3",
                                 "--methods", "baseline,kvcomm,random@0.5", "--ratios", "0.5,1", "-q",
                                 "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "facts.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["baseline", "kvcomm@0.5", "kvcomm@1", "random@0.5"]
    assert (tmp_path / "facts.png").stat().st_size > 1000 and (tmp_path / "facts-bytes.png").stat().st_size > 1000


def test_calibrate_writes_a_profile(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--task", "facts", "--calib-size", "2",
                                 "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert sorted(written["ranking"]) == [0, 1, 2, 3]
    made = written["details"]["provenance"]  # what made it, as a results file records
    assert made["command"].startswith("kvcomm calibrate") and made["dtype"] == "float32" and "kvcomm" in made["code"]
    assert made["data"] is None  # a generated task; a file's path and sha256 otherwise


def test_calibrate_keeps_a_profile_that_appeared_while_it_ran(tiny_dir, tmp_path, monkeypatch):
    import kvcomm.cli.calibrate as calibrate_module

    out, real = tmp_path / "p.json", calibrate_module.calibrate
    monkeypatch.setattr(calibrate_module, "calibrate",
                        lambda *a, **k: out.write_text("another run's") and real(*a, **k))  # it appears meanwhile
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--task", "facts", "--calib-size", "1",
                                 "--selection", "paper", "-q", "--out", str(out)])
    assert result.exit_code == 2 and "p.json exists" in result.output and out.read_text() == "another run's"


def test_calibrate_may_use_every_item_of_a_task(tiny_dir, tmp_path):
    """Calibration alone holds out no test items: a 3-item task calibrates on all 3."""
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "-t", "facts", "--task-option", "items=3",
                                 "--calib-size", "3", "--selection", "paper", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["calibration_items"]) == 3
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "-t", "facts", "--task-option", "items=3",
                                 "--calib-size", "4", "-q", "--out", str(tmp_path / "q.json")])
    assert result.exit_code != 0 and "calibrate on 1 to 3" in result.output + result.stderr


def test_bad_options_fail_cleanly(tiny_dir):
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--method", "kvcom", "-q"])
    assert result.exit_code == 2 and "Did you mean 'kvcomm'" in result.stderr


def test_encode_inspect_answer_round_trip(tiny_dir, tmp_path):
    message = tmp_path / "m.kvcm"
    result = runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "Mira lives in Oslo.",
                                 "--layers", "0,2", "--codec", "int8"])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["inspect", str(message)])
    assert shown.exit_code == 0 and "valid" in shown.output and "0,2 (2/4)" in shown.output
    assert "codec int8 (quant {'bits': 8, 'group': 32})" in shown.output  # the name given, then its class
    header = json.loads(runner.invoke(app, ["inspect", str(message), "--json"]).output)
    assert header["codec"] == {"name": "quant", "params": {"bits": 8, "group": 32}} and header["mode"] == "causal"
    answered = runner.invoke(app, ["answer", str(message), "--model", str(tiny_dir), "--question", "Where?",
                                   "--max-new-tokens", "3"])
    assert answered.exit_code == 0, answered.output
    trailing = tmp_path / "trailing.kvcm"  # inspect said "valid" where load, answer and push refuse it
    trailing.write_bytes(message.read_bytes() + b"JUNK")
    refused = runner.invoke(app, ["inspect", str(trailing)])
    assert refused.exit_code == 2 and "trailing bytes after the end of the message" in refused.output
    wide = runner.invoke(app, ["encode", str(tmp_path / "wide.kvcm"), "--model", str(tiny_dir), "--context",
                               "Mira lives in Oslo.", "--codec", "fp32"])
    assert wide.exit_code == 0 and "x larger than all layers in fp16" in runner.invoke(
        app, ["inspect", str(tmp_path / "wide.kvcm")]).output


def test_answer_refuses_a_message_from_another_model(tiny_dir, tmp_path):
    from kvcomm.models import load_model
    from kvcomm.wire import FingerprintMismatch, KVMessage

    message = tmp_path / "m.kvcm"
    runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "x"])
    loaded = KVMessage.load(message)
    loaded.fingerprint["vocab_sha256"] = "0" * 32
    loaded.save(message)
    result = runner.invoke(app, ["answer", str(message), "--model", str(tiny_dir), "--question", "q"])
    assert result.exit_code == 2 and "incompatible model" in result.stderr and "vocab_sha256" in result.stderr
    with pytest.raises(FingerprintMismatch):
        KVMessage.load(message, receiver=load_model(str(tiny_dir)).fingerprint)


def test_sweep_over_codecs_records_message_bytes(tiny_dir, tmp_path):
    result = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--task", "facts", "--limit", "2",
                                 "--methods", "kvcomm", "--ratios", "1", "--codecs", "none,fp32,int4", "-q",
                                 "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    runs = {r["label"]: r for r in json.loads((tmp_path / "facts.json").read_text())["runs"]}
    assert set(runs) == {"kvcomm@1", "kvcomm@1+fp32", "kvcomm@1+int4"}
    # fp32 through the wire answers exactly as in process; its bytes are the real message size.
    assert [i["answer"] for i in runs["kvcomm@1"]["items"]] == [i["answer"] for i in runs["kvcomm@1+fp32"]["items"]]
    assert runs["kvcomm@1+fp32"]["kv_bytes_mean"] > runs["kvcomm@1"]["kv_bytes_mean"]  # plus headers
    assert runs["kvcomm@1+int4"]["kv_bytes_mean"] < runs["kvcomm@1"]["kv_bytes_mean"] / 4
    assert (tmp_path / "facts-bytes.png").exists()


def test_codebook_then_klt_encode_inspect_answer(tiny_dir, tmp_path):
    built = runner.invoke(app, ["codebook", "--model", str(tiny_dir), "--items", "4"])
    assert built.exit_code == 0, built.output
    book_id = re.search(r"codebook ([0-9a-f]{16}):", built.output).group(1)
    message = tmp_path / "m.kvcm"
    result = runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "Mira lives in Oslo.",
                                 "--codec", "klt"])
    assert result.exit_code == 0, result.output
    header = json.loads(runner.invoke(app, ["inspect", str(message), "--json"]).output)
    # the new default
    assert header["codec"] == {"name": "klt", "params": {"step": 0.5, "codebook": book_id, "coder": "rans"}}
    answered = runner.invoke(app, ["answer", str(message), "--model", str(tiny_dir), "--question", "Where?",
                                   "--max-new-tokens", "3"])
    assert answered.exit_code == 0, answered.output


def test_encode_with_codec_auto_names_its_choice(tiny_dir, tmp_path):
    message = tmp_path / "auto.kvcm"
    result = runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "Mira lives in Oslo.",
                                 "--codec", "auto", "--bandwidth", "0.01"])
    assert result.exit_code == 0, result.output
    header = json.loads(runner.invoke(app, ["inspect", str(message), "--json"]).output)
    choice = header["meta"]["codec_choice"]
    assert choice["bandwidth_mbit"] == 0.01 and f"({choice['chosen']}: shortest expected wait" in result.output
    assert header["codec"]["name"] != "auto"
    wrong = runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "x", "--codec", "int8",
                                "--bandwidth", "10"])
    assert wrong.exit_code == 2 and "goes with --codec auto" in wrong.output
    busy = runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "Mira lives in Oslo.",
                               "--codec", "auto", "--receiver-compute", "1.5", "--overwrite"])
    assert busy.exit_code == 0, busy.output
    header = json.loads(runner.invoke(app, ["inspect", str(message), "--json"]).output)
    assert header["meta"]["codec_choice"]["receiver_compute_s"] == 1.5
    wrong = runner.invoke(app, ["encode", str(message), "--model", str(tiny_dir), "--context", "x", "--codec", "int8",
                                "--receiver-compute", "1"])
    assert wrong.exit_code == 2 and "--receiver-compute chooses a codec" in wrong.output


def test_sweep_builds_the_klt_codebook_from_calibration_items(tiny_dir, tmp_path):
    result = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--task", "facts", "--limit", "2", "--calib-size",
                                 "3", "--methods", "kvcomm", "--ratios", "1", "--codecs", "klt", "-q",
                                 "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "facts.json").read_text())
    assert report["config"]["codebook"]["tokens"] > 0 and len(report["config"]["codebook"]["id"]) == 16
    assert report["config"]["codebook"]["source"] == "calibration items"


def test_calibrate_by_a_rule_with_a_budget(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--task", "facts", "--calib-size", "2",
                                 "--selection", "answer", "--tolerance", "0.5", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = json.loads(out.read_text())
    assert profile["rule"] == "answer" and 0 < profile["details"]["budget"]["ratio"] <= 1
    assert "budget: ratio" in result.stderr


def test_calibrate_by_the_choice_of_the_gold_option(tiny_dir, tmp_path):
    """Items that list their options are scored by how surely the gold one is picked; the profile
    says so (eval and sweep take the same --objective through EvalConfig)."""
    data = tmp_path / "mc.jsonl"
    rows = [{"context": f"Firm {n} grows.", "question": "Which firm grows? Say its name.", "answers": f"Firm {n}",
             "choices": ["Firm 1", "Firm 2", "Firm 3"]} for n in (1, 2, 3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--task", "jsonl", "--data", str(data),
                                 "--calib-size", "2", "--objective", "choice", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    details = json.loads(out.read_text())["details"]
    assert details["objective"].startswith("log-probability of choosing the gold option (2 of 2 items")
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--task", "jsonl", "--data", str(data),
                                 "--calib-size", "2", "--objective", "guess", "-q", "--out", str(out)])
    assert result.exit_code != 0 and "guess" in result.output


def test_blend_runs_from_the_command_line(tiny_dir, tmp_path):
    result = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--task", "multihop", "--limit", "3",
                                 "--methods", "kvcomm@1,blend@0.3,prefix", "--senders", "2", "--deviation", "keys",
                                 "-q", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    labels = [r["label"] for r in json.loads((tmp_path / "multihop.json").read_text())["runs"]]
    assert labels[0] == "kvcomm@1x2" and "blend@0.3x2[k]" in labels and "prefix@x2" in labels
    alone = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--task", "multihop", "--limit", "2", "--method",
                                "blend", "--codec", "fp32", "-q", "--out", str(tmp_path / "alone.json")])
    assert alone.exit_code == 0, alone.output
    run = json.loads((tmp_path / "alone.json").read_text())["runs"][0]  # blend's own ratio, not eval's 0.5 of layers
    assert run["label"] == "blend@0.15x2+fp32" and run["codec"] == "fp32"


def test_a_generated_task_takes_its_options_from_the_command_line(tiny_dir, tmp_path):
    """--task-option reaches the generator: 5 items leave room for 4 test items beside the calibration
    item, not 5; the filler sentences reach the prompts."""
    from kvcomm.tasks.multihop import FILLER

    base = ["eval", "--model", str(tiny_dir), "--task", "multihop", "--method", "skyline", "--task-option", "items=5",
            "--task-option", "filler-per-piece=2", "--task-option", "pieces=2", "-q"]
    result = runner.invoke(app, [*base, "--limit", "5", "--out", str(tmp_path / "a.json")])
    assert result.exit_code != 0 and "cannot hold 5 test" in result.output
    result = runner.invoke(app, [*base, "--limit", "4", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["config"]["test_items"] == 4
    samples = (tmp_path / "b-samples.jsonl").read_text()
    assert sum(sentence in samples for sentence in FILLER) >= 4
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "-t", "multihop", "--task-option", "items=3",
                                 "--task-option", "multihop:seed=4", "--selection", "paper", "--calib-size", "1", "-q",
                                 "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.json").read_text())["calibration_items"] == ["multihop_4_0002"]


@pytest.fixture
def variant_dir(tmp_path):
    """A second tiny Llama of the same shape with other weights (a stand-in for a fine-tune)."""
    from tests.conftest import tiny_loaded

    loaded = tiny_loaded("llama", seed=3)
    loaded.model.save_pretrained(tmp_path / "variant")
    loaded.tokenizer.save_pretrained(tmp_path / "variant")
    return tmp_path / "variant"


def test_droidspeak_is_profiled_by_calibrate_and_used_by_eval(tiny_dir, variant_dir, tmp_path):
    blocks = tmp_path / "blocks.json"
    result = runner.invoke(app, ["calibrate", "--method", "droidspeak", "--model", str(tiny_dir), "--receiver",
                                 str(variant_dir), "--task", "facts", "--calib-size", "2", "--max-recompute", "0.5",
                                 "-q", "--out", str(blocks)])
    assert result.exit_code == 0, result.output
    profile = json.loads(blocks.read_text())
    assert profile["kind"] == "droidspeak" and profile["max_block"] == 2 and len(profile["blocks"]) == 4 + 3
    assert blocks.with_suffix(".png").stat().st_size > 1000 and "pick: block" in result.output
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--receiver", str(variant_dir), "--task", "facts",
                                 "--limit", "3", "--calib-size", "2", "--method", "droidspeak",
                                 "--max-recompute", "0.5", "--profile", str(blocks), "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads(out.read_text())["runs"][0]
    assert re.fullmatch(r"droidspeak\[\d:\d\]", run["label"]) and run["details"]["profiled"] is not None


def test_drift_is_zero_for_one_model_and_not_for_a_variant(tiny_dir, variant_dir, tmp_path):
    for other, name in ((tiny_dir, "same"), (variant_dir, "variant")):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["drift", str(tiny_dir), str(other), "--task", "facts", "--items", "3", "-q",
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
        drift = json.loads(out.read_text())
        assert len(drift["keys"]) == len(drift["values"]) == len(drift["hidden"]) == 4 and drift["tokens"] > 0
        values = drift["keys"] + drift["values"] + drift["hidden"]
        assert all(v == 0 for v in values) if name == "same" else all(v > 0.01 for v in values)
        assert out.with_suffix(".png").stat().st_size > 1000
        assert drift["provenance"]["command"].startswith("kvcomm drift") and len(drift["weights"]) == 2
        assert (drift["weights"][0] == drift["weights"][1]) == (name == "same") and drift["task_options"]
    small = tmp_path / "small.jsonl"  # fewer items than the default 32: all of them, as before
    small.write_text('{"context": "Mira lives in Oslo.", "question": "Where?", "answers": ["Oslo"]}\n' * 3)
    ran = runner.invoke(app, ["drift", str(tiny_dir), str(tiny_dir), "--task", "jsonl", "--data", str(small), "-q",
                              "--out", str(tmp_path / "small.json")])
    assert ran.exit_code == 0 and json.loads((tmp_path / "small.json").read_text())["items"] == 3, ran.output


def test_inspect_shows_left_out_layers_and_hidden_frames():
    from pathlib import Path

    golden = Path(__file__).parent / "golden" / "message_v4.kvcm"
    # a deep checkout path must not split the header line; a terminal wide enough for the table is assumed
    result = runner.invoke(app, ["inspect", str(golden)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert header.startswith(str(golden)) and "valid (format version 4)" in header
    assert "left out" in result.output and "hidden" in result.output


def test_inspect_shows_a_senders_text_as_it_is(tmp_path):
    """Fingerprint values are the sender's text: ``[/x]`` crashed inspect (rich read it as a closing
    tag) and ``[bold]`` vanished."""
    import torch

    from kvcomm.wire import KVMessage, LayerKV, make_codec

    path = tmp_path / "m.kvcm"
    KVMessage({"model_type": "llama[/x]", "other": "qwen2[bold]"}, 3, 0,
              [LayerKV(0, True, torch.randn(1, 3, 4), torch.randn(1, 3, 4))], make_codec("fp32")).save(path)
    result = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "llama[/x]" in result.output and "qwen2[bold]" in result.output


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_no_help_text_loses_brackets_to_rich_markup():
    """Rich reads ``[word]`` in a help text as markup and drops it (``pip install "kvcomm[ray]"``
    showed as ``"kvcomm"``): every bracket in a command's or option's help is escaped (``\\[``),
    and the one that went missing shows."""
    import typer.main

    unescaped = re.compile(r"(?<!\\)\[[^\]]*\]")
    found = []
    for path, command in _commands(typer.main.get_command(app)):
        for text in (command.help or "", *(getattr(p, "help", None) or "" for p in command.params)):
            found += [(" ".join(path), m) for m in unescaped.findall(text)]
    assert not found
    shown = runner.invoke(app, ["sweep", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert 'pip install "kvcomm[ray]"' in shown.output and "(default: bucket)" in shown.output


def test_the_demo_writes_its_table_results_samples_and_plot(tiny_dir, tmp_path, monkeypatch):
    """``kvcomm`` with no command (the README's first step), on the tiny model: one table and the
    run's four files in a new results folder of the current directory."""
    import importlib

    demo_module = importlib.import_module("kvcomm.cli.demo")

    class Installed:
        def is_installed(self) -> bool:
            return True

    monkeypatch.setattr(demo_module, "DEFAULT_MODEL", str(tiny_dir))
    monkeypatch.setattr(demo_module, "EMBEDDED", {str(tiny_dir): Installed()})
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    folders = list((tmp_path / "results").iterdir())
    assert len(folders) == 1 and folders[0].name.endswith("-tiny")
    assert sorted(p.name for p in folders[0].iterdir()) == ["facts-samples.jsonl", "facts.json", "facts.png"]
    assert "kvcomm@0.5" in result.output and "Next:" in result.output
    # where ./results cannot be made, it says so before a model loads (before: after the whole evaluation)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "results").write_text("a file of mine")
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(demo_module.Agents, "load", lambda *a, **k: pytest.fail("a model loaded"))
    refused = CliRunner().invoke(app, [])
    assert refused.exit_code == 2 and "cannot make a run folder here" in refused.output, refused.output
    # a model that fails to load leaves no empty run folder behind
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "third")

    def broken(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(demo_module.Agents, "load", broken)
    failed = CliRunner().invoke(app, [])
    assert isinstance(failed.exception, MemoryError) and not list((tmp_path / "third").rglob("*-tiny"))


def test_quiet_hides_the_warnings_transformers_raises_and_only_inside():
    """-q: a FutureWarning raised by transformers is hidden (before, only its logs were), and
    warnings are shown again after."""
    import warnings

    from kvcomm.cli.common import quiet_libraries

    def warn() -> None:
        warnings.warn_explicit("deprecated", FutureWarning, "utils.py", 1, module="transformers.modeling_utils")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries(True):
            warn()
        assert caught == []
        warn()
        assert len(caught) == 1


def test_encode_refuses_a_ranking_of_other_weights(tiny_dir, tmp_path):
    """encode --ratio --profile: a profile that records other weights is refused, as eval refuses it."""
    from kvcomm.selection import Profile

    profile = tmp_path / "p.json"
    Profile(sender="t", receiver="t", task="facts", num_layers=4, alpha=1.0, mu=0.5, sigma=10.0,
            calibration_items=[], importance=[0.0] * 4, scores=[0.0] * 4, ranking=[2, 0, 3, 1],
            weights=["0" * 32, "0" * 32]).save(profile)
    refused = runner.invoke(app, ["encode", str(tmp_path / "m.kvcm"), "--model", str(tiny_dir), "--context", "x",
                                  "--ratio", "0.5", "--profile", str(profile)])
    assert refused.exit_code == 2 and "calibrated on other weights" in refused.output
    assert not (tmp_path / "m.kvcm").exists()
