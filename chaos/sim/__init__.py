"""Deterministic simulation of the kvstore Raft core: `python -m chaos.sim --seeds N`."""

from .invariants import SafetyChecker, SafetyViolation
from .simulator import SimParams, SimResult, Simulation, run_seed

__all__ = ["SafetyChecker", "SafetyViolation", "SimParams", "SimResult", "Simulation", "run_seed"]
