"""Registering gRPC services so that malformed request bytes get INVALID_ARGUMENT, never UNKNOWN.

grpc's request deserializer cannot choose the call's status: a `DecodeError` raised there ends
the call with UNKNOWN, which a client must treat as "may have happened". Here every method of a
service is registered from the service's descriptor (so a new RPC cannot be forgotten) with:
- a total deserializer: bytes that do not decode become a `Malformed` marker (never an exception);
- a thin wrapper around the servicer's method that aborts a call whose request is `Malformed` with
  INVALID_ARGUMENT (definite) and a message naming the message type and what was wrong. For a
  streaming request (KV.Stream, Raft.Send, Raft.SendSnapshot) a malformed message mid-stream ends
  the handler's request iteration with `MalformedRequest` (as a broken stream would: what it read
  before is handled as usual, e.g. KV.Stream answers every operation it read), then the call
  aborts with INVALID_ARGUMENT. Nothing after the malformed message is read.

Other calls are not disturbed: each malformed request fails only its own call.

With an auth guard (`kvstore/security/guard.py`), every method also needs a rule in
`guard.RULES` (registration fails otherwise, so a new RPC cannot be forgotten), and every call of
a USER or ADMIN method is authenticated and admitted by the guard before its handler runs (a
stream once, at its start); the identity is then `identity_of_call(context)` in the handler.
A guarded server-streaming call (Scan) re-checks its credential before each response
(`AuthGuard.recheck`: a token that expired or was revoked ends the call UNAUTHENTICATED);
KV.Stream re-checks per operation itself (`op_stream.py`).

With a call limit (`limit`: the rate limit, `server/admission.py`), every unary-request method
it `limits` is admitted by it after the guard, keyed by the principal the guard established (a
public method, `Auth.Authenticate`, by the connection's certificate or address); KV.Stream is
limited per operation inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from kvstore import errors
from kvstore.security.guard import AuthGuard, Credential, Rule, rule_of, token_refusal
from kvstore.security.identity import Principal, PrincipalKind

__all__ = ["CallLimit", "Malformed", "MalformedRequest", "add_services", "decoder"]


class CallLimit(Protocol):
    """Admission of whole calls by who makes them (the rate limit, `server/admission.py`)."""

    def limits(self, path: str) -> bool:
        """Whether calls of method `path` are subject to the limit."""
        ...

    async def admit_call(self, p: Principal, context: grpc.aio.ServicerContext) -> None:
        """Return if `p` may make this call now; else abort it (definite)."""
        ...


class Malformed:
    """What the deserializer hands the handler instead of a request it could not decode."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class MalformedRequest(Exception):
    """Raised into a streaming handler's request iteration at a malformed message."""


def decoder(cls: Any) -> Callable[[bytes], Any]:
    """A total deserializer for the message class `cls`: the message, or `Malformed`."""
    name = cls.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as err:  # DecodeError; anything else the parser may raise on garbage
            return Malformed(f"malformed {name} ({len(data)} bytes): {err}")

    return decode


def _abort_sync(context: Any, bad: Malformed) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


async def _abort(context: grpc.aio.ServicerContext, bad: Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


async def _until_malformed(requests: AsyncIterator[Any], seen: list[Malformed]) -> AsyncIterator[Any]:
    async for r in requests:
        if isinstance(r, Malformed):
            seen.append(r)
            raise MalformedRequest(r.message)
        yield r


def _wrap(fn: Callable[..., Any], m: MethodDescriptor, guard: AuthGuard | None = None,
          path: str = "", limit: CallLimit | None = None) -> Callable[..., Any]:
    """`fn` (a servicer's bound method) guarded against `Malformed` requests and, with `guard`,
    by the method's auth rule, then (with `limit`) by the call limit."""
    rule = rule_of(path) if guard is not None else None
    authed = guard is not None and rule in (Rule.USER, Rule.ADMIN)
    limited = limit is not None and not m.client_streaming and limit.limits(path)
    if authed or limited:
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise TypeError(f"{path}: a handler that needs authentication or a call limit must be async")
        fn = _guarded(fn, guard, path, rule if authed else None,
                      inspect.isasyncgenfunction(fn), limit if limited else None, not m.client_streaming)
    where = m.full_name
    if m.client_streaming:
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise TypeError(f"{where}: a streaming-request handler must be async")
        if m.server_streaming:

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                seen: list[Malformed] = []
                try:
                    async for resp in fn(_until_malformed(requests, seen), context):
                        yield resp
                except MalformedRequest:
                    pass
                if seen:
                    await _abort(context, seen[0])

            return stream_stream

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            seen: list[Malformed] = []
            try:
                resp = await fn(_until_malformed(requests, seen), context)
            except MalformedRequest:
                resp = None
            if seen:
                await _abort(context, seen[0])
            return resp

        return stream_unary
    if m.server_streaming:
        if inspect.isasyncgenfunction(fn):

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await _abort(context, request)
                async for resp in fn(request, context):
                    yield resp

            return unary_stream

        def unary_stream_sync(request: Any, context: Any) -> Iterator[Any]:
            if isinstance(request, Malformed):
                _abort_sync(context, request)
            yield from fn(request, context)

        return unary_stream_sync
    if inspect.iscoroutinefunction(fn):

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await _abort(context, request)
            return await fn(request, context)

        return unary_unary

    def unary_unary_sync(request: Any, context: Any) -> Any:
        if isinstance(request, Malformed):
            _abort_sync(context, request)
        return fn(request, context)

    return unary_unary_sync


FIRST_REQUEST_WAIT = 0.5
"""How long a refused streaming-request call waits for the caller's first message (seconds)."""
MAX_REFUSALS_WAITING = 256
"""At most this many refused calls wait for a first message at once (per process); beyond, a
refusal is sent at once: callers that open streams and send nothing hold no more than this."""
_waiting = 0


def first_request(requests: AsyncIterator[Any]) -> Callable[[], Awaitable[None]]:
    """What a streaming-request call refused at admission awaits before its status is sent: the
    caller's first message (or the end of its requests, or FIRST_REQUEST_WAIT seconds), read and
    dropped.

    Why: grpcio's asyncio client reports a write that fails because the server already ended the
    call as INTERNAL ("Internal error from Core"), overwriting the status the server sent, when
    the client's event loop sees the failed write after that status (grpc/grpc#36066). A client
    that opens a stream and writes at once (KV.Stream, KV.Watch, etcd's Watch and LeaseKeepAlive)
    would then read a refusal as INTERNAL, which says nothing definite: 3 refused KV.Streams in
    2,000 on a loaded machine. Refused once its first message arrived, that write has completed,
    and the caller reads UNAUTHENTICATED or PERMISSION_DENIED. Nothing of the message is used.
    The wait is short (a client writes at once) and bounded in number (`MAX_REFUSALS_WAITING`), so
    unauthenticated callers that send nothing cannot hold the server's memory."""

    async def wait() -> None:
        global _waiting
        if _waiting >= MAX_REFUSALS_WAITING:
            return
        _waiting += 1
        try:
            # the end of the requests, a malformed first message or the wait running out: the
            # refusal is sent all the same
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(requests)), FIRST_REQUEST_WAIT)
        finally:
            _waiting -= 1

    return wait


def _guarded(fn: Callable[..., Any], guard: AuthGuard | None, path: str, rule: Rule | None, gen: bool,
             limit: CallLimit | None, per_response: bool) -> Callable[..., Any]:
    """`fn` behind the guard's `rule` (None: no authentication, e.g. a public method) and the
    call `limit`. With `per_response`, a streaming response re-checks the credential before each
    message it sends; without it (a streaming-request method) a refusal waits for the caller's
    first message (`first_request`)."""
    streaming_request = not per_response

    async def enter(context: grpc.aio.ServicerContext, request: Any) -> Credential | None:
        before = first_request(request) if streaming_request else None
        c = await guard.admit(path, rule, context, before) if guard is not None and rule is not None else None
        if limit is not None:
            await limit.admit_call(c.principal if c is not None else _connection_principal(guard, context), context)
        return c

    if gen:

        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            c = await enter(context, request)
            responses = fn(request, context)
            if guard is not None and c is not None and c.key and per_response:
                responses = _rechecked(responses, guard, c, path, context)
            async for resp in responses:
                yield resp

        return guarded_gen

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await enter(context, request)
        return await fn(request, context)

    return guarded


async def _rechecked(responses: AsyncGenerator[Any, None], guard: AuthGuard, c: Credential, path: str,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """`responses`, each sent only while the token credential `c` is still valid; then the call
    ends UNAUTHENTICATED (definite) and the handler's generator is closed at once."""
    try:
        async for resp in responses:
            try:
                guard.recheck(c)
            except errors.Unauthenticated as err:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, token_refusal(path, err.message))
            yield resp
    finally:
        await responses.aclose()


def _connection_principal(guard: AuthGuard | None, context: grpc.aio.ServicerContext) -> Principal:
    """Who the connection says the caller of an unauthenticated call is (its certificate, else
    anonymous at its address): what a public method's call limit is keyed by."""
    if guard is not None:
        try:
            return guard.transport_principal(context)
        except errors.Unauthenticated:
            pass
    try:
        peer = str(context.peer())
    except Exception:  # a context without a transport (tests)
        peer = ""
    return Principal(PrincipalKind.ANONYMOUS, peer=peer)


def _serialize(message: Any) -> bytes:
    """A response on the wire: a message, or bytes a handler serialized itself (`KV.Watch`
    sends one encoding of a batch of events to many streams)."""
    if type(message) is bytes:
        return message
    return bytes(message.SerializeToString())


_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_services(
    server: grpc.aio.Server, services: Iterable[tuple[object, ServiceDescriptor]], guard: AuthGuard | None = None,
    limit: CallLimit | None = None, include: Callable[[str], bool] | None = None,
) -> list[str]:
    """Register each `(servicer, service descriptor)` on `server`, every method of the descriptor
    (with `include`, only the methods whose path it accepts: the others are UNIMPLEMENTED on
    this server) with a total deserializer, the `Malformed` guard, (with `guard`) its auth rule
    and (with `limit`) the call limit. Returns the paths of the methods registered
    (`/package.Service/Method`)."""
    paths = []
    for servicer, service in services:
        handlers = {}
        for m in service.methods:
            if include is not None and not include(f"/{service.full_name}/{m.name}"):
                continue
            request_cls = message_factory.GetMessageClass(m.input_type)
            make = _HANDLER[(m.client_streaming, m.server_streaming)]
            path = f"/{service.full_name}/{m.name}"
            handlers[m.name] = make(
                _wrap(getattr(servicer, m.name), m, guard, path, limit),
                request_deserializer=decoder(request_cls),
                response_serializer=_serialize,
            )
            paths.append(path)
        if handlers:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return paths
