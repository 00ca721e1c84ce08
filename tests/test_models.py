"""Loading from a directory, sharing one copy, refusing incompatible pairs, clear install errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_the_mlp_in_place_gives_the_same_values_bit_for_bit_and_keeps_autograd(family):
    """A loaded model's MLPs compute ``act(gate(x)) * up(x)`` in place outside training: the
    logits equal the unpatched model's exactly; with gradients the class's own forward runs."""
    import torch

    from kvcomm.models.lean_mlp import lean_mlp
    from tests.conftest import tiny_model

    loaded = tiny_loaded(family)
    plain = tiny_model(family, vocab_size=len(loaded.tokenizer))  # the same seed: the same weights, unpatched
    layers = len(loaded.model.get_decoder().layers)
    assert lean_mlp(loaded.model) == layers and lean_mlp(loaded.model) == layers  # once, and again: no change
    assert all(layer.mlp.forward.__func__.__name__ == "_forward" for layer in loaded.model.get_decoder().layers)
    assert "forward" not in vars(plain.get_decoder().layers[0].mlp)
    wrapped = plain.get_decoder().layers[1].mlp
    wrapped.forward = lambda x: x  # another library's wrapper: kept
    assert lean_mlp(plain) == layers - 1 and vars(wrapped)["forward"](1) == 1
    del wrapped.forward
    for layer in plain.get_decoder().layers:
        vars(layer.mlp).pop("forward", None)  # plain again
    ids = torch.randint(0, 200, (3, 11))
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits)
    mlp = loaded.model.get_decoder().layers[0].mlp
    x = torch.randn(2, 5, mlp.gate_proj.in_features, requires_grad=True)
    with torch.enable_grad():  # (whatever an earlier test left)
        mlp(x).sum().backward()  # in place would have broken what autograd saved
    assert x.grad is not None and torch.isfinite(x.grad).all()


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


def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    from kvcomm.models import resolve_model

    monkeypatch.chdir(tmp_path)  # a folder that resolving "" used to take for a model directory
    for name in ("", "  "):
        with pytest.raises(ModelError, match="model name is empty"):
            resolve_model(name)
    with pytest.raises(ModelError, match="model name is empty"):
        load_model("")


def test_a_registered_name_that_is_also_a_model_folder_here_says_which_it_takes(tmp_path, monkeypatch):
    """A folder named like an embedded model was passed over silently for the embedded model."""
    import warnings

    from kvcomm.models import resolve_model

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_model("smollm2-135m").kind == "embedded"  # no folder of that name: nothing said
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="names the embedded model; the model folder smollm2-135m here is not used "
                                         r"\(give ./smollm2-135m for it\)"):
        assert resolve_model("smollm2-135m").kind == "embedded"
    assert resolve_model("./smollm2-135m").kind == "directory"


def test_files_that_are_not_a_model_give_a_model_error_naming_them(tmp_path, monkeypatch):
    """A folder whose config is no model's, a model folder without a tokenizer and a file named
    ``.gguf`` that is not GGUF or is cut short: ``cannot load`` with the path and the cause, not a bare ValueError."""
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"hidden_size": 8}')
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_loaded("llama").model.save_pretrained(no_tokenizer)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF")  # the magic, then nothing
    loaded = tiny_loaded("llama")
    cut, listed = tmp_path / "cut-weights", tmp_path / "config-a-list"
    for folder in (cut, listed):
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # before: SafetensorError's traceback
    (listed / "config.json").write_text("[]")  # before: TypeError's traceback
    # a config that asks for more layers than the weights hold (before: loaded, those layers random, a
    # log line -q hid), and one whose widths the weights do not have (before: RuntimeError's traceback)
    deeper, wider = tmp_path / "deeper", tmp_path / "wider"
    for folder, key, value in ((deeper, "num_hidden_layers", 6), (wider, "intermediate_size", 96)):
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ModelError, match="missing or of another shape.*would be random"):
        load_model(str(deeper))
    for path in (odd, no_tokenizer, garbage, truncated, cut, listed, wider):
        with pytest.raises(ModelError, match="cannot load") as raised:
            load_model(str(path))
        assert str(path) in str(raised.value)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # the failed conversion left nothing
    with pytest.raises(ModelError, match="GGUF file .*UPPER.GGUF does not exist"):  # read as GGUF whatever its case
        load_model(str(tmp_path / "UPPER.GGUF"))


def test_a_folder_name_that_is_not_here_says_it_was_read_as_a_hub_id(tmp_path, monkeypatch):
    """``models/x`` with no such folder is a hub id to transformers: when the hub cannot give it,
    the error says the folder was not found, not only that the hub could not be reached."""
    from kvcomm.models import loading

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(ModelError, match="read as a Hugging Face hub id") as raised:
        load_model("models/x")
    assert str(tmp_path / "models" / "x") in str(raised.value) and "couldn't connect" in str(raised.value)


class _FakeTokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def _fake_gguf_loading(monkeypatch, failure: BaseException | None):
    """``loading``'s transformers classes replaced: the "GGUF" loads at once, and saving the model
    writes a partial weights file, then raises ``failure`` (or writes its config)."""
    from kvcomm.models import loading

    class FakeModel:
        class config:  # noqa: N801  (transformers' attribute name)
            pass

        def save_pretrained(self, folder):
            (folder / "model.safetensors").write_bytes(b"x" * 1000)
            if failure is not None:
                raise failure
            (folder / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "AutoTokenizer", type("T", (), {"from_pretrained": staticmethod(
        lambda *a, **k: _FakeTokenizer())}))
    monkeypatch.setattr(loading, "AutoModelForCausalLM", type("M", (), {"from_pretrained": staticmethod(
        lambda *a, **k: FakeModel())}))
    return loading


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failed_or_interrupted_conversion_leaves_no_staging_folder(tmp_path, monkeypatch, failure):
    loading = _fake_gguf_loading(monkeypatch, failure)
    gguf, target = tmp_path / "m.gguf", tmp_path / "models" / "m-x"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(type(failure)):
        loading._convert(gguf, target)
    assert list(target.parent.iterdir()) == []  # neither the target nor a hidden .tmp staging folder


def test_a_conversion_appears_whole_under_its_name(tmp_path, monkeypatch):
    loading = _fake_gguf_loading(monkeypatch, None)
    gguf, target = tmp_path / "m.gguf", tmp_path / "models" / "m-x"
    gguf.write_bytes(b"GGUF")
    assert loading._convert(gguf, target) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in target.parent.iterdir()] == ["m-x"]


def test_a_converted_folder_that_lost_its_weights_is_converted_again(tmp_path, monkeypatch):
    """Before, a folder with a config was taken as converted whatever else it held: every load then
    failed until a person found and deleted it."""
    loading = _fake_gguf_loading(monkeypatch, None)
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    converted = Path(loading.model_source(str(gguf)))
    (converted / "model.safetensors").unlink()
    assert Path(loading.model_source(str(gguf))) == converted and (converted / "model.safetensors").is_file()


def test_split_parts_are_assembled_only_to_convert_and_the_assembly_is_removed(tmp_path, monkeypatch):
    """The assembled GGUF of a split embedded model (1.1 GB for Qwen2.5-Coder-1.5B) was made again at
    every load, converted folder or not, and kept in the cache for good."""
    loading = _fake_gguf_loading(monkeypatch, None)
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    parts = [tmp_path / "a.gguf.part", tmp_path / "b.gguf.part"]
    for part in parts:
        part.write_bytes(b"GGUF")
    model = EmbeddedModel("split", "none", ("fake-pkg",), (("kvcomm_no_such_module", "x.gguf"),), 1)
    monkeypatch.setattr(type(model), "part_paths", lambda self: parts)
    monkeypatch.setattr(loading, "EMBEDDED", {"split": model})
    monkeypatch.setattr(loading, "resolve_model", lambda name: type("Found", (), {"kind": "embedded", "path": None}))
    assembled = []
    real_assemble = loading._assemble
    monkeypatch.setattr(loading, "_assemble", lambda name: assembled.append(name) or real_assemble(name))
    first = Path(loading.model_source("split"))
    assert (first / "model.safetensors").is_file() and assembled == ["split"]
    assert not (tmp_path / "cache" / "gguf" / "split.gguf").exists()  # the converted folder replaces it
    assert Path(loading.model_source("split")) == first and assembled == ["split"]  # not assembled again


def test_an_architecture_without_kv_heads_in_its_config_pairs_with_itself(tmp_path):
    """GPT-2's config has no ``num_key_value_heads`` (one KV head per attention head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(
        tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    sender, _ = load_pair(str(tmp_path / "gpt2"), str(tmp_path / "gpt2"))
    assert {k: sender.fingerprint[k] for k in ("model_type", "num_layers", "num_kv_heads", "head_dim")} == {
        "model_type": "gpt2", "num_layers": 1, "num_kv_heads": 2, "head_dim": 8}


def test_a_config_missing_a_layout_field_is_an_unsupported_architecture():
    from types import SimpleNamespace

    from kvcomm.models import make_fingerprint

    with pytest.raises(ModelError, match="unsupported architecture 'odd'.*num_hidden_layers"):
        make_fingerprint(SimpleNamespace(model_type="odd", num_attention_heads=2, hidden_size=16), {})
    with pytest.raises(ModelError, match="unsupported architecture 'odd'.*num_attention_heads"):
        make_fingerprint(SimpleNamespace(model_type="odd", num_hidden_layers=2, hidden_size=16), {})


def test_the_weights_digest_tells_fine_tunes_apart_and_not_dtypes():
    """One checkpoint in float32 and bfloat16 has one digest (a profile calibrated in one dtype
    is used in the other); a change to one late row of the embedding changes it (before, only
    each parameter's first 4,096 values were hashed)."""
    import copy

    import torch

    from kvcomm.models.loading import LoadedModel
    from tests.conftest import tiny_loaded

    model = tiny_loaded("llama")
    half = LoadedModel(model.name, copy.deepcopy(model.model).to(torch.bfloat16), model.tokenizer)
    assert half.weights_digest == model.weights_digest
    tuned = copy.deepcopy(model.model)
    with torch.no_grad():
        tuned.get_input_embeddings().weight[-1] += 1.0
    assert LoadedModel(model.name, tuned, model.tokenizer).weights_digest != model.weights_digest


def test_a_16_bit_model_on_a_cpu_without_native_arithmetic_warns(tiny_dir: Path, monkeypatch) -> None:
    """bfloat16 where the CPU emulates it runs several times slower than float32 (8 against 58
    GFLOP/s on an AVX2 host): loading one says so; float32, or a CPU that has it, says nothing."""
    import warnings

    from kvcomm.models import loading, native

    monkeypatch.setattr(native, "native", lambda dtype: dtype not in (torch.bfloat16, torch.float16))
    monkeypatch.setattr(loading, "_LOADED", {})
    with pytest.warns(UserWarning, match="no native bfloat16 arithmetic.*give float32"):
        assert load_model(str(tiny_dir), dtype="bfloat16").dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(str(tiny_dir))  # float32
        monkeypatch.setattr(native, "native", lambda dtype: True)
        monkeypatch.setattr(loading, "_LOADED", {})
        load_model(str(tiny_dir), dtype="bfloat16")
    assert native.describe_cpu().startswith(torch.backends.cpu.get_cpu_capability() + "; bfloat16 ")
    monkeypatch.undo()
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # not judged where its flags are not read: no warning
    assert native.native(torch.bfloat16) and native.native(torch.float16)


def test_two_spellings_of_one_model_folder_are_the_same_model(tiny_dir: Path, monkeypatch) -> None:
    """A profile recorded without weights is checked by name: ``tiny`` and ``./tiny`` (and an
    absolute path) are one folder; a registered name is never a folder's, another folder is another."""
    from kvcomm.models.source import same_model_name

    monkeypatch.chdir(tiny_dir.parent)
    name = tiny_dir.name
    assert same_model_name(name, f"./{name}") and same_model_name(f"./{name}", str(tiny_dir))
    (tiny_dir.parent / "other").mkdir()
    assert not same_model_name(name, "other") and not same_model_name(name, "no-such-folder")
    assert same_model_name("smollm2-135m", "smollm2-135m") and not same_model_name("smollm2-135m", name)
