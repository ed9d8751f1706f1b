"""What a watch asks for and what it is answered: validated requests and replies, no I/O.

`WatchSpec.make` turns the fields of an etcd-shaped create request into a checked spec (a
definite `InvalidArgument` / `KeyTooLarge` for anything hostile: negative revisions, empty or
inverted ranges, oversized keys), so nothing unchecked reaches the hub (`watch.py`). `Reply` is
what the hub queues for a stream; the gRPC adapter (`server/watch_service.py`) turns it into a
`WatchResponse`. `check_groups` checks the groups a create names (a sub-watch of a merged
watch: `kvstore/client/watchmerge.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore import errors
from kvstore.keyspace import prefix_end
from kvstore.storage import mvcc
from kvstore.storage.changefeed import Change

ALL_KEYS_END = b"\0"
"""etcd's range_end meaning "every key >= key"."""


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """A checked watch: the keys in [start, end) (end None: to the end of the key space; a single
    key has end = key + b"\\0"), from `start_revision` (0: from the frontier at creation)."""

    start: bytes
    end: bytes | None
    start_revision: int = 0
    prev_kv: bool = False
    progress_notify: bool = False
    no_put: bool = False
    no_delete: bool = False

    @property
    def single_key(self) -> bool:
        return self.end == self.start + b"\0"

    def matches(self, key: bytes) -> bool:
        return self.start <= key and (self.end is None or key < self.end)

    @staticmethod
    def make(
        key: bytes, range_end: bytes = b"", prefix: bytes = b"", start_revision: int = 0, *,
        prev_kv: bool = False, progress_notify: bool = False, no_put: bool = False, no_delete: bool = False,
        max_key: int = 4096,
    ) -> WatchSpec:
        """The spec of a create request's fields, or a definite error naming what is wrong."""
        for name, b in (("key", key), ("range_end", range_end), ("prefix", prefix)):
            if len(b) > max_key:
                raise errors.KeyTooLarge(message=f"watch {name} of {len(b)} bytes is longer than the longest key ({max_key})")
        if start_revision < 0:
            raise errors.InvalidArgument(f"watch start revision {start_revision} is negative")
        if start_revision > mvcc.REVISION_MAX:
            raise errors.InvalidArgument(f"watch start revision {start_revision} is beyond int64")
        if prefix:
            if key or range_end:
                raise errors.InvalidArgument("a watch takes a prefix or a key (with range_end), not both")
            start, end = prefix, prefix_end(prefix)
        elif range_end == ALL_KEYS_END:
            start, end = key, None
        elif not range_end:
            if not key:
                raise errors.InvalidArgument("a watch needs a key, a range or a prefix")
            start, end = key, key + b"\0"
        else:
            if range_end <= key:
                raise errors.InvalidArgument("the watch range is empty (range_end <= key)")
            start, end = key, range_end
        return WatchSpec(start, end, start_revision, prev_kv, progress_notify, no_put, no_delete)


MAX_WATCH_GROUPS = 1024
"""Groups a create may name (`WatchCreateRequest.groups`)."""


def check_groups(asked: Sequence[int], allowed: Sequence[int]) -> list[int]:
    """The groups a create names, checked against `allowed` (the data groups of this node's map
    the range may live in): at most `MAX_WATCH_GROUPS`, no duplicates, each allowed; else a definite
    InvalidArgument naming what is wrong. (Whether this node hosts them is the hub's check:
    WRONG_SHARD.)"""
    if len(asked) > MAX_WATCH_GROUPS:
        raise errors.InvalidArgument(f"a watch names at most {MAX_WATCH_GROUPS} groups ({len(asked)} named)")
    if len(set(asked)) != len(asked):
        raise errors.InvalidArgument("a watch names a group twice")
    ok = set(allowed)
    bad = sorted(g for g in asked if g not in ok)
    if bad:
        raise errors.InvalidArgument(
            f"group(s) {', '.join(map(str, bad[:16]))} are not data groups of the watched range in this node's "
            f"shard map (it has {', '.join(map(str, allowed[:64]))})")
    return sorted(asked)


@dataclass(slots=True)
class Reply:
    """One response of a watch stream. `revision`: every event of the watch at or below it has
    been sent (in this reply or an earlier one). A canceled reply with `resume_revision` can be
    resumed there (nothing missed, nothing repeated); `error` is why (always definite)."""

    watch_id: int
    revision: int = 0
    events: list[Change] = field(default_factory=list)
    created: bool = False
    canceled: bool = False
    cancel_reason: str = ""
    compact_revision: int = 0
    resume_revision: int = 0
    error: errors.KVError | None = None
    size: int = 64
    """Bytes it takes, roughly (for the stream's and the node's buffer bounds)."""
