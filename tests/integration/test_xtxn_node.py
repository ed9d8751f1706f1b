"""Transactions across groups on one in-process node with two data groups: atomic at one
revision (reads below it see neither write), the failure branch across groups, and a dead
coordinator's intents recovered by the next reader or writer (to COMMITTED when its record says
so, to ABORTED when it has none), planted through the node's own proposal path, and its COMMITTED
record FINALIZEd by the node's record sweep; a dead coordinator's range delete inside a
transaction committed by the resolver from its record, range included."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from onenode import one_node

from kvstore import errors
from kvstore.client import AsyncClient, Compare, Op
from kvstore.node import xtxn as logic
from kvstore.shard.shardmap import ShardMap
from kvstore.storage import commands, mvcc, txn, xtxn_apply
from kvstore.storage.xtxn import State, TxnId, XCmd, XOp


def _pair(m: ShardMap, prefix: bytes) -> tuple[bytes, bytes]:
    """Two keys of `prefix` in different groups (the first in the lower group)."""
    by: dict[int, bytes] = {}
    i = 0
    while len(by) < 2:
        k = prefix + b"%d" % i
        by.setdefault(m.group_for_key(k), k)
        i += 1
    (_, a), (_, b) = sorted(by.items())
    return a, b


def test_cross_group_txn_and_recovery_of_a_dead_coordinator(tmp_path: Path) -> None:
    asyncio.run(_main(tmp_path))


async def _main(tmp_path: Path) -> None:
    async with one_node(tmp_path, groups=2) as n, AsyncClient([n.address], timeout=20) as c:
        m = await c.shard_map(refresh=True)
        assert m is not None
        a, b = _pair(m, b"x/")
        ga, gb = m.group_for_key(a), m.group_for_key(b)
        assert ga != gb
        await c.put(a, b"0")
        before = (await c.read(a)).mod_revision

        # atomic across the groups, at one revision
        r = await c.txn([Compare.value(a, "=", b"0")], [Op.put(a, b"1"), Op.put(b, b"1"), Op.get(a)])
        assert r.succeeded and r.revision > before
        ra, rb = await c.read(a), await c.read(b)
        assert (ra.value, rb.value) == (b"1", b"1") and ra.mod_revision == rb.mod_revision == r.revision
        assert r.responses[2].kv is not None and r.responses[2].kv.value == b"1"
        old_a, old_b = await c.read(a, revision=r.revision - 1), await c.read(b, revision=r.revision - 1)
        assert (old_a.value, old_b.value) == (b"0", None)
        # the failure branch reads both groups and writes nothing
        r2 = await c.txn([Compare.value(b, "=", b"nope")], [Op.put(a, b"never")], [Op.get(a), Op.get(b)])
        assert not r2.succeeded and r2.revision == 0
        assert [x.kv.value for x in r2.responses if x.kv is not None] == [b"1", b"1"]
        # a cross-group delete
        r3 = await c.txn([], [Op.delete(a), Op.delete(b)])
        assert r3.succeeded and await c.get(a) is None and await c.get(b) is None

        # A coordinator that died after its commit point: both groups prepared, the record says
        # COMMITTED, only the primary committed. Its start is older than the timeout.
        node = n.node
        assert node.caller is not None
        propose = node.caller.propose
        start = mvcc.make_revision(time.time_ns() // 1_000_000 - 2 * logic.TXN_TIMEOUT_MS, 0, 0)
        tid = TxnId(99, 1)
        p = logic.plan(txn.Txn(success=(txn.TxnOp(txn.OpKind.PUT, a, b"A"), txn.TxnOp(txn.OpKind.PUT, b, b"B"))),
                       [(a, ga), (b, gb)])
        got = {g: await propose(g, d) for g, d in logic.prepare_commands(p, tid, start, 0).items()}
        ready = logic.after_prepare(
            txn.Txn(success=(txn.TxnOp(txn.OpKind.PUT, a, b"A"), txn.TxnOp(txn.OpKind.PUT, b, b"B"))), p, got)
        assert isinstance(ready, logic.Ready)
        rec = await propose(ga, logic.record_command(tid, start, ready))
        assert rec.error is None
        assert (await propose(ga, logic.commit_commands(tid, ready, [ga])[ga])).error is None
        # a reader of b meets the intent, resolves it (COMMITTED) and then reads the commit
        rb = await c.read(b)
        assert rb.value == b"B" and rb.mod_revision == ready.at
        assert await c.get(a) == b"A"
        # nobody meets an intent of it any more, and its coordinator never FINALIZEs: the node's
        # record sweep sends the COMMITs again and FINALIZEs the record (then forgotten by age)
        store = node.store
        assert store is not None
        deadline = time.monotonic() + 20
        while True:
            left = store.revisions.read_rows(ga, lambda rows: xtxn_apply.record_of(rows, tid))
            assert left is not None
            if left.state == State.FINALIZED:
                break
            assert time.monotonic() < deadline, f"the record is still {left.state.name}"
            await asyncio.sleep(0.1)

        # A coordinator that died after preparing only: the next writer aborts its intents.
        tid2 = TxnId(99, 2)
        for g, d in logic.prepare_commands(p, tid2, start, 0).items():
            assert (await propose(g, d)).error is None
        await c.put(b, b"mine")  # refused while locked, resolved to ABORTED, retried by the client
        assert await c.get(b) == b"mine" and await c.get(a) == b"A"  # a's intent resolved by the read
        # the late RECORD of that coordinator can no longer commit
        late = await propose(ga, logic.record_command(tid2, start, ready))
        assert late.error is not None
        assert isinstance(commands.decode_command(logic.finalize_command(tid2)).x, XCmd)
        assert commands.decode_command(logic.finalize_command(tid2)).x.op == XOp.FINALIZE  # type: ignore[union-attr]


def test_range_delete_across_groups_is_atomic(tmp_path: Path) -> None:
    asyncio.run(_range(tmp_path))


async def _range(tmp_path: Path) -> None:
    async with one_node(tmp_path, groups=2) as n, AsyncClient([n.address], timeout=20) as c:
        m = await c.shard_map(refresh=True)
        assert m is not None
        keys = [b"d/%d" % i for i in range(12)]
        assert len({m.group_for_key(k) for k in keys}) == 2
        r = await c.txn([], [Op.put(k, b"v") for k in keys])
        assert r.succeeded
        await c.put(b"e/1", b"stays")
        await c.put(b"d", b"not in the prefix d/")
        assert await c.delete_prefix(b"d/") == 12
        rev = c.revision
        assert all([await c.get(k) is None for k in keys])
        assert await c.get(b"e/1") == b"stays" and await c.get(b"d") == b"not in the prefix d/"
        # one revision: just below it every key is there, at it none is
        before = [(await c.read(k, revision=rev - 1)).value for k in keys]
        assert before == [b"v"] * 12
        assert all([(await c.read(k, revision=rev)).value is None for k in keys])
        assert await c.delete_prefix(b"d/") == 0  # nothing left: writes nothing
        # a range [start, end)
        await c.txn([], [Op.put(b"r/a", b"1"), Op.put(b"r/b", b"1"), Op.put(b"r/c", b"1")])
        assert await c.delete_range(b"r/a", b"r/c") == 2
        assert await c.get(b"r/c") == b"1" and await c.get(b"r/a") is None
        # more keys than a command lists (issue 17: its RECORD could not be built, INTERNAL)
        big = [b"big/%04d" % i for i in range(400)]
        await asyncio.gather(*(c.put(k, b"v") for k in big))
        assert max(sum(m.group_for_key(k) == g for k in big) for g in m.data_groups()) > 128
        assert await c.delete_prefix(b"big/") == len(big)
        assert [kv async for kv in c.scan(b"big/")] == []
        try:
            await c.delete_range(b"r/c", b"r/a")
        except errors.InvalidArgument as err:
            assert err.definite
        else:
            raise AssertionError("an empty range was deleted")
        # a dead coordinator's range lock: an insert into the range meets it, resolves it (no
        # record: ABORTED) and goes in
        node = n.node
        assert node.caller is not None
        start = mvcc.make_revision(time.time_ns() // 1_000_000 - 2 * logic.TXN_TIMEOUT_MS, 0, 0)
        p = logic.plan_range(m.data_groups(), b"z/", b"z0")
        for g, d in logic.prepare_commands(p, TxnId(98, 1), start, 0).items():
            assert (await node.caller.propose(g, d)).error is None
        await c.put(b"z/new", b"in")
        assert await c.get(b"z/new") == b"in"


def test_reads_meet_intents_of_keys_that_do_not_exist_yet(tmp_path: Path) -> None:
    asyncio.run(_reads(tmp_path))


async def _reads(tmp_path: Path) -> None:
    async with one_node(tmp_path, groups=2) as n, AsyncClient([n.address], timeout=20) as c:
        m = await c.shard_map(refresh=True)
        assert m is not None
        await c.put(b"s/old", b"1")
        before = c.revision
        node = n.node
        assert node.caller is not None
        # a live coordinator's PREPARE (its start is now: not expired) on a key that does not exist
        start = mvcc.make_revision(time.time_ns() // 1_000_000, 0, 0)
        g = m.group_for_key(b"s/new")
        p = logic.plan(txn.Txn(success=(txn.TxnOp(txn.OpKind.PUT, b"s/new", b"x"),)), [(b"s/new", g)])
        tid = TxnId(97, 1)
        got = await node.caller.propose(g, logic.prepare_commands(p, tid, start, before + 1)[g])
        assert got.error is None
        prepared = got.revision
        assert prepared > before

        async def scan(revision: int = 0) -> list[tuple[bytes, bytes]]:
            return [kv async for kv in c.scan(b"s/", timeout=1.0, revision=revision)]

        # a scan (current, or at a revision at or above the reservation) waits for it: refused
        # (definite, retried by the client until its deadline)
        for rev in (0, prepared):
            try:
                await scan(rev)
            except errors.KVError as err:
                assert err.definite
            else:
                raise AssertionError(f"a scan at {rev} over a pending intent answered")
        with_get = None
        try:
            with_get = await c.get(b"s/new", timeout=1.0)
        except errors.KVError as err:
            assert err.definite
        assert with_get is None
        # below the reservation the answer is already final
        assert await scan(prepared - 1) == [(b"s/old", b"1")]
        # the coordinator aborts: the scan answers
        assert (await node.caller.propose(g, logic.abort_commands(tid, [g])[g])).error is None
        assert await scan() == [(b"s/old", b"1")]


def test_a_dead_coordinators_range_delete_in_a_txn_is_recovered(tmp_path: Path) -> None:
    asyncio.run(_txn_range(tmp_path))


async def _txn_range(tmp_path: Path) -> None:
    """A transaction with a range delete whose coordinator died after its commit point (every
    group prepared, the record COMMITTED with the range, only the primary committed): a reader
    in the other group meets the intent and the node's resolver commits it from the record,
    range deletion included; the client's own `Op.delete_range` then counts what is left."""
    async with one_node(tmp_path, groups=2) as n, AsyncClient([n.address], timeout=20) as c:
        m = await c.shard_map(refresh=True)
        assert m is not None
        a, b = _pair(m, b"rd/")
        ga, gb = m.group_for_key(a), m.group_for_key(b)
        for k in (a, b):
            await c.put(k, b"v")
        node = n.node
        assert node.caller is not None
        propose = node.caller.propose
        start = mvcc.make_revision(time.time_ns() // 1_000_000 - 2 * logic.TXN_TIMEOUT_MS, 0, 0)
        tid = TxnId(98, 1)
        t = txn.Txn(success=(txn.TxnOp(txn.OpKind.DELETE_RANGE, b"rd/", end=b"rd0"), txn.TxnOp(txn.OpKind.PUT, a, b"A")))
        p = logic.plan_ranges(t, [(a, ga)], sorted({ga, gb}))
        got = {g: await propose(g, d) for g, d in logic.prepare_commands(p, tid, start, 0).items()}
        ready = logic.after_prepare(t, p, got)
        assert isinstance(ready, logic.Ready) and ready.result.responses[0].deleted == 2
        assert (await propose(p.primary, logic.record_command(tid, start, ready))).error is None
        assert (await propose(ga, logic.commit_commands(tid, ready, [ga])[ga])).error is None
        assert await c.get(b) is None  # the read met b's intent, resolved it: deleted at R
        assert await c.get(a) == b"A"
        hist = await c.read(b, revision=ready.at - 1)
        assert hist.value == b"v"  # the state just below R still had it
        await c.put(b, b"w")
        r = await c.txn([], [Op.delete_range(b"rd/", b"rd0")])
        assert r.succeeded and r.responses[0].count == 2 and await c.get(a) is None and await c.get(b) is None
