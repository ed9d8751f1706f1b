"""The key-space hash of `kvctl check` (`kvstore/node/kvhash.py`) and `Admin.HashKV` on a node."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from onenode import one_node

from kvstore.node.kvhash import KVHasher
from kvstore.storage.mvcc import KeyMeta, Version
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc

_meta = st.builds(KeyMeta, st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1), st.integers(1, 2**40))
_items = st.dictionaries(st.binary(min_size=1, max_size=12), st.tuples(st.binary(max_size=12), _meta), max_size=20)


def _hash(rows: list[tuple[bytes, Version]], cuts: list[int]) -> tuple[bytes, int]:
    h = KVHasher()
    start = 0
    for cut in [*sorted(c % (len(rows) + 1) for c in cuts), len(rows)]:
        h.add(rows[start:cut])
        start = max(start, cut)
    return h.digest(), h.keys


@given(items=_items, cuts=st.lists(st.integers(0, 40), max_size=4), cuts2=st.lists(st.integers(0, 40), max_size=4))
def test_chunking_does_not_change_the_hash(items: dict[bytes, tuple[bytes, KeyMeta]], cuts: list[int],
                                           cuts2: list[int]) -> None:
    rows = [(k, Version(v, m)) for k, (v, m) in sorted(items.items())]
    assert _hash(rows, cuts) == _hash(rows, cuts2)
    assert _hash(rows, cuts)[1] == len(rows)


@given(items=_items.filter(bool), data=st.data())
def test_any_change_of_a_key_value_or_metadata_changes_the_hash(
    items: dict[bytes, tuple[bytes, KeyMeta]], data: st.DataObject
) -> None:
    rows = [(k, Version(v, m)) for k, (v, m) in sorted(items.items())]
    i = data.draw(st.integers(0, len(rows) - 1))
    key, ver = rows[i]
    what = data.draw(st.sampled_from(["key", "value", "create", "mod", "version", "drop"]))
    changed = list(rows)
    m = ver.meta
    assert ver.value is not None
    if what == "key":
        changed[i] = (key + b"\x00", ver)
    elif what == "value":
        changed[i] = (key, Version(ver.value + b"x", m))
    elif what == "create":
        changed[i] = (key, Version(ver.value, KeyMeta(m.create_revision ^ 1, m.mod_revision, m.version)))
    elif what == "mod":
        changed[i] = (key, Version(ver.value, KeyMeta(m.create_revision, m.mod_revision ^ 1, m.version)))
    elif what == "version":
        changed[i] = (key, Version(ver.value, KeyMeta(m.create_revision, m.mod_revision, m.version + 1)))
    else:
        del changed[i]
    assert _hash(changed, []) != _hash(rows, [])


def test_deleted_versions_count_for_nothing() -> None:
    m = KeyMeta(1, 2, 1)
    assert _hash([(b"a", Version(b"1", m)), (b"b", Version(None, m))], []) == _hash([(b"a", Version(b"1", m))], [])


def test_hash_kv_on_a_node_and_its_hostile_fields(tmp_path: Path) -> None:
    async def main() -> None:
        async with one_node(tmp_path) as n:
            import grpc

            async with grpc.aio.insecure_channel(n.address) as ch:
                admin = admin_pb2_grpc.AdminStub(ch)
                kv = kv_pb2_grpc.KVStub(ch)
                for i in range(30):
                    assert (await kv.Put(kv_pb2.PutRequest(key=b"k%d" % i, value=b"v%d" % i))).error.code == kv_pb2.OK
                first = await admin.HashKV(admin_pb2.HashKVRequest(group=1))
                assert first.error.code == kv_pb2.OK and first.keys == 31 and len(first.hash) == 32  # + "warm"
                assert first.revision > 0 and first.node_id == 1
                # later writes do not change the hash at that revision
                assert (await kv.Put(kv_pb2.PutRequest(key=b"k0", value=b"new"))).error.code == kv_pb2.OK
                again = await admin.HashKV(admin_pb2.HashKVRequest(group=1, revision=first.revision))
                assert (again.hash, again.keys) == (first.hash, first.keys)
                now = await admin.HashKV(admin_pb2.HashKVRequest(group=1))
                assert now.hash != first.hash and now.revision > first.revision
                # hostile fields: definite errors, the node keeps serving
                bad = await admin.HashKV(admin_pb2.HashKVRequest(group=2**64 - 1))
                assert bad.error.code == kv_pb2.WRONG_SHARD and not bad.error.indeterminate
                bad = await admin.HashKV(admin_pb2.HashKVRequest(group=1, revision=-5))
                assert bad.error.code == kv_pb2.INVALID_ARGUMENT
                await _fuzz(admin)
                assert (await admin.HashKV(admin_pb2.HashKVRequest(group=1))).error.code == kv_pb2.OK

    asyncio.run(main())


async def _fuzz(admin: admin_pb2_grpc.AdminStub) -> None:
    """Random fields (hypothesis drives the draws, the node answers each): never an exception, a
    definite answer for every group that is not there or revision that is out of range."""
    draws: list[tuple[int, int]] = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(group=st.integers(0, 2**64 - 1), revision=st.integers(-(2**63), 2**63 - 1))
    def collect(group: int, revision: int) -> None:
        draws.append((group, revision))

    collect()
    for group, revision in draws:
        if group in (0, 1) and revision > 0:
            # groups 0 (metadata) and 1 exist: a revision they reached is a valid request (OK), one
            # they have not would wait for the timeout
            revision = -revision
        r = await admin.HashKV(admin_pb2.HashKVRequest(group=group, revision=revision), timeout=10)
        if r.error.code == kv_pb2.OK:
            assert group in (0, 1) and revision == 0
        else:
            assert not r.error.indeterminate and r.error.message
