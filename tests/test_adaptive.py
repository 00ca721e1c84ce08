"""The adaptive budget: ranked layers in rounds until each item's answer is stable."""

from __future__ import annotations

import pytest

from kvcomm import Agents, EvalConfig, build_methods, evaluate
from kvcomm.errors import ConfigError
from kvcomm.methods.adaptive import AdaptiveKVComm, round_counts
from kvcomm.tasks import load_task
from tests.conftest import tiny_loaded

ITEMS = 8


@pytest.fixture(scope="module")
def agents() -> Agents:
    model = tiny_loaded("llama", layers=8)
    return Agents(model, model)


def sweep(agents, names, ratios=None, **options):
    task = load_task("facts", items=ITEMS + 1)
    report = evaluate(agents, task, build_methods(names, ratios=ratios, **options),
                      EvalConfig(limit=ITEMS, batch_size=3, calib_size=1, selection="paper"), progress=False)
    return {run.label: run for run in report.runs}


def test_the_rounds_are_the_ranked_layer_counts_up_to_every_layer():
    assert round_counts(30, 0.1) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert round_counts(4, 0.3) == [2, 3, 4]
    assert round_counts(28, 1.0) == [28]
    assert round_counts(8, 0.25) == [2, 4, 6, 8]


@pytest.mark.parametrize("step, patience, label", [(1.0, 1, "adaptive/1"), (0.25, 4, "adaptive/0.25x4")])
def test_both_ends_are_kvcomm_with_every_layer(agents, step, patience, label):
    """One round of every layer; or as much patience as there are rounds, so no item stops early."""
    runs = sweep(agents, ["adaptive", "kvcomm"], ratios=[1.0], step=step, patience=patience)
    alone, full = runs[label], runs["kvcomm@1"]
    assert [i.answer for i in alone.items] == [i.answer for i in full.items]
    assert [i.kv_bytes for i in alone.items] == [i.kv_bytes for i in full.items]
    assert alone.details["mean_ratio"] == 1.0 and alone.details["layers_fetched"] == {"8": ITEMS}


@pytest.mark.parametrize("patience", [1, 2])
def test_each_item_stops_at_the_first_round_its_answer_held_and_answers_as_kvcomm_there(agents, patience):
    ratios = [0.25, 0.5, 0.75, 1.0]
    runs = sweep(agents, ["adaptive", "kvcomm"], ratios=ratios, step=0.25, patience=patience)
    adaptive = runs["adaptive/0.25" + (f"x{patience}" if patience > 1 else "")]
    fixed = [runs[f"kvcomm@{r:g}"] for r in ratios]
    stops = []
    for row, item in enumerate(adaptive.items):
        answers = [run.items[row].answer for run in fixed]
        sizes = [run.items[row].kv_bytes for run in fixed]
        assert sizes == sorted(set(sizes))  # more layers, more bytes: the bytes name the round
        stop = sizes.index(item.kv_bytes)
        assert item.answer == answers[stop]
        held = [k for k in range(patience, len(ratios)) if len(set(answers[k - patience:k + 1])) == 1]
        assert stop == (held[0] if held else len(ratios) - 1)
        stops.append(stop)
    assert sum(adaptive.details["layers_fetched"].values()) == ITEMS
    assert adaptive.details["mean_ratio"] == pytest.approx(sum((s + 1) * 2 for s in stops) / ITEMS / 8)
    assert min(stops) >= patience  # an item needs patience + 1 rounds to be seen holding


def test_adaptive_options_are_checked_where_they_are_made():
    with pytest.raises(ConfigError, match="step"):
        AdaptiveKVComm(step=0)
    with pytest.raises(ConfigError, match="patience"):
        AdaptiveKVComm(patience=0)
    with pytest.raises(ConfigError, match="ratio"):
        AdaptiveKVComm(ratio=0.5)
    assert AdaptiveKVComm(selection="paper").label == "adaptive~paper"


def test_a_resumed_run_counts_the_layers_its_earlier_batches_fetched(agents, tmp_path):
    """Batches taken from a checkpoint give their per-item layer counts back (state/restore)."""
    from kvcomm.eval.checkpoint import Checkpoint
    from kvcomm.eval.provenance import run_identity

    task = load_task("facts", items=ITEMS + 1)
    config = EvalConfig(limit=ITEMS, batch_size=3, calib_size=1, selection="paper")
    methods = lambda: build_methods(["adaptive"], step=0.25)  # noqa: E731
    identity = run_identity(task, methods(), config.model_dump(mode="json"), agents.sender.name,
                            agents.receiver.name, "float32", None)
    first = evaluate(agents, task, methods(), config, progress=False, checkpoint=Checkpoint(tmp_path / "c", identity))
    again = evaluate(agents, task, methods(), config, progress=False,
                     checkpoint=Checkpoint(tmp_path / "c", identity, resume=True))  # every batch from the checkpoint
    assert again.runs[0].details == first.runs[0].details
    assert sum(first.runs[0].details["layers_fetched"].values()) == ITEMS
