"""Deriving a variant: LoRA fine-tuning on a recipe's generated data, merged into the weights.

``derive("smollm2-135m-terse", "smollm2-135m", DeriveOptions(recipe="terse"))`` trains a LoRA
adapter (``peft``) on every linear layer of the base, with the loss on the assistant's tokens only,
merges it into the weights and saves a plain model directory under the kvcomm cache with a
:class:`~kvcomm.models.derived.Card`. The result has the base's shapes, tokenizer and vocabulary,
so it exchanges KV with the base and with every other variant of it.

The same seed gives the same data and the same adapter initialisation; the card records the
data's hash, the loss curve, the time and the library versions.
"""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from kvcomm.config import Options
from kvcomm.errors import ConfigError, ModelError
from kvcomm.files import atomic_write, staged_folder, sweep_staging
from kvcomm.models.derived import CARD_FILE, Card, check_name, derived_path, derived_root
from kvcomm.models.loading import LoadedModel, forget_loaded, load_pretrained
from kvcomm.models.recipes import RECIPES, Example, data_sha256, make_examples
from kvcomm.models.registry import EMBEDDED
from kvcomm.models.source import resolve_model

IGNORE = -100  # label of a token the loss skips (the prompt, padding)


class DeriveOptions(Options):
    """How to derive a variant (recorded in its card).

    Attributes:
        recipe: the generated data and direction (``kvcomm.models.recipes``).
        steps: optimisation steps (default: the recipe's).
        seed: data and adapter initialisation seed.
        learning_rate: peak learning rate (default: the recipe's). The rate rises linearly over
            the first tenth of the steps (``w = max(1, steps // 10)``: below 20 steps the first
            step already runs at the peak), then falls linearly by ``0.9 / (steps - w)`` a step,
            towards a tenth of the peak, which the step after the last would reach
            (:func:`lr_factor`; the schedule every recorded variant was derived with).
        rank: LoRA rank; the adapter's scale ``alpha`` is twice the rank.
        batch_size: examples per step.
        examples: generated examples (cycled through in a shuffled order).
        max_tokens: an example longer than this is cut.
    """

    what = "derivation"
    recipe: str
    steps: int | None = Field(default=None, ge=1, le=100_000)
    seed: int = Field(default=0, ge=-2**63, le=2**64 - 1)  # torch.manual_seed's range
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    rank: int = Field(default=16, ge=1, le=256)
    batch_size: int = Field(default=4, ge=1, le=512)
    examples: int = Field(default=512, ge=1, le=1_000_000)
    max_tokens: int = Field(default=256, ge=8, le=8192)


def derive(name: str, base: str, options: DeriveOptions, progress: bool = True, overwrite: bool = False) -> Card:
    """Fine-tunes ``base`` by ``options.recipe`` and saves the merged model as the derived model ``name``.

    With ``overwrite``, whatever is at ``<cache>/derived/<name>`` is replaced once the new model is saved.

    Raises:
        ConfigError: a bad or taken name (unless ``overwrite``: a derived model, or any other file
            or folder at its place in the cache), an unknown recipe.
        ModelError: the base cannot be loaded, or has no tokens to learn from, or training's loss
            turned not finite (nothing is saved).
    """
    check_name(name)
    if name in EMBEDDED:
        raise ConfigError(f"{name!r} is an embedded model's name; choose another name for the variant")
    sweep_staging(derived_root())  # what derives killed earlier left (a replaced model put back first)
    target = derived_root() / name
    if not overwrite and derived_path(name) is not None:
        raise ConfigError(f"derived model {name!r} exists; pass --overwrite to replace it")
    if not overwrite and target.exists():
        what = f"a folder without config.json or {CARD_FILE}" if target.is_dir() else "a file"
        raise ConfigError(f"{target} exists and is not a derived model ({what}); choose another name, move it "
                          "away, or pass --overwrite to delete it and save the variant there")
    recipe = RECIPES.get(options.recipe)
    source = resolve_model(base)
    if source.path is not None and source.path.resolve() == target.resolve():
        # before: trained on, replaced, and its card named itself as its base (the first base lost)
        raise ConfigError(f"{name!r} cannot be derived from itself; give the variant another name (its base "
                          f"is {base!r})")
    try:
        from peft import LoraConfig, get_peft_model  # imported here: only deriving needs it
    except ImportError:
        raise ConfigError("deriving a variant needs peft: pip install 'kvcomm[variants]'") from None

    steps = options.steps or recipe.steps
    lr = options.learning_rate or recipe.learning_rate
    tokenizer, model = load_pretrained(base, torch.float32, "sdpa")
    examples = make_examples(recipe, options.examples, options.seed)
    encoded = _encode(LoadedModel(base, model, tokenizer), examples, options.max_tokens)
    torch.manual_seed(options.seed)
    lora = LoraConfig(r=options.rank, lora_alpha=2 * options.rank, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    tuned = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    order = _order(len(encoded), steps * options.batch_size, options.seed)
    losses: list[float] = []
    began = time.perf_counter()
    tuned.train()
    bar = tqdm(range(steps), desc=f"derive {name}", disable=not progress, unit="step")
    with torch.inference_mode(False), torch.enable_grad():  # whatever the caller turned off
        for step in bar:
            chosen = [encoded[i] for i in order[step * options.batch_size:(step + 1) * options.batch_size]]
            loss = _loss(tuned.get_base_model(), chosen, pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):  # before, saved with NaN weights and a card no one could read
                raise ModelError(f"deriving {name}: the loss is {losses[-1]} at step {step + 1} of {steps}; nothing "
                                 f"was saved (a lower learning rate, --lr, may train)")
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - began
    merged = tuned.merge_and_unload()
    if broken := [n for n, p in merged.named_parameters() if not bool(torch.isfinite(p).all())]:  # a last step's
        raise ModelError(f"deriving {name}: {len(broken)} weights are not finite after training (e.g. {broken[0]}); "
                         "nothing was saved (a lower learning rate, --lr, may train)")
    merged.eval()
    card = Card(
        name=name, base=base, recipe=recipe.name, description=recipe.description, steps=steps, seed=options.seed,
        learning_rate=lr, rank=options.rank, batch_size=options.batch_size, examples=options.examples,
        max_tokens=options.max_tokens,
        data_sha256=data_sha256(examples), first_loss=losses[0], final_loss=sum(losses[-10:]) / len(losses[-10:]),
        losses=[round(value, 5) for value in losses], seconds=round(seconds, 2), trainable_parameters=trainable,
        created=datetime.now(UTC).isoformat(timespec="seconds"), versions=_versions(),
        # the same weights bit for bit need the same thread count (torch's sums split by thread); a
        # base given as a folder or file is recorded where it was, not as typed
        extra={"torch_threads": torch.get_num_threads(), "device": "cpu",
               **({"base_path": str(source.path.resolve())}
                  if source.path is not None and source.kind != "derived" else {})},
    )
    _save(name, merged, tokenizer, card, overwrite)
    forget_loaded(name, target)  # a model loaded under this name (or its path) before is not this one
    return card


def lr_factor(step: int, steps: int) -> float:
    """The learning rate of step ``step`` (from 0) of ``steps``, as a fraction of the peak.

    The first ``w = max(1, steps // 10)`` steps warm up: ``1/w, 2/w, …, 1`` (steps ``w - 1`` and
    ``w`` at the peak); the rate then falls by ``0.9 / (steps - w)`` a step, so the last step runs one such
    decrement above 0.1. Kept as it was when the recorded variants were derived: changing it
    changes their weights.
    """
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup)


def _encode(model: LoadedModel, examples: list[Example], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each example's token ids and labels (the prompt's tokens are not learned)."""
    out = []
    for example in examples:
        prompt = model.chat_ids([{"role": "user", "content": example.user}])
        whole = model.chat_ids([{"role": "user", "content": example.user},
                                {"role": "assistant", "content": example.assistant}], generation_prompt=False)
        shared = 0
        while shared < min(len(prompt), len(whole)) and prompt[shared] == whole[shared]:
            shared += 1
        ids = whole[:max_tokens]
        labels = [IGNORE] * min(shared, len(ids)) + ids[shared:]
        if all(label == IGNORE for label in labels):
            raise ModelError(f"an example has no answer tokens within {max_tokens} tokens; raise max_tokens")
        out.append((ids, labels))
    return out


def _order(count: int, needed: int, seed: int) -> list[int]:
    """Example indices for ``needed`` draws: shuffled passes over all examples."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(math.ceil(needed / count)):
        epoch = list(range(count))
        rng.shuffle(epoch)
        order += epoch
    return order[:needed]


def _loss(model: torch.nn.Module, chosen: list[tuple[list[int], list[int]]], pad: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a right-padded batch; the output head runs on
    those positions only (vocabularies are large)."""
    width = max(len(ids) for ids, _ in chosen)
    ids = torch.full((len(chosen), width), pad, dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, (tokens, targets) in enumerate(chosen):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(targets)] = torch.tensor(targets)
        mask[row, :len(tokens)] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # type: ignore[operator]
    shifted = labels[:, 1:]
    learned = shifted != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][learned]).float()  # type: ignore[operator]
    config: Any = model.config
    cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, shifted[learned])


def _versions() -> dict[str, str]:
    out = {}
    for package in ("kvcomm", "torch", "transformers", "peft"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def _numbered(name: str, n: int) -> str:
    """``name-n``, ``name`` shortened where that would pass a derived name's 64 characters."""
    suffix = f"-{n}"
    return name[:64 - len(suffix)] + suffix


def _save(name: str, model: torch.nn.Module, tokenizer: object, card: Card, overwrite: bool) -> None:
    """Writes the model, tokenizer and card as ``<cache>/derived/<name>`` atomically
    (:func:`~kvcomm.files.staged_folder`); ``overwrite`` replaces what is there.

    Raises:
        ConfigError: something appeared at ``name`` while the variant trained (without
            ``overwrite``): it is kept, and the variant is saved under the first free name
            ``<name>-2``, ``<name>-3`` … instead, which the message names (the training is not lost).
        ModelError: the file system refused the save.
    """
    def write(at: str, told: Card) -> None:
        with staged_folder(derived_root() / at, replace=overwrite) as staging:
            model.save_pretrained(staging)  # type: ignore[operator]
            tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
            atomic_write(staging / CARD_FILE, told.model_dump_json(indent=2) + "\n")

    try:
        write(name, card)
    except OSError as err:
        if overwrite or not (derived_root() / name).exists():
            raise ModelError(f"could not save the derived model {name!r} in {derived_root()}: {err}") from None
        kept = next(at for n in range(2, 10_000) if not (derived_root() / (at := _numbered(name, n))).exists())
        write(kept, card.model_copy(update={"name": kept}))
        raise ConfigError(f"{derived_root() / name} appeared while {name!r} was being derived and is kept; the "
                          f"variant is saved as {kept!r} instead (remove one, or derive with --overwrite)") from None
