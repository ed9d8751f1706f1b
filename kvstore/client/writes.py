"""Writes (put, delete, cas, txn) under the client's session: exactly-once across retries.

Invariants:
- every write gets a fresh ``seq``, reused unchanged on each retry of that write, so the state
  machine applies it at most once; ``ack`` is the lowest seq still in flight ("replies for every
  seq < ack were received"), which lets the server forget older results;
- once an attempt's outcome is indeterminate, every later attempt carries ``retry`` and the
  highest index this client had seen from the group of the first such attempt (the horizon): a
  group that evicted the session since then answers SESSION_EXPIRED (indeterminate) instead of
  applying the write a second time (see `kvstore.storage.machine`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from kvstore.client.channels import Channels
from kvstore.client.checks import RequestChecks
from kvstore.client.invoke import Invoker
from kvstore.client.txns import first_key, txn_body
from kvstore.client.types import Compare, Op, TxnResponse
from kvstore.errors import InternalError, InvalidArgument
from kvstore.v1 import kv_pb2

__all__ = ["Writes"]


class Writes:
    """The write path and the session it runs under."""

    def __init__(self, client_id: int, checks: RequestChecks, channels: Channels, invoker: Invoker) -> None:
        self.client_id = client_id
        self.checks = checks
        self.channels = channels
        self.invoker = invoker
        self._next_seq = 1
        self._inflight: dict[int, None] = {}  # seqs of writes in flight, in increasing order
        #: Per group, the highest applied index seen in a write reply (a committed index): a write's
        #: retry sends it as the session's horizon (see :mod:`kvstore.storage.machine`).
        self._seen: dict[int, int] = {}
        #: The highest revision this client has observed (write replies, current reads): every
        #: write carries it, so the write gets a higher revision (docs/REVISIONS.md).
        self.revision = 0

    def observe(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision

    def begin_write(self) -> kv_pb2.Session:
        seq = self._next_seq
        self._next_seq += 1
        self._inflight[seq] = None
        ack = next(iter(self._inflight))
        return kv_pb2.Session(client_id=self.client_id, seq=seq, ack=ack, revision=self.revision)

    def end_write(self, session: kv_pb2.Session) -> None:
        self._inflight.pop(session.seq, None)

    async def write(
        self, op: str, key: bytes, make_request: Callable[[kv_pb2.Session], Any], timeout: float | None,
        unary: Callable[[str, Any, float], Awaitable[Any]] | None = None,
    ) -> Any:
        """Run one write (`op`: put, delete, cas or txn, the operation's name on the stream) under a
        fresh session; every retry reuses that session (exactly-once).

        Until an attempt's outcome is indeterminate, each attempt records its group and the
        highest index this client has seen from that group (the horizon). Once one is, every
        later attempt carries ``retry`` and, if it goes to the recorded group, that horizon (0
        otherwise): a group that evicted the session since then refuses it (SESSION_EXPIRED,
        indeterminate) rather than applying it a second time. `unary(endpoint, request, timeout)`:
        a unary RPC instead of the multiplexed stream (operations the stream does not carry)."""
        session = self.begin_write()
        seen = self._seen
        # The group and horizon of the first attempt that may have applied, and the latest group.
        first = [0, 0, 0]

        try:
            req = make_request(session)
            s = req.session

            def before_attempt(group: int, retry: bool) -> None:
                if not retry:
                    first[0] = group
                    first[1] = seen.get(group, 0)
                else:
                    s.retry = True
                    s.horizon = first[1] if group == first[0] else 0
                first[2] = group

            def call(ep: str, t: float) -> Awaitable[Any]:
                if unary is not None:
                    return unary(ep, req, t)
                return self.channels.mux(ep).call(op, req, t)

            resp = await self.invoker.invoke(
                op, call, deadline=self.checks.deadline(timeout), is_write=True, key=key, before_attempt=before_attempt
            )
            group = first[2]
            if resp.index > seen.get(group, 0):
                seen[group] = resp.index
            self.observe(resp.revision)
            return resp
        finally:
            self.end_write(session)

    async def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> int:
        """Set ``key`` to ``value``; returns the write's revision."""
        k, v = self.checks.key(key), self.checks.value(value)
        resp = await self.write("put", k, lambda s: kv_pb2.PutRequest(key=k, value=v, session=s), timeout)
        return int(resp.revision)

    async def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        k = self.checks.key(key)
        resp = await self.write("delete", k, lambda s: kv_pb2.DeleteRequest(key=k, session=s), timeout)
        return bool(resp.existed)

    async def delete_range(
        self, start: bytes, end: bytes = b"", prefix: bytes = b"", *, timeout: float | None = None
    ) -> tuple[int, int]:
        """Delete every key of [start, end) (end b"\\0": no end), or with `prefix`, atomically at one
        revision across the groups; (number deleted, revision)."""
        k = self.checks.key(prefix or start)
        if not prefix and not end:
            raise InvalidArgument("a range delete needs an end (b'\\x00': every key from start) or a prefix")
        resp = await self.write(
            "delete", k, lambda s: kv_pb2.DeleteRequest(key=k, range_end=end, prefix=prefix, session=s), timeout
        )
        return int(resp.deleted), int(resp.revision)

    async def cas(
        self, key: bytes, expected: bytes | None, new: bytes, *, timeout: float | None = None
    ) -> bool:
        """Set ``key`` to ``new`` if its current value is ``expected`` (None: if it does not
        exist). True if swapped."""
        k, v = self.checks.key(key), self.checks.value(new)
        exp = b"" if expected is None else self.checks.value(expected)
        resp = await self.write(
            "cas",
            k,
            lambda s: kv_pb2.CasRequest(key=k, expect_absent=expected is None, expected=exp, value=v, session=s),
            timeout,
        )
        return bool(resp.swapped)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op], *, timeout: float | None = None,
        checked: Mapping[int, int] | None = None,
    ) -> TxnResponse:
        """Run a transaction (see `AsyncClient.txn`; `checked`: its leased puts' stamps,
        `txns.txn_body`); it is routed by its first key."""
        body = txn_body(self.checks, compares, success, failure, checked)
        key = first_key(body)
        if key is None:
            raise InvalidArgument("a transaction must name at least one key")

        resp = await self.write("txn", key, lambda s: kv_pb2.TxnRequest(txn=body, session=s), timeout)
        if not resp.HasField("result"):
            raise InternalError("the server answered a transaction without its result", indeterminate=True)
        return TxnResponse.from_proto(resp.result, int(resp.revision))
