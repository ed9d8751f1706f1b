"""Cluster alarms (etcd's NOSPACE): replicated in the metadata group, obeyed by every node.

The alarms are the value of the reserved key `ALARMS_KEY` in group 0 (clients cannot reach it:
keys route to data groups only), changed only by compare-and-swap of the whole encoded set, as
the shard map is. So raising and disarming are linearizable steps, survive restarts and travel
in group 0's log and snapshots like the map; every node learns them from its own applied state
(`AlarmTracker`, refreshed after each Ready cycle).

NOSPACE: a node whose store's used size exceeds `--quota-bytes` raises it (`QuotaWatch` decides,
on a timer of the asyncio shell). While any NOSPACE alarm is raised, every node refuses new
puts and compare-and-swaps (NOSPACE, definite) and serves reads and deletes, so an operator
can free space. It does NOT clear by itself: an operator disarms it (`kvctl alarm disarm`)
once deletes, history compaction (a deleted key's versions stay until compacted) and log
compaction brought the store back under the quota. Why not automatically:
a store hovering at its quota would flap between refusing and accepting writes with each delete
and put, and a cluster that hit its quota is something an operator must see, not something that
silently comes and goes (etcd does the same). A disarm while the store is still over the quota
does not stick: the node raises the alarm again at its next check.

Everything here is synchronous and pure: encodings are total (`decode_alarms` raises
`ValueError` on any malformed value, never anything else), time comes in as `now`.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from kvstore.node.metakey import MetaKeyTracker
from kvstore.node.store import NodeStore

__all__ = ["ALARMS_KEY", "Alarm", "AlarmTracker", "AlarmType", "QuotaWatch", "decode_alarms", "encode_alarms"]

log = logging.getLogger("kvstore.alarms")

ALARMS_KEY = b"\x00kvstore/alarms"
"""The reserved key of the alarm set in the metadata group (group 0)."""
_MAGIC = b"KVA1"
_ENTRY = struct.Struct(">QB")
MAX_ALARMS = 4096
"""More alarms than this in one value is malformed (one per node and type is the most there is)."""


class AlarmType(enum.IntEnum):
    NOSPACE = 1


@dataclass(frozen=True, slots=True, order=True)
class Alarm:
    node: int
    type: AlarmType


def encode_alarms(alarms: Iterable[Alarm]) -> bytes:
    """The canonical encoding: magic, count, then (node u64, type u8) in sorted order, no duplicates."""
    items = sorted(set(alarms))
    return _MAGIC + struct.pack(">I", len(items)) + b"".join(_ENTRY.pack(a.node, int(a.type)) for a in items)


def decode_alarms(data: bytes) -> frozenset[Alarm]:
    """The alarm set of a stored value; `ValueError` for anything but a canonical encoding."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise ValueError("not an alarm set")
    (n,) = struct.unpack_from(">I", data, 4)
    if n > MAX_ALARMS or len(data) != 8 + n * _ENTRY.size:
        raise ValueError(f"alarm set of {len(data)} bytes does not hold {n} alarms")
    out: list[Alarm] = []
    for i in range(n):
        node, kind = _ENTRY.unpack_from(data, 8 + i * _ENTRY.size)
        if node < 1 or node >= 1 << 63:
            raise ValueError(f"alarm for node id {node}")
        try:
            out.append(Alarm(node, AlarmType(kind)))
        except ValueError:
            raise ValueError(f"unknown alarm type {kind}") from None
    if out != sorted(set(out)):
        raise ValueError("alarm set not in canonical order")
    return frozenset(out)


class AlarmTracker(MetaKeyTracker[frozenset[Alarm]]):
    """The alarm set as of the metadata group's applied state on this node (`raw`: the stored
    value it was decoded from, None if never raised: what a CAS of the set expects). A stored
    value that does not decode is logged and the last good set stays in force."""

    __slots__ = ("nospace",)

    def __init__(self, store: NodeStore) -> None:
        super().__init__(store, ALARMS_KEY, "alarm set", decode_alarms, frozenset(), absent=frozenset())
        self.nospace = False
        """Some node's NOSPACE alarm is raised: refuse puts and CAS (the per-write check)."""

    @property
    def alarms(self) -> frozenset[Alarm]:
        return self.value

    @property
    def raw(self) -> bytes | None:
        return self.stored

    def _updated(self, old: frozenset[Alarm], new: frozenset[Alarm]) -> None:
        if new != old:
            log.warning("cluster alarms now: %s", ", ".join(f"{a.type.name}@node{a.node}" for a in sorted(new)) or "none")
        self.nospace = any(a.type == AlarmType.NOSPACE for a in new)


def with_alarm(alarms: frozenset[Alarm], alarm: Alarm) -> bytes:
    return encode_alarms(alarms | {alarm})


def without_alarms(alarms: frozenset[Alarm], node: int = 0, kind: AlarmType | None = None) -> bytes:
    """The set with the matching alarms removed (node 0: every node's; kind None: every type)."""
    return encode_alarms(a for a in alarms if not ((node == 0 or a.node == node) and (kind is None or a.type == kind)))


@dataclass(slots=True)
class QuotaWatch:
    """Decides when this node raises NOSPACE: its store's used bytes above `quota` and no NOSPACE
    of this node in the applied set. A raise in flight is not repeated within `backoff` seconds."""

    node: int
    quota: int
    backoff: float = 1.0
    used: int = 0
    """The last measurement of the store's live bytes."""
    checks: int = 0
    """Measurements so far."""
    _raising_at: float = float("-inf")

    def should_raise(self, used: int, alarms: frozenset[Alarm], now: float) -> bool:
        self.used = used
        self.checks += 1
        if self.quota <= 0 or used <= self.quota:
            return False
        if Alarm(self.node, AlarmType.NOSPACE) in alarms:
            return False
        if now - self._raising_at < self.backoff:
            return False
        self._raising_at = now
        return True
