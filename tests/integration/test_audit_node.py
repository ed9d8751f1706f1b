"""The audit log's RPC coverage on one real node in-process (`Node` with `cfg.audit`): which calls
leave a line and with what, writes carried by KV.Stream matched to their results, the auth hook,
hostile input through the audited services, and the chain verifying afterwards."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onenode import one_node

from kvstore.security.audit import KEY_FILE, AuditSettings, open_line, read_key, seal, verify
from kvstore.security.audit.chain import GENESIS, check_mac
from kvstore.server.audit_rpc import AUDITED, KV_WRITES, MAX_KEY_SHOWN, NOT_AUDITED, key_fields
from kvstore.storage.store import read_audit_head
from kvstore.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, kv_pb2, kv_pb2_grpc, shard_pb2, shard_pb2_grpc

pytestmark = pytest.mark.timeout(300)

GARBAGE = b"\xff\xff\xff\xff"


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def test_every_rpc_of_the_audited_services_is_classified() -> None:
    """Generated from the service descriptors: a new Admin, Shard, KV or Auth RPC cannot be forgotten."""
    for pb in (admin_pb2, shard_pb2, kv_pb2, auth_pb2):
        for service in pb.DESCRIPTOR.services_by_name.values():
            audited = set(AUDITED.get(service.full_name, {}))
            if service.full_name == "kvstore.v1.KV":
                audited |= {*KV_WRITES, "Stream"}
            skipped = NOT_AUDITED[service.full_name]
            assert not audited & skipped
            assert {m.name for m in service.methods} == audited | skipped, service.full_name


def test_key_fields_show_text_or_hex_and_cut_long_keys() -> None:
    assert key_fields(b"app/a") == {"key": "app/a"}
    assert key_fields(b"\xff\x00") == {"key_hex": "ff00"}
    long = key_fields(b"k" * 5000)
    assert long == {"key_bytes": 5000, "key": "k" * MAX_KEY_SHOWN}


def test_a_node_audits_admin_shard_and_write_rpcs_but_not_reads(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"

    async def main() -> None:
        async with one_node(tmp_path, audit=AuditSettings(path, writes=True, sync_ms=20)) as n, \
                grpc.aio.insecure_channel(n.address) as ch:
            kv, admin = kv_pb2_grpc.KVStub(ch), admin_pb2_grpc.AdminStub(ch)
            shard = shard_pb2_grpc.ShardStub(ch)
            assert (await kv.Put(kv_pb2.PutRequest(key=b"\xffbin", value=b"v"))).error.code == kv_pb2.OK
            await kv.Get(kv_pb2.GetRequest(key=b"\xffbin"))
            await admin.Status(admin_pb2.StatusRequest())
            await admin.Snapshot(admin_pb2.SnapshotRequest())
            bad = await admin.TransferLeader(admin_pb2.TransferLeaderRequest(to=1, groups=[77]))
            assert bad.error.code == kv_pb2.INVALID_ARGUMENT
            await shard.ShardOp(shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.INFO))
            # three writes and a read on one stream; each write's line carries its own result
            call = kv.Stream()
            await call.write(kv_pb2.OpBatch(ops=[
                kv_pb2.Op(id=1, put=kv_pb2.PutRequest(key=b"s/1", value=b"a")),
                kv_pb2.Op(id=2, cas=kv_pb2.CasRequest(key=b"s/1", expected=b"zzz", value=b"b")),
                kv_pb2.Op(id=3, get=kv_pb2.GetRequest(key=b"s/1")),
                kv_pb2.Op(id=4, delete=kv_pb2.DeleteRequest(key=b"k" * 100_000)),
            ]))
            got: set[int] = set()
            while got != {1, 2, 3, 4}:
                batch = await asyncio.wait_for(call.read(), 20)
                assert batch is not grpc.aio.EOF
                got |= {r.id for r in batch.results}
            await call.done_writing()
            while await asyncio.wait_for(call.read(), 20) is not grpc.aio.EOF:
                pass
            # garbage through every audited service still gets INVALID_ARGUMENT (never UNKNOWN)
            for method in ("/kvstore.v1.Admin/AddMember", "/kvstore.v1.Shard/ShardOp", "/kvstore.v1.KV/Put"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(method)(GARBAGE, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a forged internal call (not a member) is refused, and the refusal is audited
            with pytest.raises(grpc.aio.AioRpcError) as forged:
                await shard.GroupPropose(shard_pb2.GroupProposeRequest(
                    group=1, transfer=True, transfer_to=1, cluster_id="kvstore", from_node=666))
            assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert n.node.audit is not None
            n.node.audit.auth_event("login", "alice", "ipv4:127.0.0.1:1", "PERMISSION_DENIED", user="alice")
            assert n.node.audit.flush()

    asyncio.run(main())
    lines = _lines(path)
    ops = [x["op"] for x in lines]
    assert "Admin.Status" not in ops and "Shard.ShardOp" not in ops, "reads and INFO are not audited"
    assert not any("Get" in str(op) or "get" in str(op) for op in ops)
    by_op = {str(x["op"]): x for x in lines}
    assert by_op["Admin.Snapshot"]["result"] == "ok"
    assert by_op["Admin.TransferLeader"]["result"] == "INVALID_ARGUMENT"
    assert (by_op["Admin.TransferLeader"]["to"], by_op["Admin.TransferLeader"]["groups"]) == (1, "77")
    puts = [x for x in lines if x["op"] == "KV.Put"]
    assert {"key_hex": "ff62696e", "result": "ok", "identity": "anonymous"}.items() <= puts[-1].items()
    assert by_op["KV.Stream.put"]["key"] == "s/1" and by_op["KV.Stream.put"]["result"] == "ok"
    assert by_op["KV.Stream.cas"]["result"] == "ok"  # a cas that does not swap still succeeded as a call
    assert by_op["KV.Stream.delete"]["result"] == "KEY_TOO_LARGE"
    assert by_op["KV.Stream.delete"]["key_bytes"] == 100_000
    assert {"identity": "alice", "result": "PERMISSION_DENIED", "user": "alice"}.items() <= by_op["auth.login"].items()
    assert {"result": "PERMISSION_DENIED", "from_node": 666, "what": "transfer_leader", "group": 1}.items() \
        <= by_op["Shard.GroupPropose"].items()
    # the node stopped gracefully: every line is confirmed by the head in its store
    key = read_key(tmp_path / "n1" / KEY_FILE)
    head = read_audit_head(tmp_path / "n1" / "db")
    report = verify(path, key, head)
    assert report.ok and report.unconfirmed == 0, report.summary()
    assert head is not None and head.seq == report.last_seq == len(lines)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, str, object]:
    u64 = st.integers(0, 2**64 - 1)
    which = draw(st.sampled_from(["AddMember", "PromoteMember", "RemoveMember", "TransferLeader", "Snapshot",
                                  "ShardOp", "GroupPropose", "Put", "Delete", "Cas", "Txn"]))
    if which == "AddMember":
        return "kvstore.v1.Admin", which, admin_pb2.AddMemberRequest(
            id=draw(u64), address=draw(st.text(max_size=300)), learner=draw(st.booleans()),
            groups=draw(st.lists(u64, max_size=5)))
    if which in ("PromoteMember", "RemoveMember"):
        cls = admin_pb2.PromoteMemberRequest if which == "PromoteMember" else admin_pb2.RemoveMemberRequest
        return "kvstore.v1.Admin", which, cls(id=draw(u64), groups=draw(st.lists(u64, max_size=5)))
    if which == "TransferLeader":
        return "kvstore.v1.Admin", which, admin_pb2.TransferLeaderRequest(to=draw(u64))
    if which == "Snapshot":
        return "kvstore.v1.Admin", which, admin_pb2.SnapshotRequest()
    if which == "ShardOp":
        return "kvstore.v1.Shard", which, shard_pb2.ShardOpRequest(op=draw(st.integers(0, 50)), group=draw(u64))
    if which == "GroupPropose":
        return "kvstore.v1.Shard", which, shard_pb2.GroupProposeRequest(
            group=draw(u64), command=draw(st.binary(max_size=40)), conf_change=draw(st.binary(max_size=40)),
            read_barrier=draw(st.booleans()), transfer=draw(st.booleans()), transfer_to=draw(u64),
            from_node=draw(u64))
    key = draw(st.binary(max_size=600))
    if which == "Put":
        return "kvstore.v1.KV", which, kv_pb2.PutRequest(key=key, value=draw(st.binary(max_size=50)))
    if which == "Delete":
        return "kvstore.v1.KV", which, kv_pb2.DeleteRequest(key=key)
    if which == "Txn":
        ops = st.one_of(st.builds(lambda k: kv_pb2.TxnOp(get=k), st.binary(max_size=600)),
                        st.builds(lambda k: kv_pb2.TxnOp(delete=k), st.binary(max_size=600)), st.just(kv_pb2.TxnOp()))
        return "kvstore.v1.KV", which, kv_pb2.TxnRequest(txn=kv_pb2.TxnBody(
            compares=[kv_pb2.Compare(key=key)], success=draw(st.lists(ops, max_size=3)),
            failure=draw(st.lists(ops, max_size=3))))
    return "kvstore.v1.KV", which, kv_pb2.CasRequest(key=key, value=draw(st.binary(max_size=50)))


@settings(max_examples=300, deadline=None)
@given(_requests())
def test_any_audited_request_describes_into_a_line_that_verifies(req: tuple[str, str, object]) -> None:
    service, method, request = req
    describe = AUDITED[service][method] if service != "kvstore.v1.KV" else KV_WRITES[method]
    fields = describe(request)
    if fields is None:
        return  # a read-only variant (ShardOp INFO, a read barrier)
    assert all(v is None or type(v) in (int, str) for v in fields.values()), fields
    line, mac = seal(bytes(32), 1, GENESIS, {"op": method, **fields}, first_in_file=True)
    parsed = open_line(line[:-1])
    assert parsed.mac == mac and check_mac(bytes(32), GENESIS, parsed)


def test_auth_events_are_audited_with_the_authenticated_user_and_never_a_password(tmp_path: Path) -> None:
    """With auth on, the audit line's identity is the user the guard authenticated (by token),
    logins (failed ones too) and every user / role change are audited, and no password or token
    ever reaches the log."""
    from kvstore.v1 import auth_pb2_grpc

    path = tmp_path / "audit.log"
    Op = auth_pb2.AuthChangeRequest

    def bearer(token: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token}")]

    async def main() -> None:
        async with one_node(tmp_path, audit=AuditSettings(path, writes=True, sync_ms=20)) as n, \
                grpc.aio.insecure_channel(n.address) as ch:
            a, kv = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)
            for user, pw in (("root", "root-secret-pw"), ("alice", "alice-secret-pw")):
                r = await a.Change(Op(op=Op.USER_ADD, user=user, password=pw), timeout=10)
                assert r.error.code == kv_pb2.OK, r.error
            assert (await a.Change(Op(op=Op.ENABLE), timeout=10)).error.code == kv_pb2.OK
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await a.Authenticate(auth_pb2.AuthenticateRequest(user="alice", password="wrong"), timeout=10)
            assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await a.Authenticate(auth_pb2.AuthenticateRequest(user="root", password="root-secret-pw"), timeout=10)
            assert ok.error.code == kv_pb2.OK and ok.token
            put = await kv.Put(kv_pb2.PutRequest(key=b"k", value=b"v"), metadata=bearer(ok.token), timeout=10)
            assert put.error.code == kv_pb2.OK
            r = await a.Change(Op(op=Op.USER_PASSWD, user="alice", password="another-secret-pw"),
                               metadata=bearer(ok.token), timeout=10)
            assert r.error.code == kv_pb2.OK, r.error
            token = ok.token
            assert n.node.audit is not None and n.node.audit.flush()
        text = path.read_text()
        assert "secret-pw" not in text and "wrong" not in text and token not in text
        lines = _lines(path)
        logins = [x for x in lines if x["op"] == "Auth.Authenticate"]
        assert [(x["login_user"], x["result"] == "ok") for x in logins] == [("alice", False), ("root", True)]
        changes = [(x["auth_op"], x.get("user"), x["result"]) for x in lines if x["op"] == "Auth.Change"]
        assert changes == [("user_add", "root", "ok"), ("user_add", "alice", "ok"), ("enable", None, "ok"),
                           ("user_passwd", "alice", "ok")]
        assert [x["identity"] for x in lines if x["op"] == "Auth.Change"][-1] == "root (by token)"
        assert [x["identity"] for x in lines if x["op"] == "KV.Put"][-1] == "root (by token)"  # (earlier: warm-up)

    asyncio.run(main())


def test_etcd_api_writes_are_audited_as_the_kvstore_rpcs_they_run_as(tmp_path: Path) -> None:
    """etcd's Put, DeleteRange, Txn, LeaseGrant and Compact run as kvstore's KV RPCs through the
    audited servicer: the same lines (op, key, caller, result); Range is a read, not audited."""
    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    path = tmp_path / "audit.log"

    async def main() -> None:
        async with one_node(tmp_path, audit=AuditSettings(path, writes=True, sync_ms=20)) as n, \
                grpc.aio.insecure_channel(n.address) as ch:
            kv, lease = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.LeaseStub(ch)
            put = await kv.Put(rpc_pb2.PutRequest(key=b"e/a", value=b"1"))
            await kv.Range(rpc_pb2.RangeRequest(key=b"e/", range_end=b"e0"))
            await kv.Txn(rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(
                request_put=rpc_pb2.PutRequest(key=b"e/b", value=b"2"))]))
            await kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"e/a"))
            await lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=30))
            await kv.Compact(rpc_pb2.CompactionRequest(revision=put.header.revision))
            # MoveLeader: the data groups and the metadata group in one audited TransferLeader
            await rpc_pb2_grpc.MaintenanceStub(ch).MoveLeader(rpc_pb2.MoveLeaderRequest(targetID=1))
            assert n.node.audit is not None and n.node.audit.flush()

    asyncio.run(main())
    by_op = {str(x["op"]): x for x in _lines(path)}
    moved = by_op["Admin.TransferLeader"]
    assert moved["result"] == "ok" and moved["to"] == 1 and "0" in str(moved["groups"]).split(","), moved
    assert {"key": "e/a", "result": "ok", "identity": "anonymous"}.items() <= by_op["KV.Put"].items()
    assert {"key": "e/b", "result": "ok"}.items() <= by_op["KV.Txn"].items()
    assert {"key": "e/a", "result": "ok"}.items() <= by_op["KV.Delete"].items()
    assert by_op["KV.LeaseGrant"]["result"] == "ok" and by_op["KV.Compact"]["result"] == "ok"
    assert not any("Range" in op or "Scan" in op or "Get" in op for op in by_op)
