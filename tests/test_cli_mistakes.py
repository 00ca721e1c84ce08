"""Common command-line mistakes: each gives one line, ``error: …``, exit code 2, and no model loads."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from kvcomm.cli import app
from kvcomm.selection import Profile
from kvcomm.selection.blocks import BlockProfile, BlockScore

runner = CliRunner()


@pytest.fixture
def files(tmp_path, tiny_dir):
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "question": "q", "answers": ["a"]}\n{oops\n')
    (tmp_path / "ok.jsonl").write_text('{"context": "x", "question": "q", "answers": ["a"]}\n' * 3)
    Profile(sender="m", receiver="m", task="countries", num_layers=4, alpha=1.0, mu=0.5, sigma=10.0,
            calibration_items=[], importance=[0.0] * 4, scores=[0.0] * 4,
            ranking=[0, 1, 2, 3]).save(tmp_path / "countries-profile.json")
    Profile(sender="m", receiver="m", task="facts", num_layers=4, alpha=1.0, mu=0.5, sigma=10.0,
            calibration_items=[], importance=[0.0] * 4, scores=[0.0] * 4, ranking=[0, 1, 2, 3],
            details={"pieces": "passages"}).save(tmp_path / "passages-profile.json")
    Profile(sender="m", receiver="m", task="facts", num_layers=6, alpha=1.0, mu=0.5, sigma=10.0,
            calibration_items=[], importance=[0.0] * 6, scores=[0.0] * 6,
            ranking=[5, 4, 3, 2, 1, 0]).save(tmp_path / "deeper-profile.json")
    Profile(sender=str(tiny_dir), receiver=str(tiny_dir), task="facts", num_layers=6, alpha=1.0, mu=0.5, sigma=10.0,
            calibration_items=[], importance=[0.0] * 6, scores=[0.0] * 6,
            ranking=[5, 4, 3, 2, 1, 0]).save(tmp_path / "deeper-pair-profile.json")
    BlockProfile(sender=str(tiny_dir), receiver=str(tiny_dir), task="facts", num_layers=4, calibration_items=[],
                 max_recompute=0.5, max_block=2, own=-1.0, reuse=-2.0,
                 blocks=[BlockScore(start=0, stop=1, loglik=-1.5)]).save(tmp_path / "blocks.json")
    prov = Profile(sender="m", receiver="m", task="facts", num_layers=4, alpha=1.0, mu=0.5, sigma=10.0,
                   calibration_items=[], importance=[0.0] * 4, scores=[0.0] * 4, ranking=[0, 1, 2, 3])
    (tmp_path / "provenance-text.json").write_text(json.dumps({**prov.model_dump(), "details": {"provenance": "x"}}))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "facts.json").write_text("{}")  # a finished run's results
    (tmp_path / "other" / "facts.checkpoint").mkdir(parents=True)  # another run's checkpoint
    (tmp_path / "other" / "facts.checkpoint" / "run.json").write_text(json.dumps(
        {"version": 1, "identity": {"sender": "another-model"}, "date": "2026-01-01T00:00:00+00:00"}))
    (tmp_path / "profile.json").write_text('{"not": "a profile"}')
    (tmp_path / "junk.kvcm").write_bytes(b"definitely not a KV message")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"dir": str(tmp_path), "model": str(tiny_dir), "port": str(busy.getsockname()[1])}
    busy.close()


# (arguments, text the one line must contain); {model}, {dir}, {port} are filled from the fixture
MISTAKES = [
    ("eval -m {model} --method kvcom", "Did you mean 'kvcomm'"),
    ("eval -m smollm2", "Did you mean 'smollm2-135m'"),
    ("eval -m ./no/such/folder", "is not a known model"),
    ("eval -m {model} -t countrys", "Did you mean 'countries'"),
    ("eval -m {model} -t countries --data {dir}/missing.jsonl", "does not exist"),
    ("eval -m {model} -t jsonl --data {dir}/bad.jsonl", "not valid JSON"),
    ("eval -m {model} -t jsonl", "needs a file"),
    ("eval -m {model} -t facts --data {dir}/file.txt", "takes no --data"),
    ("eval -m {model} --ratio 0", "greater than 0"),
    ("eval -m {model} --linear fast", "'fast' is not one of 'dense', 'packed'"),
    ("serve -m {model} --linear sparse", "'sparse' is not one of 'dense', 'packed'"),
    ("eval -m {model} --ratio 1.5", "less than or equal to 1"),
    ("eval -m {model} --ratio abc", "valid number"),
    ("eval -m {model} --layers 0,99", "must name layers in 0..3"),
    ("eval -m {model} --layers x-y", "cannot parse layer list"),
    ("eval -m {model} --layers 3-1", "runs backwards"),
    ("eval -m {model} --ratio 0.5 --layers 0,1", "not both"),
    ("eval -m {model} --method nld --codec int8", "does not take 'codec'"),
    ("eval -m {model} --method baseline --senders 2", "does not take 'senders'"),
    ("eval -m {model} --method online --senders 0", "--senders"),
    ("eval -m {model} --codec int9", "Did you mean 'int8'"),
    ("eval -m {model} --batch-size 0", "--batch-size"),
    ("eval -m {model} --calib-size -1", "--calib-size"),
    ("eval -m {model} --mode strict", "--mode"),
    ("eval -m {model} --dtype float64", "--dtype"),
    ("eval -m {model} --alpha 2", "--alpha"),
    ("eval -m {model} --selection paper --sigma inf", "sigma: Input should be a finite number"),  # before: a traceback
    ("eval -m {model} --max-memory 0", "--max-memory must be above 0"),  # before: named the field max_memory_gb
    ("eval -m {model} --limit 1000", "cannot hold 1000 test"),
    ("eval -m {model} --out {dir}/folder", "is a folder"),
    ("eval -m {model} --profile {dir}/missing.json", "does not exist"),
    ("eval -m {model} --profile {dir}/profile.json", "cannot read profile"),
    # a block profile where a ranking is needed (before: ignored, and a ranking calibrated in its place)
    ("eval -m {model} --method kvcomm --profile {dir}/blocks.json", "is a droidspeak block profile"),
    ("eval -m {model} --method kvcomm --profile {dir}/provenance-text.json", "details.provenance must be"),
    ("eval -m {model} --no-such-option", "No such option"),
    ("sweep -m {model} --ratios 0.5,abc", "--ratios must be"),
    ("sweep -m {model} --methods baseline,nld --senders 2", "none of the methods"),
    ("sweep -m {model} --methods nld@0.5", "takes no ratio"),
    ("sweep -m {model} --codecs none,int9", "Did you mean 'int8'"),
    ("sweep -m {model} --out-dir {dir}/file.txt", "--out-dir"),
    # a folder nothing can be written in, even by root (for whom os.access says yes): a file is tried there
    ("eval -m {model} --out-dir /proc/kvcomm-run", "cannot write in /proc"),
    ("eval -m {model} --out /proc/kvcomm-run.json", "cannot write in /proc"),
    ("calibrate -m {model} --calib-size 0", "--calib-size"),
    ("encode {dir}/m.kvcm -m {model}", "exactly one of --context or --context-file"),
    ("encode {dir}/file.txt -m {model} --context x", "file.txt exists; pass --overwrite"),  # before: replaced
    ("encode {dir}/m.kvcm -m {model} --context x --layers 0,99", "must name layers in 0..3"),
    ("encode {dir}/m.kvcm -m {model} --context x --codec int9", "Did you mean 'int8'"),
    ("encode {dir}/m.kvcm -m {model} --context x --ratio 0.5", "needs --profile"),
    ("encode {dir}/m.kvcm -m {model} --context x --ratio 0.5 --profile {dir}/deeper-profile.json", "ranks 6 layers"),
    ("encode {dir}/folder -m {model} --context x", "is a folder"),
    ("encode {dir}/m.kvcm -m {model} --context x --profile {dir}/countries-profile.json", "give --ratio with it"),
    ("encode {dir}/m.kvcm -m {model} --context x --layers 0 --profile {dir}/profile.json", "give --ratio with it"),
    ("eval -m {model} --selection paper --objective likelihood", "leave out --objective"),
    # a run that ranks no layers takes no objective or prior (before: the objective was accepted and
    # recorded, and --mu refused as if the run ranked with prune)
    ("eval -m {model} --method baseline --objective likelihood", "no method of this run ranks layers"),
    ("eval -m {model} --method baseline --mu 0.3", "no method of this run ranks layers"),
    ("calibrate -m {model} --selection paper --objective probability", "leave out --objective"),
    ("eval -m {model} -t facts --pieces passages --calib-size 0 --profile {dir}/passages-profile.json "
     "--objective probability", "the profile's ranking is used"),
    ("sweep -m {model} --methods kvcomm,kvcomm~prior --objective auto", "not prior"),
    ("eval -m {model} -t jsonl --data {dir}/ok.jsonl --objective auto --limit 2", "lower --limit"),
    ("inspect {dir}/missing.kvcm", "does not exist"),
    ("inspect {dir}/junk.kvcm", "not a KV message"),
    ("answer {dir}/junk.kvcm -m {model} --question q", "not a KV message"),
    ("serve -m {model} --port 70000", "--port"),
    ("serve -m {model} --store ftp://x", "unknown store"),
    ("serve -m {model} --store disk:", "needs a folder"),
    ("serve -m {model} --port {port}", "cannot listen on 127.0.0.1:{port}"),
    ("serve -m {model} --codec int9", "Did you mean 'int8'"),
    ("models install smollm", "Did you mean 'smollm2-135m'"),
    ("remote chat hello --url http://127.0.0.1:9", "cannot reach the agent"),
    ("remote context x --ratio 0 --url http://127.0.0.1:9", "'--ratio': 0 is not in 0 < x <= 1"),
    ("serve -m {model} --ratio 0", "'--ratio': 0 is not in 0 < x <= 1"),
    ("encode {dir}/m.kvcm -m {model} --context x --ratio 0", "'--ratio': 0 is not in 0 < x <= 1"),
    ("eval -m {model} -t facts --method adaptive --step 0", "'--step': 0 is not in 0 < x <= 1"),
    ("serve -m {model} --max-uploads 0", "'--max-uploads': Input should be greater than or equal to 1"),
    ("eval -m {model} -t facts --task-option items=10 --skip 8 --limit 2", "after the first 8"),
    ("remote context x --passage --ratio 0.5 --profile {dir}/countries-profile.json --url http://127.0.0.1:9",
     "calibrated on items read as chats"),
    ("remote context x --ratio 0.5 --profile {dir}/passages-profile.json --url http://127.0.0.1:9",
     "calibrated on items read as passages"),
    ("serve -m {model} --profile {dir}/passages-profile.json --profile {dir}/passages-profile.json",
     "one per layout"),
    ("codebook -m {model} --items 0", "--items"),
    ("codebook -m {model} -t tipsheets --data {dir}/missing.jsonl", "does not exist"),
    ("frobnicate", "No such command"),
    # several tasks, their data, their metric and budget
    ("eval -m {model} -t facts,countrys", "Did you mean 'countries'"),
    ("sweep -m {model} -t facts,facts", "names 'facts' twice"),
    ("eval -m {model} -t facts --data countries={dir}/ok.jsonl", "is not in this run"),
    ("eval -m {model} -t jsonl --data countrys={dir}/ok.jsonl", "Did you mean 'countries'"),
    ("eval -m {model} -t facts,jsonl --data {dir}/ok.jsonl", "--data TASK=PATH"),
    ("eval -m {model} -t jsonl --data jsonl={dir}/ok.jsonl --data jsonl={dir}/ok.jsonl", "two files"),
    ("eval -m {model} -t jsonl,countries --data jsonl={dir}/ok.jsonl,countries={dir}/missing.jsonl", "does not exist"),
    ("eval -m {model} -t jsonl --data {dir}/ok.jsonl --metric f2", "--metric"),
    ("eval -m {model} -t jsonl --data {dir}/ok.jsonl --max-new-tokens 0", "--max-new-tokens"),
    ("eval -m {model} -t multihop --task-option filer_per_piece=2", "Did you mean 'filler_per_piece'"),
    ("eval -m {model} -t multihop --task-option items=many", "takes int, not 'many'"),
    ("eval -m {model} -t countries --task-option items=5", "takes no option 'items'"),
    ("eval -m {model} -t facts --task-option items", "is not KEY=VALUE"),
    ("eval -m {model} -t facts --task-option seed=1 --task-option seed=2", "gives 'seed' twice"),
    ("eval -m {model} -t facts --task-option multihop:items=5", "not in this run"),
    ("eval -m {model} -t relay --task-option items=0", "has no items (items must be at least 1)"),
    ("calibrate -m {model} -t facts --task-option multihop:items=5", "not in this run"),
    ("graph -m {model} -t relay --task-option hops=4", "cannot set hops (set by --agents)"),
    ("graph -m {model} -t relay --task-option distracters=4", "Did you mean 'distractors'"),
    ("eval -m {model} -t facts --task-option multihp:items=5", "Did you mean 'multihop'"),
    ("sweep -m {model} -t facts,multihop --task-option filler_per_piece=1", "'facts' takes no option"),
    # files that exist, resuming, profiles of other tasks
    ("eval -m {model} --out {dir}/file.txt", "exists; pass --overwrite"),
    ("sweep -m {model} --out-dir {dir}/done", "done/facts.json exists"),
    ("eval -m {model} --resume {dir}/other", "cannot resume"),
    ("eval -m {model} --resume {dir}/folder", "nothing to resume"),
    ("eval -m {model} --resume {dir}/missing", "does not exist"),
    ("eval -m {model} --resume {dir}/other --overwrite", "--resume continues a run"),
    ("eval -m {model} --resume {dir}/other --out-dir {dir}/folder", "not in the --resume folder"),
    ("eval -m {model} --out {dir}/r.json --out-dir {dir}/folder", "not both"),
    ("eval -m {model} -t facts,jsonl --data jsonl={dir}/ok.jsonl --out {dir}/r.json", "one results file"),
    ("eval -m {model} --profile {dir}/countries-profile.json", "calibrated on task 'countries'"),
    ("eval -m {model} --profile {dir}/deeper-pair-profile.json", "profile is for 6 layers, the model has 4"),
    ("calibrate -m {model} --out {dir}/file.txt", "exists; pass --overwrite"),
    # variants and droidspeak
    ("eval -m {model} --method droidspeak --block 5", "is not a:b"),
    ("eval -m {model} --method droidspeak --block 5:3", "needs 0 <= a < b"),
    ("eval -m {model} --method droidspeak --block 2:9", "the model has 4 layers"),  # before: after loading
    ("eval -m {model} --method droidspeak --block 0:4", "is every layer"),
    ("eval -m {model} --method ac --ac-k 99", "layer_k (--ac-k) 99 is out of range"),
    ("sweep -m {model} --methods blend --check-layer 7", "the model has 4 layers (--check-layer)"),
    ("eval -m {model} --method kvcomm --block 1:3", "does not take 'block'"),
    ("eval -m {model} --method kvcomm --block-tolerance 0.1", "does not take 'tolerance'"),
    ("calibrate -m {model} --method droidspeak --selection answer", "droidspeak takes"),
    ("calibrate -m {model} --method droidspek", "droidspek"),
    ("calibrate -m {model} --method droidspeak --max-recompute 0", "0 is not in 0 < x <= 1"),  # before: after loading
    ("eval -m {model} --sigma 0", "--sigma must be above 0"),  # before: named the field
    # the prior's shape given where no paper rule ranks: before, ignored and recorded as used
    ("eval -m {model} --alpha 0.5", "shape the paper rule's prior; this run ranks with prune"),
    ("calibrate -m {model} --selection prior --mu 0.3", "this run ranks with prior (prior fits its own)"),
    ("models derive x --from {model} --recipe terse --lr 0", "'--lr': 0 is not in 0 < x <= 1"),  # named the field
    ("models derive x --from {model} --recipe terse --seed 18446744073709551616", "18446744073709551615"),
    ("drift {model} smollm2-13", "Did you mean"),
    # before: tracebacks (an output under a file, a URL or token no HTTP client can send)
    ("encode {dir}/file.txt/m.kvcm -m {model} --context x", "file.txt is a file, not a folder"),
    ("remote models --url http://localhost:8000x", "is not an agent's URL"),
    ("remote models --url http://127.0.0.1:9 --token sekrít", "the token must be ASCII"),
    ("serve -m {model} --token sekrít", "token must be ASCII"),
    ("eval -m {model} --calib-size 0", "needs a layer ranking: pass --profile or --calib-size >= 1"),  # after a load
    ("eval -m {model} --method droidspeak --calib-size 0", "droidspeak needs a block: pass --block a:b"),
    # before: "method 'random' does not take 'ratio'; it takes: ratio, …"
    ("sweep -m {model} --methods random@0.5 --ratios 0.3", "random@0.5 fix their own ratio"),
    ("eval -m {model} --out-dir {dir}/file.txt/run", "file.txt is a file, not a folder"),
    ("models install smollm2-135m smolm2-135m", "Did you mean 'smollm2-135m'"),  # before: the first installed first
    ("drift {model} {model} --items 1000", "--items 1000: facts has 100 items"),  # before: 100 compared, silently
    ("eval -m {dir}/folder", "not a model directory (no config.json)"),  # before: a tokenizer's error, after a load
    ("models derive x --from {model} --recipe tersee", "Did you mean 'terse'"),
    ("models derive smollm2-135m --from {model} --recipe terse", "embedded model's name"),
    ("models derive 'bad name' --from {model} --recipe terse", "name"),
    ("sweep -m {model} --methods kvcomm --ratios 2", "error: kvcomm: ratio: Input should be less than"),  # said once
    ("sweep -m {model} --methods kvcomm --modes causal,paded-sink", "Did you mean 'padded-sink'"),
    ("sweep -m {model} --methods kvcomm --modes causal --mode legacy", "not both"),
    ("sweep -m {model} --methods baseline --modes causal", "does not take 'mode'"),
    ("sweep -m {model} --methods online --ray local", "cannot run apart on a cluster"),
    ("sweep -m {model} --workers 2", "are for --ray"),
    ("graph -m {model} --worker-threads 2", "are for --ray"),
    # before: the parser kept the last (multihop alone ran)
    ("eval -m {model} -t facts -t multihop", "--task given twice (-t and -t): give it once (several tasks"),
    ("sweep -m {model} --task=facts -t multihop", "--task given twice (--task and -t)"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr("kvcomm.models.loading._load", refuse)


@pytest.mark.parametrize("arguments, expected", MISTAKES, ids=[m[0].split(" {")[0] + f"-{i}"
                                                              for i, m in enumerate(MISTAKES)])
def test_mistake_gives_one_line_and_exit_code_2_before_any_model_loads(arguments, expected, files, no_model_loads):
    args = [part.format(**files) for part in arguments.split()]
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected.format(**files) in lines[0]


def test_at_least_thirty_mistakes_are_walked():
    assert len(MISTAKES) >= 30


def test_a_message_from_another_model_is_one_line_too(files, tmp_path):
    from kvcomm.wire import KVMessage

    path = tmp_path / "m.kvcm"
    assert runner.invoke(app, ["encode", str(path), "-m", files["model"], "--context", "x"]).exit_code == 0
    foreign = KVMessage.load(path)
    foreign.fingerprint["vocab_sha256"] = "f" * 32
    foreign.save(path)
    result = runner.invoke(app, ["answer", str(path), "-m", files["model"], "--question", "q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "incompatible model" in result.stderr


def test_the_base_install_imports_and_serve_names_the_extra_it_needs():
    """Without the service's packages (the README's first command installs kvcomm alone), kvcomm
    and its CLI import, and `kvcomm serve` says in one line what to install. A fresh process with
    those packages hidden."""
    import subprocess
    import sys

    hidden = ["diskcache", "fastapi", "uvicorn", "redis", "openai", "prometheus_client",
              "prometheus_fastapi_instrumentator"]
    script = (f"import sys\nfor name in {hidden!r}: sys.modules[name] = None\n"
              "import kvcomm, kvcomm.cli\nfrom typer.testing import CliRunner\n"
              "result = CliRunner().invoke(kvcomm.cli.app, ['serve'])\n"
              "print(result.exit_code, result.output.strip().splitlines()[-1])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("2 ") and "pip install 'kvcomm[serve]'" in done.stdout, done.stdout


def test_an_empty_token_is_refused_not_served_as_one_no_client_sends(files, no_model_loads):
    """``--token "$UNSET"`` became a real token, ``Bearer `` with nothing after it, which no client sends."""
    result = runner.invoke(app, ["serve", "-m", files["model"], "--token", ""])
    assert result.exit_code == 2 and "the token is empty (an unset variable?)" in result.stderr, result.output
    for spaced in ("secret ", "sec ret", "secret\n"):  # no client sends these as they are: every request 401
        result = runner.invoke(app, ["serve", "-m", files["model"], "--token", spaced])
        assert result.exit_code == 2 and "printable ASCII without spaces" in result.stderr, (spaced, result.output)


def test_only_the_task_option_is_refused_twice_others_take_the_last():
    import typer

    from kvcomm.cli.group import repeated_option

    command = typer.main.get_command(app).commands["eval"]
    assert repeated_option(command, ["--ratio", "0.5", "--ratio=0.3", "--data", "a", "--data", "b"]) is None
    assert repeated_option(command, ["--out-dir", "-t", "-t", "facts"]) is None  # a value that looks like it
    assert "given twice" in repeated_option(command, ["-tfacts", "--task", "multihop"])
    assert "given twice" in repeated_option(command, ["-qt", "facts", "-t", "multihop"])  # -q is a flag
    assert repeated_option(command, ["-qtfacts", "--limit", "2"]) is None
