"""The client-only port (`kvstore serve --client-listen HOST:PORT`), etcd's split of client URLs
from peer URLs: a second gRPC server of the same node, sharing the node's servicer objects.

Why: grpcio's TLS server either requires and verifies a client certificate or does not ask for
one at all. The peer port requires one (nodes and certificate users); this port asks for none, so
a user with only a password (a token from `Auth.Authenticate`) can connect over TLS.

Invariants:
- Only methods whose rule (`security/guard.py`) is PUBLIC, USER or ADMIN are registered here;
  node-to-node RPCs (the INTERNAL ones: Raft, Shard.GroupPropose, Shard.ExportRange) are
  UNIMPLEMENTED on this port, whoever calls.
- Every USER and ADMIN call is admitted by the client-port guard (`AuthGuard.for_client_port`):
  a valid token is required, and while auth is disabled every such call is refused
  (UNAUTHENTICATED, definite). Logging in (`Auth.Authenticate`) and health checks are public.
- With `--certs-dir` the port is TLS with the node's certificate (reloaded on SIGHUP like the
  peer port's); without it (loopback, or `--insecure`) it is plaintext with the same rules.
- The same admission control (rate limits, connection limits) applies as on the peer port.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from kvstore.security.guard import AuthGuard, Rule, rule_of
from kvstore.security.tls import NodeTls

from . import wire

__all__ = ["ClientPort", "is_client_method"]


def is_client_method(path: str) -> bool:
    """Is method `path` served on the client port (every method but the INTERNAL ones)?"""
    return rule_of(path) is not Rule.INTERNAL


class ClientPort:
    """The client-only gRPC server of a node."""

    def __init__(self, address: str, tls: NodeTls | None, options: Sequence[tuple[str, Any]]) -> None:
        self.address = address
        self.tls = tls
        self.server = grpc.aio.server(options=list(options))
        self.port = 0
        self.rpc_methods: list[str] = []
        """The methods served on this port (`/package.Service/Method`)."""

    async def start(self, services: Iterable[tuple[object, ServiceDescriptor]], guard: AuthGuard,
                    limit: wire.CallLimit | None = None) -> None:
        """Register the client methods of `services` behind the client-port variant of `guard`
        and the node's call `limit` (the same buckets as the peer port's), bind (OSError if the
        address cannot be bound) and start serving."""
        self.rpc_methods = wire.add_services(self.server, services, guard.for_client_port(), limit=limit,
                                             include=is_client_method)
        self.port = (
            self.server.add_insecure_port(self.address) if self.tls is None
            else self.server.add_secure_port(self.address, self.tls.server_credentials(require_client_certificate=False))
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address} (--client-listen)")
        await self.server.start()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
