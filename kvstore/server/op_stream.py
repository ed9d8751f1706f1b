"""`KV.Stream`: one client's operations multiplexed over one long-lived gRPC stream.

The unary calls cost a gRPC call (and a coroutine, a future and a timer) per operation; here a
batch of operations arrives in one message and their answers leave in batches. Writes and the
leader's linearizable reads go straight to the host with a callback: nothing is awaited per
operation. Anything else (reads on replicas, bounded or stale reads, scans answered in one
message) runs a handler's coroutine. Every answer is exactly what the unary call would have
answered (a scan: its whole part in one message, or "does not fit" and nothing).

Invariants:
- every operation read from the stream gets exactly one answer (result, error or TIMEOUT) while
  the stream lives; one operation's failure, whatever it is (a definite KVError, or INTERNAL
  for an unexpected exception, logged), is that operation's answer and never ends the stream; a callback arriving after the answer (a late commit after a TIMEOUT) is
  dropped, and an indeterminate TIMEOUT says so;
- the writes of one batch are proposed together, per group, after the batch's operations were
  validated (`Host.propose_many`: one append and one append message per follower for all of
  them, in the batch's order); a refusal before appending (NOT_LEADER, ...) answers each of them
  with it (definite), an unexpected failure each with INTERNAL (indeterminate);
- at most `MAX_PENDING` operations per stream wait for the host: beyond that the stream stops
  reading, and gRPC flow control pushes back on the client;
- with a rate limit (`--rate-limit`), each batch of N operations asks the caller's bucket (keyed
  by the principal the auth guard established, `admission.rate_key`; a node is never limited)
  for N tokens: the first ones it covers run, the others are answered RESOURCE_EXHAUSTED with a
  retry-after at once (definite: never proposed) and the stream goes on;
- a stream never outlives its token: each batch first re-checks the call's credential
  (`AuthGuard.recheck`: a clock read and a version compare; more only when the auth state
  changed). Once the token expired or was revoked (password change, user deleted, auth enabled
  again), every operation of that batch is answered UNAUTHENTICATED (definite: not started),
  nothing more is read, the operations already started are answered, and the call ends with
  status UNAUTHENTICATED;
- when the stream ends, pending operations are forgotten (their timers cancelled); the client
  treats them as it treats a broken connection (writes indeterminate).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore import errors, hoptrace
from kvstore.raft import Role
from kvstore.security.guard import credential_of_call
from kvstore.security.identity import identity_of_call
from kvstore.security.rbac import READ
from kvstore.storage import txn
from kvstore.storage.commands import ApplyResult
from kvstore.txnscan import has_scans
from kvstore.v1 import kv_pb2

from .admission import rate_key
from .reads import LINEARIZABLE, ReadPoint
from .requests import KVRequests, check_with_lease
from .txn_scans import scanning_txn

MAX_PENDING = 4096

_ERROR_REPLY: dict[str, Callable[[kv_pb2.Error], Any]] = {
    "get": lambda e: kv_pb2.GetResponse(error=e),
    "put": lambda e: kv_pb2.PutResponse(error=e),
    "delete": lambda e: kv_pb2.DeleteResponse(error=e),
    "cas": lambda e: kv_pb2.CasResponse(error=e),
    "scan": lambda e: kv_pb2.ScanResponse(error=e),
    "txn": lambda e: kv_pb2.TxnResponse(error=e),
}


@dataclass(slots=True)
class _Queued:
    """A validated write waiting for the end of its batch to be proposed."""

    op_id: int
    kind: str
    data: bytes
    done: Callable[[Any, errors.KVError | None], None]
    timeout: float


class OpStream:
    def __init__(self, svc: KVRequests, context: Any = None) -> None:
        self.svc = svc
        self.context = context
        adm = svc.admission
        key = rate_key(identity_of_call(), context) if adm is not None and adm.limiter is not None else None
        self._limited = key is not None
        self.identity = key or ""
        """Who the rate limit counts this stream's operations against (the bucket's key)."""
        cred = credential_of_call() if svc.guard is not None else None
        self.credential = cred if cred is not None and cred.key else None
        """The token this stream was admitted with (None: not by token, nothing to re-check)."""
        self.revoked: errors.Unauthenticated | None = None
        """Why the stream's token is no longer valid (the stream ends with UNAUTHENTICATED)."""
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.TimerHandle] = {}
        """Operations handed to the host, by id: their timeout timers."""
        self.tasks: set[asyncio.Task[None]] = set()
        """Operations running a unary handler's coroutine (the slow paths)."""
        self.running: set[int] = set()
        """The ids of the operations in `tasks`."""
        self._queued: dict[int, list[_Queued]] = {}
        """The current batch's validated writes, by group, until `_propose_queued`."""
        self._queued_ids: set[int] = set()
        """Their operation ids (in flight too: a repeated id is refused)."""
        self.out: list[kv_pb2.OpResult] = []
        self.has_out = asyncio.Event()
        self.room = asyncio.Event()
        self.reading = True
        reads = svc.reads.metrics
        self._leader_reads = reads.reads.labels(LINEARIZABLE, "leader") if reads is not None else None
        self._prepare: dict[str, Callable[[Any], tuple[bytes, bytes]]] = {
            "put": svc.prepare_put, "delete": svc.prepare_delete, "cas": svc.prepare_cas,
        }
        self._reply: dict[str, Callable[[Any, ApplyResult | None], None]] = {
            "put": svc.put_reply_into, "delete": svc.delete_reply_into, "cas": svc.cas_reply_into,
        }
        """Each write kind's reply, filled into the OpResult's field in place (no copy)."""

    # --- the call ---------------------------------------------------------------------------
    async def run(self, requests: AsyncIterator[kv_pb2.OpBatch]) -> AsyncIterator[kv_pb2.ResultBatch]:
        reader = self.loop.create_task(self._read(requests))
        try:
            while True:
                if not self.out:
                    if not self.reading and not self.pending and not self.tasks:
                        break
                    self.has_out.clear()
                    await self.has_out.wait()
                    continue
                out, self.out = self.out, []
                if hoptrace.ON:
                    hoptrace.mark("s.reply")
                    hoptrace.mark(f"s.results:{len(out)}")
                yield kv_pb2.ResultBatch(results=out)
            if self.revoked is not None and self.context is not None:
                await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, f"KV.Stream: {self.revoked.message}")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._close()

    async def _read(self, requests: AsyncIterator[kv_pb2.OpBatch]) -> None:
        try:
            async for batch in requests:
                if hoptrace.ON:
                    hoptrace.mark("s.batch")
                    hoptrace.mark(f"s.ops:{len(batch.ops)}")
                if self.credential is not None and not self._still_valid(batch):
                    break
                if self._limited:
                    self._start_limited(batch)
                else:
                    for op in batch.ops:
                        self._start(op)
                if self._queued:
                    self._propose_queued()
                if hoptrace.ON:
                    hoptrace.mark("s.proposed")
                self.svc.wake()
                while len(self.pending) + len(self.tasks) >= MAX_PENDING:
                    self.room.clear()
                    await self.room.wait()
        finally:
            self.reading = False
            self.has_out.set()

    def _still_valid(self, batch: kv_pb2.OpBatch) -> bool:
        """Re-check the stream's token; if it is no longer valid, answer every operation of
        `batch` UNAUTHENTICATED (definite) and return False."""
        guard, cred = self.svc.guard, self.credential
        assert guard is not None and cred is not None
        try:
            guard.recheck(cred)
            return True
        except errors.Unauthenticated as err:
            self.revoked = err
        for op in batch.ops:
            kind = op.WhichOneof("op")
            if kind is None:
                self.out.append(kv_pb2.OpResult(id=op.id))
            else:
                self._error(op.id, kind, self.revoked)
        self.has_out.set()
        return False

    def _close(self) -> None:
        for h in self.pending.values():
            h.cancel()
        self.pending.clear()
        for t in self.tasks:
            t.cancel()

    def _start_limited(self, batch: kv_pb2.OpBatch) -> None:
        """Start the operations of `batch` the caller's rate limit admits; refuse the rest."""
        adm = self.svc.admission
        assert adm is not None
        ops = batch.ops
        k, after = adm.admit(self.identity, len(ops))
        for op in ops[:k]:
            self._start(op)
        if k < len(ops):
            for op in ops[k:]:
                kind = op.WhichOneof("op")
                if kind is None:
                    self.out.append(kv_pb2.OpResult(id=op.id))
                    continue
                self._error(op.id, kind, errors.ResourceExhausted(
                    f"rate limit exceeded: retry after {errors.retry_after_ms(after)} ms", retry_after=after,
                ))
            self.has_out.set()

    # --- answers ----------------------------------------------------------------------------
    def _answer(self, op_id: int, kind: str, reply: Any) -> None:
        r = kv_pb2.OpResult(id=op_id)
        getattr(r, kind).CopyFrom(reply)
        self.out.append(r)
        self.has_out.set()

    def _error(self, op_id: int, kind: str, err: errors.KVError) -> None:
        self._answer(op_id, kind, _ERROR_REPLY[kind](self.svc.err(err)))

    def _settle(self, op_id: int) -> bool:
        """Take `op_id` off the pending list; False if it was already answered (timed out)."""
        h = self.pending.pop(op_id, None)
        if h is None:
            return False
        h.cancel()
        if not self.room.is_set():
            self.room.set()
        return True

    def _expire(self, op_id: int, kind: str, timeout: float) -> None:
        if self.pending.pop(op_id, None) is None:
            return
        self.room.set()
        if kind == "get":
            self._error(op_id, kind, errors.Timeout(f"read not confirmed within {timeout:g}s", indeterminate=False))
        else:
            self._error(op_id, kind, errors.Timeout(f"write not applied within {timeout:g}s", indeterminate=True))

    # --- operations -------------------------------------------------------------------------
    def _start(self, op: kv_pb2.Op) -> None:
        """Start one operation. Never raises: whatever goes wrong is this operation's answer (a
        definite KVError, or INTERNAL for an unexpected exception), and the stream goes on."""
        kind = op.WhichOneof("op")
        if kind is None:
            self.out.append(kv_pb2.OpResult(id=op.id))  # an operation this server does not know
            self.has_out.set()
            return
        try:
            if op.id in self.pending or op.id in self.running or op.id in self._queued_ids:
                raise errors.InvalidArgument(f"operation id {op.id} is already in flight")
            timeout = self.svc.cfg.request_timeout
            if op.timeout_ms:
                timeout = min(timeout, op.timeout_ms / 1000)
            if kind == "get":
                self._get(op.id, op.get, timeout)
            elif kind == "scan":
                self._slow(op.id, "scan", self.svc.scan_once(op.scan))
            else:
                self._write(op.id, kind, getattr(op, kind), timeout)
        except errors.KVError as err:
            self._error(op.id, kind, err)
        except Exception as err:
            # Not proposed (_write answers its own failures once it has proposed): definite.
            self._error(op.id, kind, self.svc.internal(f"stream {kind}", err, indeterminate=False))

    def _write(self, op_id: int, kind: str, req: Any, timeout: float) -> None:
        """Validate and queue the write for `_propose_queued` (the end of its batch); raises
        (KVError or anything else) only while validating: then nothing was queued."""
        svc = self.svc
        t: txn.Txn | None = None
        if kind == "txn" and has_scans(req.txn):  # served by this node, reading every group
            self._slow(op_id, "txn", scanning_txn(svc, req, self.context), write=True)
            return
        if kind == "txn":
            t, data = svc.prepare_txn(req)
            routed = svc.route_txn(t, data)
            if not isinstance(routed, int):  # keys in several groups: a two-phase commit
                self._slow(op_id, "txn", svc.cross_txn(t, routed, req), write=True)
                return
            gid = routed
        elif kind == "delete" and svc.is_range_delete(req):  # every group: a two-phase commit
            self._slow(op_id, "delete", svc.delete_range(req), write=True)
            return
        else:
            key, data = self._prepare[kind](req)
            gid = svc.route_write(key, data, kind == "delete")
        gate = svc.host.gate
        if gate is not None:  # this write alone, not its whole batch, is refused (propose_many checks again)
            gate(data)
        t0 = self.loop.time()

        def done(result: Any, err: errors.KVError | None) -> None:
            # Called by the host's Ready loop: must not raise.
            if not self._settle(op_id):
                return
            try:
                if err is not None:
                    raise err
                res = svc.write_outcome(gid, result)
                svc.metrics.writes.inc()
                svc.metrics.proposal_seconds.observe(self.loop.time() - t0)
                r = kv_pb2.OpResult(id=op_id)
                if t is not None:
                    svc.txn_reply_into(r.txn, t, res)
                else:
                    self._reply[kind](getattr(r, kind), res)
            except errors.KVError as e:
                self._error(op_id, kind, e)
                return
            except Exception as e:
                self._error(op_id, kind, svc.internal(f"stream {kind}", e))
                return
            self.out.append(r)
            self.has_out.set()

        self._queued.setdefault(gid, []).append(_Queued(op_id, kind, data, done, timeout))
        self._queued_ids.add(op_id)

    def _propose_queued(self) -> None:
        """Propose the batch's queued writes, one `Host.propose_many` per group (in the batch's
        order), and start their timers. Never raises: a failure is each write's answer."""
        queued, self._queued = self._queued, {}
        self._queued_ids.clear()
        host = self.svc.host
        for gid, items in queued.items():
            try:
                host.propose_many(gid, [q.data for q in items], [q.done for q in items])
            except errors.KVError as err:
                for q in items:  # refused before appending: definite
                    self._error(q.op_id, q.kind, err)
                continue
            except Exception as err:
                # The core may have appended them: indeterminate.
                for q in items:
                    self._error(q.op_id, q.kind, self.svc.internal(f"stream {q.kind}", err, indeterminate=True))
                continue
            call_later, expire, pending = self.loop.call_later, self._expire, self.pending
            for q in items:
                pending[q.op_id] = call_later(q.timeout, expire, q.op_id, q.kind, q.timeout)

    def _get(self, op_id: int, req: kv_pb2.GetRequest, timeout: float) -> None:
        svc = self.svc
        svc.check_key(req.key)
        svc.check_read_revision(req.revision)
        check_with_lease(req)
        svc.allow(req.key, READ)
        gid = svc.group_for(req.key)
        g = svc.host.groups[gid]
        if req.consistency != kv_pb2.LINEARIZABLE or g.core.role != Role.LEADER or svc.needs_close(gid, req.revision):
            self._slow(op_id, "get", self.svc.get(req))
            return
        key, revision, with_lease = req.key, req.revision, req.with_lease

        def done(index: int, err: errors.KVError | None) -> None:
            # Called by the host's Ready loop: must not raise.
            if not self._settle(op_id):
                return
            try:
                if err is not None:
                    raise err
                if self._leader_reads is not None:
                    self._leader_reads.inc()
                reply = svc.get_reply(gid, key, ReadPoint(index, 0.0, LINEARIZABLE), revision, with_lease)
            except errors.KVError as e:
                self._error(op_id, "get", e)
                return
            except Exception as e:
                self._error(op_id, "get", svc.internal("stream get", e, indeterminate=False))
                return
            self._answer(op_id, "get", reply)

        svc.host.read(gid, done)
        self.pending[op_id] = self.loop.call_later(timeout, self._expire, op_id, "get", timeout)

    def _slow(self, op_id: int, kind: str, answer: Coroutine[Any, Any, Any], write: bool = False) -> None:
        """Run a handler's coroutine (with its own timeouts) and answer with its reply: replica,
        bounded and stale reads, and scans (none of them writes: any failure is definite), and
        the writes across groups (`write`: a transaction's or a range delete's two-phase commit,
        whose KVErrors say definite or not, and an unexpected failure is indeterminate)."""

        async def serve() -> None:
            try:
                reply = await answer
            except errors.KVError as err:
                self._error(op_id, kind, err)
                return
            except Exception as err:
                self._error(op_id, kind, self.svc.internal(f"stream {kind}", err, indeterminate=write))
                return
            self._answer(op_id, kind, reply)

        t = self.loop.create_task(serve())
        self.tasks.add(t)
        self.running.add(op_id)

        def finished(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            self.running.discard(op_id)
            self.room.set()
            self.has_out.set()  # the stream may be done

        t.add_done_callback(finished)
