"""Wound-wait between transactions across groups (`CrossTxns.met`): an older run aborts a younger
run's intents at once and commits; a younger run never touches an older run's intents before
they expire. The coordinators are the real `CrossTxns` over two real state machines (`DictState`,
each proposal applied at once); the run in the way is halted right after its PREPAREs (the
planted coordinator death), so its intents stay until someone resolves them."""

from __future__ import annotations

import asyncio

import pytest

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.node.hlc import HybridClock
from kvstore.server.xtxn_run import CrossTxns
from kvstore.storage import mvcc
from kvstore.storage.commands import ApplyResult, Command, encode_command
from kvstore.storage.machine import DictState
from kvstore.storage.txn import OpKind, Txn, TxnOp
from kvstore.storage.xtxn import Intent

NOW_MS = mvcc.EPOCH_MS + 10_000
BOTH = Txn((), (TxnOp(OpKind.PUT, b"a", b"1"), TxnOp(OpKind.PUT, b"b", b"1")))
PLAN = logic.plan(BOTH, [(b"a", 1), (b"b", 2)])


def _groups() -> dict[int, DictState]:
    g = {1: DictState(group=1), 2: DictState(group=2)}
    g[1].apply(encode_command(Command.put(b"a", b"0")))
    g[2].apply(encode_command(Command.put(b"b", b"0")))
    return g


def _coordinator(g: dict[int, DictState], node: int, at_ms: int, timeout: float, halt: str | None = None) -> CrossTxns:
    async def propose(gid: int, data: bytes) -> ApplyResult:
        await asyncio.sleep(0)
        return g[gid].apply(data)

    return CrossTxns(node, propose, HybridClock(lambda: at_ms), timeout=timeout, now_ms=lambda: at_ms, halt=halt)


def _intents(g: DictState) -> list[Intent]:
    return [Intent.decode(bytes(v)) for _k, v in g.rows.iter(mvcc.T_INTENTS, b"", None)]


async def _halted_after_prepare(g: dict[int, DictState], at_ms: int) -> asyncio.Task[ApplyResult]:
    stuck = asyncio.ensure_future(_coordinator(g, 8, at_ms, 30.0, halt="prepare").run(BOTH, PLAN))
    while not (_intents(g[1]) and _intents(g[2])):
        await asyncio.sleep(0)
    return stuck


def test_an_older_run_aborts_a_younger_runs_intents_and_commits() -> None:
    async def main() -> None:
        g = _groups()
        stuck = await _halted_after_prepare(g, NOW_MS + 1_000)  # younger, and far from expiring
        young = _intents(g[1])[0]
        res = await _coordinator(g, 9, NOW_MS, 3.0).run(BOTH, PLAN)
        assert res.txn is not None and res.txn.succeeded
        assert (g[1].data[b"a"], g[2].data[b"b"]) == (b"1", b"1")
        assert not _intents(g[1]) and not _intents(g[2])
        # the younger run's record says ABORTED: its coordinator, were it to go on, gets a
        # definite abort at its RECORD
        settled = g[young.primary].apply(logic.resolve_command(young))
        assert logic.committed_record(settled) is None
        stuck.cancel()

    asyncio.run(main())


def test_a_younger_run_waits_for_an_older_runs_intents() -> None:
    async def main() -> None:
        g = _groups()
        stuck = await _halted_after_prepare(g, NOW_MS)  # older; 2 s old when met: not expired
        with pytest.raises(errors.Timeout) as ei:
            await _coordinator(g, 9, NOW_MS + 2_000, 0.3).run(BOTH, PLAN)
        assert ei.value.definite and "locked by transaction" in ei.value.message
        assert len(_intents(g[1])) == len(_intents(g[2])) == 1  # untouched
        assert (g[1].data[b"a"], g[2].data[b"b"]) == (b"0", b"0")
        stuck.cancel()

    asyncio.run(main())
