"""Calibration: rank layers on held-out items, by one of four rules, and save a profile.

- ``paper``: the receiver's prefill attention on the context, mixed with a Gaussian prior over
  depth with the paper's per-family defaults (the KVComm paper's rule, for reproductions);
- ``answer``: greedy forward selection by the receiver's likelihood of the gold answer;
- ``prune`` (the default): backward elimination by that likelihood (from every layer, drop the one
  missed least);
- ``prior``: the paper's form, with ``alpha``, ``mu``, ``sigma`` fitted per model by that likelihood.

The fitted rules can maximise another objective instead of the likelihood: ``probability`` (the
gold answer's probability per token, exp of the likelihood, averaged over items: bounded, so an
item the model cannot answer, whose log-likelihood swings widely, weighs no more than one it
answers), ``choice`` (the probability of picking the gold option) or ``fidelity`` (closeness to
the receiver's next-token distributions with every layer shared). A search trace's ``loglik`` is
that objective's value. ``auto`` chooses between the first two where they are searched (``answer``,
``prune``): each searches on the later half of the calibration items, and the ranking kept is the
one whose top layers (at ratios 0.3, 0.5 and 0.7) give the earlier half, which no search read, the
higher likelihood; the profile records both rankings and their held-out scores. Unless told,
the searches use ``auto`` given 8 calibration items (:func:`default_objective`; ``likelihood`` on
fewer) and ``prior`` the likelihood.

Every rule records the attention importance too, and the profile records the rule, what it chose
and why (the search's trace, the fitted prior), and what it cost (seconds, forwards per item).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any, ClassVar, Literal, Self, get_args

import numpy as np
import torch
from pydantic import ConfigDict, model_validator
from tqdm.auto import tqdm

from kvcomm.agents import Agents
from kvcomm.config import listed
from kvcomm.errors import ConfigError, DataError
from kvcomm.eval.batch import Batch
from kvcomm.files import JsonFile
from kvcomm.models.source import same_model_name
from kvcomm.protocol import attention_importance
from kvcomm.selection.budget import check_tolerance, smallest_ratio
from kvcomm.selection.likelihood import Scored, Work, answer_ids, answer_loglik, reference_logprobs, rival_tokens
from kvcomm.selection.rules import (
    DEFAULT_MU,
    DEFAULT_SIGMA,
    check_prior,
    combined_scores,
    default_alpha,
    rank_layers,
    top_layers,
)
from kvcomm.selection.search import (
    TARGET_RATIOS,
    Search,
    backward_order,
    default_removals,
    default_steps,
    fit_prior,
    greedy_order,
)
from kvcomm.tasks.base import Item, Pieces, Task

PROFILE_VERSION = 2
Rule = Literal["paper", "answer", "prior", "prune"]
"""How layers are ranked (the module's docstring): the paper's attention importance with a Gaussian
prior, greedy selection or backward pruning by the gold answer's likelihood, or the prior fitted to it."""
RULES: tuple[str, ...] = get_args(Rule)
DEFAULT_RULE: Rule = "prune"
"""The default rule: the one that scored best where the rules were run side by side (docs/results.md,
"Backward elimination: prune")."""
CALIBRATION_ITEMS: dict[str, int] = {"paper": 1, "answer": 4, "prior": 4, "prune": 4}
"""Calibration items each rule takes unless told: the paper's one for its own rule (attention
importance settles on one item), four for the rules fitted to the answer's likelihood, which one
item leaves noisy (SmolLM2-135M, facts, ratio 0.5: the answer rule scores 0.184 calibrated on one
item, 0.296 on four; docs/results.md). ``prune`` takes the answer rule's four: it was measured with
them."""
Objective = Literal["likelihood", "probability", "choice", "fidelity", "auto"]
"""What the fitted rules maximise (:func:`calibrate`'s ``objective`` says each; ``auto`` picks
:func:`default_objective`'s)."""
OBJECTIVES: tuple[str, ...] = get_args(Objective)
DEFAULT_OBJECTIVE: Objective = "auto"
"""The searches' objective unless told (:func:`default_objective`): where the objectives were run
side by side it met every goal the others met, and the Qwen skyline goals each of them missed on
one task (docs/results.md, "``auto`` on the rest of the grid, and the default")."""
AUTO_CANDIDATES: tuple[Objective, ...] = ("likelihood", "probability")
"""The objectives ``auto`` searches with, the first kept on a tie."""
CHUNK = 32  # layer sets per batched forward
POOL = 8  # candidates the searches (greedy, elimination) keep trying after their first step
SEARCHES: dict[str, tuple[str, Search, Callable[[int], int]]] = {
    "answer": ("greedy forward", greedy_order, default_steps),
    "prune": ("backward elimination", backward_order, default_removals),
}
"""The rules that search layer sets step by step: the search's name, the search, its default steps."""


AUTO_MIN_ITEMS = 2
"""The fewest calibration items ``auto`` takes: one to search on, one to hold out."""


def check_objective(rule: str, objective: str | None) -> None:
    """Refuses an objective a rule cannot use (one check for :func:`calibrate` and the run's
    configuration, which checks before any model loads).

    Raises:
        ConfigError: ``auto`` with the ``prior`` rule (it chooses between two searches' rankings).
    """
    if objective == "auto" and rule == "prior":
        raise ConfigError("the auto objective chooses between two searches' rankings: use it with the prune or "
                          "answer rule, not prior")


def default_objective(rule: str, items: int | None = None) -> Objective:
    """The objective ``rule`` maximises unless told: :data:`DEFAULT_OBJECTIVE` (``auto``) where the
    rule searches and has the items ``auto`` takes (twice the rule's own: as many to search on as
    the other objectives use, and as many held out; ``items`` None: not yet known), else
    ``likelihood``: fewer items would leave the search fewer than it was measured with (``auto``
    asked for by name takes any number from :data:`AUTO_MIN_ITEMS`), and ``prior`` fits one grid,
    with nothing to choose between."""
    if rule in SEARCHES and (items is None or items >= calibration_items(rule, DEFAULT_OBJECTIVE)):
        return DEFAULT_OBJECTIVE
    return "likelihood"


def calibration_items(rule: str, objective: str | None = None) -> int:
    """Calibration items a rule takes unless told (:data:`CALIBRATION_ITEMS`); twice as many with
    the ``auto`` objective (``objective`` None: the rule's default) where the rule searches (half
    of them are held out to choose)."""
    objective = objective or default_objective(rule)
    return CALIBRATION_ITEMS[rule] * (2 if objective == "auto" and rule in SEARCHES else 1)


class Profile(JsonFile):
    """A layer ranking and the measurements behind it (written as JSON, reusable by ``eval``).

    Version 1 profiles (the paper rule, before ``rule``, ``details`` and ``cost``) still load.
    ``task_options`` are the calibration task's :attr:`~kvcomm.tasks.Task.item_options`, and
    ``weights`` the sender's and the receiver's
    :attr:`~kvcomm.models.loading.LoadedModel.weights_digest` (both None in profiles written
    before they were recorded).
    """

    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str] = "profile"

    version: int = PROFILE_VERSION
    sender: str
    receiver: str
    task: str
    task_options: dict[str, Any] | None = None
    weights: list[str] | None = None
    num_layers: int
    alpha: float
    mu: float
    sigma: float
    calibration_items: list[str]
    importance: list[float]
    scores: list[float]
    ranking: list[int]
    rule: str = "paper"
    details: dict[str, Any] = {}
    cost: dict[str, float] = {}

    @model_validator(mode="after")
    def _whole(self) -> Self:
        """A profile that ranks each of its layers once, with a value per layer, of a known rule and
        version (a damaged or hand-edited one changed how many layers a ratio shares, silently)."""
        if not 1 <= self.version <= PROFILE_VERSION:
            raise ValueError(f"version {self.version} is not one this kvcomm reads (1..{PROFILE_VERSION})")
        if self.rule not in RULES:
            raise ValueError(f"rule {self.rule!r} is none of {', '.join(RULES)}")
        if self.num_layers < 1 or sorted(self.ranking) != list(range(self.num_layers)):
            shown = f"{self.ranking[:12]}{' …' if len(self.ranking) > 12 else ''} ({len(self.ranking)} entries)"
            raise ValueError(f"ranking must order each of the {self.num_layers} layers once, not {shown}")
        if len(self.importance) != self.num_layers or len(self.scores) != self.num_layers:
            raise ValueError(f"importance and scores must hold one value per layer ({self.num_layers})")
        if not (0 <= self.alpha <= 1 and math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"the prior's alpha must be in [0, 1] and mu and sigma finite, sigma above 0; not "
                             f"alpha {self.alpha}, mu {self.mu}, sigma {self.sigma}")
        if self.details.get("pieces", "chats") not in ("chats", "passages"):
            raise ValueError(f"details.pieces must be 'chats' or 'passages', not {self.details['pieces']!r}")
        provenance = self.details.get("provenance")
        if provenance is not None and not (isinstance(provenance, dict) and isinstance(
                data := provenance.get("data", {}), dict | None) and (not data or isinstance(data.get("sha256"), str))):
            raise ValueError("details.provenance must be an object, its data (if any) an object with a sha256 string")
        return self

    @property
    def pieces(self) -> Pieces:
        """How the calibration items were read: ``chats`` unless ``details`` says ``passages``."""
        return "passages" if self.details.get("pieces") == "passages" else "chats"


def check_weights(profile: Profile | Any, weights: Sequence[str], names: str = "pair") -> None:
    """Refuses a profile (or block profile) that records other weights than ``weights`` (the
    sender's and the receiver's digests): a model derived again under its name, or another
    checkpoint there. A profile written before weights were recorded is not refused here.

    Raises:
        ConfigError: naming ``names`` (e.g. ``sender → receiver``).
    """
    if profile.weights is not None and tuple(profile.weights) != tuple(weights):
        raise ConfigError(f"the profile was calibrated on other weights than this run's {names} (a model derived "
                          "again, another checkpoint under that name, or one side loaded in float16, whose rounded "
                          "weights have a digest of their own): calibrate again for these weights, or run without "
                          "this profile (--profile)")


def check_pair(profile: Profile | Any, weights: Sequence[str] | None, pair: tuple[str, str] | None) -> None:
    """Refuses a profile (or block profile) made for another sender and receiver: told by the
    models' ``weights`` digests where the profile and the run both have them (the names may be
    spelled otherwise, or name a model derived again since), else by their names (``pair``).

    Raises:
        ConfigError: naming the pair.
    """
    if profile.weights is not None and weights is not None:
        check_weights(profile, weights, f"{pair[0]} → {pair[1]}" if pair is not None else "pair")
    elif pair is not None and profile.weights is None and not (
            same_model_name(profile.sender, pair[0]) and same_model_name(profile.receiver, pair[1])):
        if getattr(profile, "kind", None) == "droidspeak":
            raise ConfigError(f"the block profile is for {profile.sender} → {profile.receiver}, not {pair[0]} → "
                              f"{pair[1]}; blocks depend on the pair: profile this one (kvcomm calibrate --method "
                              "droidspeak)")
        raise ConfigError(f"the profile ranks layers for {profile.sender} → {profile.receiver}, not {pair[0]} → "
                          f"{pair[1]}; a ranking depends on the pair: calibrate this one (kvcomm calibrate) or "
                          "run without this profile (--profile)")


def calibrate(
    agents: Agents, task: Task, items: Sequence[Item], alpha: float | None = None,
    mu: float = DEFAULT_MU, sigma: float = DEFAULT_SIGMA, batch_size: int = 8, progress: bool = True,
    rule: str = DEFAULT_RULE, steps: int | None = None, tolerance: float | None = None, pool: int | None = POOL,
    objective: Objective | None = None, pieces: Pieces = "chats",
) -> Profile:
    """Ranks layers on ``items`` by ``rule`` (see the module's docstring).

    Args:
        alpha, mu, sigma: the prior of the ``paper`` rule (``alpha`` None: 1.0 for Llama-family
            models, 0.8 for Qwen, as in the paper); ignored by the fitted rules.
        steps: how many layers greedy selection adds (``answer``; default: 70% of the layers) or
            backward elimination removes (``prune``; default: down to one layer).
        pool: how many of the previous step's best layers greedy selection (or elimination) tries
            at each later step, at least 1 (None: every layer; each step costs one batched forward
            of that many sets per item).
        tolerance: also find the budget: the smallest ratio whose score on the calibration items is
            within this of all layers' (answers generated; recorded in ``details["budget"]``).
        objective: what the fitted rules maximise: ``likelihood`` (the gold answer's mean
            log-probability per token), ``probability`` (its exp, the geometric mean of the gold
            tokens' probabilities, averaged over items), ``choice`` (on items that list their options, the
            log-probability of choosing the gold one; other items fall back to ``likelihood``) or
            ``fidelity`` (minus the mean KL divergence of the receiver's next-token distributions
            over the gold answer from those it has with every layer shared), or ``auto`` (the
            ``answer`` and ``prune`` rules: ``likelihood`` or ``probability``, whichever's ranking
            the held-out first half of ``items`` answers better; the module's docstring). None:
            the rule's default (:func:`default_objective`: ``auto`` for the searches given 8 items,
            else ``likelihood``).
        pieces: how each item is read: the paper's two chats, or ``passages`` (one chat cut in two,
            the opening kept at layers not shared, as ``kvcomm --pieces passages`` reads); recorded
            in the profile's ``details``.

    Raises:
        ConfigError: an unknown rule or pieces, a pool, batch size or ``steps`` below 1, a negative
            or not finite ``tolerance``, ``mu`` outside [0, 1] or ``sigma`` not positive, or ``auto``
            with the ``prior`` rule;
            DataError: no items, items without a gold answer, or fewer than 2 items for ``auto``.
    """
    items = listed(items, "items")
    if not all(isinstance(item, Item) for item in items):
        raise ConfigError("calibration takes a list of items (some of task.items)")
    if rule not in RULES:
        raise ConfigError(f"unknown selection rule {rule!r}; valid: {', '.join(RULES)}")
    if pool is not None and pool < 1:
        raise ConfigError(f"the search's pool must be at least 1 layer, got {pool}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1):
        # before: 0 read as "the default" (a whole search), and a negative count searched nothing
        raise ConfigError(f"the search's steps are at least 1, not {steps!r} (None: the rule's default)")
    if tolerance is not None:  # before: a bare StopIteration after the whole calibration
        check_tolerance(tolerance)
    if pieces not in get_args(Pieces):
        raise ConfigError(f"unknown pieces {pieces!r}; valid: {', '.join(get_args(Pieces))}")
    if pieces == "passages" and (empty := next((item for item in items if not item.context.strip()), None)):
        raise DataError(f"item {empty.id}: its context is empty, and calibrating on passages reads it as one")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ConfigError(f"the calibration batch size is at least 1, not {batch_size!r}")
    check_prior(mu, sigma)
    if objective is None:
        objective = default_objective(rule, len(items))
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown calibration objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if not items:
        raise DataError("calibration needs at least one item")
    check_objective(rule, objective)
    if objective == "auto" and rule in SEARCHES and len(items) < AUTO_MIN_ITEMS:
        raise DataError(f"the auto objective holds out half of the calibration items: it needs at least "
                        f"{AUTO_MIN_ITEMS}")
    began = time.perf_counter()
    scored: list[Scored] = []
    total = torch.zeros(agents.num_layers, dtype=torch.float64)
    for start in tqdm(range(0, len(items), batch_size), desc="calibrate", disable=not progress):
        batch = Batch(agents, task, list(items[start:start + batch_size]))
        read = batch.reading(1, pieces)
        prompt, kv = read.prompt, read.kv
        total += attention_importance(agents.receiver.model, kv, prompt.input_ids, prompt.valid,
                                      read.opening).double().sum(dim=0)
        if rule != "paper":
            for i, item in enumerate(batch.items):
                answer = answer_ids(agents.receiver, item)
                rivals = rival_tokens(agents.receiver, item, answer) if objective == "choice" else ()
                row = kv.row(i)
                reference = reference_logprobs(agents.receiver.model, row, prompt.ids[i], answer) \
                    if objective == "fidelity" else None
                opening = int(kv.valid[i, :read.opening].sum())  # the row's own opening, padding removed
                scored.append(Scored(row, prompt.ids[i], answer, rivals, reference, opening))
    importance = (total / len(items)).tolist()
    alpha = default_alpha(agents.receiver.config.model_type) if alpha is None else alpha
    ranking: list[int] | None = None
    details: dict[str, Any] = {}
    forwards = 0.0
    if objective == "auto" and rule in SEARCHES:
        ranking, details, work = _held_out_choice(agents, scored, [item.id for item in items], rule, steps, pool,
                                                  progress)
    elif rule != "paper":
        score, work = _objective(agents, scored, progress, bounded=objective == "probability")
        chosen = sum(bool(item.rivals) for item in scored)
        what = ("minus the mean KL divergence from every layer's next-token distributions over the gold answer"
                if objective == "fidelity" else
                "mean over items of the gold answer's probability per token (exp of its mean log-likelihood)"
                if objective == "probability" else "mean log-likelihood per gold-answer token" if not chosen else
                f"log-probability of choosing the gold option ({chosen} of {len(scored)} items list options; "
                "the others: mean log-likelihood per gold-answer token)")
        if rule in SEARCHES:
            name, search, default = SEARCHES[rule]
            ranking, trace = search(score, agents.num_layers, default(agents.num_layers) if steps is None else steps,
                                    pool)
            details = {"search": name, "pool": pool, "trace": trace, "objective": what}
        else:
            fitted = fit_prior(score, importance)
            alpha, mu, sigma = fitted["alpha"], fitted["mu"], fitted["sigma"]
            details = {"search": "grid", "objective": what, "fitted": fitted}
    if rule != "paper":
        if objective == "fidelity":  # each item's reference: one forward of one row, every layer shared
            work.calls += len(scored)
            work.layer_rows += len(scored) * agents.num_layers
        forwards = work.calls / len(items)
        details["layer_rows_per_item"] = work.layer_rows / len(items)
        details["whole_forwards_per_item"] = work.layer_rows / agents.num_layers / len(items)
    combined = combined_scores(importance, alpha, mu, sigma)
    ranking = ranking or rank_layers(combined.tolist())
    if tolerance is not None:
        details["budget"] = smallest_ratio(agents, task, items, ranking, tolerance, batch_size=batch_size,
                                           pieces=pieces)
    if pieces != "chats":
        details["pieces"] = pieces
    return Profile(
        sender=agents.sender.name, receiver=agents.receiver.name, task=task.name, task_options=task.item_options,
        weights=list(agents.weights), num_layers=agents.num_layers, alpha=alpha, mu=mu, sigma=sigma,
        calibration_items=[item.id for item in items], importance=importance,
        scores=combined.tolist(), ranking=ranking, rule=rule, details=details,
        cost={"seconds": time.perf_counter() - began, "forwards_per_item": forwards, "items": float(len(items))},
    )


def _held_out_choice(agents: Agents, scored: list[Scored], ids: list[str], rule: str, steps: int | None,
                     pool: int | None, progress: bool) -> tuple[list[int], dict[str, Any], Work]:
    """The ``auto`` objective: ``rule``'s search with each of :data:`AUTO_CANDIDATES` on the later
    half of the items, and the ranking whose top layers at :data:`TARGET_RATIOS` give the earlier
    half the higher mean likelihood; with the details a profile records and the work done."""
    name, search, default = SEARCHES[rule]
    half = len(scored) // 2
    held, searched = scored[:half], scored[half:]
    work = Work()
    rankings, traces = {}, {}
    steps_seen: dict[tuple[frozenset[int], ...], np.ndarray] = {}  # a step both searches take is scored once
    for candidate in AUTO_CANDIDATES:
        score, _ = _objective(agents, searched, progress, bounded=candidate == "probability", work=work,
                              seen=steps_seen)
        rankings[candidate], traces[candidate] = search(
            score, agents.num_layers, default(agents.num_layers) if steps is None else steps, pool)
    judge, _ = _objective(agents, held, progress, work=work)
    sets = [frozenset(top_layers(rankings[c], ratio)) for c in AUTO_CANDIDATES for ratio in TARGET_RATIOS]
    values = judge(sets).reshape(len(AUTO_CANDIDATES), len(TARGET_RATIOS)).mean(axis=1)
    held_out = {c: float(v) for c, v in zip(AUTO_CANDIDATES, values)}
    chosen = max(AUTO_CANDIDATES, key=lambda c: (held_out[c], -AUTO_CANDIDATES.index(c)))
    details = {
        "search": name, "pool": pool, "trace": traces[chosen], "objective": f"auto: {chosen}",
        "held_out": {
            "criterion": "mean log-likelihood per gold-answer token of each ranking's top layers at ratios "
                         f"{', '.join(map(str, TARGET_RATIOS))}, on items no search read",
            "items": ids[:half], "searched_on": ids[half:], "scores": held_out, "chosen": chosen,
            "rankings": rankings,
            "steps_shared": sum(map(len, traces.values())) - len(steps_seen),  # the second search's from the first
        },
    }
    return rankings[chosen], details, work


def _objective(agents: Agents, scored: list[Scored], progress: bool, bounded: bool = False,
               work: Work | None = None,
               seen: dict[tuple[frozenset[int], ...], np.ndarray] | None = None) -> tuple[Any, Work]:
    """Each layer set's objective (answer likelihood, choice of the gold option, or fidelity) averaged
    over the items (``bounded``: each item's exp, the gold answer's probability per token), and the
    work it has done (model calls, and decoder-layer passes of one row:
    :class:`~kvcomm.selection.likelihood.Work`; added to ``work`` when given).

    ``seen``, when given, keeps each step's per-item values (``[items, sets]``) by its list of layer
    sets, and a step asked again (``auto``'s second search, where it takes the first's step) is
    answered from it: the same forwards' values, with no work counted."""
    work = work if work is not None else Work()
    bar = tqdm(desc="scoring layer sets", unit="set", disable=not progress)

    def objective(layer_sets: Sequence[frozenset[int]]) -> np.ndarray:
        key = tuple(layer_sets)
        if seen is not None and key in seen:
            values = seen[key]
            bar.update(len(layer_sets) * len(scored))
        else:
            rows = []
            for item in scored:  # the bar moves item by item: one step can take minutes on a large model
                rows.append(answer_loglik(agents.receiver.model, item, layer_sets, CHUNK, work=work).numpy())
                bar.update(len(layer_sets))
            values = np.stack(rows)
            if seen is not None:
                seen[key] = values
        return np.mean(np.exp(values) if bounded else values, axis=0)

    return objective, work
