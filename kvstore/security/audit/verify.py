"""`kvstore audit verify`: check an audit log's MAC chain across its rotated files and against the
head the node recorded in its store.

What is detected, and reported as the FIRST bad line (file, line number, sequence number):
- a changed line (any byte): its MAC, or its canonical form, does not check;
- a removed line: the next line's sequence number skips, and its MAC (which covers the removed
  line's MAC) does not check;
- reordered (or duplicated) lines: a sequence number goes back or repeats;
- a removed rotated file in the middle: the first line of the next file does not link (`prev`) to
  the last line of the file before it;
- removed lines or files at the start: the oldest line kept must be the first of its file (with a
  `prev`), and no later than the head's `floor` (lines below it may have been rotated away);
- truncation at the end: the last line is before the recorded head, or the line at the head's
  sequence number is not the one the head names.

What is NOT tampering: lines after the recorded head (the node records the head after it has
fsynced the lines, at most every N lines / T ms, so a crash can leave lines after it, and a torn
partial line at the very end of the newest file): they are reported as UNCONFIRMED, and a log
whose every line checks and which reaches its head verifies. Without a head (no store given) a
truncation at the end cannot be told from a log that simply ends there; the report says so.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.node.store import AuditHead

from .chain import GENESIS, Line, LineError, check_mac, open_line
from .files import first_line, log_files


@dataclass(slots=True)
class Report:
    """The outcome of `verify`: `problem` is None when the log verifies."""

    files: int = 0
    lines: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problem: str | None = None
    unconfirmed: int = 0
    """Complete lines after the recorded head (written, never confirmed by a head update)."""
    torn: bool = False
    """The newest file ends in a partial line (a crash while it was written; unconfirmed)."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"TAMPERED OR DAMAGED: {self.problem}"
        if self.lines == 0:
            text = f"OK: no lines ({self.files} file(s))"
        else:
            text = f"OK: {self.lines} lines, seq {self.first_seq}..{self.last_seq}, in {self.files} file(s)"
        if self.unconfirmed or self.torn:
            parts = []
            if self.unconfirmed:
                parts.append(f"the last {self.unconfirmed} line(s) after the recorded head are unconfirmed")
            if self.torn:
                parts.append("the newest file ends in a torn partial line (unconfirmed)")
            text += "; " + " and ".join(parts) + " (written after the node last recorded its head: "
            text += "a crash may lose such lines; they are authentic but their removal would not be detected)"
        return "\n".join([text, *self.notes])


class _Bad(Exception):
    pass


def _span(a: int, b: int) -> str:
    return f"line {a}" if a == b else f"lines {a}..{b}"


def _where(path: Path, lineno: int, seq: int | None = None) -> str:
    return f"{path}:{lineno}" + (f" (seq {seq})" if seq is not None else "")


def verify(path: Path, key: bytes, head: AuditHead | None) -> Report:
    """Check the audit log at `path` (and its rotated files) with `key`, against `head` (None:
    no head known). Never raises for anything in the files: a damaged file is a `problem`."""
    report = Report()
    try:
        _verify(path, key, head, report)
    except _Bad as bad:
        report.problem = str(bad)
    except OSError as err:
        report.problem = f"cannot read the log: {err}"
    return report


def _order(files: list[Path]) -> list[tuple[int, Path]]:
    """The files with at least one line, in chain order (by the first line's sequence number)."""
    keyed: list[tuple[int, Path]] = []
    for p in files:
        raw = first_line(p)
        if raw is None:
            if p.stat().st_size > 0:
                keyed.append((1 << 62, p))  # only a partial line: must be the newest file
            continue
        try:
            keyed.append((open_line(raw).seq, p))
        except LineError as err:
            raise _Bad(f"{_where(p, 1)}: {err}") from None
    keyed.sort(key=lambda kp: kp[0])
    for (a, pa), (b, pb) in itertools.pairwise(keyed):
        if a == b:
            raise _Bad(f"{pa} and {pb} both start at seq {a}: a file was copied or duplicated")
    return keyed


def _verify(path: Path, key: bytes, head: AuditHead | None, report: Report) -> None:
    files = log_files(path)
    report.files = len(files)
    ordered = _order(files)
    prev_mac: bytes | None = None
    expect: int | None = None
    prev_where = ""
    mac_at_head: bytes | None = None
    for fi, (_, p) in enumerate(ordered):
        newest = fi == len(ordered) - 1
        with p.open("rb") as f:
            for lineno, chunk in enumerate(f, 1):
                if not chunk.endswith(b"\n"):  # only the file's last bytes can lack it
                    if newest:
                        report.torn = True
                        break
                    raise _Bad(f"{_where(p, lineno)}: a partial line in the middle of the log")
                raw = chunk[:-1]
                try:
                    line = open_line(raw)
                except LineError as err:
                    raise _Bad(f"{_where(p, lineno)}: {err}") from None
                here = _where(p, lineno, line.seq)
                if prev_mac is None:  # the oldest line kept
                    if line.prev is None:
                        raise _Bad(f"{here}: the oldest line kept is not the first line of its file: "
                                   "the lines before it were removed")
                    if line.seq == 1 and line.prev != GENESIS:
                        raise _Bad(f"{here}: seq 1 does not start the chain (its prev is not the genesis value)")
                    if head is not None and line.seq > head.floor and line.seq > 1:
                        raise _Bad(f"{here}: the log starts at seq {line.seq}, but the recorded head says lines from "
                                   f"seq {head.floor} on are kept: {_span(head.floor, line.seq - 1)} "
                                   "(an older file or the start of the log) were removed")
                    prev_mac = line.prev
                    report.first_seq = line.seq
                    if head is not None and head.seq == line.seq - 1:
                        mac_at_head = line.prev
                else:
                    assert expect is not None
                    if line.seq != expect:
                        if line.seq > expect:
                            raise _Bad(f"{here}: expected seq {expect} after {prev_where}: {_span(expect, line.seq - 1)} "
                                       "missing (removed lines, or a removed file)")
                        raise _Bad(f"{here}: expected seq {expect} after {prev_where}: lines are out of order "
                                   "(reordered or duplicated)")
                    if lineno == 1 and line.prev is None:
                        raise _Bad(f"{here}: the first line of a file does not name the line it follows")
                    if line.prev is not None and line.prev != prev_mac:
                        raise _Bad(f"{here}: does not link to {prev_where} (its prev differs): the lines or "
                                   "file between them were removed or replaced")
                if not check_mac(key, prev_mac, line):
                    raise _Bad(f"{here}: MAC mismatch: the line was changed, or it is not the line that "
                               f"followed {prev_where or 'the start of the chain'} (or the key is wrong)")
                prev_mac, expect, prev_where = line.mac, line.seq + 1, here
                report.lines += 1
                report.last_seq = line.seq
                if head is not None and line.seq == head.seq:
                    mac_at_head = line.mac
    if head is None:
        report.notes.append("no recorded head given (--data-dir): lines removed from the END of the log "
                            "cannot be detected")
        return
    if head.seq == 0:
        report.unconfirmed = report.lines
        return
    if report.lines == 0:
        if head.seq >= head.floor:
            raise _Bad(f"the log has no lines, but the recorded head says {_span(head.floor, head.seq)} exist")
        return
    if report.last_seq < head.seq:
        raise _Bad(f"truncated: the log ends at seq {report.last_seq} ({prev_where}) but the recorded head is "
                   f"seq {head.seq}: {_span(report.last_seq + 1, head.seq)} removed")
    if mac_at_head is None:
        raise _Bad(f"the line at the recorded head (seq {head.seq}) is not in the log")
    if mac_at_head != head.mac:
        raise _Bad(f"the line at seq {head.seq} is not the one the recorded head names: the log was replaced")
    report.unconfirmed = report.last_seq - head.seq


__all__ = ["Line", "Report", "verify"]
