"""General transactions in the whole-node simulator, checked for strict serializability against a
sequential model.

Clients send random etcd-shaped transactions over a small private key set (`gtx/...`: no other
workload writes these keys): up to two compares (value, version, create revision, mod revision;
`create = 0` is the absence test) and then/else lists of PUT (a value unique to the transaction),
DELETE and GET. Keys `gtx/a*` share one group: their transactions take the one-group TXN fast path;
the others mix in keys `gtx/b*` of other groups and run the two-phase commit across groups with
coordinator deaths (the driver of `xtxn_pairs.py`). (The TXN has no delete-range operation; the
pair workload checks range deletes.)

The model is the applied history of these keys that the revision checker keeps (`revisions.py`:
every TXN's and every cross-group COMMIT's writes at their revision, once, whoever answered),
replayed in revision order on a sequential key-value state with etcd's metadata (create revision,
mod revision, version). A committed transaction (its RECORD applied) whose COMMIT some group has
not applied yet still holds its intent there: no reader of that group answers at or above the
intent's prepared revision (below R) until a resolver or the record sweep applies the COMMIT, so
its writes are in the history every reader sees, but not yet in the applied one. A run that ends
so (a coordinator gave up a COMMIT late in the run: seed 3919, 5 nodes, where the last try met
NotLeader after the heal) goes on once for `SETTLE_MS` and twice the largest clock offset
(`NodeSimulation._extend_for_txns`), and
the record sweep finishes it; a COMMIT still missing then is reported like any half-applied
transaction. Checked at the end (`TxnModelViolation`):

- every answered transaction that wrote has one revision R: evaluating it (`txn.evaluate`, the
  reference semantics) on the model state just before R gives exactly its answer (which branch
  ran, every value, version, create and mod revision it read) and exactly the writes the history
  has at R;
- every answered read-only transaction reads one state: its answer equals the model's evaluation
  at some revision (a segment between two changes of its keys);
- every write set in the history (answered or not: an unanswered transaction may or may not have
  committed) is explained by an issued transaction evaluated at its revision (found by the unique
  values it puts; a delete-only write set, among the transactions that delete those keys);
- real time (strict serializability), for two answered transactions sharing a key, A answered
  before B started: B's revision is above A's (a read-only one: one of the segments it may have
  read at ends after A's revision; read-only A: one of its segments starts before B's revision).

Transactions carry no session: a one-group retry may apply twice (both applications are in the
history and each is explained). `python -m chaos.sim` runs them on a fixed fraction of the seeds
(`txn_model_by_default`, from their own random stream; `--txns on|off` forces them); the library's
default is off, so the seeds tests pin replay as before. A planted TXN that evaluates its compares on
a stale read of the key (`node-txn-stale-compare`) is found.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from kvstore import errors
from kvstore.storage import commands, txn
from kvstore.storage.commands import ApplyResult

from .xtxn_pairs import CrossPairs

PREFIX = b"gtx/"
LOCAL_KEYS = 3
"""Keys of one group (one-group transactions)."""
REMOTE_KEYS = 3
"""Keys of other groups (with local ones: cross-group transactions)."""
CROSS = 0.35
"""The share of transactions spanning groups."""
RETRIES = 8
CROSS_RETRIES = 4
FRACTION = 0.15
"""The share of seeds `python -m chaos.sim` runs them on."""
SETTLE_MS = 2_000
"""How much longer a run goes on when it ends while one of these transactions still holds an
intent (`TxnModel.unfinished`), beyond twice the largest clock offset (`NodeSimParams.
clock_offset_ms`: the intent expires `xtxn_pairs.TIMEOUT_MS` after the transaction's start by the
clock of the group leader that meets it, which may run that far behind the coordinator's): the
next sweep round (`xtxn_pairs.SWEEP_MS`) resolves it, and a RESOLVE and a COMMIT each take up to
~800 ms on the slowest groups."""


_PREFIX_END = PREFIX[:-1] + bytes([PREFIX[-1] + 1])


class TxnModelViolation(AssertionError):
    """A transaction's answer or writes match no serial order of the applied history."""


def txn_model_by_default(seed: int) -> bool:
    """Whether a seed runs the general transactions: a fixed share of the seeds, decided apart
    from the seed's own random stream."""
    return random.Random(f"txnmodel:{seed}").random() < FRACTION


@dataclass(slots=True)
class TxnModelStats:
    issued: int = 0
    answered: int = 0
    writers_checked: int = 0
    """Answered transactions that wrote, checked at their revision."""
    readers_checked: int = 0
    """Answered read-only transactions, checked at some state of their keys."""
    failed_branch: int = 0
    """Answered transactions whose compares did not hold (the else branch ran)."""
    cross_answered: int = 0
    unanswered_committed: int = 0
    """Write sets in the history of no answered transaction (explained by an issued one)."""
    realtime_pairs: int = 0
    refused: int = 0
    settled: int = 0
    """1 if the run went on `SETTLE_MS` for a transaction that still held an intent at its end."""


@dataclass(slots=True)
class _Answer:
    t: txn.Txn
    result: txn.TxnResult
    revision: int
    start: int
    end: int
    keys: frozenset[bytes]
    segments: list[tuple[int, int]] = field(default_factory=list)
    """A read-only one: the [lo, hi) revision segments whose state gives its answer."""


State = dict[bytes, txn.Current]


class TxnModel:
    """The workload and its check (`check_end`); the driver of the cross-group ones is a
    `CrossPairs` (which calls `answered_cross`)."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.rng = random.Random(f"txnmodel-run:{sim.seed}")
        self.local: list[bytes] = []
        self.remote: list[bytes] = []
        self.issued: dict[int, txn.Txn] = {}
        self.started: dict[int, int] = {}
        """id(t) -> the issue time (first attempt)."""
        self.numbers: dict[int, int] = {}
        self.answers: list[_Answer] = []
        self.stats = TxnModelStats()
        self.refusals: dict[str, int] = {}
        self.cross_driver = CrossPairs(self)
        self._n = 0
        self._seen_mod: dict[bytes, int] = {}
        self._seen_value: dict[bytes, bytes] = {}

    def start(self) -> None:
        self.sim.at(self.rng.randrange(100, 300), self._next)
        if self.sim.txn_pairs is None:  # else its driver sweeps the expired intents already
            self.cross_driver.start_sweep()

    def _choose_keys(self) -> bool:
        for n in sorted(self.sim.nodes.values(), key=lambda n: n.id):
            smap = n.logic.shard_tracker.map if n.logic is not None else None
            if smap is None:
                continue
            g = smap.group_for_key(PREFIX + b"a0")
            for j in range(10_000):
                k = PREFIX + b"a%d" % j
                if smap.group_for_key(k) == g:
                    self.local.append(k)
                    if len(self.local) == LOCAL_KEYS:
                        break
            for j in range(10_000):
                k = PREFIX + b"b%d" % j
                if smap.group_for_key(k) != g:
                    self.remote.append(k)
                    if len(self.remote) == REMOTE_KEYS:
                        break
            return True
        return False

    # --- generating ------------------------------------------------------------------------
    def _compare(self, key: bytes) -> txn.Compare:
        rng = self.rng
        r = rng.random()
        res = rng.choice(list(txn.CmpResult))
        if r < 0.3:
            v = self._seen_value.get(key, b"none") if rng.random() < 0.7 else b"g0.0"
            return txn.Compare(key, txn.Target.VALUE, res, v)
        if r < 0.55:
            return txn.Compare(key, txn.Target.VERSION, res, b"", rng.randrange(0, 4))
        if r < 0.8:
            num = 0 if rng.random() < 0.6 else self._seen_mod.get(key, 0)
            return txn.Compare(key, txn.Target.CREATE, rng.choice((txn.CmpResult.EQUAL, res)), b"", num)
        return txn.Compare(key, txn.Target.MOD, res, b"", self._seen_mod.get(key, 0))

    def _branch(self, keys: list[bytes], n: int, tag: int) -> tuple[txn.TxnOp, ...]:
        rng = self.rng
        ops: list[txn.TxnOp] = []
        written: set[bytes] = set()
        for i in range(n):
            k = rng.choice(keys)
            r = rng.random()
            if r < 0.4 and k not in written:
                written.add(k)
                ops.append(txn.TxnOp(txn.OpKind.PUT, k, b"g%d.%d" % (tag, i)))
            elif r < 0.55 and k not in written:
                written.add(k)
                ops.append(txn.TxnOp(txn.OpKind.DELETE, k))
            else:
                ops.append(txn.TxnOp(txn.OpKind.GET, k))
        return tuple(ops)

    def _make(self, keys: list[bytes], tag: int) -> txn.Txn:
        rng = self.rng
        cmps = tuple(self._compare(rng.choice(keys)) for _ in range(rng.choice((0, 1, 1, 2))))
        t = txn.Txn(cmps, self._branch(keys, rng.randrange(1, 4), tag), self._branch(keys, rng.randrange(0, 3), tag))
        txn.check_txn(t)
        return t

    def _next(self) -> None:
        sim = self.sim
        if sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms:
            return
        rng = self.rng
        if sim.quiet is not None and (wait := sim.quiet.clients_wait()):
            sim.at(min(wait, 100) + rng.randrange(0, 30), self._next)
            return
        if not self.local and not self._choose_keys():
            sim.at(rng.randrange(50, 150), self._next)
            return
        self._n += 1
        cross = bool(self.remote) and rng.random() < CROSS
        keys = self.local + self.remote if cross else self.local
        t = self._make(keys, self._n)
        self.issued[self._n] = t
        self.numbers[id(t)] = self._n
        self.started[id(t)] = sim.now
        self.stats.issued += 1
        if cross:
            self._cross_attempt(t, 0)
        else:
            self._attempt(rng.choice([n for n in sim.nodes.values() if not n.removed]), t, 0)
        sim.at(rng.randrange(100, 400), self._next)

    # --- sending -----------------------------------------------------------------------------
    def _refused(self, why: str) -> None:
        self.stats.refused += 1
        self.refusals[why] = self.refusals.get(why, 0) + 1

    def _attempt(self, node: Any, t: txn.Txn, n: int) -> None:
        """The one-group fast path: a TXN command at `node` (following leader hints)."""
        sim = self.sim
        key = next(k for k, _ in txn.keys_of(t))
        data = commands.encode_command(commands.Command.transaction(t, revision=sim._clock(node).propose()))
        done = False

        def outcome(res: ApplyResult | None, err: errors.KVError | None, lead: int) -> None:
            nonlocal done
            if done:
                return
            done = True
            if err is None and res is not None and res.txn is not None and not res.error:
                self._answered(t, res.txn, res.revision)
                return
            if n >= RETRIES:
                why = type(err).__name__ if err is not None else (res.error or "refused") if res is not None else "none"
                self._refused(why)
                return
            nxt = sim.nodes.get(lead) if lead and lead != node.id else None
            if nxt is None or nxt.removed:
                nxt = self.rng.choice([x for x in sim.nodes.values() if not x.removed])
            sim.at(self.rng.randrange(5, 40), self._attempt, nxt, t, n + 1)

        def lost() -> None:
            if not done:
                outcome(None, errors.Timeout("attempt timed out", indeterminate=True), 0)

        sim.at(sim.p.client_timeout_ms // 4, lost)
        sim._write(node, key, data, outcome)

    def _cross_attempt(self, t: txn.Txn, n: int) -> None:
        sim = self.sim
        live = [x for x in sim.nodes.values() if not x.removed and x.logic is not None]
        late = sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms
        if n > CROSS_RETRIES or not live or late or (sim.quiet is not None and sim.quiet.clients_wait()):
            self._refused("cross-group attempts exhausted")
            return
        node = self.rng.choice(live)
        smap = node.logic.shard_tracker.map
        if smap is None:
            sim.at(self.rng.randrange(100, 400), self._cross_attempt, t, n + 1)
            return
        groups = {k: smap.group_for_key(k) for k, _ in txn.keys_of(t)}
        self.cross_driver.attempt(
            node, t, groups, n, lambda m: sim.at(self.rng.randrange(100, 400) * m, self._cross_attempt, t, m))

    def finished_record(self) -> None:
        """The record sweep finished a record of one of these transactions (`CrossPairs._finish`):
        nothing to check here (its writes were recorded when its COMMITs applied)."""

    def answered_cross(self, t: txn.Txn | None, r: txn.TxnResult, revision: int) -> None:
        """A cross-group transaction's answer (from the `CrossPairs` driver)."""
        assert t is not None
        self.stats.cross_answered += 1
        self._answered(t, r, revision if r.revision else 0)

    def _answered(self, t: txn.Txn, r: txn.TxnResult, revision: int) -> None:
        self.stats.answered += 1
        if r.revision != revision:
            raise TxnModelViolation(f"a transaction answered revision {revision}, its result {r.revision}")
        ops = t.success if r.succeeded else t.failure
        for op, o in zip(ops, r.responses, strict=False):
            if op.kind == txn.OpKind.GET and o.found:
                self._seen_mod[op.key] = o.mod_revision
                self._seen_value[op.key] = o.value
        keys = frozenset(k for k, _ in txn.keys_of(t))
        self.answers.append(_Answer(t, r, revision, self.started[id(t)], self.sim.now, keys))

    def unfinished(self) -> str | None:
        """Which of these transactions' intents a data group's leader still holds (None: none),
        e.g. a committed transaction whose COMMIT there has not applied yet."""
        for node, gid in self.sim.data_leaders():
            rows = node.store.intents(gid, PREFIX, _PREFIX_END, 1)
            if rows:
                return f"g{gid} at n{node.id} holds an intent on {rows[0][0]!r}"
        return None

    # --- the check ---------------------------------------------------------------------------
    def history(self) -> tuple[list[int], dict[int, dict[bytes, bytes | None]]]:
        """The applied writes of the workload's keys: revisions ascending, revision -> writes."""
        at: dict[int, dict[bytes, bytes | None]] = {}
        for key, vs in self.sim.revisions.versions.items():
            if key.startswith(PREFIX):
                for rev, value in vs:
                    at.setdefault(rev, {})[key] = value
        return sorted(at), at

    def check_end(self) -> None:
        """Check every answer and every write set against the model (module docstring)."""
        revs, at = self.history()
        states: list[State] = []
        cur: State = {}
        for rev in revs:  # states[i]: the state after the writes at revs[i]
            cur = dict(cur)
            for key, value in at[rev].items():
                old = cur.get(key)
                if value is None:
                    cur.pop(key, None)
                else:
                    cur[key] = (txn.Current(value, rev, rev, 1) if old is None
                                else txn.Current(value, old.create_revision, rev, old.version + 1))
            states.append(cur)

        def before(rev: int) -> State:
            i = bisect_left(revs, rev)
            return states[i - 1] if i else {}

        claimed: set[int] = set()
        for a in self.answers:
            if not a.result.succeeded:
                self.stats.failed_branch += 1
            if a.revision:
                self._check_writer(a, before(a.revision), at.get(a.revision))
                claimed.add(a.revision)
            else:
                self._check_reader(a, revs, states, at)
        for rev in revs:
            if rev not in claimed:
                self._explain(rev, at[rev], before(rev))
        self._check_realtime()

    def _check_writer(self, a: _Answer, state: State, writes: dict[bytes, bytes | None] | None) -> None:
        out = txn.evaluate(a.t, state.get, a.revision)
        if out.result != a.result:
            raise TxnModelViolation(
                f"transaction {a.t} answered {a.result} at revision {a.revision}; the model (the applied history "
                f"before it: {_show(state, a.keys)}) gives {out.result}"
            )
        if writes != dict(out.writes):
            raise TxnModelViolation(
                f"transaction {a.t} answered at revision {a.revision}, where the history has the writes {writes}, "
                f"not its own {dict(out.writes)}"
            )
        self.stats.writers_checked += 1

    def _check_reader(self, a: _Answer, revs: list[int], states: list[State],
                      at: dict[int, dict[bytes, bytes | None]]) -> None:
        points = [i for i, rev in enumerate(revs) if a.keys & at[rev].keys()]
        bounds = [-1, *points]
        for j, i in enumerate(bounds):
            state = states[i] if i >= 0 else {}
            lo = revs[i] if i >= 0 else 0
            hi = revs[bounds[j + 1]] if j + 1 < len(bounds) else 1 << 63
            if txn.evaluate(a.t, state.get, max(lo, 1)).result == a.result:
                a.segments.append((lo, hi))
        if not a.segments:
            raise TxnModelViolation(
                f"read-only transaction {a.t} answered {a.result}: no state of its keys in the applied history gives "
                "that answer"
            )
        self.stats.readers_checked += 1

    def _explain(self, rev: int, writes: dict[bytes, bytes | None], state: State) -> None:
        """Some issued transaction, evaluated at `rev`, writes exactly `writes`."""
        tags = {v.split(b".")[0] for v in writes.values() if v is not None}
        if tags:
            cands = [self.issued.get(int(t[1:])) for t in tags if t[:1] == b"g" and t[1:].isdigit()]
        else:
            cands = [t for t in self.issued.values()
                     if set(writes) <= {k for k, w in txn.keys_of(t) if w}]
        for t in cands:
            if t is not None and dict(txn.evaluate(t, state.get, rev).writes) == writes:
                self.stats.unanswered_committed += 1
                return
        raise TxnModelViolation(
            f"the writes {writes} at revision {rev} are no issued transaction's at that state ({_show(state, set(writes))})"
        )

    def _check_realtime(self) -> None:
        by_start = sorted(self.answers, key=lambda a: a.start)
        for b in by_start:
            for a in self.answers:
                if a.end >= b.start or not (a.keys & b.keys):
                    continue
                self.stats.realtime_pairs += 1
                ok = True
                if a.revision and b.revision:
                    ok = a.revision < b.revision
                elif a.revision:  # B read some state at or after R_A
                    ok = any(hi > a.revision for _, hi in b.segments)
                elif b.revision:  # A read some state before R_B
                    ok = any(lo < b.revision for lo, _ in a.segments)
                else:
                    ok = min(lo for lo, _ in a.segments) < max(hi for _, hi in b.segments)
                if not ok:
                    raise TxnModelViolation(
                        f"real time: {a.t} (answered at {a.end} ms, revision {a.revision or a.segments}) before "
                        f"{b.t} started ({b.start} ms), which is serialized before it (revision {b.revision or b.segments})"
                    )


def _show(state: State, keys: Any) -> str:
    return ", ".join(f"{k.decode()}={state[k].value.decode()}@c{state[k].create_revision}/m{state[k].mod_revision}"
                     f"/v{state[k].version}" if k in state else f"{k.decode()} absent" for k in sorted(keys))
