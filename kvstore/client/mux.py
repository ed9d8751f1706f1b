"""A client's operations to one endpoint, multiplexed over one `KV.Stream` call.

A unary gRPC call per operation costs a call's setup on both sides; here every operation issued
while the previous batch was being written leaves in one `OpBatch`, and answers come back in
`ResultBatch`es matched by id. The retry loop above (`AsyncClient._invoke`) sees the same
interface as a unary stub: `await mux.call(kind, request, timeout)` returns the reply or raises
`grpc.aio.AioRpcError`.

Failure semantics (what the retry loop needs to tell "did not happen" from "may have happened"):
- the stream breaks: every operation already written to it fails with the stream's error, which
  the client classifies as it classifies a broken unary call (a write is indeterminate); an
  operation not yet written fails with `StreamError(sent=False)`: definitely not applied;
- the server ends the stream (status OK) with operations of it unanswered: they fail with
  INTERNAL (a write indeterminate, a read definite), never hang until their timeouts;
- an operation's own timeout: DEADLINE_EXCEEDED (a write is indeterminate), as for a unary call;
  the server is told the same timeout and gives up on its side too;
- an operation refused UNAUTHENTICATED (the stream's token expired or was revoked: the server
  then ends the stream) is answered only once the stream is gone, so that its retry, after a
  new login, opens a new stream with the new token instead of joining the dying one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore import hoptrace
from kvstore.v1 import kv_pb2, kv_pb2_grpc

CLOSE_GRACE = 1.0
"""Seconds a closing mux waits for the server to answer what is in flight and end the stream."""


STREAM_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
"""A stream the server ended with one of these refused the caller itself: operations never sent
on it fail with that (definite) status, not as a broken stream to retry elsewhere."""


class StreamError(grpc.aio.AioRpcError):
    """An operation failed with its stream; `sent` says whether it may have reached the server."""

    def __init__(self, code: grpc.StatusCode, details: str, *, sent: bool) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        self.sent = sent


@dataclass(slots=True)
class _Waiting:
    fut: asyncio.Future[Any]
    timer: asyncio.TimerHandle
    sent: bool = False


class OpMux:
    def __init__(self, channel: grpc.aio.Channel, endpoint: str) -> None:
        self.endpoint = endpoint
        self._stub = kv_pb2_grpc.KVStub(channel)
        self._call: Any = None
        self._task: asyncio.Task[None] | None = None
        self._queue: list[kv_pb2.Op] = []
        self._pending: dict[int, _Waiting] = {}
        self._next_id = 1
        self._wake = asyncio.Event()
        self._closed = False

    async def call(self, kind: str, request: Any, timeout: float) -> Any:
        """Send one operation (`kind`: get, put, delete, cas or txn) and wait for its reply."""
        if hoptrace.ON:
            hoptrace.mark("c.call")
        if self._closed:
            raise StreamError(grpc.StatusCode.CANCELLED, "client closed", sent=False)
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._open(loop)
        op_id = self._next_id
        self._next_id += 1
        op = kv_pb2.Op(id=op_id, timeout_ms=max(1, int(timeout * 1000)))
        getattr(op, kind).CopyFrom(request)
        fut = loop.create_future()
        self._pending[op_id] = _Waiting(fut, loop.call_later(timeout, self._timed_out, op_id))
        self._queue.append(op)
        self._wake.set()
        try:
            reply = await fut
        except asyncio.CancelledError:
            w = self._pending.pop(op_id, None)
            if w is not None:
                w.timer.cancel()
            raise
        if hoptrace.ON:
            hoptrace.mark("c.done")
        return reply

    def _timed_out(self, op_id: int) -> None:
        w = self._pending.pop(op_id, None)
        if w is not None and not w.fut.done():
            w.fut.set_exception(
                StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", sent=True)
            )

    # --- the stream ---------------------------------------------------------------------------
    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        call = self._call = self._stub.Stream()
        self._task = loop.create_task(self._run(call), name=f"kv-stream-{self.endpoint}")

    async def _write_loop(self, call: Any) -> None:
        """Write batches until the mux is closed, then half-close the stream (the server ends it
        once it has answered everything, and the read loop sees the end)."""
        while True:
            if not self._queue:
                if self._closed:
                    await call.done_writing()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            ops, self._queue = self._queue, []
            pending = self._pending
            for op in ops:
                w = pending.get(op.id)
                if w is not None:
                    w.sent = True
            if hoptrace.ON:
                hoptrace.mark("c.write")
                hoptrace.mark(f"c.ops:{len(ops)}")
            try:
                await call.write(kv_pb2.OpBatch(ops=ops))
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as err:
                if _never_sent(err):
                    for op in ops:
                        w = pending.get(op.id)
                        if w is not None:
                            w.sent = False
                raise

    async def _read_loop(self, call: Any, held: dict[int, Any]) -> None:
        pending = self._pending
        while True:
            batch = await call.read()
            if batch is grpc.aio.EOF:
                return
            if hoptrace.ON:
                hoptrace.mark("c.read")
                hoptrace.mark(f"c.results:{len(batch.results)}")
            for r in batch.results:
                kind = r.WhichOneof("result")
                if kind is not None and getattr(r, kind).error.code == kv_pb2.UNAUTHENTICATED and r.id in pending:
                    held[r.id] = getattr(r, kind)  # answered when the stream ends (`_fail`)
                    continue
                w = pending.pop(r.id, None)
                if w is None:
                    continue  # timed out or cancelled meanwhile
                w.timer.cancel()
                if w.fut.done():
                    continue
                if kind is None:
                    w.fut.set_exception(StreamError(
                        grpc.StatusCode.UNIMPLEMENTED, f"{self.endpoint} does not know this operation", sent=True
                    ))
                else:
                    w.fut.set_result(getattr(r, kind))

    async def _run(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        held: dict[int, Any] = {}
        writer = loop.create_task(self._write_loop(call))
        reader = loop.create_task(self._read_loop(call, held))
        for t in (reader, writer):
            t.add_done_callback(_retrieve)
        try:
            done, _ = await asyncio.wait([reader, writer], return_when=asyncio.FIRST_COMPLETED)
            if done == {writer} and not writer.cancelled() and writer.exception() is None:
                # Closing: the stream is half-closed; take the last answers until the server ends it.
                await asyncio.wait([reader], timeout=CLOSE_GRACE)
                done = {reader} if reader.done() else set()
            elif done == {writer}:
                # A write failed: the call is over, but what gRPC says to a write on a call the
                # server already ended is its own INTERNAL ("Internal error from Core"), not the
                # server's status. The reader receives that status (say UNAUTHENTICATED: nothing
                # was applied); wait for it, so the operations fail with what the server said.
                await asyncio.wait([reader], timeout=CLOSE_GRACE)
                done = {reader, writer} if reader.done() else {writer}
            failure = self._failure_of([t for t in (reader, writer) if t in done])
        except asyncio.CancelledError:  # close()
            self._fail(StreamError(grpc.StatusCode.CANCELLED, "client closed", sent=True), held)
            raise
        finally:
            reader.cancel()
            writer.cancel()
            call.cancel()
            if self._call is call:
                self._call = None
                self._task = None
        self._fail(failure, held)

    def _failure_of(self, finished: list[asyncio.Task[None]]) -> grpc.aio.AioRpcError:
        """Why the stream ended: the first gRPC error of the finished loops (reader first), any
        other exception, or the server closing it."""
        errs = [e for t in finished if not t.cancelled() and (e := t.exception()) is not None]
        for e in errs:
            if isinstance(e, grpc.aio.AioRpcError):
                return e
        if errs:
            return StreamError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.endpoint} failed: {errs[0]!r}", sent=True)
        # The server ended the stream with OK: it owes an answer to every operation it read, so
        # any still waiting was dropped by it (a server fault, not the network): INTERNAL, which
        # the client takes as "may have applied" for a write and as definite for a read.
        return StreamError(
            grpc.StatusCode.INTERNAL, f"{self.endpoint} ended the stream without answering the operation", sent=True
        )

    def _fail(self, failure: grpc.aio.AioRpcError, held: dict[int, Any] | None = None) -> None:
        """The stream is gone: fail every operation of it (those not yet written definitely),
        but answer those `held` back with the answer the server gave them."""
        self._queue.clear()
        pending, self._pending = self._pending, {}
        code, details = failure.code(), failure.details() or ""
        for op_id, w in pending.items():
            w.timer.cancel()
            if w.fut.done():
                continue
            if held and op_id in held:
                w.fut.set_result(held[op_id])
            elif w.sent:
                w.fut.set_exception(StreamError(code, details, sent=True))
            elif code in STREAM_REFUSALS:  # the server refused the caller: retrying cannot help
                w.fut.set_exception(StreamError(code, details, sent=False))
            else:
                w.fut.set_exception(StreamError(
                    grpc.StatusCode.UNAVAILABLE, f"not sent: the stream to {self.endpoint} broke ({details})",
                    sent=False,
                ))

    async def close(self) -> None:
        """Half-close the stream and let the server end it (up to CLOSE_GRACE), so that no gRPC
        task is left behind; operations still waiting then fail as on a broken stream."""
        self._closed = True
        self._wake.set()
        task = self._task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 2 * CLOSE_GRACE)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._fail(StreamError(grpc.StatusCode.CANCELLED, "client closed", sent=True))


def _never_sent(err: BaseException) -> bool:
    """Did a failed `write` certainly put nothing on the wire? True when grpc refused it before
    starting it: the call had already finished (`InvalidStateError`), or the core refused to
    start the send batch (INTERNAL "Failed execute_batch": grpc then marks the whole call
    INTERNAL, which hides the server's status from the read side too). Any other failure may
    have happened after the message left, so its operations stay "may have reached the server"."""
    if isinstance(err, asyncio.InvalidStateError):
        return True
    if isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.INTERNAL:
        debug = err.debug_error_string() or ""
        return 'Failed "execute_batch"' in debug
    return False


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a loop task's exception as seen (`_run` reports the stream's failure itself)."""
    if not task.cancelled():
        task.exception()
