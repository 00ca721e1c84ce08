"""kvcomm: LLM agents that communicate through their attention KV caches (KVComm, ICLR 2026).

Typical use::

    import kvcomm
    agents = kvcomm.Agents.load("smollm2-135m")
    agents.ask("Mira lives in Oslo.", "Which city does Mira live in?", layers=range(15))
"""

from __future__ import annotations

__version__ = "0.1.0"

from kvcomm.agents import Agents, Batch
from kvcomm.errors import ConfigError, DataError, IncompatibleModelsError, KvcommError, ModelError
from kvcomm.eval import EvalConfig, Report, evaluate, plot_sweep, print_table
from kvcomm.methods import METHODS, Method, build_methods
from kvcomm.models import EMBEDDED, LoadedModel, load_model, load_pair
from kvcomm.protocol import SenderKV, build_receiver_input, greedy_generate, prefill
from kvcomm.selection import Profile, calibrate
from kvcomm.serve.client import Client
from kvcomm.tasks import Item, Task, load_task

__all__ = [
    "EMBEDDED", "METHODS", "Agents", "Batch", "Client", "ConfigError", "DataError", "EvalConfig",
    "IncompatibleModelsError", "Item", "KvcommError", "LoadedModel", "Method", "ModelError", "Profile", "Report",
    "SenderKV", "Task", "__version__", "build_methods", "build_receiver_input", "calibrate", "evaluate",
    "greedy_generate", "load_model", "load_pair", "load_task", "plot_sweep", "prefill", "print_table",
]
