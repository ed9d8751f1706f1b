"""Read routing (kvstore.client.readpref): preferences, balancing, health. Pure, fake clock."""

from __future__ import annotations

import collections

import pytest

from kvstore.client.readpref import ReplicaRouter, parse_duration
from kvstore.client.routing import Router

EPS = {1: "10.0.0.1:1", 2: "10.0.0.2:1", 3: "10.0.0.3:1", 4: "10.0.0.4:1", 5: "10.0.0.5:1"}
G = 1


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(balancing: str = "round_robin") -> tuple[Router, ReplicaRouter, Clock]:
    clock = Clock()
    router = Router([EPS[1]], breaker_threshold=2, breaker_cooldown=5.0, clock=clock)
    # node 1 answered Admin.Status: it leads; 2, 3 are voters; 4, 5 learners
    router.learn_status(EPS[1], 1, list(EPS.items()), [(G, 1, 3)])
    rr = ReplicaRouter(router, balancing=balancing, behind_cooldown=1.0, clock=clock)
    rr.learn([(G, "leader", 1, 3, [1, 2, 3], [4, 5])])
    return router, rr, clock


def test_parse_duration() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2s") == 2.0
    assert parse_duration("1.5") == 1.5
    assert parse_duration(".25s") == 0.25
    assert parse_duration("1m") == 60.0
    assert parse_duration(0.1) == 0.1
    for bad in ("", "fast", "-1s", "1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_tiers_by_preference() -> None:
    _, rr, _ = make()
    assert rr.tiers(G, "leader") == [[EPS[1]]]
    assert sorted(rr.tiers(G, "nearest")[0]) == sorted(EPS.values())
    assert rr.tiers(G, "replica") == [[EPS[4], EPS[5]], [EPS[2], EPS[3]], [EPS[1]]]
    with pytest.raises(ValueError):
        rr.tiers(G, "anywhere")


def test_round_robin_over_learners_and_fallback_tiers() -> None:
    _, rr, _ = make("round_robin")
    picks = collections.Counter(rr.pick(G, "replica") for _ in range(100))
    assert picks == {EPS[4]: 50, EPS[5]: 50}
    # Learners excluded (already tried in this operation): followers, then the leader.
    assert rr.pick(G, "replica", exclude=[EPS[4], EPS[5]]) in (EPS[2], EPS[3])
    assert rr.pick(G, "replica", exclude=[EPS[2], EPS[3], EPS[4], EPS[5]]) == EPS[1]
    assert rr.pick(G, "replica", exclude=list(EPS.values())) is None


def test_least_outstanding_prefers_idle_endpoints() -> None:
    _, rr, _ = make("least_outstanding")
    first = rr.pick(G, "replica")
    assert first is not None
    rr.begin(first)
    second = rr.pick(G, "replica")
    assert second is not None and second != first
    rr.begin(second)
    rr.begin(second)
    assert rr.pick(G, "replica") == first  # 1 outstanding < 2
    rr.end(second)
    rr.end(second)
    assert rr.outstanding(second) == 0
    assert rr.pick(G, "replica") == second


def test_dead_replica_is_skipped_then_retried_after_the_cooldown() -> None:
    router, rr, clock = make("round_robin")
    for _ in range(2):  # threshold 2: the breaker opens
        router.on_transport_failure(G, EPS[4], "connection refused")
    assert {rr.pick(G, "replica") for _ in range(10)} == {EPS[5]}
    clock.t += 5.0  # cooldown over: one probe goes through
    picks = [rr.pick(G, "replica") for _ in range(6)]
    assert picks.count(EPS[4]) == 1
    router.on_reply(EPS[4])  # the probe succeeded: back in rotation
    assert collections.Counter(rr.pick(G, "replica") for _ in range(10)) == {EPS[4]: 5, EPS[5]: 5}


def test_stale_replica_is_skipped_for_its_cooldown() -> None:
    _, rr, clock = make("round_robin")
    rr.mark_behind(G, EPS[4])
    assert {rr.pick(G, "replica") for _ in range(10)} == {EPS[5]}
    rr.mark_behind(G, EPS[5])
    assert rr.pick(G, "replica") in (EPS[2], EPS[3])  # learners behind: followers
    clock.t += 1.0
    assert {rr.pick(G, "replica") for _ in range(10)} == {EPS[4], EPS[5]}


def test_membership_from_the_highest_term_and_the_leader() -> None:
    _, rr, _ = make()
    rr.learn([(G, "follower", 0, 2, [1, 2, 3], [])])  # older term: ignored
    assert rr.members(G).learners == (4, 5)  # type: ignore[union-attr]
    rr.learn([(G, "follower", 1, 3, [1, 2, 3], [4])])  # same term, not the leader: ignored
    assert rr.members(G).learners == (4, 5)  # type: ignore[union-attr]
    rr.learn([(G, "leader", 1, 3, [1, 2, 3, 4], [5])])  # the leader's view: 4 was promoted
    assert rr.tiers(G, "replica")[0] == [EPS[5]]
    rr.learn([(G, "follower", 2, 4, [1, 2, 3, 4], [5])])  # newer term from anyone
    assert rr.members(G).leader_id == 2  # type: ignore[union-attr]
