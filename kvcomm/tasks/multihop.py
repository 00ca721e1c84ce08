"""A generated task that needs attention across pieces: two hops, each in a different piece.

Each item's context is ``pieces`` passages read by different senders. One passage says where a
person lives ("Omar lives in Velmora."), another which country that city is in ("Velmora is in
Drenland."); the others hold distractors of both kinds. The question ("Which country does Omar
live in?") needs both hops. Cities and countries are made up, so the answer cannot come from what
the model already knows: it must connect two passages it was given apart.
"""

from __future__ import annotations

import random
from pathlib import Path

from kvcomm.errors import DataError
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.loaders import _NAMES, TASKS, task

CITIES = ("Velmora Ostrik Brandel Quenna Taloris Mirevo Kestrin Dolvar Ysmere Fenwick Carreth Almuth Sorvik "
          "Pellan Ruvenna Oskarra Thessin Varlow Elbrin Gorvath Nimra Zolten Halvik Mersa Trevane Ulmora Kavros "
          "Belgrin Istra Pontar").split()
COUNTRIES = ("Drenland Kalmeria Vostria Aldemar Sarnovia Eskaria Morvane Telluria Quarnis Bravonia Lystria Ombria "
             "Faltara Zenovia Carthal Wessmark").split()


def _item(rng: random.Random, index: int, seed: int, pieces: int, per_piece: int) -> Item:
    pairs = max(1, pieces * per_piece // 2)
    people, cities = rng.sample(_NAMES, pairs), rng.sample(CITIES, pairs)
    countries = [rng.choice(COUNTRIES) for _ in cities]
    lives = [f"{p} lives in {c}." for p, c in zip(people, cities)]
    located = [f"{c} is in {k}." for c, k in zip(cities, countries)]
    slots = [i % pieces for i in range(2 * pairs)]
    rng.shuffle(slots)
    where = dict(zip([*lives, *located], slots))
    asked = rng.randrange(pairs)
    if where[lives[asked]] == where[located[asked]]:  # the hops must sit in different pieces
        other = rng.choice([fact for fact, slot in where.items() if slot != where[lives[asked]]])
        where[located[asked]], where[other] = where[other], where[located[asked]]
    texts = [" ".join(fact for fact in rng.sample(list(where), len(where)) if where[fact] == piece)
             for piece in range(pieces)]
    return Item(id=f"multihop_{seed}_{index:04d}", context=" ".join(texts), pieces=tuple(texts),
                question=f"Which country does {people[asked]} live in? Answer with the country name only.",
                answers=(countries[asked],))


@task("multihop", max_new_tokens=8, metric="contains", source="generated")
def multihop(path: str | Path | None = None, items: int = 100, pieces: int = 4, facts_per_piece: int = 3,
             seed: int = 0) -> Task:
    """Generated two-hop look-up across pieces: where a person lives is in one piece, which country
    that (made-up) city is in is in another; the question needs both.

    ``pieces`` passages per item (one per sender), about ``facts_per_piece`` facts each (the
    hops and distractors); more facts per piece make longer pieces.
    """
    if path is not None:
        raise DataError("the multihop task is generated; it takes no --data file")
    if not 2 <= pieces <= 16 or not 1 <= facts_per_piece or pieces * facts_per_piece // 2 > len(CITIES):
        raise DataError(f"multihop needs 2..16 pieces and at most {2 * len(CITIES)} facts per item")
    rng = random.Random(seed)
    return TASKS.get("multihop").make([_item(rng, i, seed, pieces, facts_per_piece) for i in range(items)],
                                      seed=seed)
