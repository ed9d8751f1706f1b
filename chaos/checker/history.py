"""History vocabulary (Jepsen style) and loaders / writers for the formats we check.

A history is a list of :class:`Operation`: one record per client operation, carrying the
invocation time, the completion time (``None`` when the outcome is indeterminate) and the status.

Formats:

* our own JSON-lines event log (:func:`load_jsonl` / :func:`dump_jsonl`), one event per line::

      {"process": 3, "type": "invoke", "f": "put", "key": "k1", "value": "v", "time": 12.5}
      {"process": 3, "type": "ok",     "f": "put", "key": "k1", "value": "v", "time": 13.0}

* porcupine's test vectors: Jepsen etcd register logs (:func:`load_porcupine_etcd`) and the
  EDN-style key-value histories (:func:`load_porcupine_kv`).
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Operation",
    "Status",
    "detect_format",
    "dump_jsonl",
    "format_op",
    "history_lines",
    "load_jsonl",
    "load_porcupine_etcd",
    "load_porcupine_kv",
    "parse_jsonl",
]

PathLike = str | os.PathLike[str]

FUNCTIONS = frozenset({"get", "put", "delete", "cas", "append"})


class Status(enum.Enum):
    """How an operation ended."""

    OK = "ok"  # completed; its effect and output are known
    FAIL = "fail"  # definitely had no effect; dropped before checking
    INFO = "info"  # indeterminate: may take effect at any point after its invocation, or never


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation of a history.

    ``value``: put/append: the value written; cas: ``(expected, new)`` where ``expected`` None
    means "key absent"; get/delete: unused.
    ``output``: get: the value read (None = absent); cas: whether it swapped (only meaningful
    when the status is OK; None with status OK means "swapped").
    ``complete`` is None for INFO operations, which are treated as returning at +infinity.
    """

    process: int
    f: str
    key: str
    value: Any = None
    output: Any = None
    invoke: float = 0.0
    complete: float | None = None
    status: Status = Status.OK

    def __str__(self) -> str:
        return format_op(self)


# --------------------------------------------------------------------------------------------
# Human-readable rendering


def _fmt_time(t: float | None) -> str:
    if t is None or math.isinf(t):
        return "inf"
    if float(t).is_integer():
        return str(int(t))
    return f"{t:.6g}"


def format_op(op: Operation) -> str:
    """Render one operation on one line, e.g. ``p3 [12, 15] put(k1, 'v') ok``."""
    span = f"[{_fmt_time(op.invoke)}, {_fmt_time(op.complete if op.status is not Status.INFO else None)}]"
    k = op.key
    if op.f == "get":
        call = f"get({k!r})"
        res = "?" if op.status is not Status.OK else repr(op.output)
        text = f"{call} -> {res}"
    elif op.f == "cas":
        exp, new = _cas_args(op.value)
        call = f"cas({k!r}, {exp!r} -> {new!r})"
        if op.status is Status.OK:
            text = f"{call} -> {'false' if op.output is False else 'true'}"
        else:
            text = f"{call} -> ?" if op.status is Status.INFO else call
    elif op.f == "delete":
        text = f"delete({k!r})"
    else:
        text = f"{op.f}({k!r}, {op.value!r})"
    return f"p{op.process} {span} {text} {op.status.value}"


def _cas_args(value: Any) -> tuple[Any, Any]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise ValueError(f"cas value must be a pair (expected, new), got {value!r}")


# --------------------------------------------------------------------------------------------
# Our JSON-lines format


def _freeze(v: Any) -> Any:
    """Make JSON values hashable (lists -> tuples, objects -> sorted tuples of pairs)."""
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("latin-1")
    return v


@dataclass(slots=True)
class _Pending:
    process: int
    f: str
    key: str
    value: Any
    invoke: float


def _build_op(p: _Pending, status: Status, complete: float | None, output: Any) -> Operation:
    return Operation(
        process=p.process,
        f=p.f,
        key=p.key,
        value=p.value,
        output=output,
        invoke=p.invoke,
        complete=complete,
        status=status,
    )


def load_jsonl(path: PathLike) -> list[Operation]:
    """Load our JSON-lines event history.

    Each completion pairs with the most recent outstanding invocation of the same process.
    Invocations still outstanding at EOF become INFO. A cas completed with ``type: "ok"`` and
    ``output: false`` is a completed cas whose compare failed (it must observe value !=
    expected); a cas with ``type: "fail"`` definitely had no effect and is dropped by the checker.
    Lines without a ``time`` use their line number. The result is sorted by invocation time.
    """
    with open(path, encoding="utf-8") as fh:
        return parse_jsonl(fh)


def parse_jsonl(lines: Iterable[str]) -> list[Operation]:
    """Parse JSON-lines events (see :func:`load_jsonl`)."""
    outstanding: dict[int, list[_Pending]] = {}
    ops: list[Operation] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno}: invalid JSON: {exc}") from None
        if not isinstance(ev, dict):
            raise ValueError(f"line {lineno}: expected a JSON object")
        try:
            process = int(ev["process"])
            typ = str(ev["type"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"line {lineno}: missing or bad 'process' / 'type'") from None
        t_raw = ev.get("time")
        t = float(lineno) if t_raw is None else float(t_raw)
        if typ == "invoke":
            f = str(ev.get("f", ""))
            if f not in FUNCTIONS:
                raise ValueError(f"line {lineno}: unknown function {f!r}")
            value = _freeze(ev.get("value"))
            if f == "cas":
                _cas_args(value)
            elif f in ("get", "delete"):
                value = None
            pend = _Pending(process, f, str(ev.get("key", "")), value, t)
            outstanding.setdefault(process, []).append(pend)
            continue
        if typ not in ("ok", "fail", "info"):
            raise ValueError(f"line {lineno}: unknown event type {typ!r}")
        stack = outstanding.get(process)
        if not stack:
            raise ValueError(f"line {lineno}: {typ} for process {process} without an outstanding invoke")
        p = stack.pop()
        if typ == "info":
            ops.append(_build_op(p, Status.INFO, None, None))
        elif typ == "fail":
            ops.append(_build_op(p, Status.FAIL, t, None))
        else:
            output: Any = None
            if p.f == "get":
                output = _freeze(ev.get("value"))
            elif p.f == "cas":
                out = ev.get("output")
                output = True if out is None else bool(out)
            ops.append(_build_op(p, Status.OK, t, output))
    for stack in outstanding.values():
        for p in stack:
            ops.append(_build_op(p, Status.INFO, None, None))
    ops.sort(key=lambda o: o.invoke)
    return ops


def _completion_event(op: Operation, t: float, status: Status) -> dict[str, Any]:
    ev: dict[str, Any] = {"process": op.process, "type": status.value, "f": op.f, "key": op.key}
    if op.f == "get":
        ev["value"] = _thaw(op.output) if status is Status.OK else None
    elif op.f == "cas":
        ev["value"] = _thaw(op.value)
        if status is Status.OK:
            ev["output"] = op.output is not False
    elif op.f == "delete":
        ev["value"] = None
    else:
        ev["value"] = _thaw(op.value)
    ev["time"] = t
    return ev


def history_lines(ops: Sequence[Operation]) -> list[str]:
    """The JSON-lines events of a history (see :func:`dump_jsonl`)."""
    finite = [o.invoke for o in ops] + [
        o.complete for o in ops if o.complete is not None and o.status is not Status.INFO
    ]
    t_end = max(finite, default=0.0)
    # (sort time, rank, process, per-process sequence number, event); completions rank before
    # invocations at equal times so a process's next invoke never precedes its previous completion.
    events: list[tuple[float, int, int, int, dict[str, Any]]] = []
    per_process: dict[int, list[Operation]] = {}
    for op in ops:
        per_process.setdefault(op.process, []).append(op)
    for proc, pops in per_process.items():
        pops.sort(key=lambda o: o.invoke)
        seq = 0
        for op in pops:
            inv: dict[str, Any] = {"process": proc, "type": "invoke", "f": op.f, "key": op.key}
            inv["value"] = _thaw(op.value) if op.f not in ("get", "delete") else None
            inv["time"] = op.invoke
            events.append((op.invoke, 1, proc, seq, inv))
            seq += 1
            if op.status is Status.INFO or op.complete is None:
                comp = _completion_event(op, t_end, Status.INFO)
                events.append((math.inf, 0, proc, seq, comp))
            else:
                comp = _completion_event(op, op.complete, op.status)
                events.append((max(op.complete, op.invoke), 0, proc, seq, comp))
            seq += 1
    events.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    # Keep each process's own events in its sequential order (ties and INFO lines could otherwise
    # reorder them): refill the slots each process occupies with its events in sequence order.
    slots: dict[int, list[int]] = {}
    for i, e in enumerate(events):
        slots.setdefault(e[2], []).append(i)
    ordered: list[dict[str, Any]] = [{} for _ in events]
    for idxs in slots.values():
        mine = sorted((events[i] for i in idxs), key=lambda e: e[3])
        for i, e in zip(idxs, mine, strict=True):
            ordered[i] = e[4]
    return [json.dumps(ev, separators=(", ", ": ")) for ev in ordered]


def dump_jsonl(ops: Sequence[Operation], path: PathLike) -> None:
    """Write a history as JSON-lines events: each op's invoke and completion line, by time.

    INFO operations get an ``info`` line at the end of the history (its time is the largest
    time of the history); :func:`load_jsonl` gives them no completion time either way.
    """
    with open(path, "w", encoding="utf-8") as fh:
        for line in history_lines(ops):
            fh.write(line)
            fh.write("\n")


# --------------------------------------------------------------------------------------------
# Porcupine: Jepsen etcd register logs

_ETCD_PREFIX = "INFO  jepsen.util - "
_ETCD_KEY = "x"


def _etcd_value(tok: str) -> Any:
    tok = tok.strip()
    if tok == "nil":
        return None
    if tok.startswith("[") and tok.endswith("]"):
        parts = tok[1:-1].split()
        return tuple(_etcd_value(p) for p in parts)
    if tok.startswith(":"):
        return tok  # keyword such as :timed-out
    try:
        return int(tok)
    except ValueError:
        return tok


def load_porcupine_etcd(path: PathLike) -> list[Operation]:
    """Load a porcupine ``jepsen/etcd_NNN.log`` (one etcd register, key ``"x"``).

    Line order is real-time order, so the line number is the time. ``read`` -> get,
    ``write`` -> put, ``cas`` -> cas. ``:fail :cas`` is a completed cas whose compare failed
    (status OK, output False: it needs value != A and has no effect, porcupine's semantics);
    ``:fail :read`` (timed out) is dropped; ``:info`` and invocations open at EOF are INFO.
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    fmap = {":read": "get", ":write": "put", ":cas": "cas"}
    outstanding: dict[int, _Pending] = {}
    ops: list[Operation] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        idx = line.find("jepsen.util - ")
        if idx < 0:
            raise ValueError(f"line {lineno}: not a jepsen.util log line: {line!r}")
        body = line[idx + len("jepsen.util - ") :]
        parts = body.split(None, 3)
        if len(parts) < 3:
            raise ValueError(f"line {lineno}: malformed line: {line!r}")
        process = int(parts[0])
        typ, fkw = parts[1], parts[2]
        val = _etcd_value(parts[3]) if len(parts) > 3 else None
        if fkw not in fmap:
            raise ValueError(f"line {lineno}: unknown function {fkw!r}")
        f = fmap[fkw]
        t = float(lineno)
        if typ == ":invoke":
            if f == "get":
                val = None
            elif f == "cas" and not (isinstance(val, tuple) and len(val) == 2):
                raise ValueError(f"line {lineno}: bad cas argument {parts[3]!r}")
            outstanding[process] = _Pending(process, f, _ETCD_KEY, val, t)
            continue
        p = outstanding.pop(process, None)
        if p is None:
            raise ValueError(f"line {lineno}: completion without an invoke for process {process}")
        if typ == ":ok":
            output: Any = None
            if f == "get":
                output = val
            elif f == "cas":
                output = True
            ops.append(_build_op(p, Status.OK, t, output))
        elif typ == ":fail":
            if f == "cas":
                ops.append(_build_op(p, Status.OK, t, False))
            elif f == "get":
                continue  # a read that timed out: no effect, unknown output -> drop
            else:
                ops.append(_build_op(p, Status.FAIL, t, None))
        elif typ == ":info":
            ops.append(_build_op(p, Status.INFO, None, None))
        else:
            raise ValueError(f"line {lineno}: unknown event type {typ!r}")
    for p in outstanding.values():
        ops.append(_build_op(p, Status.INFO, None, None))
    ops.sort(key=lambda o: o.invoke)
    return ops


# --------------------------------------------------------------------------------------------
# Porcupine: EDN key-value histories

_EDN_FIELD = re.compile(r':(\w+)\s+("(?:[^"\\]|\\.)*"|[^,}\s]+)')
_EDN_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _edn_atom(tok: str) -> Any:
    if tok.startswith('"'):
        body = tok[1:-1]
        return re.sub(r"\\(.)", lambda m: _EDN_ESCAPES.get(m.group(1), m.group(1)), body)
    if tok == "nil":
        return None
    if tok.startswith(":"):
        return tok[1:]
    try:
        return int(tok)
    except ValueError:
        return tok


def load_porcupine_kv(path: PathLike) -> list[Operation]:
    """Load a porcupine ``kv/cNN-*.txt`` history (get / put / append on string keys).

    Line order is real-time order, so the line number is the time. In porcupine's model a
    missing key reads as ``""``: check these histories with ``KVModel(missing="")``.
    ``:fail`` ops become FAIL (dropped), ``:info`` ops and open invocations INFO.
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    outstanding: dict[int, list[_Pending]] = {}
    ops: list[Operation] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        fields = {m.group(1): _edn_atom(m.group(2)) for m in _EDN_FIELD.finditer(line)}
        try:
            process = int(fields["process"])
            typ = str(fields["type"])
            f = str(fields["f"])
        except (KeyError, ValueError):
            raise ValueError(f"line {lineno}: malformed line: {line!r}") from None
        if f not in FUNCTIONS:
            raise ValueError(f"line {lineno}: unknown function {f!r}")
        key = fields.get("key")
        t = float(lineno)
        if typ == "invoke":
            val = fields.get("value") if f not in ("get", "delete") else None
            outstanding.setdefault(process, []).append(_Pending(process, f, str(key), val, t))
            continue
        stack = outstanding.get(process)
        if not stack:
            raise ValueError(f"line {lineno}: completion without an invoke for process {process}")
        p = stack.pop()
        if typ == "ok":
            ops.append(_build_op(p, Status.OK, t, fields.get("value") if f == "get" else None))
        elif typ == "fail":
            ops.append(_build_op(p, Status.FAIL, t, None))
        elif typ == "info":
            ops.append(_build_op(p, Status.INFO, None, None))
        else:
            raise ValueError(f"line {lineno}: unknown event type {typ!r}")
    for stack in outstanding.values():
        for p in stack:
            ops.append(_build_op(p, Status.INFO, None, None))
    ops.sort(key=lambda o: o.invoke)
    return ops


# --------------------------------------------------------------------------------------------
# Format detection


def detect_format(path: PathLike) -> Literal["jsonl", "etcd", "kv"]:
    """Guess a history file's format from its first non-empty line (and its name)."""
    first = ""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            if raw.strip():
                first = raw.strip()
                break
    name = os.path.basename(os.fspath(path))
    if not first:
        return "jsonl" if name.endswith((".jsonl", ".json")) else "etcd"
    if first.startswith("{:") or first.startswith("{ :"):
        return "kv"
    if first.startswith("{"):
        return "jsonl"
    if _ETCD_PREFIX.strip() in first or "jepsen.util" in first:
        return "etcd"
    if name.startswith("etcd") or name.endswith(".log"):
        return "etcd"
    raise ValueError(f"{path}: cannot tell the history format from its first line: {first[:80]!r}")
