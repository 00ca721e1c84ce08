"""Profiling DroidSpeak blocks: which contiguous layers a receiver must recompute for a variant's KV.

For every candidate block ``[a, b)`` (at most ``max_recompute`` of the layers long: the cap is part
of the profile and printed with it), the receiver's cache is the sender's KV at every other layer
and its own KV at ``[a, b)``, computed from the sender's hidden state entering ``a``. Each block is
scored on calibration items by the receiver's mean log-likelihood per token of a target answer,
next to two references: plain reuse of the sender's KV at every layer (no block) and the
receiver's own prefill of the context (every layer its own; what the skyline reads).

The target (``objective``) is, by default, the answer the receiver itself gives from its own
prefill (``own``): DroidSpeak's criterion, fidelity to the receiver's full prefill. The gold
answer (``gold``) is the other choice; between variants with different answer styles it misleads
(e.g. a terse sender's KV makes a one-word gold answer *more* likely for a chatty receiver than
its own prefill does, so every block looks good enough).

One pass of the receiver's layers ``a .. a+cap-1`` from the sender's state entering ``a`` gives the
KV of every block starting at ``a``, so profiling costs ``L`` partial prefills per item plus one
batched scoring forward per ``CHUNK`` blocks. Uncapped, there are ``L(L+1)/2`` blocks.

:meth:`BlockProfile.pick` chooses the smallest block whose likelihood is within a tolerance of the
receiver's own (the best block at the cap when none is).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from kvcomm.agents import Agents
from kvcomm.errors import ConfigError, DataError
from kvcomm.eval.batch import Batch
from kvcomm.files import JsonFile, read_json
from kvcomm.protocol import SenderKV, SharedKV, greedy_generate, prefill, prefill_logits, receiver_input
from kvcomm.protocol.droidspeak import block_kv, check_hidden_widths
from kvcomm.selection.calibrate import Profile
from kvcomm.selection.likelihood import answer_ids, rows_loglik
from kvcomm.tasks.base import Item, Task

BLOCKS_VERSION = 1
CHUNK = 32  # candidate caches per batched scoring forward
DEFAULT_MAX_RECOMPUTE = 0.25
DEFAULT_BLOCK_TOLERANCE = 0.02  # nats per answer token below the receiver's own prefill (0.1 was loose: results.md)


class BlockScore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: int
    stop: int
    loglik: float  # mean over items of the mean log-probability per gold-answer token

    @property
    def length(self) -> int:
        return self.stop - self.start


class Pick(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: int
    stop: int
    loglik: float
    within_tolerance: bool
    tolerance: float


Objective = Literal["own", "gold"]
"""What a block's score is the likelihood of: the receiver's own full-prefill answer (``own``) or the
gold answer (``gold``); the module's docstring says why ``own`` is the default."""


class BlockProfile(JsonFile):
    """Every candidate block's score on the calibration items (JSON; ``eval --profile`` reads it)."""

    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str] = "block profile"

    kind: Literal["droidspeak"] = "droidspeak"
    version: int = BLOCKS_VERSION
    objective: Objective = "gold"  # what the scores are the likelihood of (profiles before "own" scored gold)
    sender: str
    receiver: str
    task: str
    task_options: dict[str, Any] | None = None  # the task's item_options (None: written before they were recorded)
    weights: list[str] | None = None  # the sender's and receiver's weights digests (None: as above)
    num_layers: int
    calibration_items: list[str]
    max_recompute: float
    max_block: int  # layers: the cap, floor(max_recompute * L), at least 1
    own: float  # the receiver's own prefill of the context
    reuse: float  # the sender's KV at every layer
    blocks: list[BlockScore]
    cost: dict[str, float] = {}
    # the data file the task read (path, sha256; None: a generated task, or written before this was
    # recorded): ids of another file's items are other items
    data: dict[str, Any] | None = None

    def pick(self, tolerance: float = DEFAULT_BLOCK_TOLERANCE, max_layers: int | None = None) -> Pick:
        """The fewest layers whose score is within ``tolerance`` of the receiver's own (ties: the
        better score); if none is, the best-scoring block. ``max_layers`` caps the length further."""
        if tolerance < 0:
            raise ConfigError(f"a block tolerance must be >= 0, got {tolerance}")
        allowed = [b for b in self.blocks if max_layers is None or b.length <= max_layers]
        if not allowed:
            raise ConfigError(f"the profile has no block of at most {max_layers} layers")
        good = [b for b in allowed if b.loglik >= self.own - tolerance]
        chosen = min(good, key=lambda b: (b.length, -b.loglik)) if good else max(allowed, key=lambda b: b.loglik)
        return Pick(start=chosen.start, stop=chosen.stop, loglik=chosen.loglik, within_tolerance=bool(good),
                    tolerance=tolerance)

    def curve(self) -> list[dict[str, float]]:
        """The quality-against-recompute curve: the best block of each length."""
        best: dict[int, BlockScore] = {}
        for block in self.blocks:
            if block.length not in best or block.loglik > best[block.length].loglik:
                best[block.length] = block
        return [{"layers": n, "fraction": n / self.num_layers, "start": b.start, "stop": b.stop, "loglik": b.loglik}
                for n, b in sorted(best.items())]


def _with_data(profile: Any, config: Any) -> Any:
    """A results file's profile with the file's data record as its provenance's (as ``kvcomm
    calibrate`` records it), so that it is refused for another data file of the same task too."""
    if not isinstance(profile, dict) or not isinstance(config, dict) or not config.get("data"):
        return profile
    details = profile.get("details") or {}
    if not isinstance(details, dict) or not isinstance(details.get("provenance") or {}, dict):
        return profile  # damaged: the profile's own checks refuse it, naming the file
    details = dict(details)
    details["provenance"] = {**(details.get("provenance") or {}), "data": config["data"]}
    return {**profile, "details": details}


def read_profile(path: str | Path) -> Profile | BlockProfile:
    """A layer ranking or a block profile, told apart by the block profile's ``kind``; or the
    ranking of a results file (``kvcomm eval``/``sweep`` output), so that a run's calibration is
    paid once.

    Raises:
        DataError: the file cannot be read or is neither, or is results that made no ranking.
    """
    raw = read_json(path, "profile")
    if isinstance(raw, dict) and "runs" in raw and "config" in raw:  # a results file
        if not isinstance(raw.get("profile"), dict):
            raise DataError(f"results {path} hold no layer ranking (none of its methods needed one); "
                            "calibrate one with `kvcomm calibrate`")
        raw = _with_data(raw["profile"], raw["config"])
    if isinstance(raw, dict) and raw.get("kind") == "droidspeak":
        return BlockProfile.from_json_value(raw, path)
    return Profile.from_json_value(raw, path)


def read_ranking(path: str | Path, rule: str | None = None) -> Profile:
    """A layer ranking (a profile, or a results file's) from ``path``; with ``rule``, that rule's
    (a results file keeps every rule its methods used, in ``profiles``).

    Raises:
        DataError: as :func:`read_profile`, the file is a DroidSpeak block profile, or it holds no
            ranking by ``rule``.
    """
    if rule is not None:
        raw = read_json(path, "profile")
        if isinstance(raw, dict) and isinstance(raw.get("profiles"), dict) and rule in raw["profiles"]:
            return Profile.from_json_value(_with_data(raw["profiles"][rule], raw.get("config")), path)
    profile = read_profile(path)
    if rule is not None and isinstance(profile, Profile) and profile.rule != rule:
        raise DataError(f"{path} holds no {rule} ranking (its ranking is by the {profile.rule} rule)")
    if isinstance(profile, BlockProfile):
        raise DataError(f"{path} is a droidspeak block profile, not a layer ranking")
    return profile


def max_block(num_layers: int, max_recompute: float) -> int:
    """The longest block allowed: ``floor(max_recompute * L)`` layers, at least 1 and at most ``L - 1``
    (a block of every layer sends no KV)."""
    if not 0 < max_recompute <= 1:
        raise ConfigError(f"max_recompute must be in (0, 1], got {max_recompute}")
    if num_layers < 2:
        raise ConfigError(f"a {num_layers}-layer model has no block to recompute: one of every layer sends no KV")
    return max(1, min(num_layers - 1, math.floor(max_recompute * num_layers + 1e-9)))


def candidate_blocks(num_layers: int, cap: int) -> list[tuple[int, int]]:
    """Every block ``[a, b)`` with ``1 <= b - a <= cap``, by start then stop."""
    return [(a, b) for a in range(num_layers) for b in range(a + 1, min(a + cap, num_layers) + 1)]


def profile_blocks(
    agents: Agents, task: Task, items: Sequence[Item], max_recompute: float = DEFAULT_MAX_RECOMPUTE,
    batch_size: int = 8, progress: bool = True, objective: Objective = "own",
) -> BlockProfile:
    """Scores every block of at most ``max_recompute`` of the layers on ``items`` (module docstring).

    Raises:
        ConfigError: a cap outside (0, 1], an unknown objective; DataError: no items, or (``gold``)
            items without a gold answer.
    """
    if objective not in ("own", "gold"):
        raise ConfigError(f"unknown block objective {objective!r}; valid: own, gold")
    if not items:
        raise DataError("profiling blocks needs at least one item")
    check_hidden_widths(agents.sender.model, agents.receiver.model)
    num_layers = agents.num_layers
    cap = max_block(num_layers, max_recompute)
    blocks = candidate_blocks(num_layers, cap)
    began = time.perf_counter()
    receiver = agents.receiver.model
    totals = torch.zeros(len(blocks) + 2, dtype=torch.float64)  # blocks, then reuse, then own
    bar = tqdm(total=len(items), desc="profile blocks", unit="item", disable=not progress)
    for first in range(0, len(items), batch_size):
        batch = Batch(agents, task, list(items[first:first + batch_size]))
        sent = batch.sender_kv_with_hidden(range(num_layers))
        context = batch.prompt("sender", task.sender_message)  # the receiver reads the same tokens
        own = prefill(receiver, context.input_ids, context.valid)
        prompt = batch.prompt("receiver", task.receiver_message)
        targets = _own_answers(agents, own, prompt.input_ids, prompt.valid, task.max_new_tokens) \
            if objective == "own" else [answer_ids(agents.receiver, item) for item in batch.items]
        for row, answer in enumerate(targets):
            totals += _score_item(receiver, sent.row(row), own.row(row), blocks, prompt.ids[row], answer)
            bar.update(1)
    bar.close()
    means = (totals / len(items)).tolist()
    return BlockProfile(
        sender=agents.sender.name, receiver=agents.receiver.name, task=task.name, task_options=task.item_options,
        weights=list(agents.weights), num_layers=num_layers,
        objective=objective, calibration_items=[item.id for item in items], max_recompute=max_recompute, max_block=cap,
        own=means[-1], reuse=means[-2],
        blocks=[BlockScore(start=a, stop=b, loglik=value) for (a, b), value in zip(blocks, means)],
        cost={"seconds": time.perf_counter() - began, "items": float(len(items)), "blocks": float(len(blocks))},
    )


def _own_answers(agents: Agents, own: SenderKV, input_ids: torch.Tensor, valid: torch.Tensor,
                 max_new_tokens: int) -> list[list[int]]:
    """What the receiver answers from its own prefill of the context, greedily (an immediate stop
    is the stop token it chose: that is the answer to match)."""
    receiver = agents.receiver
    replies = greedy_generate(receiver.model, receiver_input(SharedKV.whole(own)), input_ids, valid, max_new_tokens,
                              receiver.stop_ids, receiver.pad_id)
    if all(replies):
        return replies
    first = prefill_logits(receiver.model, receiver_input(SharedKV.whole(own)), input_ids, valid)[:, -1].argmax(-1)
    return [reply or [int(first[row])] for row, reply in enumerate(replies)]


def _score_item(receiver: Any, sent: SenderKV, own: SenderKV, blocks: list[tuple[int, int]], prompt: list[int],
                answer: list[int]) -> torch.Tensor:
    """One item's score for every block, then reuse, then the receiver's own prefill."""
    layers = sent.num_layers
    computed: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for start in sorted({a for a, _ in blocks}):  # one partial prefill per start, as long as its longest block
        stop = max(b for a, b in blocks if a == start)
        computed[start] = block_kv(receiver, sent.hidden[start], sent.valid, sent.positions, start, stop)

    def cache(block: tuple[int, int] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if block is None:
            return sent.keys, sent.values
        a, b = block
        keys, values = list(sent.keys), list(sent.values)
        keys[a:b], values[a:b] = computed[a][0][:b - a], computed[a][1][:b - a]
        return keys, values

    candidates: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [cache(b) for b in blocks]
    candidates += [cache(None), (own.keys, own.values)]
    out = []
    for first in range(0, len(candidates), CHUNK):
        chunk = candidates[first:first + CHUNK]
        rows = SharedKV(
            keys=[torch.cat([c[0][layer] for c in chunk]) for layer in range(layers)],
            values=[torch.cat([c[1][layer] for c in chunk]) for layer in range(layers)],
            positions=[sent.positions.expand(len(chunk), -1)] * layers,
            valid=[sent.valid.expand(len(chunk), -1)] * layers,
            context_len=sent.context_len.expand(len(chunk)), full=[True] * layers,
        )
        out.append(rows_loglik(receiver, rows, prompt, answer))
    return torch.cat(out)
