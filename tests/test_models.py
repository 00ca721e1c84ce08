"""Loading from a directory, sharing one copy, refusing incompatible pairs, clear install errors."""

from __future__ import annotations

import pytest

from kvcomm.errors import ConfigError, IncompatibleModelsError, ModelError
from kvcomm.models import EMBEDDED, check_compatible, load_model, load_pair
from kvcomm.models.registry import EmbeddedModel
from tests.conftest import tiny_loaded


def test_directory_model_loads_with_kvcomm_attention_and_is_shared(tiny_dir):
    sender, receiver = load_pair(str(tiny_dir), str(tiny_dir))
    assert sender is receiver
    assert sender.model.config._attn_implementation == "kvcomm"
    assert sender.num_layers == 4 and sender.stop_ids == [sender.tokenizer.eos_token_id]


def test_same_shape_fine_tunes_are_accepted():
    check_compatible(tiny_loaded("llama", seed=0), tiny_loaded("llama", seed=1))


@pytest.mark.parametrize("change", [dict(layers=3), dict(kv_heads=4)])
def test_mismatched_shapes_are_refused(change):
    with pytest.raises(IncompatibleModelsError, match="cannot exchange KV caches"):
        check_compatible(tiny_loaded("llama"), tiny_loaded("llama", **change))


def test_other_architecture_is_refused():
    with pytest.raises(IncompatibleModelsError, match="model_type"):
        check_compatible(tiny_loaded("llama"), tiny_loaded("qwen2"))


def test_missing_embedded_model_says_how_to_install():
    fake = EmbeddedModel("fake", "none", ("fake-pkg",), (("kvcomm_no_such_module", "x.gguf"),), 1)
    with pytest.raises(ModelError, match="kvcomm models install fake"):
        fake.part_paths()


def test_unknown_names_are_explained():
    with pytest.raises(ModelError, match="is not a known model"):
        load_model("no-such-model")
    with pytest.raises(ConfigError, match="Did you mean 'smollm2-135m'"):
        EMBEDDED.get("smollm2")


def test_plain_prompt_without_chat_template():
    loaded = tiny_loaded("gemma3")
    loaded.tokenizer.chat_template = None
    assert loaded.tokenizer.decode(loaded.encode_message("Hi")) == "Hi\nAnswer:"


def test_one_chat_prompt_for_the_harness_and_the_service():
    """``encode_message`` (harness) is ``chat_ids`` of one user turn (service), with and without a template."""
    for template in (True, False):
        loaded = tiny_loaded("llama")
        if not template:
            loaded.tokenizer.chat_template = None
        turn = [{"role": "user", "content": "Where is Oslo?"}]
        assert loaded.encode_message("Where is Oslo?") == loaded.chat_ids(turn)
    plain = tiny_loaded("gemma3")
    plain.tokenizer.chat_template = None
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Where?"}]
    assert plain.tokenizer.decode(plain.chat_ids(turns)) == "Be brief.\nHi\nAnswer: Hello.\nWhere?\nAnswer:"
    assert plain.tokenizer.decode(plain.chat_ids(turns[:2], generation_prompt=False)) == "Be brief.\nHi\n"


def test_the_head_gets_a_contiguous_input_and_the_same_logits(family):
    """``logits_to_keep`` slices ``hidden[:, -k:]`` (not contiguous for batch > 1), which sends
    ``F.linear`` down a slow batched path; the loaded model's head is handed a contiguous copy,
    and the logits are those of the head on exactly those rows."""
    import torch

    from kvcomm.models.loading import contiguous_head

    loaded = tiny_loaded(family)
    head = loaded.model.get_output_embeddings()
    assert len(head._forward_pre_hooks) == 1  # made a LoadedModel: hooked already
    contiguous_head(loaded.model)
    contiguous_head(loaded.model)  # calling again adds no second hook
    assert len(head._forward_pre_hooks) == 1
    seen: list[bool] = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 200, (3, 9))
    hidden = loaded.model.get_decoder()(input_ids=ids).last_hidden_state
    logits = loaded.model(input_ids=ids, logits_to_keep=2).logits
    assert seen == [True]
    assert hidden[:, -2:].is_contiguous() is False
    expected = torch.nn.functional.linear(hidden[:, -2:].contiguous(), head.weight)
    if getattr(loaded.model.config.get_text_config(), "final_logit_softcapping", None):
        cap = loaded.model.config.get_text_config().final_logit_softcapping
        expected = torch.tanh(expected / cap) * cap
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
