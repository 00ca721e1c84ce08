"""A few checks on the embedded default model (skipped when it is not installed)."""

from __future__ import annotations

import pytest
import torch

from kvcomm import Agents, EvalConfig, build_methods, evaluate
from kvcomm.models import DEFAULT_MODEL, EMBEDDED
from kvcomm.protocol import build_receiver_input, prefill, prefill_logits
from kvcomm.tasks import load_task
from tests.conftest import shared_file

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not EMBEDDED.get(DEFAULT_MODEL).is_installed(),
                       reason=f"run `kvcomm models install {DEFAULT_MODEL}`"),
]


@pytest.fixture(scope="module")
def agents() -> Agents:
    return Agents.load(DEFAULT_MODEL)


def test_all_layers_equal_the_concatenated_chat_prompts(agents):
    model = agents.receiver
    task = load_task("facts", items=1)
    item = task.items[0]
    sender_ids = torch.tensor([model.encode_message(task.sender_message(item))])
    receiver_ids = torch.tensor([model.encode_message(task.receiver_message(item))])
    with torch.no_grad():
        reference = model.model(torch.cat([sender_ids, receiver_ids], 1)).logits[:, sender_ids.shape[1]:]
        start = build_receiver_input(model.model, prefill(model.model, sender_ids, sender_ids >= 0), range(30))
        got = prefill_logits(model.model, start, receiver_ids, receiver_ids >= 0)
    assert (got - reference).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


def test_batched_answers_equal_one_by_one_on_countries(agents):
    task = load_task("countries", shared_file("countries.jsonl"))
    methods = lambda: build_methods(["baseline", "skyline", "kvcomm"], layers=list(range(0, 30, 2)))  # noqa: E731
    one = evaluate(agents, task, methods(), EvalConfig(limit=8, batch_size=1, calib_size=0), progress=False)
    many = evaluate(agents, task, methods(), EvalConfig(limit=8, batch_size=8, calib_size=0), progress=False)
    for a, b in zip(one.runs, many.runs):
        assert [i.answer for i in a.items] == [i.answer for i in b.items], a.label


def test_shared_kv_carries_the_context(agents):
    task = load_task("facts", items=17)
    methods = build_methods(["baseline", "kvcomm"], [1.0])
    report = evaluate(agents, task, methods, EvalConfig(limit=16, calib_size=1), progress=False)
    baseline, kvcomm = (r.scores["contains"].mean for r in report.runs)
    assert kvcomm > baseline
