"""Await the host's callbacks: a proposal applied, a conf change applied, a read point reached.

The host (synchronous) answers through callbacks from the Ready loop; these helpers turn them
into awaitables with a timeout whose error says whether the operation may have happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.node.closes import NodeCloses
from kvstore.node.host import Host
from kvstore.raft import ConfChange
from kvstore.storage.commands import ApplyResult


def _future() -> tuple[asyncio.Future[Any], Callable[[Any, errors.KVError | None], None]]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    # The waiter may have given up (timeout, cancelled RPC) before the host answers: retrieve
    # the exception anyway, so asyncio does not log it as never retrieved.
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def done(result: Any, err: errors.KVError | None) -> None:
        if fut.done():
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(result)

    return fut, done


async def propose(
    host: Host, wake: Callable[[], None], group: int, data: bytes, timeout: float
) -> ApplyResult | None:
    """Propose `data` to `group` (led by this node) and wait until it is applied.

    Raises a definite KVError if it was not even proposed, an indeterminate Timeout if it was
    proposed but not applied in time."""
    fut, done = _future()
    host.propose(group, data, done)
    wake()
    try:
        result: ApplyResult | None = await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        raise errors.Timeout(f"write not applied within {timeout:g}s", indeterminate=True) from None
    return result


async def propose_conf_change(
    host: Host, wake: Callable[[], None], group: int, cc: ConfChange, timeout: float
) -> None:
    fut, done = _future()
    host.propose_conf_change(group, cc, done)
    wake()
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        raise errors.Timeout("membership change not applied in time", indeterminate=True) from None


async def read_point(host: Host, wake: Callable[[], None], group: int, timeout: float) -> int:
    """Wait until `group` (led by this node) may serve a linearizable read; returns the applied
    index to read at."""
    fut, done = _future()
    host.read(group, done)
    wake()
    try:
        index: int = await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        raise errors.Timeout(f"read not confirmed within {timeout:g}s", indeterminate=False) from None
    return index


async def close(closes: NodeCloses, wake: Callable[[], None], group: int, revision: int, timeout: float) -> int:
    """Close `group` (led by this node) at `revision` through its log (coalesced with other
    closes of the group: `NodeCloses.close`); returns the group's last revision afterwards.
    Raises a definite KVError if it was not proposed, an indeterminate Timeout if it was
    proposed but not applied in time (closing again is harmless: closes are idempotent)."""
    fut, done = _future()
    closes.close(group, revision, done)
    wake()
    try:
        last: int = await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        raise errors.Timeout(f"close not applied within {timeout:g}s", indeterminate=True) from None
    return last
