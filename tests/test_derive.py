"""Deriving variants: recipes are reproducible, a derived model is saved, carded and addressable
by name, and the same seed gives the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kvcomm.cli import app
from kvcomm.errors import ConfigError
from kvcomm.models.derive import DeriveOptions, derive
from kvcomm.models.derived import derived_names, derived_path, load_card
from kvcomm.models.recipes import RECIPES, data_sha256, make_examples

runner = CliRunner()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_recipes_are_reproducible_and_move_in_different_directions():
    terse, lowercase = RECIPES.get("terse"), RECIPES.get("lowercase")
    assert make_examples(terse, 20, seed=1) == make_examples(terse, 20, seed=1)
    assert data_sha256(make_examples(terse, 20, 1)) != data_sha256(make_examples(terse, 20, 2))
    short = make_examples(terse, 50, 0)
    assert max(len(e.assistant.split()) for e in short) <= 3  # the answer alone
    casual = make_examples(lowercase, 50, 0)
    assert all(e.assistant == e.assistant.lower() and len(e.assistant.split()) >= 4 for e in casual)


def weights(name):
    path = derived_path(name)
    return load_file(str(next(path.glob("*.safetensors"))))


def test_a_derived_model_is_saved_with_its_card_and_is_reproducible(tiny_dir, cache):
    options = DeriveOptions(recipe="terse", steps=3, examples=8, batch_size=2, max_tokens=2048)
    card = derive("tiny-terse", str(tiny_dir), options, progress=False)
    assert derived_names() == ["tiny-terse"] and load_card("tiny-terse") == card
    assert card.base == str(tiny_dir) and card.steps == 3 and len(card.losses) == 3 and card.trainable_parameters > 0
    assert card.data_sha256 == data_sha256(make_examples(RECIPES.get("terse"), 8, 0))
    first = weights("tiny-terse")
    base = load_file(str(next(tiny_dir.glob("*.safetensors"))))
    assert any(not torch.equal(first[k], base[k]) for k in base if k in first)  # the adapter moved the weights
    assert set(first) >= {k for k in base if "lora" not in k} and not any("lora" in k for k in first)  # merged
    with pytest.raises(ConfigError, match="exists"):
        derive("tiny-terse", str(tiny_dir), options, progress=False)
    derive("tiny-terse", str(tiny_dir), options, progress=False, overwrite=True)
    again = weights("tiny-terse")
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed, same weights
    assert not list(cache.joinpath("derived").glob(".*"))  # no staging folder left behind


def test_the_cli_derives_lists_shows_uses_and_removes(tiny_dir, cache, tmp_path):
    result = runner.invoke(app, ["models", "derive", "tiny-lower", "--from", str(tiny_dir), "--recipe", "lowercase",
                                 "--steps", "2", "--examples", "4", "--batch-size", "2", "--max-tokens", "2048", "-q"])
    assert result.exit_code == 0, result.output
    assert "derived tiny-lower" in result.output and "-m tiny-lower" in result.output
    assert "tiny-lower" in runner.invoke(app, ["models", "list"]).output
    assert json.loads(runner.invoke(app, ["models", "show", "tiny-lower"]).output)["recipe"] == "lowercase"
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "-m", str(tiny_dir), "--receiver", "tiny-lower", "-t", "facts", "--limit", "2",
                                 "--method", "kvcomm", "--ratio", "1", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output  # the variant exchanges KV with its base
    assert json.loads(out.read_text())["config"]["receiver"] == "tiny-lower"
    assert runner.invoke(app, ["models", "remove", "tiny-lower"]).exit_code == 0
    assert derived_names() == []
