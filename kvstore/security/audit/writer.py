"""`AuditLog`: appends MAC-chained lines (`chain.py`) to the audit log on a thread of its own,
rotates the files by size and records the chain's head in the node's store.

Ordering and the event loop: `record` (called on the event loop, by the RPC wrappers and the auth
hook) only stamps the time and queues the event: no I/O, no JSON, no MAC. One writer thread takes
the queue in order, seals the lines (sequence number, MAC) and appends them to `PATH` with
`os.write`. So lines are in the order `record` was called and the loop never waits for a disk.

Durability, and why a crash never makes a valid log fail verification:
1. lines are appended as they come, in batches taken every `batch_ms` (in the OS page cache a
   few milliseconds after `record`: a process crash, kill -9, loses only what was still queued);
2. at most every `sync_lines` lines or `sync_ms` milliseconds (and at rotation and close) the
   writer fsyncs the file and THEN records the head (seq, MAC, floor) in the store, in one durable
   store transaction (`NodeStore.set_audit_head`);
3. at rotation, the new `floor` is recorded BEFORE the oldest file is deleted.
The head therefore never names a line that is not durable, and never claims a file is kept that
may be gone. A machine crash can lose lines written after the last head (at most `sync_lines`
lines or `sync_ms` ms of them, plus the queue) and can tear the last line; `verify` reports lines
after the head as unconfirmed, never as tampering. With `sync_lines=1` every batch the writer
takes is fsynced and confirmed before the next.

Recovery at open: a torn partial line at the end of `PATH` is cut off; the chain continues after
the newest line found in the files (which may be after the head: those lines are authentic). If
the files end BEFORE the recorded head (lines were removed), it logs an error and continues from
the head, so the gap stays visible to `verify`. A log written with another key (another node's,
or an earlier data directory's) is refused.

Bounded: at most `max_pending` events wait; past that they are counted, and the next line says
how many were dropped (`op: "audit.dropped"`), so even the loss is in the chain. A failed write or
fsync (full disk) is logged; the lines are kept (bounded) and retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from kvstore.node.store import AuditHead

from .chain import GENESIS, LineError, Value, check_mac, open_line, seal
from .files import first_line, last_line, log_files, numbered

log = logging.getLogger("kvstore.audit")


@dataclass(slots=True)
class AuditSettings:
    """`kvstore serve --audit-log PATH ...`."""

    path: Path
    writes: bool = False
    """Also audit every data write (put / delete / cas, unary and on streams)."""
    max_bytes: int = 64 << 20
    """Rotate `PATH` when the next line would make it longer than this."""
    keep: int = 8
    """Files kept: `PATH` and `PATH.1` ... `PATH.<keep-1>`."""
    sync_lines: int = 1000
    """Fsync and record the head after at most this many lines ..."""
    sync_ms: int = 1000
    """... or this many milliseconds after the first line not yet confirmed."""
    max_pending: int = 100_000
    batch_ms: float = 5.0
    """After writing a batch the writer lets events gather this long before it takes the next: fewer,
    larger writes and fewer thread switches under load (lines reach the file at most this late)."""

    def validate(self) -> None:
        if self.max_bytes < 4096:
            raise ValueError("--audit-max-bytes must be >= 4096")
        if not 1 <= self.keep <= 10_000:
            raise ValueError("--audit-keep must be in 1..10000")
        if self.sync_lines < 1 or self.sync_ms < 1:
            raise ValueError("--audit-sync-lines and --audit-sync-ms must be >= 1")


class HeadStore(Protocol):
    """Where the head is recorded: the node's `NodeStore`."""

    def audit_head(self) -> AuditHead | None: ...

    def set_audit_head(self, head: AuditHead) -> None: ...


class AuditOpenError(Exception):
    """The audit log cannot be continued (another key's log, unreadable files)."""


Event = tuple[float, dict[str, Value]]


class _IsoClock:
    """UTC ISO 8601 times with microseconds (`2026-12-04T05:49:49.310309Z`), the seconds' text
    made once per second (the writer thread stamps every line)."""

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        sec, us = divmod(round(t * 1_000_000), 1_000_000)
        if sec != self._sec:
            self._sec, self._prefix = sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{us:06d}Z"


class AuditLog:
    """The node's audit log (see the module docstring). `open()`, then `record` from any thread,
    `flush` to wait until everything recorded is durable and confirmed, `close` at shutdown."""

    def __init__(
        self, settings: AuditSettings, key: bytes, store: HeadStore, node_id: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.path = settings.path
        self._key = key
        self._store = store
        self._node = node_id
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: deque[Event] = deque()
        self._accepted = 0
        """Events accepted by `record` (dropped ones included)."""
        self._done = 0
        """Events handled: written and confirmed by a head update, or counted as dropped."""
        self._dropped = 0
        self._flush_wanted = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Writer-thread state:
        self.seq = 0
        self.mac = GENESIS
        self.floor = 1
        self._fd = -1
        self._size = 0
        self._unsynced = 0
        self._unsynced_since = 0.0
        self._retry: list[Event] = []
        self._iso = _IsoClock()
        self.head_seq = 0
        """The sequence number last recorded in the store."""
        self.errors = 0

    # --- open -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Recover the chain's state from the files and the store, then start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = self._store.audit_head()
        files = log_files(self.path)
        newest: tuple[int, bytes, Path] | None = None
        for p in files:
            raw, _ = last_line(p)
            if raw is None:
                continue
            try:
                line = open_line(raw)
            except LineError as err:
                raise AuditOpenError(f"the last line of {p} is damaged ({err}): run `kvstore audit verify`; "
                                     "move the log away to start a new one") from None
            if newest is None or line.seq > newest[0]:
                newest = (line.seq, line.mac, p)
        if newest is not None:
            self._check_key(newest[2])
            self.seq, self.mac = newest[0], newest[1]
        if head is not None and head.seq > self.seq:
            log.error("audit log %s ends at seq %d but the store's head is seq %d: lines %d..%d are missing "
                      "(removed?). The chain continues from the head; `kvstore audit verify` reports the gap.",
                      self.path, self.seq, head.seq, self.seq + 1, head.seq)
            self.seq, self.mac = head.seq, head.mac
        self.head_seq = head.seq if head is not None else 0
        self.floor = head.floor if head is not None else self._oldest_first_seq()
        self._open_current()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        log.info("audit log %s: chain at seq %d (head recorded at seq %d)", self.path, self.seq, self.head_seq)

    def _check_key(self, p: Path) -> None:
        raw = first_line(p)
        if raw is None:
            return
        try:
            line = open_line(raw)
        except LineError as err:
            raise AuditOpenError(f"the first line of {p} is damaged ({err})") from None
        if line.prev is None or not check_mac(self._key, line.prev, line):
            raise AuditOpenError(
                f"{p} was not written with this node's audit key (another node's log, or one from an "
                "earlier data directory): move it away or give another --audit-log"
            )

    def _oldest_first_seq(self) -> int:
        for p in log_files(self.path):
            raw = first_line(p)
            if raw is not None:
                with contextlib.suppress(LineError):
                    return open_line(raw).seq
        return self.seq + 1

    def _open_current(self) -> None:
        _raw, good = last_line(self.path)
        if self.path.exists() and self.path.stat().st_size != good:
            log.warning("audit log %s: cutting a torn partial line at its end (a crash while it was written)",
                        self.path)
            os.truncate(self.path, good)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size

    # --- the event loop's side --------------------------------------------------------------------
    def record(self, op: str, identity: str, peer: str, result: str, **fields: Value) -> None:
        """Queue one event (never blocks on I/O): `op` (e.g. "Admin.TransferLeader", "auth.login",
        "KV.Put"), who (`identity`) from where (`peer`), `result` ("ok" or an error code name), and
        the operation's own fields (target, key, range, ...)."""
        event: dict[str, Value] = {"op": op, "identity": identity, "peer": peer, "result": result, **fields}
        with self._cond:
            self._accepted += 1
            if len(self._pending) >= self.settings.max_pending or self._stopping:
                self._dropped += 1
                self._done += 1
                return
            self._pending.append((self._clock(), event))
            if len(self._pending) == 1:
                self._cond.notify_all()

    def auth_event(self, event: str, identity: str, peer: str, result: str, **fields: Value) -> None:
        """The hook of authentication: `event` is e.g. "login", "token", "user_add", "user_delete",
        "passwd", "role_grant", "auth_enable"; `fields` name the user or role changed."""
        self.record(f"auth.{event}", identity, peer, result, **fields)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event recorded before the call is written, fsynced and its head
        recorded (or counted as dropped). False on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            self._flush_wanted = True
            self._cond.notify_all()
            while self._done < target:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Write and confirm what is queued, then stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    # --- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        s = self.settings
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = self._unsynced > 0 and now - self._unsynced_since >= s.sync_ms / 1000
                    if self._pending or self._retry or self._stopping or self._flush_wanted or due:
                        break
                    wait = s.sync_ms / 1000 - (now - self._unsynced_since) if self._unsynced else None
                    self._cond.wait(wait)
                batch = list(self._pending)
                self._pending.clear()
                dropped, self._dropped = self._dropped, 0
                flush, self._flush_wanted = self._flush_wanted, False
                stopping = self._stopping
            if dropped:
                batch.insert(0, (self._clock(), {"op": "audit.dropped", "identity": "", "peer": "",
                                                 "result": "error", "count": dropped}))
            ok = self._write(batch)
            if len(self._retry) > s.max_pending:  # a disk failing for long: drop the newest, counted
                extra = len(self._retry) - s.max_pending
                del self._retry[s.max_pending:]
                with self._cond:
                    self._dropped += extra
            if ok and (self._unsynced >= s.sync_lines or flush or stopping
                       or (self._unsynced and time.monotonic() - self._unsynced_since >= s.sync_ms / 1000)):
                ok = self._sync()
            with self._cond:
                if ok and self._unsynced == 0 and not self._retry:
                    self._done = self._accepted - len(self._pending)
                self._cond.notify_all()
            if stopping and (ok or self.errors > 3):
                return
            if not ok:
                time.sleep(0.5)  # a failing disk: retry, without spinning
            elif batch and s.batch_ms > 0:
                time.sleep(s.batch_ms / 1000)

    def _write(self, batch: list[Event]) -> bool:
        """Seal and append `batch` (after the events a failed write left to retry), rotating when
        the next line would not fit. False on an I/O error: the events not in the file are kept to
        retry, and the chain state (`seq`, `mac`) is always that of the file's last line."""
        events = self._retry + batch
        self._retry = []
        limit = self.settings.max_bytes
        i = 0
        while i < len(events):
            lines: list[bytes] = []
            seq, mac, size = self.seq, self.mac, self._size
            j = i
            while j < len(events):
                t, fields = events[j]
                fields["time"] = self._iso(t)
                fields["node"] = self._node
                line, new_mac = seal(self._key, seq + 1, mac, fields, first_in_file=size == 0)
                if size > 0 and size + len(line) > limit:
                    break
                lines.append(line)
                seq, mac, size = seq + 1, new_mac, size + len(line)
                j += 1
            if not self._append(lines):
                self._retry = events[i:]
                return False
            self.seq, self.mac = seq, mac
            i = j
            if i < len(events) and not self._rotate():
                self._retry = events[i:]
                return False
        return True

    def _append(self, lines: list[bytes]) -> bool:
        if not lines:
            return True
        data = b"".join(lines)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as err:
            self._error("writing", err)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no partial line stays behind
            return False
        if self._unsynced == 0:
            self._unsynced_since = time.monotonic()
        self._unsynced += len(lines)
        self._size += len(data)
        return True

    def _sync(self) -> bool:
        """Fsync the file, THEN record the head (the order every guarantee rests on)."""
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._error("fsyncing", err)
            return False
        return self._record_head()

    def _record_head(self, force: bool = False) -> bool:
        if self.seq == self.head_seq and self._unsynced == 0 and not force:
            return True
        try:
            self._store.set_audit_head(AuditHead(self.seq, self.mac, self.floor))
        except Exception as err:  # StorageError (full disk, I/O); the lines are in the file
            self._error("recording the head in the store", err)
            return False
        self.head_seq = self.seq
        self._unsynced = 0
        return True

    def _rotate(self) -> bool:
        """`PATH` -> `PATH.1` -> ... ; files numbered keep-1 and above are deleted. The current file
        is fsynced and the head (with the new floor) recorded first."""
        keep = self.settings.keep
        try:
            os.fsync(self._fd)
            rotated = numbered(self.path)
            kept = [rotated[n] for n in sorted(rotated) if n + 1 < keep] + ([self.path] if keep > 1 else [])
            firsts = []
            for p in kept:
                raw = first_line(p)
                if raw is not None:
                    with contextlib.suppress(LineError):
                        firsts.append(open_line(raw).seq)
            self.floor = min(firsts) if firsts else self.seq + 1
            if not self._record_head(force=True):
                return False
            for n in sorted(rotated, reverse=True):
                if n + 1 >= keep:
                    rotated[n].unlink()
                else:
                    os.replace(rotated[n], self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.close(self._fd)
            self._fd = -1
            if keep > 1:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink()
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size = 0
            return True
        except OSError as err:
            self._error("rotating", err)
            if self._fd < 0:
                with contextlib.suppress(OSError):
                    self._open_current()
            return False

    def _error(self, what: str, err: BaseException) -> None:
        self.errors += 1
        log.error("audit log %s: %s failed: %s (lines are kept and retried)", self.path, what, err)


__all__ = ["AuditLog", "AuditOpenError", "AuditSettings", "HeadStore"]
