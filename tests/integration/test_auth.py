"""Authentication and RBAC on a real node: the table of every registered RPC x {no credentials,
wrong user, right user}, tokens (expiry, revocation by password change and deletion), key
permissions per operation inside one stream, and auth enable / disable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from onenode import OneNode, one_node

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
from kvstore.etcdpb.v3lockpb import v3lock_pb2 as lpb
from kvstore.security.guard import ETCD_PACKAGES, Rule, rule_of
from kvstore.server.etcd import RECIPE_SERVICES
from kvstore.server.etcd import SERVICES as ETCD_SERVICES
from kvstore.v1 import admin_pb2, auth_pb2, auth_pb2_grpc, kv_pb2, kv_pb2_grpc, raft_pb2, shard_pb2

DESCRIPTORS = {
    f"/{svc.full_name}/{m.name}": m
    for fd in (kv_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR, shard_pb2.DESCRIPTOR, raft_pb2.DESCRIPTOR,
               auth_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR)
    for svc in fd.services_by_name.values()
    for m in svc.methods
} | {
    f"/{svc.full_name}/{m.name}": m  # etcd's API: the services a node serves
    for svc in (*(rpc_pb2.DESCRIPTOR.services_by_name[name] for name in ETCD_SERVICES), *RECIPE_SERVICES)
    for m in svc.methods
}
Op = auth_pb2.AuthChangeRequest


def bearer(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


async def change(stub: auth_pb2_grpc.AuthStub, token: str | None, **kw: Any) -> auth_pb2.AuthChangeResponse:
    return await stub.Change(auth_pb2.AuthChangeRequest(**kw), metadata=bearer(token), timeout=10)


async def login(stub: auth_pb2_grpc.AuthStub, user: str, password: str, ttl: int = 0) -> str:
    r = await stub.Authenticate(auth_pb2.AuthenticateRequest(user=user, password=password, ttl_seconds=ttl), timeout=10)
    assert r.error.code == kv_pb2.OK, r.error
    assert r.token.startswith("kv1.")
    return r.token


def request_for(path: str, who: str) -> Any:
    """A plausible request of the method's input type: keys under data/ (alice's prefix); a
    login is alice's with her password for the right user, with a wrong one otherwise."""
    m = DESCRIPTORS[path]
    cls = message_factory.GetMessageClass(m.input_type)
    if cls is auth_pb2.AuthenticateRequest:
        return cls(user="alice", password="alicepw" if who == "right" else "guess")
    if cls in (lpb.LockRequest, epb.CampaignRequest, epb.LeaderRequest):  # a lock / election on data/
        fields = {f.name for f in cls.DESCRIPTOR.fields}
        return cls(name=b"data/l", **({"lease": 4096 + 1} if "lease" in fields else {}))
    if cls in (epb.ProclaimRequest, epb.ResignRequest):
        return cls(leader=epb.LeaderKey(name=b"data/l", key=b"data/l/1001", rev=1, lease=4096 + 1))
    if cls is rpc_pb2.AuthUserGetRequest:  # alice may read herself (etcd 3.4), bob may not read her
        return cls(name="alice")
    if cls is rpc_pb2.AuthRoleGetRequest:  # a role alice holds and bob does not
        return cls(role="data-rw")
    if cls is rpc_pb2.AuthenticateRequest:  # etcd's
        return cls(name="alice", password="alicepw" if who == "right" else "guess")
    if cls is auth_pb2.AuthChangeRequest:
        return cls(op=Op.ROLE_ADD, role=f"table-{who}")
    if cls is kv_pb2.OpBatch:
        return kv_pb2.OpBatch(ops=[kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"data/t", value=b"v"))])
    if cls is kv_pb2.WatchRequest:
        return cls(create_request=kv_pb2.WatchCreateRequest(key=b"data/t", watch_id=1))
    if cls is kv_pb2.TxnRequest:  # reads and writes data/t: alice may, bob may not
        return cls(txn=kv_pb2.TxnBody(
            compares=[kv_pb2.Compare(key=b"data/t", target=kv_pb2.COMPARE_VERSION, result=kv_pb2.GREATER, number=0)],
            success=[kv_pb2.TxnOp(get=b"data/t")], failure=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"data/t", value=b"v"))]))
    if cls is rpc_pb2.WatchRequest:
        return cls(create_request=rpc_pb2.WatchCreateRequest(key=b"data/t"))
    if cls is rpc_pb2.TxnRequest:  # as kvstore's above
        return cls(compare=[rpc_pb2.Compare(key=b"data/t", target=rpc_pb2.Compare.VERSION,
                                            result=rpc_pb2.Compare.GREATER, version=0)],
                   success=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"data/t"))],
                   failure=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"data/t", value=b"v"))])
    if cls is rpc_pb2.CompactionRequest:
        return cls(revision=1)
    if cls is rpc_pb2.LeaseGrantRequest:
        return cls(TTL=10)
    if cls is rpc_pb2.PutRequest:
        return cls(key=b"data/t", value=b"v")
    if path.startswith("/etcdserverpb.Lease/") and "ID" in {f.name for f in cls.DESCRIPTOR.fields}:
        return cls(ID=4096 + 1)  # a lease homed in group 1 (never granted)
    if cls is kv_pb2.ScanRequest:
        return kv_pb2.ScanRequest(prefix=b"data/", group=1)
    if cls is shard_pb2.GroupProposeRequest:
        return cls(cluster_id="kvstore", from_node=99, group=1)
    if cls is shard_pb2.ExportRangeRequest:
        return cls(cluster_id="kvstore", from_node=99, group=1)
    msg = cls()
    fields = {f.name for f in cls.DESCRIPTOR.fields}
    if "lease" in fields:
        msg.lease = 4096 + 1  # a lease homed in group 1 (never granted)
    if path.startswith("/kvstore.v1.KV/Lease") and "id" in fields:
        msg.id = 4096 + 1
    if "key" in fields:
        msg.key = b"data/t"
    if "value" in fields:
        msg.value = b"v"
    return msg


async def call(ch: grpc.aio.Channel, path: str, token: str | None, who: str) -> tuple[str, Any]:
    """(outcome, detail): outcome is a gRPC status name or an in-reply error code name ("OK")."""
    m = DESCRIPTORS[path]
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    ser, de = req_cls.SerializeToString, resp_cls.FromString
    req = request_for(path, who)
    md = bearer(token)
    try:
        if m.client_streaming and m.server_streaming:
            answered = asyncio.Event()

            async def one() -> AsyncIterator[Any]:
                yield req
                if isinstance(req, kv_pb2.WatchRequest):  # the stream ends once no watch is left
                    await answered.wait()
                    yield kv_pb2.WatchRequest(cancel_request=kv_pb2.WatchCancelRequest(watch_id=1))
                if isinstance(req, rpc_pb2.WatchRequest):  # etcd's: the first watch's id is 0
                    await answered.wait()
                    yield rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=0))
            responses = []
            async for r in ch.stream_stream(path, ser, de)(one(), metadata=md, timeout=10):
                responses.append(r)
                answered.set()
        elif m.client_streaming:
            async def one_u() -> AsyncIterator[Any]:
                yield req
            responses = [await ch.stream_unary(path, ser, de)(one_u(), metadata=md, timeout=10)]
        elif m.server_streaming and path == "/v3electionpb.Election/Observe":
            # an election without a leader: admitted, the stream waits for one (ended here by its
            # deadline); refused, it ends at once with the refusal
            try:
                responses = [r async for r in ch.unary_stream(path, ser, de)(req, metadata=md, timeout=2)]
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                responses = []
        elif m.server_streaming:
            responses = [r async for r in ch.unary_stream(path, ser, de)(req, metadata=md, timeout=10)]
        else:
            responses = [await ch.unary_unary(path, ser, de)(req, metadata=md, timeout=10)]
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details()
    for r in responses:
        if isinstance(r, rpc_pb2.WatchResponse) and r.canceled and r.cancel_reason == "etcdserver: permission denied":
            return "PERMISSION_DENIED", r.cancel_reason  # etcd refuses a watch in the stream, as a cancel
        errs = [r.error] if isinstance(getattr(r, "error", None), kv_pb2.Error) and r.HasField("error") else []
        if isinstance(r, kv_pb2.ResultBatch):
            errs = [getattr(x, x.WhichOneof("result")).error for x in r.results if x.WhichOneof("result")]
        for e in errs:
            if e.code != kv_pb2.OK:
                return kv_pb2.ErrorCode.Name(e.code), e.message
    return "OK", None


async def setup_auth(n: OneNode) -> dict[str, str | None]:
    """root (admin), alice (readwrite on data/), bob (no roles), reader (read on data/); auth on."""
    async with grpc.aio.insecure_channel(n.address) as ch:
        a = auth_pb2_grpc.AuthStub(ch)
        for user, pw in (("root", "rootpw"), ("alice", "alicepw"), ("bob", "bobpw"), ("reader", "readerpw")):
            r = await change(a, None, op=Op.USER_ADD, user=user, password=pw)
            assert r.error.code == kv_pb2.OK, r.error
        for role, kind in (("data-rw", auth_pb2.READWRITE), ("data-r", auth_pb2.READ)):
            assert (await change(a, None, op=Op.ROLE_ADD, role=role)).error.code == kv_pb2.OK
            perm = auth_pb2.Permission(kind=kind, key=b"data/", range_end=b"data0")
            assert (await change(a, None, op=Op.ROLE_GRANT, role=role, permission=perm)).error.code == kv_pb2.OK
        assert (await change(a, None, op=Op.USER_GRANT_ROLE, user="alice", role="data-rw")).error.code == kv_pb2.OK
        assert (await change(a, None, op=Op.USER_GRANT_ROLE, user="reader", role="data-r")).error.code == kv_pb2.OK
        r = await change(a, None, op=Op.ENABLE)
        assert r.error.code == kv_pb2.OK, r.error
        return {"root": await login(a, "root", "rootpw"), "alice": await login(a, "alice", "alicepw"),
                "bob": await login(a, "bob", "bobpw"), "reader": await login(a, "reader", "readerpw")}


async def reenable(n: OneNode) -> dict[str, str | None]:
    """After the table's etcd AuthDisable (root's call succeeds): auth on again, everyone logs in
    again (enabling draws a new token key)."""
    async with grpc.aio.insecure_channel(n.address) as ch:
        a = auth_pb2_grpc.AuthStub(ch)
        r = await change(a, None, op=Op.ENABLE)
        assert r.error.code == kv_pb2.OK, r.error
        return {u: await login(a, u, f"{u}pw") for u in ("root", "alice", "bob", "reader")}


AUTH_FAIL = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def anonymous_refusal(path: str) -> str:
    """What a USER / ADMIN call with no credentials gets once auth is enabled: etcd's services
    answer as etcd 3.4 (INVALID_ARGUMENT "etcdserver: user name is empty"), kvstore's
    UNAUTHENTICATED."""
    return "INVALID_ARGUMENT" if path.startswith(ETCD_PACKAGES) else "UNAUTHENTICATED"
LEASE_ANY_USER = tuple(f"/kvstore.v1.KV/Lease{m}" for m in ("Grant", "Revoke", "KeepAlive", "TimeToLive", "Leases")) + \
    tuple(f"/etcdserverpb.Lease/Lease{m}" for m in ("Grant", "Revoke", "KeepAlive", "TimeToLive", "Leases"))
"""As etcd: any authenticated user may grant, keep alive, list and read leases, and revoke one
whose keys it may write (these requests name a lease with no keys); LeasePut needs write on its key."""
BOB_MAY = ("/kvstore.v1.Admin/Status", "/kvstore.v1.Shard/GetShardMap", "/kvstore.v1.Auth/Status",
           "/etcdserverpb.Cluster/MemberList", "/etcdserverpb.Maintenance/Status")
"""Besides the leases: what any authenticated user may call (cluster status and membership)."""


def test_every_rpc_with_no_credentials_wrong_user_and_right_user(tmp_path: Path) -> None:
    asyncio.run(_every_rpc_with_no_credentials_wrong_user_and_right_user(tmp_path))


async def _every_rpc_with_no_credentials_wrong_user_and_right_user(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        paths = n.node.rpc_methods
        assert set(paths) <= set(DESCRIPTORS), "a registered method this table does not know"
        assert {p for p in DESCRIPTORS if not p.endswith("/List")} <= set(paths) | {
            p for p in DESCRIPTORS if p.startswith("/grpc.health")}
        table: dict[str, tuple[str, str, str]] = {}
        async with grpc.aio.insecure_channel(n.address) as ch:
            for path in paths:
                rule = rule_of(path)
                if path == "/grpc.health.v1.Health/Watch":
                    # grpc_health's synchronous Watch holds a server thread until the status
                    # changes, past the call's cancellation (it would hang the loop's shutdown):
                    # its rule is checked, the call is not made
                    assert rule is Rule.PUBLIC
                    continue
                right = "root" if rule is Rule.ADMIN or path.endswith("Auth/Change") else "alice"
                got = (
                    (await call(ch, path, None, "none"))[0],
                    (await call(ch, path, tokens["bob"], "wrong"))[0],
                    (await call(ch, path, tokens[right], "right"))[0],
                )
                table[path] = got
                none, wrong, ok = got
                if path == "/etcdserverpb.Auth/AuthDisable":
                    assert ok == "OK", got
                    tokens = await reenable(n)
                if path == "/kvstore.v1.Auth/Authenticate":
                    assert (none, wrong, ok) == ("UNAUTHENTICATED", "UNAUTHENTICATED", "OK"), (path, got)
                elif path == "/etcdserverpb.Auth/Authenticate":  # etcd's refusal: INVALID_ARGUMENT
                    assert got == ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK"), (path, got)
                elif rule is Rule.PUBLIC:
                    assert none not in AUTH_FAIL and ok not in AUTH_FAIL, (path, got)
                elif rule is Rule.INTERNAL:
                    # governed by node identity and membership, never by users: refused for all
                    assert none == wrong == ok and ok != "OK", (path, got)
                else:
                    assert none == anonymous_refusal(path), (path, got)
                    assert ok not in AUTH_FAIL, (path, got)
                    bob_may = path in LEASE_ANY_USER or path in BOB_MAY
                    if bob_may:
                        assert wrong not in AUTH_FAIL, (path, got)
                    else:
                        assert wrong == "PERMISSION_DENIED", (path, got)
            # a raised alarm: etcd's Status (any user, as etcd 3.4) lists it to an admin only,
            # kvstore's AlarmList being ADMIN
            assert n.node.admission is not None
            await n.node.admission.raise_nospace()
            status = rpc_pb2_grpc.MaintenanceStub(ch).Status
            for who, seen in (("bob", []), ("root", ["memberID:1 alarm:NOSPACE "])):
                st = await status(rpc_pb2.StatusRequest(), metadata=bearer(tokens[who]), timeout=10)
                assert list(st.errors) == seen and st.leader == 1, (who, st)
            await n.node.admission.disarm()
        for path, got in sorted(table.items()):
            print(f"{path:40s} none={got[0]:18s} wrong={got[1]:18s} right={got[2]}")
        assert table["/kvstore.v1.KV/Put"][2] == "OK" and table["/kvstore.v1.Admin/Snapshot"][2] == "OK"
        assert table["/etcdserverpb.Maintenance/Snapshot"][2] == "OK"  # saved as the caller (its token)


def test_every_rpc_on_the_client_port_needs_a_token_and_internal_rpcs_are_not_served(tmp_path: Path) -> None:
    asyncio.run(_every_rpc_on_the_client_port(tmp_path))


async def _every_rpc_on_the_client_port(tmp_path: Path) -> None:
    """The same table on the client-only port (`--client-listen`): before auth is enabled every
    USER / ADMIN RPC is refused (UNAUTHENTICATED, definite: TLS without authentication is not
    secure mode) while the peer port serves; then no token: UNAUTHENTICATED (etcd's services:
    etcd's INVALID_ARGUMENT "user name is empty"), wrong user:
    PERMISSION_DENIED, right user: served; INTERNAL RPCs are UNIMPLEMENTED for everyone."""
    async with one_node(tmp_path, client_port=True) as n:
        port = n.node.client_port
        assert port is not None
        served = set(port.rpc_methods)
        assert served == {p for p in n.node.rpc_methods if rule_of(p) is not Rule.INTERNAL}
        async with grpc.aio.insecure_channel(n.client_address) as ch:
            for path in n.node.rpc_methods:
                if rule_of(path) in (Rule.USER, Rule.ADMIN):
                    code, detail = await call(ch, path, None, "none")
                    assert code == "UNAUTHENTICATED" and "auth is not enabled" in detail, (path, code, detail)
            async with grpc.aio.insecure_channel(n.address) as peer:
                assert (await call(peer, "/kvstore.v1.KV/Put", None, "right"))[0] == "OK"
            tokens = await setup_auth(n)
            for path in n.node.rpc_methods:
                rule = rule_of(path)
                if path == "/grpc.health.v1.Health/Watch":
                    continue  # see the table above: grpc_health's synchronous Watch outlives its call
                right = "root" if rule is Rule.ADMIN or path.endswith("Auth/Change") else "alice"
                got = (
                    (await call(ch, path, None, "none"))[0],
                    (await call(ch, path, tokens["bob"], "wrong"))[0],
                    (await call(ch, path, tokens[right], "right"))[0],
                )
                none, wrong, ok = got
                if path == "/etcdserverpb.Auth/AuthDisable":
                    assert ok == "OK", got
                    tokens = await reenable(n)
                if rule is Rule.INTERNAL:
                    assert got == ("UNIMPLEMENTED",) * 3, (path, got)
                elif path == "/kvstore.v1.Auth/Authenticate":
                    assert got == ("UNAUTHENTICATED", "UNAUTHENTICATED", "OK"), (path, got)
                elif path == "/etcdserverpb.Auth/Authenticate":
                    assert got == ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK"), (path, got)
                elif rule is Rule.PUBLIC:
                    assert none not in AUTH_FAIL and ok not in AUTH_FAIL, (path, got)
                else:
                    assert none == anonymous_refusal(path) and ok not in AUTH_FAIL, (path, got)
                    bob_may = path in LEASE_ANY_USER or path in BOB_MAY
                    assert (wrong not in AUTH_FAIL) if bob_may else (wrong == "PERMISSION_DENIED"), (path, got)
            code, detail = await call(ch, "/kvstore.v1.KV/Get", None, "none")
            assert code == "UNAUTHENTICATED" and "log in" in detail and "peer port" in detail, detail
            code, detail = await call(ch, "/etcdserverpb.KV/Range", None, "none")
            assert (code, detail) == ("INVALID_ARGUMENT", "etcdserver: user name is empty"), detail


def test_key_permissions_per_operation_in_one_stream(tmp_path: Path) -> None:
    asyncio.run(_key_permissions_per_operation_in_one_stream(tmp_path))


async def _key_permissions_per_operation_in_one_stream(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        async with grpc.aio.insecure_channel(n.address) as ch:
            kv = kv_pb2_grpc.KVStub(ch)
            ops = [
                kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"data/a", value=b"1")),
                kv_pb2.Op(id=2, put=kv_pb2.PutRequest(key=b"other/a", value=b"1")),
                kv_pb2.Op(id=3, get=kv_pb2.GetRequest(key=b"data/a")),
                kv_pb2.Op(id=4, get=kv_pb2.GetRequest(key=b"data0")),
                kv_pb2.Op(id=5, scan=kv_pb2.ScanRequest(prefix=b"dat", group=1)),
            ]

            async def batches() -> AsyncIterator[kv_pb2.OpBatch]:
                for op in ops:  # one at a time: the read follows the write
                    yield kv_pb2.OpBatch(ops=[op])
                    await asyncio.sleep(0.05)

            codes: dict[int, int] = {}
            async for rb in kv.Stream(batches(), metadata=bearer(tokens["alice"]), timeout=20):
                for r in rb.results:
                    codes[r.id] = getattr(r, r.WhichOneof("result")).error.code
            assert codes == {1: kv_pb2.OK, 2: kv_pb2.PERMISSION_DENIED, 3: kv_pb2.OK,
                             4: kv_pb2.PERMISSION_DENIED, 5: kv_pb2.PERMISSION_DENIED}
            # the denied write did not happen; the reader may read data/ but not write it
            g = await kv.Get(kv_pb2.GetRequest(key=b"other/a"), metadata=bearer(tokens["root"]), timeout=10)
            assert g.error.code == kv_pb2.OK and not g.found
            g = await kv.Get(kv_pb2.GetRequest(key=b"data/a"), metadata=bearer(tokens["reader"]), timeout=10)
            assert g.error.code == kv_pb2.OK and g.value == b"1"
            p = await kv.Put(kv_pb2.PutRequest(key=b"data/a", value=b"2"), metadata=bearer(tokens["reader"]), timeout=10)
            assert p.error.code == kv_pb2.PERMISSION_DENIED and not p.error.indeterminate
            s = await kv.Cas(kv_pb2.CasRequest(key=b"data/a", expected=b"1", value=b"3"),
                             metadata=bearer(tokens["reader"]), timeout=10)
            assert s.error.code == kv_pb2.PERMISSION_DENIED


def test_tokens_revoked_by_password_change_deletion_and_reenable(tmp_path: Path) -> None:
    asyncio.run(_tokens_revoked_by_password_change_deletion_and_reenable(tmp_path))


async def _tokens_revoked_by_password_change_deletion_and_reenable(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        async with grpc.aio.insecure_channel(n.address) as ch:
            a, kv = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)

            async def get_as(token: str) -> str:
                try:
                    r = await kv.Get(kv_pb2.GetRequest(key=b"data/x"), metadata=bearer(token), timeout=10)
                except grpc.aio.AioRpcError as e:
                    return e.code().name
                return kv_pb2.ErrorCode.Name(r.error.code)

            assert await get_as(tokens["alice"]) == "OK"
            # wrong password: no token
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await a.Authenticate(auth_pb2.AuthenticateRequest(user="alice", password="nope"), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # alice changes her own password: her old token dies, a new login works
            r = await change(a, tokens["alice"], op=Op.USER_PASSWD, user="alice", password="newpw")
            assert r.error.code == kv_pb2.OK, r.error
            assert await get_as(tokens["alice"]) == "UNAUTHENTICATED"
            fresh = await login(a, "alice", "newpw")
            assert await get_as(fresh) == "OK"
            # alice may not change bob's password
            r = await change(a, fresh, op=Op.USER_PASSWD, user="bob", password="x")
            assert r.error.code == kv_pb2.PERMISSION_DENIED
            # deleting the user voids its tokens
            assert (await change(a, tokens["root"], op=Op.USER_DELETE, user="alice")).error.code == kv_pb2.OK
            assert await get_as(fresh) == "UNAUTHENTICATED"
            # root cannot be deleted while auth is on
            r = await change(a, tokens["root"], op=Op.USER_DELETE, user="root")
            assert r.error.code == kv_pb2.INVALID_ARGUMENT
            # disable, enable again: a new token key, every earlier token is void
            assert (await change(a, tokens["root"], op=Op.DISABLE)).error.code == kv_pb2.OK
            assert await get_as("kv1.garbage.token") == "OK"  # auth off: tokens are not looked at
            assert (await change(a, None, op=Op.ENABLE)).error.code == kv_pb2.OK
            assert await get_as(tokens["reader"]) == "UNAUTHENTICATED"
            assert await get_as("kv1.garbage.token") == "UNAUTHENTICATED"


def test_token_expiry(tmp_path: Path) -> None:
    asyncio.run(_token_expiry(tmp_path))


async def _token_expiry(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n:
        await setup_auth(n)
        now = [1_000_000.0]
        n.node.guard.clock = lambda: now[0]
        async with grpc.aio.insecure_channel(n.address) as ch:
            a, kv = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)
            r = await a.Authenticate(auth_pb2.AuthenticateRequest(user="alice", password="alicepw", ttl_seconds=60),
                                     timeout=10)
            assert r.ttl_seconds == 60

            now[0] = time.time() + 59
            g = await kv.Get(kv_pb2.GetRequest(key=b"data/x"), metadata=bearer(r.token), timeout=10)
            assert g.error.code == kv_pb2.OK
            now[0] = time.time() + 61
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await kv.Get(kv_pb2.GetRequest(key=b"data/x"), metadata=bearer(r.token), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired" in (exc.value.details() or "")


def test_with_tls_the_client_certificate_names_the_user_and_a_token_overrides_it(tmp_path: Path) -> None:
    asyncio.run(_tls_certificate_identities(tmp_path))


async def _tls_certificate_identities(tmp_path: Path) -> None:
    from clusterharness import free_ports

    from kvstore.node.host import RaftSettings
    from kvstore.security import certs
    from kvstore.security.tls import client_credentials
    from kvstore.server.config import NodeConfig
    from kvstore.server.node import Node

    cd = tmp_path / "certs"
    certs.create_ca(cd)
    certs.create_node(cd, 1, ["127.0.0.1"])
    for user in ("root", "carol"):
        certs.create_client(cd, user)
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    node = Node(NodeConfig(id=1, data_dir=tmp_path / "n1", listen=address, peers={1: address}, sync=False,
                           request_timeout=3.0, raft=RaftSettings(tick_ms=20), groups=1, replication=1,
                           certs_dir=cd))
    await node.start()
    try:
        async with grpc.aio.secure_channel(address, client_credentials(cd, "root")) as root_ch, \
                grpc.aio.secure_channel(address, client_credentials(cd, "carol")) as carol_ch:
            a = auth_pb2_grpc.AuthStub(root_ch)
            for _ in range(200):  # the metadata group elects itself
                r = await change(a, None, op=Op.USER_ADD, user="root", password="rootpw")
                if r.error.code == kv_pb2.OK:
                    break
                await asyncio.sleep(0.05)
            assert r.error.code == kv_pb2.OK, r.error
            assert (await change(a, None, op=Op.USER_ADD, user="carol")).error.code == kv_pb2.OK
            assert (await change(a, None, op=Op.ENABLE)).error.code == kv_pb2.OK
            st = await auth_pb2_grpc.AuthStub(carol_ch).Status(auth_pb2.AuthStatusRequest(), timeout=10)
            assert st.identity == "user 'carol' (by certificate)" and not st.admin and not st.users
            st = await a.Status(auth_pb2.AuthStatusRequest(), timeout=10)
            assert st.identity == "user 'root' (by certificate)" and st.admin
            carol_kv = kv_pb2_grpc.KVStub(carol_ch)
            p = await carol_kv.Put(kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=10)
            assert p.error.code == kv_pb2.PERMISSION_DENIED
            # over carol's certificate, root's token decides who is calling
            token = await login(auth_pb2_grpc.AuthStub(carol_ch), "root", "rootpw")
            for _ in range(200):  # the data group elects itself (the metadata group's leader came first)
                p = await carol_kv.Put(kv_pb2.PutRequest(key=b"k", value=b"v"), metadata=bearer(token), timeout=10)
                if p.error.code != kv_pb2.NO_LEADER:
                    break
                await asyncio.sleep(0.05)
            assert p.error.code == kv_pb2.OK, p.error
            # etcd's Lock on a TLS cluster: served in-process as the certificate's user (root may,
            # carol may not read the lock's keys), never refused for want of a node certificate
            from kvstore.etcdpb.v3lockpb import v3lock_pb2_grpc as lpb_grpc

            for _ in range(400):  # leases need the cluster version this new node advertises a moment later
                try:
                    lease = await rpc_pb2_grpc.LeaseStub(root_ch).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=30),
                                                                             timeout=10)
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "cluster version" in str(e.details())
                    await asyncio.sleep(0.05)
            held = await lpb_grpc.LockStub(root_ch).Lock(lpb.LockRequest(name=b"tl", lease=lease.ID), timeout=10)
            assert held.key == b"tl/%016x" % lease.ID and held.header.revision > 0
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await lpb_grpc.LockStub(carol_ch).Lock(lpb.LockRequest(name=b"tl", lease=lease.ID), timeout=10)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, exc.value
            await lpb_grpc.LockStub(root_ch).Unlock(lpb.UnlockRequest(key=held.key), timeout=10)
            # etcd's Snapshot too: saved in-process as the certificate's user (root: the backup in
            # etcd's envelope; carol is no admin)
            blobs = [r.blob async for r in rpc_pb2_grpc.MaintenanceStub(root_ch).Snapshot(
                rpc_pb2.SnapshotRequest(), timeout=30)]
            assert blobs[0].startswith(b"KVBK") and sum(map(len, blobs)) > 64  # kvstore's backup, then etcd's envelope
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in rpc_pb2_grpc.MaintenanceStub(carol_ch).Snapshot(rpc_pb2.SnapshotRequest(), timeout=30):
                    pass
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, exc.value
            with pytest.raises(grpc.aio.AioRpcError) as exc:  # a bad token is never downgraded to the cert
                await carol_kv.Put(kv_pb2.PutRequest(key=b"k", value=b"v"), metadata=bearer("kv1.x.y"), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await node.stop(grace=0.5)


class _Feed:
    """A KV.Stream request side fed batch by batch (ends when closed)."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[kv_pb2.OpBatch | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[kv_pb2.OpBatch]:  # type: ignore[misc]
        while (b := await self.q.get()) is not None:
            yield b

    def send(self, *ops: kv_pb2.Op) -> None:
        self.q.put_nowait(kv_pb2.OpBatch(ops=list(ops)))


def _put(i: int, key: bytes) -> kv_pb2.Op:
    return kv_pb2.Op(id=i, put=kv_pb2.PutRequest(key=key, value=b"v"))


async def _stream_is_cut_off(call: Any, feed: _Feed, why: str) -> None:
    """The next batch is refused operation by operation (UNAUTHENTICATED, definite) and the
    stream ends with status UNAUTHENTICATED."""
    feed.send(_put(10, b"data/late"), kv_pb2.Op(id=11, get=kv_pb2.GetRequest(key=b"data/early")))
    rb = await call.read()
    assert rb is not grpc.aio.EOF
    results = {r.id: getattr(r, r.WhichOneof("result")).error for r in rb.results}
    assert sorted(results) == [10, 11]
    for e in results.values():
        assert e.code == kv_pb2.UNAUTHENTICATED and not e.indeterminate and why in e.message, e
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    assert why in (await call.details())
    feed.q.put_nowait(None)


def test_a_stream_ends_unauthenticated_when_its_token_expires(tmp_path: Path) -> None:
    asyncio.run(_a_stream_ends_unauthenticated_when_its_token_expires(tmp_path))


async def _a_stream_ends_unauthenticated_when_its_token_expires(tmp_path: Path) -> None:
    """A stream opened with a 60 s token works until the (injected) clock passes the token's
    expiry; its next operations are refused and the stream ends, nothing of them applied."""
    async with one_node(tmp_path) as n:
        await setup_auth(n)
        now = [time.time()]
        n.node.guard.clock = lambda: now[0]
        async with grpc.aio.insecure_channel(n.address) as ch:
            a, kv = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)
            token = await login(a, "alice", "alicepw", ttl=60)
            feed = _Feed()
            call = kv.Stream(feed.__aiter__(), metadata=bearer(token), timeout=20)
            feed.send(_put(1, b"data/early"))
            rb = await call.read()
            assert [r.put.error.code for r in rb.results] == [kv_pb2.OK]
            now[0] = time.time() + 59
            feed.send(_put(2, b"data/early2"))
            assert [r.put.error.code for r in (await call.read()).results] == [kv_pb2.OK]
            now[0] = time.time() + 61
            await _stream_is_cut_off(call, feed, "expired")
            g = await kv.Get(kv_pb2.GetRequest(key=b"data/late"), metadata=bearer(await login(a, "alice", "alicepw")),
                             timeout=10)
            assert g.error.code == kv_pb2.OK and not g.found


def test_a_password_change_ends_the_users_open_streams(tmp_path: Path) -> None:
    asyncio.run(_a_password_change_ends_the_users_open_streams(tmp_path))


async def _a_password_change_ends_the_users_open_streams(tmp_path: Path) -> None:
    """alice's open stream (by token) is cut off after she changes her password; reader's stream,
    opened before and untouched by the change, goes on."""
    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        async with grpc.aio.insecure_channel(n.address) as ch:
            a, kv = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)
            feed, other = _Feed(), _Feed()
            call = kv.Stream(feed.__aiter__(), metadata=bearer(tokens["alice"]), timeout=20)
            reader = kv.Stream(other.__aiter__(), metadata=bearer(tokens["reader"]), timeout=20)
            feed.send(_put(1, b"data/early"))
            assert [r.put.error.code for r in (await call.read()).results] == [kv_pb2.OK]
            r = await change(a, tokens["alice"], op=Op.USER_PASSWD, user="alice", password="newpw")
            assert r.error.code == kv_pb2.OK, r.error  # answered once this node applied it
            await _stream_is_cut_off(call, feed, "revoked")
            other.send(kv_pb2.Op(id=1, get=kv_pb2.GetRequest(key=b"data/early")))
            rb = await reader.read()
            assert rb.results[0].get.error.code == kv_pb2.OK and rb.results[0].get.value == b"v"
            other.q.put_nowait(None)
            assert await reader.code() == grpc.StatusCode.OK


def test_a_scan_stops_streaming_once_its_token_expires(tmp_path: Path) -> None:
    asyncio.run(_a_scan_stops_streaming_once_its_token_expires(tmp_path))


async def _a_scan_stops_streaming_once_its_token_expires(tmp_path: Path) -> None:
    """A server-streaming call re-checks its token before each message: with the guard's clock
    passing the expiry after the first message was sent, the second is not sent and the call
    ends UNAUTHENTICATED (a scan of two messages: 4 values of 150 KiB, 256 KiB chunks)."""
    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        async with grpc.aio.insecure_channel(n.address) as ch:
            a, kv = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)
            for i in range(4):
                p = await kv.Put(kv_pb2.PutRequest(key=b"data/big%d" % i, value=b"x" * (150 << 10)),
                                 metadata=bearer(tokens["alice"]), timeout=10)
                assert p.error.code == kv_pb2.OK
            token = await login(a, "alice", "alicepw", ttl=60)
            full = [r async for r in kv.Scan(kv_pb2.ScanRequest(prefix=b"data/big", group=1),
                                             metadata=bearer(token), timeout=10)]
            assert len(full) == 2 and sum(len(r.items) for r in full) == 4  # two messages when valid
            reads = [0]
            base = time.time()

            def clock() -> float:  # the admission's check and the first message's: valid; then expired
                reads[0] += 1
                return base if reads[0] <= 2 else base + 61

            n.node.guard.clock = clock
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for r in kv.Scan(kv_pb2.ScanRequest(prefix=b"data/big", group=1), metadata=bearer(token),
                                       timeout=10):
                    got.append(r)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (exc.value.details() or "")
            assert len(got) == 1 and got[0].more and reads[0] == 3


def test_a_client_logs_in_again_when_its_stream_token_dies(tmp_path: Path) -> None:
    asyncio.run(_a_client_logs_in_again_when_its_stream_token_dies(tmp_path))


async def _a_client_logs_in_again_when_its_stream_token_dies(tmp_path: Path) -> None:
    """The client library's operations ride one KV.Stream opened with its token. When the server
    cuts that stream (auth enabled again: every token void), the refused operation is retried
    once after a new login and lands; after a password change the new login fails and the
    operation fails definitely (UNAUTHENTICATED), unapplied."""
    from kvstore import errors
    from kvstore.client import AsyncClient

    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        async with AsyncClient([n.address], user="alice", password="alicepw", timeout=10) as kv, \
                grpc.aio.insecure_channel(n.address) as ch:
            a = auth_pb2_grpc.AuthStub(ch)
            await kv.put(b"data/1", b"1")
            assert (await change(a, tokens["root"], op=Op.DISABLE)).error.code == kv_pb2.OK
            assert (await change(a, None, op=Op.ENABLE)).error.code == kv_pb2.OK
            await kv.put(b"data/2", b"2")  # the stream was cut; logged in again; applied once
            assert await kv.get(b"data/2") == b"2"
            root = await login(a, "root", "rootpw")
            r = await change(a, root, op=Op.USER_PASSWD, user="alice", password="changed")
            assert r.error.code == kv_pb2.OK, r.error
            with pytest.raises(errors.Unauthenticated) as exc:
                await kv.put(b"data/3", b"3")
            assert exc.value.definite
            g = await kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key=b"data/3"), metadata=bearer(root), timeout=10)
            assert g.error.code == kv_pb2.OK and not g.found


def test_txn_needs_read_on_what_it_reads_and_write_on_what_it_writes(tmp_path: Path) -> None:
    asyncio.run(_txn_permissions(tmp_path))


async def _txn_permissions(tmp_path: Path) -> None:
    async with one_node(tmp_path) as n:
        tokens = await setup_auth(n)
        async with grpc.aio.insecure_channel(n.address) as ch:
            kv = kv_pb2_grpc.KVStub(ch)

            def txn(cmp_key: bytes, get_key: bytes, put_key: bytes | None, in_failure: bool = False) -> kv_pb2.TxnRequest:
                ops = [kv_pb2.TxnOp(get=get_key)]
                if put_key is not None:
                    ops.append(kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=put_key, value=b"t")))
                body = kv_pb2.TxnBody(compares=[kv_pb2.Compare(key=cmp_key, target=kv_pb2.COMPARE_VERSION,
                                                               result=kv_pb2.EQUAL, number=0)])  # absent: holds
                (body.failure if in_failure else body.success).extend(ops)
                return kv_pb2.TxnRequest(txn=body)

            async def code(user: str, req: kv_pb2.TxnRequest) -> int:
                r = await kv.Txn(req, metadata=bearer(tokens[user]), timeout=10)
                assert not r.error.indeterminate, r.error
                return r.error.code

            assert await code("alice", txn(b"data/a", b"data/b", b"data/c")) == kv_pb2.OK
            assert await code("reader", txn(b"data/a", b"data/b", None)) == kv_pb2.OK
            # a write anywhere in it, even in a branch that would not run, needs write permission
            assert await code("reader", txn(b"data/a", b"data/b", b"data/c", in_failure=True)) == kv_pb2.PERMISSION_DENIED
            # a compare or a get outside the user's keys needs read permission there
            assert await code("alice", txn(b"other/a", b"data/b", b"data/c")) == kv_pb2.PERMISSION_DENIED
            assert await code("alice", txn(b"data/a", b"other/b", None)) == kv_pb2.PERMISSION_DENIED
            assert await code("bob", txn(b"data/a", b"data/b", None)) == kv_pb2.PERMISSION_DENIED
            g = await kv.Get(kv_pb2.GetRequest(key=b"data/c"), metadata=bearer(tokens["root"]), timeout=10)
            assert g.value == b"t"  # alice's transaction wrote it
