"""Packed linear layers (``models/packing.py``): what they compute against torch's own products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvcomm.errors import ConfigError
from kvcomm.models import load_model, load_pair
from kvcomm.models import loading as loading_module
from kvcomm.models import packing as packing_module
from kvcomm.models.packing import PackedLinear, pack_linears, packing_available
from tests.conftest import tiny_loaded

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


def _layer(rows: int = 128, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, PackedLinear]:
    torch.manual_seed(seed)
    dense = nn.Linear(48, 80, bias=bias)
    return dense, PackedLinear.of(dense, rows)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_layer_computes_the_product_and_shares_the_parameters(bias):
    dense, packed = _layer(bias=bias)
    x = torch.randn(3, 7, 48)
    with torch.inference_mode():
        got, want = packed(x), dense(x)
    assert got.shape == want.shape == (3, 7, 80)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert packed.weight is dense.weight and packed.bias is dense.bias


@pytest.mark.parametrize("shape", [(48, 80), (1536, 1024)])  # and at a real model's size, where a lone
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(shape):  # row took another kernel
    torch.manual_seed(0)
    packed = PackedLinear.of(torch.nn.Linear(*shape))
    x = torch.randn(40, shape[0])
    with torch.inference_mode():
        together = packed(x)
        assert all(torch.equal(packed(x[i:i + 1]), together[i:i + 1]) for i in range(0, 40, 7))
        assert torch.equal(packed(x[:37]), together[:37]) and torch.equal(packed(x[3]), together[3])


def test_calls_the_packed_path_does_not_take_are_torchs_own_product_exactly():
    dense, packed = _layer(rows=16)
    with torch.inference_mode():
        long = torch.randn(17, 48)  # more rows than the layer packs for
        assert torch.equal(packed(long), dense(long))
        empty = torch.randn(0, 48)
        assert packed(empty).shape == (0, 80)
    x = torch.randn(4, 48, requires_grad=True)  # autograd: torch's path, gradients flow
    with torch.enable_grad():  # (other test modules turn it off for the session)
        packed(x).sum().backward()
    assert x.grad is not None and dense.weight.grad is not None


def test_a_weight_changed_in_place_after_packing_is_used_not_the_stale_copy():
    dense, packed = _layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        dense.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(packed(x), dense(x))


def test_a_weight_replaced_or_converted_after_packing_is_used_not_the_stale_copy():
    dense, packed = _layer()
    x = torch.randn(5, 48)
    dense.weight.data = torch.randn(80, 48)  # new storage
    with torch.inference_mode():
        assert torch.equal(packed(x), dense(x))
    packed.to(torch.float64)  # another dtype: torch's product, with its dtype rules
    with torch.inference_mode():
        assert packed(x.double()).dtype == torch.float64


def test_a_weight_converted_away_and_back_is_not_taken_for_the_packed_one():
    """bfloat16 and back frees the packed weight's storage; a new one at the same address (its
    version kept by ``.data =``) passed the check, and the stale packed copy was used (a 4096²
    layer here: 3e-3 off)."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(4096, 4096, bias=False)
    packed = PackedLinear.of(dense)
    model = torch.nn.Sequential(packed)
    model.to(torch.bfloat16)
    model.to(torch.float32)
    x = torch.randn(4, 4096)
    with torch.inference_mode():
        assert torch.equal(packed(x), torch.nn.functional.linear(x, packed.weight))


def test_a_packed_layer_converted_to_another_dtype_lets_its_float32_copies_go():
    """Converted to bfloat16, a packed layer kept its float32 weight and the packed copy (the
    model's float32 weights, twice, beside the bfloat16 ones); converted back it still computes
    with the weight it has, by torch's path."""
    dense, packed = _layer()
    source = packed._packed_source
    packed.to(torch.bfloat16)
    assert packed.packed.numel() == packed._packed_source.numel() == 0 and source is not packed._packed_source
    x = torch.randn(5, 48)
    with torch.inference_mode():
        assert torch.equal(packed(x.bfloat16()), torch.nn.functional.linear(x.bfloat16(), packed.weight, packed.bias))
        packed.to(torch.float32)
        assert torch.equal(packed(x), torch.nn.functional.linear(x, packed.weight, packed.bias))
    unchanged = _layer()[1]
    unchanged.to(torch.float32)  # nothing converted: the packed copy stays
    assert unchanged.packed.numel() > 0


def test_a_trainable_bias_keeps_its_gradient():
    dense, packed = _layer()
    dense.weight.requires_grad_(False)
    with torch.enable_grad():
        out = packed(torch.randn(3, 48))
        assert out.requires_grad
        out.sum().backward()
    assert dense.bias.grad is not None


def test_a_packed_model_keeps_its_ties_and_its_logits(family):
    loaded = tiny_loaded(family)
    model = loaded.model
    linears = sum(type(m) is nn.Linear for m in model.modules())
    ids = torch.randint(0, 200, (2, 9))
    with torch.inference_mode():
        before = model(ids).logits
        assert pack_linears(model, min_weight=0) == linears > 0
        after = model(ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert (after - before).abs().max() <= 1e-4
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_only_float32_layers_of_the_minimum_size_are_packed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(2, 2))
    assert pack_linears(model, min_weight=16) == 1
    assert isinstance(model[0], PackedLinear) and type(model[1]) is nn.Linear and type(model[2]) is nn.Linear


def test_a_packed_head_is_hooked_to_take_contiguous_inputs(tiny_dir, monkeypatch):
    """Packing replaces the head with a new module; ``load_model`` hooks that one too."""
    from kvcomm.models import loading

    monkeypatch.setattr(loading, "pack_linears", lambda model: pack_linears(model, min_weight=0))
    monkeypatch.setattr(loading, "_LOADED", {})
    packed = load_model(str(tiny_dir), linear="packed")
    head = packed.model.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    seen: list[bool] = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    packed.model(input_ids=torch.randint(0, 200, (3, 9)), logits_to_keep=2)
    assert seen == [True]
    for layer in packed.model.get_decoder().layers:  # the MLPs compute in place over their packed layers
        assert vars(layer.mlp)["forward"].__func__.__name__ == "_forward"
        assert isinstance(layer.mlp.gate_proj, PackedLinear)


def test_pack_linears_refuses_a_row_limit_below_one():
    with pytest.raises(ConfigError, match="at least 1"):
        pack_linears(nn.Sequential(nn.Linear(2, 2)), rows=0)


def test_load_model_packs_on_request_and_names_a_bad_choice(tiny_dir, monkeypatch):
    monkeypatch.delenv("KVCOMM_LINEAR", raising=False)
    dense = load_model(str(tiny_dir))
    assert dense.linear == "dense" and not any(isinstance(m, PackedLinear) for m in dense.model.modules())
    assert not any(p.requires_grad for p in dense.model.parameters())  # loaded for inference
    packed = load_model(str(tiny_dir), linear="packed")
    assert packed is dense  # its layers are all too small to pack: the dense model, not a second copy
    monkeypatch.setenv("KVCOMM_LINEAR", "packed")
    assert load_model(str(tiny_dir)) is packed
    assert load_pair(str(tiny_dir))[0] is packed
    assert load_model(str(tiny_dir), linear="dense") is dense  # an argument beats the environment
    monkeypatch.setenv("KVCOMM_LINEAR", "fast")
    with pytest.raises(ConfigError, match=r"unknown linear 'fast'.*KVCOMM_LINEAR.*dense, packed"):
        load_model(str(tiny_dir))


def test_packed_without_onednn_is_refused_before_any_weight_loads(tiny_dir, monkeypatch):
    monkeypatch.setattr(packing_module, "packing_available", lambda: False)
    monkeypatch.setattr(loading_module, "_load", lambda *a: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="oneDNN.*use linear='dense'"):
        load_model(str(tiny_dir) + "-never-loaded", linear="packed")
