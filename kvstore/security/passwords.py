"""Password hashes: scrypt (memory-hard, `hashlib.scrypt` from the standard library).

Encoded hash: b"s1" log2(n):u8 r:u8 p:u8 salt(16) digest(32) (53 bytes). The parameters travel
with the hash, so they can be raised later without invalidating stored hashes. Verification
compares digests in constant time. n = 2**14, r = 8 costs 16 MiB and ~50 ms of one core per
hash: the price of a login (tokens spare it on every later call), and why logins are bounded
in number at once by the caller (`kvstore/server/auth_service.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

MAX_PASSWORD = 256
"""Longest password (bytes of UTF-8) accepted."""
LOG2_N = 14
R = 8
P = 1
_PREFIX = b"s1"
_PARAMS = struct.Struct(">BBB")
_SALT = 16
_DIGEST = 32
HASH_BYTES = len(_PREFIX) + _PARAMS.size + _SALT + _DIGEST


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, dklen=_DIGEST, maxmem=256 << 20)


def check_password(password: str) -> bytes:
    """The password's UTF-8 bytes; ValueError if it is empty or too long."""
    raw = password.encode()
    if not 0 < len(raw) <= MAX_PASSWORD:
        raise ValueError(f"a password must be 1..{MAX_PASSWORD} bytes")
    return raw


def hash_password(password: str, *, log2_n: int = LOG2_N) -> bytes:
    raw = check_password(password)
    salt = secrets.token_bytes(_SALT)
    return _PREFIX + _PARAMS.pack(log2_n, R, P) + salt + _scrypt(raw, salt, log2_n, R, P)


def verify_password(password: str, encoded: bytes) -> bool:
    """True iff `password` is the one `encoded` was made from. False for anything malformed
    (a stored hash that does not decode, parameters out of bounds, a password too long)."""
    if len(encoded) != HASH_BYTES or not encoded.startswith(_PREFIX):
        return False
    log2_n, r, p = _PARAMS.unpack_from(encoded, len(_PREFIX))
    if not (10 <= log2_n <= 20 and 1 <= r <= 16 and 1 <= p <= 4):
        return False
    try:
        raw = check_password(password)
    except ValueError:
        return False
    start = len(_PREFIX) + _PARAMS.size
    salt, digest = encoded[start : start + _SALT], encoded[start + _SALT :]
    return hmac.compare_digest(_scrypt(raw, salt, log2_n, r, p), digest)
