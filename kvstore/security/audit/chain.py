"""The audit log's line format and its keyed MAC chain. STANDARD LIBRARY ONLY, no I/O.

A line is one JSON object on one line, in CANONICAL form: keys sorted, no spaces, ASCII only
(`json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`), values only strings,
integers and null (no floats: their text is not canonical), ending in `\\n`. Every line has:

    seq   1, 2, 3, ... across the whole chain (and across rotated files)
    mac   hex HMAC-SHA256(key, prev_mac || canonical bytes of the line WITHOUT "mac")
    prev  hex mac of the line before it (GENESIS, 32 zero bytes, before seq 1): ONLY on the first
          line of each file, so that a file links to the one it follows and the oldest file kept
          after rotation still starts a verifiable chain

plus the event's own fields (`time`, `identity`, `peer`, `op`, `result`, ...).

Invariants: `seal` and `open_line` are inverses on every line `seal` makes; `open_line` is total
(any bytes: a `LineError` with a reason, never another exception) and STRICT: a line is accepted
only if its bytes are exactly the canonical encoding of what it decodes to, so any change of any
byte (even one JSON would read the same, such as a space) is detected by the MAC or by the
canonical check. Without the key nobody can make a line that verifies, so a line can be neither
forged, changed, removed nor moved without the chain breaking at or right after it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

GENESIS = bytes(32)
"""The `prev` of the chain's first line (seq 1)."""
MAC_BYTES = 32
KEY_BYTES = 32
MAX_FIELD = 512
"""Longest string value a line carries (longer ones are cut, marked with a trailing `...`)."""
MAX_LINE = 16 << 10
"""No line `seal` makes is longer than this (fields are cut first); longer input is not a line."""

Value = str | int | None


class LineError(ValueError):
    """A line that is not a well-formed, canonical audit line (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Line:
    """A decoded line: its fields (without `mac` and `prev`), its sequence number and MAC, and the
    `prev` it names (None unless it is the first line of its file)."""

    seq: int
    mac: bytes
    prev: bytes | None
    fields: dict[str, Value]
    body: bytes
    """The canonical bytes the MAC covers (the line without `mac`)."""


def clip(text: str, limit: int = MAX_FIELD) -> str:
    """`text`, cut to at most `limit` characters (marked with `...` when cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical(obj: dict[str, Value]) -> bytes:
    """`json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`, as bytes."""
    return _ENCODER.encode(obj).encode()


def compute_mac(key: bytes, prev: bytes, body: bytes) -> bytes:
    """HMAC-SHA256(key, prev || body)."""
    return hmac.digest(key, prev + body, hashlib.sha256)


def _with_mac(body: bytes, mac: bytes) -> bytes:
    """The line: `body` (a canonical object without `mac`) with `mac` appended as its last member."""
    return body[:-1] + b',"mac":"' + mac.hex().encode() + b'"}'


_RESERVED = frozenset(("seq", "mac", "prev"))


def seal(key: bytes, seq: int, prev: bytes, fields: dict[str, Value], first_in_file: bool) -> tuple[bytes, bytes]:
    """The line (with its `\\n`) for event `fields` at `seq` after a line whose MAC is `prev`, and
    its MAC. Strings longer than `MAX_FIELD` are cut; the reserved names are set here."""
    obj: dict[str, Value] = {}
    for k, v in fields.items():
        if k in _RESERVED:
            continue
        if type(v) is str:
            if len(v) > MAX_FIELD:
                v = clip(v)
        elif type(v) is not int and v is not None:
            v = clip(str(v))
        obj[k if len(k) <= 64 else clip(k, 64)] = v
    obj["seq"] = seq
    if first_in_file:
        obj["prev"] = prev.hex()
    body = canonical(obj)
    mac = compute_mac(key, prev, body)
    return _with_mac(body, mac) + b"\n", mac


def _hex32(obj: dict[str, Any], name: str) -> bytes:
    v = obj.get(name)
    if not isinstance(v, str) or len(v) != 2 * MAC_BYTES:
        raise LineError(f'"{name}" is not {MAC_BYTES} bytes of hex')
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise LineError(f'"{name}" is not {MAC_BYTES} bytes of hex') from None


def open_line(raw: bytes) -> Line:
    """Decode one line (without its `\\n`). Total: raises only `LineError`. Does not check the MAC
    (that needs the previous line's: see `check_mac`)."""
    if len(raw) > MAX_LINE:
        raise LineError(f"longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise LineError(f"not JSON: {str(err)[:80]}") from None
    if not isinstance(obj, dict):
        raise LineError("not a JSON object")
    for k, v in obj.items():
        if not (v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
            raise LineError(f'field "{k[:64]}" is not a string, an integer or null')
    mac = _hex32(obj, "mac")
    del obj["mac"]
    try:
        body = canonical(obj)
    except ValueError:
        raise LineError("not canonical") from None
    if _with_mac(body, mac) != raw:
        raise LineError("not in canonical form (the line's bytes were changed)")
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise LineError('"seq" is not a positive integer')
    prev = _hex32(obj, "prev") if "prev" in obj else None
    fields = {k: v for k, v in obj.items() if k not in _RESERVED}
    return Line(seq, mac, prev, fields, body)


def check_mac(key: bytes, prev: bytes, line: Line) -> bool:
    """Whether `line` is the MAC-chain successor of a line whose MAC is `prev`."""
    return hmac.compare_digest(compute_mac(key, prev, line.body), line.mac)
