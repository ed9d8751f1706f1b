"""The revision rules (docs/REVISIONS.md), checked on every seed of the whole-node simulator.

- Deterministic: every replica assigns the same revision to the same entry (group, index).
- Unique across groups: two different writes never share a revision (a write answered from the
  session cache, on a retry, repeats its first attempt's revision: same client and sequence).
- Strictly increasing in apply order within a group, and in the group's own slot.
- A write's reply carries the revision its entry was applied at; a write that changed state has
  one (> 0), and a failed compare or a delete of an absent key has none.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from kvstore.storage import commands, mvcc
from kvstore.storage.commands import ApplyResult


class RevisionViolation(AssertionError):
    """A revision rule does not hold."""


@dataclass(slots=True)
class RevisionChecker:
    at: dict[tuple[int, int], int] = field(default_factory=dict)
    """(group, index) -> the revision its entry answered with (0: none)."""
    owner: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    """revision -> (group, index, client id, seq) of the write that was assigned it."""
    order: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """group -> sorted (index, revision) of the writes assigned a revision there."""
    checks: int = 0

    def on_apply(self, node: int, group: int, index: int, data: bytes, res: ApplyResult) -> None:
        """Entry (group, index) with command `data` was applied on `node` with result `res`."""
        try:
            cmd = commands.decode_command(data)
        except ValueError:
            return
        if cmd.op == commands.Op.COMPACT or cmd.op == commands.Op.CLOSE:
            return
        self.checks += 1
        rev = res.revision
        seen = self.at.setdefault((group, index), rev)
        if seen != rev:
            raise RevisionViolation(
                f"determinism: n{node} applied g{group} index {index} at revision {rev}, another replica at {seen}"
            )
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
        lst = self.order.setdefault(group, [])
        i = bisect_left(lst, (index, -1))
        if i < len(lst) and lst[i][0] == index:
            return
        if (i > 0 and lst[i - 1][1] >= rev) or (i < len(lst) and lst[i][1] <= rev):
            near = [x for x in (lst[i - 1] if i else None, lst[i] if i < len(lst) else None) if x]
            raise RevisionViolation(
                f"order: g{group} index {index} got revision {rev}; neighbours (index, revision): {near}"
            )
        lst.insert(i, (index, rev))

    def on_reply(self, group: int, res: ApplyResult) -> None:
        """A write's reply `res` (of entry (group, res.index)) reached its client."""
        self.checks += 1
        applied = self.at.get((group, res.index))
        if applied is not None and applied != res.revision:
            raise RevisionViolation(
                f"reply: g{group} index {res.index} answered revision {res.revision}, its entry applied at {applied}"
            )
