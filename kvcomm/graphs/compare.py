"""Several graph configurations over the same items, side by side in one report: the single-agent
reference, text edges and KV edges of several layer fractions and codecs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from kvcomm.errors import ConfigError
from kvcomm.eval.cluster import Cluster
from kvcomm.eval.provenance import data_record, utc_now
from kvcomm.eval.results import environment
from kvcomm.graphs.anchors import AnchorOptions
from kvcomm.graphs.graph import EdgeOptions, Graph, GraphReport
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import MaskMode
from kvcomm.tasks.base import Item, Task
from kvcomm.wire import make_codec
from kvcomm.wire.bootstrap import model_codebook
from kvcomm.wire.codecs.auto import rotates_with_codebook

VIA = ("kv", "kv-turn", "text", "text-turn")  # what ``edge_grid`` takes: via, and what travels


def edge_grid(via: Sequence[str], ratios: Sequence[float | None], codecs: Sequence[str | None],
              blends: Sequence[float | None] = (None,), mode: MaskMode = "causal",
              place: Literal["inline", "prefix"] = "inline") -> list[EdgeOptions]:
    """Every configuration the lists name: text edges once each (``text``: replies, ``text-turn``:
    whole turns), KV edges (``kv``: replies, ``kv-turn``: whole turns) for every ratio (None:
    every layer) × codec × blend fraction (None: no recompute; inline placement only)."""
    edges: list[EdgeOptions] = []
    for kind in via:
        if kind not in VIA:
            raise ConfigError(f"{kind!r} is not one of {', '.join(VIA)}")
        medium, _, content = kind.partition("-")
        options: dict[str, Any] = {"via": medium, "content": content or "reply"}
        if medium == "kv":
            edges += [EdgeOptions(**options, ratio=None if r is None or r >= 1 else r, codec=c, mode=mode,
                                  place=place, blend=b if place == "inline" else None)
                      for r in ratios for c in codecs for b in blends]
        else:
            edges.append(EdgeOptions(**options))
    return list(dict.fromkeys(edges))  # once each: e.g. every blend fraction is None when placed as a prefix


def graph_grid(edges: Sequence[EdgeOptions], reuse: Sequence[bool | AnchorOptions] = (False,)
               ) -> tuple[list[tuple[EdgeOptions, bool | AnchorOptions]], list[str]]:
    """The graphs ``compare`` runs: each edge configuration with each ``reuse`` setting, but reuse
    with KV edges placed as a prefix, or with whole turns as KV placed inline (neither can reuse
    the question); and those left out, named.

    Raises:
        ConfigError: every pair is left out (nothing but the single agent would run).
    """
    if not edges or not reuse:  # before: the message below, about prefixes no one asked for
        raise ConfigError(f"no graph to run: {'no edge configuration' if not edges else 'no reuse setting'} was "
                          "given (edges: edge_grid makes them; reuse: [False] for none)")
    pairs, skipped = [], []
    for edge in edges:
        for shared in reuse:
            if shared is not False and edge.via == "kv" and (edge.place == "prefix" or edge.content == "turn"):
                skipped.append(f"{edge.label} with reuse {'anchor' if isinstance(shared, AnchorOptions) else 'on'}")
            else:
                pairs.append((edge, shared))
    if not pairs:
        raise ConfigError("no graph to run: reuse places the question after each agent's own text, and KV edges "
                          "placed as a prefix, or whole turns as KV, cannot (add --reuse off, or text edges, or "
                          "replies placed inline)")
    return pairs, skipped


def compare(model: LoadedModel, task: Task, items: Sequence[Item], topology: str, agents: int,
            edges: Sequence[EdgeOptions], rounds: int = 1, single: bool = True, batch_size: int = 8,
            reply_tokens: int | None = None, progress: bool = True, command: str | None = None,
            cluster: Cluster | None = None, reuse: Sequence[bool | AnchorOptions] = (False,)) -> GraphReport:
    """Runs the single-agent reference (``single``) and the graph once per edge configuration and
    ``reuse`` setting (off, on, or on with anchor correction; on ``cluster``'s workers, batch by
    batch, when given). Reuse is left out for KV edges placed as a prefix, which cannot reuse the
    question (:func:`graph_grid`)."""
    started = utc_now()
    if isinstance(reuse, bool | AnchorOptions) or not isinstance(reuse, Sequence):
        raise ConfigError(f"reuse is a list of settings (False, True, AnchorOptions), not {reuse!r}")
    if isinstance(edges, EdgeOptions) or not isinstance(edges, Sequence):
        raise ConfigError(f"edges is a list of EdgeOptions (edge_grid makes one), not {edges!r}")
    graphs = [Graph.single(model)] if single else []
    graphs += [Graph.build(model, topology, agents, rounds, edge, reply_tokens, shared)
               for edge, shared in graph_grid(edges, reuse)[0]]
    runs = [graph.run(task, items, batch_size, progress, cluster) for graph in graphs]
    config = {"task": task.name, "seed": task.seed, **({"task_options": task.options} if task.options else {}),
              "metric": task.metric, "model": model.name,
              "num_layers": model.num_layers, "topology": topology, "agents": agents, "rounds": rounds,
              "items": len(items), "batch_size": batch_size, "max_new_tokens": task.max_new_tokens,
              "reply_tokens": reply_tokens, "dtype": model.dtype_name,
              "linear": model.linear, "data": data_record(task)}
    if any(edge.via == "kv" and edge.codec is not None and rotates_with_codebook(make_codec(edge.codec))
           for edge in edges):
        book = model_codebook(model)  # the one the edges encoded with (the model's default)
        config["codebook"] = {"id": book.id, "tokens": book.meta["tokens"]}
    return GraphReport(config=config, provenance={"command": command, "date": started},
                       environment=environment(cluster), runs=runs)
