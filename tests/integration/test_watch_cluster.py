"""Watch end to end on a real 3-node cluster of `kvstore serve` processes with 3 data groups:
list-then-watch across groups while writes run, a watcher that survives the kill of the node
serving it (a leader), and `kvctl watch` (json lines, COMPACTED exit)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from clusterharness import Cluster, start_watching_cli, stop_cli

from kvstore.client import AsyncClient, WatchEvent

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("watch"), 3, extra_args=["--groups", "3"])
    try:
        yield c.start()
    finally:
        c.stop()


def test_list_then_watch_sees_every_later_change_exactly_once_across_groups(cluster: Cluster) -> None:
    asyncio.run(_list_then_watch(cluster))


async def _list_then_watch(cluster: Cluster) -> None:
    async with AsyncClient(cluster.endpoints, timeout=30) as kv:
        keys = [b"lw/%02d" % i for i in range(24)]
        for k in keys:
            await kv.put(k, b"init")
        m = await kv.shard_map(refresh=True)
        assert m is not None and len({m.group_for_key(k) for k in keys}) == 3  # the keys span every group
        r = kv.revision
        state = {kv_.key: kv_.value async for chunk in kv.scan_kvs(b"lw/", revision=r) for kv_ in chunk}
        assert state == {k: b"init" for k in keys}

        written: list[tuple[int, bytes, bytes | None]] = []

        async def writer() -> None:
            for i in range(150):
                k = keys[(i * 7) % len(keys)]
                if i % 10 == 9:
                    if await kv.delete(k):
                        written.append((kv.revision, k, None))
                else:
                    v = b"v%d" % i
                    written.append((await kv.put(k, v), k, v))

        seen: list[WatchEvent] = []
        w = asyncio.create_task(writer())

        async def watch() -> None:
            async for batch in kv.watch_batches(prefix=b"lw/", start_revision=r + 1, progress=True):
                seen.extend(batch.events)
                if w.done() and written and batch.revision >= max(x[0] for x in written):
                    return

        await asyncio.wait_for(asyncio.gather(w, watch()), 120)
        assert kv.watch_resumes == 0  # plain writes never cancel a watch
    got = [(e.revision, e.key, e.value) for e in seen]
    assert got == sorted(written), "events differ from the writes after R (missing, repeated or out of order)"
    for e in seen:
        if e.value is None:
            state.pop(e.key, None)
        else:
            state[e.key] = e.value
    final: dict[bytes, bytes] = {}
    for _, k, v in sorted(written):
        if v is None:
            final.pop(k, None)
        else:
            final[k] = v
    assert state == {**{k: b"init" for k in keys if k not in {x[1] for x in written}}, **final}


def test_a_watcher_survives_the_kill_of_the_leader_serving_it(cluster: Cluster) -> None:
    asyncio.run(_survives_a_kill(cluster))


async def _survives_a_kill(cluster: Cluster) -> None:
    async with AsyncClient(cluster.endpoints, timeout=30) as kv:
        issued: dict[bytes, bytes] = {}
        acked: list[int] = []
        start = await kv.put(b"kl/start", b"0")
        seen: list[WatchEvent] = []
        serving: list[int] = []
        killed: list[int] = []

        async def writer() -> None:
            for i in range(120):
                k, v = b"kl/%02d" % (i % 30), b"w%d" % i
                issued[v] = k
                acked.append(await kv.put(k, v))
                if i == 40:
                    while not serving:  # the watch has delivered something: kill the node serving it
                        await asyncio.sleep(0.01)
                    victim = cluster.nodes[serving[-1]]
                    victim.kill9()
                    killed.append(victim.id)

        w = asyncio.create_task(writer())

        async def watch() -> None:
            async for batch in kv.watch_batches(prefix=b"kl/", start_revision=start + 1, progress=True):
                seen.extend(batch.events)
                if batch.events:
                    serving.append(batch.node_id)
                if w.done() and batch.revision >= max(acked):
                    return

        try:
            await asyncio.wait_for(asyncio.gather(w, watch()), 120)
        finally:
            for nid in killed:
                cluster.nodes[nid].start()
        resumes = kv.watch_resumes
    revs = [e.revision for e in seen]
    assert revs == sorted(set(revs)), "an event repeated or out of order"
    assert set(acked) <= set(revs), "an acknowledged write is missing from the feed"
    assert all(e.value is not None and issued.get(e.value) == e.key for e in seen)  # nothing but our writes
    assert killed and resumes >= 1 and serving[-1] != killed[0]


def test_a_watch_follows_its_range_across_a_move(cluster: Cluster) -> None:
    """A range move (add-group) under a prefix watch while writes run: the watch is canceled
    with its resume revision and resumed over the new set of groups, missing and repeating
    nothing (the moved history keeps its revisions and change-log rows in the new group)."""
    asyncio.run(_across_a_move(cluster))


async def _across_a_move(cluster: Cluster) -> None:
    async with AsyncClient(cluster.endpoints, timeout=60) as kv:
        start = await kv.put(b"mvw/start", b"0")
        acked: list[int] = []
        seen: list[WatchEvent] = []
        moving = asyncio.Event()

        async def writer() -> None:
            for i in range(90):
                acked.append(await kv.put(b"mvw/%02d" % (i % 40), b"m%d" % i))
                if i == 20:
                    moving.set()

        async def mover() -> None:
            await moving.wait()
            before = await kv.shard_map(refresh=True)
            res = await kv.add_group(wait=True, timeout=120)
            assert res is not None
            after = await kv.shard_map(refresh=True)
            assert before is not None and after is not None and len(after.data_groups()) == len(before.data_groups()) + 1

        w = asyncio.create_task(writer())
        mv = asyncio.create_task(mover())

        async def watch() -> None:
            async for batch in kv.watch_batches(prefix=b"mvw/", start_revision=start + 1, progress=True):
                seen.extend(batch.events)
                if w.done() and mv.done() and batch.revision >= max(acked):
                    return

        await asyncio.wait_for(asyncio.gather(w, mv, watch()), 180)
        resumes = kv.watch_resumes
    revs = [e.revision for e in seen]
    assert revs == sorted(set(revs)), "an event repeated or out of order across the move"
    assert set(acked) == set(revs), "the feed differs from the acknowledged writes"
    assert resumes >= 1  # the move canceled the watch, which resumed


def _kvctl(cluster: Cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints),
            "--timeout", "20", *args]


def test_kvctl_watch_prints_json_lines_and_exits_2_on_a_compacted_revision(cluster: Cluster) -> None:
    async def writes() -> list[int]:
        async with AsyncClient(cluster.endpoints, timeout=30) as kv:
            revs = [await kv.put(b"cli/a", b"1"), await kv.put(b"cli/b", b"2")]
            assert await kv.delete(b"cli/a")
            return [*revs, kv.revision]

    revs = asyncio.run(writes())
    p = start_watching_cli(_kvctl(cluster, "-o", "json", "watch", "--prefix", "cli/", "--rev", str(revs[0]), "--prev-kv"))
    try:
        assert p.stdout is not None
        lines = [json.loads(p.stdout.readline()) for _ in range(3)]
    finally:
        code = stop_cli(p)
    assert code == 0, p.stderr.read() if p.stderr is not None else ""
    assert [(x["type"], x["key"], x["value"], x["revision"]) for x in lines] == [
        ("PUT", "cli/a", "1", revs[0]), ("PUT", "cli/b", "2", revs[1]), ("DELETE", "cli/a", None, revs[2])]
    assert lines[0]["create_revision"] == lines[0]["mod_revision"] == revs[0] and lines[0]["version"] == 1
    assert lines[2]["prev_value"] == "1" and lines[0]["prev_value"] is None

    out = subprocess.run(_kvctl(cluster, "compact", str(revs[1])), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(_kvctl(cluster, "watch", "cli/a", "--rev", str(revs[0])), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "compact revision is" in out.stderr, (out.returncode, out.stderr)
