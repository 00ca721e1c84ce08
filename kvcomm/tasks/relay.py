"""A generated task for agent graphs: a k-hop relay, each hop held privately by one agent.

For 3 hops: agent 0 knows "Omar's friend is Lena." (among other people's friends), agent 1
"Lena lives in Velmora." (among other people's cities), agent 2 "Velmora is in Drenland." (among
other cities' countries). The question "Which country does Omar's friend live in?" needs all three,
in order: agent 0 is asked "Who is Omar's friend?", each later agent about "the person (or city)
named in the previous message", so no agent can answer its hop without hearing the one before.
Cities and countries are made up, so nothing comes from what the model already knows.
"""

from __future__ import annotations

import random
from pathlib import Path

from kvcomm.errors import DataError
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.loaders import _NAMES, TASKS, task
from kvcomm.tasks.multihop import CITIES, COUNTRIES

# person-to-person hops, outermost first: 4 hops = colleague, friend, lives, located
PERSON_HOPS = ("colleague", "friend")
HOPS = range(2, 3 + len(PERSON_HOPS))  # the hops a relay can have: person hops, then lives and located


def _item(rng: random.Random, index: int, seed: int, hops: int, distractors: int) -> Item:
    relations = [*PERSON_HOPS[len(PERSON_HOPS) - (hops - 2):], "lives", "located"]
    names = iter(rng.sample(_NAMES, _names_needed(hops, distractors)))
    chain = [next(names)]  # the entity each hop starts from, then each hop's answer
    pieces: list[str] = []
    asks: list[str] = []
    subjects: list[str] = []
    for hop, relation in enumerate(relations):
        if relation == "located":  # the cities of the previous hop, the asked one among them
            objects = rng.sample(COUNTRIES, len(subjects))  # distinct: the answer is never guessable
            template = "{s} is in {o}."
        else:
            subjects = [chain[-1], *(next(names) for _ in range(distractors))]
            if relation == "lives":
                objects = rng.sample(CITIES, len(subjects))
                template = "{s} lives in {o}."
            else:
                objects = [next(names) for _ in subjects]
                template = "{s}'s " + relation + " is {o}."
        facts = [template.format(s=s, o=o) for s, o in zip(subjects, objects)]
        rng.shuffle(facts)
        pieces.append(" ".join(facts))
        asks.append(_ask(relation, chain[0] if hop == 0 else None))
        chain.append(objects[subjects.index(chain[-1])])
        subjects = objects
    question = _question(relations, chain[0])
    return Item(id=f"relay{hops}_{seed}_{index:04d}", context=" ".join(pieces), question=question,
                answers=(chain[-1],), pieces=tuple(pieces), asks=tuple(asks), ask_answers=tuple(chain[1:]))


def _names_needed(hops: int, distractors: int) -> int:
    """The start, the distractor subjects of every hop about people, and the objects of person hops."""
    return 1 + (hops - 1) * distractors + (hops - 2) * (distractors + 1)


def _ask(relation: str, subject: str | None) -> str:
    """What the agent holding ``relation`` is asked: about ``subject`` (the first agent) or about
    what the previous message named."""
    person = subject or "the person named in the previous message"
    city = subject or "the city named in the previous message"
    if relation == "located":
        return f"Which country is {city} in? Answer with the country name only."
    if relation == "lives":
        return f"Which city does {person} live in? Answer with the city name only."
    possessive = f"{subject}'s {relation}" if subject else f"the {relation} of {person}"
    return f"Who is {possessive}? Answer with the name only."


def _question(relations: list[str], start: str) -> str:
    who = start
    for relation in relations[:-2]:
        who = f"{who}'s {relation}" if who == start else f"the {relation} of {who}"
    return f"Which country does {who} live in? Answer with the country name only."


@task("relay", max_new_tokens=8, metric="contains", source="generated")
def relay(path: str | Path | None = None, items: int = 100, hops: int = 3, distractors: int = 2,
          seed: int = 0) -> Task:
    """Generated k-hop relay for agent graphs: hop ``i`` is known only to agent ``i`` (its piece,
    with ``distractors`` facts of the same kind about others); the question needs every hop in order.

    Each item carries what every agent is asked (``asks``) and should answer (``ask_answers``).
    """
    if path is not None:
        raise DataError("the relay task is generated; it takes no --data file (path)")
    if hops not in HOPS:
        raise DataError(f"relay needs {HOPS[0]}..{HOPS[-1]} hops, got {hops}")
    if (distractors < 0 or _names_needed(hops, distractors) > len(_NAMES) or distractors + 1 > len(CITIES)
            or distractors + 1 > len(COUNTRIES)):
        raise DataError(f"relay: {distractors} distractors per hop need more than the {len(_NAMES)} names, "
                        f"{len(CITIES)} cities and {len(COUNTRIES)} countries there are; use fewer")
    rng = random.Random(seed)
    return TASKS.get("relay").make([_item(rng, i, seed, hops, distractors) for i in range(items)], seed=seed)
