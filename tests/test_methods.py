"""NLD, CIPHER, AC, multi-sender and online calibration on a tiny model."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kvcomm import Agents, EvalConfig, build_methods, evaluate, make_method
from kvcomm.errors import ConfigError, DataError
from kvcomm.eval.batch import Batch
from kvcomm.methods.base import Setup
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


def test_nld_receivers_read_the_summary_with_their_own_embeddings(monkeypatch):
    """The summary travels as words: a receiver of other weights embeds its tokens with its own
    table (before, the sender's embedding rows were spliced into the receiver's input)."""
    import kvcomm.methods.debate as debate

    sender, receiver = tiny_loaded("llama", seed=1), tiny_loaded("llama", seed=2)
    seen = []
    real = debate.greedy_generate

    def spy(model, start, tokens, *args):
        if tokens.is_floating_point():
            seen.append(tokens)
        return real(model, start, tokens, *args)

    monkeypatch.setattr(debate, "greedy_generate", spy)
    task = load_task("facts", items=2)
    batch = Batch(Agents(sender, receiver), task, task.items[:1])
    method = make_method("nld", round_one_tokens=4)
    summary = method.speak(sender, [sender.encode_message(f"Instruction: {debate.SENDER_AWARE} Context: "
                                                          f"{task.items[0].context}")])[0][1]
    method.run(batch)
    assert summary  # the sender says something
    rows = embedding_matrix(receiver)[torch.tensor(summary)]
    inputs = seen[-1][0]
    found = any(torch.equal(inputs[i:i + len(summary)], rows) for i in range(inputs.shape[0] - len(summary) + 1))
    assert found and not torch.equal(rows, embedding_matrix(sender)[torch.tensor(summary)])


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
    """The graft replaces the last prompt token's hidden state before layer j: that position's logits
    change, every earlier position's logits stay exactly as without it, and the hook is removed after."""
    from kvcomm.methods.ac import FUSIONS, ActivationCommunication, _graft_once
    from kvcomm.protocol import empty_input, pad_left, prefill_logits

    method = ActivationCommunication(fuse="replace", layer_k=2, layer_j=1)
    method.setup(Setup(agents.num_layers, "llama", lambda rule=None: [], no_codebook))
    mean = ActivationCommunication(fuse="mean", layer_k=0, layer_j=0)
    mean.setup(Setup(agents.num_layers, "llama", lambda rule=None: [], no_codebook))
    assert method.label == "ac-replace@k2j1" and mean.label == "ac-mean@k0j0"
    # before setup, what was given (two configurations apart by layer_j alone were both "ac-mean")
    assert [ActivationCommunication(**given).label for given in ({"layer_j": 5}, {"layer_k": 2}, {})] == \
        ["ac-mean@j5", "ac-mean@k2", "ac-mean"]
    model = agents.receiver
    ids, valid = pad_left([model.encode_message("Instruction: answer. Question: where?")], model.pad_id)
    vector = torch.randn(1, model.model.config.hidden_size)
    plain = prefill_logits(model.model, empty_input(model.model, 1), ids, valid)
    layer = model.model.get_decoder().layers[1]
    handle = layer.register_forward_pre_hook(_graft_once(vector, FUSIONS["replace"]), with_kwargs=True)
    try:
        grafted = prefill_logits(model.model, empty_input(model.model, 1), ids, valid)
    finally:
        handle.remove()
    assert (grafted[0, -1] - plain[0, -1]).abs().max() > 1e-3  # the last position moved
    assert torch.equal(grafted[0, :-1], plain[0, :-1])  # nothing before it did
    task = load_task("facts", items=2)
    baseline = make_method("baseline").run(Batch(agents, task, task.items)).answers
    method.run(Batch(agents, task, task.items))
    assert make_method("baseline").run(Batch(agents, task, task.items)).answers == baseline  # hook removed


def test_two_senders_split_the_context(agents):
    report = run(agents, ["kvcomm"], ratios=[1.0], senders=2)
    assert report.runs[0].label == "kvcomm@1x2" and report.runs[0].n == 4
    assert split_context("A b. C d. E f g h. I.", 2) == ["A b. C d.", "E f g h. I."]
    assert split_context("One sentence only", 2) == ["One sentence", "only"]  # too few sentences: words
    with pytest.raises(DataError, match="cannot split a context of 1 word"):
        split_context("One", 2)


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


def test_online_takes_a_codec_and_senders_like_the_other_kv_methods(agents):
    report = run(agents, ["online"], items=4, ratios=[1.0], interval=2, codecs=["fp32"], senders=2)
    in_process = run(agents, ["online"], items=4, ratios=[1.0], interval=2, senders=2)
    wired, plain = report.runs[0], in_process.runs[0]
    assert wired.label == "online@1/2x2+fp32" and plain.label == "online@1/2x2"
    assert [i.answer for i in wired.items] == [i.answer for i in plain.items]  # fp32 through the wire is exact
    assert all(w.kv_bytes > p.kv_bytes for w, p in zip(wired.items, plain.items))  # real message sizes
    kvcomm = run(agents, ["kvcomm"], items=4, ratios=[1.0], senders=2).runs[0]  # what the senders read, joined
    assert [i.sender_ids for i in plain.items] == [i.sender_ids for i in kvcomm.items]  # (it was one chat's)


def test_online_ranks_on_its_own_stream_and_needs_no_calibration_items(agents):
    from kvcomm.methods import make_method

    assert not make_method("online", ratio=0.5).ranks_layers and make_method("kvcomm", ratio=0.5).ranks_layers
    task = load_task("facts", items=4)
    report = evaluate(agents, task, build_methods(["online"], ratios=[0.5], interval=2),
                      EvalConfig(limit=4, batch_size=3, calib_size=0), progress=False)
    assert report.runs[0].n == 4 and report.config["calibration_items"] == []


def test_a_commands_default_ratios_are_of_layers_and_blend_keeps_its_own():
    """Default ratios (eval's 0.5, sweep's list) are fractions of layers: blend's ratio is the
    fraction of context tokens recomputed, so it keeps its 0.15 unless ratios are given."""
    defaulted = build_methods(["kvcomm", "blend"], ratios=[0.3, 0.5], layer_ratios_only=True)
    assert [m.label for m in defaulted] == ["kvcomm@0.3", "kvcomm@0.5", "blend@0.15x2"]
    given = build_methods(["kvcomm", "blend"], ratios=[0.3, 0.5])
    assert [m.label for m in given] == ["kvcomm@0.3", "kvcomm@0.5", "blend@0.3x2", "blend@0.5x2"]
    mixed = build_methods(["kvcomm", "random"], ratios=[0.5], layers=(1, 2))  # the list is kvcomm's; random: 0.5
    assert [m.label for m in mixed] == ["kvcomm@1-2", "random@0.5"]
    assert [make_method(name, codec="fp16").codec_name for name in ("blend", "droidspeak")] == ["fp16"] * 2


@pytest.mark.parametrize("name, options, message", [
    ("blend", {"selection": "answer"}, "with share 1 they share every layer"),
    ("droidspeak", {"block": (1, 3), "tolerance": 5.0}, "tolerance guide the profiling"),
])
def test_options_that_would_do_nothing_are_refused(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_method(name, **options)
    assert make_method("adaptive", patience=10).options.patience == 10  # every round of the default step


@pytest.mark.parametrize("name, option, value", [
    ("nld", "codec", "int8"), ("cipher", "codec", "int8"), ("ac", "codec", "int8"), ("baseline", "senders", 2),
    ("kvcomm", "interval", 4), ("random", "layers", (1, 2)), ("nld", "mode", "legacy"), ("ac", "ratio", 0.5),
])
def test_an_option_a_method_does_not_take_is_refused_naming_what_it_takes(name, option, value):
    with pytest.raises(ConfigError, match=f"does not take '{option}'; it takes: ") as err:
        build_methods([name], **{option: value}) if option not in ("ratio", "codec") else build_methods(
            [name], ratios=[value] if option == "ratio" else None, codecs=[value] if option == "codec" else None)
    assert len(str(err.value).splitlines()) == 1


def test_sweep_axes_and_options_apply_to_the_methods_that_take_them():
    built = build_methods(["baseline", "kvcomm", "nld", "random@0.5"], ratios=[0.3, 1.0], codecs=[None, "int8"],
                          senders=2, round_one_tokens=9)
    assert [m.label for m in built] == ["baseline", "kvcomm@0.3x2", "kvcomm@0.3x2+int8", "kvcomm@1x2",
                                        "kvcomm@1x2+int8", "nld[round_one_tokens=9]", "random@0.5x2",
                                        "random@0.5x2+int8"]
    assert built[5].options.round_one_tokens == 9
    with pytest.raises(ConfigError, match="none of the methods baseline, nld takes 'senders'; it is taken by: "):
        build_methods(["baseline", "nld"], senders=2)
    with pytest.raises(ConfigError, match="takes no ratio"):
        build_methods(["nld@0.5"])


@pytest.mark.parametrize("options, message", [
    (dict(ratio=0), "ratio: Input should be greater than 0"), (dict(ratio=1.5), "ratio"),
    (dict(senders=0), "senders"), (dict(codec="int9"), "Did you mean 'int8'"), (dict(mode="strict"), "mode"),
    (dict(), "needs a ratio"), (dict(ratio=0.5, layers=(1,)), "not both"),
])
def test_method_options_are_typed_and_checked_where_they_are_made(options, message):
    with pytest.raises(ConfigError, match=message):
        make_method("kvcomm", **options)


def test_configurations_that_differ_in_an_option_have_their_own_labels(agents):
    """Random layers of two seeds, debates of two budgets, ciphers of two temperatures run side by
    side (before, each pair shared a label and the run was refused); defaults keep the plain names."""
    assert make_method("random", ratio=0.5).label == "random@0.5"
    assert make_method("random", ratio=0.5, seed=3).label == "random@0.5~seed3"
    assert make_method("nld").label == "nld"
    assert make_method("nld", round_one_tokens=64).label == "nld[round_one_tokens=64]"
    assert make_method("cipher", temperature=0.5).label == "cipher[temperature=0.5]"
    with pytest.raises(ConfigError, match="temperature"):  # 1e-45 made every message vector NaN
        make_method("cipher", temperature=1e-45)
    with pytest.raises(ConfigError, match="step"):  # 1e-7 took 15 s per batch to list its rounds
        make_method("adaptive", step=1e-7)
    report = evaluate(agents, load_task("facts", items=3), [make_method("random", ratio=0.5, seed=s) for s in (1, 2)],
                      EvalConfig(limit=2, calib_size=0), progress=False)
    assert [r.label for r in report.runs] == ["random@0.5~seed1", "random@0.5~seed2"]


def test_options_are_frozen_and_recorded_in_the_results(agents):
    method = make_method("random", ratio=0.5, seed=7)
    with pytest.raises(ValidationError):
        method.options.seed = 8  # type: ignore[misc]
    report = run(agents, ["random@0.5"], seed=7)
    assert report.runs[0].options == {"ratio": 0.5, "mode": "causal", "codec": None, "senders": 1, "pieces": "chats",
                                      "seed": 7}


def test_each_method_is_charged_its_own_sender_time_whatever_the_order(agents, monkeypatch):
    """A deterministic clock (one second per reading): every KV method is charged the full cost of the
    prefill it used, whoever ran first, and so is the skyline, which reads its context's KV from that
    prefill (sender and receiver are one model here); the baseline uses none and is charged none."""
    from kvcomm.eval import batch as batch_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(batch_module, "clock", lambda: float(next(ticks)))
    task = load_task("facts", items=5)
    config = EvalConfig(limit=4, batch_size=4, calib_size=1)

    def times(names):
        report = evaluate(agents, task, build_methods(names, ratios=[0.5]), config, progress=False)
        return {r.label: r.sender_seconds for r in report.runs}

    forward = times(["kvcomm", "baseline", "kvcomm@1", "skyline"])
    backward = times(["skyline", "kvcomm@1", "baseline", "kvcomm"])
    assert forward == backward
    assert forward["baseline"] == 0
    assert forward["kvcomm@0.5"] == forward["kvcomm@1"] == forward["skyline"] == 1.0  # one prefill, charged to each
    two = evaluate(agents, task, [make_method("kvcomm", ratio=0.5), make_method("kvcomm", ratio=0.5, senders=2)],
                   config, progress=False)
    charged = {r.label: r.sender_seconds for r in two.runs}
    assert charged["kvcomm@0.5"] == 1.0 and charged["kvcomm@0.5x2"] == 1.0  # each its own prefill only


def test_encoding_a_message_is_sender_time(agents, monkeypatch):
    """A deterministic clock (one second per reading): each message a codec encodes adds one
    second of sender time (before, the encoding was charged to the receiver; its decoding stays
    receiver time)."""
    from kvcomm.eval import batch as batch_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(batch_module, "clock", lambda: float(next(ticks)))
    task = load_task("facts", items=5)
    report = evaluate(agents, task, [make_method("kvcomm", ratio=0.5, codec="fp16"), make_method("kvcomm", ratio=0.5)],
                      EvalConfig(limit=4, batch_size=4, calib_size=1), progress=False)
    wired, plain = report.runs
    assert wired.label == "kvcomm@0.5+fp16" and wired.sender_seconds == plain.sender_seconds + 4  # four messages


def test_the_skyline_reads_its_context_from_the_senders_prefill_and_answers_as_alone():
    """Sender and receiver one model: the skyline prefills only its question on the sender's KV and
    gives the answers of its whole prompt prefilled (two models: it prefills its prompt whole)."""
    from kvcomm.eval.batch import Batch
    from kvcomm.methods.prompt import Baseline, Skyline
    from kvcomm.protocol import greedy_generate

    model = tiny_loaded("llama")
    task = load_task("facts", items=6)
    batch = Batch(Agents(model, model), task, task.items[:5])
    prompt = batch.prompt("receiver", task.skyline_message)
    reused = batch.after_sender(prompt)
    assert reused is not None
    start, rest, valid = reused
    senders = batch.prompt("sender", task.sender_message).ids
    held = start.layout.context_len.tolist()
    assert all(len(s) - 5 <= n < len(s) for n, s in zip(held, senders))  # all but the sender's chat closing
    assert rest.shape[1] < min(len(ids) for ids in prompt.ids) // 2
    alone = Skyline.start(Baseline(), batch, prompt)  # the prompt whole, on its common opening only
    budget = task.max_new_tokens
    plain = greedy_generate(model.model, *alone, budget, model.stop_ids, model.pad_id)
    assert greedy_generate(model.model, start, rest, valid, budget, model.stop_ids, model.pad_id) == plain
    assert Skyline().run(batch).answers == [model.decode(ids) for ids in plain]
    other = tiny_loaded("llama", seed=1)
    assert Batch(Agents(other, model), task, task.items[:5]).after_sender(prompt) is None
    one = Batch(Agents(model, model), task, task.items[:1])  # a batch of one reuses it too
    assert one.after_sender(one.prompt("receiver", task.skyline_message)) is not None
    assert batch.after_sender(batch.prompt("receiver", task.receiver_message)) is None  # the opening only
