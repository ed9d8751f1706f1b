"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterharness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A started 3-node cluster of real `kvstore serve` processes (modules that need another
    shape define their own `cluster`)."""
    c = Cluster(tmp_path, 3)
    try:
        yield c.start()
    finally:
        c.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rewrite",
        action="store_true",
        default=False,
        help="rewrite the expected outputs of the Raft transcripts (tests/raft_transcripts/)",
    )
