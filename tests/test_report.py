"""benchmarks/report.py: pooled files are summarised again in full, runs pair with random in their
own mask mode, and the codec table's reference fits the layout the run read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[1] / "benchmarks" / "report.py")
assert spec is not None and spec.loader is not None
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def run(label, scores, method="kvcomm", fraction=0.5, mode="causal", codec=None, layers=(0, 1), kv_bytes=100.0,
        start=0):
    items = [{"id": f"i{start + n}", "kv_bytes": kv_bytes, "scores": {"paper_f1": s, "contains": s}, "answer": "a"}
             for n, s in enumerate(scores)]
    mean = sum(scores) / len(scores)
    return {"label": label, "method": method, "fraction": fraction, "mode": mode, "codec": codec,
            "layers": list(layers), "n": len(items), "kv_bytes_mean": kv_bytes, "seconds": 1.0,
            "sender_seconds": 0.5, "items": items,
            "scores": {metric: {"mean": mean, "ci95": [mean, mean]} for metric in ("paper_f1", "contains")}}


def file(*runs, pieces="chats"):
    return {"config": {"receiver": "m", "task": "t", "metric": "contains", "num_layers": 4, "pieces": pieces},
            "runs": list(runs)}


def test_pooling_summarises_every_metric_again_and_sums_the_time():
    ones, zeros = file(run("kvcomm@0.5", [1.0] * 4)), file(run("kvcomm@0.5", [0.0] * 4, start=4))
    merged = report.pooled([ones, zeros])[0]["runs"][0]
    assert merged["n"] == 8 and merged["seconds"] == 2.0 and merged["sender_seconds"] == 1.0
    for metric in ("paper_f1", "contains"):
        low, high = merged["scores"][metric]["ci95"]
        assert merged["scores"][metric]["mean"] == 0.5 and low < 0.5 < high  # not the first file's [1, 1]


def test_a_run_is_compared_with_random_in_its_own_mask_mode():
    mine = run("kvcomm@0.5[padded-zero]", [1.0, 1.0], mode="padded-zero")
    runs = file(run("random@0.5", [1.0, 1.0], method="random"), mine,
                run("random@0.5[padded-zero]", [0.0, 0.0], method="random", mode="padded-zero"))
    assert report.against_random(runs, mine) == "+1.000"


def test_the_codec_reference_for_passages_is_the_every_layer_run():
    half = run("kvcomm@0.5", [1.0], kv_bytes=300.0)
    with pytest.raises(SystemExit, match="read as passages, the codec table needs an uncompressed kvcomm run at ratio"):
        report.fp16_all_layers(file(half, pieces="passages")["config"], [half])
    every = run("kvcomm@1", [1.0], fraction=1.0, layers=(0, 1, 2, 3), kv_bytes=400.0)
    assert report.fp16_all_layers(file(half, every, pieces="passages")["config"], [half, every]) == 200.0
