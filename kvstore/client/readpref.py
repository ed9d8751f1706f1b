"""Read routing across replicas: read preference, load balancing and endpoint health.

Writes always go to the leader (:class:`~kvstore.client.routing.Router`). Reads may go elsewhere,
per request or per client:

- ``leader`` (default): the leader serves every read.
- ``nearest``: any member (leader, followers, learners), load balanced.
- ``replica``: the read replicas (learners) first, then the followers; the leader only when no
  replica can serve the read.

Within the first tier that has an eligible endpoint, the balancer picks one: ``round_robin``, or
``least_outstanding`` (fewest requests in flight from this client; ties in round-robin order).

Health: an endpoint whose circuit breaker is open (consecutive transport failures, shared with
the leader router) is skipped until its cooldown lets one probe request through; an endpoint that
answered STALE_REPLICA (cut off from the leader, or behind more than the requested staleness) is
skipped for that group for ``behind_cooldown`` seconds.

Membership (which node ids are voters and learners of a group, and where they are) is learned
from Admin.Status answers; the client refreshes it every few seconds while it reads from replicas.

Plain synchronous code with an injectable clock: the asyncio client drives it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.client.retry import Clock
from kvstore.client.routing import Router

__all__ = [
    "LOAD_BALANCING",
    "READ_PREFERENCES",
    "GroupMembers",
    "ReplicaRouter",
    "parse_duration",
]

READ_PREFERENCES = ("leader", "nearest", "replica")
LOAD_BALANCING = ("round_robin", "least_outstanding")

DEFAULT_BEHIND_COOLDOWN = 1.0
#: Re-learn the membership at most this often while reading from replicas.
MEMBERS_REFRESH = 5.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|m)?\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """``"500ms"``, ``"2s"``, ``"1.5"`` (seconds), ``0.25`` -> seconds. Raises ValueError."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"not a duration: {value!r} (e.g. 500ms, 2s, 1.5)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    return seconds


@dataclass(slots=True)
class GroupMembers:
    """One group's configuration as last reported (by the answer with the highest term)."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    leader_id: int = 0
    term: int = 0


class ReplicaRouter:
    """Chooses the endpoint of a read that need not go to the leader."""

    def __init__(
        self,
        router: Router,
        *,
        balancing: str = "least_outstanding",
        behind_cooldown: float = DEFAULT_BEHIND_COOLDOWN,
        clock: Clock = time.monotonic,
    ) -> None:
        if balancing not in LOAD_BALANCING:
            raise ValueError(f"load balancing must be one of {', '.join(LOAD_BALANCING)}, not {balancing!r}")
        self.router = router
        self.balancing = balancing
        self.behind_cooldown = behind_cooldown
        self._clock = clock
        self._members: dict[int, GroupMembers] = {}
        self._outstanding: dict[str, int] = {}
        self._behind: dict[tuple[int, str], float] = {}  # (group, endpoint) -> skip until
        self._rr = 0
        self.last_refresh = float("-inf")
        #: Reads served per endpoint (for tests, benchmarks and curious users).
        self.served: dict[str, int] = {}

    # ----- learning -----

    def learn(self, groups: Iterable[tuple[int, str, int, int, Sequence[int], Sequence[int]]]) -> None:
        """An Admin.Status answer: ``groups`` are ``(group, role of the answering node, leader_id,
        term, voters, learners)``. A higher term wins; at the same term the leader's own view wins
        (it has the latest configuration)."""
        for group, role, leader_id, term, voters, learners in groups:
            cur = self._members.get(group)
            if cur is not None and (term < cur.term or (term == cur.term and role != "leader" and cur.voters)):
                continue
            self._members[group] = GroupMembers(tuple(sorted(voters)), tuple(sorted(learners)), leader_id, term)

    def members(self, group: int) -> GroupMembers | None:
        return self._members.get(group)

    def knows(self, group: int) -> bool:
        m = self._members.get(group)
        return m is not None and bool(m.voters)

    # ----- choosing -----

    def _addresses(self, ids: Iterable[int]) -> list[str]:
        out = []
        for nid in ids:
            addr = self.router.address_of(nid)
            if addr is not None and addr not in out:
                out.append(addr)
        return out

    def leader_endpoint(self, group: int) -> str | None:
        ep = self.router.leader(group)
        if ep is not None:
            return ep
        m = self._members.get(group)
        if m is not None and m.leader_id:
            return self.router.address_of(m.leader_id)
        return None

    def tiers(self, group: int, preference: str) -> list[list[str]]:
        """Endpoints in order of preference: the first tier with an eligible endpoint is used."""
        leader = self.leader_endpoint(group)
        m = self._members.get(group)
        if m is None or not m.voters:
            everyone = list(self.router.endpoints)  # membership unknown: every endpoint we know
        else:
            everyone = self._addresses(m.voters + m.learners)
        if preference == "leader":
            return [[leader]] if leader is not None else [everyone]
        if preference == "nearest":
            return [everyone]
        if preference == "replica":
            learners = self._addresses(m.learners) if m is not None else []
            followers = [ep for ep in everyone if ep != leader and ep not in learners]
            return [learners, followers, [leader] if leader is not None else []]
        raise ValueError(f"read preference must be one of {', '.join(READ_PREFERENCES)}, not {preference!r}")

    def eligible(self, group: int, endpoint: str) -> bool:
        until = self._behind.get((group, endpoint))
        if until is not None:
            if self._clock() < until:
                return False
            del self._behind[(group, endpoint)]
        return self.router.breaker(endpoint).would_allow()

    def pick(self, group: int, preference: str, exclude: Iterable[str] = ()) -> str | None:
        """The endpoint for the next attempt of a read, or None if no endpoint is eligible."""
        skip = set(exclude)
        for tier in self.tiers(group, preference):
            cands = [ep for ep in tier if ep not in skip and self.eligible(group, self.router.add_endpoint(ep))]
            if not cands:
                continue
            ep = self._choose(cands)
            self.router.breaker(ep).allow()  # in HALF_OPEN this reserves the probe
            return ep
        return None

    def _choose(self, cands: list[str]) -> str:
        self._rr += 1
        if self.balancing == "least_outstanding":
            low = min(self._outstanding.get(ep, 0) for ep in cands)
            cands = [ep for ep in cands if self._outstanding.get(ep, 0) == low]
        return cands[self._rr % len(cands)]

    # ----- feedback -----

    def begin(self, endpoint: str) -> None:
        self._outstanding[endpoint] = self._outstanding.get(endpoint, 0) + 1

    def end(self, endpoint: str) -> None:
        n = self._outstanding.get(endpoint, 0) - 1
        if n > 0:
            self._outstanding[endpoint] = n
        else:
            self._outstanding.pop(endpoint, None)

    def record_served(self, endpoint: str) -> None:
        self.served[endpoint] = self.served.get(endpoint, 0) + 1

    def outstanding(self, endpoint: str) -> int:
        return self._outstanding.get(endpoint, 0)

    def mark_behind(self, group: int, endpoint: str) -> None:
        """``endpoint`` answered STALE_REPLICA: skip it for this group for a while."""
        self._behind[(group, endpoint)] = self._clock() + self.behind_cooldown

    def needs_refresh(self, group: int) -> bool:
        return not self.knows(group) or self._clock() - self.last_refresh >= MEMBERS_REFRESH
