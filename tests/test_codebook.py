"""The ``klt`` codec and its codebooks: exact entropy coding, bounded error, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomm.agents import encode_context
from kvcomm.errors import DataError
from kvcomm.protocol import pad_left, prefill
from kvcomm.tasks import load_task
from kvcomm.wire import (
    Codebook,
    KVMessage,
    LayerKV,
    MissingCodebook,
    WireError,
    build_codebook,
    codebook_dir,
    load_codebook,
    make_codec,
)
from kvcomm.wire.bootstrap import codebook_from_items, model_codebook
from kvcomm.wire.codebook import _LOADED
from kvcomm.wire.codecs.entropy import laplace_decode, laplace_encode
from kvcomm.wire.codecs.klt import transform_decode, transform_encode
from tests.conftest import random_codebook, tiny_loaded


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-300, 300), max_size=200), st.floats(0.05, 50), st.integers(0, 2**31))
def test_laplace_coding_is_exact(codes, spread, seed):
    codes = np.array(codes, dtype=np.int64)
    scales = np.random.default_rng(seed).uniform(0.05, spread, size=codes.shape)
    low, high, stream = laplace_encode(codes, scales)
    assert np.array_equal(laplace_decode(low, high, scales, stream), codes)


def test_laplace_decoding_refuses_impossible_parameters():
    with pytest.raises(ValueError):
        laplace_decode(0, 5, np.array([1.0, 0.0]), np.zeros(1, dtype=np.uint32))
    with pytest.raises(ValueError):
        laplace_decode(0, 1 << 20, np.array([1.0]), np.zeros(1, dtype=np.uint32))


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), tokens=st.integers(1, 60), dim=st.sampled_from([4, 16, 32]),
       step=st.floats(0.1, 2.0), seed=st.integers(0, 1000))
def test_every_coefficient_is_within_half_a_step(heads, tokens, dim, step, seed):
    """The transform is orthonormal, so the error is exactly the rounding of each coefficient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(heads, tokens, dim, generator=g) * torch.rand(1, 1, dim, generator=g) * 5 + 2
    basis = torch.linalg.qr(torch.randn(heads, dim, dim, generator=g))[0]
    mean = torch.randn(heads, dim, generator=g)
    t = transform_encode(x, basis, mean, step)
    back = transform_decode(t, basis, mean, tuple(x.shape))
    sink_scale = t["side"].float()[:, :1]
    assert ((back[:, 0] - x[:, 0]).abs() <= sink_scale / 2 + 1e-6).all()  # the sink: int8 codes
    if tokens > 1:
        error = (back[:, 1:] - x[:, 1:]) @ basis  # in coefficients
        steps = t["side"].float()[:, 1]
        assert (error.abs() <= steps[:, None, None] / 2 * (1 + 1e-3) + 1e-4).all()


@pytest.mark.parametrize("fill", [0.0, 1.5])
def test_kv_equal_to_the_codebook_mean_is_one_repeated_code(fill):
    """All coefficients zero: a degenerate distribution that still codes and decodes exactly."""
    basis = torch.linalg.qr(torch.randn(2, 8, 8))[0]
    x = torch.full((2, 10, 8), fill)
    t = transform_encode(x, basis, torch.full((2, 8), fill), 0.5)
    back = transform_decode(t, basis, torch.full((2, 8), fill), (2, 10, 8))
    assert torch.equal(back[:, 1:], x[:, 1:]) and torch.allclose(back[:, 0], x[:, 0], atol=1e-3)  # sink: int8


def test_built_codebook_is_orthonormal_ordered_and_stable(tmp_path):
    model = tiny_loaded("qwen2")
    task = load_task("facts", items=6, facts_per_item=6)
    book = codebook_from_items(model, task, task.items, batch_size=4)
    for basis in (*book.keys, *book.values):
        eye = torch.eye(basis.shape[-1]).expand_as(basis)
        assert torch.allclose(basis.transpose(1, 2) @ basis, eye, atol=1e-4)
    ids = [model.encode_message(task.sender_message(item)) for item in task.items[:4]]
    kv = prefill(model.model, *pad_left(ids, model.pad_id))
    first_layer = kv.keys[0][:, 0][kv.valid & (kv.valid.cumsum(1) > 1)] @ book.keys[0][0]
    variances = first_layer.var(dim=0)
    assert variances[:2].mean() > variances[-2:].mean()  # leading components carry the energy
    assert Codebook.from_bytes(book.to_bytes()).id == book.id
    assert load_codebook(book.id) is book


def test_a_variant_gets_its_own_default_codebook_not_its_base_s(monkeypatch, tmp_path):
    """Two models of one fingerprint (a base and a fine-tune) and other weights: each has its own
    default codebook, built from its own KV (before, whichever ran first set it for both)."""
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path))
    base, variant = tiny_loaded("llama"), tiny_loaded("llama", seed=3)
    assert base.fingerprint == variant.fingerprint and base.weights_digest != variant.weights_digest
    first, second = model_codebook(base), model_codebook(variant)
    assert first.id != second.id
    assert model_codebook(base).id == first.id and model_codebook(variant).id == second.id  # each kept as its default
    assert first.meta["weights"] == base.weights_digest


def test_a_default_codebook_saved_before_weights_told_models_apart_is_still_found(monkeypatch, tmp_path):
    """A default saved by an earlier kvcomm (keyed by the fingerprint alone, recording no weights)
    is the model's default still (before this fallback, it was ignored and another one built)."""
    from kvcomm.wire.codebook import save_codebook

    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path))
    model = tiny_loaded("llama")
    built = model_codebook(model)  # today's: recorded under the weights
    older = Codebook(built.keys, built.values, [m + 1 for m in built.key_means], built.value_means,
                     {"fingerprint": model.fingerprint})  # another book, saved as an earlier version did
    for path in (tmp_path / "defaults").iterdir():
        path.unlink()
    save_codebook(older, default=True)
    assert model_codebook(model).id == older.id != built.id
    assert model_codebook(tiny_loaded("llama", seed=3)).id == older.id  # an older default serves whoever asks first


def test_klt_messages_name_their_codebook_and_decode_only_where_it_is(monkeypatch, tmp_path):
    model = tiny_loaded("llama")
    message = encode_context(model, "Omar lives in Cairo. Ana lives in Lima.", None, "klt")
    book_id = message.codec.params()["codebook"]
    assert book_id == model_codebook(model).id  # the model's default, built on first use
    data = message.to_bytes()
    back = KVMessage.from_bytes(data)
    error = max(((a.keys - b.keys).norm() / b.keys.norm()).item() for a, b in zip(back.layers, message.layers))
    assert error < 0.2
    assert len(data) < len(KVMessage(message.fingerprint, message.context_len, message.sink_position,
                                     message.layers, make_codec("int8")).to_bytes())

    _LOADED.clear()
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path / "elsewhere"))  # a receiver without the file
    with pytest.raises(MissingCodebook, match=book_id):
        KVMessage.from_bytes(data)


def test_a_damaged_codebook_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path))
    book = random_codebook(2, 8, 2, seed=3)
    path = codebook_dir() / f"{book.id}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    _LOADED.clear()
    with pytest.raises(WireError, match="damaged"):
        load_codebook(book.id)
    # saving it again (running `kvcomm codebook` again) repairs it (before, the damaged file stayed for good)
    from kvcomm.wire.codebook import save_codebook

    save_codebook(book)
    _LOADED.clear()
    assert load_codebook(book.id).id == book.id


def test_a_default_codebook_whose_file_is_gone_is_built_again(monkeypatch, tmp_path):
    """The sender's own default pointed to a file deleted (or damaged) since: klt failed for good
    with 'copy it from the sender's machine', on the sender's machine."""
    monkeypatch.setenv("KVCOMM_CODEBOOKS", str(tmp_path))
    model = tiny_loaded("llama")
    built = model_codebook(model)
    (tmp_path / f"{built.id}.safetensors").unlink()
    _LOADED.clear()
    again = model_codebook(model)
    assert again.id == built.id and (tmp_path / f"{built.id}.safetensors").is_file()  # the same text, the same book


def test_codebook_must_fit_the_message():
    book = random_codebook(2, 8, 2, seed=4)
    codec = make_codec("klt", codebook=book.id)
    keys = torch.randn(3, 5, 8)  # three heads; the codebook has two
    with pytest.raises(WireError, match="does not fit"):
        KVMessage({"m": 1}, 5, 0, [LayerKV(0, True, keys, keys), LayerKV(1, True, keys, keys)], codec).to_bytes()


def test_building_from_one_token_contexts_is_refused():
    kv = prefill(tiny_loaded("llama").model, torch.tensor([[5]]), torch.tensor([[True]]))
    with pytest.raises(DataError, match="two context tokens"):
        build_codebook([kv], {})
