"""Admission control settings (`kvstore serve --rate-limit ...`): plain data, kept apart from
`admission.py` so that `config.py` (and through it the CLI) loads no gRPC before `serve()` has
applied its gRPC settings (`server/grpc_env.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.node.ratelimit import RateLimit
from kvstore.node.shedding import ShedSettings

__all__ = ["AdmissionSettings"]


@dataclass(slots=True)
class AdmissionSettings:
    """Admission control flags (all off by default)."""

    rate_limit: RateLimit | None = None
    shed: ShedSettings = field(default_factory=ShedSettings)
    quota_bytes: int = 0
    """Space quota of this node's store (live bytes); 0: none."""
    max_streams_per_connection: int = 0
    """HTTP/2 MAX_CONCURRENT_STREAMS the server advertises (0: gRPC's default, unlimited)."""
    idle_timeout: float = 0.0
    """Seconds after which a connection with no RPC in flight is closed (GOAWAY); 0: never."""
    max_ping_strikes: int = 0
    """Keepalive enforcement: a connection that pings more often than every 5 s without data is
    closed (GOAWAY too_many_pings) after this many such pings; 0: never (gRPC's "unlimited")."""
    sample_interval: float = 0.5
    """How often the memory and the store's size are measured, in seconds."""

    def validate(self) -> None:
        self.shed.validate()
        if self.quota_bytes < 0:
            raise ValueError("--quota-bytes must be >= 0")
        if self.max_streams_per_connection < 0:
            raise ValueError("--max-streams-per-connection must be >= 0")
        if self.idle_timeout < 0:
            raise ValueError("--idle-timeout must be >= 0")
        if self.max_ping_strikes < 0:
            raise ValueError("--max-ping-strikes must be >= 0")
        if self.sample_interval <= 0:
            raise ValueError("the sample interval must be > 0")

    def server_options(self, base: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """`base` (the node's channel options) with the connection limits set over it: each key
        once (gRPC does not say which of two equal keys wins)."""
        out = dict(base)
        if self.max_streams_per_connection:
            out["grpc.max_concurrent_streams"] = self.max_streams_per_connection
        if self.idle_timeout:
            out["grpc.max_connection_idle_ms"] = max(1, int(self.idle_timeout * 1000))
        if self.max_ping_strikes:
            out["grpc.http2.max_ping_strikes"] = self.max_ping_strikes
        return list(out.items())
