"""A streaming-request call refused at admission sends its status only once the caller's first
message arrived (or its requests ended, or `wire.FIRST_REQUEST_WAIT` ran out): grpcio's asyncio
client turns a write that fails because the call already ended into INTERNAL, overwriting the
server's status (grpc/grpc#36066), which made a refused KV.Stream read INTERNAL now and then.
`tests/integration/test_auth.py` checks the status a real client sees; here the order is checked
deterministically, with the guard of the client-only port (it refuses every USER call while auth
is disabled)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from kvstore.node.memstore import MemoryNodeStore
from kvstore.security.guard import AuthGuard, AuthTracker
from kvstore.server import wire
from kvstore.v1 import kv_pb2

STREAM = "/kvstore.v1.KV/Stream"


class Aborted(Exception):
    """What grpc.aio's `context.abort` raises."""


class Context:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:4567"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()) -> None:
        self.events.append("abort")
        self.code = code
        raise Aborted(details)


class Servicer:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def __getattr__(self, name: str) -> Any:
        async def streaming(request: object, context: object) -> Any:
            self.events.append("handler")
            yield kv_pb2.ResultBatch()

        async def unary(request: object, context: object) -> object:
            self.events.append("handler")
            return None

        return streaming if name in ("Stream", "Watch", "Scan") else unary


class Server:
    def __init__(self) -> None:
        self.generic: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def stream_handler(events: list[str]) -> Any:
    server = Server()
    guard = AuthGuard(AuthTracker(MemoryNodeStore()), None).for_client_port()
    wire.add_services(server, [(Servicer(events), kv_pb2.DESCRIPTOR.services_by_name["KV"])], guard)  # type: ignore[arg-type]
    return next(h for g in server.generic if (h := g.service(Details(STREAM))) is not None)


async def refuse(requests: AsyncIterator[Any], events: list[str]) -> grpc.StatusCode | None:
    ctx = Context(events)
    with pytest.raises(Aborted):
        async for _ in stream_handler(events).stream_stream(requests, ctx):
            pass
    return ctx.code


def test_the_refusal_waits_for_the_first_message() -> None:
    async def run() -> list[str]:
        events: list[str] = []
        sent = asyncio.Event()

        async def requests() -> AsyncIterator[kv_pb2.OpBatch]:
            await sent.wait()
            events.append("first message")
            yield kv_pb2.OpBatch()
            await asyncio.Event().wait()  # the caller keeps its stream open

        refusal = asyncio.create_task(refuse(requests(), events))
        while "abort" not in events and not refusal.done():
            if not sent.is_set():
                await asyncio.sleep(0)  # let the handler run up to its wait
                await asyncio.sleep(0)
                assert events == [], "refused before the caller's first message"
                sent.set()
            await asyncio.sleep(0)
        assert await refusal is grpc.StatusCode.UNAUTHENTICATED
        return events

    assert asyncio.run(run()) == ["first message", "abort"]  # the handler never ran


def test_a_caller_that_ends_its_requests_or_sends_nothing_is_refused_all_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def none() -> AsyncIterator[kv_pb2.OpBatch]:
        return
        yield kv_pb2.OpBatch()

    async def silent() -> AsyncIterator[kv_pb2.OpBatch]:
        await asyncio.Event().wait()
        yield kv_pb2.OpBatch()

    async def malformed() -> AsyncIterator[Any]:
        yield wire.Malformed("not an OpBatch")
        await asyncio.Event().wait()

    monkeypatch.setattr(wire, "FIRST_REQUEST_WAIT", 0.05)
    for requests in (none, silent, malformed):
        events: list[str] = []
        assert asyncio.run(refuse(requests(), events)) is grpc.StatusCode.UNAUTHENTICATED, requests
        assert events == ["abort"], requests


def test_refusals_waiting_for_a_first_message_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers that open streams and send nothing hold at most `MAX_REFUSALS_WAITING` waits; the
    next is refused at once, and a wait ended gives its place back."""
    monkeypatch.setattr(wire, "FIRST_REQUEST_WAIT", 3600.0)
    monkeypatch.setattr(wire, "MAX_REFUSALS_WAITING", 2)

    async def silent() -> AsyncIterator[kv_pb2.OpBatch]:
        await asyncio.Event().wait()
        yield kv_pb2.OpBatch()

    async def run() -> None:
        events: list[str] = []
        held = [asyncio.create_task(refuse(silent(), events)) for _ in range(2)]
        while wire._waiting < 2:
            await asyncio.sleep(0)
        # the third is refused without waiting (its wait would last an hour)
        assert await asyncio.wait_for(refuse(silent(), events), 10) is grpc.StatusCode.UNAUTHENTICATED
        assert events == ["abort"] and not any(t.done() for t in held)
        held[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await held[0]
        assert wire._waiting == 1
        held[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await held[1]
        assert wire._waiting == 0

    asyncio.run(run())
