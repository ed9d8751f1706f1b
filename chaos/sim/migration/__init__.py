"""Deterministic simulation of the range-migration protocol under faults:
`python -m chaos.sim.migration --seeds N` (see `sim` for what runs and what is checked)."""

from .sim import MigParams, MigResult, Simulation, run_seed

__all__ = ["MigParams", "MigResult", "Simulation", "run_seed"]
