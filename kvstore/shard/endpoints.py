"""Node addresses (`HOST:PORT`) as hostile input: the syntax and size check every decoder of an
advertised address uses (the shard map's client addresses, the `--client-listen` flag).

Standard library only (the shard map decodes with it, and the node logic is purity-tested).
"""

from __future__ import annotations

import ipaddress

MAX_ADDRESS = 255
"""Longest address in bytes (a DNS name is at most 253 characters, plus `:65535`, fits)."""
MAX_ADDRESSES = 4096
"""Most client addresses a shard map may carry (one per node)."""

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def check_address(address: str) -> str:
    """`address` if it is `HOST:PORT` (`[v6]:PORT` for IPv6) with a port in 1..65535, a host of
    DNS-name characters or an IP literal, at most `MAX_ADDRESS` bytes; ValueError (naming what is
    wrong) otherwise. Total: never raises anything else."""
    if not isinstance(address, str):
        raise ValueError("an address must be text")
    if len(address.encode("utf-8", "surrogatepass")) > MAX_ADDRESS:
        raise ValueError(f"address longer than {MAX_ADDRESS} bytes")
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address[:64]!r} is not HOST:PORT")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535):
        raise ValueError(f"address {address[:64]!r} has no port in 1..65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"address {address[:64]!r}: unclosed [")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"address {address[:64]!r}: not an IPv6 literal in [...]") from None
        return address
    if not set(host) <= _HOST_CHARS or host.startswith(("-", ".")):
        raise ValueError(f"address {address[:64]!r}: the host is not a DNS name or an IPv4 literal")
    return address
