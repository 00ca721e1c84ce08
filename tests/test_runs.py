"""Runs as a researcher uses them (issue 13): provenance, run folders that never overwrite,
samples with prompt text, resuming an interrupted sweep, several tasks per run, `kvcomm tasks`,
literal printing and safe file names, and a quiet `-q`."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import transformers
from rich.console import Console
from typer.testing import CliRunner

from kvcomm.cli import app
from kvcomm.eval import Report, print_table
from kvcomm.eval import harness as harness_module
from kvcomm.eval.outputs import safe_name
from kvcomm.models import load_model
from kvcomm.selection import default_alpha
from kvcomm.tasks import METRICS, TASKS, load_task

runner = CliRunner()
GLOB_OR_SPACE = set(" *?[]")


def invoke(*args: str):
    return runner.invoke(app, list(args))


def jsonl_file(path: Path, items: int = 8) -> Path:
    """A JSONL task made of generated look-ups (so its answers are in its contexts)."""
    rows = [{"id": f"mine_{i}", "context": item.context, "question": item.question, "answers": list(item.answers)}
            for i, item in enumerate(load_task("facts", items=items, seed=7).items)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def without_timing(report: dict) -> dict:
    """A results JSON less what may differ between two runs of the same work: times and dates."""
    report = json.loads(json.dumps(report))
    report.pop("provenance")
    for profile in [report.get("profile"), *report.get("profiles", {}).values()]:
        if profile:
            profile["cost"].pop("seconds", None)
    for run in report["runs"]:
        run.pop("seconds"), run.pop("sender_seconds")
    return report


def test_results_record_provenance(tiny_dir, tmp_path):
    data = jsonl_file(tmp_path / "mine.jsonl")
    args = ["eval", "-m", str(tiny_dir), "-t", "jsonl", "--data", str(data), "--limit", "2", "--calib-size", "1",
            "--ratio", "0.5", "-q", "--out-dir", str(tmp_path / "run")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "mine.json").read_text())
    config, provenance = report["config"], report["provenance"]
    assert config["data"] == {"path": str(data.resolve()), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert provenance["command"] == shlex.join(["kvcomm", *args]) and provenance["resumed"] == []
    started = datetime.fromisoformat(provenance["date"])
    assert started.utcoffset().total_seconds() == 0 and abs((datetime.now(UTC) - started).total_seconds()) < 300
    assert config["alpha"] == default_alpha("llama") == report["profile"]["alpha"]  # resolved, not null
    # made by this run's prune, which does not weigh attention (before: "profile", as if one was given)
    assert config["alpha_source"] == "not used (prune ranks by the answer's likelihood)"
    assert config["dtype"] == "float32"
    assert config["seeds"]["bootstrap"] == 0 and config["seeds"]["task"] is None  # read from a file
    assert "task_options" not in config  # the file says it all
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        assert report["environment"]["git_commit"] == head + ("+dirty" if dirty else "")
    else:
        assert "git_commit" not in report["environment"]
    assert provenance["code"] == {"kvcomm": report["environment"]["kvcomm"],
                                  "git_commit": report["environment"].get("git_commit")}


def test_alpha_weighed_by_a_methods_own_paper_rule_is_not_said_unused(tiny_dir, tmp_path):
    result = invoke("sweep", "-m", str(tiny_dir), "--limit", "2", "--calib-size", "1", "--methods",
                    "kvcomm,kvcomm~paper", "--ratios", "0.5", "-q", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "facts.json").read_text())
    assert report["config"]["alpha_source"] == "default for llama"  # before: "not used (prune …)"
    assert report["profiles"]["paper"]["alpha"] == report["config"]["alpha"]
    # a given prune profile's alpha weighed nothing either (before: "profile", as if it had)
    given = invoke("eval", "-m", str(tiny_dir), "--limit", "2", "--calib-size", "0", "--method", "kvcomm",
                   "--ratio", "0.5", "--profile", str(tmp_path / "facts.json"), "-q", "--out", str(tmp_path / "g.json"))
    assert given.exit_code == 0, given.output
    assert json.loads((tmp_path / "g.json").read_text())["config"]["alpha_source"] == \
        "not used (the profile's prune ranks by the answer)"


def test_alpha_given_and_seeds_are_recorded(tiny_dir, tmp_path):
    result = invoke("sweep", "-m", str(tiny_dir), "--limit", "2", "--methods", "kvcomm,random", "--ratios", "0.5",
                    "--seed", "5", "--alpha", "0.3", "--selection", "paper", "-q", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "facts.json").read_text())["config"]
    assert (config["alpha"], config["alpha_source"]) == (0.3, "given")
    assert config["seeds"] == {"bootstrap": 0, "task": 0, "methods": {"random@0.5~seed5": 5}}
    # random layers weigh no prior: alone, the run refuses --alpha (before: recorded as if it had been used)
    alone = invoke("sweep", "-m", str(tiny_dir), "--limit", "2", "--methods", "random", "--ratios", "0.5",
                   "--alpha", "0.3", "--selection", "paper", "-q", "--out-dir", str(tmp_path / "alone"))
    assert alone.exit_code == 2 and "no method of this run ranks layers" in alone.output
    assert config["task_options"] == load_task("facts").options  # the generator's, defaults filled in


def test_default_folder_is_timestamped_and_nothing_is_overwritten(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "-m", str(tiny_dir), "--limit", "1", "--method", "baseline", "-q"]
    assert invoke(*args).exit_code == 0 and invoke(*args).exit_code == 0
    folders = sorted((tmp_path / "results").iterdir())
    assert len(folders) == 2  # the second run did not reuse the first one's folder
    for folder in folders:
        assert re.fullmatch(r"\d{8}-\d{6}-tiny(-\d+)?", folder.name), folder.name
        assert (folder / "facts.json").is_file() and (folder / "facts-samples.jsonl").is_file()
    first = folders[0] / "facts.json"
    before = first.read_bytes()
    refused = invoke(*args, "--out-dir", str(folders[0]))
    assert refused.exit_code == 2 and "exists; pass --overwrite" in refused.stderr
    assert first.read_bytes() == before
    replaced = invoke(*args, "--out-dir", str(folders[0]), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "--overwrite" in json.loads(first.read_text())["provenance"]["command"]


def test_samples_hold_each_prompt_as_text(tiny_dir, tmp_path):
    result = invoke("sweep", "-m", str(tiny_dir), "--limit", "3", "--methods", "baseline,kvcomm", "--ratios", "1",
                    "-q", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "facts-samples.jsonl").read_text().splitlines()]
    assert [(s["label"], s["id"]) for s in lines] == [
        (label, f"facts_0_{i:04d}") for label in ("baseline", "kvcomm@1") for i in range(3)]
    tokenizer = load_model(str(tiny_dir)).tokenizer
    items = {item.id: item for item in load_task("facts").items}
    for sample in lines:
        item = items[sample["id"]]
        assert sample["receiver_prompt"] == tokenizer.decode(sample["receiver_ids"], skip_special_tokens=False)
        assert item.question in sample["receiver_prompt"] and sample["gold"] == list(item.answers)
        if sample["label"] == "baseline":
            assert sample["sender_prompt"] is None and item.context not in sample["receiver_prompt"]
        else:
            assert sample["sender_prompt"] == tokenizer.decode(sample["sender_ids"], skip_special_tokens=False)
            assert item.context in sample["sender_prompt"]
    report = json.loads((tmp_path / "facts.json").read_text())
    assert [s["answer"] for s in lines] == [i["answer"] for run in report["runs"] for i in run["items"]]


def test_an_interrupted_two_task_sweep_resumes_to_the_same_results(tiny_dir, tmp_path, monkeypatch):
    data = jsonl_file(tmp_path / "mine.jsonl")
    common = ["sweep", "-m", str(tiny_dir), "-t", "facts,jsonl", "--data", f"jsonl={data}", "--limit", "6",
              "--batch-size", "2", "--calib-size", "1", "--methods", "baseline,kvcomm,online", "--ratios", "0.5",
              "--interval", "3", "-q"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert invoke(*common, "--out-dir", str(whole)).exit_code == 0

    real_run_one, calls = harness_module._run_one, []

    def interrupted(method, batch):  # 3 batches x 3 configurations per task: stop at the 14th
        calls.append(method.label)
        if len(calls) == 14:
            raise KeyboardInterrupt
        return real_run_one(method, batch)

    monkeypatch.setattr(harness_module, "_run_one", interrupted)
    stopped = invoke(*common, "--out-dir", str(parts))
    assert stopped.exit_code in (1, 130) and f"--resume {parts}" in stopped.stderr  # 130: SIGINT
    assert (parts / "facts.json").is_file() and not (parts / "mine.json").exists()

    other = invoke(*common, "--out-dir", str(parts), "--resume", str(parts), "--batch-size", "3")
    assert other.exit_code == 2 and "cannot resume" in other.stderr and "batch_size: 2 → 3" in other.stderr
    ratio = invoke(*common[:-5], "--ratios", "0.3", "--interval", "3", "-q", "--out-dir", str(parts), "--resume",
                   str(parts))  # the difference inside the methods' list is named (before, both lists cut short)
    assert ratio.exit_code == 2 and "methods[1].options.ratio: 0.5 → 0.3" in ratio.stderr, ratio.stderr

    calls.clear()
    resumed = invoke(*common, "--out-dir", str(parts), "--resume", str(parts))
    assert resumed.exit_code == 0, resumed.output
    assert len(calls) == 5  # the 13 finished (configuration, batch) pairs were not run again
    for name in ("facts", "mine"):
        finished, interrupted_then_resumed = (json.loads((folder / f"{name}.json").read_text())
                                              for folder in (whole, parts))
        assert without_timing(interrupted_then_resumed) == without_timing(finished)
        assert (parts / f"{name}-samples.jsonl").read_text() == (whole / f"{name}-samples.jsonl").read_text()
        assert (parts / f"{name}.png").is_file() and (parts / f"{name}-bytes.png").is_file()
    provenance = json.loads((parts / "mine.json").read_text())["provenance"]
    assert "--resume" not in provenance["command"] and "--resume" in provenance["resumed"][-1]["command"]
    assert any(run["details"] and run["details"]["drift"] for run in json.loads((parts / "mine.json").read_text())[
        "runs"])  # online calibration rebuilt its ranking across the interruption


def test_overwrite_discards_the_earlier_results_so_a_resume_finishes_the_new_run(tiny_dir, tmp_path, monkeypatch):
    """A finished run, then the same folder with --overwrite and a larger --limit, interrupted: its
    --resume runs the new items to the end (before, the earlier results file marked the task
    finished, and the resume stopped there with the old run's 2 items)."""
    folder = tmp_path / "run"
    common = ["eval", "-m", str(tiny_dir), "-t", "facts", "--method", "baseline", "--batch-size", "2", "-q",
              "--out-dir", str(folder)]
    assert invoke(*common, "--limit", "2").exit_code == 0
    real_run_one, calls = harness_module._run_one, []

    def interrupted(method, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_one(method, batch)

    monkeypatch.setattr(harness_module, "_run_one", interrupted)
    stopped = invoke(*common, "--limit", "4", "--overwrite")
    assert stopped.exit_code in (1, 130) and not (folder / "facts.json").exists()
    monkeypatch.setattr(harness_module, "_run_one", real_run_one)
    resumed = invoke(*common, "--limit", "4", "--resume", str(folder))
    assert resumed.exit_code == 0 and "finished already" not in resumed.stdout, resumed.output
    assert json.loads((folder / "facts.json").read_text())["config"]["test_items"] == 4


def test_batch_files_left_without_their_run_json_are_refused_until_overwrite(tiny_dir, tmp_path):
    """A checkpoint folder holding batch files but no run.json (an earlier removal interrupted) is
    refused, naming it, rather than a new run started on top of them; --overwrite clears it."""
    folder = tmp_path / "run"
    common = ["eval", "-m", str(tiny_dir), "-t", "facts", "--method", "baseline", "--limit", "4", "--batch-size", "2",
              "-q", "--out-dir", str(folder)]
    assert invoke(*common).exit_code == 0
    (checkpoint,) = folder.glob("*.checkpoint")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["batch-00000.json", "batch-00001.json", "run.json"]
    for path in [checkpoint / "run.json", *(p for p in folder.iterdir() if p.is_file())]:
        path.unlink()
    for extra, message in (([], f"{checkpoint} exists; pass --overwrite"),
                           (["--resume", str(folder)], f"{checkpoint} holds batch files")):
        refused = invoke(*common, *extra)
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
        assert "--overwrite" in refused.stderr and len(list(checkpoint.iterdir())) == 2
    assert invoke(*common, "--overwrite").exit_code == 0
    assert json.loads((folder / "facts.json").read_text())["runs"][0]["n"] == 4


def test_mistakes_in_the_methods_or_selection_are_refused_before_a_model_loads(tiny_dir, tmp_path, monkeypatch):
    from kvcomm import agents as agents_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    profile = tmp_path / "paper.json"
    assert invoke("calibrate", "-m", str(tiny_dir), "-t", "facts", "--selection", "paper", "--out",
                  str(profile)).exit_code == 0
    monkeypatch.setattr(agents_module.Agents, "load", no_model)
    twice = invoke("sweep", "-m", str(tiny_dir), "-t", "facts", "--methods", "kvcomm@0.5,kvcomm", "--ratios", "0.5",
                   "--out-dir", str(tmp_path / "a"))
    assert twice.exit_code == 2 and "kvcomm@0.5 is given twice" in twice.stderr, twice.output
    other = invoke("eval", "-m", str(tiny_dir), "-t", "facts", "--method", "kvcomm", "--selection", "prune",
                   "--profile", str(profile), "--out-dir", str(tmp_path / "b"))
    assert other.exit_code == 2 and "--selection prune and a profile ranked by paper" in other.stderr, other.output


def test_several_tasks_with_their_data_write_one_results_file_each(tiny_dir, tmp_path):
    data = jsonl_file(tmp_path / "mine.jsonl")
    result = invoke("eval", "-m", str(tiny_dir), "-t", "jsonl,facts", "--data", f"jsonl={data}", "--limit", "2",
                    "--method", "baseline", "-q", "--out-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run").glob("*.json")) == ["facts.json", "mine.json"]
    for name in ("facts", "mine"):
        report = Report.model_validate_json((tmp_path / "run" / f"{name}.json").read_text())
        assert report.config["task"] == name and report.runs[0].n == 2


def test_a_jsonl_task_takes_its_metric_and_budget_from_the_command_line(tiny_dir, tmp_path):
    data = jsonl_file(tmp_path / "mine.jsonl")
    result = invoke("eval", "-m", str(tiny_dir), "-t", "jsonl", "--data", str(data), "--limit", "3", "--method",
                    "skyline", "--metric", "exact_match", "--max-new-tokens", "2", "-q", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "mine.json").read_text())
    assert (report["config"]["metric"], report["config"]["max_new_tokens"]) == ("exact_match", 2)
    assert all(len(i["answer"]) <= 2 for i in report["runs"][0]["items"])  # a token is at most one character here
    assert re.search(r"method\s+┃\s+exact_match\s+┃", result.stdout)  # the primary column


def test_tasks_command_lists_metric_and_budget():
    result = invoke("tasks")
    assert result.exit_code == 0, result.output
    for name in TASKS:
        info = TASKS.get(name)
        assert info.metric in METRICS
        assert re.search(rf"│ {name}\s+│ {info.metric}\s+│\s+{info.max_new_tokens} │", result.stdout), name


def test_labels_are_printed_literally(tiny_dir, tmp_path):
    result = invoke("eval", "-m", str(tiny_dir), "--limit", "1", "--ratio", "0.5", "--mode", "shift-back", "-q",
                    "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "kvcomm@0.5[shift-back]" in result.stdout
    report = Report.model_validate_json((tmp_path / "facts.json").read_text())
    report.runs[0].label = "[bold]x[/bold] :smile: [shift-back]"
    console = Console(record=True, width=200)
    print_table(report, console)
    assert "[bold]x[/bold] :smile: [shift-back]" in console.export_text()


def test_file_names_have_no_glob_characters_or_spaces(tiny_dir, tmp_path, monkeypatch):
    odd = tmp_path / "my model [v2]*?"
    shutil.copytree(tiny_dir, odd)
    monkeypatch.chdir(tmp_path)
    result = invoke("sweep", "-m", str(odd), "--limit", "1", "--methods", "baseline,kvcomm", "--ratios", "1",
                    "--mode", "shift-back", "-q")
    assert result.exit_code == 0, result.output
    written = list((tmp_path / "results").rglob("*"))
    assert any(p.name == "facts.json" for p in written) and len(written) > 5
    for path in written:
        assert not GLOB_OR_SPACE & set(path.relative_to(tmp_path).as_posix()), path
    assert safe_name("kvcomm@0.5[shift-back] x/y*?") == "kvcomm@0.5-shift-back-x-y"


def test_quiet_silences_transformers(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "again")  # another name, so the model is loaded again
    args = ["eval", "--limit", "1", "--method", "baseline"]
    loud = invoke(*args, "-m", str(tiny_dir), "--out-dir", str(tmp_path / "loud"))
    assert loud.exit_code == 0 and "Loading weights" in loud.stderr  # the bar -q must silence
    verbosity = transformers.utils.logging.get_verbosity()
    quiet = invoke(*args, "-m", str(tmp_path / "again"), "--out-dir", str(tmp_path / "quiet"), "-q")
    assert quiet.exit_code == 0, quiet.output
    assert "Loading weights" not in quiet.stderr and "%|" not in quiet.stderr
    assert transformers.utils.logging.get_verbosity() == verbosity  # set back afterwards
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_runs_started_in_the_same_second_get_folders_of_their_own(tiny_dir, tmp_path, monkeypatch):
    """The default run folder was named, not made, when a run began: runs started in one second all
    wrote into it and kept the last one's results; and a ./results that is a file was found after
    the work, with a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("kvcomm.eval.outputs.run_stamp", lambda now=None: "20261125-120000")
    made = []
    for method in ("baseline", "skyline"):
        result = invoke("eval", "-m", str(tiny_dir), "--method", method, "--limit", "1", "--calib-size", "0", "-q")
        assert result.exit_code == 0, result.output
        made.append(sorted(p.name for p in (tmp_path / "results").iterdir()))
    assert made[-1] == [f"20261125-120000-{tiny_dir.name}", f"20261125-120000-{tiny_dir.name}-2"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "results").write_text("not a folder")
    monkeypatch.chdir(other)
    refused = invoke("eval", "-m", str(tiny_dir), "--method", "baseline", "--limit", "1", "--calib-size", "0", "-q")
    assert refused.exit_code == 2 and "cannot make a run folder here" in refused.output, refused.output


def test_kvcomm_data_naming_a_path_with_a_space_is_read_whole(tiny_dir, tmp_path):
    """click split a list option's environment value at spaces: KVCOMM_DATA="my data.jsonl" was
    read as the files "my" and "data.jsonl"."""
    data = jsonl_file(tmp_path / "my data.jsonl")
    result = runner.invoke(app, ["eval", "-m", str(tiny_dir), "-t", "jsonl", "--method", "baseline", "--limit", "2",
                                 "--calib-size", "0", "-q", "--out-dir", str(tmp_path / "run")],
                           env={"KVCOMM_DATA": str(data)})
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "my-data.json").read_text())["config"]["data"]["path"] == str(data)


def test_overwrite_keeps_the_earlier_results_until_the_models_have_loaded(tiny_dir, tmp_path, monkeypatch):
    """--overwrite deleted the earlier run's files while planning: a model that then failed to load
    left neither the old results nor new ones. Its checkpoint still goes at once."""
    from kvcomm import agents as agents_module

    folder = tmp_path / "run"
    common = ["eval", "-m", str(tiny_dir), "-t", "facts", "--method", "baseline", "--limit", "2", "--batch-size", "2",
              "-q", "--out-dir", str(folder)]
    assert invoke(*common).exit_code == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise MemoryError("no room for the model")

    monkeypatch.setattr(agents_module.Agents, "load", broken)
    failed = invoke(*common, "--overwrite")
    assert isinstance(failed.exception, MemoryError), failed.output
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not list(folder.glob("*.checkpoint"))  # the checkpoint goes at once (a resume must not take it)
    monkeypatch.undo()
    (folder / "facts.checkpoint").mkdir()
    (folder / "facts.checkpoint" / "notes.txt").write_text("mine")  # kept there: the folder is not the run's alone
    again = invoke(*common, "--limit", "3", "--overwrite")  # loaded: the old files go, the new run's replace them
    assert again.exit_code == 0, again.output
    assert (folder / "facts.checkpoint" / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "facts.json").read_text())["config"]["test_items"] == 3


def test_an_interrupted_overwrite_of_several_tasks_leaves_no_earlier_run_to_resume(tiny_dir, tmp_path, monkeypatch):
    """Each task's earlier files went only when that task began: interrupted in the first task, the
    second's earlier checkpoint stayed, and --resume reported it "finished already" with the earlier
    run's results. The checkpoints go at once."""
    import kvcomm.cli.runner as runner_module

    folder = tmp_path / "run"
    common = ["eval", "-m", str(tiny_dir), "-t", "facts,multihop", "--method", "baseline", "--limit", "2",
              "--batch-size", "1", "-q", "--out-dir", str(folder)]
    assert invoke(*common).exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "evaluate", interrupted)
    invoke(*common, "--overwrite")
    monkeypatch.undo()
    assert not list(folder.glob("*.checkpoint"))
    resumed = invoke(*common, "--resume", str(folder))
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output, resumed.output


def test_overwrite_removes_only_what_the_command_writes(tiny_dir, tmp_path):
    """``eval --out x.json --overwrite`` deleted x.png, a plot eval never writes (a sweep's plot of
    the same name, or a file of the user's)."""
    out = tmp_path / "x.json"
    args = ["eval", "-m", str(tiny_dir), "--method", "baseline", "--limit", "1", "--calib-size", "0", "-q",
            "--out", str(out)]
    assert invoke(*args).exit_code == 0
    (tmp_path / "x.png").write_bytes(b"a plot of mine")
    again = invoke(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "x.png").read_bytes() == b"a plot of mine" and out.is_file()
