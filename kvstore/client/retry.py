"""Deadlines, exponential backoff with full jitter, and a per-endpoint circuit breaker.

Plain synchronous helpers: the clock and the random generator are injectable so tests (and the
simulator) can drive them deterministically.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "Deadline",
    "RetryPolicy",
]

Clock = Callable[[], float]

DEFAULT_TIMEOUT = 10.0
DEFAULT_ATTEMPT_TIMEOUT = 2.0
DEFAULT_BACKOFF_BASE = 0.020
DEFAULT_BACKOFF_CAP = 1.0
DEFAULT_BREAKER_THRESHOLD = 3
DEFAULT_BREAKER_COOLDOWN = 2.0
DEFAULT_OVERLOAD_RETRIES = 5


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard an operation tries.

    timeout: total deadline of one operation, all attempts and backoff included.
    attempt_timeout: upper bound of one RPC attempt (so a hung node cannot eat the whole deadline).
    backoff_base / backoff_cap: exponential backoff with full jitter between attempts.
    breaker_threshold: consecutive transport failures that open an endpoint's circuit breaker.
    breaker_cooldown: seconds an open breaker waits before letting one probe through (half-open).
    overload_retries: RESOURCE_EXHAUSTED refusals (rate limit, load shedding) one operation retries
        after, each after waiting at least the server's retry-after; one more is reported to the
        caller (definite: the operation was not applied).
    """

    timeout: float = DEFAULT_TIMEOUT
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN
    overload_retries: int = DEFAULT_OVERLOAD_RETRIES

    def __post_init__(self) -> None:
        if self.overload_retries < 0:
            raise ValueError("overload_retries must be >= 0")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.attempt_timeout <= 0:
            raise ValueError("attempt_timeout must be positive")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        if self.breaker_threshold < 1:
            raise ValueError("breaker_threshold must be >= 1")
        if self.breaker_cooldown < 0:
            raise ValueError("breaker_cooldown must be >= 0")


class Deadline:
    """An absolute point in time, measured on a monotonic clock."""

    __slots__ = ("_clock", "at", "timeout")

    def __init__(self, timeout: float, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.timeout = timeout
        self.at = clock() + timeout

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.at - self._clock())

    @property
    def expired(self) -> bool:
        return self._clock() >= self.at

    def bound(self, seconds: float) -> float:
        """``seconds`` clipped to what is left of the deadline."""
        return min(seconds, self.remaining())


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
    Jitter"): the n-th delay is uniform in ``[0, min(cap, base * 2**n)]``."""

    __slots__ = ("_rng", "attempt", "base", "cap")

    def __init__(
        self,
        base: float = DEFAULT_BACKOFF_BASE,
        cap: float = DEFAULT_BACKOFF_CAP,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng if rng is not None else random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # Cap the exponent so 2**attempt cannot overflow on very long retry loops.
        return min(self.cap, self.base * (2 ** min(self.attempt, 62)))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def at_least(self, minimum: float) -> float:
        """The next delay, but never less than `minimum` (a server's retry-after): `minimum`
        stretched by up to 25% of jitter, so refused clients do not all come back at once."""
        return max(self.next_delay(), minimum * (1.0 + 0.25 * self._rng.random()))

    def reset(self) -> None:
        self.attempt = 0


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Per-endpoint circuit breaker.

    CLOSED: requests flow; ``threshold`` consecutive transport failures open it.
    OPEN: requests are refused until ``cooldown`` seconds have passed, then it is HALF_OPEN.
    HALF_OPEN: one probe request is let through (another one only if the probe has not reported
    back within another ``cooldown``); its success closes the breaker, its failure re-opens it.

    Only *transport* failures count (connection refused, attempt timed out): an endpoint that
    answers, even with an error such as NOT_LEADER, is healthy.
    """

    __slots__ = ("_clock", "_failures", "_opened_at", "_probe_at", "_state", "cooldown", "threshold")

    def __init__(
        self,
        threshold: int = DEFAULT_BREAKER_THRESHOLD,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self.cooldown:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_at(self) -> float:
        """When (clock time) the breaker will next let a request through."""
        if self._state is BreakerState.OPEN:
            return self._opened_at + self.cooldown
        if self._state is BreakerState.HALF_OPEN and self._probe_at is not None:
            return self._probe_at + self.cooldown
        return self._clock()

    def allow(self) -> bool:
        """May a request be sent now? In HALF_OPEN, a True answer reserves the probe."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self.cooldown:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_at = None
        # HALF_OPEN
        if self._probe_at is None or now >= self._probe_at + self.cooldown:
            self._probe_at = now
            return True
        return False

    def would_allow(self) -> bool:
        """Like :meth:`allow` but without reserving the half-open probe."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return now >= self._opened_at + self.cooldown
        return self._probe_at is None or now >= self._probe_at + self.cooldown

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_at = None

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probe_at = None
