"""How `OpMux` reports a stream the server ended while the client was writing to it.

gRPC answers a write on a call the server already finished with its own INTERNAL ("Internal error
from Core"), which the client would have to take as "may have applied". The server's real status
(here UNAUTHENTICATED: refused before any operation was read) arrives on the read side a moment
later; the mux must report that one. CI saw the race on the client-only port (stop 22).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio

from kvstore.client.failures import classify
from kvstore.client.mux import OpMux, StreamError
from kvstore.v1 import kv_pb2

_EXECUTE_BATCH = grpc.aio.AioRpcError(
    grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "Internal error from Core",
    'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f68732d6730>,)',
)
"""What grpc.aio raises when the core refuses to start a send on a call that is over: it then sets
the whole call's status to this INTERNAL, so the read side sees it too (CI, the second time)."""


class _EndedCall:
    """A stream call the server ended with `status` before reading: writes fail at once with
    gRPC's INTERNAL, reads see the server's status `delay` seconds later."""

    def __init__(self, status: grpc.StatusCode, delay: float, write_error: BaseException | None = None) -> None:
        self.status, self.delay = status, delay
        self.write_error = write_error

    async def write(self, _batch: Any) -> None:
        raise self.write_error or StreamError(grpc.StatusCode.INTERNAL, "Internal error from Core", sent=True)

    async def read(self) -> Any:
        await asyncio.sleep(self.delay)
        if self.status == grpc.StatusCode.INTERNAL:  # grpc marked the whole call (see below)
            raise _EXECUTE_BATCH
        raise StreamError(self.status, "this is a client-only port: log in", sent=True)


    async def done_writing(self) -> None:
        return None

    def cancel(self) -> bool:
        return True


class _Stub:
    def __init__(self, call: _EndedCall) -> None:
        self.call = call

    def Stream(self) -> _EndedCall:
        return self.call


def _mux(call: _EndedCall) -> OpMux:
    async def build() -> OpMux:
        async with grpc.aio.insecure_channel("127.0.0.1:9") as ch:
            return OpMux(ch, "fake")
    mux = asyncio.run(build())
    mux._stub = _Stub(call)  # type: ignore[assignment]
    return mux


def test_a_write_refused_by_an_ended_stream_fails_with_the_servers_status_and_is_definite() -> None:
    mux = _mux(_EndedCall(grpc.StatusCode.UNAUTHENTICATED, delay=0.05))

    async def main() -> grpc.aio.AioRpcError:
        try:
            await mux.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e
        finally:
            await mux.close()
        raise AssertionError("the put succeeded on a refused stream")

    err = asyncio.run(main())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    failure = classify(err, endpoint="fake", is_write=True)
    assert not failure.error.indeterminate


def test_a_write_failure_with_no_status_after_it_stays_indeterminate() -> None:
    """If the read side says nothing within the grace period, the write's own error stands (a
    write that may have reached the server is indeterminate)."""
    mux = _mux(_EndedCall(grpc.StatusCode.UNAUTHENTICATED, delay=30))

    async def main() -> grpc.aio.AioRpcError:
        try:
            await mux.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=10)
        except grpc.aio.AioRpcError as e:
            return e
        finally:
            await mux.close()
        raise AssertionError("the put succeeded on a broken stream")

    err = asyncio.run(main())
    assert err.code() == grpc.StatusCode.INTERNAL
    assert classify(err, endpoint="fake", is_write=True).error.indeterminate


def _put_error(call: _EndedCall, timeout: float = 2.0) -> BaseException:
    mux = _mux(call)

    async def main() -> BaseException:
        try:
            await mux.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=timeout)
        except (TimeoutError, grpc.aio.AioRpcError) as e:
            return e
        finally:
            await mux.close()
        raise AssertionError("the put succeeded on a refused stream")

    return asyncio.run(main())


def test_a_write_grpc_never_started_is_definite_and_retryable_even_when_the_call_says_internal() -> None:
    """grpc refused to start the send ("Failed execute_batch") and marked the call INTERNAL, so
    the server's own status never shows: the put was certainly not sent, so it fails definitely
    and may be retried (it was indeterminate before: CI saw it on the client-only port)."""
    err = _put_error(_EndedCall(grpc.StatusCode.INTERNAL, delay=0.01, write_error=_EXECUTE_BATCH))
    assert isinstance(err, StreamError) and not err.sent
    failure = classify(err, endpoint="fake", is_write=True)
    assert not failure.error.indeterminate and failure.retryable


def test_a_write_on_a_call_already_over_fails_with_the_servers_refusal_definitely() -> None:
    err = _put_error(_EndedCall(grpc.StatusCode.UNAUTHENTICATED, delay=0.01,
                                write_error=asyncio.InvalidStateError("RPC already finished.")))
    assert isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED
    failure = classify(err, endpoint="fake", is_write=True)
    assert type(failure.error).__name__ == "Unauthenticated" and not failure.error.indeterminate


def test_any_other_internal_write_failure_may_have_reached_the_server() -> None:
    other = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom", "stream reset")
    err = _put_error(_EndedCall(grpc.StatusCode.INTERNAL, delay=0.01, write_error=other))
    assert isinstance(err, grpc.aio.AioRpcError)
    assert classify(err, endpoint="fake", is_write=True).error.indeterminate
