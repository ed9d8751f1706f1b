"""A stream read canceled just as its response arrives must end canceled (Python 3.11's
`asyncio.wait_for` may return the read instead, losing the cancel: the merged watch's hang).
Shared by the client's and the etcd API's merged-watch tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any


async def spin(n: int) -> None:
    """Let the loop run `n` turns."""
    for _ in range(n):
        await asyncio.sleep(0)


async def cancel_as_it_arrives(stream: AsyncGenerator[Any, None], deliver: Callable[[], None],
                               turns: int) -> tuple[bool, bool]:
    """Start reading `stream`, `deliver` a response after 3 turns, cancel the read `turns` turns
    later: (whether the cancel was accepted, whether the read ended canceled)."""
    reader = asyncio.ensure_future(stream.__anext__())
    await spin(3)
    deliver()
    await spin(turns)
    accepted = reader.cancel()
    await asyncio.wait([reader])
    await stream.aclose()
    return accepted, reader.cancelled()


def assert_cancels_kept(trial: Callable[[int], Coroutine[Any, Any, tuple[bool, bool]]], turns: int = 6) -> None:
    """Every accepted cancel of `trial(t)`, t < `turns`, ended its read canceled."""
    for t in range(turns):
        accepted, cancelled = asyncio.run(trial(t))
        assert cancelled == accepted, f"a cancel {t} turns after the response was lost"
