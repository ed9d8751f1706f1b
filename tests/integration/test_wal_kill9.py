"""A short kill -9 loop on the write-ahead log over the real file system (`chaos/walkill.py`):
every acknowledged record is there after each kill. The soak is `python -m chaos.walkill --kills 300`."""

from __future__ import annotations

from pathlib import Path

from chaos.walkill import check, payload, run_loop


def test_kill_9_loses_no_acknowledged_record(tmp_path: Path) -> None:
    assert run_loop(tmp_path / "wal", kills=6, seed=3) == []
    last, problem = check(tmp_path / "wal", 0)
    assert problem is None and last > 6  # the children really acknowledged cycles


def test_the_check_sees_a_lost_record(tmp_path: Path) -> None:
    """The checker is not vacuous: claiming more was acknowledged than the log holds fails it."""
    assert run_loop(tmp_path / "wal", kills=1, seed=4) == []
    last, problem = check(tmp_path / "wal", 0)
    assert problem is None
    _, problem = check(tmp_path / "wal", last + 1)
    assert problem is not None and "lost" in problem
    assert payload(1) != payload(2)
