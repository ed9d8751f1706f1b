"""Locks and leader elections with fencing tokens, as client recipes on leases (etcd's
`concurrency` package, with Jepsen's lesson: a lock is only as safe as the resource's check of
its fencing token).

A `Session` holds a lease and keeps it alive (a renewal every third of its TTL); `lost` is set
once a renewal finds the lease gone or none succeeded for a whole TTL (the holder must then stop
acting: its key may be deleted any time).

`Mutex(session, name)` / `Election(session, name)`: the session's key is `NAME/<lease id hex>`,
put attached to the lease (a LeasePut: only this session writes that key). The holder is the key
under `NAME/` with the lowest create revision, found by a linearizable scan; a waiter watches the
deletion of the key just before its own (the next lower create revision) and scans again. The
fencing token is the holder key's create revision: revisions are unique across the cluster and
grow with causality (docs/REVISIONS.md), so a later holder's token is higher than every earlier
holder's, and a resource that refuses any token below the highest it has seen never accepts two
holders' writes out of order, whatever a paused or partitioned old holder does.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from kvstore.client.async_client import AsyncClient
from kvstore.errors import KVError

__all__ = ["Election", "Held", "LockLost", "Mutex", "Session"]


class LockLost(KVError):
    """The session's lease was lost (expired or revoked): the lock or leadership is no longer
    held, or was never reached. Definite: nothing was written by this call."""

    default_message = "the session's lease was lost"


class Session:
    """A lease kept alive in the background (start with `async with`)."""

    def __init__(self, client: AsyncClient, ttl: int = 10) -> None:
        self.client = client
        self.ttl = ttl
        self.lease = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Session:
        self.lease = await self.client.leases.grant(self.ttl)
        self._task = asyncio.get_running_loop().create_task(self._keep())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.lost.is_set():
            with contextlib.suppress(KVError):
                await self.client.leases.revoke(self.lease, timeout=self.ttl)

    async def _keep(self) -> None:
        """Renew every third of the TTL; after a failed attempt, again soon. The lease is held
        until (send time of the last acknowledged renewal) + TTL: past that, `lost`."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        delay = self.ttl / 3
        while True:
            await asyncio.sleep(delay)
            sent = loop.time()
            left = last_ok + self.ttl - sent
            if left <= 0:
                self.lost.set()
                return
            try:
                ttl = await self.client.leases.keep_alive_once(self.lease, timeout=left)
            except KVError:
                ttl = -1
            if ttl > 0:
                last_ok, delay = sent, self.ttl / 3
            elif ttl == 0:
                self.lost.set()
                return
            else:
                delay = 0.2


@dataclass(frozen=True, slots=True)
class Held:
    """What holding gives: the session's key and the fencing token (its create revision)."""

    key: bytes
    fence: int


class Mutex:
    def __init__(self, session: Session, name: bytes) -> None:
        self.session = session
        self.prefix = name.rstrip(b"/") + b"/"

    @property
    def key(self) -> bytes:
        """`NAME/<lease id hex>` of the session's current lease (a Mutex may be made before its
        session started)."""
        return self.prefix + f"{self.session.lease:016x}".encode()

    async def _entries(self) -> list[tuple[int, bytes, bytes]]:
        """(create revision, key, value) of every key under the prefix, from one linearizable
        scan, by create revision."""
        out: list[tuple[int, bytes, bytes]] = []
        async for chunk in self.session.client.scan_kvs(self.prefix):
            out += [(kv.create_revision, kv.key, kv.value) for kv in chunk]
        return sorted(out)

    async def _queue(self) -> list[tuple[int, bytes]]:
        return [(rev, k) for rev, k, _v in await self._entries()]

    async def holder(self) -> tuple[int, bytes] | None:
        """(create revision, key) of the holder now (a linearizable scan), None if none."""
        queue = await self._queue()
        return queue[0] if queue else None

    async def acquire(self, value: bytes = b"") -> Held:
        """Wait until this session holds the lock; returns the key and the fencing token."""
        client = self.session.client
        await client.leases.put(self.key, value, self.session.lease)
        while True:
            if self.session.lost.is_set():
                raise LockLost("the session's lease was lost while waiting", indeterminate=False)
            queue = await self._queue()
            mine = [rev for rev, k in queue if k == self.key]
            if not mine:
                raise LockLost("the lock key is gone (the session's lease expired)", indeterminate=False)
            ahead = [(rev, k) for rev, k in queue if rev < mine[0]]
            if not ahead:
                return Held(self.key, mine[0])
            _, before = ahead[-1]
            rev = max(r for r, _ in queue)
            async for ev in client.watch(before, start_revision=rev):
                if ev.type == "DELETE":
                    break

    async def release(self) -> None:
        await self.session.client.delete(self.key)


class Election(Mutex):
    """A leader election: campaigning is acquiring the mutex with the proposal as the value; the
    leader's value is the value of the key with the lowest create revision."""

    async def campaign(self, proposal: bytes) -> Held:
        return await self.acquire(proposal)

    async def leader(self) -> tuple[bytes, int] | None:
        """(value, fencing token) of the current leader, None if there is none."""
        entries = await self._entries()  # the value from the same scan (no second read)
        if not entries:
            return None
        rev, _key, value = entries[0]
        return value, rev
