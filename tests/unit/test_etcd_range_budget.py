"""etcd's Range over several groups (`kvstore/server/etcd/kv.py`): the group parts are read
concurrently, and what they keep to answer is bounded by one budget for the whole Range
(`MAX_RANGE_BYTES`), not one per part. The parts come from a stand-in for kvstore's Scan (real
`kv_pb2.ScanResponse` messages from a dict of groups); the range logic is the real one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.server.etcd import kv as etcd_kv
from kvstore.server.etcd.convert import range_query
from kvstore.server.etcd.status import EtcdStatus
from kvstore.v1 import kv_pb2


@dataclass
class _Groups:
    """Each group's keys (all at revision 5), served a chunk of one key per message."""

    data: dict[int, list[kv_pb2.KeyValue]]
    in_flight: int = 0
    most_in_flight: int = 0
    scanned: list[int] = field(default_factory=list)

    def data_groups(self) -> list[int]:
        return sorted(self.data)

    async def scan(self, req: kv_pb2.ScanRequest, context: Any) -> AsyncIterator[kv_pb2.ScanResponse]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.scanned.append(req.group)
        try:
            for kv in self.data[req.group]:
                await asyncio.sleep(0)  # a chunk at a time, as the real stream: other parts run
                yield kv_pb2.ScanResponse(items=[kv], revision=5)
        finally:
            self.in_flight -= 1


@dataclass
class _Node:
    groups: _Groups

    @property
    def forward(self) -> _Groups:
        return self.groups

    def shard_map(self) -> _Groups:
        return self.groups


def _groups(n: int, per_group: int, size: int) -> _Groups:
    return _Groups({g: [kv_pb2.KeyValue(key=b"r/%d/%03d" % (g, i), value=b"v" * size, create_revision=5,
                                        mod_revision=5, version=1) for i in range(per_group)]
                    for g in range(1, n + 1)})


def _scan(groups: _Groups) -> tuple[list[kv_pb2.KeyValue], int, int]:
    q = range_query(rpc_pb2.RangeRequest(key=b"r/", range_end=b"r0", serializable=True))
    return asyncio.run(etcd_kv.EtcdKV(_Node(groups))._scan(q, None))  # type: ignore[arg-type]


def test_the_parts_of_a_range_are_read_concurrently(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = _groups(3, 4, 10)
    items, count, rev = _scan(groups)
    assert (len(items), count, rev) == (12, 12, 5)
    assert [kv.key for kv in items] == sorted(kv.key for kv in items)
    assert groups.most_in_flight == 3, groups.most_in_flight


def test_one_byte_budget_for_all_parts_of_a_range(monkeypatch: pytest.MonkeyPatch) -> None:
    # each group's part (4 x 1,000 bytes) fits the budget; the three together do not
    monkeypatch.setattr(etcd_kv, "MAX_RANGE_BYTES", 10_000)
    with pytest.raises(EtcdStatus) as e:
        _scan(_groups(3, 4, 1000 - 7))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not e.value.indeterminate
    assert "exceed" in e.value.message
    items, count, _ = _scan(_groups(2, 4, 1000 - 7))  # 8,000 bytes in all: answered
    assert (len(items), count) == (8, 8)


def test_at_most_range_parallel_parts_are_read_at_once() -> None:
    """A Range over more groups than `RANGE_PARALLEL` reads that many parts at a time and still
    answers every key (the rest are read as the first finish)."""
    groups = _groups(etcd_kv.RANGE_PARALLEL * 2 + 3, 3, 10)
    items, count, rev = _scan(groups)
    assert (len(items), count, rev) == (len(groups.data) * 3, len(groups.data) * 3, 5)
    assert groups.most_in_flight == etcd_kv.RANGE_PARALLEL, groups.most_in_flight
    assert sorted(groups.scanned) == groups.data_groups()
