"""Load shedding: refuse new writes while the node cannot keep up, keep serving reads.

Synchronous and clock-free (time comes in as `now`); the asyncio shell feeds it numbers (the
process's resident memory, sampled on a timer) and asks it, per write, with the group's commit
and applied indexes, which the host has at hand.

Two reasons to shed a write, each refused with a definite RESOURCE_EXHAUSTED and a retry-after:
- **apply lag**: the group's applied index is more than `max_apply_lag` entries behind its commit
  index. The log is committed faster than the state machine applies it; a new write would only
  wait longer (and hold memory) behind the backlog. Reads are still served: a linearizable read
  waits for its read index to be applied as it always does, so it never sees stale state.
- **memory**: the last sample of resident memory is at or above `shed_fraction` of
  `memory_limit`. Shedding stops only once memory falls below `resume_fraction` of the limit
  (hysteresis: no flapping at the boundary). Reads are served: they allocate little and free
  it at once, while every accepted write grows the log, the state and the caches.

Invariants: with neither limit configured (`max_apply_lag` 0, `memory_limit` 0) nothing is ever
refused; a refusal happens before the write is proposed (so it definitely did not apply); the
retry-after is positive and bounded by `max_retry_after`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadShedder", "ShedSettings"]


@dataclass(frozen=True, slots=True)
class ShedSettings:
    max_apply_lag: int = 0
    """Refuse writes to a group whose applied index is this many entries behind its commit (0: never)."""
    memory_limit: int = 0
    """Bytes of resident memory the node should stay under (0: no ceiling)."""
    shed_fraction: float = 0.9
    resume_fraction: float = 0.8
    retry_after: float = 0.1
    """The retry-after (seconds) for an apply-lag refusal; memory refusals use twice it."""
    max_retry_after: float = 5.0

    def validate(self) -> None:
        if self.max_apply_lag < 0 or self.memory_limit < 0:
            raise ValueError("--max-apply-lag and --memory-limit must be >= 0")
        if not 0 < self.resume_fraction <= self.shed_fraction <= 1:
            raise ValueError("need 0 < resume_fraction <= shed_fraction <= 1")
        if not 0 < self.retry_after <= self.max_retry_after:
            raise ValueError("need 0 < retry_after <= max_retry_after")

    @property
    def enabled(self) -> bool:
        return self.max_apply_lag > 0 or self.memory_limit > 0


@dataclass(slots=True)
class LoadShedder:
    """The node's shedding state: see the module docstring."""

    settings: ShedSettings = field(default_factory=ShedSettings)
    memory: int = 0
    """The last resident-memory sample, in bytes."""
    memory_shedding: bool = False
    sampled_at: float = 0.0
    refused: dict[str, int] = field(default_factory=lambda: {"apply_lag": 0, "memory": 0})

    def observe_memory(self, rss: int, now: float) -> None:
        """A sample of the process's resident memory (bytes) taken at `now`."""
        self.memory, self.sampled_at = rss, now
        limit = self.settings.memory_limit
        if limit <= 0:
            self.memory_shedding = False
        elif self.memory_shedding:
            self.memory_shedding = rss >= limit * self.settings.resume_fraction
        else:
            self.memory_shedding = rss >= limit * self.settings.shed_fraction

    def write_refusal(self, commit: int, applied: int) -> tuple[str, float] | None:
        """Why a new write to a group with these indexes must be refused and the retry-after
        (seconds), or None to admit it."""
        s = self.settings
        if self.memory_shedding:
            self.refused["memory"] += 1
            return (
                f"memory {self.memory >> 20} MiB is near the node's limit of {s.memory_limit >> 20} MiB",
                min(s.max_retry_after, 2 * s.retry_after),
            )
        lag = commit - applied
        if s.max_apply_lag > 0 and lag > s.max_apply_lag:
            self.refused["apply_lag"] += 1
            # Wait longer the further behind it is: in units of the allowed lag.
            return (
                f"the group's apply is {lag} entries behind its commit (limit {s.max_apply_lag})",
                min(s.max_retry_after, s.retry_after * (lag / s.max_apply_lag)),
            )
        return None
