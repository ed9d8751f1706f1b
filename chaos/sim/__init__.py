"""Deterministic simulation of whole kvstore nodes: `python -m chaos.sim --seeds N` (see `nodes.py`)."""

from .invariants import SafetyChecker, SafetyViolation
from .nodes import NodeSimParams, NodeSimResult, NodeSimulation, run_node_seed
from .quiet import QuiesceStats, quiesce_by_default

__all__ = [
    "NodeSimParams", "NodeSimResult", "NodeSimulation", "QuiesceStats", "SafetyChecker", "SafetyViolation",
    "quiesce_by_default", "run_node_seed",
]
