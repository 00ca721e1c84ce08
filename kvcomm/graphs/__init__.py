"""Agent graphs: several agents of one model, several rounds, turns passed as KV or as text."""

from kvcomm.graphs.anchors import AnchorOptions
from kvcomm.graphs.graph import AgentRow, EdgeOptions, Graph, GraphItem, GraphReport, GraphRun
from kvcomm.graphs.topology import DECISION, TOPOLOGIES, Step, TopologyName, Turn, unroll

__all__ = [
    "DECISION", "TOPOLOGIES", "AgentRow", "AnchorOptions", "EdgeOptions", "Graph", "GraphItem", "GraphReport",
    "GraphRun", "Step", "TopologyName", "Turn", "unroll",
]
