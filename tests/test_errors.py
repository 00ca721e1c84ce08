"""The error contract: what kvcomm raises on purpose is a KvcommError, and configs are checked where made."""

from __future__ import annotations

import pytest
import torch

from kvcomm import EvalConfig
from kvcomm.errors import (
    ConfigError,
    DataError,
    FingerprintMismatch,
    IncompatibleModelsError,
    KvcommError,
    ProtocolError,
    WireError,
)
from kvcomm.models import check_compatible, check_fingerprint
from kvcomm.protocol import pad_left, prefill, run_body
from kvcomm.wire import build_codebook, make_codec
from tests.conftest import tiny_loaded, tiny_model


@pytest.mark.parametrize("name, params", [
    ("raw", {"dtype": "float64"}), ("quant", {"bits": 3}), ("quant", {"group": 0}), ("cachegen", {"group": 1}),
    ("klt", {"step": 0}), ("klt", {"codebook": "not-an-id"}), ("fp16", {"nonsense": 1}), ("int9", {}),
])
def test_codec_construction_refuses_with_config_error(name, params):
    with pytest.raises(ConfigError):
        make_codec(name, **params)


@pytest.mark.parametrize("name", [None, 5, ["int8"]])
def test_a_name_that_is_no_string_is_a_config_error_naming_the_choices(name):
    from kvcomm import load_task, make_method

    for make in (make_codec, make_method, load_task):
        with pytest.raises(ConfigError, match="named by a string"):
            make(name)


@pytest.mark.parametrize("options", [dict(batch_size=0), dict(limit=0), dict(calib_size=-1), dict(alpha=1.5),
                                     dict(sigma=0), dict(max_memory_gb=-1), dict(batch_sizes=4)])
def test_eval_config_is_checked_where_it_is_made(options):
    with pytest.raises(ConfigError) as err:
        EvalConfig(**options)
    assert str(err.value).startswith("evaluation: ") and len(str(err.value).splitlines()) == 1


def test_building_a_codebook_from_nothing_is_a_data_error():
    with pytest.raises(DataError):
        build_codebook([], {})


def test_a_missing_marker_is_a_config_error():
    with pytest.raises(ConfigError, match="marker"):
        tiny_loaded("llama").encode_message_parts("no marker here", ["\x00X\x00"])


def test_a_cache_that_does_not_fit_its_layout_is_a_protocol_error():
    model = tiny_model("llama")
    ids, valid = pad_left([[5, 6, 7]], 0)
    sender = prefill(model, ids, valid)
    from kvcomm.protocol import build_receiver_input

    start = build_receiver_input(model, sender, [0, 1])
    start.layout.prefix_pos[0] = torch.zeros(1, 5, dtype=torch.long)  # the layout now describes 5 keys, not 3
    start.layout.prefix_valid[0] = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ProtocolError, match="layer 0"):
        run_body(model, ids, valid, start.cache, start.layout)


def test_empty_batches_are_refused_clearly():
    with pytest.raises(ConfigError, match="at least one"):
        pad_left([], 0)
    from kvcomm import Agents, Batch, load_task

    model = tiny_loaded("llama")
    with pytest.raises(ConfigError, match="at least one item"):
        Batch(Agents(model, model), load_task("facts", items=1), [])


def test_one_compatibility_check_for_pairs_and_messages():
    a, b = tiny_loaded("llama"), tiny_loaded("llama", kv_heads=4)
    with pytest.raises(FingerprintMismatch, match="num_kv_heads: sender 2, receiver 4") as pair:
        check_compatible(a, b)
    with pytest.raises(FingerprintMismatch, match="num_kv_heads: message 2, receiver 4"):
        check_fingerprint(a.fingerprint, b.fingerprint)
    assert isinstance(pair.value, IncompatibleModelsError) and isinstance(pair.value, WireError)
    with pytest.raises(FingerprintMismatch, match="no model fingerprint"):
        check_fingerprint(["not", "a", "dict"], b.fingerprint)  # type: ignore[arg-type]


def test_every_error_class_is_a_kvcomm_error():
    import kvcomm.errors as errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) > 10 and all(issubclass(c, KvcommError) for c in classes)


@pytest.mark.parametrize("layers, match", [("15", "not '15'"), ([20.7], "integers; got 20.7"),
                                           ([True], "integers; got True"), (3, "not 3")])
def test_layers_that_are_not_a_list_of_integers_are_refused_not_read(layers, match):
    """A string was read digit by digit ("15": layers 1 and 5) and floats were truncated."""
    import kvcomm

    with pytest.raises(ConfigError, match=match):
        kvcomm.encode_context(tiny_loaded("llama"), "Mira lives in Oslo.", layers=layers)


def test_a_receiver_input_serves_one_generation_and_a_budget_is_at_least_one_token():
    """A second generation on one input answered on the first one's tokens, which its cache held."""
    from kvcomm.protocol import build_receiver_input, greedy_generate

    model = tiny_loaded("llama")
    ids, valid = pad_left([model.encode_message("Mira lives in Oslo.")], model.pad_id)
    start = build_receiver_input(model.model, prefill(model.model, ids, valid), [1, 2])
    question, asked = pad_left([model.encode_message("Where?")], model.pad_id)
    for budget in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="max_new_tokens"):
            greedy_generate(model.model, start, question, asked, budget, model.stop_ids, model.pad_id)
    first = greedy_generate(model.model, start, question, asked, 3, model.stop_ids, model.pad_id)
    with pytest.raises(ProtocolError, match="used by an earlier prefill or generation"):
        greedy_generate(model.model, start, question, asked, 3, model.stop_ids, model.pad_id)
    again = build_receiver_input(model.model, prefill(model.model, ids, valid), [1, 2])
    assert greedy_generate(model.model, again, question, asked, 3, model.stop_ids, model.pad_id) == first
    from kvcomm.protocol import prefill_logits
    from kvcomm.protocol.reply import generate_turn

    for used_by in (lambda s: prefill_logits(model.model, s, question, asked),
                    lambda s: generate_turn(model.model, s, question, asked, 2, model.stop_ids, model.pad_id)):
        start = build_receiver_input(model.model, prefill(model.model, ids, valid), [1, 2])
        used_by(start)
        with pytest.raises(ProtocolError, match="used by an earlier prefill"):
            greedy_generate(model.model, start, question, asked, 3, model.stop_ids, model.pad_id)


def test_the_exchange_refuses_what_is_not_a_model_a_message_or_token_ids_naming_it():
    """Each was a raw AttributeError, IndexError or ValueError from deep inside."""
    import kvcomm

    model = tiny_loaded("llama")
    message = kvcomm.encode_context(model, "Mira lives in Oslo.")
    for given, match in ((b"KVC", "not bytes .bytes: KVMessage.from_bytes"), ("text", "not str")):
        with pytest.raises(ConfigError, match=match):
            kvcomm.answer(model, given, "Where?")
    with pytest.raises(ConfigError, match="the receiver is a LoadedModel, not Agents .an Agents pair"):
        kvcomm.answer(kvcomm.Agents(model, model), message, "Where?")
    for ids, match in (([10**6], "outside the model's vocabulary"), ([-5, 3], "token id -5"),
                       ([], "no token ids"), ("hello", "not str"), ([1.5], "integers")):
        with pytest.raises(ConfigError, match=match):
            kvcomm.encode_ids(model, ids)


def test_a_pair_texts_and_layer_lists_are_checked_where_they_are_given():
    """A pair of other depths ran to a bare KeyError; a name or a pair given to encode_context
    was an AttributeError; None was sent as the word "None"; an empty layer list shared nothing."""
    import kvcomm
    from kvcomm.errors import FingerprintMismatch

    model, deeper = tiny_loaded("llama"), tiny_loaded("llama", layers=6)
    with pytest.raises(FingerprintMismatch):
        kvcomm.Agents(model, deeper)
    with pytest.raises(ConfigError, match="the receiver is a LoadedModel, not str"):
        kvcomm.Agents(model, "smollm2-135m")  # type: ignore[arg-type]
    half = tiny_loaded("llama")  # in process, its float32 KV reached a bfloat16 receiver: a raw torch error
    half.model.to(torch.bfloat16)
    with pytest.raises(ConfigError, match="the sender computes in torch.float32 and the receiver in torch.bfloat16"):
        kvcomm.Agents(model, half)
    assert kvcomm.answer(half, kvcomm.encode_context(model, "Mira lives in Oslo."), "Where?", 2) is not None
    for encode in (kvcomm.encode_context, kvcomm.encode_passage):
        with pytest.raises(ConfigError, match="the sender is a LoadedModel, not Agents"):
            encode(kvcomm.Agents(model, model), "Mira lives in Oslo.")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="is a string, not NoneType"):
            encode(model, None)  # type: ignore[arg-type]
    message = kvcomm.encode_context(model, "Mira lives in Oslo.")
    with pytest.raises(ConfigError, match="the question is a string, not NoneType"):
        kvcomm.answer(model, message, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="names one or more layers"):
        kvcomm.Agents(model, model).ask("Mira lives in Oslo.", "Where?", layers=[])
    from kvcomm.errors import ModelError
    with pytest.raises(ModelError, match="a model is named by a string .*, not int"):
        kvcomm.Agents.load(135)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="agents is a whole number, not '3'"):
        kvcomm.Graph.build(model, "chain", "3")  # type: ignore[arg-type]
    graph = kvcomm.Graph.build(model, "chain", 2, edge={"via": "kv", "ratio": 0.5})  # type: ignore[arg-type]
    assert graph.edge.via == "kv" and graph.edge.ratio == 0.5
    with pytest.raises(ConfigError, match="EdgeOptions .or a dict of its fields., not list"):
        kvcomm.Graph.build(model, "chain", 2, edge=["kv"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="via"):
        kvcomm.Graph.build(model, "chain", 2, edge={"via": "carrier pigeon"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"a dict \(a loaded model's .fingerprint\), not LoadedModel"):
        kvcomm.KVMessage.from_bytes(message.to_bytes(), receiver=model)  # type: ignore[arg-type]


@pytest.mark.parametrize("given, match", [({"names": "kvcomm"}, "names is a list of values, not 'kvcomm'"),
                                          ({"names": ["kvcomm"], "ratios": 0.5}, "ratios is a list"),
                                          ({"names": ["kvcomm"], "ratios": "0.5"}, "ratios is a list"),
                                          ({"names": ["kvcomm"], "codecs": "int8"}, "codecs is a list")])
def test_a_bare_value_where_a_list_is_expected_is_refused_not_read_letter_by_letter(given, match):
    from kvcomm import build_methods

    with pytest.raises(ConfigError, match=match):
        build_methods(**given)


def test_evaluate_and_graphs_refuse_wrong_objects_naming_what_they_take():
    """Each was an AttributeError or TypeError from inside (a graph built on an Agents pair only
    failed once it ran)."""
    import kvcomm

    model = tiny_loaded("llama")
    task = kvcomm.load_task("facts", items=4)
    methods = kvcomm.build_methods(["baseline"])
    agents = kvcomm.Agents(model, model)
    for args, match in (((model, task, methods), "agents: an Agents pair"),
                        ((agents, "facts", methods), "task: a Task"),
                        ((agents, task, methods[0]), "methods is a list of values, not one Baseline"),
                        ((agents, task, methods, {"limit": 2}), "config: an EvalConfig")):
        with pytest.raises(ConfigError, match=match):
            kvcomm.evaluate(*args, progress=False)
    with pytest.raises(ConfigError, match="one LoadedModel .kvcomm.load_model., not Agents"):
        kvcomm.Graph.build(agents, "chain", agents=2)


def test_one_item_where_a_list_goes_is_refused():
    import kvcomm

    model = tiny_loaded("llama")
    task = kvcomm.load_task("facts", items=4)
    with pytest.raises(ConfigError, match=r"items is a list of values, not one Item \(one value: \[it\]\)"):
        kvcomm.calibrate(kvcomm.Agents(model, model), task, task.items[0], progress=False)
    with pytest.raises(ConfigError, match="items is a list of values, not one Item"):
        kvcomm.Graph.build(model, "chain", agents=2).run(task, task.items[0], progress=False)


def test_print_table_refuses_what_is_not_a_report():
    import kvcomm

    with pytest.raises(ConfigError, match="print_table prints a Report"):
        kvcomm.print_table({"runs": []})


def test_the_low_level_functions_name_what_they_take():
    """A LoadedModel, an int64 mask, a list of ids or a batch of another size went deep: an
    AttributeError, torch's attn_mask dtype error or a size mismatch inside the layout."""
    from kvcomm.protocol import build_receiver_input, empty_input, greedy_generate, prefill_logits

    loaded = tiny_loaded("llama")
    ids, valid = pad_left([[5, 6, 7], [8, 9]], 0)
    with pytest.raises(ConfigError, match=r"take a transformers model \(a LoadedModel: pass its .model\)"):
        prefill(loaded, ids, valid)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="valid is a boolean"):
        prefill(loaded.model, ids, valid.long())
    with pytest.raises(ConfigError, match="are tensors"):
        prefill(loaded.model, [[5, 6, 7]], valid)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"take a transformers model \(a LoadedModel"):
        greedy_generate(loaded, empty_input(loaded.model, 2), ids, valid, 3, [], 0)  # type: ignore[arg-type]
    start = build_receiver_input(loaded.model, prefill(loaded.model, ids, valid), [0, 1])
    one, one_valid = pad_left([[5, 6]], 0)
    with pytest.raises(ConfigError, match="1 prompt rows on a receiver input of 2 rows"):
        prefill_logits(loaded.model, start, one, one_valid)
    assert not start.used  # refused before it was taken


def test_encode_and_answer_refuse_what_the_model_s_positions_cannot_hold():
    """encode_context wrote, and answer read, contexts past max_position_embeddings (garbage answers)
    that the service refuses."""
    from kvcomm import answer, encode_context, encode_ids

    model = tiny_loaded()
    most = model.max_positions
    assert most is not None
    with pytest.raises(ConfigError, match=f"tokens with its prompt; tiny-llama takes {most}"):
        encode_context(model, "Mira lives in Oslo. " * most)
    long = encode_ids(model, [5] * (most - 8), [0])  # fits alone; not with a question after it
    with pytest.raises(ConfigError, match=f"positions; tiny-llama takes {most}"):
        answer(model, long, "Where does Mira live?", 8)
    assert isinstance(answer(model, encode_context(model, "Mira lives in Oslo."), "Where?", 3), str)
    with pytest.raises(ConfigError, match=f"tokens with its prompt; tiny-llama takes {most}"):  # ids too
        encode_ids(model, [5] * (most + 1))


def test_encode_ids_and_answer_check_their_arguments_before_using_them():
    """A generator of layers was read once by the check and the message shared no layer; passage 0,
    -2 or True and a budget "5" failed deep in torch or arithmetic; a passage in legacy masks was
    made, then refused by every chat; a check layer 1.5 was a TypeError from a slice."""
    from kvcomm import answer, encode_ids
    from kvcomm.protocol.blend import unblendable

    model = tiny_loaded()
    ids = list(range(5, 15))
    assert encode_ids(model, ids, (layer for layer in [1, 2])).shared_layers == [1, 2]
    for passage, mode in ((0, "causal"), (-2, "causal"), (True, "causal"), (11, "causal"), (2.0, "causal"),
                          (4, "legacy")):
        with pytest.raises(ConfigError, match="passage is a count of the last tokens, 1 to 10, read in causal"):
            encode_ids(model, ids, passage=passage, mode=mode)
    assert encode_ids(model, ids, passage=4).context_len == 4
    message = encode_ids(model, ids)
    for budget in ("5", 0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_new_tokens .the answer budget. is a whole number"):
            answer(model, message, "Where?", budget)
    assert unblendable(True, ["causal"], [True] * 4, 1.5) == ("layer", "the check layer is a layer index, not 1.5")
    assert unblendable(True, ["causal"], [True] * 4, 4)[1] == "check layer 4 is past the model's last layer (3)"
