"""Point reads: a consistency level and a read preference per call.

`linearizable` reads are never stale (the leader after a ReadIndex round, or a replica after
confirming a read index with the leader); `bounded` and `stale` reads may be served by any member
that can honour them. A preference other than ``leader`` tries each eligible replica once (see
`Invoker.replica_invoke`), then falls back to the leader path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from kvstore.client.channels import Channels
from kvstore.client.checks import RequestChecks, check_revision, reply_staleness
from kvstore.client.cluster_view import ClusterView
from kvstore.client.invoke import Invoker
from kvstore.client.types import Consistency, ReadPreference, ReadResult
from kvstore.v1 import kv_pb2

__all__ = ["Reads"]


class Reads:
    """The read path."""

    def __init__(self, checks: RequestChecks, channels: Channels, view: ClusterView, invoker: Invoker) -> None:
        self.checks = checks
        self.channels = channels
        self.view = view
        self.router = view.router
        self.invoker = invoker
        self.observe: Callable[[int], None] = lambda revision: None
        """Told every revision a current read was served at (the client's causality floor)."""

    async def get(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> bytes | None:
        """The value of ``key``, or None if it does not exist (see :meth:`read`)."""
        res = await self.read(
            key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
            read_preference=read_preference, revision=revision,
        )
        return res.value

    async def read(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> ReadResult:
        """Read ``key`` and say where: the value (None: no such key), the node that served it, its
        applied index and how stale the answer may be.

        ``consistency``: ``linearizable`` (default; any member may serve it after confirming a
        read index with the leader), ``bounded`` (a member that can show it is at most
        ``max_staleness`` behind, in seconds or ``"500ms"``), ``stale`` (any member's local state
        at once). ``read_preference`` (default: the client's): ``leader``, ``nearest`` or
        ``replica`` (see :mod:`kvstore.client.readpref`). ``revision`` (> 0): the key as it was
        at that revision (below the compact revision: :class:`~kvstore.errors.Compacted`).
        """
        k = self.checks.key(key)
        rev = check_revision(revision)
        opts = self.checks.read_options(consistency, max_staleness, read_preference, timeout)
        req = kv_pb2.GetRequest(key=k, consistency=opts.level, max_staleness_ms=opts.staleness_ms, revision=rev)

        def call(ep: str, t: float) -> Awaitable[kv_pb2.GetResponse]:
            return self.channels.mux(ep).call("get", req, t)

        deadline, pref, learns = opts.deadline, opts.preference, opts.learns_leader
        if pref == "leader":
            resp = await self.invoker.invoke("get", call, deadline=deadline, is_write=False, key=k, learns_leader=learns)
        else:
            await self.view.ensure_map(deadline)
            resp = await self.invoker.replica_invoke("get", call, deadline=deadline, group=self.router.group_for_key(k),
                                              key=k, preference=pref, learns_leader=learns)
        if not rev:
            self.observe(resp.revision)
        return ReadResult(
            resp.value if resp.found else None, resp.index, reply_staleness(consistency, resp), resp.node_id, consistency,
            resp.revision, resp.create_revision, resp.mod_revision, resp.version,
        )
