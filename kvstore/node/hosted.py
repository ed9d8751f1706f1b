"""Which nodes the groups hosted here list in their configurations, kept up to date as those
configurations change, so "is this node in any group hosted here?" is one dict lookup instead of
a walk over every group (`kvstore.node.inbound` asks it for every message from a stranger).

Invariant (kept by `Host`, which calls `update` wherever a core's configuration may change:
opening a group, stepping a message into it, proposing a conf change, after each Ready cycle,
and `drop` on closing it): `node in hosted` iff some hosted group's current configuration
(`core.conf`, voters or learners) lists `node`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.raft import ConfState


@dataclass(slots=True)
class HostedMembers:
    """node -> how many hosted groups list it; per group, the configuration last counted."""

    counts: dict[int, int] = field(default_factory=dict)
    confs: dict[int, ConfState] = field(default_factory=dict)

    def __contains__(self, node: int) -> bool:
        return node in self.counts

    def update(self, group: int, conf: ConfState) -> None:
        """`group`'s configuration is now `conf`. O(1) if it is the object counted last (a core
        replaces its `ConfState`, which is immutable, on every change), else O(members)."""
        old = self.confs.get(group)
        if old is conf:
            return
        self.confs[group] = conf
        if old is not None:
            if old == conf:
                return
            self._count(old, -1)
        self._count(conf, 1)

    def drop(self, group: int) -> None:
        """`group` is no longer hosted here."""
        old = self.confs.pop(group, None)
        if old is not None:
            self._count(old, -1)

    def _count(self, conf: ConfState, delta: int) -> None:
        counts = self.counts
        for node in conf.voters + conf.learners:
            n = counts.get(node, 0) + delta
            if n > 0:
                counts[node] = n
            else:
                counts.pop(node, None)
