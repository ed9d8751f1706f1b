"""Rate limiting: a token bucket per identity (`kvstore serve --rate-limit OPS_PER_SEC[:BURST]`).

Synchronous and clock-free: every call takes `now` (seconds on a monotonic clock the caller owns),
so the same code runs in a process and under tests with an injected clock.

Invariants:
- a bucket never holds more than `burst` tokens nor fewer than 0 (up to float noise); it refills at `rate` tokens
  per second of `now`, and `now` going backwards refills nothing;
- in any window of time [t0, t1], the operations a bucket admits number at most
  `rate * (t1 - t0) + burst` (tests/unit/test_admission_logic.py checks it with hypothesis);
- an operation is admitted whole or not at all, and one refused costs nothing: a refused client
  keeps no debt, and its refusals take nothing from anyone else's bucket;
- the table of buckets is bounded (`max_identities`): when full, the bucket idle the longest is
  dropped. A dropped bucket had refilled for at least as long as any other, so forgetting it can
  only cost its identity the difference to a full bucket, never another identity's tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["RateLimit", "RateLimiter", "TokenBucket", "parse_rate_limit"]

_EPSILON = 1e-9
"""Floating-point noise tolerated: waiting exactly a retry-after must admit the next operation,
even when the refill rounds to 0.9999999999 tokens (the bucket then goes that far below 0,
which the next refill pays back: nothing is forgiven)."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`rate` operations per second sustained, bursts of up to `burst` operations."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError("a rate limit must be a positive number of operations per second")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise ValueError("a rate limit's burst must be at least 1 operation")


def parse_rate_limit(text: str) -> RateLimit:
    """`OPS_PER_SEC[:BURST]` (burst defaults to one second's worth, at least 1)."""
    rate_s, sep, burst_s = text.strip().partition(":")
    try:
        rate = float(rate_s)
        burst = float(burst_s) if sep else max(1.0, rate)
    except ValueError:
        raise ValueError(f"bad rate limit {text!r}: expected OPS_PER_SEC[:BURST], e.g. 1000:2000") from None
    return RateLimit(rate, burst)


@dataclass(slots=True)
class TokenBucket:
    """Tokens available at time `at`; see the module docstring for the invariants."""

    rate: float
    burst: float
    tokens: float
    at: float

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def take_upto(self, n: int, now: float) -> tuple[int, float]:
        """Admit as many of `n` operations as there are whole tokens for: (admitted, seconds
        until the next token if some were refused, else 0.0)."""
        self._refill(now)
        k = min(n, int(self.tokens + _EPSILON))
        self.tokens -= k
        if k == n:
            return k, 0.0
        return k, max(0.0, 1.0 - self.tokens) / self.rate + _EPSILON  # k < n: less than one token is left


class RateLimiter:
    """One `TokenBucket` per identity, created full on first use, at most `max_identities`."""

    __slots__ = ("buckets", "limit", "max_identities")

    def __init__(self, limit: RateLimit, max_identities: int = 100_000) -> None:
        if max_identities < 1:
            raise ValueError("max_identities must be >= 1")
        self.limit = limit
        self.max_identities = max_identities
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, identity: str, now: float) -> TokenBucket:
        b = self.buckets.get(identity)
        if b is None:
            if len(self.buckets) >= self.max_identities:
                self.buckets.popitem(last=False)  # the least recently used: the fullest
            b = self.buckets[identity] = TokenBucket(self.limit.rate, self.limit.burst, self.limit.burst, now)
        else:
            self.buckets.move_to_end(identity)
        return b

    def admit(self, identity: str, n: int, now: float) -> tuple[int, float]:
        """Admit up to `n` operations of `identity` at `now`: (how many, retry-after seconds for
        the rest; 0.0 if all were admitted)."""
        return self._bucket(identity, now).take_upto(n, now)
