"""Client addresses (`--client-listen`) as hostile input: the HOST:PORT check is total, the shard
map's `clients` decode is total and backwards compatible, a node publishes only its own entry,
the client library follows client addresses only (when it talks to client ports), and the
configuration's rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client.routing import Router
from kvstore.node.clientaddr import publish_command
from kvstore.node.grouprequests import check_group_request
from kvstore.server.config import NodeConfig
from kvstore.shard.endpoints import MAX_ADDRESS, check_address
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap, ShardMapError
from kvstore.storage import commands
from kvstore.v1 import kv_pb2, shard_pb2

NODES = {1: "127.0.0.1:2379", 2: "127.0.0.1:2380", 3: "127.0.0.1:2381"}


def _map() -> ShardMap:
    return ShardMap.initial([1, 2, 3], 3, 3, 8, dict(NODES))


@pytest.mark.parametrize("addr", ["127.0.0.1:1", "node-1.kv.svc.cluster.local:65535", "[::1]:2379", "a_b:9"])
def test_valid_addresses_pass(addr: str) -> None:
    assert check_address(addr) == addr


@pytest.mark.parametrize("addr", ["", "127.0.0.1", ":80", "h:0", "h:65536", "h:-1", "h: 80", "h:\uff18\uff10", "h h:1",
                                  "[::1:80", "[nope]:80", "-h:1", "h\n:1", "h/x:1", "x" * MAX_ADDRESS + ":1"])
def test_invalid_addresses_are_refused(addr: str) -> None:
    with pytest.raises(ValueError):
        check_address(addr)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_check_address_is_total(text: str) -> None:
    try:
        assert check_address(text) == text
    except ValueError:
        return
    host, _, port = text.rpartition(":")
    assert host and 1 <= int(port) <= 65535 and len(text.encode()) <= MAX_ADDRESS


def test_an_old_map_without_client_addresses_decodes_with_none() -> None:
    pb = _map().to_proto()
    assert not pb.clients
    old = pb.SerializeToString(deterministic=True)  # what maps written before client ports look like
    m = ShardMap.decode(old)
    assert m.clients == {} and m.nodes == NODES


@settings(max_examples=200)
@given(st.dictionaries(st.integers(0, 2**64 - 1), st.text(max_size=300), max_size=6))
def test_client_address_decode_is_total_and_what_it_accepts_is_valid(clients: dict[int, str]) -> None:
    pb = _map().to_proto()
    for n, a in clients.items():
        pb.clients[n] = a
    try:
        m = ShardMap.decode(pb.SerializeToString())
    except ShardMapError:
        return
    assert m.clients == clients
    for n, a in m.clients.items():
        assert n in m.nodes and check_address(a) == a


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_a_damaged_encoding_is_refused_as_a_shard_map_error_only(junk: bytes) -> None:
    pb = _map().with_client(1, "10.0.0.1:3379").to_proto()
    data = pb.SerializeToString() + junk
    try:
        m = ShardMap.decode(data)
    except ShardMapError:
        return  # refused as a shard map error, never anything else
    assert all(check_address(a) == a and n in m.nodes for n, a in m.clients.items())


def test_a_node_publishes_its_own_entry_once_listed_and_removal_of_a_member_drops_it() -> None:
    m = _map()
    raw = m.encode()
    assert publish_command(None, b"", 1, "10.0.0.1:3379") is None
    assert publish_command(m, raw, 9, "10.0.0.9:3379") is None  # not a node of the map yet
    assert publish_command(m, raw, 1, "") is None  # nothing to remove
    cmd = publish_command(m, raw, 1, "10.0.0.1:3379")
    assert cmd is not None
    dec = commands.decode_command(cmd)
    assert dec.op == commands.Op.CAS and dec.key == SHARD_MAP_KEY and dec.expected == raw
    new = ShardMap.decode(dec.value)
    assert new.version == m.version + 1 and new.clients == {1: "10.0.0.1:3379"} and new.nodes == m.nodes
    # the metadata group takes it from a peer (a valid map CAS one version on)
    req = shard_pb2.GroupProposeRequest(group=META_GROUP, command=cmd, from_node=1)
    assert check_group_request(req, m) is None
    # ... from that node only: another member may not set (or change) node 1's client address
    with pytest.raises(errors.InvalidArgument, match="client address"):
        check_group_request(shard_pb2.GroupProposeRequest(group=META_GROUP, command=cmd, from_node=2), m)
    assert publish_command(new, dec.value, 1, "10.0.0.1:3379") is None  # already published
    gone = ShardMap.decode(commands.decode_command(publish_command(new, dec.value, 1, "") or b"").value)
    assert gone.clients == {}
    # a member removed: its client address goes with it, and any member's coordinator may say so
    pruned = new.with_nodes({2: NODES[2], 3: NODES[3]})
    assert pruned.clients == {}
    prune = commands.encode_cas(SHARD_MAP_KEY, False, dec.value, pruned.encode())
    assert check_group_request(shard_pb2.GroupProposeRequest(group=META_GROUP, command=prune, from_node=3), new) is None
    with pytest.raises(ShardMapError):
        m.with_client(1, "not an address")


def test_the_client_on_client_ports_follows_client_addresses_only() -> None:
    m = _map().with_client(1, "10.0.0.1:3379").with_client(2, "10.0.0.2:3379")
    cr = Router(["10.0.0.1:3379"], client_port=True)
    cr.set_shard_map(m)
    assert set(cr.endpoints) == {"10.0.0.1:3379", "10.0.0.2:3379"}  # node 3 published none: unknown
    assert cr.on_redirect(1, "10.0.0.1:3379", 3, NODES[3], "10.0.0.3:3379") == "10.0.0.3:3379"
    assert cr.on_redirect(1, "10.0.0.1:3379", 3, NODES[3], "") == "10.0.0.3:3379"  # known by id now
    fresh = Router(["10.0.0.1:3379"], client_port=True)
    assert fresh.on_redirect(1, "10.0.0.1:3379", 3, NODES[3], "") is None  # never the peer address
    assert fresh.on_redirect(1, "10.0.0.1:3379", 3, NODES[3], "bad host:1") is None  # hostile hint ignored
    cr.learn_status("10.0.0.1:3379", 1, [(2, "10.0.0.2:3379"), (3, "x\x00:1")], [])
    assert "x\x00:1" not in cr.endpoints
    pr = Router([NODES[1]])  # peer ports: as before
    pr.set_shard_map(m)
    assert set(pr.endpoints) == set(NODES.values())
    assert pr.on_redirect(1, NODES[1], 2, NODES[2], "10.0.0.2:3379") == NODES[2]


def test_not_leader_carries_the_client_hint_both_ways() -> None:
    e = errors.NotLeader(2, NODES[2], leader_client_address="10.0.0.2:3379")
    pb = errors.to_proto(e)
    assert pb.code == kv_pb2.NOT_LEADER and pb.leader_client_hint == "10.0.0.2:3379"
    back = errors.from_proto(pb, is_write=True)
    assert isinstance(back, errors.NotLeader) and back.leader_client_address == "10.0.0.2:3379"
    assert not back.indeterminate


@pytest.mark.parametrize(("extra", "problem"), [
    ({"client_listen": "127.0.0.1:3379"}, None),
    ({"client_listen": "127.0.0.1:2379"}, "must differ"),
    ({"client_listen": "0.0.0.0:3379", "certs_dir": Path("/c")}, "--client-advertise"),
    ({"client_listen": "0.0.0.0:3379", "client_advertise": "10.0.0.1:3379", "certs_dir": Path("/c")}, None),
    ({"client_advertise": "10.0.0.1:3379"}, "needs --client-listen"),
    ({"client_listen": "nohost"}, "bad --client-listen"),
    ({"client_listen": "10.0.0.1:3379"}, "--insecure"),  # plaintext off loopback
    ({"client_listen": "10.0.0.1:3379", "insecure": True}, None),
])
def test_client_listen_configuration(extra: dict[str, object], problem: str | None) -> None:
    cfg = NodeConfig(id=1, data_dir=Path("/nonexistent"), listen="127.0.0.1:2379", peers={1: "127.0.0.1:2379"},
                     **extra)  # type: ignore[arg-type]
    if problem is None:
        cfg.validate()
        assert cfg.client_address == (extra.get("client_advertise") or extra["client_listen"])
    else:
        with pytest.raises(ValueError, match=problem):
            cfg.validate()


def test_a_client_with_a_ca_only_needs_a_password_and_follows_client_ports(tmp_path: Path) -> None:
    from kvstore.client import AsyncClient
    from kvstore.security import certs

    certs.create_ca(tmp_path)
    ca = tmp_path / "ca.crt"
    with pytest.raises(ValueError, match="password"):
        AsyncClient(["127.0.0.1:1"], cacert=ca)
    with pytest.raises(ValueError, match="one of"):
        AsyncClient(["127.0.0.1:1"], cacert=ca, certs_dir=tmp_path, password="p")
    assert AsyncClient(["127.0.0.1:1"], cacert=ca, password="p").router.client_port
    assert not AsyncClient(["127.0.0.1:1"], password="p").router.client_port
    assert AsyncClient(["127.0.0.1:1"], password="p", client_port=True).router.client_port
