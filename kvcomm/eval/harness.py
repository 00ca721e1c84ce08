"""Runs methods over a task's test items, batch by batch, and collects a :class:`Report`.

Items are split once: the test items are the first ``limit`` items, the calibration items are
taken from the end of the list, and the two never overlap. Within a batch every method reuses
the same sender prefill, and each method is charged for the sender work it used (see
:mod:`kvcomm.eval.batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from tqdm.auto import tqdm

from kvcomm.agents import Agents
from kvcomm.config import Options
from kvcomm.errors import ConfigError
from kvcomm.eval import batch as batch_module
from kvcomm.eval.batch import Batch
from kvcomm.eval.memory import GIB, plan_batches, rss_bytes
from kvcomm.eval.results import ItemResult, Report, RunResult, environment, summarize
from kvcomm.methods.base import Calibration, Method, Output, Setup
from kvcomm.selection.calibrate import Profile, calibrate
from kvcomm.selection.rules import DEFAULT_MU, DEFAULT_SIGMA
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.metrics import METRICS
from kvcomm.wire import Codebook
from kvcomm.wire.bootstrap import codebook_from_items, model_codebook


class EvalConfig(Options):
    """How to run an evaluation (recorded verbatim in the results).

    Attributes:
        limit: test items, from the front of the task (default: all but the calibration items).
        batch_size: items per forward pass.
        calib_size: calibration items, from the end of the task, disjoint from the test items.
        alpha, mu, sigma: how calibration mixes attention importance with the depth prior
            (``alpha`` None: 1.0 for Llama-family models, 0.8 for Qwen, as in the paper).
        max_memory_gb: process memory budget; batches shrink to stay inside it.
    """

    what = "evaluation"
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    calib_size: int = Field(1, ge=0)
    alpha: float | None = Field(None, ge=0, le=1)
    mu: float = Field(DEFAULT_MU, ge=0, le=1)
    sigma: float = Field(DEFAULT_SIGMA, gt=0)
    max_memory_gb: float | None = Field(None, gt=0)

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.alpha, self.mu, self.sigma)


def split_items(items: Sequence[Item], limit: int | None, calib_size: int) -> tuple[list[Item], list[Item]]:
    """Test items from the front, calibration items from the back; refuses any overlap."""
    limit = len(items) - calib_size if limit is None else limit
    if limit < 1 or calib_size < 0 or limit + calib_size > len(items):
        raise ConfigError(
            f"{len(items)} items cannot hold {limit} test and {calib_size} calibration items without "
            f"overlap; lower --limit to at most {len(items) - calib_size} or --calib-size"
        )
    return list(items[:limit]), list(items[len(items) - calib_size:]) if calib_size else []


def evaluate(
    agents: Agents, task: Task, methods: Sequence[Method], config: EvalConfig | None = None,
    profile: Profile | None = None, progress: bool = True,
) -> Report:
    """Evaluates ``methods`` on ``task``; calibrates first if a method needs a ranking and no
    ``profile`` is given.

    Raises:
        ConfigError: the item split is impossible, labels collide, or the profile was calibrated
            on test items or for another depth.
    """
    config = config or EvalConfig()
    test, calib = split_items(task.items, config.limit, config.calib_size)
    test_ids = {item.id for item in test}

    def ranking() -> list[int]:
        nonlocal profile
        if profile is None:
            if not calib:
                raise ConfigError("kvcomm needs a layer ranking: pass --profile or --calib-size >= 1")
            profile = calibrate(agents, task, calib, config.alpha, config.mu, config.sigma,
                                config.batch_size, progress)
        if profile.num_layers != agents.num_layers:
            raise ConfigError(f"profile is for {profile.num_layers} layers, the model has {agents.num_layers}")
        if leaked := test_ids.intersection(profile.calibration_items):
            raise ConfigError(f"profile was calibrated on test items: {sorted(leaked)[:5]}")
        return profile.ranking

    book: Codebook | None = None

    def codebook() -> Codebook:
        """From the calibration items, like the ranking (the model's default without any)."""
        nonlocal book
        if book is None:
            book = codebook_from_items(agents.sender, task, calib, config.batch_size) if calib \
                else model_codebook(agents.sender)
        return book

    setup = Setup(agents.num_layers, agents.receiver.config.model_type, ranking, codebook, config.calibration)
    for method in methods:
        method.setup(setup)
    labels = [m.label for m in methods]  # final once set up (e.g. AC's resolved layer indices)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two configurations share a label: {labels}")

    records: dict[str, list[ItemResult]] = {label: [] for label in labels}
    seconds = dict.fromkeys(labels, 0.0)
    sender_seconds = dict.fromkeys(labels, 0.0)
    budget = None
    if config.max_memory_gb is not None:
        budget = int(config.max_memory_gb * GIB) - rss_bytes()
        if budget <= 0:
            raise ConfigError(f"--max-memory {config.max_memory_gb} GiB is below what the loaded models "
                              f"already use ({rss_bytes() / GIB:.1f} GiB)")
    bar = tqdm(total=len(test) * len(methods), desc=f"{task.name}", disable=not progress, unit="answer")
    for chunk in plan_batches(agents, task, test, config.batch_size, budget):
        batch = Batch(agents, task, chunk)
        for method in methods:
            batch.begin_run()
            began = batch_module.clock()
            output = method.run(batch)
            seconds[method.label] += batch_module.clock() - began - batch.spent_sender_seconds
            sender_seconds[method.label] += batch.charged_sender_seconds
            records[method.label].extend(_item_results(batch.items, output))
            bar.update(len(batch.items))
    bar.close()

    runs = []
    for method in methods:
        items = records[method.label]
        layers = method.layers
        runs.append(RunResult(
            method=method.name, label=method.label, options=method.options.model_dump(mode="json"), layers=layers,
            fraction=None if layers is None else len(layers) / agents.num_layers,
            mode=getattr(method, "mode", None), codec=getattr(method, "codec_name", None), n=len(items),
            scores=summarize(items),
            kv_bytes_mean=sum(i.kv_bytes for i in items) / max(len(items), 1),
            seconds=seconds[method.label], sender_seconds=sender_seconds[method.label],
            details=method.details(), items=items,
        ))
    return Report(
        config={
            "sender": agents.sender.name, "receiver": agents.receiver.name, "task": task.name,
            "num_layers": agents.num_layers, "max_new_tokens": task.max_new_tokens, "metric": task.metric,
            "test_items": len(test), "calibration_items": [i.id for i in calib], **config.model_dump(),
            **({"codebook": {"id": book.id, "tokens": book.meta["tokens"]}} if book is not None else {}),
        },
        environment=environment(),
        profile=profile.model_dump() if profile is not None else None,
        runs=runs,
    )


def _item_results(items: list[Item], output: Output) -> list[ItemResult]:
    return [
        ItemResult(
            id=item.id,
            sender_ids=output.sender_ids[i] if output.sender_ids is not None else None,
            receiver_ids=output.receiver_ids[i],
            answer=output.answers[i],
            gold=list(item.answers),
            scores={name: fn(output.answers[i], item.answers) for name, fn in METRICS.items()},
            kv_bytes=output.kv_bytes[i],
            message=output.messages[i] if output.messages is not None else None,
        )
        for i, item in enumerate(items)
    ]
