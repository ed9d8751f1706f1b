"""The container backend's record (state.json["container"]) is a boundary: `kvchaos clean`
removes podman objects by the names in it, so a damaged or hostile record must parse to names
of the record's own run only, or be refused with ContainerError (never another exception)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.containers import ContainerError, ContainerRecord, ContainerTopology

GOOD: dict[str, Any] = {
    "run_id": "a1b2c3", "hosts": 3, "octet": 42, "network": "kvc-a1b2c3", "bridge": "cni-podman3",
    "containers": ["kvc-a1b2c3-node1", "kvc-a1b2c3-node4"], "volumes": ["kvc-a1b2c3-data1"], "image": "x",
}


def test_a_record_the_backend_writes_parses() -> None:
    rec = ContainerRecord.from_json(GOOD)
    topo = ContainerTopology(rec.run_id, rec.hosts, rec.octet)
    assert rec.network == topo.network and rec.containers == (topo.container(1), topo.container(4))
    assert rec.volumes == (topo.volume(1),)
    assert topo.address(2) == "10.78.42.12:2379"


@pytest.mark.parametrize("change", [
    {"containers": ["--all"]},
    {"containers": ["kvc-a1b2c3-node1", "kvstore-1"]},
    {"containers": ["kvc-other-node1"]},
    {"volumes": ["kvc-a1b2c3-data1 -a"]},
    {"volumes": "kvc-a1b2c3-data1"},
    {"network": "podman"},
    {"bridge": "-j ACCEPT"},
    {"bridge": "a" * 16},
    {"run_id": "-x"},
    {"run_id": "a/b"},
    {"hosts": True},
    {"hosts": 0},
    {"octet": 255},
    {"octet": "7"},
])
def test_a_record_naming_anything_else_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ContainerError, match="container record"):
        ContainerRecord.from_json({**GOOD, **change})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
names = st.sampled_from(["kvc-a1b2c3-node1", "kvc-a1b2c3-data2", "kvc-a1b2c3", "--all", "kvc-a1b2c3-node0", ""])


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "run_id": st.sampled_from(["a1b2c3", "", "-", "a" * 40]) | st.text(max_size=8),
        "hosts": json_values, "octet": json_values, "network": names | json_values,
        "bridge": st.text(max_size=20), "containers": st.lists(names | st.text(max_size=20), max_size=3) | json_values,
        "volumes": st.lists(names | st.text(max_size=20), max_size=3) | json_values,
    }),
))
def test_parsing_is_total_and_only_names_the_runs_own_objects(obj: object) -> None:
    try:
        rec = ContainerRecord.from_json(obj)
    except ContainerError:
        return
    prefix = f"kvc-{rec.run_id}"
    assert rec.network == prefix
    assert all(re.fullmatch(rf"{re.escape(prefix)}-node[1-9][0-9]*", c) for c in rec.containers)
    assert all(re.fullmatch(rf"{re.escape(prefix)}-data[1-9][0-9]*", v) for v in rec.volumes)
    assert not rec.bridge.startswith("-") and not rec.run_id.startswith("-")
