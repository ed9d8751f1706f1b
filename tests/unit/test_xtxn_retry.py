"""A client's retry of a transaction across groups whose first attempt committed (its reply
lost) gets the committed attempt's answer: the retry's own evaluation sees the first attempt's
writes, fails its compares and writes nothing, but it still goes through the RECORD, whose
session check answers with the cached result (kvchaos bank seed 8: a transfer that applied was
answered FAILURE). The coordinator is the real `CrossTxns` over two real state machines
(`DictState`, each proposal applied at once: a group that never loses a command)."""

from __future__ import annotations

import asyncio

from kvstore.node import xtxn as logic
from kvstore.node.hlc import HybridClock
from kvstore.server.xtxn_run import CrossTxns
from kvstore.storage import mvcc
from kvstore.storage.commands import ApplyResult, Command, encode_command
from kvstore.storage.machine import DictState
from kvstore.storage.txn import CmpResult, Compare, OpKind, Target, Txn, TxnOp

NOW_MS = mvcc.EPOCH_MS + 10_000
CLIENT, SEQ = 42, 7


def _groups() -> dict[int, DictState]:
    g = {1: DictState(group=1), 2: DictState(group=2)}
    g[1].apply(encode_command(Command.put(b"a", b"100")))
    g[2].apply(encode_command(Command.put(b"b", b"0")))
    return g


def _coordinator(g: dict[int, DictState]) -> CrossTxns:
    async def propose(gid: int, data: bytes) -> ApplyResult:
        return g[gid].apply(data)

    return CrossTxns(9, propose, HybridClock(lambda: NOW_MS), timeout=5.0)


# a transfer: only while a is 100, a := 90 and b := 10
TRANSFER = Txn((Compare(b"a", Target.VALUE, CmpResult.EQUAL, b"100"),),
               (TxnOp(OpKind.PUT, b"a", b"90"), TxnOp(OpKind.PUT, b"b", b"10")))
PLAN = logic.plan(TRANSFER, [(b"a", 1), (b"b", 2)])


def test_a_retry_of_a_committed_transfer_gets_its_success() -> None:
    async def main() -> None:
        g = _groups()
        first = await _coordinator(g).run(TRANSFER, PLAN, 0, CLIENT, SEQ, 0)
        assert first.txn is not None and first.txn.succeeded
        # the reply is lost; the client retries the same request (same session, retry set),
        # possibly through another node
        again = await _coordinator(g).run(TRANSFER, PLAN, 0, CLIENT, SEQ, 0, retry=True)
        assert again.txn is not None and again.txn.succeeded, "the retry answered FAILURE"
        assert again.revision == first.revision
        assert (g[1].data[b"a"], g[2].data[b"b"]) == (b"90", b"10")  # applied exactly once
        assert not list(g[1].rows.iter(mvcc.T_INTENTS, b"", None))
        assert not list(g[2].rows.iter(mvcc.T_INTENTS, b"", None))

    asyncio.run(main())


def test_a_retry_whose_first_attempt_never_committed_gets_its_own_answer() -> None:
    async def main() -> None:
        g = _groups()
        g[1].apply(encode_command(Command.put(b"a", b"50")))  # the compare fails: nothing to write
        res = await _coordinator(g).run(TRANSFER, PLAN, 0, CLIENT, SEQ, 0, retry=True)
        assert res.txn is not None and not res.txn.succeeded
        assert (g[1].data[b"a"], g[2].data[b"b"]) == (b"50", b"0")
        # and a later retry of the same request keeps that answer
        again = await _coordinator(g).run(TRANSFER, PLAN, 0, CLIENT, SEQ, 0, retry=True)
        assert again.txn is not None and not again.txn.succeeded
        assert not list(g[1].rows.iter(mvcc.T_INTENTS, b"", None))

    asyncio.run(main())
