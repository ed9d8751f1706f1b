"""Client-side login: a token from `Auth.Authenticate`, sent with every call as
`authorization: Bearer <token>` metadata (a channel interceptor), renewed before it expires.

The token is fetched lazily, at the first call, from the client's endpoints in turn; it is
renewed once half its lifetime has passed. The server authenticates a stream once, when it
opens, and ends it UNAUTHENTICATED once that token expires or is revoked; a call refused
UNAUTHENTICATED (definite) makes the client log in again (`stale_since`) and retry it once
(`invoke.py`), so a long-lived client outlives its tokens. A wrong password is a definite
`Unauthenticated`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from kvstore import errors
from kvstore.v1 import auth_pb2, auth_pb2_grpc

AUTHENTICATE = "/kvstore.v1.Auth/Authenticate"


class TokenSource:
    """Logs `user` in with `password` and keeps a fresh token."""

    def __init__(self, user: str, password: str, endpoints: Callable[[], Sequence[str]],
                 credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.user = user
        self._password = password
        self._endpoints = endpoints
        self._credentials = credentials
        self._options = list(options)
        self._token = ""
        self._renew_at = 0.0
        self._fetched_at = -1.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if self._token and time.monotonic() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token and time.monotonic() < self._renew_at:
                return self._token
            started = time.monotonic()
            self._token, ttl = await self._login()
            self._renew_at = started + ttl / 2
            self._fetched_at = started
            return self._token

    def stale_since(self, started: float) -> bool:
        """A call started at `started` (monotonic) was refused UNAUTHENTICATED: unless a token
        was fetched after it started (by a concurrent refusal), the next call logs in again.
        True: the refused call may be retried once with a fresh token."""
        if self._fetched_at <= started:
            self._renew_at = 0.0
        return True

    async def _login(self) -> tuple[str, int]:
        last: Exception | None = None
        for ep in self._endpoints():
            ch = (grpc.aio.insecure_channel(ep, options=self._options) if self._credentials is None
                  else grpc.aio.secure_channel(ep, self._credentials, options=self._options))
            try:
                r = await auth_pb2_grpc.AuthStub(ch).Authenticate(
                    auth_pb2.AuthenticateRequest(user=self.user, password=self._password), timeout=10)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise errors.Unauthenticated(f"login as {self.user!r} failed: {e.details()}") from None
                last = e
                continue
            finally:
                await ch.close()
            err = errors.from_proto(r.error, is_write=False)
            if err is not None:
                raise err
            return r.token, max(1, r.ttl_seconds)
        raise errors.Unavailable(f"cannot log in: no endpoint answered ({last})")


class FixedToken(TokenSource):
    """A token obtained elsewhere (e.g. a server acting for a caller with the caller's own
    token): sent as is, never renewed; a refusal is final (no retry with a fresh token)."""

    def __init__(self, token: str) -> None:
        super().__init__("", "", lambda: (), None)
        self._token = token

    async def token(self) -> str:
        return self._token

    def stale_since(self, started: float) -> bool:
        return False


def _with_token(details: Any, token: str) -> Any:
    md = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
    md.append(("authorization", f"Bearer {token}"))
    return details._replace(metadata=md) if hasattr(details, "_replace") else grpc.aio.ClientCallDetails(
        details.method, details.timeout, md, details.credentials, details.wait_for_ready)


class _Base:
    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def _details(self, details: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method == AUTHENTICATE:
            return details
        try:
            token = await self.source.token()
        except errors.KVError as err:  # surfaces as a failed call the client classifies
            code = grpc.StatusCode.UNAUTHENTICATED if isinstance(err, errors.Unauthenticated) else grpc.StatusCode.UNAVAILABLE
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=err.message) from None
        return _with_token(details, token)


class _UU(_Base, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(await self._details(details), request)


class _US(_Base, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(await self._details(details), request)


class _SU(_Base, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(await self._details(details), requests)


class _SS(_Base, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(await self._details(details), requests)


def interceptors(source: TokenSource) -> list[grpc.aio.ClientInterceptor]:
    return [_UU(source), _US(source), _SU(source), _SS(source)]
