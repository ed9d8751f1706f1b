"""The client's connections: one gRPC channel per endpoint, its stubs, and its operation stream.

Invariants: every channel uses the same credentials (TLS or plaintext); at most one channel (and one `OpMux`) per endpoint, created on first use; nothing is
created after `close()` (a closed client raises `ClientClosed` instead of reconnecting).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio

from kvstore.client.mux import OpMux
from kvstore.errors import ClientClosed
from kvstore.v1 import admin_pb2_grpc, auth_pb2_grpc, kv_pb2_grpc, shard_pb2_grpc

__all__ = ["CHANNEL_OPTIONS", "Channels", "close_all_streams"]

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Reconnect quickly to a node that comes back (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
]


class Channels:
    """Channels and stubs by endpoint (``host:port``)."""

    def __init__(
        self, channel_options: Iterable[tuple[str, Any]] = (), credentials: grpc.ChannelCredentials | None = None,
        interceptors: list[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        self.credentials = credentials
        self.interceptors = interceptors
        """Login: the token interceptors (`kvstore/client/auth.py`) of every channel, or None."""
        """TLS credentials of every channel (None: plaintext)."""
        self._options = [*CHANNEL_OPTIONS, *channel_options]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._kv_stubs: dict[str, kv_pb2_grpc.KVStub] = {}
        self.muxes: dict[str, OpMux] = {}
        self._admin_stubs: dict[str, admin_pb2_grpc.AdminStub] = {}
        self._shard_stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self.closed = False

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        if self.closed:
            raise ClientClosed("client is closed")
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = (
                grpc.aio.insecure_channel(endpoint, options=self._options, interceptors=self.interceptors)
                if self.credentials is None
                else grpc.aio.secure_channel(endpoint, self.credentials, options=self._options,
                                             interceptors=self.interceptors)
            )
        return ch

    def kv(self, endpoint: str) -> kv_pb2_grpc.KVStub:
        stub = self._kv_stubs.get(endpoint)
        if stub is None:
            stub = self._kv_stubs[endpoint] = kv_pb2_grpc.KVStub(self.channel(endpoint))
        return stub

    def mux(self, endpoint: str) -> OpMux:
        """The endpoint's multiplexed KV stream (get, put, delete, cas and small scans travel on it)."""
        mux = self.muxes.get(endpoint)
        if mux is None:
            mux = self.muxes[endpoint] = OpMux(self.channel(endpoint), endpoint)
        return mux

    def admin(self, endpoint: str) -> admin_pb2_grpc.AdminStub:
        stub = self._admin_stubs.get(endpoint)
        if stub is None:
            stub = self._admin_stubs[endpoint] = admin_pb2_grpc.AdminStub(self.channel(endpoint))
        return stub

    def shard(self, endpoint: str) -> shard_pb2_grpc.ShardStub:
        stub = self._shard_stubs.get(endpoint)
        if stub is None:
            stub = self._shard_stubs[endpoint] = shard_pb2_grpc.ShardStub(self.channel(endpoint))
        return stub

    def auth(self, endpoint: str) -> auth_pb2_grpc.AuthStub:
        return auth_pb2_grpc.AuthStub(self.channel(endpoint))

    def close_streams(self) -> list[OpMux]:
        """Mark closed and detach every operation stream (the caller closes them)."""
        self.closed = True
        muxes = list(self.muxes.values())
        self.muxes.clear()
        return muxes

    async def close_channels(self) -> None:
        """Close every channel (after `close_streams`)."""
        channels = list(self._channels.values())
        self._channels.clear()
        self._kv_stubs.clear()
        self._admin_stubs.clear()
        self._shard_stubs.clear()
        for ch in channels:
            await ch.close()


async def close_all_streams(muxes: list[OpMux]) -> None:
    """Close operation streams concurrently (each waits up to `mux.CLOSE_GRACE`)."""
    await asyncio.gather(*(mux.close() for mux in muxes))
