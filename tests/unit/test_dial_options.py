"""Every channel a node dials to another member reconnects within a second of the member coming
back: gRPC's default backoff between connection attempts grows to 120 s, and a channel between
attempts fails every call at once (a restarted node went unheard by its leaders, and the etcd
API's forwarded calls to it failed UNAVAILABLE, for seconds to tens of seconds after it was up)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from kvstore.server.shards import GroupCaller
from kvstore.transport.peer import DIAL_OPTIONS, Transport


def _backoff_ms(options: list[tuple[str, Any]]) -> int:
    """The longest wait between connection attempts `options` allow (gRPC's default: 120 s)."""
    return int(dict(options).get("grpc.max_reconnect_backoff_ms", 120_000))


def test_member_dial_options_bound_the_reconnect_backoff() -> None:
    assert _backoff_ms(DIAL_OPTIONS) <= 1000
    assert len(dict(DIAL_OPTIONS)) == len(DIAL_OPTIONS), "each option once (gRPC does not say which wins)"


@pytest.mark.parametrize("dialer", ["transport", "group caller"])
def test_every_member_channel_is_dialled_with_the_bounded_backoff(dialer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dialled: list[list[tuple[str, Any]]] = []

    def fake(addr: str, *args: Any, options: list[tuple[str, Any]] | None = None, **kw: Any) -> object:
        dialled.append(list(options or []))
        return object()

    monkeypatch.setattr(grpc.aio, "insecure_channel", fake)
    monkeypatch.setattr(grpc.aio, "secure_channel", fake)
    for creds in (None, object()):
        if dialer == "transport":
            tls = None if creds is None else SimpleNamespace(channel_credentials=lambda c=creds: c)
            Transport.dial(SimpleNamespace(tls=tls), "127.0.0.1:1")  # type: ignore[arg-type]
        else:
            caller = SimpleNamespace(_channels={}, credentials=None if creds is None else (lambda c=creds: c))
            GroupCaller.channel(caller, "127.0.0.1:1")  # type: ignore[arg-type]
    assert len(dialled) == 2
    assert all(_backoff_ms(o) <= 1000 for o in dialled), dialled
