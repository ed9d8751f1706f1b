"""Multi-key transactions in the whole-node simulator, checked for atomicity.

A few key *pairs* are chosen at the start so that the shard map puts both keys of a pair in one
group. Clients then run transactions (TXN commands through the real nodes' Raft groups, under
the simulator's faults and range moves) that only ever keep a pair's two keys equal:

- write: put both keys to one fresh value;
- delete: delete both;
- conditional: if the first key exists, put both to a fresh value, else get both;
- read: get both.

Checked: every answered transaction that read the pair saw both keys equal (both absent, or the
same value), whichever branch ran; and every write's revision is the one revision of all its
writes (the revision checker, `revisions.py`, records each transaction's writes at its result's
revision and checks that revision against the group's apply order; closed reads and watches then
check their answers against those writes). A write that was partly applied, or applied at two
revisions, or a read between a transaction's writes, shows up as a pair that differs.

Some pairs (`CROSS_PAIRS`) have their keys in two groups: their transactions run the two-phase
commit across groups, with coordinator crashes (`xtxn_pairs.py`), and are checked the same way.
Their deletes are range deletes of the pair's prefix over every group: alone, or inside a
transaction (if the first key exists: a DELETE_RANGE, then GETs of both keys, which must read
them absent, or the DELETE_RANGE alone, so the second key is not named but found by the range;
else GETs of both), whose COMMITs the revision checker records as deletes of every key each
group prepared in the range (so closed scans and watches check them).

The transactions carry no session (a retry may apply twice: harmless here, each keeps the pair
equal) and are not part of the linearizability history. A one-group pair split by a range move
is refused (WRONG_SHARD: it is sent as a one-group TXN), so these operations make no liveness
claim. `python -m chaos.sim` runs them on a fixed fifth of the seeds
(`txn_pairs_by_default`), from their own random stream (`--txn-pairs on|off` forces them); the
library's default is off, so the seeds tests pin replay as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore import errors
from kvstore.storage import commands, txn
from kvstore.storage.commands import ApplyResult

from .xtxn_pairs import CrossPairs

PAIRS = 3
CROSS_PAIRS = 2
CROSS_RETRIES = 4
RETRIES = 8
IN_FLIGHT = 4
"""The most pair transactions in flight at once: the workload is a few clients, each waiting for
its transaction's end before the next (closed loop). An open loop (a new one every 100-400 ms
whatever happened to the last) overloads the groups the simulator keeps slowest (one entry per
append, one append in flight, 2-20 ms hops: ~35 entries a second): every transaction across
groups is four proposals or more per group, its retries more, and the backlog grew until the
plain clients' writes after the heal timed out (issue 17: `--txn-pairs ranges`, seeds 20, 28)."""


class TxnPairViolation(AssertionError):
    """A transaction saw a pair's two keys differ: transactions are not atomic."""


def txn_pairs_by_default(seed: int) -> bool:
    """Whether a seed runs the pair transactions: a fixed fifth of the seeds, decided apart from
    the seed's own random stream."""
    return random.Random(f"txnpairs:{seed}").random() < 0.2


@dataclass(slots=True)
class TxnPairStats:
    issued: int = 0
    answered: int = 0
    reads_checked: int = 0
    writes: int = 0
    refused: int = 0
    """Refused or unanswered after the retries (a split pair, a down leader...)."""
    cross_answered: int = 0
    """Answered transactions of pairs across groups (two-phase commit)."""
    cross_died: int = 0
    """Cross-group attempts whose coordinator died (left its intents to resolvers)."""
    cross_resolved: int = 0
    """Intents resolved by a later attempt that met them."""
    cross_finished: int = 0
    """COMMITTED records the record sweep finished (coordinator died before its FINALIZE)."""
    cross_released: int = 0
    """Attempts whose RECORD was refused for certain: their intents released at once."""
    range_deletes: int = 0
    """Answered range deletes of a cross pair's prefix (both keys at one revision)."""
    txn_range_deletes: int = 0
    """Answered transactions that ran a range delete of a cross pair's prefix (then read both)."""


class TxnPairs:
    def __init__(self, sim: Any, ranges: bool = False) -> None:
        self.sim = sim
        self.ranges = ranges
        """Range-delete heavy (`--txn-pairs ranges`): the pairs across groups only, a third of
        their operations a transaction with a range delete of the pair's prefix."""
        self.rng = random.Random(f"txnpairs-run:{sim.seed}")
        self.pairs: list[tuple[bytes, bytes]] = []
        self.cross: dict[bytes, dict[bytes, int]] = {}
        """First key of a pair across groups -> both keys' groups (when the pair was chosen)."""
        self.cross_driver = CrossPairs(self)
        self.stats = TxnPairStats()
        self.refusals: dict[str, int] = {}
        self._value = 0
        self.in_flight = 0
        """Pair transactions issued and not over (`IN_FLIGHT` bounds it)."""

    def start(self) -> None:
        self.sim.at(self.rng.randrange(100, 300), self._next)
        self.cross_driver.start_sweep()

    def _choose_pairs(self) -> bool:
        for n in sorted(self.sim.nodes.values(), key=lambda n: n.id):
            smap = n.logic.shard_tracker.map if n.logic is not None else None
            if smap is None:
                continue
            for i in range(PAIRS):
                a = b"pair%d/a" % i
                g = smap.group_for_key(a)
                b = next(k for j in range(10_000) if smap.group_for_key(k := b"pair%d/b%d" % (i, j)) == g)
                self.pairs.append((a, b))
            for i in range(CROSS_PAIRS):
                a = b"xpair%d/a" % i
                g = smap.group_for_key(a)
                other = (k for j in range(1_000) if smap.group_for_key(k := b"xpair%d/b%d" % (i, j)) != g)
                found = next(other, None)
                if found is None:  # one data group: no pair across groups
                    break
                b = found
                self.pairs.append((a, b))
                self.cross[a] = {a: g, b: smap.group_for_key(b)}
            return True
        return False

    def _next(self) -> None:
        sim = self.sim
        if sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms:
            return
        rng = self.rng
        if sim.quiet is not None and (wait := sim.quiet.clients_wait()):  # the clients go idle too
            sim.at(min(wait, 100) + rng.randrange(0, 30), self._next)
            return
        if not self.pairs and not self._choose_pairs():
            sim.at(rng.randrange(50, 150), self._next)
            return
        if self.in_flight >= IN_FLIGHT:  # closed loop: wait for one to end
            sim.at(rng.randrange(20, 60), self._next)
            return
        a, b = rng.choice([p for p in self.pairs if p[0] in self.cross] or self.pairs if self.ranges else self.pairs)
        r = rng.random()
        self._value += 1
        v = b"t%d" % self._value
        put, get, delete = txn.OpKind.PUT, txn.OpKind.GET, txn.OpKind.DELETE
        if r < 0.35:
            t = txn.Txn((), (txn.TxnOp(put, a, v), txn.TxnOp(put, b, v)))
        elif r < 0.45:
            t = txn.Txn((), (txn.TxnOp(delete, a), txn.TxnOp(delete, b)))
        elif r < 0.7:
            t = txn.Txn(
                (txn.Compare(a, txn.Target.VERSION, txn.CmpResult.GREATER, b"", 0),),
                (txn.TxnOp(put, a, v), txn.TxnOp(put, b, v), txn.TxnOp(get, b), txn.TxnOp(get, a)),
                (txn.TxnOp(get, a), txn.TxnOp(get, b)),
            )
        else:
            t = txn.Txn((), (txn.TxnOp(get, a), txn.TxnOp(get, b)))
        self.stats.issued += 1
        self.in_flight += 1
        members = [n for n in sim.nodes.values() if not n.removed]
        if a in self.cross:
            prefix = a[:a.index(b"/") + 1]
            if 0.35 <= r < 0.40:  # a pair delete: a range delete of the pair's prefix
                self._cross_attempt(None, self.cross[a], 0, (prefix, prefix[:-1] + b"0"), self._ended)
            elif 0.40 <= r < (0.75 if self.ranges else 0.45):  # a pair delete inside a transaction
                rd = txn.TxnOp(txn.OpKind.DELETE_RANGE, prefix, end=prefix[:-1] + b"0")
                half = 0.575 if self.ranges else 0.425
                then = (rd, txn.TxnOp(get, a), txn.TxnOp(get, b)) if r < half else (rd,)  # b named, or found
                t = txn.Txn((txn.Compare(a, txn.Target.VERSION, txn.CmpResult.GREATER, b"", 0),),
                            then, (txn.TxnOp(get, a), txn.TxnOp(get, b)))
                self._cross_attempt(t, self.cross[a], 0, ended=self._ended)
            else:
                self._cross_attempt(t, self.cross[a], 0, ended=self._ended)
        else:
            self._attempt(rng.choice(members), a, t, 0)
        sim.at(rng.randrange(100, 400), self._next)  # light: small appends replicate slowly

    def _ended(self) -> None:
        """A pair transaction is over (answered, refused, or its outcome left to the resolvers)."""
        self.in_flight -= 1

    def _attempt(self, node: Any, a: bytes, t: txn.Txn, n: int) -> None:
        sim = self.sim
        data = commands.encode_command(commands.Command.transaction(t, revision=sim._clock(node).propose()))
        done = False

        def outcome(res: ApplyResult | None, err: errors.KVError | None, lead: int) -> None:
            nonlocal done
            if done:
                return
            done = True
            if err is None and res is not None and res.txn is not None and not res.error:
                self.stats.answered += 1
                self._ended()
                self._check(t, res.txn, res.revision)
                return
            if n >= RETRIES:
                self._ended()
                self.stats.refused += 1
                why = type(err).__name__ if err is not None else (res.error or "refused") if res is not None else "no result"
                self.refusals[why] = self.refusals.get(why, 0) + 1
                return
            nxt = sim.nodes.get(lead) if lead and lead != node.id else None
            if nxt is None or nxt.removed:
                nxt = self.rng.choice([x for x in sim.nodes.values() if not x.removed])
            sim.at(self.rng.randrange(5, 40), self._attempt, nxt, a, t, n + 1)

        def lost() -> None:
            if not done:
                outcome(None, errors.Timeout("attempt timed out", indeterminate=True), 0)

        sim.at(sim.p.client_timeout_ms, lost)
        sim._write(node, a, data, outcome)

    def cross_attempt(self, t: txn.Txn, groups: dict[bytes, int], n: int) -> None:
        """Run transaction `t` over `groups` (key -> group) as a cross-group transaction, retried
        like a pair's (the lease workload's rewrite of a lease's key); its answer is checked as a
        pair transaction's (a transaction without GETs: its writes at one revision)."""
        self._cross_attempt(t, groups, n)

    def _cross_attempt(self, t: txn.Txn | None, groups: dict[bytes, int], n: int,
                       lock: tuple[bytes, bytes] | None = None, ended: Callable[[], None] | None = None) -> None:
        """Attempt `n` of a transaction across groups; `ended()` once it is over (`CrossPairs.attempt`)."""
        sim = self.sim
        live = [x for x in sim.nodes.values() if not x.removed and x.logic is not None]
        late = sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms
        if n > CROSS_RETRIES or not live or late or (sim.quiet is not None and sim.quiet.clients_wait()):
            if ended is not None:
                ended()
            self.stats.refused += 1
            self.refusals["cross-group attempts exhausted"] = self.refusals.get("cross-group attempts exhausted", 0) + 1
            return
        d = self.cross_driver

        def retry(m: int) -> None:
            # backoff: each attempt is four proposals or more, on groups the simulator keeps slow
            self.sim.at(self.rng.randrange(100, 400) * m, self._cross_attempt, t, groups, m, lock, ended)

        node = self.rng.choice(live)
        smap = node.logic.shard_tracker.map
        if smap is not None:  # the coordinator routes by its own map (ranges move)
            groups = {k: smap.group_for_key(k) for k in groups}
        d.attempt(node, t, groups, n, retry, lock, ended=ended)
        self.stats.cross_died, self.stats.cross_resolved, self.stats.cross_finished = d.died, d.resolved, d.finished
        self.stats.cross_released = d.released

    def finished_record(self) -> None:
        """The record sweep finished a record (`CrossPairs._finish`)."""
        self.stats.cross_finished = self.cross_driver.finished

    def answered_cross(self, t: txn.Txn | None, r: txn.TxnResult, revision: int) -> None:
        """A cross-group transaction's answer (from `xtxn_pairs.CrossPairs`; `t` None: a range
        delete of a pair's prefix, which deleted at most the pair's two keys, at one revision)."""
        self.stats.answered += 1
        self.stats.cross_answered += 1
        d = self.cross_driver
        self.stats.cross_died, self.stats.cross_resolved, self.stats.cross_finished = d.died, d.resolved, d.finished
        self.stats.cross_released = d.released
        if t is None:
            self.stats.range_deletes += 1
            if len(r.responses) > 2 or bool(r.responses) != bool(revision) or r.revision != revision:
                raise TxnPairViolation(f"a range delete of a pair answered {len(r.responses)} deletes at {revision}")
            return
        self._check(t, r, revision)

    def _check(self, t: txn.Txn, r: txn.TxnResult, revision: int) -> None:
        """The branch that ran read both keys of the pair equal (each GET of `a` and of `b`,
        wherever it stood: a GET after the transaction's own PUT sees the new value)."""
        ops = t.success if r.succeeded else t.failure
        seen: dict[bytes, tuple[bool, bytes]] = {}
        for op, o in zip(ops, r.responses, strict=True):
            if op.kind == txn.OpKind.GET:
                seen[op.key] = (o.found, o.value)
        ranges = [o.deleted for o in r.responses if o.kind == txn.OpKind.DELETE_RANGE]
        if ranges:
            self.stats.txn_range_deletes += 1
            if any(d > 2 for d in ranges) or bool(sum(ranges)) != bool(revision):
                raise TxnPairViolation(f"a transaction's range delete of a pair deleted {ranges} at {revision}")
        if ranges or txn.writes_of(t, r):
            self.stats.writes += 1
            if r.revision != revision or not revision:
                raise TxnPairViolation(f"a transaction that wrote answered revision {revision}, its result {r.revision}")
        if len(seen) == 2:
            self.stats.reads_checked += 1
            (ka, va), (kb, vb) = seen.items()
            if va != vb:
                raise TxnPairViolation(
                    f"transaction {t} saw {ka!r} = {va} and {kb!r} = {vb} (at {self.sim.now} ms): not atomic"
                )
