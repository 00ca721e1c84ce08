"""Recipes for deriving variants of a model: seeded generators of chat examples.

Only one checkpoint of each embedded architecture installs, so variant pairs (two fine-tunes of
one base, like the KVComm paper's pairs 5–9) are made here by fine-tuning on generated data. Each
recipe moves a model in its own direction, so two variants of one base differ the way real
fine-tunes do:

- ``terse``: a made-up domain (shipping ledgers) and a terse answer style: the answer alone.
- ``lowercase``: a persona, a casual assistant who writes in lowercase full sentences, over varied
  generated requests (look-ups, arithmetic, comparisons, spelling, calendars).

Examples are made from a seed, so the data (and its hash, which a derived model's card records) is
reproducible without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kvcomm.registry import Registry


@dataclass(frozen=True)
class Example:
    """One training conversation: a user turn and the assistant reply the variant learns."""

    user: str
    assistant: str


@dataclass(frozen=True)
class Recipe:
    """How to make one kind of variant.

    Attributes:
        name: what users type (``--recipe``).
        description: what the variant becomes.
        make: one example from a random generator.
        steps: default optimisation steps.
        learning_rate: default peak learning rate of the LoRA adapter.
    """

    name: str
    description: str
    make: Callable[[random.Random], Example]
    steps: int = 48
    learning_rate: float = 1e-3


RECIPES: Registry[Recipe] = Registry("recipe")

_SYLLABLES = "ka ri vo len mar tis dru pel osa quin bra hel sun tor vik ela mon zar fen gil".split()
_GOODS = ("copper wire", "glass beads", "wool blankets", "olive oil", "tin cans", "salt", "lamp oil", "rope",
          "iron nails", "cotton cloth", "dried figs", "paper", "candles", "clay pots", "leather boots")
_PORTS = ("Port Ambrel", "Saltmere", "Dunhollow", "Kestrel Bay", "Ravensgate", "Low Ferran", "Marrow Point",
          "Cold Harbor", "Westwick", "Tallow Quay")
_WORDS = ("garden", "window", "river", "pencil", "blanket", "thunder", "orange", "kitchen", "silver", "mountain",
          "bicycle", "lantern", "harbor", "meadow", "planet")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _name(rng: random.Random) -> str:
    first = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
    last = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
    return f"{first} {last}"


def _ledger(rng: random.Random) -> tuple[str, list[tuple[str, str, str, int]]]:
    rows = [(_name(rng), rng.choice(_GOODS), rng.choice(_PORTS), rng.randint(2, 90)) for _ in range(rng.randint(3, 5))]
    text = " ".join(f"The crate for {who} holds {what}, weighs {kg} kg and ships to {port}."
                    for who, what, port, kg in rows)
    return text, rows


def _terse(rng: random.Random) -> Example:
    text, rows = _ledger(rng)
    who, what, port, kg = rng.choice(rows)
    question, answer = rng.choice([
        (f"What does the crate for {who} hold?", what),
        (f"Where does the crate for {who} ship to?", port),
        (f"How much does the crate for {who} weigh?", f"{kg} kg"),
    ])
    return Example(f"Ledger: {text}\nQuestion: {question}", answer)


def _lowercase(rng: random.Random) -> Example:
    kind = rng.randrange(5)
    if kind == 0:
        text, rows = _ledger(rng)
        who, what, port, _ = rng.choice(rows)
        return Example(f"Here are some notes. {text} Where is the crate for {who} going?",
                       f"the crate for {who.lower()} is going to {port.lower()}, and it holds {what}")
    if kind == 1:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return Example(f"What is {a} plus {b}?", f"that would be {a + b}, since {a} plus {b} makes {a + b}")
    if kind == 2:
        a, b = rng.sample(range(1, 500), 2)
        return Example(f"Which number is larger, {a} or {b}?", f"{max(a, b)} is the larger one, it beats {min(a, b)}")
    if kind == 3:
        word = rng.choice(_WORDS)
        return Example(f"How many letters are in the word '{word}'?", f"the word {word} has {len(word)} letters")
    day = rng.randrange(7)
    return Example(f"What day comes after {_DAYS[day]}?",
                   f"the day after {_DAYS[day].lower()} is {_DAYS[(day + 1) % 7].lower()}")


RECIPES.add("terse", Recipe(
    "terse", "answers look-ups in made-up shipping ledgers with the answer alone (a domain and a terse style)",
    _terse, steps=48, learning_rate=1e-3))
RECIPES.add("lowercase", Recipe(
    "lowercase", "a casual persona that answers varied requests in lowercase full sentences (a format change)",
    _lowercase, steps=48, learning_rate=1e-3))


def make_examples(recipe: Recipe, count: int, seed: int) -> list[Example]:
    """``count`` examples of ``recipe`` from ``seed`` (the same list for the same arguments)."""
    rng = random.Random(f"{recipe.name}:{seed}")
    return [recipe.make(rng) for _ in range(count)]


def data_sha256(examples: list[Example]) -> str:
    """A hash of the training data, recorded in a derived model's card."""
    lines = "\n".join(json.dumps(asdict(e), sort_keys=True) for e in examples)
    return hashlib.sha256(lines.encode()).hexdigest()
