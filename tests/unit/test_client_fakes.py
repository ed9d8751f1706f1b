"""An in-process fake kvstore cluster (grpc.aio KV + Admin servicers over one dict) for the client
and kvctl tests. Servers listen on 127.0.0.1 ephemeral ports only and run on an event loop in a
background thread, so both async and sync clients (and kvctl) can talk to them.

Each fake node can be told to be the leader, answer NOT_LEADER (with or without a hint), hang,
or follow a script of per-request actions (return an error, apply-then-error, abort the RPC,
delay). Writes are deduplicated by (client_id, seq) like the real server, and every request's
session is recorded so tests can prove that retries reuse it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio

from kvstore.storage.commands import MAX_KEY_SIZE
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc

T = TypeVar("T")

MAX_KEY = MAX_KEY_SIZE  # the real server's limit (one limit per quantity)
MAX_VALUE = 1024 * 1024


@dataclass
class Call:
    node: int
    method: str
    client_id: int = 0
    seq: int = 0
    ack: int = 0
    key: bytes = b""
    retry: bool = False
    horizon: int = 0


@dataclass
class Action:
    """One scripted reaction of a node to the next KV request it receives.

    kind: "error" (answer with ``code``), "abort" (fail the RPC with gRPC ``status``), "delay"
    (sleep ``seconds`` then continue normally). ``apply``: perform the write before failing, so
    the outcome is really "applied but the client was not told".
    """

    kind: str
    code: int = 0
    indeterminate: bool = False
    apply: bool = False
    status: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    details: str = ""
    seconds: float = 0.0
    methods: tuple[str, ...] = ()  # empty = any KV method


@dataclass
class FakeNode:
    id: int
    address: str = ""
    hang: bool = False
    script: deque[Action] = field(default_factory=deque)
    server: Any = None


def closed_port() -> str:
    """An address on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class FakeCluster:
    def __init__(self, n: int = 3) -> None:
        self.nodes: dict[int, FakeNode] = {i: FakeNode(i) for i in range(1, n + 1)}
        self.leader_id = 1
        self.term = 1
        self.hint = True  # followers include the leader address in NOT_LEADER
        self.status_leader = True  # Admin.Status reports the leader
        self.advertise: dict[int, str] = {}  # override advertised member addresses
        self.store: dict[bytes, bytes] = {}
        self.sessions: dict[tuple[int, int], Any] = {}
        self.applied: list[tuple[str, int, int, bytes]] = []
        self.calls: list[Call] = []
        self.admin_calls: list[tuple[int, str, Any]] = []
        self.scan_chunk = 3
        self.scan_break_after: int | None = None  # abort a scan stream after this many messages (once)
        self.stream_scans = True  # False: KV.Stream does not know scans (an older node)
        self.index = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-cluster", daemon=True)
        self._thread.start()
        for node in self.nodes.values():
            self._run(self._start(node))

    # ----- plumbing -----

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self, node: FakeNode) -> None:
        server = grpc.aio.server()
        kv_pb2_grpc.add_KVServicer_to_server(_KV(self, node), server)
        admin_pb2_grpc.add_AdminServicer_to_server(_Admin(self, node), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        node.address = f"127.0.0.1:{port}"
        node.server = server

    async def _stop(self) -> None:
        await asyncio.gather(*(n.server.stop(0) for n in self.nodes.values() if n.server is not None))

    def close(self) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- test API -----

    @property
    def endpoints(self) -> list[str]:
        return [n.address for n in self.nodes.values()]

    def addr(self, node_id: int) -> str:
        return self.nodes[node_id].address

    def set_leader(self, node_id: int) -> None:
        self.leader_id = node_id
        self.term += 1

    def kv_calls(self, method: str | None = None) -> list[Call]:
        return [c for c in self.calls if method is None or c.method == method]

    def script(self, node_id: int, *actions: Action) -> None:
        self.nodes[node_id].script.extend(actions)

    def members(self) -> list[admin_pb2.Member]:
        return [admin_pb2.Member(id=n.id, address=self.advertise.get(n.id, n.address)) for n in self.nodes.values()]

    # ----- server-side behaviour -----

    def leader_error(self, node: FakeNode) -> kv_pb2.Error | None:
        if self.leader_id == node.id:
            return None
        if self.leader_id == 0:
            return kv_pb2.Error(code=kv_pb2.NO_LEADER, message="no leader")
        if not self.hint:
            return kv_pb2.Error(code=kv_pb2.NOT_LEADER, message="not leader", leader_id=self.leader_id)
        leader_addr = self.advertise.get(self.leader_id) or self.nodes[self.leader_id].address
        return kv_pb2.Error(
            code=kv_pb2.NOT_LEADER, message="not leader", leader_id=self.leader_id, leader_hint=leader_addr
        )

    def apply(self, session: kv_pb2.Session, fn: Callable[[], Any], method: str, key: bytes) -> Any:
        k = (session.client_id, session.seq)
        if session.client_id and k in self.sessions:
            return self.sessions[k]
        resp = fn()
        self.index += 1
        self.applied.append((method, session.client_id, session.seq, key))
        if session.client_id:
            self.sessions[k] = resp
        return resp


def txn_key(request: kv_pb2.TxnRequest) -> bytes:
    """The first key a (one-level) transaction names."""
    b = request.txn
    for c in b.compares:
        return c.key
    for op in (*b.success, *b.failure):
        which = op.WhichOneof("op")
        if which == "put":
            return op.put.key
        if which in ("get", "delete"):
            return getattr(op, which)
    return b""


class _Abort(Exception):
    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


class _OpContext:
    """The context a scripted action sees for one operation of a KV.Stream: aborting it breaks
    the whole stream (as a real broken connection would)."""

    async def abort(self, status: grpc.StatusCode, details: str) -> None:
        raise _Abort(status, details)


class _KV(kv_pb2_grpc.KVServicer):
    def __init__(self, cluster: FakeCluster, node: FakeNode) -> None:
        self.c = cluster
        self.node = node

    async def Stream(self, request_iterator: Any, context: Any) -> Any:
        """Each operation runs its unary handler (scripts and all), concurrently."""
        out: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        handlers = {"get": self.Get, "put": self.Put, "delete": self.Delete, "cas": self.Cas, "scan": self.scan_once,
                    "txn": self.Txn}

        async def one(op: kv_pb2.Op) -> None:
            kind = op.WhichOneof("op")
            assert kind is not None
            if kind == "scan" and not self.c.stream_scans:
                await out.put(kv_pb2.OpResult(id=op.id))  # what a node answers an operation it does not know
                return
            try:
                reply = await handlers[kind](getattr(op, kind), _OpContext())
            except _Abort as a:
                await out.put(a)
                return
            r = kv_pb2.OpResult(id=op.id)
            getattr(r, kind).CopyFrom(reply)
            await out.put(r)

        async def read() -> None:
            async for batch in request_iterator:
                for op in batch.ops:
                    t = asyncio.get_running_loop().create_task(one(op))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                if reader.done() and not tasks and out.empty():
                    return  # the client half-closed and everything is answered: end the stream
                try:
                    item = await asyncio.wait_for(out.get(), 0.05)
                except TimeoutError:
                    continue
                if isinstance(item, _Abort):
                    await context.abort(item.status, item.details)
                yield kv_pb2.ResultBatch(results=[item])
        finally:
            reader.cancel()
            for t in list(tasks):
                t.cancel()

    async def _gate(self, method: str, request: Any, context: Any, apply: Callable[[], Any] | None) -> Any:
        """Record the call, then: None to proceed, or a kv_pb2.Error to answer with."""
        s = getattr(request, "session", None)
        self.c.calls.append(
            Call(self.node.id, method, s.client_id if s else 0, s.seq if s else 0, s.ack if s else 0,
                 request.start if method in ("Scan", "ScanOnce") else txn_key(request) if method == "Txn" else request.key,
                 bool(s.retry) if s else False, s.horizon if s else 0)
        )
        if self.node.hang:
            await asyncio.sleep(60)
        script = self.node.script
        if script and (not script[0].methods or method in script[0].methods):
            act = script.popleft()
            if act.kind == "delay":
                await asyncio.sleep(act.seconds)
            elif act.kind == "abort":
                if act.apply and apply is not None:
                    apply()
                await context.abort(act.status, act.details or "scripted abort")
            elif act.kind == "error":
                if act.apply and apply is not None:
                    apply()
                return kv_pb2.Error(code=act.code, message="scripted", indeterminate=act.indeterminate)
        err = self.c.leader_error(self.node)
        if err is not None:
            return err
        if method not in ("Scan", "ScanOnce", "Txn") and len(request.key) > MAX_KEY:
            return kv_pb2.Error(code=kv_pb2.KEY_TOO_LARGE, message=f"key too large: {len(request.key)} bytes > {MAX_KEY}")
        value = getattr(request, "value", b"")
        if len(value) > MAX_VALUE:
            return kv_pb2.Error(code=kv_pb2.VALUE_TOO_LARGE, message="value too large")
        return None

    async def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
        err = await self._gate("Get", request, context, None)
        if err is not None:
            return kv_pb2.GetResponse(error=err)
        v = self.c.store.get(request.key)
        return kv_pb2.GetResponse(found=v is not None, value=v or b"", index=self.c.index)

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        def do() -> kv_pb2.PutResponse:
            self.c.store[request.key] = request.value
            return kv_pb2.PutResponse(index=self.c.index + 1)

        def apply() -> kv_pb2.PutResponse:
            return self.c.apply(request.session, do, "Put", request.key)

        err = await self._gate("Put", request, context, apply)
        if err is not None:
            return kv_pb2.PutResponse(error=err)
        return apply()

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> kv_pb2.DeleteResponse:
        def do() -> kv_pb2.DeleteResponse:
            existed = self.c.store.pop(request.key, None) is not None
            return kv_pb2.DeleteResponse(existed=existed, index=self.c.index + 1)

        def apply() -> kv_pb2.DeleteResponse:
            return self.c.apply(request.session, do, "Delete", request.key)

        err = await self._gate("Delete", request, context, apply)
        if err is not None:
            return kv_pb2.DeleteResponse(error=err)
        return apply()

    async def Txn(self, request: kv_pb2.TxnRequest, context: Any) -> kv_pb2.TxnResponse:
        """A fake of one-level transactions: value compares, then puts and gets (enough for the
        client's session and error handling; the real semantics are tested on real nodes)."""
        body = request.txn

        def do() -> kv_pb2.TxnResponse:
            ok = all(self.c.store.get(c.key) == c.value for c in body.compares)
            out = kv_pb2.TxnResponse(index=self.c.index + 1, revision=self.c.index + 1)
            out.result.succeeded = ok
            for op in body.success if ok else body.failure:
                if op.WhichOneof("op") == "put":
                    self.c.store[op.put.key] = op.put.value
                    out.result.responses.add(put=self.c.index + 1)
                elif op.WhichOneof("op") == "get":
                    v = self.c.store.get(op.get)
                    kv = out.result.responses.add().get
                    kv.SetInParent()
                    if v is not None:
                        kv.key, kv.value = op.get, v
            return out

        def apply() -> kv_pb2.TxnResponse:
            return self.c.apply(request.session, do, "Txn", txn_key(request))

        err = await self._gate("Txn", request, context, apply)
        if err is not None:
            return kv_pb2.TxnResponse(error=err)
        return apply()

    async def Cas(self, request: kv_pb2.CasRequest, context: Any) -> kv_pb2.CasResponse:
        def do() -> kv_pb2.CasResponse:
            cur = self.c.store.get(request.key)
            ok = cur is None if request.expect_absent else cur == request.expected
            if ok:
                self.c.store[request.key] = request.value
            return kv_pb2.CasResponse(swapped=ok, found=cur is not None, current=cur or b"", index=self.c.index + 1)

        def apply() -> kv_pb2.CasResponse:
            return self.c.apply(request.session, do, "Cas", request.key)

        err = await self._gate("Cas", request, context, apply)
        if err is not None:
            return kv_pb2.CasResponse(error=err)
        return apply()

    def _scan_keys(self, request: kv_pb2.ScanRequest) -> list[bytes]:
        if request.prefix:
            keys = [k for k in sorted(self.c.store) if k.startswith(request.prefix)]
        else:
            keys = [k for k in sorted(self.c.store) if k >= request.start and (not request.end or k < request.end)]
        return keys[: request.limit] if request.limit else keys

    async def scan_once(self, request: kv_pb2.ScanRequest, context: Any) -> kv_pb2.ScanResponse:
        """A scan on KV.Stream (recorded as "ScanOnce"): whole if it fits in one chunk, else
        more=True and nothing."""
        err = await self._gate("ScanOnce", request, context, None)
        if err is not None:
            return kv_pb2.ScanResponse(error=err)
        keys = self._scan_keys(request)
        if len(keys) > self.c.scan_chunk:
            return kv_pb2.ScanResponse(more=True)
        return kv_pb2.ScanResponse(items=[kv_pb2.KeyValue(key=k, value=self.c.store[k]) for k in keys])

    async def Scan(self, request: kv_pb2.ScanRequest, context: Any) -> Any:
        err = await self._gate("Scan", request, context, None)
        if err is not None:
            yield kv_pb2.ScanResponse(error=err)
            return
        keys = self._scan_keys(request)
        n = self.c.scan_chunk
        chunks = [keys[i : i + n] for i in range(0, len(keys), n)]
        for i, chunk in enumerate(chunks):
            if self.c.scan_break_after is not None and i == self.c.scan_break_after:
                self.c.scan_break_after = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            yield kv_pb2.ScanResponse(
                items=[kv_pb2.KeyValue(key=k, value=self.c.store[k]) for k in chunk], more=i + 1 < len(chunks)
            )


class _Admin(admin_pb2_grpc.AdminServicer):
    def __init__(self, cluster: FakeCluster, node: FakeNode) -> None:
        self.c = cluster
        self.node = node

    async def Status(self, request: admin_pb2.StatusRequest, context: Any) -> admin_pb2.StatusResponse:
        if self.node.hang:
            await asyncio.sleep(60)
        lead = self.c.leader_id if self.c.status_leader else 0
        role = "leader" if self.c.leader_id == self.node.id else "follower"
        return admin_pb2.StatusResponse(
            node_id=self.node.id,
            cluster_id="fake",
            address=self.c.advertise.get(self.node.id, self.node.address),
            members=self.c.members(),
            groups=[
                admin_pb2.GroupStatus(
                    group=1,
                    role=role,
                    term=self.c.term,
                    leader_id=lead,
                    commit=self.c.index,
                    applied=self.c.index,
                    first_index=1,
                    last_index=self.c.index,
                )
            ],
        )

    async def _admin(self, name: str, request: Any, message: str) -> admin_pb2.AdminResponse:
        self.c.admin_calls.append((self.node.id, name, request))
        if self.node.hang:
            await asyncio.sleep(60)
        err = self.c.leader_error(self.node)
        if err is not None:
            return admin_pb2.AdminResponse(error=err)
        return admin_pb2.AdminResponse(message=message, members=self.c.members())

    async def AddMember(self, request: admin_pb2.AddMemberRequest, context: Any) -> admin_pb2.AdminResponse:
        return await self._admin("AddMember", request, f"added {request.id}")

    async def PromoteMember(self, request: admin_pb2.PromoteMemberRequest, context: Any) -> admin_pb2.AdminResponse:
        return await self._admin("PromoteMember", request, f"promoted {request.id}")

    async def RemoveMember(self, request: admin_pb2.RemoveMemberRequest, context: Any) -> admin_pb2.AdminResponse:
        return await self._admin("RemoveMember", request, f"removed {request.id}")

    async def TransferLeader(self, request: admin_pb2.TransferLeaderRequest, context: Any) -> admin_pb2.AdminResponse:
        resp = await self._admin("TransferLeader", request, f"transferred to {request.to}")
        if not resp.HasField("error") and request.to:
            self.c.set_leader(request.to)
        return resp

    async def Snapshot(self, request: admin_pb2.SnapshotRequest, context: Any) -> admin_pb2.AdminResponse:
        return await self._admin("Snapshot", request, "snapshot at index 7")
