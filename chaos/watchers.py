"""The watch workload of kvchaos (`--watchers N`): watchers through the real client library,
recorded for `chaos.watchcheck`.

Each of the N watchers is a task with its own `AsyncClient` that runs one watch for the whole run,
through every nemesis, with `watch_batches(progress=True)`: the client's transparent resume after
failures, range moves and server cancels is what is tested, as users get it. Watcher i starts
``i * stagger`` seconds into the run and watches, in turn: every key (``[\\0, ∞)``), the
workload's key prefix (prev_kv), one key the workload writes, a range of the workload's keys
(prev_kv); its start revision is 0 (now) for the first, and for the others alternately the
revision of an earlier acknowledged write (the catch-up path: history replayed from the change
log) or 0. Every batch it receives is recorded (time, revision, node, events; progress
notifications too) with the client's resume count.

After the final reads, `finish` waits (bounded) until every watcher's last bookmark is at or above
the highest acknowledged write revision (the progress notifications the client always asks for
move a quiet watch's bookmark forward), then stops them: their last bookmark covers the end of the
run. A watch that ends by itself (an error the client did not resume) is recorded with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.client import AsyncClient
from kvstore.client.watches import WatchBatch

from .watchcheck import KeyRange, WatchBatchRecord, WatcherLog, WatchEventRecord, WriteRecord
from .workload import OpRecord, Recorder, WorkloadOptions

__all__ = ["Watchers", "load_watchers", "write_records"]

PREFIXES = {"register": "r/", "replicas": "r/", "set": "s/", "bank1": "b/"}
"""The key prefix each workload writes under."""


@dataclass(slots=True)
class _Watcher:
    log: WatcherLog
    client: AsyncClient | None = None
    task: asyncio.Task[None] | None = None
    started: float = 0.0
    advanced: asyncio.Event = field(default_factory=asyncio.Event)


def _spec(i: int, prefix: str, key: str) -> tuple[KeyRange, bytes, bytes, bytes, bool]:
    """(range, key, prefix, range_end, prev_kv) of watcher ``i``."""
    kind = i % 4
    if kind == 0:
        return KeyRange("\0", ""), b"\0", b"", b"\0", False
    if kind == 1:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return KeyRange(prefix, end), b"", prefix.encode(), b"", True
    if kind == 2:
        return KeyRange(key), key.encode(), b"", b"", i % 8 == 6
    lo, hi = f"{prefix}1", f"{prefix}3"
    return KeyRange(lo, hi), lo.encode(), b"", hi.encode(), True


class Watchers:
    """The run's watchers (module docstring)."""

    def __init__(self, n: int, workload: str, opts: WorkloadOptions, rec: Recorder, *, stagger: float) -> None:
        self.n = n
        self.prefix = PREFIXES.get(workload, "r/")
        self.opts = opts
        self.rec = rec
        self.stagger = stagger
        self.rng = random.Random(f"watchers:{opts.seed}")
        self.watchers: list[_Watcher] = []
        self._stop = asyncio.Event()

    def _client(self, i: int) -> AsyncClient:
        return AsyncClient(
            self.opts.endpoints, timeout=self.opts.op_timeout, attempt_timeout=self.opts.attempt_timeout,
            seed=self.opts.seed * 1000 + 500 + i, backoff_cap=0.3, breaker_cooldown=0.5,
            certs_dir=self.opts.certs_dir or None, user=self.opts.user,
        )

    def _written(self) -> list[OpRecord]:
        return [r for r in self.rec.ops if r.revision and r.key.startswith(self.prefix)]

    async def run(self) -> None:
        """Start the watchers, one every ``stagger`` seconds (returns once all started)."""
        for i in range(self.n):
            if i:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.stagger)
            if self._stop.is_set():
                return
            written = self._written()
            key = self.rng.choice(written).key if written else f"{self.prefix}0"
            rng, k, pfx, end, prev_kv = _spec(i, self.prefix, key)
            start = 0
            if i % 2 == 1 and written:
                start = self.rng.choice(written[: max(1, len(written) // 2)]).revision or 0
            w = _Watcher(WatcherLog(i, rng, start, prev_kv), started=self.rec.now())
            self.watchers.append(w)
            w.client = self._client(i)
            w.task = asyncio.ensure_future(self._watch(w, k, pfx, end))

    async def _watch(self, w: _Watcher, key: bytes, prefix: bytes, end: bytes) -> None:
        cl = w.client
        assert cl is not None
        log = w.log
        try:
            async for b in cl.watch_batches(key, prefix=prefix, range_end=end, start_revision=log.start_revision,
                                            prev_kv=log.prev_kv, progress=True):
                log.batches.append(_record(b, self.rec.now()))
                log.resumes, log.breaches = cl.watch_resumes, cl.watch_breaches
                w.advanced.set()
            log.ended = "the feed ended"
        except asyncio.CancelledError:
            log.resumes, log.breaches = cl.watch_resumes, cl.watch_breaches
            log.ended = log.ended or "stopped"
            raise
        except Exception as err:  # what the client raised instead of resuming: recorded, judged
            log.resumes, log.breaches = cl.watch_resumes, cl.watch_breaches
            log.ended = f"{type(err).__name__}: {err}"
        w.advanced.set()

    async def finish(self, end_revision: int, timeout: float) -> float:
        """Wait (at most ``timeout`` s) until every running watcher's bookmark reaches
        ``end_revision``, then stop them all; returns the seconds waited."""
        self._stop.set()
        t0 = time.monotonic()
        deadline = t0 + timeout
        for w in self.watchers:
            while w.task is not None and not w.task.done() and _bookmark(w.log) < end_revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                w.advanced.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.advanced.wait(), left)
        waited = time.monotonic() - t0
        await self.close()
        return waited

    async def close(self) -> None:
        for w in self.watchers:
            if w.task is not None and not w.task.done():
                w.log.ended = "stopped"
                w.task.cancel()
        await asyncio.gather(*(w.task for w in self.watchers if w.task is not None), return_exceptions=True)
        for w in self.watchers:
            if w.client is not None:
                await w.client.close()
                w.client = None

    def logs(self) -> list[WatcherLog]:
        return [w.log for w in self.watchers]


def _bookmark(log: WatcherLog) -> int:
    return log.batches[-1].revision if log.batches else 0


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "backslashreplace")


def _record(b: WatchBatch, t: float) -> WatchBatchRecord:
    events = [
        WatchEventRecord(e.type, _text(e.key) or "", _text(e.value), e.mod_revision, e.create_revision, e.version,
                         _text(e.prev.value) if e.prev is not None else None)
        for e in b.events
    ]
    return WatchBatchRecord(b.revision, events, round(t, 3), b.node_id)


# ----- the run folder's watches.jsonl and the writes the checks need -----


def write_records(path: Path, logs: list[WatcherLog]) -> None:
    """``watches.jsonl``: per watcher a header line, one line per batch, and an end line."""
    with open(path, "w", encoding="utf-8") as fh:
        for w in logs:
            fh.write(json.dumps({"watcher": w.id, "range": w.range.to_json(), "start_revision": w.start_revision,
                                 "prev_kv": w.prev_kv}) + "\n")
            for b in w.batches:
                fh.write(json.dumps({"w": w.id, "t": b.t, "rev": b.revision, "node": b.node,
                                     "events": [e.to_json() for e in b.events]}, separators=(",", ":")) + "\n")
            fh.write(json.dumps({"w": w.id, "end": w.ended, "resumes": w.resumes, "breaches": w.breaches}) + "\n")


def load_watchers(path: Path) -> list[WatcherLog]:
    logs: dict[int, WatcherLog] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            d: dict[str, Any] = json.loads(line)
            if "watcher" in d:
                logs[d["watcher"]] = WatcherLog(int(d["watcher"]), KeyRange.from_json(d["range"]),
                                                int(d["start_revision"]), bool(d["prev_kv"]))
            elif "end" in d:
                logs[d["w"]].ended = str(d["end"])
                logs[d["w"]].resumes = int(d["resumes"])
                logs[d["w"]].breaches = int(d.get("breaches", 0))
            else:
                logs[d["w"]].batches.append(WatchBatchRecord(
                    int(d["rev"]), [WatchEventRecord.from_json(e) for e in d["events"]], float(d["t"]), int(d["node"])))
    return [logs[k] for k in sorted(logs)]


def writes_of(records: list[OpRecord]) -> list[WriteRecord]:
    """The writes that took effect or may have (module `chaos.watchcheck`), from the history."""
    out: list[WriteRecord] = []
    for r in records:
        if r.f not in ("put", "cas", "delete") or r.status == "fail":
            continue
        acked = r.status == "ok"
        if acked and r.f != "put" and not r.output:
            continue  # a cas that did not swap, a delete of an absent key: no change
        value = r.value if r.f == "put" else r.value[1] if r.f == "cas" else None
        out.append(WriteRecord(r.key, value, int(r.revision or 0) if acked else 0, acked))
    return out
