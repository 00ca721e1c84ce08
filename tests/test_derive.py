"""Deriving variants: recipes are reproducible, a derived model is saved, carded and addressable
by name, and the same seed gives the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kvcomm.cli import app
from kvcomm.errors import ConfigError, ModelError
from kvcomm.models import derive as derive_module
from kvcomm.models.derive import DeriveOptions, derive, lr_factor
from kvcomm.models.derived import Card, check_name, derived_names, derived_path, derived_root, load_card
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


def test_a_derived_model_is_saved_with_its_card_and_is_reproducible(tiny_dir, cache, monkeypatch):
    rates: list[float] = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        rates.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    options = DeriveOptions(recipe="terse", steps=3, examples=8, batch_size=2, max_tokens=2048)
    card = derive("tiny-terse", str(tiny_dir), options, progress=False)
    assert rates == pytest.approx([card.learning_rate * f for f in (1.0, 1.0, 0.55)])  # lr_factor
    assert derived_names() == ["tiny-terse"] and load_card("tiny-terse") == card
    assert card.base == str(tiny_dir) and card.steps == 3 and len(card.losses) == 3 and card.trainable_parameters > 0
    # what bit-identical weights need, and the base where it was (a relative path meant nothing elsewhere)
    assert card.extra == {"torch_threads": torch.get_num_threads(), "device": "cpu",
                          "base_path": str(tiny_dir.resolve())}
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
    from kvcomm.models import load_model

    before = load_model("tiny-terse")
    derive("tiny-terse", str(tiny_dir), options.model_copy(update={"seed": 9}), progress=False, overwrite=True)
    after = load_model("tiny-terse")  # the new weights (before, the copy loaded before the derive)
    assert after is not before and after.weights_digest != before.weights_digest
    with pytest.raises(ConfigError, match="cannot be derived from itself"):  # before: its card named itself its base
        derive("tiny-terse", "tiny-terse", options, progress=False, overwrite=True)
    assert load_card("tiny-terse").base == str(tiny_dir)
    with pytest.raises(ConfigError, match="seed"):  # torch's range (before: an OverflowError after the base loaded)
        DeriveOptions(recipe="terse", seed=2**70)


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


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 15, 19, 48, 100])
def test_the_learning_rate_warms_up_over_a_tenth_and_falls_towards_a_tenth(steps):
    """As ``DeriveOptions.learning_rate`` says: ``max(1, steps // 10)`` warm-up steps ending at the
    peak, then a linear fall whose next step (after the last) would be a tenth of the peak."""
    factors = [lr_factor(step, steps) for step in range(steps)]
    warmup = max(1, steps // 10)
    assert factors[0] == pytest.approx(1 / warmup) and factors.index(max(factors)) == warmup - 1
    assert max(factors) == 1.0 and lr_factor(steps, steps) == pytest.approx(0.1 if steps > 1 else 1.0)
    assert all(a < b for a, b in zip(factors[:warmup], factors[1:warmup]))  # rises
    assert steps == 1 or factors[warmup] == 1.0  # the peak twice: the warm-up's last step and the next
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))  # then falls


def test_a_name_with_a_trailing_newline_is_refused(tiny_dir, cache):
    for name in ("tiny\n", "tiny\n\n", "\ntiny"):
        with pytest.raises(ConfigError, match="must be 1-64 lowercase"):
            check_name(name)
        with pytest.raises(ConfigError, match="must be 1-64 lowercase"):
            derive(name, str(tiny_dir), DeriveOptions(recipe="terse"), progress=False)
    check_name("tiny.terse-2_b")


def test_derive_keeps_a_folder_of_the_same_name_that_is_not_a_derived_model(tiny_dir, cache):
    mine = derived_root() / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own files")
    with pytest.raises(ConfigError, match=f"{mine} exists and is not a derived model \\(a folder without.*--overwrite"):
        derive("mine", str(tiny_dir), DeriveOptions(recipe="terse", steps=1, examples=2), progress=False)
    assert (mine / "notes.txt").read_text() == "my own files"


class _Saves:
    """Stands for a model or tokenizer: ``save_pretrained`` writes one file."""

    def __init__(self, file):
        self.file = file

    def save_pretrained(self, folder):
        (folder / self.file).write_text("{}")


def _card(name):
    return Card(name=name, base="b", recipe="terse", description="", steps=1, seed=0, learning_rate=1e-3, rank=1,
                batch_size=1, examples=1, data_sha256="0", first_loss=1, final_loss=1, losses=[1], seconds=0,
                trainable_parameters=1, created="", versions={})


def test_saving_keeps_what_appeared_meanwhile_unless_told_to_overwrite(cache):
    """A folder that appears under the name while a variant trains is not replaced without
    ``overwrite``: the variant is saved under the next free name, which the error names (before,
    a raw OSError, and the trained model was thrown away); with ``overwrite``, it is replaced."""
    mine = derived_root() / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own files")
    with pytest.raises(ConfigError, match="appeared while 'mine' was being derived and is kept; the variant is saved "
                                          "as 'mine-2' instead"):
        derive_module._save("mine", _Saves("config.json"), _Saves("tokenizer.json"), _card("mine"), False)
    assert sorted(p.name for p in derived_root().iterdir()) == ["mine", "mine-2"]  # no staging folder left
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and load_card("mine-2") == _card("mine-2")
    derive_module._save("mine", _Saves("config.json"), _Saves("tokenizer.json"), _card("mine"), True)
    assert load_card("mine") == _card("mine") and not (mine / "notes.txt").exists()
    assert sorted(p.name for p in derived_root().iterdir()) == ["mine", "mine-2"]


def test_a_base_that_is_not_a_model_is_a_model_error(tmp_path, cache):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ModelError, match="cannot load"):
        derive("x", str(tmp_path / "odd"), DeriveOptions(recipe="terse"), progress=False)


def _fake_derived(name, card):
    folder = derived_root() / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if card is not None:
        (folder / "kvcomm-card.json").write_text(card)
    return folder


def test_an_unreadable_card_is_listed_and_its_model_can_be_removed(cache, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per model
    _fake_derived("good", _card("good").model_dump_json())
    broken = _fake_derived("broken", "{not json")
    old = _fake_derived("old", json.dumps({"name": "old"}))
    no_card = _fake_derived("no-card", None)
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")}
    assert "card unreadable: Expecting property name" in rows["broken"]
    assert ("card unreadable: base: Field required; recipe: Field required; description: Field required "
            "(and ") in rows["old"]  # the first three problems of many
    assert "terse" in rows["good"]
    result = runner.invoke(app, ["models", "show", "broken"])
    assert result.exit_code == 2 and "cannot read the card of derived model 'broken'" in result.stderr
    for folder in (broken, old, no_card):
        result = runner.invoke(app, ["models", "remove", folder.name])
        assert result.exit_code == 0, result.output
        assert not folder.exists()
    assert derived_names() == ["good"]


@pytest.mark.parametrize("name, expected", [("nothing-here", "no derived model named 'nothing-here'"),
                                            ("../derived", "must be 1-64 lowercase"),
                                            ("good\n", "must be 1-64 lowercase")])
def test_remove_refuses_what_is_not_a_derived_models_folder(cache, name, expected):
    _fake_derived("good", _card("good").model_dump_json())
    result = runner.invoke(app, ["models", "remove", name])
    assert result.exit_code == 2 and expected in result.stderr, result.output
    assert derived_names() == ["good"]


def test_remove_refuses_a_linked_model_and_keeps_what_the_link_points_to(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    (elsewhere / "kvcomm-card.json").write_text(_card("linked").model_dump_json())
    derived_root().mkdir(parents=True)
    (derived_root() / "linked").symlink_to(elsewhere)
    result = runner.invoke(app, ["models", "remove", "linked"])
    assert result.exit_code == 2 and "cannot remove derived model 'linked'" in result.stderr, result.output
    assert sorted(p.name for p in elsewhere.iterdir()) == ["config.json", "kvcomm-card.json"]


def test_the_next_free_name_of_a_64_character_name_is_a_valid_derived_name(cache):
    from kvcomm.models.derived import check_name

    name = "m" * 64
    (derived_root() / name).mkdir(parents=True)
    (derived_root() / name / "notes.txt").write_text("my own files")
    with pytest.raises(ConfigError, match=f"saved as '{'m' * 62}-2' instead"):
        derive_module._save(name, _Saves("config.json"), _Saves("tokenizer.json"), _card(name), False)
    check_name("m" * 62 + "-2")
    assert load_card("m" * 62 + "-2").name == "m" * 62 + "-2"


def test_forgetting_a_derived_model_drops_it_loaded_by_name_and_by_path(cache, monkeypatch):
    from kvcomm.models import loading

    folder = derived_root() / "mine"
    folder.mkdir(parents=True)
    kept = {("mine", "float32", "dense"): 1, (str(folder / ".." / "mine"), "float32", "dense"): 2,
            ("other", "float32", "dense"): 3}
    monkeypatch.setattr(loading, "_LOADED", dict(kept))
    loading.forget_loaded("mine", folder)
    assert list(loading._LOADED) == [("other", "float32", "dense")]


def test_a_loss_that_turns_not_finite_stops_the_derive_and_saves_nothing(tiny_dir, cache, monkeypatch):
    """A diverging fine-tune was saved with NaN weights and a card that could not be read back."""
    from kvcomm.errors import ModelError
    from kvcomm.models import derive as derive_module

    real = derive_module._loss
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(derive_module, "_loss", diverging)
    options = DeriveOptions(recipe="terse", steps=3, examples=8, batch_size=2, max_tokens=2048)
    with pytest.raises(ModelError, match="the loss is nan at step 2 of 3; nothing was saved"):
        derive("tiny-nan", str(tiny_dir), options, progress=False)
    assert derived_names() == []
