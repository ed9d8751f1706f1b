"""Address helpers of the security checks (no gRPC import: `kvstore serve` validates its flags
before it configures and imports gRPC)."""

from __future__ import annotations

import ipaddress


def host_of(address: str) -> str:
    """The normalized host of `HOST:PORT` (`[v6]:port` too): lower case, IPs in canonical form."""
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def is_loopback(host: str) -> bool:
    """Is `host` (an IP literal or name, no port) a loopback address? Only literal loopback IPs
    and `localhost` count: any other name might resolve elsewhere (no DNS lookup is made), and an
    empty host or `0.0.0.0` / `::` means every interface."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
