"""Every workload by name (``kvchaos run --workload``)."""

from __future__ import annotations

from .txnworkloads import BankTxnWorkload, LockWorkload
from .workload import WORKLOADS as BASIC
from .workload import Recorder, Workload, WorkloadOptions

__all__ = ["WORKLOADS", "make_workload"]

WORKLOADS: dict[str, type[Workload]] = {**BASIC, "bank": BankTxnWorkload, "lock": LockWorkload}


def make_workload(name: str, opts: WorkloadOptions, rec: Recorder) -> Workload:
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})") from None
    return cls(opts, rec)
