"""A short kill -9 loop of a real one-node `kvstore serve` (`chaos/nodekill.py`): after every kill
and restart each acknowledged put is there with its value, and nothing that was never written.
The soak is `python -m chaos.nodekill --kills 200`."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.nodekill import Node, _free_port, _verify, run
from kvstore.client import Client

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("state_sync", ["checkpoint", "commit"])
def test_kill_9_of_a_node_loses_no_acknowledged_put(tmp_path: Path, state_sync: str) -> None:
    """checkpoint: each restart restores LMDB's last checkpoint and replays the WAL after it."""
    out = run(tmp_path, kills=3, seed=5, say=lambda _: None, state_sync=state_sync)
    assert out.problems == [] and out.kills == 3
    assert out.acked > 30  # the writers really got answers between the kills


def test_the_check_sees_a_lost_put_and_a_stranger(tmp_path: Path) -> None:
    """The verifier is not vacuous: a put claimed acknowledged that the node does not hold, and a
    key nobody claimed to write, both fail it."""
    node = Node(tmp_path, _free_port())
    try:
        node.start()
        node.wait_serving()
        with Client([node.address]) as c:
            c.put(b"w000-0-000001", b"vw000-0-000001")
            c.put(b"w000-0-000002", b"vw000-0-000002")
        assert _verify(node.address, {b"w000-0-000001": b"vw000-0-000001", b"w000-0-000002": b"vw000-0-000002"},
                       set()) == []
        problems = _verify(node.address, {b"w000-0-000001": b"vw000-0-000001", b"w000-0-000009": b"vw000-0-000009"},
                           set())
        assert len(problems) == 2 and "lost" in problems[0] and "never written" in problems[1]
    finally:
        node.stop()
