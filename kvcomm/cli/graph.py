"""``kvcomm graph``: several agents of one model answer together, hearing each other as KV or as text."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from kvcomm.cli.common import (
    BatchSize,
    Data,
    Dtype,
    LinearOption,
    Quiet,
    RayAddress,
    RunOverwrite,
    TaskName,
    TaskOptions,
    Workers,
    WorkerThreads,
    check_output_and_plot,
    console,
    quiet_libraries,
    ray_cluster,
    remove_replaced,
    task_options_for,
)
from kvcomm.cli.group import command_line
from kvcomm.errors import ConfigError
from kvcomm.eval.cluster import Cluster
from kvcomm.eval.outputs import safe_name
from kvcomm.graphs.anchors import AnchorOptions
from kvcomm.graphs.compare import VIA, compare, edge_grid, graph_grid
from kvcomm.graphs.graph import EdgeOptions, check_graph, shares_question
from kvcomm.graphs.report import plot_graph, print_graph
from kvcomm.graphs.topology import unroll
from kvcomm.models import DEFAULT_MODEL, resolve_model
from kvcomm.models.loading import load_model
from kvcomm.protocol import MaskMode
from kvcomm.tasks import TASKS, Task, load_task
from kvcomm.tasks.multihop import PIECES
from kvcomm.tasks.relay import HOPS
from kvcomm.wire.codecs import codec_names

_SET_BY_GRAPH = {"items": "--limit", "seed": "--seed", "hops": "--agents", "pieces": "--agents"}


def graph_task(name: str, data: Path | None, agents: int, items: int, seed: int,
               pairs: Sequence[str] = ()) -> Task:
    """The task for a graph of ``agents``: a relay of as many hops, multihop facts in as many
    pieces, or any other task split among them at sentence ends. ``pairs`` (``--task-option``)
    set the generator's other options (a relay's distractors, multihop's filler).

    Raises:
        ConfigError: an option the task does not take, or one the graph's own flags set.
    """
    options = task_options_for(name, pairs, [name])
    if taken := [f"{key} (set by {_SET_BY_GRAPH[key]})" for key in options if key in _SET_BY_GRAPH]:
        raise ConfigError(f"--task-option cannot set {', '.join(taken)} in a graph")
    spans = {"relay": (HOPS, "hops"), "multihop": (PIECES, "pieces")}
    if name in spans and agents not in spans[name][0]:
        span, what = spans[name]
        raise ConfigError(f"--agents {agents}: a graph over {name} gives each agent one of its {what}, and {name} "
                          f"has {span[0]} to {span[-1]}")
    if name == "relay":
        return load_task("relay", data, items=items, hops=agents, seed=seed, **options)
    if name == "multihop":
        return load_task("multihop", data, items=items, pieces=agents, seed=seed, **options)
    generated: dict[str, Any] = {key: value for key, value in (("items", items), ("seed", seed))
                 if key in inspect.signature(TASKS.get(name).load).parameters}  # e.g. facts: made to measure
    task = load_task(name, data, **generated, **options)
    return dataclasses.replace(task, items=task.items[:items])


def _list(value: str, what: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    if not out:
        raise ConfigError(f"--{what} names nothing")
    return out


def graph_command(
    model: Annotated[str, typer.Option("--model", "-m", envvar="KVCOMM_MODEL",
                                       help="The model every agent runs on.")] = DEFAULT_MODEL,
    task: TaskName = "relay", data: Data = None, task_option: TaskOptions = None,
    topology: Annotated[Literal["chain", "star", "full", "debate"], typer.Option(
        help="Who hears whom: chain (a relay), star (fan-out, a decision agent fans in), full, debate.")] = "chain",
    agents: Annotated[int, typer.Option(min=1, max=16, help="Agents holding a piece of each context (the "
                                        "relay's hops).")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=8, help="Rounds of turns.")] = 1,
    via: Annotated[str, typer.Option(help="Comma-separated: kv (the reply tokens' KV, placed where text would be), "
                                     "kv-turn (the KV of the speaker's message and reply; inline only from speakers "
                                     "that hear nothing), text (replies in the "
                                     "hearer's prompt), text-turn (message and reply in the prompt).")] = "kv,text",
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions of layers for kv edges, ranked by the "
                                        "depth prior; 1 = every layer.")] = "1.0",
    codecs: Annotated[str, typer.Option(help=f"Comma-separated codecs for kv edges; 'none' = in process. "
                                        f"Codecs: {', '.join(codec_names())}.")] = "fp16",
    blends: Annotated[str | None, typer.Option(
        help="Comma-separated fractions of the hearer's context recomputed where heard KV deviates most "
             "(CacheBlend); 'none' = pure reuse. Inline KV only. (default: 0.15 inline, none with --place "
             "prefix)")] = None,
    place: Annotated[Literal["inline", "prefix"], typer.Option(
        help="Where heard KV goes: inline (where text would be) or prefix (before the hearer's chat; no blend).")]
    = "inline",
    mode: Annotated[MaskMode, typer.Option(help="Masks of kv edges placed as a prefix: causal, legacy, shift-back, "
                                           "padded-sink or padded-zero (inline KV is causal).")] = "causal",
    reuse: Annotated[str, typer.Option(help="Comma-separated: off, on, anchor. On: a question several agents are "
                                       "asked is prefilled once per item and reused by each agent with re-rotated "
                                       "positions (KVCOMM's shared input; not run where each agent is asked its own "
                                       "hop, as on a relay chain). Anchor: also corrected by KVCOMM's "
                                       "anchors (where an agent fails the shareability test, it computes the "
                                       "question in its context and the item becomes an anchor), the chat's "
                                       "closing reused too.")] = "off",
    anchor_threshold: Annotated[float, typer.Option(min=0, help="With --reuse anchor: the shareability test's "
                                                    "entropy bound γ (KVCOMM's --kv-threshold); higher reuses "
                                                    "more.")] = AnchorOptions.model_fields["threshold"].default,
    anchor_closing: Annotated[bool, typer.Option(help="With --reuse anchor: reuse the chat's closing too (each "
                                                 "agent prefills one token), or prefill it in each context.")] = True,
    single: Annotated[bool, typer.Option(help="Also run the reference: one agent reads the whole context.")] = True,
    limit: Annotated[int, typer.Option(min=1, help="Items (generated tasks make this many).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of a generated task (relay, multihop, facts).")] = 0,
    reply_tokens: Annotated[int | None, typer.Option(
        min=1, help="Budget of every turn but the last. (default: the task's answer budget)")] = None,
    batch_size: BatchSize = None, dtype: Dtype = "float32", linear: LinearOption = "dense", quiet: Quiet = False,
    overwrite: RunOverwrite = False,
    ray: RayAddress = None, workers: Workers = None, worker_threads: WorkerThreads = 1,
    out: Annotated[Path | None, typer.Option(
        help="Results JSON; the plot is written beside it. (default: results/graph-<task>-<topology>-<model>.json)")]
    = None,
) -> None:
    """Run a multi-agent graph over a task: a table per configuration and per agent, a results JSON and a plot."""
    kinds = _list(via, "via")
    try:
        fractions = [None if float(r) >= 1 else float(r) for r in _list(ratios, "ratios")]
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    wire = [None if c == "none" else c for c in _list(codecs, "codecs")]
    try:
        recompute = [0.15] if blends is None else [None if b == "none" else float(b) for b in _list(blends, "blends")]
    except ValueError:
        raise ConfigError(f"--blends must be comma-separated numbers or 'none', got {blends!r}") from None
    if unknown := [kind for kind in kinds if kind not in VIA]:
        raise ConfigError(f"--via: {unknown[0]!r} is not one of {', '.join(VIA)}")
    if bad_ratios := [r for r in _list(ratios, "ratios") if not 0 < float(r) <= 1]:
        raise ConfigError(f"--ratios are fractions of the layers, 0 < RATIO <= 1 (1: every layer), not {bad_ratios[0]}")
    for codec, fraction in itertools.product(wire, recompute):  # checked whatever --via says: a typo is a typo
        EdgeOptions(via="kv", codec=codec, blend=fraction)
    if not any(kind.startswith("kv") for kind in kinds) and (
            fractions != [None] or wire != ["fp16"] or blends is not None or place != "inline" or mode != "causal"):
        raise ConfigError("--ratios, --codecs, --blends, --place and --mode are for kv edges; --via "
                          f"{via} has none")
    if place == "prefix" and blends is not None and recompute != [None]:  # left out, or none, says nothing
        raise ConfigError("--blends recomputes heard KV placed inline; KV placed as a prefix (--place prefix) "
                          "recomputes nothing")
    edges = edge_grid(kinds, fractions, wire, recompute, mode, place)
    settings = _list(reuse, "reuse")
    if bad := [r for r in settings if r not in ("off", "on", "anchor")]:
        raise ConfigError(f"--reuse takes off, on and anchor, got {', '.join(bad)}")
    if "anchor" not in settings and (anchor_threshold != AnchorOptions.model_fields["threshold"].default
                                     or not anchor_closing):
        raise ConfigError("--anchor-threshold and --no-anchor-closing are for --reuse anchor")
    anchors = AnchorOptions(threshold=anchor_threshold, closing=anchor_closing)
    choices: dict[str, bool | AnchorOptions] = {"off": False, "on": True, "anchor": anchors}
    reuses = [choices[r] for r in dict.fromkeys(settings)]
    for left_out in graph_grid(edges, reuses)[1]:  # before a model loads: a grid with nothing to run is refused
        console.print(f"not run: {left_out} (KV placed as a prefix, or whole turns as KV, cannot reuse the question)",
                      markup=False)
    unroll(topology, agents, rounds)  # an impossible graph is refused before a model loads
    if ray is not None and "anchor" in settings:
        raise ConfigError("--reuse anchor keeps one pool of anchors across the run's batches: not with --ray")
    cluster_options = ray_cluster(ray, workers, worker_threads)
    resolve_model(model)
    the_task = graph_task(task, data, agents, limit, seed, task_option or [])
    if any(r is not False for r in reuses) and not shares_question(unroll(topology, agents, rounds), agents,
                                                                   the_task.items[:limit]):
        why = f"no two agents are asked the same question: each agent of this relay ({topology}) is asked its own hop"
        if False not in reuses:
            raise ConfigError(f"no graph to run: reuse reuses the question agents share, and {why} (add --reuse off)")
        for setting in dict.fromkeys(settings):
            if setting != "off":
                console.print(f"not run: reuse {setting} ({why})", markup=False)
        reuses = [False]
    for edge, shared in graph_grid(edges, reuses)[0]:  # what only a graph refuses, before a model loads
        check_graph(unroll(topology, agents, rounds), agents, edge, reply_tokens, shared)
    out, plot_path = check_output_and_plot(
        out or Path("results") / f"graph-{safe_name(the_task.name)}-{topology}-{safe_name(model)}.json", "results",
        overwrite)
    with quiet_libraries(quiet), contextlib.ExitStack() as stack:
        loaded = load_model(model, dtype, linear)
        cluster = None
        if cluster_options is not None:
            cluster = stack.enter_context(Cluster(cluster_options, model, model, dtype, linear))
            console.print(f"ray: {cluster.workers} workers, {cluster_options.threads} thread(s) each", markup=False)
        remove_replaced([out, plot_path])  # --overwrite (else refused above), once the model has loaded
        report = compare(loaded, the_task, the_task.items[:limit], topology, agents, edges, rounds, single,
                         batch_size or 8, reply_tokens, progress=not quiet, command=command_line(), cluster=cluster,
                         reuse=reuses)
    plot = plot_graph(report, plot_path)
    report.save(out)  # last: the mark of a finished run
    print_graph(report)
    console.print(f"results: {out}\nplot: {plot}", markup=False, soft_wrap=True)
