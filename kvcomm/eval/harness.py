"""Runs methods over a task's test items, batch by batch, and collects a :class:`Report`.

Items are split once: the test items are the first ``limit`` items (after the first ``skip``),
the calibration items are taken from the end of the list, and the two never overlap. Within a
batch every method reuses the same sender prefill, and each method is charged for the sender work
it used (see
:mod:`kvcomm.eval.batch`). With a :class:`~kvcomm.eval.checkpoint.Checkpoint`, every finished
(method, batch) is recorded as the run goes, and recorded work is taken instead of being redone;
so are the layer rankings, block profiles and codebook the run made (a resumed run takes them
from the checkpoint, so its new batches use what its recorded ones did).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator
from tqdm.auto import tqdm

from kvcomm.agents import Agents
from kvcomm.config import Options, listed
from kvcomm.errors import ConfigError, DataError, ProtocolError
from kvcomm.eval import batch as batch_module
from kvcomm.eval.batch import Batch
from kvcomm.eval.checkpoint import BLOCKS_PREFIX, BatchRun, Checkpoint
from kvcomm.eval.cluster import Cluster, check_apart
from kvcomm.eval.memory import GIB, plan_batches, rss_bytes
from kvcomm.eval.provenance import code_version, data_record, method_seeds, profiles_identity, run_identity, utc_now
from kvcomm.eval.results import BOOTSTRAP_SEED, ItemResult, Report, RunResult, environment, summarize
from kvcomm.methods.base import Calibration, Method, Output, Setup, check_depths
from kvcomm.models.allocator import release_freed_memory
from kvcomm.selection.blocks import BlockProfile, max_block, profile_blocks
from kvcomm.selection.calibrate import (
    AUTO_MIN_ITEMS,
    DEFAULT_RULE,
    SEARCHES,
    Objective,
    Profile,
    Rule,
    calibrate,
    calibration_items,
    check_objective,
    check_pair,
    default_objective,
)
from kvcomm.selection.rules import DEFAULT_MU, DEFAULT_SIGMA, default_alpha
from kvcomm.tasks.base import Item, Pieces, Task
from kvcomm.tasks.metrics import score_all
from kvcomm.wire import Codebook
from kvcomm.wire.bootstrap import codebook_from_items, model_codebook

# what a run lacks without calibration items, said before a model loads (kvcomm.cli.runner) and here alike
NEEDS_RANKING = "kvcomm needs a layer ranking: pass --profile or --calib-size >= 1"
NEEDS_BLOCK = "droidspeak needs a block: pass --block a:b, a block --profile, or --calib-size >= 1"


class EvalConfig(Options):
    """How to run an evaluation (recorded verbatim in the results).

    Attributes:
        limit: test items, from the front of the task after ``skip`` (default: all but the
            calibration items).
        skip: the test items start after this many (0: at the front): a second set of test items,
            e.g. to confirm on items no earlier run read what was chosen on the first ones.
        batch_size: items per forward pass.
        calib_size: calibration items, from the end of the task, disjoint from the test items
            (None: as many as the rule takes, ``CALIBRATION_ITEMS``: 1 for ``paper``, 4 for
            ``prior`` and for ``answer`` and ``prune`` told another objective than ``auto``, 8 for
            ``answer`` and ``prune`` with ``auto`` (their default); fewer if the task cannot spare
            them beside its test items, never fewer than one).
        selection: the calibration rule that ranks layers (``paper``, ``answer``, ``prune``, ``prior``; see
            :mod:`kvcomm.selection.calibrate`).
        objective: what ``answer``, ``prune`` and ``prior`` maximise on the calibration items: ``likelihood``
            of the gold answer, its ``probability`` per token (averaged over items), ``choice`` of the gold
            option where items list their options,
            ``fidelity`` to the receiver's next-token distributions with every layer shared, or ``auto``:
            ``likelihood`` or ``probability``, whichever's ranking held-out calibration items answer better.
            None (the default): each rule's own, ``auto`` for ``answer`` and ``prune`` (``likelihood``
            with fewer than 8 calibration items), ``likelihood`` for ``prior``
            (:func:`~kvcomm.selection.calibrate.default_objective`).
        alpha, mu, sigma: how the ``paper`` rule mixes attention importance with the depth prior
            (``alpha`` None: 1.0 for Llama-family models, 0.8 for Qwen, as in the paper).
        max_memory_gb: process memory budget; batches shrink to stay inside it.
        bucket: batch items of similar prompt lengths together (less padding, the same answers);
            results stay in item order. Ignored when a method learns from the stream of batches
            (``online``): those keep the items' order.
        pieces: how the run's ranking is calibrated: on the paper's two ``chats``, or on
            ``passages`` (one chat cut in two, as ``kvcomm`` with ``pieces="passages"`` reads
            them). A method that reads the other layout gets a ranking calibrated on it.
    """

    what = "evaluation"
    limit: int | None = Field(default=None, ge=1)
    skip: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    calib_size: int | None = Field(default=None, ge=0)
    selection: Rule = DEFAULT_RULE
    objective: Objective | None = None
    alpha: float | None = Field(default=None, ge=0, le=1)
    mu: float = Field(default=DEFAULT_MU, ge=0, le=1)
    sigma: float = Field(default=DEFAULT_SIGMA, gt=0, allow_inf_nan=False)
    max_memory_gb: float | None = Field(default=None, gt=0)
    bucket: bool = True
    pieces: Pieces = "chats"

    @model_validator(mode="after")
    def _auto_can_choose(self) -> EvalConfig:
        """``auto`` chooses between two searches on held-out items: refused, before any model
        loads, where there is no search or no item to hold out."""
        check_objective(self.selection, self.objective)
        if self.objective == "auto" and self.selection in SEARCHES and self.calib_size is not None \
                and self.calib_size < AUTO_MIN_ITEMS:
            raise ValueError(f"the auto objective holds out half of the calibration items: it needs at least "
                             f"{AUTO_MIN_ITEMS}, not --calib-size {self.calib_size}")
        return self

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.alpha, self.mu, self.sigma)

    def calibration_count(self, total: int, rules: Iterable[str] = ()) -> int:
        """How many of a task's ``total`` items calibrate: ``calib_size``, or the most any rule
        the run calibrates asks for (``selection``'s, and ``rules``: those its methods name, e.g.
        ``kvcomm~prune`` beside ``--selection paper``)."""
        if self.calib_size is not None:
            return self.calib_size
        room = total - self.skip - (self.limit if self.limit is not None else 1)
        return max(1, min(self.calibration_wanted(rules), room))

    def calibration_wanted(self, rules: Iterable[str] = ()) -> int:
        """The most calibration items any rule the run calibrates was measured with."""
        return max(calibration_items(rule, self.objective) for rule in {self.selection, *rules})

    def calibration_shortfall(self, total: int, rules: Iterable[str] = ()) -> tuple[int, int] | None:
        """``(count, wanted)`` where the task leaves fewer calibration items than its rules ask for
        and no ``calib_size`` was given (the run then calibrates on what is left); else None."""
        if self.calib_size is not None:
            return None
        rules = list(rules)
        wanted, count = self.calibration_wanted(rules), self.calibration_count(total, rules)
        return (count, wanted) if count < wanted else None

    def split(self, items: Sequence[Item], rules: Iterable[str] = ()) -> tuple[list[Item], list[Item]]:
        """The test and the calibration items of a task (see :func:`split_items`), for a run whose
        methods name ``rules`` (:func:`named_rules`)."""
        return split_items(items, self.limit, self.calibration_count(len(items), rules), self.skip)


def check_pieces(methods: Sequence[Method], test: Iterable[Item], calib: Iterable[Item] = ()) -> None:
    """Refuses, before any model runs, a test item whose context a method cannot read as the pieces
    it asks for (``senders`` > 1, or ``pieces="passages"``): too few words to cut, or nothing to
    read; and a calibration item it would calibrate on as one empty passage (calibration reads
    items whole: one piece). Before, the run stopped at that item's batch.

    Raises:
        DataError: naming the item and the method.
    """
    test, calib = list(test), list(calib)
    for method in methods:
        count = getattr(method.options, "senders", 1)
        passages = getattr(method.options, "pieces", "chats") == "passages"
        if count == 1 and not passages:
            continue
        read = [(item, count) for item in test] + [(item, 1) for item in calib if passages]
        for item, cut in read:
            try:
                parts = item.parts(cut)
            except DataError as err:
                raise DataError(f"item {item.id}: {err}, and {method.label} reads each context as {cut} "
                                "pieces") from None
            if not all(part.strip() for part in parts):
                raise DataError(f"item {item.id}: its context is empty, and {method.label} reads each context as "
                                f"{cut} passage(s): leave such items out, or run methods that read it whole")


def named_rules(methods: Sequence[Method]) -> set[str]:
    """The selection rules ``methods`` name for themselves (``kvcomm~prune``'s ``selection``)."""
    return {rule for method in methods if (rule := getattr(method.options, "selection", None)) is not None}


def check_calibration(config: EvalConfig, rules: Iterable[str], total: int, profiled: str | None = None,
                      unused: bool = True, ranks: bool = True) -> None:
    """Refuses, before any model loads or calibrates, an ``objective`` that a rule the run
    calibrates refuses (``auto`` with ``prior``), ``auto`` where the task leaves fewer than
    :data:`AUTO_MIN_ITEMS` calibration items, and (``unused``: an objective a person gave on the
    command line) one that no rule it calibrates uses (``paper`` ranks by attention; a given
    profile's ranking is used as it was made).

    Args:
        rules: the rules the run's methods name (:func:`named_rules`).
        total: the task's items.
        profiled: the rule of the profile given, if one is (its ranking is not calibrated again).
        ranks: whether any of the run's methods asks for a layer ranking (else it calibrates none).

    Raises:
        ConfigError: naming the option to change.
    """
    if config.objective is None:
        return
    calibrated = _calibrated(config, rules, profiled) if ranks else set()
    for rule in sorted(calibrated):
        check_objective(rule, config.objective)
    if unused and not calibrated - {"paper"}:
        why = "no method of this run ranks layers" if not ranks else \
            "the profile's ranking is used as it was calibrated" if profiled is not None else \
            "the paper rule ranks layers by attention"
        raise ConfigError(f"--objective {config.objective} is what prune, answer and prior calibrate by; {why}: leave "
                          "out --objective")
    count = config.calibration_count(total, rules)
    if config.objective == "auto" and calibrated & set(SEARCHES) and count < AUTO_MIN_ITEMS:
        raise ConfigError(f"the auto objective holds out half of the calibration items: it needs at least "
                          f"{AUTO_MIN_ITEMS}, and {total} items leave {count} beside the test items: lower --limit "
                          "or --skip")


def check_prior_given(config: EvalConfig, rules: Iterable[str], profiled: str | None = None,
                      methods_use_it: bool = False, ranks: bool = True) -> None:
    """Refuses ``--alpha``, ``--mu`` or ``--sigma`` given (the caller says they were) to a run that
    calibrates no ``paper`` rule: ``prune`` and ``answer`` rank without the prior, ``prior`` fits its
    own, and a profile's ranking is used as it was made; before, they were ignored and recorded.

    Raises:
        ConfigError: naming the options to leave out.
    """
    calibrated = _calibrated(config, rules, profiled) if ranks else set()
    if "paper" not in calibrated and not methods_use_it:  # ``online`` builds its ranking on the prior itself
        if not ranks:  # before: "this run ranks with prune", of a run that ranks nothing
            raise ConfigError("--alpha, --mu and --sigma shape the paper rule's prior, and no method of this run "
                              "ranks layers: leave them out")
        how = ", ".join(sorted(calibrated)) or "nothing (the profile's ranking is used as it was made)"
        raise ConfigError(f"--alpha, --mu and --sigma shape the paper rule's prior; this run ranks with {how} "
                          "(prior fits its own): add --selection paper, or leave them out")


def _calibrated(config: EvalConfig, rules: Iterable[str], profiled: str | None) -> set[str]:
    """The rules a run may calibrate: its ``selection`` unless a profile of rule ``profiled`` is
    given, and the ``rules`` its methods name; the profile's own rule too where the run reads
    passages (methods that read chats, e.g. ``adaptive``, calibrate it again on chats)."""
    own = {config.selection} if profiled is None else {profiled} if config.pieces != "chats" else set()
    return own | (set(rules) - ({profiled} if config.pieces == "chats" else set()))


def calibration_identity(config: EvalConfig, rules: Iterable[str], total: int,
                         profiled: str | None = None) -> dict[str, Any]:
    """What a run's calibration options come to, for its identity (:func:`~kvcomm.eval.provenance.run_identity`):
    how many of the task's ``total`` items calibrate, and the objective of each rule it may
    calibrate (:func:`_calibrated`), given or each rule's default for that many items."""
    count = config.calibration_count(total, rules)
    return {"items": count, "objectives": {rule: config.objective or default_objective(rule, count)
                                           for rule in sorted(_calibrated(config, rules, profiled))}}


def check_distinct(methods: Sequence[Method]) -> None:
    """Refuses one configuration given twice (the same method with the same options), before any
    model loads or calibrates (after set-up, labels are checked again: they may resolve alike).

    Raises:
        ConfigError: naming the configuration.
    """
    seen: set[tuple[str, str]] = set()
    for method in methods:
        key = (method.name, method.options.model_dump_json())
        if key in seen:
            raise ConfigError(f"the configuration {method.label} is given twice (e.g. as a method and by --ratios): "
                              "give each once")
        seen.add(key)


def split_items(items: Sequence[Item], limit: int | None, calib_size: int,
                skip: int = 0) -> tuple[list[Item], list[Item]]:
    """Test items from the front (after the first ``skip``), calibration items from the back;
    refuses any overlap."""
    given = limit is not None
    limit = len(items) - calib_size - skip if limit is None else limit
    if limit < 1 or calib_size < 0 or skip < 0 or skip + limit + calib_size > len(items):
        after = f" after the first {skip}" if skip else ""
        room = len(items) - calib_size - skip  # test items that fit after the skipped ones
        most_skip = len(items) - calib_size - (limit if given else 1)  # the skip that leaves room for them
        lower = (f"--limit to at most {room}, or --skip or --calib-size" if room >= 1 else
                 f"--skip to at most {most_skip}{', or --limit,' if given else ''} or --calib-size" if most_skip >= 0
                 else f"--limit to at most {len(items) - calib_size} (--skip 0) or --calib-size"
                 if len(items) > calib_size else f"--calib-size to at most {len(items) - 1}")
        wanted = f"{limit} test items{after}" if given else f"a test item{after}"
        held = (" (calibration items are held out whatever the methods, so that runs of different methods "
                "test the same items: --calib-size 0 where no method calibrates)") if calib_size else ""
        raise ConfigError(f"{len(items)} items cannot hold {wanted} and {calib_size} calibration "
                          f"items without overlap; lower {lower} (in Python: EvalConfig's limit, skip, calib_size)"
                          f"{held}")
    return list(items[skip:skip + limit]), list(items[len(items) - calib_size:]) if calib_size else []


def check_profile(profile: Profile | BlockProfile, task: Task, test: Sequence[Item],
                  num_layers: int | None = None, pair: tuple[str, str] | None = None,
                  pieces: Pieces | None = None, weights: tuple[str, str] | None = None) -> None:
    """Refuses a profile made for another sender and receiver, on another task or its items made
    with other options, on test items, for another depth, or (given the run's ``pieces``) on
    items read in another layout. The pair is told by the models' ``weights`` digests where the
    profile and the run both have them (the names may be spelled otherwise, or name a model
    derived again since), else by their names (``pair``); a profile that records weights is not
    refused by name before the models load (``weights`` None)."""
    if profile.task != task.name:
        raise ConfigError(f"the profile was calibrated on task {profile.task!r}, not {task.name!r}; "
                          f"calibrate on {task.name!r} (kvcomm calibrate -t …) or run without this profile (--profile)")
    check_pair(profile, weights, pair)
    if profile.task_options and task.item_options and profile.task_options != task.item_options:
        differ = sorted(k for k in {*profile.task_options, *task.item_options}
                        if profile.task_options.get(k) != task.item_options.get(k))
        said = ", ".join(f"{k}={profile.task_options.get(k)!r}" for k in differ)
        ours = ", ".join(f"{k}={task.item_options.get(k)!r}" for k in differ)
        raise ConfigError(f"the profile was calibrated on {task.name} items made with {said}, this run's are made "
                          f"with {ours}: the same ids name other items; calibrate on these (kvcomm calibrate "
                          "--task-option …) or run without this profile (--profile)")
    made_on = (profile.details.get("provenance") or {}).get("data") if isinstance(profile, Profile) else profile.data
    if made_on and (here := data_record(task)) is not None and made_on.get("sha256") != here["sha256"]:
        raise ConfigError(f"the {profile.what} was calibrated on {task.name} items of another data file "
                          f"({made_on.get('path')}, sha256 {str(made_on.get('sha256'))[:12]}…; this run's "
                          f"{here['sha256'][:12]}…): the same ids name other items; calibrate on this file or run "
                          "without this profile (--profile)")
    if leaked := {item.id for item in test}.intersection(profile.calibration_items):
        raise ConfigError(f"profile was calibrated on test items: {sorted(leaked)[:5]}")
    if num_layers is not None and profile.num_layers != num_layers:
        raise ConfigError(f"profile is for {profile.num_layers} layers, the model has {num_layers}")
    if isinstance(profile, Profile) and pieces is not None and profile.pieces != pieces:
        raise ConfigError(f"the profile was calibrated on items read as {profile.pieces}, this run reads "
                          f"{pieces}: calibrate with --pieces {pieces} or run without this profile (--profile)")


def evaluate(
    agents: Agents, task: Task, methods: Sequence[Method], config: EvalConfig | None = None,
    profile: Profile | None = None, progress: bool = True, checkpoint: Checkpoint | None = None,
    command: str | None = None, blocks: BlockProfile | None = None, cluster: Cluster | None = None,
) -> Report:
    """Evaluates ``methods`` on ``task``; calibrates first if a method needs a ranking and no
    ``profile`` is given.

    Args:
        checkpoint: where finished work, and every profile and codebook the run makes, are
            recorded as the run goes, and taken from instead of being redone (a resumed run); its
            identity must be this run's.
        command: the command line, recorded in the results (a checkpoint records its own).
        blocks: a DroidSpeak block profile (``kvcomm calibrate --method droidspeak``) for
            ``droidspeak`` without a block; profiled on the calibration items when absent.
        cluster: run the batches on these workers (:mod:`kvcomm.eval.cluster`); calibration and
            the report stay here, and the results are the serial run's.

    Raises:
        ConfigError: the item split is impossible, labels collide, the profile was calibrated on
            another task, on test items or for another depth, the checkpoint is another run's, or
            a method cannot run on a cluster.
        DataError: the checkpoint's batches hold items that are not this run's test items, or
            (for a run that keeps the items' order) out of order; or a profile it recorded does
            not fit this run.
        ClusterError: a batch's worker failed more often than the cluster's retries allow.
    """
    for value, kind, what in ((agents, Agents, "agents: an Agents pair (Agents(sender, receiver), Agents.load)"),
                              (task, Task, "task: a Task (load_task)"), (config, EvalConfig | None,
                                                                         "config: an EvalConfig")):
        if not isinstance(value, kind):
            raise ConfigError(f"evaluate's {what}, not {type(value).__name__}")
    methods = listed(methods, "methods")
    if not all(isinstance(method, Method) for method in methods):
        raise ConfigError("evaluate's methods: a list of Method (build_methods, make_method)")
    config = config or EvalConfig()
    check_distinct(methods)
    if cluster is not None:
        check_apart(methods)
        cluster.check_models(agents.weights, agents.receiver.dtype_name, agents.receiver.linear)
    started = utc_now()
    rules, profiled = named_rules(methods), profile.rule if profile is not None else None
    test, calib = config.split(task.items, rules)
    check_pieces(methods, test, calib)
    check_calibration(config, rules, len(task.items), profiled,
                      unused=False)  # a script's objective for every run, the profile's or not: not refused
    for given in (profile, blocks):
        if given is not None:
            check_profile(given, task, test, agents.num_layers, (agents.sender.name, agents.receiver.name),
                          config.pieces, agents.weights)
    if checkpoint is not None:
        checkpoint.expect(run_identity(task, methods, config.model_dump(mode="json"), agents.sender.name,
                                       agents.receiver.name, agents.sender.dtype_name,
                                       profiles_identity(profile, blocks), agents.sender.linear,
                                       calibration_identity(config, rules, len(task.items), profiled),
                                       agents.weights))
        # the front of the items, in order, only where a method learns from the stream of batches
        # (unbucketed runs of other methods take recorded batches in any order: a cluster's come back so)
        checkpoint.check_items([item.id for item in test], ordered=any(m.sequential for m in methods))
    sources = _Sources(agents, task, calib, config, profile, progress, blocks, checkpoint)
    setup = Setup(agents.num_layers, agents.receiver.config.model_type, sources.ranking, sources.codebook,
                  config.calibration, sources.blocks)
    check_depths(methods, agents.num_layers)  # all of them, before any calibration a setup starts
    for method in methods:
        method.setup(setup)
    for method in methods if cluster is None else ():  # a cluster's workers warm up on their own (_SweepJob)
        method.warm_up(agents.sender, agents.receiver)
    labels = [m.label for m in methods]  # final once set up (e.g. AC's resolved layer indices)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two configurations share a label: {labels}")
    tally = _run_batches(agents, task, methods, test, config, checkpoint, progress, cluster)
    return Report(
        config=_report_config(agents, task, test, calib, config, methods, sources),
        provenance=checkpoint.provenance() if checkpoint is not None else
        {"command": command, "date": started, "code": code_version(), "resumed": []},
        environment=environment(cluster),
        profile=sources.profile.model_dump() if sources.profile is not None else None,
        profiles=sources.all_profiles(),
        runs=[tally.result(method, agents.num_layers) for method in methods],
    )


class _Sources:
    """The layer rankings, block profiles and the codebook, each made on first request from the
    calibration items, or (a resumed run) taken from the checkpoint, which records what is made."""

    def __init__(self, agents: Agents, task: Task, calib: list[Item], config: EvalConfig,
                 profile: Profile | None, progress: bool, blocks: BlockProfile | None = None,
                 checkpoint: Checkpoint | None = None) -> None:
        self.agents, self.task, self.calib, self.config = agents, task, calib, config
        self.profile, self.progress = profile, progress  # the run's ranking (given, or its --selection's)
        self.profile_given = profile is not None
        self.checkpoint = checkpoint
        self.others: dict[str, Profile] = {}  # rankings of other rules that methods asked for by name
        self.book: Codebook | None = None
        self.block_profiles: dict[float, BlockProfile] = {}  # by the cap on the recomputed fraction
        self.given_blocks = blocks
        self.given_blocks_used = False  # recorded among the run's profiles only where a method read it

    def ranking(self, rule: str | None = None, pieces: Pieces | None = None) -> list[int]:
        """The run's ranking (the given profile's, or its ``--selection``'s, calibrated once), or
        (``rule`` named and not the run's) that rule's, calibrated once; with ``pieces`` other than
        the run's layout (``EvalConfig.pieces``), the ranking calibrated on items read that way
        (``rule/pieces`` among the run's profiles). A given profile is its own rule's ranking only:
        a method that names another rule gets that rule's, not the profile's under its name."""
        own = self.profile.rule if self.profile is not None else self.config.selection
        wanted = rule or own
        if pieces is not None and pieces != self.config.pieces:
            name = f"{wanted}/{pieces}"
            if name not in self.others:
                self.others[name] = self._calibrate(name, wanted, pieces)
            return self.others[name].ranking
        if wanted == own:
            if self.profile is None:
                self.profile = self._calibrate(own, own, self.config.pieces)
            return self.profile.ranking
        if wanted not in self.others:
            self.others[wanted] = self._calibrate(wanted, wanted, self.config.pieces)
        return self.others[wanted].ranking

    def _calibrate(self, name: str, rule: str, pieces: Pieces) -> Profile:
        """``rule``'s ranking on items read as ``pieces`` (the checkpoint's ``name``, if it holds it)."""
        if not self.calib:
            raise ConfigError(NEEDS_RANKING)
        c = self.config

        def made() -> Profile:
            return calibrate(self.agents, self.task, self.calib, c.alpha, c.mu, c.sigma, c.batch_size, self.progress,
                             rule=rule, objective=c.objective, pieces=pieces)

        if self.checkpoint is None:
            return made()
        return self.checkpoint.reuse(name, Profile, made, rule=rule, pieces=pieces, **self._made_for())

    def _made_for(self) -> dict[str, Any]:
        """What every profile made for this run has: its depth and calibration items."""
        return {"num_layers": self.agents.num_layers, "calibration_items": [item.id for item in self.calib]}

    def blocks(self, max_recompute: float) -> BlockProfile:
        """DroidSpeak blocks of at most ``max_recompute`` of the layers, profiled once per cap (a
        given block profile serves every cap up to its own, compared in layers: 0.2 and 0.25 of 4
        layers are both blocks of one layer)."""
        layers = self.agents.num_layers
        if self.given_blocks is not None and \
                max_block(layers, self.given_blocks.max_recompute) >= max_block(layers, max_recompute):
            self.given_blocks_used = True
            return self.given_blocks
        if max_recompute not in self.block_profiles:
            if not self.calib:
                capped = "" if self.given_blocks is None else (
                    f" (the given block profile stops at {self.given_blocks.max_recompute:g} of the layers, below "
                    f"max_recompute {max_recompute:g})")
                raise ConfigError(NEEDS_BLOCK + capped)

            def made() -> BlockProfile:
                blocks = profile_blocks(self.agents, self.task, self.calib, max_recompute, self.config.batch_size,
                                        self.progress)
                blocks.data = data_record(self.task)
                return blocks

            self.block_profiles[max_recompute] = made() if self.checkpoint is None else self.checkpoint.reuse(
                _blocks_name(max_recompute), BlockProfile, made, max_recompute=max_recompute, **self._made_for())
        return self.block_profiles[max_recompute]

    def all_profiles(self) -> dict[str, Any]:
        """Every ranking and block profile the run used, by rule (blocks: ``droidspeak@<cap>``)."""
        used = dict(self.others)
        if self.profile is not None:
            used.setdefault(self.profile.rule, self.profile)
        out: dict[str, Any] = {rule: profile.model_dump() for rule, profile in used.items()}
        for cap, blocks in self.block_profiles.items():
            out[_blocks_name(cap)] = blocks.model_dump()
        if self.given_blocks is not None and self.given_blocks_used:  # a --block or another method's run: unread
            out[_blocks_name(self.given_blocks.max_recompute)] = self.given_blocks.model_dump()
        return out

    def codebook(self) -> Codebook:
        """From the calibration items, like the ranking (the model's default without any); a resumed
        run's is the one its checkpoint recorded."""
        if self.book is None:
            sender = self.agents.sender

            def made() -> Codebook:
                return codebook_from_items(sender, self.task, self.calib, self.config.batch_size) if self.calib \
                    else model_codebook(sender)

            self.book = made() if self.checkpoint is None else self.checkpoint.reuse_codebook(made)
        return self.book

    def alpha(self) -> tuple[float, str]:
        """The weight on attention actually used, and where it came from: a given profile, the
        prior's own fit, none (a search ranks by the answer), or the option or the family's default."""
        if self.profile is not None and self.profile_given:  # a search's ranking used no alpha, given or made here
            if self.profile.rule in SEARCHES and not any(o.rule == "paper" for o in self.others.values()):
                return self.profile.alpha, f"not used (the profile's {self.profile.rule} ranks by the answer)"
            return self.profile.alpha, "profile"
        weighed = any(other.rule == "paper" for other in self.others.values())  # kvcomm~paper beside prune
        if self.profile is not None and self.profile.rule == "prior" and not weighed:
            return self.profile.alpha, "fitted by prior"
        if self.profile is not None and self.profile.rule in SEARCHES and not weighed:
            return self.profile.alpha, f"not used ({self.profile.rule} ranks by the answer's likelihood)"
        if self.config.alpha is not None:
            return self.config.alpha, "given"
        model_type = self.agents.receiver.config.model_type
        return default_alpha(model_type), f"default for {model_type}"


@dataclass
class _Tally:
    """Each configuration's item results and times, batch by batch."""

    items: dict[str, list[ItemResult]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sender_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, label: str, run: BatchRun) -> None:
        self.items.setdefault(label, []).extend(run.items)
        self.seconds[label] = self.seconds.get(label, 0.0) + run.seconds
        self.sender_seconds[label] = self.sender_seconds.get(label, 0.0) + run.sender_seconds

    def order(self, ids: list[str]) -> None:
        """Puts every configuration's item results in ``ids``' order (batches may have taken them in another)."""
        rank = {item_id: index for index, item_id in enumerate(ids)}
        for results in self.items.values():
            results.sort(key=lambda result: rank[result.id])

    def result(self, method: Method, num_layers: int) -> RunResult:
        items, layers = self.items.get(method.label, []), method.layers
        return RunResult(
            method=method.name, label=method.label, options=method.options.model_dump(mode="json"), layers=layers,
            fraction=None if layers is None else len(layers) / num_layers,
            mode=getattr(method, "mode", None), codec=getattr(method, "codec_name", None), n=len(items),
            scores=summarize(items), kv_bytes_mean=sum(i.kv_bytes for i in items) / max(len(items), 1),
            seconds=self.seconds.get(method.label, 0.0), sender_seconds=self.sender_seconds.get(method.label, 0.0),
            details=method.details(), items=items,
        )


def _run_batches(agents: Agents, task: Task, methods: Sequence[Method], test: list[Item], config: EvalConfig,
                 checkpoint: Checkpoint | None, progress: bool, cluster: Cluster | None = None) -> _Tally:
    """Runs every method on every batch, taking recorded work from ``checkpoint`` and recording new work.

    With a ``cluster``, the work nobody recorded is sent to its workers at once, and taken here
    batch by batch, in order, as if it had been recorded: each method gets the state it would
    have had (:meth:`Method.restore`), so the tally and the report are the serial run's. Each
    batch is recorded as it arrives, in whatever order (an interruption while an early batch is
    still out keeps the later ones that came back): a checkpoint's batch files are numbered in
    the order they were recorded, and a resumed run takes them first, in that order.
    """
    tally = _Tally()
    bar = tqdm(total=len(test) * len(methods), desc=f"{task.name}", disable=not progress, unit="answer")
    bucket = _bucketed(config, methods)
    chunks = list(_chunks(agents, task, test, config, checkpoint, bucket, _fused_rows(methods)))
    remote = None
    labels_now = {m.label for m in methods}
    # a former label that another configuration of this run now bears is that one's work, not this one's
    # (``random@0.5`` is both the default seed's label and seed 7's before labels named the seed)
    former = {m.label: tuple(f for f in m.former_labels if f not in labels_now) for m in methods}
    # chunk index -> the checkpoint's batch index: the recorded batches come first, as they were;
    # a new batch takes the next number when its first result is recorded
    slots = {index: index for index in range(len(checkpoint.batches) if checkpoint is not None else 0)}
    saved: set[tuple[int, str]] = set()

    def save(index: int, label: str, run: BatchRun) -> None:
        if checkpoint is not None and (index, label) not in saved:
            slot = slots.setdefault(index, len(checkpoint.batches))
            checkpoint.save(slot, [item.id for item in chunks[index]], label, run)
            saved.add((index, label))

    def recorded_run(index: int, label: str) -> BatchRun | None:
        if checkpoint is None or index not in slots:
            return None
        return checkpoint.done(slots[index], label, former[label])

    if cluster is not None:
        work = []
        for index, chunk in enumerate(chunks):
            labels = [m.label for m in methods if recorded_run(index, m.label) is None]
            if labels:
                work.append((index, chunk, labels))

        def arrived(index: int, result: dict[str, BatchRun]) -> None:  # recorded at once, in any order
            for label, run in result.items():
                save(index, label, run)

        remote = cluster.submit(task, _SweepJob(list(methods)), work, bar.update, arrived)
    for index, chunk in enumerate(chunks):
        fetched: dict[str, BatchRun] = remote.take(index, {}) if remote is not None else {}
        recorded = {m.label: _rescored(run, chunk) for m in methods
                    if m.label not in fetched and (run := recorded_run(index, m.label)) is not None}

        def record(label: str, run: BatchRun) -> None:  # as each finishes: an interruption keeps it
            save(index, label, run)  # noqa: B023 (called before the loop moves on)

        todo = [m for m in methods if m.label not in recorded and m.label not in fetched]
        ran = _run_methods(todo, Batch(agents, task, chunk), record) if todo else {}  # nobody has run them: here
        for method in methods:
            label = method.label
            done = recorded[label] if label in recorded else fetched[label] if label in fetched else ran[label]
            if label not in ran and done.state is not None:  # run elsewhere or earlier: take its state back
                method.restore(done.state)
            if label in fetched:
                record(label, done)
            tally.add(label, done)
            if label not in fetched:  # a worker's answers were counted as they came
                bar.update(len(chunk))
    bar.close()
    tally.order([item.id for item in test])
    return tally


def _rescored(run: BatchRun, items: Sequence[Item]) -> BatchRun:
    """A recorded batch's answers scored as this kvcomm scores them, against these items' gold
    answers (a checkpoint written by an earlier kvcomm keeps the scores of its metrics: resumed,
    one report would mix two scorings)."""
    golds = {item.id: list(item.answers) for item in items}
    return run.model_copy(update={"items": [
        result.model_copy(update={"gold": golds[result.id], "scores": score_all(result.answer, golds[result.id])})
        for result in run.items]})


@dataclass
class _SweepJob:
    """What a cluster's worker does with a batch of a sweep: the named set-up methods, as the
    serial loop runs them (on the worker's copies: fresh for every batch)."""

    methods: list[Method]

    def run_batch(self, agents: Agents, task: Task, items: list[Item], labels: list[str]) -> dict[str, BatchRun]:
        chosen = [m for m in self.methods if m.label in labels]
        for method in chosen:  # before the clock, once a process (the worker's first batch)
            method.warm_up(agents.sender, agents.receiver)
        return _run_methods(chosen, Batch(agents, task, items))

    def answers(self, result: dict[str, BatchRun]) -> int:
        return sum(len(run.items) for run in result.values())


def _run_methods(methods: Sequence[Method], batch: Batch,
                 finished: Callable[[str, BatchRun], None] | None = None) -> dict[str, BatchRun]:
    """Each method's work on a batch, handed to ``finished`` as it ends; configurations that can
    answer together (the same :meth:`~kvcomm.methods.base.Method.fuse_key`) do, in one batch of rows."""
    runs: dict[str, BatchRun] = {}
    for group in _fuse_groups(methods):
        if len(group) > 1:
            together = _run_together(group, batch)
            runs.update(together)
            for label, run in together.items():
                if finished is not None:
                    finished(label, run)
    for method in methods:
        if method.label not in runs:
            runs[method.label] = _run_one(method, batch)
            if finished is not None:
                finished(method.label, runs[method.label])
    return runs


def _run_together(group: list[Method], batch: Batch) -> dict[str, BatchRun]:
    """Configurations answering a batch together; each is charged an equal share of the time and,
    as always, the full cost of the shared sender computations it used."""
    batch.begin_run()
    began = batch_module.clock()
    outputs = type(group[0]).run_together(group, batch)
    share = (batch_module.clock() - began - batch.spent_sender_seconds) / len(group)
    return {method.label: BatchRun(items=_item_results(batch.items, output), seconds=share,
                                   sender_seconds=batch.charged_sender_seconds, state=method.state())
            for method, output in zip(group, outputs)}


def _run_one(method: Method, batch: Batch) -> BatchRun:
    """One method's work on a batch, timed; its state after the batch travels with it."""
    batch.begin_run()
    began = batch_module.clock()
    output = method.run(batch)
    return BatchRun(items=_item_results(batch.items, output),
                    seconds=batch_module.clock() - began - batch.spent_sender_seconds,
                    sender_seconds=batch.charged_sender_seconds, state=method.state())


def _bucketed(config: EvalConfig, methods: Sequence[Method]) -> bool:
    """Whether the run batches items by prompt length: ``bucket``, unless a method learns from the
    stream of batches (those keep the items' order)."""
    return config.bucket and not any(m.sequential for m in methods)


def _fuse_groups(methods: Sequence[Method]) -> list[list[Method]]:
    """``methods`` that can answer together, grouped by :meth:`~kvcomm.methods.base.Method.fuse_key`
    (methods without a key are in no group)."""
    groups: dict[Any, list[Method]] = {}
    for method in methods:
        if (key := method.fuse_key()) is not None:
            groups.setdefault(key, []).append(method)
    return list(groups.values())


def _fused_rows(methods: Sequence[Method]) -> int:
    """The most configurations that answer a batch together (:func:`_run_methods`): each item then
    takes that many receiver rows at once."""
    return max((len(group) for group in _fuse_groups(methods)), default=1)


def _chunks(agents: Agents, task: Task, test: list[Item], config: EvalConfig,
            checkpoint: Checkpoint | None, bucket: bool, rows_per_item: int = 1) -> Iterator[list[Item]]:
    """The batches a checkpoint recorded (checked to hold test items: :meth:`Checkpoint.check_items`),
    as they were, then the remaining items in new batches (``bucket``: ordered by prompt lengths
    first, so that a batch pads little), sized for ``rows_per_item`` receiver rows an item under
    a memory budget."""
    budget = None
    if config.max_memory_gb is not None:
        release_freed_memory()  # what the allocator keeps from earlier runs is not the models' memory
        budget = int(config.max_memory_gb * GIB) - rss_bytes()
        if budget <= 0:
            raise ConfigError(f"--max-memory {config.max_memory_gb} GiB is below what the loaded models "
                              f"already use ({rss_bytes() / GIB:.1f} GiB)")
    by_id = {item.id: item for item in test}
    taken: set[str] = set()
    for ids in checkpoint.batch_ids() if checkpoint is not None else []:
        taken.update(ids)
        yield [by_id[i] for i in ids]
    rest = [item for item in test if item.id not in taken]
    yield from plan_batches(agents, task, by_length(agents, task, rest) if bucket else rest, config.batch_size,
                            budget, rows_per_item)


def _blocks_name(max_recompute: float) -> str:
    """The name of a block profile among a run's profiles (``droidspeak@0.25``)."""
    return f"{BLOCKS_PREFIX}{max_recompute:g}"


def by_length(agents: Agents, task: Task, items: list[Item]) -> list[Item]:
    """``items`` by the lengths of their sender and receiver prompts (stable: ties keep their order)."""
    def lengths(item: Item) -> tuple[int, int]:
        return (len(agents.sender.encode_message(task.sender_message(item))),
                len(agents.receiver.encode_message(task.receiver_message(item))))

    return sorted(items, key=lengths)


def _report_config(agents: Agents, task: Task, test: list[Item], calib: list[Item], config: EvalConfig,
                   methods: Sequence[Method], sources: _Sources) -> dict[str, Any]:
    alpha, alpha_source = sources.alpha()
    book = sources.book
    return {
        "sender": agents.sender.name, "receiver": agents.receiver.name, "dtype": agents.sender.dtype_name,
        "linear": agents.sender.linear, "task": task.name, "data": data_record(task), "num_layers": agents.num_layers,
        "max_new_tokens": task.max_new_tokens, "metric": task.metric, "test_items": len(test),
        "calibration_items": [i.id for i in calib], **config.model_dump(),
        # a given profile's rule ranked the layers, not --selection's default
        **({"selection": sources.profile.rule} if sources.profile is not None else {}),
        "calib_size": len(calib), "alpha": alpha,
        "alpha_source": alpha_source,
        "seeds": {"bootstrap": BOOTSTRAP_SEED, "task": task.seed, "methods": method_seeds(methods)},
        **({"task_options": task.options} if task.options else {}),
        **({"codebook": {"id": book.id, "tokens": book.meta["tokens"],  # where its statistics came from
                         "source": "calibration items" if calib else "the model's default codebook"}}
           if book is not None else {}),
    }


def _item_results(items: list[Item], output: Output) -> list[ItemResult]:
    """One result per item, from a method's :class:`Output` (one entry per item in every field).

    Raises:
        ProtocolError: a field holds another number of entries than there are items (extra
            answers would shift onto the wrong items, or fall off silently).
    """
    counts = {name: len(value) for name, value in vars(output).items() if value is not None}
    if wrong := {name: count for name, count in counts.items() if count != len(items)}:
        raise ProtocolError(f"a method's output holds {wrong} entries for a batch of {len(items)} items")
    return [
        ItemResult(
            id=item.id,
            sender_ids=output.sender_ids[i] if output.sender_ids is not None else None,
            receiver_ids=output.receiver_ids[i],
            answer=output.answers[i],
            gold=list(item.answers),
            scores=score_all(output.answers[i], item.answers),
            kv_bytes=output.kv_bytes[i],
            message=output.messages[i] if output.messages is not None else None,
        )
        for i, item in enumerate(items)
    ]
