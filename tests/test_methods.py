"""NLD, CIPHER, AC, multi-sender and online calibration on a tiny model."""

from __future__ import annotations

import pytest
import torch

from kvcomm import Agents, EvalConfig, build_methods, evaluate
from kvcomm.errors import ConfigError
from kvcomm.methods.debate import embedding_matrix, expected_embeddings
from kvcomm.tasks import load_task
from kvcomm.tasks.base import split_context
from tests.conftest import tiny_loaded


def no_codebook():
    raise AssertionError("no codec here needs a codebook")


@pytest.fixture(scope="module")
def agents() -> Agents:
    model = tiny_loaded("llama")
    return Agents(model, model)


def run(agents, names, items=4, **options):
    task = load_task("facts", items=items + 1)
    return evaluate(agents, task, build_methods(names, **options), EvalConfig(limit=items, batch_size=3,
                                                                               calib_size=1), progress=False)


def test_nld_sends_a_bounded_text_summary_and_is_deterministic(agents):
    first = run(agents, ["nld"], round_one_tokens=5).runs[0]
    again = run(agents, ["nld"], round_one_tokens=5).runs[0]
    assert [i.answer for i in first.items] == [i.answer for i in again.items]
    for item in first.items:
        assert item.kv_bytes == len(item.message.encode("utf-8"))
    from kvcomm.methods.debate import NaturalLanguageDebate

    spoken = NaturalLanguageDebate(round_one_tokens=5).speak(agents.sender, [agents.sender.encode_message("Hi")])
    embeds, ids = spoken[0]
    assert len(ids) <= 5 and embeds.shape == (len(ids), agents.sender.model.config.hidden_size)


def test_cipher_sends_at_most_budget_vectors(agents):
    result = run(agents, ["cipher"], round_one_tokens=4).runs[0]
    hidden = agents.sender.model.config.hidden_size
    for item in result.items:
        vectors = int(item.message.split()[0])
        assert vectors <= 4 and item.kv_bytes == vectors * hidden * 4


def test_cipher_with_a_cache_equals_recomputing_the_prefix(agents):
    model = agents.sender
    prompt = [model.encode_message("Instruction: say something. Context: Oslo.")]
    cached = expected_embeddings(model, prompt, 3, temperature=1.0)[0]
    table = embedding_matrix(model)
    embeds = table[torch.tensor(prompt[0])][None]
    with torch.no_grad():
        for step in range(cached.shape[0]):
            probs = torch.softmax(model.model(inputs_embeds=embeds).logits[0, -1], -1)
            vector = probs @ table
            assert torch.allclose(vector, cached[step], atol=1e-5)
            embeds = torch.cat([embeds, vector[None, None]], 1)


def test_cipher_survives_an_end_token_at_the_first_step(agents):
    model = tiny_loaded("llama")
    model.stop_ids = list(range(len(model.tokenizer)))  # every vector's nearest token ends the message
    stubborn = Agents(model, model)
    result = run(stubborn, ["cipher"], round_one_tokens=4).runs[0]
    assert all(i.message.startswith("0 vectors") and i.kv_bytes == 0 for i in result.items)


def test_ac_negative_indices_resolve_and_graft(agents):
    depth = agents.num_layers
    negative = run(agents, ["ac"], fuse="replace", layer_k=-1, layer_j=-2).runs[0]
    positive = run(agents, ["ac"], fuse="replace", layer_k=depth, layer_j=depth - 2).runs[0]
    assert negative.label == positive.label == f"ac-replace@k{depth}j{depth - 2}"
    assert [i.answer for i in negative.items] == [i.answer for i in positive.items]
    hidden = agents.sender.model.config.hidden_size
    assert all(i.kv_bytes == hidden * 4 for i in negative.items)
    with pytest.raises(ConfigError):
        run(agents, ["ac"], layer_j=depth)


def test_ac_changes_the_receiver_only_through_the_graft(agents):
    from kvcomm.methods.ac import ActivationCommunication
    from kvcomm.methods.base import Setup

    method = ActivationCommunication(fuse="replace", layer_k=2, layer_j=1)
    method.setup(Setup(agents.num_layers, "llama", lambda: [], no_codebook))
    task = load_task("facts", items=2)
    from kvcomm.agents import Batch

    batch = Batch(agents, task, task.items)
    grafted = method.run(batch).answers
    baseline = build_methods(["baseline"])[0].run(Batch(agents, task, task.items)).answers
    mean = ActivationCommunication(fuse="mean", layer_k=0, layer_j=0)
    mean.setup(Setup(agents.num_layers, "llama", lambda: [], no_codebook))
    assert isinstance(grafted[0], str) and len(baseline) == 2 and mean.label == "ac-mean@k0j0"
    # hooks are removed after each run: a later baseline is unaffected
    assert build_methods(["baseline"])[0].run(Batch(agents, task, task.items)).answers == baseline


def test_two_senders_split_the_context(agents):
    report = run(agents, ["kvcomm"], ratios=[1.0], senders=2)
    assert report.runs[0].label == "kvcomm@1x2" and report.runs[0].n == 4
    assert split_context("A b. C d. E f g h. I.", 2) == ["A b. C d.", "E f g h. I."]
    with pytest.raises(Exception, match="cannot split"):
        split_context("One sentence only", 2)


def test_online_calibration_rebuilds_and_scores_each_item_once(agents):
    result = run(agents, ["online"], items=6, ratios=[0.5], interval=2).runs[0]
    assert result.n == 6 and [i.id for i in result.items] == [f"facts_0_{k:04d}" for k in range(6)]
    rebuilds = result.details["rebuilds"]
    assert [r["after_items"] for r in rebuilds] == [0, 2, 4, 6]
    assert all(len(r["layers"]) == 2 for r in rebuilds)
    assert len(result.details["drift"]) == 3 and all(-1 <= d["kendall_tau"] <= 1 for d in result.details["drift"])


def test_every_method_in_one_sweep_reports_bytes(agents):
    report = run(agents, ["baseline", "skyline", "kvcomm", "nld", "cipher", "ac", "online"], ratios=[0.5],
                 round_one_tokens=3, interval=2)
    sent = {r.method: r.kv_bytes_mean for r in report.runs}
    assert sent["baseline"] == sent["skyline"] == 0
    assert all(sent[m] > 0 for m in ("kvcomm", "ac", "online"))
