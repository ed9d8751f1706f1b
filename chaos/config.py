"""The settings of one chaos run (`kvchaos run` flags), saved in the run folder as JSON.

Kept apart from `chaos.runner` so that the report can name the type without importing the runner
(the runner imports the report).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunConfig"]


@dataclass
class RunConfig:
    nodes: int = 3
    time: float = 30.0
    nemesis: list[str] = field(default_factory=lambda: ["partition", "kill"])
    workload: str = "register"
    backend: str = "netns"
    seed: int = 0
    out: str = "kvchaos-runs"
    tick_ms: int = 50
    concurrency: int = 5
    rate: float = 150.0
    quiet: float | None = None  # seconds of calm at the end (default: scaled with --time)
    op_timeout: float = 2.0
    fault_min: float | None = None
    fault_max: float | None = None
    stale_reads: bool = False
    keep_data: bool = False
    check_timeout: float = 60.0
    groups: int = 1  # data groups the cluster starts with (kvstore serve --groups)
    moves_timeout: float = 60.0  # after the heal: how long range moves may take to finish
    log_level: str = "info"
    run_id: str = ""
    ports: list[int] = field(default_factory=list)
    learners: int = 0  # read replicas, on hosts nodes+1..nodes+learners
    read_from: str = ""  # read preference of the workload's gets ("": the workload's default)
    read_consistency: str = "linearizable"
    max_staleness: float = 0.5  # bounded reads
    tls: bool = False  # mutual TLS everywhere (`kvchaos run` defaults to it; old run folders were plaintext)
    watchers: int = 0  # the watch workload: watchers through the client library, checked (chaos.watchcheck)
    plant_watch_bug: str = ""  # PLANTED BUG (tests of the watch checks): drop / repeat, see watch_service.py
    watch_timeout: float = 30.0
    image: str = ""  # the container backend's image (kvstore built from docker/Dockerfile)  # after the final reads: how long the watchers may take to reach the end

    @property
    def hosts(self) -> int:
        return self.nodes + self.learners

    def quiet_seconds(self) -> float:
        if self.quiet is not None:
            return self.quiet
        return max(3.0, min(10.0, self.time * 0.2))

    def sharded(self) -> bool:
        """Range moves can happen: check after the heal that they all finished."""
        return self.groups > 1 or "rebalance" in self.nemesis

    def server_env(self) -> dict[str, str]:
        """Environment of the node processes beyond the harness's own (only a planted bug)."""
        from kvstore.server.watch_service import PLANT_ENV

        return {PLANT_ENV: self.plant_watch_bug} if self.plant_watch_bug else {}

    def server_args(self) -> list[str]:
        """kvstore serve flags beyond the ones the cluster always passes."""
        return ["--groups", str(self.groups)] if self.groups != 1 else []

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
