"""The command line on a tiny local model: eval, sweep (JSON + PNG), calibrate, errors."""

from __future__ import annotations

import json

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


def test_sweep_writes_json_and_plot(tiny_dir, tmp_path):
    result = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--task", "facts", "--limit", "3",
                                 "--methods", "baseline,kvcomm,random@0.5", "--ratios", "0.5,1", "-q",
                                 "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sweep-facts-tiny.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["baseline", "kvcomm@0.5", "kvcomm@1", "random@0.5"]
    assert (tmp_path / "sweep-facts-tiny.png").stat().st_size > 1000


def test_calibrate_writes_a_profile(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--task", "facts", "--calib-size", "2",
                                 "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(out.read_text())["ranking"]) == [0, 1, 2, 3]


def test_bad_options_fail_cleanly(tiny_dir):
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--method", "kvcom", "-q"])
    assert result.exit_code != 0 and "Did you mean 'kvcomm'" in str(result.exception)
