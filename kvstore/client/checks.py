"""Client-side request checks and defaults: keys, values, deadlines, consistency levels and
staleness bounds, checked before anything is sent. This is the one place a call's arguments are
validated and normalized: `AsyncClient` only forwards them, and point reads and scans both take
their options from `RequestChecks.read_options`.

Every refusal here is definite (nothing was sent): `TypeError` for a wrong Python type,
`ValueError` for a non-positive timeout, a `KVError` (InvalidArgument, KeyTooLarge,
ValueTooLarge) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.client.readpref import READ_PREFERENCES, parse_duration
from kvstore.client.retry import Deadline
from kvstore.errors import InvalidArgument, KeyTooLarge, ValueTooLarge
from kvstore.storage.commands import MAX_KEY_SIZE, U64_MAX
from kvstore.v1 import kv_pb2

__all__ = [
    "DEFAULT_MAX_KEY_SIZE",
    "DEFAULT_MAX_VALUE_SIZE",
    "ReadOptions",
    "RequestChecks",
    "check_bytes",
    "reply_staleness",
]

DEFAULT_MAX_KEY_SIZE = MAX_KEY_SIZE
"""The server's key-size limit (one limit: `kvstore.storage.commands.MAX_KEY_SIZE`)."""
DEFAULT_MAX_VALUE_SIZE = 1024 * 1024

_CONSISTENCY = {
    "linearizable": kv_pb2.LINEARIZABLE,
    "bounded": kv_pb2.BOUNDED,
    "stale": kv_pb2.STALE,
    "serializable": kv_pb2.STALE,  # the older name of `stale`
}


def check_bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return value


INT64_MAX = (1 << 63) - 1


def check_revision(revision: object, *, name: str = "revision", zero: bool = True) -> int:
    """A revision argument: an int in 1..2^63-1 (or 0 = "now" where `zero`); InvalidArgument
    (definite) otherwise, TypeError for a non-int."""
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise TypeError(f"{name} must be an int, not {type(revision).__name__}")
    if not (0 if zero else 1) <= revision <= INT64_MAX:
        raise InvalidArgument(f"{name} {revision} must be {'>= 0' if zero else '> 0'} and at most {INT64_MAX}")
    return revision


def reply_staleness(consistency: str, resp: kv_pb2.GetResponse | kv_pb2.ScanResponse) -> float | None:
    """The staleness bound of a read reply in seconds (None: unknown)."""
    if consistency == "linearizable":
        return 0.0
    if resp.staleness_ms < 0 or not resp.node_id:  # -1, or a server that does not report it
        return None
    return resp.staleness_ms / 1000


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """A read's options, checked and with the client's defaults filled in (`read_options`)."""

    consistency: str
    """The level as the caller named it (`reply_staleness` and results report it)."""
    level: kv_pb2.Consistency
    """The level on the wire."""
    staleness_ms: int
    """The wire's max_staleness_ms: 0 unless bounded, then in 1..U64_MAX."""
    preference: str
    """Where to read: one of `READ_PREFERENCES`."""
    deadline: Deadline

    @property
    def learns_leader(self) -> bool:
        """Does a reply teach the client its group's leader? (Only linearizable reads at the
        leader say who leads for sure.)"""
        return self.consistency == "linearizable"


class RequestChecks:
    """The client's limits and defaults, and the checks that apply them."""

    def __init__(
        self,
        *,
        timeout: float,
        max_key_size: int = DEFAULT_MAX_KEY_SIZE,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        read_preference: str = "leader",
        max_staleness: float | str | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_key_size = max_key_size
        self.max_value_size = max_value_size
        self._read_preference = "leader"
        self.read_preference = read_preference
        #: Default bound of ``bounded`` reads (seconds), if the call gives none.
        self.max_staleness = None if max_staleness is None else parse_duration(max_staleness)

    def key(self, key: object) -> bytes:
        k = check_bytes("key", key)
        if not k:
            raise InvalidArgument("key must not be empty")
        if len(k) > self.max_key_size:
            raise KeyTooLarge(len(k), self.max_key_size)
        return k

    def value(self, value: object) -> bytes:
        v = check_bytes("value", value)
        if len(v) > self.max_value_size:
            raise ValueTooLarge(len(v), self.max_value_size)
        return v

    def deadline(self, timeout: float | None) -> Deadline:
        """The total deadline of one operation (the client's default timeout if None)."""
        t = self.timeout if timeout is None else timeout
        if t <= 0:
            raise ValueError("timeout must be positive")
        return Deadline(t)

    @staticmethod
    def consistency(consistency: str) -> kv_pb2.Consistency:
        try:
            return _CONSISTENCY[consistency]
        except KeyError:
            raise InvalidArgument(
                f"consistency must be one of {', '.join(_CONSISTENCY)}, not {consistency!r}"
            ) from None

    @property
    def read_preference(self) -> str:
        """The default read preference (one of `READ_PREFERENCES`)."""
        return self._read_preference

    @read_preference.setter
    def read_preference(self, value: str) -> None:
        if value not in READ_PREFERENCES:
            raise ValueError(f"read_preference must be one of {', '.join(READ_PREFERENCES)}, not {value!r}")
        self._read_preference = value

    def read_options(
        self,
        consistency: str,
        max_staleness: float | str | None,
        read_preference: str | None,
        timeout: float | None,
    ) -> ReadOptions:
        """Check a read's options (point read or scan) and fill in the client's defaults: the
        read preference (None or empty: the client's), the staleness bound of a bounded read,
        the deadline."""
        level = self.consistency(consistency)
        staleness = self.staleness_ms(consistency, max_staleness)
        pref = read_preference or self.read_preference
        if pref not in READ_PREFERENCES:
            raise InvalidArgument(f"read_preference must be one of {', '.join(READ_PREFERENCES)}, not {pref!r}")
        return ReadOptions(consistency, level, staleness, pref, self.deadline(timeout))

    def staleness_ms(self, consistency: str, max_staleness: float | str | None) -> int:
        """The wire's max_staleness_ms of a read (0 unless bounded)."""
        if consistency != "bounded":
            return 0
        bound = self.max_staleness if max_staleness is None else parse_duration(max_staleness)
        if bound is None or not 0 < bound <= U64_MAX / 1000:  # also refuses NaN and infinity
            raise InvalidArgument("bounded reads need a finite max_staleness > 0 (e.g. 0.5 or '500ms')")
        return min(U64_MAX, max(1, round(bound * 1000)))
