"""The revision rules (docs/REVISIONS.md), checked on every seed of the whole-node simulator.

- Deterministic: every replica assigns the same revision to the same entry (group, index).
- Unique across groups: two different writes never share a revision (a write answered from the
  session cache, on a retry, repeats its first attempt's revision: same client and sequence).
- Strictly increasing in apply order within a group, and in the group's own slot.
- A write's reply carries the revision its entry was applied at; a write that changed state has
  one (> 0), and a failed compare or a delete of an absent key has none.
- A CLOSE is deterministic too, its result (the group's last revision after it) is at or above
  every revision the group assigned before it, and every write of the group after it gets a
  higher revision than that.

It also keeps every applied write's (revision, key, new value) once, so the scans of
`closed_reads.py` are checked against the state after exactly the writes <= R (`state_at`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands, mvcc, txn, xtxn
from kvstore.storage.commands import ApplyResult


class RevisionViolation(AssertionError):
    """A revision rule does not hold."""


@dataclass(slots=True)
class RevisionChecker:
    at: dict[tuple[int, int], int] = field(default_factory=dict)
    """(group, index) -> the revision its entry answered with (0: none)."""
    owner: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    """revision -> (group, index, client id, seq) of the write that was assigned it."""
    order: dict[int, list[tuple[int, int, bool]]] = field(default_factory=dict)
    """group -> sorted (index, revision, is a write) of the writes assigned a revision there and
    of the closes (revision: the group's last after the close)."""
    versions: dict[bytes, list[tuple[int, bytes | None]]] = field(default_factory=dict)
    """key -> (revision, value; None: deleted) of every applied write of it in a data group
    (the metadata group's are no client keys), ascending."""
    checks: int = 0
    committed: set[tuple[int, bytes]] = field(default_factory=set)
    """(group, transaction id) of the cross-group COMMITs recorded in `versions` (once each)."""
    prepared: dict[tuple[int, bytes], int] = field(default_factory=dict)
    """(group, transaction id) -> the revision its PREPARE reserved there."""
    held: dict[tuple[int, bytes], tuple[bytes, ...]] = field(default_factory=dict)
    """(group, transaction id) -> the keys its PREPARE put intents on there (the named ones and
    those a range or a lease's deletion found): such a COMMIT (`delete_prepared`) deletes exactly
    these."""

    def on_apply(self, node: int, group: int, index: int, data: bytes, res: ApplyResult,
                 deleted_at: Callable[[int], list[bytes]] | None = None) -> None:
        """Entry (group, index) with command `data` was applied on `node` with result `res`.
        `deleted_at(rev)`: the keys the group's change log deleted at `rev` (a lease's deletion
        names no keys in its command)."""
        try:
            cmd = commands.decode_command(data)
        except ValueError:
            return
        if cmd.op == commands.Op.COMPACT:
            return
        self.checks += 1
        rev = res.revision
        seen = self.at.setdefault((group, index), rev)
        if seen != rev:
            raise RevisionViolation(
                f"determinism: n{node} applied g{group} index {index} at revision {rev}, another replica at {seen}"
            )
        if cmd.op == commands.Op.CLOSE:
            if not res.error:
                self._place(group, index, rev, False)
            return
        if cmd.op == commands.Op.TXN:
            self._on_txn(group, index, cmd, res)
            return
        if cmd.op in commands.X_OPS:
            self._on_cross(group, index, cmd, res)
            return
        if cmd.lease is not None:
            self._on_lease(group, index, cmd, res, deleted_at)
            return
        wrote = not res.error and (cmd.op == commands.Op.PUT or res.swapped or res.existed)
        if not wrote:
            if rev and cmd.op != commands.Op.PUT and not res.error:
                raise RevisionViolation(f"g{group} index {index}: a write that changed nothing has revision {rev}")
            return
        if rev <= 0:
            raise RevisionViolation(f"g{group} index {index}: a {cmd.op.name} that changed state has no revision")
        who = (group, index, cmd.client_id, cmd.seq)
        first = self.owner.setdefault(rev, who)
        if first[:2] != who[:2]:
            if cmd.client_id and first[2:] == who[2:]:
                return  # the retry of a write, answered from the session cache
            raise RevisionViolation(
                f"uniqueness: revision {rev} assigned to g{first[0]} index {first[1]} and to g{group} index {index}"
            )
        if rev % mvcc.STEP != mvcc.slot_of(group):
            raise RevisionViolation(f"g{group} index {index}: revision {rev} is not in the group's slot")
        if self._place(group, index, rev, True) and group != META_GROUP:
            vs = self.versions.setdefault(cmd.key, [])
            vs.insert(bisect_left(vs, rev, key=_rev), (rev, None if cmd.op == commands.Op.DELETE else cmd.value))

    def _on_txn(self, group: int, index: int, cmd: commands.Command, res: ApplyResult) -> None:
        """A transaction: every key it wrote (`txn.writes_of` its result) at the one revision
        of its result, which it has iff it wrote something."""
        rev = res.revision
        if res.error or res.txn is None:
            if rev:
                raise RevisionViolation(f"g{group} index {index}: a refused transaction has revision {rev}")
            return
        assert cmd.txn is not None
        try:
            writes = txn.writes_of(cmd.txn, res.txn)
        except ValueError as err:
            raise RevisionViolation(f"g{group} index {index}: {err}") from None
        if bool(writes) != bool(rev) or res.txn.revision != rev:
            raise RevisionViolation(
                f"g{group} index {index}: a transaction with {len(writes)} writes has revision {rev} "
                f"(its result says {res.txn.revision})"
            )
        if not writes:
            return
        who = (group, index, cmd.client_id, cmd.seq)
        first = self.owner.setdefault(rev, who)
        if first[:2] != who[:2]:
            if cmd.client_id and first[2:] == who[2:]:
                return  # the retry of a transaction, answered from the session cache
            raise RevisionViolation(
                f"uniqueness: revision {rev} assigned to g{first[0]} index {first[1]} and to g{group} index {index}"
            )
        if rev % mvcc.STEP != mvcc.slot_of(group):
            raise RevisionViolation(f"g{group} index {index}: revision {rev} is not in the group's slot")
        if self._place(group, index, rev, True) and group != META_GROUP:
            for key, value in writes:
                vs = self.versions.setdefault(key, [])
                vs.insert(bisect_left(vs, rev, key=_rev), (rev, value))

    def _on_cross(self, group: int, index: int, cmd: commands.Command, res: ApplyResult) -> None:
        """A cross-group transaction's command (docs/REVISIONS.md, "Transactions across groups"):
        a PREPARE reserves a revision in the group's slot, above everything before it in apply
        order (placed like a write); a COMMIT writes its keys at R, which some participant
        reserved (unique: its owner is that PREPARE), possibly below the group's later entries
        (the one exception to the apply order: not placed), once per group and transaction."""
        x = cmd.x
        assert x is not None
        if res.error:
            return
        if cmd.op == commands.Op.PREPARE:
            rev = res.revision
            old = self.prepared.get((group, x.txn.encode()))
            if old is not None:  # another replica of the entry, or the same PREPARE again (idempotent)
                if old != rev:
                    raise RevisionViolation(f"g{group} index {index}: a transaction prepared at two revisions")
                return
            self.prepared[(group, x.txn.encode())] = rev
            found = xtxn.decode_found(res.current) if (x.lock is not None or x.lease) and res.current else []
            self.held[(group, x.txn.encode())] = (*x.keys, *found)
            if rev % mvcc.STEP != mvcc.slot_of(group):
                raise RevisionViolation(f"g{group} index {index}: PREPARE reserved {rev}, not in the group's slot")
            first = self.owner.setdefault(rev, (group, index, 0, 0))
            if first[:2] != (group, index) and first[0] != group:
                raise RevisionViolation(
                    f"uniqueness: revision {rev} assigned to g{first[0]} index {first[1]} and reserved by g{group} "
                    f"index {index}"
                )
            self._place(group, index, rev, True)
            return
        if cmd.op == commands.Op.COMMIT and (group, x.txn.encode()) not in self.committed:
            self.committed.add((group, x.txn.encode()))
            if group != META_GROUP:
                held = self.held.get((group, x.txn.encode()), ())
                writes: list[tuple[bytes, bytes | None]] = (
                    [(k, None) for k in held] if x.delete_prepared else list(x.writes))
                if x.ranges:  # a transaction's range deletes: every other key it prepared in one
                    named = {k for k, _ in x.writes}
                    writes += [(k, None) for k in held
                               if k not in named and any(txn.in_range(k, lo, hi) for lo, hi in x.ranges)]
                if x.leased and res.current:  # leased puts of a lease found dead here: deleted instead
                    dead = set(xtxn.decode_found(res.current))
                    writes = [(k, None if k in dead else v) for k, v in writes]
                for key, value in writes:
                    vs = self.versions.setdefault(key, [])
                    i = bisect_right(vs, x.at, key=_rev)
                    if value is None and (i == 0 or vs[i - 1][1] is None):
                        continue  # a delete of an absent key writes nothing (as at apply)
                    if any(r == x.at for r, _ in vs):
                        raise RevisionViolation(f"g{group} index {index}: key {key!r} written twice at {x.at}")
                    vs.insert(bisect_left(vs, x.at, key=_rev), (x.at, value))
    def _on_lease(self, group: int, index: int, cmd: commands.Command, res: ApplyResult,
                  deleted_at: Callable[[int], list[bytes]] | None) -> None:
        """A lease command: LEASE_PUT writes its key; REVOKE, EXPIRE and DROP delete the lease's
        keys in the group at one revision (read back from the change log); the others write
        nothing and have no revision."""
        rev = res.revision
        if not rev:
            return
        if res.error:
            raise RevisionViolation(f"g{group} index {index}: a refused lease command has revision {rev}")
        first = self.owner.setdefault(rev, (group, index, cmd.client_id, cmd.seq))
        if first[:2] != (group, index):
            raise RevisionViolation(
                f"uniqueness: revision {rev} assigned to g{first[0]} index {first[1]} and to g{group} index {index}"
            )
        if rev % mvcc.STEP != mvcc.slot_of(group):
            raise RevisionViolation(f"g{group} index {index}: revision {rev} is not in the group's slot")
        if not self._place(group, index, rev, True) or group == META_GROUP:
            return
        writes: list[tuple[bytes, bytes | None]]
        if cmd.op == commands.Op.LEASE_PUT:
            writes = [(cmd.key, cmd.value)]
        else:
            writes = [(k, None) for k in (deleted_at(rev) if deleted_at is not None else [])]
        for key, value in writes:
            vs = self.versions.setdefault(key, [])
            vs.insert(bisect_left(vs, rev, key=_rev), (rev, value))

    def _place(self, group: int, index: int, rev: int, write: bool) -> bool:
        """Put (index, rev) in the group's apply order, checking its neighbours: revisions never
        go down along the log, and a write's is above everything before it (a close's may equal
        the revision before it). False if the entry was placed already."""
        lst = self.order.setdefault(group, [])
        i = bisect_left(lst, (index, -1, False))
        if i < len(lst) and lst[i][0] == index:
            return False
        before = lst[i - 1] if i else None
        after = lst[i] if i < len(lst) else None
        bad = (before is not None and (before[1] >= rev if write else before[1] > rev)) or (
            after is not None and (after[1] <= rev if after[2] else after[1] < rev)
        )
        if bad:
            near = [x[:2] for x in (before, after) if x]
            raise RevisionViolation(
                f"order: g{group} index {index} ({'write' if write else 'close'}) got revision {rev}; "
                f"neighbours (index, revision): {near}"
            )
        lst.insert(i, (index, rev, write))
        return True

    def state_at(self, revision: int) -> dict[bytes, bytes]:
        """Every key's value after exactly the applied writes with revision <= `revision`."""
        out: dict[bytes, bytes] = {}
        for key, vs in self.versions.items():
            i = bisect_right(vs, revision, key=_rev) - 1
            if i >= 0 and vs[i][1] is not None:
                value = vs[i][1]
                assert value is not None
                out[key] = value
        return out

    def on_reply(self, group: int, res: ApplyResult) -> None:
        """A write's reply `res` (of entry (group, res.index)) reached its client."""
        self.checks += 1
        applied = self.at.get((group, res.index))
        if applied is not None and applied != res.revision:
            raise RevisionViolation(
                f"reply: g{group} index {res.index} answered revision {res.revision}, its entry applied at {applied}"
            )


def _rev(version: tuple[int, bytes | None]) -> int:
    return version[0]
