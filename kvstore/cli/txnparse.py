"""`kvctl txn`'s input: etcdctl's non-interactive format, parsed into client types.

    compares        one a line: TARGET("KEY") OP "OPERAND"
                    TARGET: value | val | version | ver | create | c | mod | m | lease
                    OP: = != > <     (numbers for version / create / mod: decimal, >= 0;
                                      lease: the lease id in hexadecimal, 0 = no lease)
    (blank line)
    success ops     one a line: put KEY VALUE [--lease=ID] | get KEY | del KEY (delete KEY)
                    | get KEY RANGE_END | get --prefix KEY | get --from-key KEY
                    (a range: a scan of the state at its place in the txn; --limit N caps it)
                    | del KEY RANGE_END | del --prefix KEY | del --from-key KEY   (range deletes)
    (blank line)
    failure ops     likewise, up to a blank line or the end of the input

KEY and VALUE in operation lines are shell words (quote them with "..." or '...' to include
spaces); quoted strings in compares use the escapes Go and JSON share (\\" \\\\ \\n \\t \\uXXXX);
Go's \\xNN and octal escapes (etcdctl's %q of bytes that are not UTF-8) are refused, not guessed
at. Anything after the failure ops' closing blank line is refused (not dropped). get's range
forms are etcdctl's (`get KEY RANGE_END`: [KEY, RANGE_END); `--prefix KEY`: every key starting
with KEY, every key for ""; `--from-key KEY`: every key >= KEY; `--limit N` / `--limit=N`: at
most N keys, 0 = all; --prefix and --from-key take one KEY and not each other); a put's
``--lease=ID`` (or ``--lease ID``, anywhere after ``put``) is etcdctl's: the lease id in
hexadecimal (0: none); other flags (put's --prev-kv / --ignore-*, get's sorting and revisions,
del's --prev-kv) are refused.

Range deletes take etcdctl's `del` forms (its `getDelOp`): `del KEY RANGE_END` deletes [KEY,
RANGE_END) (etcdctl's `--range` flag, which only skips its 2 s warning, is accepted and
changes nothing), `del --prefix KEY` every key starting with KEY (an empty KEY: every key),
`del --from-key KEY` every key >= KEY (empty: every key); flags may come before or after the
key; --prefix with --from-key, or either with a RANGE_END, is refused as etcdctl refuses it. An
empty RANGE_END (`del a ""`) is etcdctl's one-key delete. A range delete's result prints as
etcdctl prints it: the number of keys deleted. Every malformed line raises `TxnSyntaxError`
naming it (nothing is sent).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.client.checks import INT64_MAX
from kvstore.client.types import Compare, CompareOp, CompareTarget, Op

__all__ = ["ParsedTxn", "TxnSyntaxError", "parse_txn"]

_TARGETS: dict[str, CompareTarget] = {
    "value": "value", "val": "value", "version": "version", "ver": "version",
    "create": "create", "c": "create", "mod": "mod", "m": "mod", "lease": "lease",
}
_OPS: dict[str, CompareOp] = {"=": "=", "!=": "!=", ">": ">", "<": "<"}
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_COMPARE = re.compile(rf"^(\w+)\(({_QUOTED})\) (\S+) ({_QUOTED})$")


class TxnSyntaxError(ValueError):
    """The input is not a transaction in etcdctl's format (the message says where)."""


@dataclass(frozen=True, slots=True)
class ParsedTxn:
    compares: tuple[Compare, ...]
    success: tuple[Op, ...]
    failure: tuple[Op, ...]


def _unquote(q: str, line: str) -> str:
    try:
        out = json.loads(q)
    except ValueError:
        raise TxnSyntaxError(f"malformed quoted string {q} in: {line}") from None
    if not isinstance(out, str):
        raise TxnSyntaxError(f"malformed quoted string {q} in: {line}")
    return out


def _compare(line: str, encode: Callable[[str], bytes]) -> Compare:
    m = _COMPARE.match(line)
    if m is None:
        raise TxnSyntaxError(f'malformed comparison (expected TARGET("KEY") OP "VALUE"): {line}')
    target = _TARGETS.get(m.group(1))
    if target is None:
        raise TxnSyntaxError(f"malformed comparison: {line} (unknown target {m.group(1)})")
    op = _OPS.get(m.group(3))
    if op is None:
        raise TxnSyntaxError(f"malformed comparison: {line} (unknown operator {m.group(3)}; use = != > <)")
    key = encode(_unquote(m.group(2), line))
    operand = _unquote(m.group(4), line)
    if target == "value":
        return Compare(key, target, op, encode(operand))
    if target == "lease":  # etcdctl's: the id in hexadecimal, as put's --lease takes it
        if not re.fullmatch(r"[0-9a-fA-F]{1,16}", operand) or int(operand, 16) > INT64_MAX:
            raise TxnSyntaxError(f"malformed comparison: {line} (lease needs a hexadecimal id in 0..{INT64_MAX:x})")
        return Compare(key, target, op, int(operand, 16))
    if not re.fullmatch(r"[0-9]{1,19}", operand) or int(operand) > INT64_MAX:
        raise TxnSyntaxError(f"malformed comparison: {line} ({target} needs a number in 0..{INT64_MAX})")
    return Compare(key, target, op, int(operand))


def _op(line: str, encode: Callable[[str], bytes]) -> Op:
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise TxnSyntaxError(f"malformed operation ({err}): {line}") from None
    if words and words[0] == "get":
        return _get(words[1:], line, encode)
    if words and words[0] in ("del", "delete"):
        return _del(words, line, encode)
    lease = 0
    if words and words[0] == "put":
        words, lease = _lease_flag(words, line)
    if any(w.startswith("--") for w in words[1:]):
        raise TxnSyntaxError(f"operation flags (a put's flags but --lease) are not supported: {line}")
    if words and words[0] == "put":
        if len(words) != 3:
            raise TxnSyntaxError(f"put takes KEY VALUE [--lease=ID]: {line}")
        return Op.put(encode(words[1]), encode(words[2]), lease=lease)
    raise TxnSyntaxError(f"unknown operation (expected put, get or del): {line}")


def _lease_flag(words: list[str], line: str) -> tuple[list[str], int]:
    """A put's words without its ``--lease=ID`` / ``--lease ID`` (at most one), and the id
    (etcdctl's: hexadecimal, as Go's ParseInt(s, 16, 64); 0: none)."""
    out: list[str] = []
    raw: str | None = None
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--lease" or w.startswith("--lease="):
            if raw is not None:
                raise TxnSyntaxError(f"--lease given twice: {line}")
            if w == "--lease":
                if i + 1 >= len(words):
                    raise TxnSyntaxError(f"--lease needs an ID: {line}")
                raw, i = words[i + 1], i + 2
                continue
            raw = w[len("--lease="):]
        else:
            out.append(w)
        i += 1
    if raw is None:
        return out, 0
    if not re.fullmatch(r"[0-9a-fA-F]{1,16}", raw) or int(raw, 16) > INT64_MAX:
        raise TxnSyntaxError(f"bad lease id {raw!r} (hexadecimal, at most {INT64_MAX:x}): {line}")
    return out, int(raw, 16)


_DEL_FLAGS = ("--prefix", "--from-key", "--range")


def _del(words: list[str], line: str, encode: Callable[[str], bytes]) -> Op:
    """etcdctl's `del [--prefix | --from-key | --range] KEY [RANGE_END]` (module docstring)."""
    flags = {w for w in words[1:] if w.startswith("--")}
    args = [w for w in words[1:] if not w.startswith("--")]
    unknown = sorted(flags - set(_DEL_FLAGS))
    if unknown:
        raise TxnSyntaxError(f"del flag {unknown[0]} is not supported (only {', '.join(_DEL_FLAGS)}): {line}")
    if not 1 <= len(args) <= 2:
        raise TxnSyntaxError(f"del takes KEY and an optional RANGE_END: {line}")
    prefix, from_key = "--prefix" in flags, "--from-key" in flags
    if prefix and from_key:
        raise TxnSyntaxError(f"--prefix and --from-key cannot be set at the same time, choose one: {line}")
    if len(args) == 2 and (prefix or from_key):
        raise TxnSyntaxError(f"too many arguments, only one is accepted with --prefix or --from-key: {line}")
    key = encode(args[0])
    if prefix:
        return Op.delete_range(b"", prefix=key) if key else Op.delete_range(b"\x00")
    if from_key:
        return Op.delete_range(key or b"\x00")
    if len(args) == 2:
        end = encode(args[1])
        if not end:  # etcd: an empty range_end is the one key
            return Op.delete(key)
        if not key:
            raise TxnSyntaxError(f"a range delete needs a KEY: {line}")
        return Op.delete_range(key, end)
    return Op.delete(key)


def _limit(v: str, line: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", v) or int(v) > INT64_MAX:
        raise TxnSyntaxError(f"--limit needs a number in 0..{INT64_MAX}: {line}")
    return int(v)


def _get(args: list[str], line: str, encode: Callable[[str], bytes]) -> Op:
    """etcdctl's get in a txn: `get KEY` (one key), or a range (`Op.scan`): `get KEY RANGE_END`,
    `get --prefix KEY`, `get --from-key KEY`, each with an optional `--limit N`."""
    prefix = from_key = False
    limit = 0
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            pos += args[i:]
            break
        if a == "--prefix":
            prefix = True
        elif a == "--from-key":
            from_key = True
        elif a == "--limit":
            if i >= len(args):
                raise TxnSyntaxError(f"--limit needs a number: {line}")
            limit, i = _limit(args[i], line), i + 1
        elif a.startswith("--limit="):
            limit = _limit(a[len("--limit="):], line)
        elif a.startswith("-") and a != "-":
            raise TxnSyntaxError(f"get flag {a} is not supported (only --prefix, --from-key, --limit): {line}")
        else:
            pos.append(a)
    if prefix and from_key:
        raise TxnSyntaxError(f"`--prefix` and `--from-key` cannot be set at the same time, choose one: {line}")
    if not pos:
        raise TxnSyntaxError(f"get command needs one argument as key and an optional argument as range_end: {line}")
    if len(pos) > 2 or (len(pos) == 2 and (prefix or from_key)):
        raise TxnSyntaxError("too many arguments, only accept one argument when `--prefix` or `--from-key` is set"
                             f" (and at most KEY RANGE_END otherwise): {line}")
    key = encode(pos[0])
    if prefix:
        return Op.scan(prefix=key, limit=limit)
    if from_key:
        return Op.scan(key, limit=limit)
    if len(pos) == 2:
        end = encode(pos[1])
        if not end:
            raise TxnSyntaxError(f"get's RANGE_END must not be empty: {line}")
        return Op.scan(key, end, limit=limit)
    return Op.get(key)


def parse_txn(text: str, encode: Callable[[str], bytes]) -> ParsedTxn:
    """Parse etcdctl's txn input; `encode` turns a key or value as written into bytes (and may
    raise ValueError, e.g. for bad hex), which becomes a TxnSyntaxError."""
    lines = text.splitlines()
    sections: list[list[str]] = [[], [], []]
    i = 0
    for line in lines:
        line = line.strip()
        if not line:
            i += 1
            continue
        if i >= 3:
            raise TxnSyntaxError(f"input after the failure operations' closing blank line: {line}")
        sections[i].append(line)
    try:
        return ParsedTxn(
            tuple(_compare(s, encode) for s in sections[0]),
            tuple(_op(s, encode) for s in sections[1]),
            tuple(_op(s, encode) for s in sections[2]),
        )
    except TxnSyntaxError:
        raise
    except ValueError as err:
        raise TxnSyntaxError(str(err)) from None
