"""etcd's six watch guarantees, checked on recorded watch histories (pure: no I/O, no clock).

Used by kvchaos on what its watchers recorded through the client library (`chaos/watchers.py`)
and, for the per-response checks, by the simulator (`chaos/sim/watches.py`), as etcd-io/etcd
`tests/robustness/validate/watch.go` checks its robustness runs (docs/REVISIONS.md, "Watch").

A watcher's history is its batches (responses) in arrival order, across the client's transparent
resumes. Its *window* is ``[lo, hi]``: ``lo`` is its start revision (for a start of 0, "now",
which the client does not report: the first batch's revision + 1 if it was a progress
notification, else its first event's revision, so nothing before the first delivery is assumed)
and ``hi`` its last bookmark (the highest batch revision). Checked:

- **ordered**: event revisions never decrease inside a batch and strictly increase from a batch
  to the next; batch revisions never decrease;
- **unique**: no (key, revision) twice;
- **atomic**: all events of one revision come in one batch; and across watchers, a revision in
  both windows gives the same events for the keys both watch (so an indeterminate write that
  shows up in one watcher shows up in every overlapping one);
- **bookmarkable**: a batch's revision is >= each of its events, and every later event is above
  it (a progress notification is a bookmark like any other);
- **reliable**: every acknowledged write (known revision) of the watcher's range inside its window
  appears, at that revision, with its value; every event is a write that was issued and may have
  taken effect (PUT: its unique value, at the write's revision when known; DELETE: a delete of the
  key), in the watched range and window; with prev_kv, an event's previous value is the key's
  previous event in the same watcher (when there was one), and versions / create revisions follow
  the key's events (PUT after PUT: version + 1, same create revision; after a DELETE: version 1);
- **resumable**: implied by the above across the client's resumes (counted, not checked apart);
- **live**: a watcher that ran to the end was told about every acknowledged write: its last
  bookmark is at or above the highest acknowledged write revision (`check_all(end_revision=...)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BatchCheck",
    "FeedState",
    "KeyRange",
    "WatchBatchRecord",
    "WatchCheckResult",
    "WatchEventRecord",
    "WatcherLog",
    "WriteRecord",
    "check_all",
    "check_batch",
]

PROPERTIES = ("ordered", "unique", "atomic", "bookmarkable", "reliable", "live")

MAX_MESSAGES = 30
"""Violations described in a result (all are counted)."""


@dataclass(slots=True, frozen=True)
class KeyRange:
    """What a watch covers: one key (``end`` None), or ``[start, end)`` (``end`` "": no upper
    bound). Keys are compared as UTF-8 bytes, as the server does."""

    start: str
    end: str | None = None

    def matches(self, key: str) -> bool:
        if self.end is None:
            return key == self.start
        k = key.encode()
        return self.start.encode() <= k and (self.end == "" or k < self.end.encode())

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyRange:
        return cls(str(d["start"]), None if d.get("end") is None else str(d["end"]))


@dataclass(slots=True, frozen=True)
class WatchEventRecord:
    """One event as the client got it: ``kind`` "PUT" or "DELETE" (``value`` None), ``prev`` the
    previous value with prev_kv (None: absent, or not asked)."""

    kind: str
    key: str
    value: str | None
    revision: int
    create_revision: int = 0
    version: int = 0
    prev: str | None = None

    def to_json(self) -> list[Any]:
        return [self.kind, self.key, self.value, self.revision, self.create_revision, self.version, self.prev]

    @classmethod
    def from_json(cls, d: Sequence[Any]) -> WatchEventRecord:
        kind, key, value, rev, crev, ver, prev = d
        return cls(str(kind), str(key), value, int(rev), int(crev), int(ver), prev)


@dataclass(slots=True)
class WatchBatchRecord:
    """One response: ``revision`` covers every event at or below it."""

    revision: int
    events: list[WatchEventRecord]
    t: float = 0.0
    node: int = 0


@dataclass(slots=True)
class WatcherLog:
    """One watcher's whole history (across the client's resumes)."""

    id: int
    range: KeyRange
    start_revision: int = 0
    prev_kv: bool = False
    batches: list[WatchBatchRecord] = field(default_factory=list)
    resumes: int = 0
    ended: str = ""
    """Why it stopped: "stopped" (by the harness, after the final reads) or an error."""
    breaches: int = 0
    """Sub-watch responses of a merged watch that broke the watch contract (the client library
    hid them by restarting the watch: each is a server-side violation)."""

    def window(self) -> tuple[int, int] | None:
        """``[lo, hi]`` of the module docstring (None: nothing delivered)."""
        if not self.batches:
            return None
        hi = max(b.revision for b in self.batches)
        if self.start_revision:
            return self.start_revision, hi
        first = self.batches[0]
        lo = first.events[0].revision if first.events else first.revision + 1
        return lo, hi


@dataclass(slots=True, frozen=True)
class WriteRecord:
    """A write the workload issued: ``value`` None for a delete. ``acked``: it took effect
    (put ok, cas ok and swapped, delete ok of an existing key); otherwise it may have
    (indeterminate). Writes that definitely did nothing are not recorded. ``revision`` 0: not
    known."""

    key: str
    value: str | None
    revision: int
    acked: bool


@dataclass(slots=True)
class FeedState:
    """What the per-response checks remember of one watch. Invariant: ``bookmark`` is the highest
    response revision seen, ``last_event`` the highest event revision, ``seen`` every (key,
    revision) delivered."""

    bookmark: int = 0
    last_event: int = 0
    seen: set[tuple[bytes | str, int]] = field(default_factory=set)


@dataclass(slots=True)
class BatchCheck:
    """A violation found by :func:`check_batch`."""

    prop: str
    message: str


def check_batch(state: FeedState, revision: int, events: Iterable[tuple[int, bytes | str]]) -> BatchCheck | None:
    """The per-response checks (ordered, unique, atomic, bookmarkable) of one response at
    ``revision`` with ``events`` ((revision, key) in order); updates ``state`` when it passes.
    Shared by kvchaos and the simulator."""
    if revision < state.bookmark:
        return BatchCheck("bookmarkable", f"a reply at revision {revision} after one at {state.bookmark}")
    prev = state.last_event
    first = True
    batch: set[tuple[bytes | str, int]] = set()
    for rev, key in events:
        if (key, rev) in state.seen or (key, rev) in batch:
            return BatchCheck("unique", f"event ({rev}, {key!r}) delivered twice")
        if first and rev == state.last_event and rev > 0:
            return BatchCheck("atomic", f"revision {rev} split over two replies (event {key!r})")
        if rev <= state.bookmark:
            return BatchCheck("bookmarkable", f"event ({rev}, {key!r}) at or below the revision {state.bookmark} "
                              "an earlier reply said was complete")
        if rev < prev:
            return BatchCheck("ordered", f"event ({rev}, {key!r}) after an event at {prev}")
        if rev > revision:
            return BatchCheck("bookmarkable", f"event ({rev}, {key!r}) in a reply at revision {revision}")
        batch.add((key, rev))
        prev = rev
        first = False
    state.seen |= batch
    state.last_event = prev
    state.bookmark = revision
    return None


@dataclass
class WatchCheckResult:
    """The verdict on a run's watchers."""

    watchers: int = 0
    batches: int = 0
    progress: int = 0
    events: int = 0
    resumes: int = 0
    acked_checked: int = 0
    """Acknowledged writes inside some watcher's range and window (each must have been delivered)."""
    indeterminate_seen: int = 0
    """Indeterminate writes that some watcher delivered (so they took effect)."""
    cross_checked: int = 0
    """(pair of watchers, revision) comparisons of the atomic check across watchers."""
    violations: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    ended: dict[str, int] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.violations

    def add(self, prop: str, message: str) -> None:
        self.violations[prop] = self.violations.get(prop, 0) + 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{prop}: {message}")

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid, "watchers": self.watchers, "batches": self.batches, "progress": self.progress,
            "events": self.events, "resumes": self.resumes, "acked_checked": self.acked_checked,
            "indeterminate_seen": self.indeterminate_seen, "cross_checked": self.cross_checked,
            "violations": dict(sorted(self.violations.items())), "messages": self.messages,
            "ended": dict(sorted(self.ended.items())),
        }


def _check_feed(w: WatcherLog, res: WatchCheckResult) -> list[WatchEventRecord]:
    """The per-response checks over one watcher; returns the events delivered (each once)."""
    state = FeedState()
    good: list[WatchEventRecord] = []
    where = f"watcher {w.id} ({_describe(w)})"
    for b in w.batches:
        res.batches += 1
        if not b.events:
            res.progress += 1
        bad = check_batch(state, b.revision, [(e.revision, e.key) for e in b.events])
        if bad is None:
            good.extend(b.events)
            continue
        res.add(bad.prop, f"{where}, response at {b.revision} from node {b.node} ({b.t:.1f}s): {bad.message}")
        # Go on from what it delivered (each event once), so one fault is reported once.
        for e in b.events:
            if (e.key, e.revision) not in state.seen:
                state.seen.add((e.key, e.revision))
                good.append(e)
            state.last_event = max(state.last_event, e.revision)
        state.bookmark = max(state.bookmark, b.revision)
    res.events += sum(len(b.events) for b in w.batches)
    return good


def _describe(w: WatcherLog) -> str:
    r = w.range
    what = f"key {r.start!r}" if r.end is None else "every key" if (r.start, r.end) == ("\0", "") else (
        f"[{r.start!r}, {r.end!r})")
    return f"{what} from {w.start_revision}" + (" prev_kv" if w.prev_kv else "")


def _check_events(w: WatcherLog, events: list[WatchEventRecord], writes: Sequence[WriteRecord],
                  by_value: dict[tuple[str, str], list[WriteRecord]], deletes: dict[str, list[WriteRecord]],
                  res: WatchCheckResult, indeterminate: set[tuple[str, int]]) -> None:
    """reliable (both ways), the range and window, prev_kv and versions of one watcher."""
    where = f"watcher {w.id} ({_describe(w)})"
    window = w.window()
    lo = window[0] if window is not None else 0
    last: dict[str, WatchEventRecord] = {}
    values: dict[tuple[str, str], int] = {}
    for e in events:
        if not w.range.matches(e.key) or (w.start_revision and e.revision < w.start_revision):
            res.add("reliable", f"{where}: event {e.kind} {e.key!r} at {e.revision} is outside the watch")
        if e.kind == "PUT":
            cands = by_value.get((e.key, e.value or ""), [])
            if not cands:
                res.add("reliable", f"{where}: event PUT {e.key!r}={e.value!r} at {e.revision}: no such write was issued")
            elif all(c.revision and c.revision != e.revision for c in cands):
                res.add("reliable", f"{where}: event PUT {e.key!r}={e.value!r} at {e.revision}: the write was "
                        f"acknowledged at {cands[0].revision}")
            elif not any(c.acked for c in cands):
                indeterminate.add((e.key, e.revision))
            seen_at = values.get((e.key, e.value or ""))
            if seen_at is not None and seen_at != e.revision:
                res.add("reliable", f"{where}: value {e.value!r} of {e.key!r} delivered at {seen_at} and {e.revision}")
            values[(e.key, e.value or "")] = e.revision
        elif e.kind == "DELETE":
            cands = deletes.get(e.key, [])
            if not any(c.revision == e.revision or not c.revision for c in cands):
                res.add("reliable", f"{where}: event DELETE {e.key!r} at {e.revision}: no such delete was issued")
            elif not any(c.acked and c.revision == e.revision for c in cands):
                indeterminate.add((e.key, e.revision))
        else:
            res.add("reliable", f"{where}: event of unknown kind {e.kind!r}")
        before = last.get(e.key)
        if w.prev_kv and before is not None:
            want = before.value if before.kind == "PUT" else None
            if e.prev != want:
                res.add("reliable", f"{where}: event {e.kind} {e.key!r} at {e.revision} has prev_kv {e.prev!r}, "
                        f"its previous event (at {before.revision}) left {want!r}")
        if not w.prev_kv and e.prev is not None:
            res.add("reliable", f"{where}: event {e.kind} {e.key!r} at {e.revision} carries a prev_kv nobody asked for")
        if e.kind == "PUT" and before is not None:
            if before.kind == "PUT" and (e.version != before.version + 1 or e.create_revision != before.create_revision):
                res.add("reliable", f"{where}: PUT {e.key!r} at {e.revision} has version {e.version} created at "
                        f"{e.create_revision} after version {before.version} created at {before.create_revision}")
            if before.kind == "DELETE" and (e.version != 1 or e.create_revision != e.revision):
                res.add("reliable", f"{where}: PUT {e.key!r} at {e.revision} after a delete has version {e.version} "
                        f"created at {e.create_revision}")
        last[e.key] = e
    if window is None:
        return
    hi = window[1]
    got = {(e.key, e.revision): e for e in events}
    for wr in writes:
        if not wr.acked or not wr.revision or not (lo <= wr.revision <= hi) or not w.range.matches(wr.key):
            continue
        res.acked_checked += 1
        ev = got.get((wr.key, wr.revision))
        kind = "PUT" if wr.value is not None else "DELETE"
        if ev is None or ev.kind != kind or (wr.value is not None and ev.value != wr.value):
            what = "missing" if ev is None else f"delivered as {ev.kind} {ev.value!r}"
            res.add("reliable", f"{where}, window [{lo}, {hi}]: acknowledged {kind} {wr.key!r}"
                    + (f"={wr.value!r}" if wr.value is not None else "") + f" at {wr.revision} {what}")


def _check_across(logs: Sequence[WatcherLog], events: dict[int, list[WatchEventRecord]], res: WatchCheckResult) -> None:
    """atomic across watchers: a revision in two windows gives both the same events for the keys
    both watch."""
    by_rev: dict[int, dict[int, set[tuple[str, str, str | None]]]] = {}
    for w in logs:
        by_rev[w.id] = {}
        for e in events[w.id]:
            by_rev[w.id].setdefault(e.revision, set()).add((e.key, e.kind, e.value))
    windows = {w.id: w.window() for w in logs}
    for i, a in enumerate(logs):
        wa = windows[a.id]
        if wa is None:
            continue
        for b in logs[i + 1:]:
            wb = windows[b.id]
            if wb is None:
                continue
            lo, hi = max(wa[0], wb[0]), min(wa[1], wb[1])
            if lo > hi:
                continue
            revs = {r for r in by_rev[a.id] if lo <= r <= hi} | {r for r in by_rev[b.id] if lo <= r <= hi}
            for r in sorted(revs):
                ea = {x for x in by_rev[a.id].get(r, ()) if b.range.matches(x[0])}
                eb = {x for x in by_rev[b.id].get(r, ()) if a.range.matches(x[0])}
                if not ea and not eb:
                    continue
                res.cross_checked += 1
                if ea != eb:
                    res.add("atomic", f"revision {r}: watcher {a.id} ({_describe(a)}) got {sorted(ea, key=str)}, "
                            f"watcher {b.id} ({_describe(b)}) got {sorted(eb, key=str)}, for the keys both watch")


def check_all(logs: Sequence[WatcherLog], writes: Sequence[WriteRecord], *, end_revision: int = 0) -> WatchCheckResult:
    """Every check of the module docstring over a run's watchers. ``end_revision``: the highest
    acknowledged write revision; a watcher that ran to the end ("stopped") must have a bookmark at
    or above it (live)."""
    res = WatchCheckResult(watchers=len(logs))
    by_value: dict[tuple[str, str], list[WriteRecord]] = {}
    deletes: dict[str, list[WriteRecord]] = {}
    for wr in writes:
        if wr.value is None:
            deletes.setdefault(wr.key, []).append(wr)
        else:
            by_value.setdefault((wr.key, wr.value), []).append(wr)
    indeterminate: set[tuple[str, int]] = set()
    good: dict[int, list[WatchEventRecord]] = {}
    for w in logs:
        res.resumes += w.resumes
        if w.breaches:
            res.add("ordered", f"watcher {w.id} ({_describe(w)}): {w.breaches} sub-watch response(s) of its merged "
                    "watch broke the watch contract (out of order, going back, or before created)")
        res.ended[w.ended or "running"] = res.ended.get(w.ended or "running", 0) + 1
        good[w.id] = _check_feed(w, res)
        _check_events(w, good[w.id], writes, by_value, deletes, res, indeterminate)
        if w.ended != "stopped":
            res.add("live", f"watcher {w.id} ({_describe(w)}) ended before the end of the run: {w.ended or 'running'}")
        elif end_revision:
            window = w.window()
            told = window[1] if window is not None else 0
            if told < end_revision:
                res.add("live", f"watcher {w.id} ({_describe(w)}) was told everything through {told} by the end, "
                        f"below the last acknowledged write at {end_revision}")
    res.indeterminate_seen = len(indeterminate)
    _check_across(logs, good, res)
    return res
