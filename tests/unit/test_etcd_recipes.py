"""etcd's Lock and Campaign over the recipe steps (`kvstore/server/etcd/recipes.py`), driven with
an in-memory caller (`_Caller`: the keys of one name, a wait that fails as told): a Lock whose
wait fails deletes its queued key (etcd's Mutex.Lock unlocks on any wait error), a Campaign
keeps it (etcd's Election.Campaign), and both delete it when the call is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from kvstore import errors
from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
from kvstore.etcdpb.v3lockpb import v3lock_pb2 as lpb
from kvstore.server.etcd.recipes import EtcdElection, EtcdLock, Recipes
from kvstore.v1 import kv_pb2

LEASE = 0x1234


class _Aborted(Exception):
    pass


class _Ctx:
    """The call's context: `abort` records the status and raises (as grpc's does)."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, _md: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        self.status = (code, details)
        raise _Aborted(details)


class _Caller:
    """The keys of one name (another holder first); `wait_for` raises `fail` (or blocks)."""

    def __init__(self, fail: BaseException | None) -> None:
        self.keys: dict[bytes, int] = {b"n/other": 5}
        self.rev = 5
        self.fail = fail

    async def scan(self, prefix: bytes) -> tuple[list[kv_pb2.KeyValue], int]:
        items = [kv_pb2.KeyValue(key=k, create_revision=r) for k, r in sorted(self.keys.items())
                 if k.startswith(prefix)]
        return items, self.rev

    async def put(self, key: bytes, value: bytes, lease: int) -> int:
        self.rev += 1
        self.keys[key] = self.rev
        return self.rev

    async def delete(self, key: bytes) -> int:
        self.rev += 1
        return self.rev if self.keys.pop(key, None) is not None else 0

    async def wait_for(self, create: kv_pb2.WatchCreateRequest, *, deletes_only: bool) -> None:
        if self.fail is None:
            await asyncio.Event().wait()
        raise self.fail


class _Recipes(Recipes):
    def __init__(self, caller: _Caller) -> None:
        super().__init__(None, None, None, 1.0)  # type: ignore[arg-type]
        self.c = caller

    def caller(self, context: grpc.aio.ServicerContext) -> Any:
        return self.c


MINE = f"n/{LEASE:016x}".encode()


@pytest.mark.parametrize("fail", [errors.Unavailable("the wait's watch was canceled"),
                                  errors.Compacted("compacted", compact_revision=3),
                                  errors.WrongShard("moved"), errors.ResourceExhausted("too many watches"),
                                  RuntimeError("a bug")])
def test_a_lock_whose_wait_fails_deletes_its_queued_key(fail: BaseException) -> None:
    c = _Caller(fail)
    ctx = _Ctx()
    with pytest.raises(_Aborted):
        asyncio.run(EtcdLock(_Recipes(c)).Lock(lpb.LockRequest(name=b"n", lease=LEASE), ctx))  # type: ignore[arg-type]
    assert ctx.status is not None
    assert MINE not in c.keys  # never the holder later under the lease the client keeps alive
    assert b"n/other" in c.keys


def test_a_campaign_whose_wait_fails_keeps_its_key_as_etcds_election_does() -> None:
    c = _Caller(errors.Unavailable("the wait's watch was canceled"))
    with pytest.raises(_Aborted):
        asyncio.run(EtcdElection(_Recipes(c)).Campaign(  # type: ignore[arg-type]
            epb.CampaignRequest(name=b"n", lease=LEASE, value=b"v"), _Ctx()))
    assert MINE in c.keys


@pytest.mark.parametrize("lock", [True, False])
def test_a_cancelled_lock_or_campaign_deletes_its_key(lock: bool) -> None:
    c = _Caller(None)

    async def main() -> None:
        r = _Recipes(c)
        call = (EtcdLock(r).Lock(lpb.LockRequest(name=b"n", lease=LEASE), _Ctx()) if lock  # type: ignore[arg-type]
                else EtcdElection(r).Campaign(epb.CampaignRequest(name=b"n", lease=LEASE), _Ctx()))  # type: ignore[arg-type]
        t = asyncio.ensure_future(call)
        while MINE not in c.keys:
            await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    assert MINE not in c.keys


class _Map:
    def data_groups(self) -> list[int]:
        return [1, 2]


class _Forward:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def call(self, method: str, request: Any, context: Any, *, is_write: bool, group: int) -> Any:
        self.calls.append((method, group))
        if method == "LeaseTimeToLive":
            return kv_pb2.LeaseTimeToLiveResponse(id=request.id, ttl=5, checked=77)
        return kv_pb2.PutResponse(revision=9)


class _Node:
    def __init__(self) -> None:
        self.forward = _Forward()

    def shard_map(self) -> _Map:
        return _Map()

    def group_of(self, key: bytes) -> int:
        return 1


def test_the_callers_put_checks_its_lease_as_etcds_put_does() -> None:
    """`CallerKV.put` is `EtcdKV.lease_checked` then LeasePut: a lease homed outside the data
    groups is etcd's "requested lease not found" before anything is sent; one homed elsewhere
    is vouched for by its home."""
    from kvstore.server.etcd.caller import CallerKV
    from kvstore.server.etcd.kv import EtcdKV
    from kvstore.server.etcd.status import LEASE_NOT_FOUND, EtcdStatus
    from kvstore.storage import leases

    node = _Node()
    c = CallerKV(node, EtcdKV(node), None, None)  # type: ignore[arg-type]
    with pytest.raises(EtcdStatus, match=LEASE_NOT_FOUND):
        asyncio.run(c.put(b"n/k", b"", leases.make_id(7, 1)))  # group 7 is not a data group
    assert node.forward.calls == []
    assert asyncio.run(c.put(b"n/k", b"", leases.make_id(2, 1))) == 9
    assert node.forward.calls == [("LeaseTimeToLive", 2), ("LeasePut", 1)]
