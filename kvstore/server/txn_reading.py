"""Transactions that read ranges at their revision: the algorithm that etcd's Txn with ranges
(`etcd/kv.py`, `EtcdKV._txn_reading`) and kvstore's Txn with scans (`txn_scans.py`) share. The
callers supply the I/O (`ReadingIO`); the logic here decides what to run and at which revision.

1. M := a linearizable cut of every data group (`ReadingIO.cut`: every write acknowledged
   before the call is at or below M).
2. If the body can write (`has_writes`), it runs as one transaction (one group's TXN, or a
   two-phase commit across groups) proposed with M as its floor (`ReadingIO.write`), so its
   revision R > M. If the branch taken wrote, R is the transaction's revision.
3. Otherwise (it cannot write, or the branch taken wrote nothing) the whole body is evaluated on
   the state at R := a cut M (every key it names read exactly at M, `evaluate_at`, pure
   `txn.evaluate`; the lease of a key a LEASE compare names: below). Should that state take a
   branch that writes (the keys changed in between), or a compared lease at M be unknowable,
   start again at 1 (at most `TXN_READ_TRIES` times; then `Exhausted`, nothing written). Once a
   write under the client's session wrote nothing (`ReadingIO.can_write` False: its retries
   would answer that cached result), every next try skips step 2: a new cut, evaluated read-only.
4. The caller reads every range on the path taken exactly in every group: at R, or, if the
   transaction wrote at R and a write after the read on its path meets the range, at R - 1 with
   the path's writes before the read applied (`kvstore/txnpath.py`: etcd's sequential
   semantics).

A key's lease at M (a LEASE compare in the read-only evaluation; etcd compares the lease of the
key's version at the Txn's revision, 0 for an absent key). A read at a revision carries no
lease: the attachment rows hold each key's current attachment only. But an attachment changes
only together with a new version of its key, at a new revision (a put or a LeasePut sets or
clears it; every delete of the key - a client's, a lease's revoke, expiry, DROP or orphan
sweep, a move's `settle_dead_attachments` - removes it; a range move's INSTALL carries the
key's versions and its attachment together, BEGIN and DROP wipe both). So for a key present at
M with mod revision m, its version and attachment read now from one view of a replica
(`ReadingIO.current`, after M): if its mod revision is still m, no version came after m, and
the lease attached now is the one it had at M; else (changed or gone since) the evaluation at M
cannot know it and starts again from a new cut. A key absent at M compares as lease 0. Only
the keys LEASE compares name are read so.

Why this is one atomic transaction at R: revisions are unique per group and a group's writes
are totally ordered by them, so the TXN's state in its group is that group's state at R (for a
two-phase commit: every compare key was locked from its prepare to the commit at R, so the
compares held at R too). A read at R is exact in every group (docs/REVISIONS.md, "Reads at a
revision"): it returns exactly the writes <= R, the transaction's own included. Compares, writes
and range reads all see the one cut "every write <= R", which contains every write acknowledged
before the call (<= M <= R): linearizable. Every write of the transaction is at exactly R, so
the state at R - 1 (read exactly, as at R) is the state just before it: a range read at its
position on the path is that state with the writes before it applied (`txnpath`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kvstore import errors
from kvstore.storage import txn
from kvstore.v1 import kv_pb2

from .scan_parts import gather_parts
from .txn_wire import result_into, txn_from_proto

TXN_READ_TRIES = 8
"""A transaction with ranges whose branch taken wrote nothing, but whose keys then changed so
that it would write, starts again this often (then `Exhausted`)."""


class NoLeaseReader(Exception):
    """`evaluate_at` of a body with a LEASE compare without a `current` reader (a caller's bug)."""


class Exhausted(Exception):
    """Every try found the keys changed between the write and the read-only evaluation: nothing
    was written (definite)."""


class ReadingIO(Protocol):
    """The I/O of one reading transaction (see the module docstring)."""

    async def cut(self) -> int:
        """A revision M >= 1 at or above every write acknowledged before the call, in every data
        group (`cut_of`)."""
        ...

    def can_write(self) -> bool:
        """Whether `write` may be proposed now: False once a write under the client's session
        wrote nothing (the session caches that result under its (client, seq): proposing it again
        would only answer the same result, never write)."""
        ...

    async def write(self, body: kv_pb2.TxnBody, floor: int) -> tuple[kv_pb2.TxnResult, int]:
        """Run `body` as one transaction with revision > `floor`: (its result, its revision;
        0 if the branch taken wrote nothing)."""
        ...

    async def get_at(self, key: bytes, revision: int) -> txn.Current | None:
        """`key` exactly at `revision` (None: absent)."""
        ...

    async def current(self, key: bytes) -> txn.Current | None:
        """`key`'s current version and the lease it is attached to (`Current.lease`), from one
        view of a replica of its group at or after the last cut (None: absent): a Get
        with_lease (`leased`)."""
        ...


@dataclass(slots=True, frozen=True)
class Reading:
    """Where a reading transaction landed: its `result` (the body's), the revision R its ranges
    are read at, and whether it wrote (at R)."""

    result: kv_pb2.TxnResult
    revision: int
    wrote: bool


def has_writes(body: kv_pb2.TxnBody) -> bool:
    """Whether a put, a delete or a range delete is on any path of `body`."""
    for op in (*body.success, *body.failure):
        which = op.WhichOneof("op")
        if which in ("put", "delete", "delete_range") or (which == "txn" and has_writes(op.txn)):
            return True
    return False


def cut_of(lasts: Iterable[int]) -> int:
    """A cut M from the revisions of every data group at a linearizable read point (each
    group's applied last there): the highest, and at least 1. A read at revision 0 is of the
    current state, not exact: a cluster that has written nothing is cut at 1, where it holds
    nothing (every revision is positive)."""
    return max(lasts, default=0) or 1


def unchecked(_b: bytes) -> None:
    """No limit (a transaction's keys and values are checked where they are read or written)."""


FirstAt = Callable[[bytes, bytes, int], Awaitable[bytes | None]]
"""The first key present in [start, end) (end b"": no end) exactly at a revision (None: none)."""
CurrentRead = Callable[[bytes], Awaitable["txn.Current | None"]]
"""A key's current version with its lease (`ReadingIO.current`)."""
NO_LEASE_READ = "read no lease (a version before Get's with_lease)"


def leased(g: kv_pb2.GetResponse) -> txn.Current | None:
    """A Get with_lease's answer as `txn.Current` with its lease (None: absent). Raises a
    definite `errors.Unavailable` if the node that served it did not read the lease (it predates
    with_lease: its silence is not "no lease")."""
    if not g.lease_read:
        raise errors.Unavailable(f"node {g.node_id} {NO_LEASE_READ}: a key's lease cannot be compared there")
    return txn.Current(g.value, g.create_revision, g.mod_revision, g.version, g.lease) if g.found else None


def lease_keys(t: txn.Txn) -> set[bytes]:
    """The keys LEASE compares name, on every path of `t`."""
    out = {c.key for c in t.compares if c.target == txn.Target.LEASE}
    for op in (*t.success, *t.failure):
        if op.txn is not None:
            out |= lease_keys(op.txn)
    return out


async def evaluate_at(body: kv_pb2.TxnBody, revision: int,
                      get_at: Callable[[bytes, int], Awaitable[txn.Current | None]],
                      first_at: FirstAt | None = None,
                      current: CurrentRead | None = None) -> kv_pb2.TxnResult | None:
    """`body`'s result on the state at `revision` (every key it names read exactly there by
    `get_at`: at most `scan_parts.PARALLEL` at once, one failing cancels the others), if the
    path it takes there writes nothing; else None. A body with range deletes needs `first_at`
    (else `txn.NoScanner`): the first key of each of its ranges at `revision` is enough to know
    whether the path writes (a range delete on a path that writes nothing before it deletes a
    key iff its range holds one; when nothing is written, every range taken is empty and its
    count, 0, exact). A body with LEASE compares needs `current` (else `NoLeaseReader`): each
    key they name present at `revision` is read now with its lease (module docstring), and
    None is returned (start again) if it has a newer version or is gone; an absent one has
    lease 0. Raises `txn.ResultTooLarge` as `txn.evaluate` does."""
    if not body.compares and not body.success and not body.failure:
        return kv_pb2.TxnResult(succeeded=True)
    t = txn_from_proto(body, unchecked, unchecked)
    keys = sorted({k for k, _ in txn.keys_of(t)})
    state = dict(zip(keys, await gather_parts([functools.partial(get_at, k, revision) for k in keys]), strict=True))
    if txn.compares_lease(t):
        if current is None:
            raise NoLeaseReader("a transaction with a LEASE compare evaluated without reading leases")
        present = sorted(k for k in lease_keys(t) if state[k] is not None)
        nows = await gather_parts([functools.partial(current, k) for k in present])
        for k, now in zip(present, nows, strict=True):
            at = state[k]
            assert at is not None  # `present`
            if now is None or now.mod_revision != at.mod_revision:
                return None  # a newer version (or none) now: its lease at `revision` is not known
            at.lease = now.lease
    ranges = sorted(set(txn.delete_ranges(t)))
    if ranges and first_at is None:
        raise txn.NoScanner("a transaction with a range delete evaluated without reading its ranges")
    firsts: dict[tuple[bytes, bytes], bytes | None] = {}
    if ranges and first_at is not None:
        found = await gather_parts([functools.partial(first_at, lo, hi, revision) for lo, hi in ranges])
        firsts = dict(zip(ranges, found, strict=True))

    def scan(lo: bytes, hi: bytes) -> list[bytes]:
        k = firsts[(lo, hi)]
        return [] if k is None else [k]

    out = txn.evaluate(t, state.__getitem__, revision, scan if ranges else None)
    if out.writes or out.result.revision:
        return None
    msg = kv_pb2.TxnResult()
    result_into(msg, t, out.result)
    return msg


async def run_reading(body: kv_pb2.TxnBody, io: ReadingIO, tries: int = TXN_READ_TRIES,
                      first_at: FirstAt | None = None) -> Reading:
    """Steps 1-3 of the module docstring: where `body` lands and the revision its ranges are to
    be read at (`first_at`: for a body with range deletes, see `evaluate_at`). Raises
    `Exhausted` (nothing written) after `tries` tries, and whatever the I/O raises."""
    writes = has_writes(body)
    for _attempt in range(tries):
        floor = await io.cut()
        if writes and io.can_write():
            result, rev = await io.write(body, floor)
            if rev:
                return Reading(result, rev, True)
            floor = await io.cut()  # the branch taken wrote nothing: a new cut after it
        evaluated = await evaluate_at(body, floor, io.get_at, first_at, io.current)
        if evaluated is not None:
            return Reading(evaluated, floor, False)
    raise Exhausted(f"the transaction's keys changed under each of {tries} tries; nothing was written")
