"""Short-lived bearer tokens, signed with HMAC-SHA256 under the cluster's token key (part of the
replicated auth state, so every node validates every node's tokens).

Token text: "kv1." base64url(payload) "." base64url(mac), payload = user:str8 revision:u64
expires:u64 (unix seconds). A token is valid iff its MAC verifies under the current key (enabling
auth again draws a new key: older tokens die), it has not expired on the validating node's clock,
and its user still exists with the same revision (a password change raises the revision; a
deleted user has none). Parsing is total: anything else is `TokenError` with a reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import struct
from dataclasses import dataclass

from .authstate import AuthError, AuthState, check_name

PREFIX = "kv1."
MAX_TOKEN = 512
"""Longest token text accepted (a valid one is under 200 characters)."""
DEFAULT_TTL = 300
MAX_TTL = 24 * 3600
_TAIL = struct.Struct(">QQ")
_MAC = 32


class TokenError(ValueError):
    """Not a valid token (the message says why, never the token)."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user: str
    revision: int
    expires: int


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("token is not base64url") from None


def issue(key: bytes, user: str, revision: int, now: float, ttl: int = DEFAULT_TTL) -> str:
    """A token for `user` good for at least `ttl` seconds from `now`: its expiry (whole seconds)
    is rounded up, never down (rounding down made a token die up to a second early)."""
    name = user.encode()
    payload = bytes([len(name)]) + name + _TAIL.pack(revision, math.ceil(now + ttl))
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return PREFIX + _b64(payload) + "." + _b64(mac)


def parse(token: str, key: bytes) -> TokenClaims:
    """The claims of `token` if its MAC verifies under `key` (expiry and revision not checked)."""
    if not key:
        raise TokenError("auth is not enabled: tokens are not accepted")
    if len(token) > MAX_TOKEN or not token.startswith(PREFIX) or token.count(".") != 2:
        raise TokenError("malformed token")
    body, mac_text = token[len(PREFIX):].split(".")
    payload, mac = _unb64(body), _unb64(mac_text)
    if len(mac) != _MAC or not hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).digest(), mac):
        raise TokenError("token signature does not verify")
    n = payload[0] if payload else -1
    if n < 1 or len(payload) != 1 + n + _TAIL.size:
        raise TokenError("malformed token payload")
    try:
        user = payload[1 : 1 + n].decode()
        check_name("user", user)
    except (UnicodeDecodeError, AuthError):
        raise TokenError("malformed token user") from None
    revision, expires = _TAIL.unpack_from(payload, 1 + n)
    return TokenClaims(user, revision, expires)


def validate(token: str, state: AuthState, now: float) -> TokenClaims:
    """The claims of a token that is valid now against `state` (see the module docstring)."""
    claims = parse(token, state.token_key)
    if now >= claims.expires:
        raise TokenError("token expired: log in again")
    u = state.users.get(claims.user)
    if u is None or u.revision != claims.revision:
        raise TokenError("token revoked (the user's password changed or the user was deleted): log in again")
    return claims
