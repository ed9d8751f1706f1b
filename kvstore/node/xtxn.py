"""The coordinator and resolver of transactions across groups: synchronous, deterministic
decisions (no I/O, no clock, no randomness of its own: the caller hands in ids, clock readings
and the applied results). The asyncio shell (`kvstore/server/xtxn_run.py`) proposes the commands
these functions return and feeds back the results; the simulator can drive the same functions.

One attempt (docs/REVISIONS.md, "Transactions across groups"):
1. `plan`: the participant groups (of every key the transaction names, `txn.keys_of`), each with
   its keys; the primary is the group of the first key named. `prepare_commands`: one PREPARE
   per participant (the same txn id, primary, start).
2. `after_prepare`: every participant answered. A LOCKED answer (another transaction's intent) or
   any other refusal: the attempt aborts what it prepared (`abort_commands`) and, for a lock,
   retries later (`Conflict`), resolving the intent first if it is older than the timeout. Else
   R = max(p_g) (unique: the revision one participant reserved in its own slot); the transaction
   is evaluated by `txn.evaluate` over the prepared values at R; the writes are split by group.
   A transaction that writes nothing ends here (its reads were one snapshot: every key was held
   at once); the intents are released with ABORT.
3. The commit point: RECORD in the primary (`record_command`; it carries the client's session,
   so a retry of the same request answers the first attempt's result). `after_record`: committed
   (the client's answer is success from here on; a lost reply is indeterminate), or aborted by a
   resolver (definite), or the session's answer to an earlier attempt (this attempt's intents are
   aborted, the earlier result is the answer).
4. COMMIT in every participant (`commit_commands`), then FINALIZE in the primary.

A transaction with range deletes (`txn.delete_ranges`; `plan_ranges`) has every data group as a
participant: each PREPARE names the group's keys and locks the hull of the ranges
(`txn.range_hull`), answering the keys' values and every other key present in the hull; the
evaluation (`after_prepare`) scans those, and its COMMITs and RECORD carry the ranges the path
ran (`XCmd.ranges`: each group deletes every other key it prepared in one of them at R). With
leased puts or a LEASE compare too (below), each PREPARE carries both (`storage/xtxn.py` form 4:
level 7) and answers both; a range delete does not delete a key the path's writes name (a put
with a lease after it in op order is that key's final state), and each key it deletes is
detached from its lease, as any delete.

A resolver (`resolve_commands`) meeting an old intent asks the primary (RESOLVE: absent record
-> ABORTED is written), then COMMITs (with the record's writes of the intent's group) or ABORTs
the intent's group.

Leases (feature level 7, `node.version.LEVEL_XTXN_LEASES`; `storage/xtxn.py`, "Leased puts").
A put with a lease carries the `checked` stamp its caller took at the lease's home (as for a
LEASE_PUT: the etcd layer's `lease_checked`, the client's LeaseTimeToLive). `plan` lists, per
group, the leased puts on ANY path whose key is there (`Plan.leased`), and whether a LEASE
compare needs the keys' leases (`Plan.read_leases`). Each PREPARE checks its group's leased puts
by the LEASE_PUT rules, answers which may attach, holds an attach lock on the leases of those
that may (a deletion of such a lease, across groups or by one command, is refused LOCKED until
this transaction's COMMIT or ABORT in the group), and answers the keys' leases if asked.
`after_prepare` evaluates with those leases (a LEASE compare at R) and refuses the transaction,
definitely and before anything is recorded, if a put on the path TAKEN names a lease a
participant refused (etcd checks the path taken only): `Refused.lease_not_found`, nothing
written. Otherwise the RECORD and each COMMIT carry the taken path's leased puts (`Ready.leased`),
and the COMMIT attaches each key after writing it, exactly as a LEASE_PUT (a plain put of a key
detaches it, as everywhere).

Why no key stays attached to a dead lease (the commit point is the RECORD; a lease can be found
gone only at the COMMIT, after it, when its death was decided by a path the attach lock does not
hold off): from its PREPARE until its COMMIT, the transaction's attach lock in the key's group
refuses every deletion of the lease there (a deletion across groups PREPAREs in every data group,
so it cannot commit either; REVOKE, EXPIRE, DROP and ORPHAN by one command are refused in the
group), and a deletion prepared before it (its lease lock) refused the PREPARE (LOCKED). So a
deletion of the lease either committed before the PREPARE (then the PREPARE saw its tombstone, or
a record not LIVE at the home, and refused the put), or runs after the COMMIT (then it finds the
key attached and deletes it). What is left: a death the lock does not see (a map that lagged
behind a new group; the tombstone's life passed): the COMMIT then checks again
(`leases.may_attach` at R): a lease known dead in the group leaves no attachment: the COMMIT
writes the key's deletion at R instead of the put (the put and the lease's deletion, in one
step: the key ends absent, as the lease's deletion would have made it); and a dead lease the
group does not know of is the orphan sweep's (`node/orphans.py`: every lease with keys attached
in a group is asked about at its home, and its keys there deleted if it is dead).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from kvstore.storage import commands, leases, mvcc, txn, xtxn
from kvstore.storage.commands import ApplyResult, Command
from kvstore.storage.xtxn import Intent, Record, State, TxnId, XCmd, XOp
from kvstore.storage.xtxn_apply import TOO_OLD, TXN_ABORTED

READ_INTENTS_MAX = 1 << 20
"""A read looks at up to this many intents of its range (every one: a pending commit below the
read's revision must be found whatever the intents before it hold; a group holds few)."""

TXN_TIMEOUT_MS = 5_000
"""An intent older than this (by its start's HLC time against the meeting node's clock) may be
resolved by whoever meets it: its coordinator is presumed dead. A live coordinator whose intents
are resolved meanwhile gets a definite abort at its RECORD (never a split outcome)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The participants of a transaction: group -> its keys (in first-named order); `primary`
    holds the record. `group_of` maps every key to its group."""

    primary: int
    keys: dict[int, tuple[bytes, ...]]
    group_of: dict[bytes, int]
    lock: tuple[bytes, bytes] | None = None
    """A range delete's key range [start, end) (end b"": no end), locked in every group."""
    lease: int = 0
    """A lease's deletion: the lease whose attached keys every group deletes (0: none)."""
    renews: int = 0
    """A lease's expiry: the renew count it was decided on (0: a revoke)."""
    leased: dict[int, tuple[xtxn.Leased, ...]] = field(default_factory=dict)
    """Group -> the leased puts on any path of the transaction whose key is there (distinct)."""
    read_leases: bool = False
    """A LEASE compare is on some path: every PREPARE answers its keys' leases."""


def leased_puts(t: txn.Txn) -> Iterator[xtxn.Leased]:
    """(key, lease, checked) of every PUT with a lease on any path of `t`."""
    for op in (*t.success, *t.failure):
        if op.lease:
            yield op.key, op.lease, op.checked
        elif op.txn is not None:
            yield from leased_puts(op.txn)


def with_checked(t: txn.Txn, stamps: dict[int, int]) -> txn.Txn:
    """`t` with every PUT of a lease in `stamps` and no `checked` of its own carrying
    `stamps[lease]` (the coordinator's reading before it found the lease live at its home)."""
    def op(o: txn.TxnOp) -> txn.TxnOp:
        if o.txn is not None:
            return replace(o, txn=with_checked(o.txn, stamps))
        if o.lease and not o.checked and o.lease in stamps:
            return replace(o, checked=stamps[o.lease])
        return o
    return txn.Txn(t.compares, tuple(map(op, t.success)), tuple(map(op, t.failure)))


def plan(t: txn.Txn, group_for: Iterable[tuple[bytes, int]]) -> Plan:
    """The plan of `t`, given each named key's group (`group_for` yields (key, group) in the
    order `txn.keys_of` names the keys). ValueError if it names no key."""
    keys: dict[int, list[bytes]] = {}
    group_of: dict[bytes, int] = {}
    for k, g in group_for:
        if k in group_of:
            continue
        group_of[k] = g
        keys.setdefault(g, []).append(k)
    if not group_of:
        raise ValueError("a transaction must name at least one key")
    primary = next(iter(keys))
    return Plan(primary, {g: tuple(ks) for g, ks in keys.items()}, group_of,
                leased=_leased_by_group(t, group_of), read_leases=txn.compares_lease(t))


def _leased_by_group(t: txn.Txn, group_of: dict[bytes, int]) -> dict[int, tuple[xtxn.Leased, ...]]:
    """Group -> the leased puts on any path of `t` whose key is there (distinct, in order)."""
    leased: dict[int, list[xtxn.Leased]] = {}
    for x in dict.fromkeys(leased_puts(t)):
        leased.setdefault(group_of[x[0]], []).append(x)
    return {g: tuple(xs) for g, xs in leased.items()}


def plan_ranges(t: txn.Txn, group_for: Iterable[tuple[bytes, int]], groups: Iterable[int]) -> Plan:
    """The plan of `t`, a transaction with range deletes (`txn.has_delete_range`): every data
    group in `groups` is a participant (keys are hashed whole: a range may have keys in each),
    each with the keys `group_for` maps to it (as `plan`), all locking the hull of the ranges
    (`txn.range_hull`); the primary is the group of the first key named, or the lowest group if
    it names none. ValueError (definite) if a named key's group is not among `groups`, or as
    `every_group`."""
    hull = txn.range_hull(t)
    if hull is None:
        raise ValueError("the transaction has no range delete")
    gs = every_group(groups, "a transaction with a range delete")
    keys: dict[int, list[bytes]] = {g: [] for g in gs}
    group_of: dict[bytes, int] = {}
    primary: int | None = None
    for k, g in group_for:
        if k in group_of:
            continue
        if g not in keys:
            raise ValueError(f"key {k[:32]!r} maps to group {g}, which is not a data group")
        group_of[k] = g
        keys[g].append(k)
        primary = g if primary is None else primary
    return Plan(gs[0] if primary is None else primary, {g: tuple(ks) for g, ks in keys.items()}, group_of, hull,
                leased=_leased_by_group(t, group_of), read_leases=txn.compares_lease(t))


def every_group(groups: Iterable[int], what: str) -> list[int]:
    """The participants of a transaction over every data group in `groups` (a range delete, a
    lease's deletion), ascending and each once. ValueError (definite: the transaction cannot be
    run atomically at all, and is not split, which would not be) if there is none or more than
    a RECORD lists (`xtxn.MAX_GROUPS_PER_TXN`)."""
    gs = sorted(set(groups))
    if not gs:
        raise ValueError(f"no data group for {what}")
    if len(gs) > xtxn.MAX_GROUPS_PER_TXN:
        raise ValueError(f"{what} spans at most {xtxn.MAX_GROUPS_PER_TXN} data groups, not {len(gs)}")
    return gs


def plan_range(groups: Iterable[int], lo: bytes, hi: bytes) -> Plan:
    """The plan of a range delete of [lo, hi) (hi b"": no end): every data group (keys are
    hashed whole, so any key range may have keys in each), the lowest one primary. ValueError
    (the one check of the range: the caller answers a definite InvalidArgument) if there is no
    group, more than a RECORD lists (`xtxn.MAX_GROUPS_PER_TXN`), or the range is empty."""
    gs = every_group(groups, "a range delete")
    if hi and hi <= lo:
        raise ValueError("the range's end is at or before its start")
    return Plan(gs[0], {g: () for g in gs}, {}, (lo, hi))


def plan_lease(groups: Iterable[int], lease_id: int, renews: int = 0) -> Plan:
    """The plan of lease `lease_id`'s deletion (an expiry at renew count `renews`, or a revoke:
    0): every data group in `groups` (a key attached to the lease may be in any), the lease's
    home group primary (its RECORD revokes the lease: the commit point). ValueError if the home
    group is not among them, or (`every_group`) there are more than a RECORD lists: such a lease
    cannot be deleted atomically, and its deletion is refused rather than split."""
    home = leases.home_group(leases.check_id(lease_id))
    gs = every_group(groups, "a lease's deletion")
    if home not in gs:
        raise ValueError(f"lease {lease_id:x}'s home group {home} is not a data group")
    if not 0 <= renews < 1 << 64:
        raise ValueError(f"renew count {renews} is out of range")
    return Plan(home, {g: () for g in gs}, {}, lease=lease_id, renews=renews)


def prepare_commands(p: Plan, tid: TxnId, start: int, proposed: int) -> dict[int, bytes]:
    """The PREPARE of each participant (ValueError if a command cannot be encoded)."""
    return {
        g: commands.encode_command(
            Command.cross(XCmd(XOp.PREPARE, tid, p.primary, start, keys=ks, lock=p.lock, lease=p.lease,
                               leased=p.leased.get(g, ()), read_leases=p.read_leases and bool(ks)),
                         revision=proposed))
        for g, ks in sorted(p.keys.items())
    }


def abort_commands(tid: TxnId, groups: Iterable[int]) -> dict[int, bytes]:
    data = commands.encode_command(Command.cross(XCmd(XOp.ABORT, tid)))
    return {g: data for g in sorted(groups)}


@dataclass(frozen=True, slots=True)
class Conflict:
    """A key holds another transaction's intent: abort what was prepared, maybe resolve the
    intent (`intent`, met in `group`), retry later."""

    group: int
    key: bytes
    intent: Intent


@dataclass(frozen=True, slots=True)
class Refused:
    """A participant refused the PREPARE for another reason (`wrong_shard`: a key's range moved);
    definite: nothing will be written."""

    group: int
    message: str
    wrong_shard: bool = False
    lease_not_found: bool = False
    """A put on the path taken names a lease the group found gone (`leases.NOT_FOUND`)."""


@dataclass(slots=True)
class Ready:
    """Every participant prepared: the outcome evaluated at `at` (R)."""

    at: int
    result: txn.TxnResult
    writes: dict[int, tuple[xtxn.Write, ...]] = field(default_factory=dict)
    delete_prepared: bool = False
    """A range delete or a lease's deletion (`after_prepare_range`): `writes` lists the keys
    each group found (for the answer), but its RECORD
    and COMMITs say "every key prepared" instead (`XCmd.delete_prepared`: a group may find more
    keys than a command may list)."""
    leased: dict[int, tuple[xtxn.Leased, ...]] = field(default_factory=dict)
    """Group -> the leased puts among its writes (the path taken)."""
    ranges: tuple[tuple[bytes, bytes], ...] = ()
    """A transaction's range deletes on the path taken (`txn.Outcome.ranges`): its RECORD and
    every COMMIT carry them (`XCmd.ranges`), besides `writes`."""

    @property
    def writes_anything(self) -> bool:
        return any(self.writes.values()) or bool(self.result.revision)


def _refusal(p: Plan, results: dict[int, ApplyResult]) -> Conflict | Refused | None:
    for g in sorted(p.keys):
        res = results[g]
        if res.error is not None:
            if res.error.startswith(xtxn.LOCKED) and res.current is not None:
                try:
                    key, intent = xtxn.decode_lock(res.current)
                except ValueError:
                    return Refused(g, f"group {g} answered a malformed lock")
                return Conflict(g, key, intent)
            return Refused(g, f"group {g}: {res.error}", res.wrong_shard)
        if not res.revision:
            return Refused(g, f"group {g} answered a PREPARE without its reservation")
    return None


def after_prepare_range(p: Plan, results: dict[int, ApplyResult]) -> Conflict | Refused | Ready:
    """A range delete (or a lease's deletion: the keys attached to the lease) after every
    group's PREPARE: delete every key each group found in the range, all at R = max p_g. The result's revision is R if anything is deleted, else 0; its
    responses are one DELETE per key (found)."""
    refused = _refusal(p, results)
    if refused is not None:
        return refused
    at = max(results[g].revision for g in p.keys)
    writes: dict[int, tuple[xtxn.Write, ...]] = {}
    n = 0
    for g in sorted(p.keys):
        try:
            found = xtxn.decode_found(results[g].current or b"")
        except ValueError:
            return Refused(g, f"group {g} answered a malformed range")
        writes[g] = tuple((k, None) for k in found)
        n += len(found)
    rev = at if n else 0
    result = txn.TxnResult(True, tuple(txn.OpResult(txn.OpKind.DELETE, True) for _ in range(n)), rev)
    return Ready(at, result, writes, delete_prepared=True)


def after_prepare(t: txn.Txn, p: Plan, results: dict[int, ApplyResult]) -> Conflict | Refused | Ready:
    """Decide after every participant's PREPARE result (see the module docstring). Raises
    `txn.ResultTooLarge` if the transaction's GETs return too much (abort, definite). With
    range deletes (`plan_ranges`: `p.lock` set), each group also answered the other keys present
    in the hull of the ranges; the evaluation scans those and the named keys present."""
    current: dict[bytes, txn.Current | None] = {}
    found: list[bytes] = []
    at = 0
    refused = _refusal(p, results)
    if refused is not None:
        return refused
    refusal: dict[xtxn.Leased, tuple[int, int]] = {}
    for g in sorted(p.keys):
        res = results[g]
        ks = p.keys[g]
        if res.txn is None or len(res.txn.responses) != len(ks) or not res.revision:
            return Refused(g, f"group {g} answered a PREPARE without the prepared values")
        key_leases: tuple[int, ...] = ()
        codes: tuple[int, ...] = ()
        in_range: list[bytes] = []
        mine = p.leased.get(g, ())
        reads = p.read_leases and bool(ks)
        raw = res.current or b""
        try:
            if mine or reads:
                if p.lock is not None:
                    in_range, key_leases, codes = xtxn.decode_prepared_found_leases(raw)
                else:
                    key_leases, codes = xtxn.decode_prepared_leases(raw)
            elif p.lock is not None:
                in_range = xtxn.decode_found(raw)
        except ValueError:
            return Refused(g, f"group {g} answered a malformed range or lease answer")
        if mine or reads:
            if len(codes) != len(mine) or len(key_leases) != (len(ks) if reads else 0):
                return Refused(g, f"group {g} answered a PREPARE without its leases")
            refusal.update((x, (g, code)) for x, code in zip(mine, codes, strict=True))
        found += (k for k in in_range if k not in p.group_of)
        for i, (k, o) in enumerate(zip(ks, res.txn.responses, strict=True)):
            current[k] = txn.Current(o.value, o.create_revision, o.mod_revision, o.version,
                                     key_leases[i] if key_leases else 0) if o.found else None
        at = max(at, res.revision)
    present = sorted({*found, *(k for k, c in current.items() if c is not None)})

    def scan(lo: bytes, hi: bytes) -> list[bytes]:
        return [k for k in present if txn.in_range(k, lo, hi)]

    out = txn.evaluate(t, lambda k: current[k], at, scan if p.lock is not None else None)
    leased: dict[int, list[xtxn.Leased]] = {}
    for x in out.leased:
        g, code = refusal.get(x, (p.group_of[x[0]], xtxn.REFUSAL_NOT_FOUND))
        if code == xtxn.REFUSAL_TOO_MANY:
            return Refused(g, f"group {g}: {leases.TOO_MANY_KEYS}")
        if code != xtxn.REFUSAL_NONE:
            return Refused(g, leases.NOT_FOUND, lease_not_found=True)
        leased.setdefault(g, []).append(x)
    writes: dict[int, list[xtxn.Write]] = {g: [] for g in p.keys}
    for k, v in out.writes:
        writes[p.group_of[k]].append((k, v))
    return Ready(at, out.result, {g: tuple(ws) for g, ws in writes.items()},
                 leased={g: tuple(xs) for g, xs in leased.items()}, ranges=tuple(out.ranges))


def record_command(
    tid: TxnId, start: int, r: Ready, client_id: int = 0, seq: int = 0, ack: int = 0, retry: bool = False,
    horizon: int = 0, lease: int = 0, renews: int = 0,
) -> bytes:
    """The RECORD (the commit point) with the client's session (`retry` / `horizon` as the
    client sent them: a retry whose session the primary evicted is refused, not applied twice);
    for a lease's deletion, its lease and renew count (`Plan.lease`, `Plan.renews`). A range
    delete's and a lease deletion's (`Ready.delete_prepared`) list their groups only
    (`delete_prepared`) and no result (they have no session; the answer, one DELETE per key, may
    be longer than a result may be). ValueError if it cannot be encoded (nothing was proposed:
    abort the attempt, definite)."""
    if r.delete_prepared:
        x = XCmd(XOp.RECORD, tid, start=start, at=r.at, groups=tuple((g, ()) for g in sorted(r.writes)),
                 lease=lease, renews=renews, delete_prepared=True)
        return commands.encode_command(Command.cross(x))
    groups = tuple((g, ws) for g, ws in sorted(r.writes.items()))
    leased = tuple(x for _g, xs in sorted(r.leased.items()) for x in xs)
    x = XCmd(XOp.RECORD, tid, start=start, at=r.at, result=r.result, groups=groups, lease=lease, renews=renews,
             leased=leased, ranges=r.ranges)
    return commands.encode_command(Command.cross(x, client_id, seq, ack, retry=retry, horizon=horizon))


@dataclass(frozen=True, slots=True)
class Committed:
    """The record is COMMITTED: the client's answer (`result`, at `at`). `mine` False: the
    session's cached answer to an earlier attempt (this attempt aborts its own intents)."""

    at: int
    result: txn.TxnResult | None
    mine: bool


@dataclass(frozen=True, slots=True)
class Aborted:
    """The RECORD did not commit: `retry` (a resolver aborted the attempt, or it is too old) or
    not (the session refused it: a stale request, or `expired`, a retry whose session the
    primary evicted: an earlier attempt may have committed, indeterminate)."""

    message: str
    retry: bool = True
    expired: bool = False


def after_record(tid: TxnId, res: ApplyResult) -> Committed | Aborted:
    if res.session_expired:
        return Aborted(res.error or "session expired", retry=False, expired=True)
    if res.error is not None:
        return Aborted(res.error, retry=res.error in (TXN_ABORTED, TOO_OLD))
    return Committed(res.revision, res.txn, res.current == tid.encode())


def commit_commands(tid: TxnId, r: Ready, groups: Iterable[int]) -> dict[int, bytes]:
    """The COMMIT of each participant (a range delete's: `delete_prepared`). ValueError if one
    cannot be encoded."""
    def one(g: int) -> XCmd:
        if r.delete_prepared:
            return XCmd(XOp.COMMIT, tid, at=r.at, delete_prepared=True)
        return XCmd(XOp.COMMIT, tid, at=r.at, writes=r.writes.get(g, ()), leased=r.leased.get(g, ()),
                    ranges=r.ranges)

    return {g: commands.encode_command(Command.cross(one(g))) for g in sorted(groups)}


def finalize_command(tid: TxnId, group: int = 0) -> bytes:
    """FINALIZE in the primary: every participant applied its COMMIT (group 0, the coordinator),
    or `group` did (a resolver that committed its intents)."""
    return commands.encode_command(Command.cross(XCmd(XOp.FINALIZE, tid, group=group)))


def finalize_after(intent: Intent, group: int, follow: bytes) -> bytes | None:
    """After a resolver's `follow` (from `resolution`) applied in `group`: the FINALIZE of that
    participant to propose in the primary if it was a COMMIT (None for an ABORT)."""
    try:
        op = commands.decode_command(follow).op
    except ValueError:
        return None
    return finalize_command(intent.txn, group) if op == commands.Op.COMMIT else None


# --- the record sweep ----------------------------------------------------------------------------
RECORD_SWEEP_BATCH = 16
"""The most unfinished records of one group the record sweep finishes per round."""


def sweep_before(now_ms: int, timeout_ms: int = TXN_TIMEOUT_MS) -> int:
    """The start revision below which a COMMITTED record not yet FINALIZED is the record sweep's
    (`xtxn_apply.unfinished`): its coordinator had the transaction timeout to FINALIZE it."""
    ms = now_ms - timeout_ms
    return mvcc.make_revision(ms, 0, 0) if ms > mvcc.EPOCH_MS else 0


def finish_commands(tid: TxnId, rec: Record) -> dict[int, bytes]:
    """The record sweep's COMMITs for a COMMITTED record whose coordinator died between its
    RECORD and its FINALIZE: one to every participant the record lists (it lists every one,
    writes or not), each idempotent (a participant that applied its COMMIT answers it again, or,
    its done row forgotten by age, refuses it changing nothing: a COMMITTED record's intents are
    only ever committed). Once every one applied (any result), `finalize_command(tid)` in the
    primary: the record becomes FINALIZED and is forgotten by age."""
    return {g: commands.encode_command(Command.cross(_commit_from_record(tid, rec, g))) for g, _ in rec.writes}


def _commit_from_record(tid: TxnId, rec: Record, group: int) -> XCmd:
    """The COMMIT of participant `group` as a COMMITTED record describes it (the resolver's and
    the record sweep's): its writes, or, for a range delete or a lease's deletion, "every key
    prepared here" (`delete_prepared`)."""
    return XCmd(XOp.COMMIT, tid, at=rec.at, writes=rec.writes_of(group), delete_prepared=rec.delete_prepared,
                leased=rec.leased_of(group), ranges=rec.ranges)


# --- meeting intents -----------------------------------------------------------------------------
def lock_of(res: ApplyResult) -> tuple[bytes, Intent] | None:
    """The key and intent a LOCKED result names (None: not a lock, or a malformed one)."""
    if res.error is None or not res.error.startswith(xtxn.LOCKED) or res.current is None:
        return None
    try:
        return xtxn.decode_lock(res.current)
    except ValueError:
        return None


def blocking_intent(rows: Iterable[tuple[bytes, bytes]], served: int) -> tuple[bytes, Intent] | None:
    """The first (key, intent) of `rows` (a group's intents on the keys a read covers, read after
    the read's view) prepared at or below `served`, the revision the read is served at: its
    commit may still write there (at R >= the prepared revision), so the read must not answer
    yet. An intent prepared later is above everything the read saw. ValueError for a corrupt row."""
    for key, raw in rows:
        intent = Intent.decode(bytes(raw))
        if intent.prepared <= served:
            return bytes(key), intent
    return None


def expired(intent: Intent, now_ms: int, timeout_ms: int = TXN_TIMEOUT_MS) -> bool:
    """Whether an intent is old enough to be resolved by whoever meets it."""
    return now_ms - mvcc.revision_ms(intent.start) > timeout_ms


def resolve_command(intent: Intent) -> bytes:
    """The RESOLVE to propose in the intent's primary group."""
    return commands.encode_command(Command.cross(XCmd(XOp.RESOLVE, intent.txn, start=intent.start)))


def committed_record(res: ApplyResult) -> Record | None:
    """A RESOLVE's answer: the record if it says COMMITTED (or FINALIZED), None if ABORTED.
    ValueError if the answer is an error or unusable (ask again)."""
    if res.error is not None or res.current is None:
        raise ValueError(res.error or "RESOLVE answered no record")
    rec = xtxn.decode_record(res.current)
    return None if rec.state == State.ABORTED else rec


def resolution(intent: Intent, group: int, res: ApplyResult) -> bytes | None:
    """After RESOLVE answered `res`: the COMMIT or ABORT to propose in `group` (where the intent
    was met), or None if the answer is unusable (an error: try again later)."""
    if res.error is not None or res.current is None:
        return None
    try:
        rec: Record = xtxn.decode_record(res.current)
    except ValueError:
        return None
    if rec.state == State.ABORTED:
        return commands.encode_command(Command.cross(XCmd(XOp.ABORT, intent.txn)))
    if rec.state == State.COMMITTED:
        x = _commit_from_record(intent.txn, rec, group)
        return commands.encode_command(Command.cross(x))
    return None  # FINALIZED: every participant committed already; the intent is gone by now


__all__ = [
    "READ_INTENTS_MAX",
    "RECORD_SWEEP_BATCH",
    "TXN_TIMEOUT_MS",
    "Aborted",
    "Committed",
    "Conflict",
    "Plan",
    "Ready",
    "Refused",
    "abort_commands",
    "after_prepare",
    "after_prepare_range",
    "after_record",
    "blocking_intent",
    "commit_commands",
    "committed_record",
    "every_group",
    "expired",
    "finalize_after",
    "finalize_command",
    "finish_commands",
    "leased_puts",
    "lock_of",
    "plan",
    "plan_lease",
    "plan_range",
    "plan_ranges",
    "prepare_commands",
    "record_command",
    "resolution",
    "resolve_command",
    "sweep_before",
    "with_checked",
]
