"""Who is calling: the identity admission control (rate limits) counts an RPC against.

ONE function, `rpc_identity`, so that authentication (issue 15, branch `auth`) can replace its
body with the authenticated user / node id without touching the callers. Until then:
- with TLS: the common name of the caller's verified client certificate (`client.<user>.crt`
  has CN = user; a node certificate's CN), as `cn:<name>`;
- otherwise: the caller's IP address without the port, as `ip:<address>`, so a client cannot
  escape its limit by opening more connections from the same host.
A caller with neither (a Unix socket, an unknown peer string) is `peer:<what gRPC says>`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

__all__ = ["rpc_identity"]


def rpc_identity(context: Any) -> str:
    """The identity of the caller of the RPC behind `context` (a `grpc.aio.ServicerContext`)."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # a context without TLS information
        auth = {}
    cn = auth.get("x509_common_name")
    if cn:
        return "cn:" + bytes(cn[0]).decode("utf-8", "replace")
    return peer_host(str(context.peer() or ""))


def peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` -> `ip:127.0.0.1`; `ipv6:[::1]:5000` -> `ip:::1`; else `peer:<peer>`."""
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        host = unquote(rest).rpartition(":")[0] or rest
        return "ip:" + host.strip("[]")
    return "peer:" + peer
