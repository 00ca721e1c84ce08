"""DroidSpeak: recomputing a block of layers from the sender's hidden state, its exact ends, the
hidden state on the wire, and the profiler's grid."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import ConfigError, WireError
from kvcomm.protocol import pad_left, prefill, prefill_logits, receiver_input
from kvcomm.protocol.droidspeak import block_kv, recompute_block, send_block
from kvcomm.protocol.hidden import recording
from kvcomm.protocol.receiver import empty_input
from tests.conftest import tiny_model


def context(model, length=9, seed=0):
    ids = torch.randint(0, 99, (1, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids, dtype=torch.bool)


def full_logits(model, ids, question):
    whole = torch.cat([ids, question], dim=1)
    valid = torch.ones_like(whole, dtype=torch.bool)
    return prefill_logits(model, empty_input(model, 1), whole, valid)[:, -question.shape[1]:]


@pytest.mark.parametrize("block", [(0, 1), (1, 3), (2, 4), (0, 3), (3, 3)])
def test_same_model_on_both_sides_gives_the_full_prefill_at_any_block(family, block):
    model = tiny_model(family)
    ids, valid = context(model)
    start, stop = block
    sender = prefill(model, ids, valid, hidden=[start])
    cache = recompute_block(model, send_block(sender, start, stop), start, stop)
    assert all(cache.full)
    for layer in range(start, stop):
        assert (cache.keys[layer] - sender.keys[layer]).abs().max() <= 1e-5
        assert (cache.values[layer] - sender.values[layer]).abs().max() <= 1e-5
    question = torch.randint(0, 99, (1, 4))
    got = prefill_logits(model, receiver_input(cache), question, torch.ones_like(question, dtype=torch.bool))
    assert (got - full_logits(model, ids, question)).abs().max() <= 1e-4


def test_every_layer_from_the_receivers_own_embeddings_is_its_own_prefill(family):
    sender_model, receiver_model = tiny_model(family, seed=1), tiny_model(family, seed=2)
    ids, valid = context(receiver_model)
    own = prefill(receiver_model, ids, valid)
    embeddings = receiver_model.get_input_embeddings()(ids)
    layers = receiver_model.config.num_hidden_layers
    keys, values = block_kv(receiver_model, embeddings, valid, own.positions, 0, layers)
    for layer in range(layers):
        assert (keys[layer] - own.keys[layer]).abs().max() <= 1e-5
        assert (values[layer] - own.values[layer]).abs().max() <= 1e-5
    assert sender_model is not receiver_model


def test_a_different_sender_changes_only_what_the_block_does_not_cover():
    sender_model, receiver_model = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids, valid = context(sender_model)
    sender = prefill(sender_model, ids, valid, hidden=[1])
    cache = recompute_block(receiver_model, send_block(sender, 1, 3), 1, 3)
    for layer in (0, 3):  # outside the block: the sender's KV as sent
        assert torch.equal(cache.keys[layer], sender.keys[layer])
    keys, _ = block_kv(receiver_model, sender.hidden[1], valid, sender.positions, 1, 3)
    assert torch.equal(cache.keys[1], keys[0]) and not torch.allclose(cache.keys[1], sender.keys[1])


def test_a_left_padded_batch_equals_each_row_alone():
    model, other = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2)
    rows = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]

    def run(chosen):
        ids, valid = pad_left([rows[r] for r in chosen], 0)
        cache = recompute_block(other, send_block(prefill(model, ids, valid, hidden=[1]), 1, 3), 1, 3)
        q_ids, q_valid = pad_left([[21, 22]] * len(chosen), 0)
        return prefill_logits(other, receiver_input(cache), q_ids, q_valid)[:, -1]

    together = run([0, 1])
    for row in range(2):
        assert (together[row] - run([row])[0]).abs().max() <= 1e-4


def test_the_sender_sends_the_kv_outside_the_block_and_one_hidden_state():
    model = tiny_model("llama")
    ids, valid = context(model, length=10)
    sender = prefill(model, ids, valid, hidden=[1])
    shared = send_block(sender, 1, 3)
    per_layer = 2 * model.config.num_key_value_heads * 8 * 4  # keys and values, head size 8, float32
    hidden = 10 * model.config.hidden_size * 4
    assert shared.kv_bytes.tolist() == [10 * per_layer * (4 - 2)]
    assert shared.sent_bytes.tolist() == [10 * per_layer * 2 + hidden]
    assert [k.shape[2] for k in shared.keys] == [10, 0, 0, 10] and list(shared.hidden) == [1]


def test_bad_blocks_and_missing_or_misshapen_hidden_states_are_refused():
    model = tiny_model("llama")
    ids, valid = context(model)
    sender = prefill(model, ids, valid, hidden=[1])
    with pytest.raises(ConfigError, match="was not recorded"):
        send_block(sender, 2, 3)
    with pytest.raises(ConfigError, match="0 <= start <= stop"):
        send_block(sender, 3, 2)
    with pytest.raises(ConfigError, match="every layer"):
        send_block(prefill(model, ids, valid, hidden=[0]), 0, 4)
    shared = send_block(sender, 1, 3)
    with pytest.raises(WireError, match="entering layer 2"):
        recompute_block(model, shared, 2, 3)
    shared.hidden[1] = shared.hidden[1][..., :5]
    with pytest.raises(WireError, match="shape"):
        recompute_block(model, shared, 1, 3)


def test_recording_gives_the_state_entering_each_layer_and_the_last_output():
    model = tiny_model("gemma3")
    ids, valid = context(model)
    layout_free = model(input_ids=ids, output_hidden_states=True)
    with recording(model, [0, 2, 4]) as seen:
        model(input_ids=ids)
    assert (seen[0] - layout_free.hidden_states[0]).abs().max() <= 1e-6
    assert (seen[2] - layout_free.hidden_states[2]).abs().max() <= 1e-6
    assert seen[4].shape == seen[0].shape
    with pytest.raises(ConfigError):
        with recording(model, [5]):
            pass


@pytest.mark.parametrize("span", [(0, 2), (1, 3), (2, 4), (0, 4)])
def test_a_span_of_layers_hands_on_the_state_leaving_its_last_layer(family, span):
    """``only_layers`` yields the hidden state leaving layer ``stop - 1``, whether the forward ends
    there (the fork's lower layers) or runs on to the output: the state a whole forward has there."""
    from kvcomm.protocol.hidden import only_layers

    model = tiny_model(family)
    ids, _ = context(model)
    start, stop = span
    whole = model(input_ids=ids, output_hidden_states=True).hidden_states
    with only_layers(model, start, stop) as inside:
        assert inside.leaving is None
        model(inputs_embeds=whole[start] if start else None, input_ids=None if start else ids)
    assert inside.leaving is not None
    if stop < len(whole) - 1:
        assert (inside.leaving - whole[stop]).abs().max() <= 1e-5
    else:  # the last entry is after the final norm: the last layer's output as recording() takes it
        with recording(model, [stop]) as seen:
            model(input_ids=ids)
        assert (inside.leaving - seen[stop]).abs().max() <= 1e-5


# -- the method and block profiling ------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins():
    from kvcomm import Agents
    from tests.conftest import tiny_loaded

    model = tiny_loaded("qwen2", layers=4)
    return Agents(model, model)


@pytest.fixture(scope="module")
def variants():
    """Two models of one shape with different weights: a stand-in for two fine-tunes of one base."""
    from kvcomm import Agents
    from tests.conftest import tiny_loaded

    return Agents(tiny_loaded("qwen2", seed=0, layers=4), tiny_loaded("qwen2", seed=1, layers=4))


def multihop(items=5):
    from kvcomm import load_task

    return load_task("multihop", items=items, pieces=2, facts_per_piece=2)


def run(agents, methods, items=4, **given):
    from kvcomm import EvalConfig, evaluate

    report = evaluate(agents, multihop(items + 1), methods, EvalConfig(limit=items, batch_size=3, calib_size=1),
                      progress=False, **given)
    return {r.label: r for r in report.runs}, report


def test_droidspeak_between_twins_answers_as_full_reuse_and_sends_less(twins):
    from kvcomm import make_method

    runs, _ = run(twins, [make_method("kvcomm", ratio=1.0), make_method("droidspeak", block=(1, 3)),
                          make_method("droidspeak", block=(1, 3), codec="fp32")])
    reuse, block, wire = runs["kvcomm@1"], runs["droidspeak[1:3]"], runs["droidspeak[1:3]+fp32"]
    assert [i.answer for i in block.items] == [i.answer for i in reuse.items] == [i.answer for i in wire.items]
    assert block.layers == [0, 3] and block.details["recomputed_fraction"] == 0.5
    for a, b in zip(block.items, reuse.items):  # half the KV plus one hidden state (width 32 vs 2 heads x 8 x 2)
        assert a.kv_bytes < b.kv_bytes
    assert all(w.kv_bytes > b.kv_bytes for w, b in zip(wire.items, block.items))  # the header and frames count


def test_profiled_blocks_of_twins_all_score_as_their_own_prefill(twins):
    from kvcomm.selection.blocks import profile_blocks

    profile = profile_blocks(twins, multihop(3), multihop(3).items[:2], max_recompute=1.0, progress=False)
    assert profile.max_block == 3 and len(profile.blocks) == 4 + 3 + 2 + 1 - 1  # [0, 4) sends no KV
    assert profile.reuse == pytest.approx(profile.own, abs=1e-4)
    assert all(b.loglik == pytest.approx(profile.own, abs=1e-4) for b in profile.blocks)
    assert profile.pick(tolerance=1e-3).stop - profile.pick(tolerance=1e-3).start == 1
    assert profile.objective == "own"
    gold = profile_blocks(twins, multihop(3), multihop(3).items[:2], max_recompute=0.25, objective="gold",
                          progress=False)
    assert gold.objective == "gold" and gold.own != pytest.approx(profile.own)  # another target answer
    assert all(b.loglik == pytest.approx(gold.own, abs=1e-4) for b in gold.blocks)
    with pytest.raises(ConfigError, match="objective"):
        profile_blocks(twins, multihop(3), multihop(3).items[:2], objective="best", progress=False)


def test_a_variant_pair_is_profiled_written_and_used(variants, tmp_path):
    from kvcomm import make_method
    from kvcomm.selection.blocks import BlockProfile, profile_blocks

    task = multihop(5)
    profile = profile_blocks(variants, task, task.items[-1:], max_recompute=0.5, progress=False)
    assert profile.reuse != pytest.approx(profile.own, abs=1e-3)  # different weights: reuse is not free
    assert {b.stop - b.start for b in profile.blocks} == {1, 2}
    curve = profile.curve()
    assert [point["layers"] for point in curve] == [1, 2]
    profile.save(tmp_path / "blocks.json")
    loaded = BlockProfile.load(tmp_path / "blocks.json")
    assert loaded == profile
    chosen = loaded.pick(tolerance=0.1, max_layers=2)
    runs, report = run(variants, [make_method("droidspeak", max_recompute=0.5, tolerance=0.1)], blocks=loaded)
    (label, result), = runs.items()
    assert label == f"droidspeak[{chosen.start}:{chosen.stop}]"
    assert result.details["profiled"]["within_tolerance"] == chosen.within_tolerance
    assert "droidspeak@0.5" in report.profiles
    # a cap of other fraction but the same layers reads it (before, profiled again); a --block reads
    # none (before, the profile was listed as used)
    narrow = profile_blocks(variants, task, task.items[-1:], max_recompute=0.3, progress=False)  # 1 layer of 4
    _, report = run(variants, [make_method("droidspeak", max_recompute=0.45, tolerance=0.1)], blocks=narrow)
    assert list(report.profiles) == ["droidspeak@0.3"]
    _, report = run(variants, [make_method("droidspeak", block=(1, 2))], blocks=loaded)
    assert "droidspeak@0.5" not in report.profiles


def test_the_block_pick_prefers_fewest_layers_within_tolerance():
    from kvcomm.selection.blocks import BlockProfile, BlockScore

    scores = {(0, 1): -3.0, (2, 3): -1.05, (1, 3): -1.01, (0, 2): -0.9}
    profile = BlockProfile(sender="a", receiver="b", task="t", num_layers=4, calibration_items=["x"],
                           max_recompute=0.5, max_block=2, own=-1.0, reuse=-4.0,
                           blocks=[BlockScore(start=a, stop=b, loglik=v) for (a, b), v in scores.items()])
    assert (profile.pick(0.1).start, profile.pick(0.1).stop) == (2, 3)  # one layer suffices
    assert (profile.pick(0.02).start, profile.pick(0.02).stop) == (0, 2)  # two layers, the better of them
    none = profile.pick(0.0, max_layers=1)  # nothing of one layer within: the best one, flagged
    assert (none.start, none.stop, none.within_tolerance) == (2, 3, False)
    with pytest.raises(ConfigError):
        profile.pick(-1)


def test_candidate_blocks_and_the_cap():
    from kvcomm.selection.blocks import candidate_blocks, max_block

    assert len(candidate_blocks(30, 30)) == 30 * 31 // 2  # uncapped: every block
    assert len(candidate_blocks(30, 7)) == sum(min(7, 30 - a) for a in range(30))
    assert max_block(30, 0.25) == 7 and max_block(24, 0.25) == 6 and max_block(4, 1.0) == 3 and max_block(2, 0.1) == 1
    with pytest.raises(ConfigError):
        max_block(4, 0)
    with pytest.raises(ConfigError, match="no block"):
        max_block(1, 1.0)  # its only block, every layer, would send no KV


def test_droidspeak_refusals(twins):
    from kvcomm import make_method

    with pytest.raises(ConfigError, match="0 <= a < b"):
        make_method("droidspeak", block=(3, 1))
    with pytest.raises(ConfigError, match="block 2:9"):
        run(twins, [make_method("droidspeak", block=(2, 9))], items=1)
    with pytest.raises(ConfigError, match="every layer"):
        run(twins, [make_method("droidspeak", block=(0, 4))], items=1)


def test_a_pair_whose_hidden_states_differ_in_width_is_refused_before_any_prefill(monkeypatch):
    """The pair's check compares KV layouts only: a receiver twice as wide (same layers, KV heads and
    head size) passed it, and profiling ended in a raw torch error on the hidden states' width."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvcomm import Agents, make_method
    from kvcomm.models.loading import LoadedModel
    from kvcomm.selection.blocks import profile_blocks
    from tests.conftest import tiny_loaded, tiny_tokenizer

    narrow = tiny_loaded("llama")
    config = LlamaConfig(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
    config._attn_implementation = "kvcomm"
    wide = LoadedModel(name="tiny-wide", model=AutoModelForCausalLM.from_config(config).eval(),
                       tokenizer=tiny_tokenizer())
    pair = Agents(narrow, wide)  # the KV layouts match
    monkeypatch.setattr("kvcomm.eval.batch.Batch.sender_kv_with_hidden",
                        lambda *a, **k: pytest.fail("the sender prefilled first"))
    said = "the sender's are 32 wide and the receiver's 64"
    with pytest.raises(ConfigError, match=said):
        run(pair, [make_method("droidspeak", block=(1, 3))], items=1)
    with pytest.raises(ConfigError, match=said):
        profile_blocks(pair, multihop(2), multihop(2).items, progress=False)


def test_left_out_layers_are_refused_where_they_cannot_be_used():
    from kvcomm.wire import KVMessage

    model = tiny_model("llama")
    ids = torch.randint(0, 99, (1, 7))
    sender = prefill(model, ids, ids >= 0, [1])
    sent = send_block(sender, 1, 3)
    with pytest.raises(WireError, match="left out"):  # a plain receiver would answer without layers 1 and 2
        receiver_input(sent)
    with pytest.raises(WireError, match="exactly those left out"):  # the receiver must recompute what was left out
        recompute_block(model, sent, 1, 2)
    message = KVMessage.from_shared(sent, {"m": 1}, "fp32")
    message.hidden = {}
    with pytest.raises(WireError, match="one block with a hidden frame"):
        message.to_bytes()
    scattered = KVMessage.from_shared(send_block(prefill(model, ids, ids >= 0, [0]), 0, 1), {"m": 1}, "fp32")
    scattered.layers[2] = type(scattered.layers[2])(2, False, torch.zeros(2, 0, 8), torch.zeros(2, 0, 8))
    with pytest.raises(WireError, match="one block"):
        scattered.to_bytes()


def test_a_hidden_state_beyond_float16_is_refused_not_sent_as_inf():
    from kvcomm.wire import KVMessage

    model = tiny_model("llama")
    ids = torch.randint(0, 99, (1, 7))
    sent = send_block(prefill(model, ids, ids >= 0, [1]), 1, 2)
    sent.hidden[1] = sent.hidden[1].clone()
    sent.hidden[1][0, 0, 0] = 1e6
    for codec in ("fp16", "zstd", "int8"):
        with pytest.raises(WireError, match="float16's range"):
            KVMessage.from_shared(sent, {"m": 1}, codec).to_bytes()
    back = KVMessage.from_bytes(KVMessage.from_shared(sent, {"m": 1}, "fp32").to_bytes())
    assert back.hidden[1][0, 0] == 1e6


def test_a_block_profile_of_another_data_file_is_refused(tmp_path):
    """A jsonl task's ids are line numbers: blocks profiled on one file's items were taken for another's."""
    import json

    from kvcomm.eval.harness import check_profile
    from kvcomm.eval.provenance import data_record
    from kvcomm.selection.blocks import BlockProfile, BlockScore
    from kvcomm.tasks import load_task

    rows = [{"context": f"Person {n} lives in City {n}.", "question": f"Where does person {n} live?",
             "answers": [f"City {n}"]} for n in range(4)]
    for folder, order in (("a", rows), ("b", rows[::-1])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order))
    made_on, other = (load_task("jsonl", str(tmp_path / f / "mine.jsonl")) for f in ("a", "b"))
    profile = BlockProfile(sender="a", receiver="b", task="mine", num_layers=4,
                           calibration_items=[made_on.items[-1].id], max_recompute=0.5, max_block=2, own=-1.0,
                           reuse=-4.0,
                           blocks=[BlockScore(start=0, stop=1, loglik=-2.0)], data=data_record(made_on))
    check_profile(BlockProfile.model_validate_json(profile.model_dump_json()), made_on, made_on.items[:2])
    with pytest.raises(ConfigError, match="block profile was calibrated on mine items of another data file"):
        check_profile(profile, other, other.items[:2])


def test_a_block_profile_of_another_pair_is_refused(variants, twins):
    from kvcomm import make_method
    from kvcomm.selection.blocks import profile_blocks

    task = multihop(5)
    profile = profile_blocks(variants, task, task.items[-1:], max_recompute=0.25, progress=False)
    assert profile.weights == list(variants.weights)
    other = profile.model_copy(update={"weights": [variants.weights[0], variants.weights[0]]})
    with pytest.raises(ConfigError, match="calibrated on other weights"):  # e.g. the receiver derived again
        run(variants, [make_method("droidspeak")], blocks=other)
    unweighed = profile.model_copy(update={"receiver": "someone-else", "weights": None})  # written before weights
    with pytest.raises(ConfigError, match="blocks depend on the pair"):
        run(variants, [make_method("droidspeak")], blocks=unweighed)
    spelled = profile.model_copy(update={"receiver": "./elsewhere/the-same-receiver"})  # its weights: accepted
    assert run(variants, [make_method("droidspeak")], blocks=spelled)[1].runs


def test_an_immediate_stop_is_scored_as_the_stop_token_the_receiver_chose(twins, monkeypatch):
    """The ``own`` objective's target where the receiver stops at once is the token it chose, the
    argmax of its first step (before, the first of its stop ids, which it may never produce)."""
    import kvcomm.selection.blocks as blocks_module
    from kvcomm.eval.batch import Batch
    from kvcomm.protocol import SharedKV, prefill, prefill_logits, receiver_input

    task = multihop(3)
    batch = Batch(twins, task, task.items[:2])
    context = batch.prompt("sender", task.sender_message)
    own = prefill(twins.receiver.model, context.input_ids, context.valid)
    prompt = batch.prompt("receiver", task.receiver_message)
    monkeypatch.setattr(blocks_module, "greedy_generate", lambda *args: [[], [7]])  # the first row stops at once
    answers = blocks_module._own_answers(twins, own, prompt.input_ids, prompt.valid, 4)
    first = prefill_logits(twins.receiver.model, receiver_input(SharedKV.whole(own)), prompt.input_ids,
                           prompt.valid)[0, -1].argmax()
    assert answers == [[int(first)], [7]]


def test_a_block_profile_without_a_data_file_keeps_the_identity_it_had():
    """Block profiles record their data file since 2026-11-26; one of a generated task records none,
    and a checkpoint written before must still resume (its identity had no such field)."""
    from kvcomm.eval.provenance import profiles_identity
    from kvcomm.selection.blocks import BlockProfile, BlockScore

    blocks = BlockProfile(sender="a", receiver="b", task="t", num_layers=4, calibration_items=["x"],
                          max_recompute=0.5, max_block=2, own=-1.0, reuse=-4.0,
                          blocks=[BlockScore(start=0, stop=1, loglik=-2.0)])
    assert "data" not in profiles_identity(None, blocks)["blocks"]
    recorded = blocks.model_copy(update={"data": {"path": "x.jsonl", "sha256": "0" * 64}})
    assert profiles_identity(None, recorded)["blocks"]["data"]["sha256"] == "0" * 64
