"""kvcomm: LLM agents that communicate through their attention KV caches (KVComm, ICLR 2026).

Typical use::

    import kvcomm
    agents = kvcomm.Agents.load("smollm2-135m")
    agents.ask("Mira lives in Oslo.", "Which city does Mira live in?", layers=range(15, 30))

Across processes, the two ends of an exchange are :func:`encode_context` (sender → :class:`KVMessage`)
and :func:`answer` (receiver); a receiver can start on a message still arriving over the network
(:meth:`Client.arriving`: layer l of its prefill runs as soon as layer l is in). Several agents
answering together, hearing each other's turns as KV or as text, are a :class:`Graph`::

    graph = kvcomm.Graph.build(kvcomm.load_model("smollm2-135m"), "chain", agents=3,
                               edge=kvcomm.EdgeOptions(via="kv", ratio=0.5, codec="fp16"))
    task = kvcomm.load_task("relay", items=20, hops=3)
    run = graph.run(task, task.items)  # run.scores, run.steps (bytes, TTFT per agent), run.items

A sweep's batches run on a Ray cluster, one model copy per worker, with the serial run's results::

    with kvcomm.Cluster(kvcomm.RayCluster(workers=2), "smollm2-135m", "smollm2-135m", "float32") as cluster:
        report = kvcomm.evaluate(agents, task, kvcomm.build_methods(["kvcomm"], [0.5]), cluster=cluster)

Everything kvcomm raises on purpose is a :class:`KvcommError`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kvcomm.agents import Agents, answer, encode_context, encode_ids, encode_passage
from kvcomm.errors import (
    ClusterError,
    ConfigError,
    DataError,
    FingerprintMismatch,
    IncompatibleModelsError,
    KvcommError,
    ModelError,
    ProtocolError,
    WireError,
)
from kvcomm.eval import EvalConfig, Report, evaluate, plot_sweep, print_table
from kvcomm.eval.batch import Batch
from kvcomm.eval.cluster import Cluster, RayCluster
from kvcomm.eval.results import RunResult, Score
from kvcomm.graphs import AnchorOptions, EdgeOptions, Graph, GraphReport, GraphRun
from kvcomm.methods import METHODS, Method, build_methods, make_method
from kvcomm.models import EMBEDDED, LoadedModel, load_model, load_pair
from kvcomm.models.fingerprint import Fingerprint
from kvcomm.protocol import MaskMode, SenderKV, SharedKV, build_receiver_input, greedy_generate, prefill
from kvcomm.protocol.receiver import ReceiverInput
from kvcomm.selection import Profile, calibrate
from kvcomm.selection.blocks import BlockProfile, profile_blocks
from kvcomm.selection.calibrate import Objective
from kvcomm.serve.client import Client, ServiceError
from kvcomm.tasks import Item, Task, load_task
from kvcomm.tasks.base import Pieces
from kvcomm.wire import Codec, KVMessage
from kvcomm.wire.streaming import Arrival

__all__ = [
    "Agents", "AnchorOptions", "Arrival", "Batch", "BlockProfile", "Client", "Cluster", "ClusterError", "Codec",
    "ConfigError", "DataError", "EMBEDDED",
    "EdgeOptions", "EvalConfig", "Fingerprint", "FingerprintMismatch", "Graph", "GraphReport", "GraphRun",
    "IncompatibleModelsError", "Item", "KVMessage", "KvcommError", "LoadedModel", "METHODS", "MaskMode", "Method",
    "ModelError", "Objective", "Pieces", "Profile", "ProtocolError", "RayCluster", "ReceiverInput", "Report",
    "RunResult", "Score", "SenderKV", "ServiceError", "SharedKV", "Task", "WireError", "__version__", "answer",
    "build_methods",
    "build_receiver_input", "calibrate", "encode_context", "encode_ids", "encode_passage",
    "evaluate", "greedy_generate", "load_model",
    "load_pair", "load_task", "make_method", "plot_sweep", "prefill", "print_table", "profile_blocks",
]
