"""Review findings on the lease RPCs (issue 17): a keep-alive stream whose client never reads
holds a bounded number of replies (one per lease, the latest: `CoalescingQueue`) and stops
reading requests instead of growing the server's memory; LeaseRevoke needs write permission on
every key attached to the lease in every data group (`check_revoke`), refused definitely when
the node cannot see them all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvstore import errors
from kvstore.security.authstate import AuthCommand, AuthOp, AuthState, Permission, PermKind
from kvstore.security.rbac import Grants
from kvstore.server.coalesce import CoalescingQueue
from kvstore.server.lease_service import LeaseRequests, check_revoke
from kvstore.v1 import kv_pb2


def test_the_queue_keeps_the_latest_reply_per_key_and_is_bounded() -> None:
    async def main() -> None:
        q: CoalescingQueue[int, int] = CoalescingQueue(3)
        for i in range(1000):
            await q.put(i % 3, i)  # never waits: three keys, each replaced
        assert len(q) == 3 and q.coalesced == 997
        blocked = asyncio.get_running_loop().create_task(q.put(7, 70))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not blocked.done() and len(q) == 3  # full of other keys: the producer waits
        assert [await q.get() for _ in range(3)] == [999, 997, 998]  # first-entered order, latest value
        await blocked
        await q.close()
        assert await q.get() == 70 and await q.get() is None

    asyncio.run(main())


class _Renewals(LeaseRequests):
    """The stream logic of `LeaseRequests.keep_alive` with each renewal answered at once (the
    home group's log is not what is tested here)."""

    def __init__(self) -> None:
        super().__init__(None, {})  # type: ignore[arg-type]

    async def keep_alive_one(self, r: kv_pb2.LeaseKeepAliveRequest) -> kv_pb2.LeaseKeepAliveResponse:
        return kv_pb2.LeaseKeepAliveResponse(id=r.id, ttl=10)


def test_a_keep_alive_client_that_never_reads_is_not_buffered_without_bound() -> None:
    async def main() -> None:
        pulled = 0

        async def requests(n: int) -> AsyncIterator[kv_pb2.LeaseKeepAliveRequest]:
            nonlocal pulled
            for i in range(n):
                pulled += 1
                yield kv_pb2.LeaseKeepAliveRequest(id=4097 + (i << 12))  # every one another lease

        stream = _Renewals().keep_alive(requests(5000), window=8, buffered=16)
        first = await stream.__anext__()  # the client reads once, then never again
        assert first.ttl == 10
        for _ in range(3000):
            await asyncio.sleep(0)  # let the server run as far as it can
        assert pulled <= 8 + 16 + 2, f"{pulled} requests read while the client reads nothing"
        await stream.aclose()

    asyncio.run(main())


def test_keep_alive_replies_of_one_lease_coalesce() -> None:
    async def main() -> None:
        async def requests() -> AsyncIterator[kv_pb2.LeaseKeepAliveRequest]:
            for _ in range(500):
                yield kv_pb2.LeaseKeepAliveRequest(id=4097)

        got = [r async for r in _Renewals().keep_alive(requests(), window=4, buffered=2)]
        assert got and all(r.id == 4097 and r.ttl == 10 for r in got) and len(got) <= 500

    asyncio.run(main())


# --- LeaseRevoke's permission step ------------------------------------------------------------------
def _grants(user: str) -> Grants:
    s = AuthState()
    for c in [
        AuthCommand(AuthOp.USER_ADD, user="root", password=b"h-root"),
        AuthCommand(AuthOp.USER_ADD, user="alice", password=b"h-alice"),
        AuthCommand(AuthOp.USER_ADD, user="bob", password=b"h-bob"),
        AuthCommand(AuthOp.ROLE_ADD, role="svc"),
        AuthCommand(AuthOp.ROLE_GRANT, role="svc", perm=Permission(b"svc/", b"svc0", PermKind.READWRITE)),
        AuthCommand(AuthOp.USER_GRANT, user="alice", role="svc"),
        AuthCommand(AuthOp.ROLE_ADD, role="all"),
        AuthCommand(AuthOp.ROLE_GRANT, role="all", perm=Permission(b"\x00", b"\x00", PermKind.WRITE)),
        AuthCommand(AuthOp.USER_GRANT, user="bob", role="all"),
        AuthCommand(AuthOp.ENABLE, token_key=b"k" * 32),
    ]:
        s = s.apply(c)
    return Grants.of(s, user)


def test_revoke_needs_write_on_every_attached_key_in_every_group() -> None:
    lid = 0x1001
    keys = {1: [b"svc/a"], 2: [b"other/b"]}  # group 2 holds a key alice may not write

    def attached(hosted: list[int]) -> list[bytes]:
        return sorted(k for g in hosted for k in keys[g])

    alice = _grants("alice")
    # a node hosting only group 1 used to check group 1's keys only, and let alice revoke
    with pytest.raises(errors.PermissionDenied, match=r"data groups \[2\]") as e:
        check_revoke(lid, alice, [1, 2], [1], lambda: attached([1]))
    assert not e.value.indeterminate
    # a node hosting both groups sees the key she may not write
    with pytest.raises(errors.PermissionDenied, match="other/b"):
        check_revoke(lid, alice, [1, 2], [1, 2], lambda: attached([1, 2]))
    # her own keys only: allowed
    check_revoke(lid, alice, [1, 2], [1, 2], lambda: [b"svc/a"])
    # no shard map yet: cannot tell
    with pytest.raises(errors.PermissionDenied):
        check_revoke(lid, alice, None, [1], lambda: [])
    # who may write every key (root, or a grant of the whole key space), or auth off: at once
    for g in (_grants("root"), _grants("bob"), None):
        check_revoke(lid, g, [1, 2], [1], lambda: pytest.fail("no key needs reading"))
