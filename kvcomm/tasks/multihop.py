"""A generated task that needs attention across pieces: two hops, each in a different piece.

Each item's context is ``pieces`` passages read by different senders. One passage says where a
person lives ("Omar lives in Velmora."), another which country that city is in ("Velmora is in
Drenland."); the others hold distractors of both kinds. The question ("Which country does Omar
live in?") needs both hops. Cities and countries are made up, so the answer cannot come from what
the model already knows: it must connect two passages it was given apart.

By default every fact is a hop of some pair (``distractor_kind="pairs"``), so most of a passage's
tokens depend on another passage. Two ways make that share smaller, as in retrieved passages,
which mostly link to nothing:

- ``filler_per_piece`` neutral sentences added to each piece, with the same facts and question; a
  small model finds the hops less often among more text (docs/results.md, *Longer passages*);
- ``distractor_kind="loose"``: as many facts, but the distractors link to nothing (other people live
  in cities that no fact locates, and the other located cities are not where anyone lives), so the
  asked pair is the only link between two facts, and its later hop the only text that needs
  another piece.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal, cast, get_args

from kvcomm.errors import DataError
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.loaders import _NAMES, TASKS, task

CITIES = ("Velmora Ostrik Brandel Quenna Taloris Mirevo Kestrin Dolvar Ysmere Fenwick Carreth Almuth Sorvik "
          "Pellan Ruvenna Oskarra Thessin Varlow Elbrin Gorvath Nimra Zolten Halvik Mersa Trevane Ulmora Kavros "
          "Belgrin Istra Pontar").split()
COUNTRIES = ("Drenland Kalmeria Vostria Aldemar Sarnovia Eskaria Morvane Telluria Quarnis Bravonia Lystria Ombria "
             "Faltara Zenovia Carthal Wessmark").split()

PIECES = range(2, 17)  # the pieces an item can be cut into
DistractorKind = Literal["pairs", "loose"]
"""Distractors that are hops of other pairs (``pairs``) or facts that link to nothing (``loose``:
the asked pair is the only link between two facts)."""
DISTRACTOR_KINDS: tuple[str, ...] = get_args(DistractorKind)

FILLER = (
    "The morning market opened late because of the rain.", "A grey cat slept on the warm steps.",
    "Bread prices rose a little during the long winter.", "The old bridge was painted green last spring.",
    "Children played football in the square after school.", "A heavy fog covered the hills until noon.",
    "The library added two hundred new books this year.", "Fishing boats came back early with a small catch.",
    "The town choir practised every Thursday evening.", "A strong wind knocked over several fruit stalls.",
    "The museum closed one wing for repairs.", "Farmers expected a good harvest of apples.",
    "The night train was delayed by twenty minutes.", "A new bakery opened near the harbour.",
    "Snow fell for three days without stopping.", "The council met to discuss the price of water.",
    "Tourists crowded the beaches in August.", "The clock tower rang twelve times at midnight.",
    "A small fire was put out quickly by neighbours.", "The river rose after the spring storms.",
    "Most shops closed early on the holiday.", "The school planted a row of young trees.",
    "A travelling circus stayed for one week.", "The roads were repaired before the festival.",
    "Local artists sold paintings at the fair.", "The price of coffee doubled over the summer.",
    "A flock of geese flew south in October.", "The hospital opened a new children's ward.",
    "Street lamps were replaced with brighter ones.", "The bus service added an evening route.",
    "An old ship was turned into a floating restaurant.", "The park's fountain was cleaned in May.",
)


def _item(rng: random.Random, index: int, seed: int, pieces: int, per_piece: int, filler: int = 0,
          kind: DistractorKind = "pairs") -> Item:
    pairs = max(1, pieces * per_piece // 2)
    people, cities = rng.sample(_NAMES, pairs), rng.sample(CITIES, pairs)
    countries = [rng.choice(COUNTRIES) for _ in cities]
    placed = cities  # the cities the "is in" facts name
    if kind == "loose":  # only the asked (first) person's city is located; the others are nobody's
        placed = [cities[0], *rng.sample([c for c in CITIES if c not in cities], pairs - 1)]
    lives = [f"{p} lives in {c}." for p, c in zip(people, cities)]
    located = [f"{c} is in {k}." for c, k in zip(placed, countries)]
    slots = [i % pieces for i in range(2 * pairs)]
    rng.shuffle(slots)
    where = dict(zip([*lives, *located], slots))
    asked = 0 if kind == "loose" else rng.randrange(pairs)
    if where[lives[asked]] == where[located[asked]]:  # the hops must sit in different pieces
        other = rng.choice([fact for fact, slot in where.items() if slot != where[lives[asked]]])
        where[located[asked]], where[other] = where[other], where[located[asked]]
    chosen = [[fact for fact in rng.sample(list(where), len(where)) if where[fact] == piece] for piece in range(pieces)]
    if filler:  # sentences that link to nothing, spread through each piece; none repeats within an item.
        own = random.Random(f"multihop-filler-{seed}-{index}")  # its own stream: the facts stay those without filler
        unused = own.sample(FILLER, pieces * filler)
        for piece, sentences in enumerate(chosen):
            for sentence in unused[piece * filler:(piece + 1) * filler]:
                sentences.insert(own.randrange(len(sentences) + 1), sentence)
    texts = [" ".join(sentences) for sentences in chosen]
    return Item(id=f"multihop_{seed}_{index:04d}", context=" ".join(texts), pieces=tuple(texts),
                question=f"Which country does {people[asked]} live in? Answer with the country name only.",
                answers=(countries[asked],))


@task("multihop", max_new_tokens=8, metric="contains", source="generated")
def multihop(path: str | Path | None = None, items: int = 100, pieces: int = 4, facts_per_piece: int = 3,
             seed: int = 0, filler_per_piece: int = 0, distractor_kind: str = "pairs") -> Task:
    """Generated two-hop look-up across pieces: where a person lives is in one piece, which country
    that (made-up) city is in is in another; the question needs both.

    ``pieces`` passages per item (one per sender), about ``facts_per_piece`` facts each (the
    hops and distractors); more facts per piece make longer pieces. ``filler_per_piece`` sentences
    that link to nothing are added to each piece (0 by default: items are unchanged without it).
    ``distractor_kind``: ``pairs`` (every distractor a hop of another pair) or ``loose``
    (distractors that link to nothing; the module docstring). It is typed ``str``, not
    :data:`DistractorKind`, so that ``--task-option`` can give it.
    """
    if path is not None:
        raise DataError("the multihop task is generated; it takes no --data file (path)")
    if distractor_kind not in DISTRACTOR_KINDS:
        raise DataError(f"multihop's distractor_kind is {' or '.join(DISTRACTOR_KINDS)}, not {distractor_kind!r}")
    if pieces not in PIECES or not 1 <= facts_per_piece:
        raise DataError(f"multihop needs {PIECES[0]}..{PIECES[-1]} pieces and at least 1 fact per piece")
    pairs = pieces * facts_per_piece // 2
    if 2 * max(1, pairs) < pieces:
        raise DataError(f"multihop's {pieces} pieces would hold {2 * max(1, pairs)} facts, leaving a piece empty: "
                        "give at least 2 facts per piece with an odd number of pieces")
    if (2 * pairs - 1 if distractor_kind == "loose" else pairs) > len(CITIES):
        most = 2 * len(CITIES) if distractor_kind == "pairs" else 2 * ((len(CITIES) + 1) // 2)
        raise DataError(f"multihop has {len(CITIES)} cities: at most {most} facts per item with "
                        f"{distractor_kind} distractors (pieces × facts_per_piece)")
    if not 0 <= pieces * filler_per_piece <= len(FILLER):
        raise DataError(f"multihop has {len(FILLER)} filler sentences: at most {len(FILLER) // pieces} per piece "
                        f"with {pieces} pieces (got {filler_per_piece})")
    rng = random.Random(seed)
    kind = cast(DistractorKind, distractor_kind)
    made = [_item(rng, i, seed, pieces, facts_per_piece, filler_per_piece, kind) for i in range(items)]
    return TASKS.get("multihop").make(made, seed=seed)
