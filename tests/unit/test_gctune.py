"""The node's garbage-collector settings (`server/gctune.py`): what `tune` changes, that its undo
puts everything back, and that every collection's pause is noted without touching a lock."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kvstore.server import gctune


@pytest.fixture
def pristine() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0  # (the test's undo ran)


def test_tune_freezes_raises_the_thresholds_notes_pauses_and_undoes_it_all(pristine: tuple[int, int, int]) -> None:
    assert gc.get_freeze_count() == 0
    pauses = gctune.GcPauses()
    undo = gctune.tune(20_000, pauses)
    try:
        assert gc.get_threshold() == (20_000, gctune.MIDDLE, gctune.FULL)
        assert gc.get_freeze_count() > 0  # what existed is out of every collection
        assert pauses in gc.callbacks
        gc.collect(0)
        gc.collect(2)
        seen: list[tuple[int, float]] = []
        assert pauses.drain(lambda gen, s: seen.append((gen, s))) == 2
        assert [g for g, _ in seen] == [0, 2] and all(s >= 0 for _, s in seen)
        assert pauses.drain(lambda gen, s: seen.append((gen, s))) == 0  # drained
    finally:
        undo()
    assert pauses not in gc.callbacks


def test_zero_keeps_pythons_settings_and_only_measures(pristine: tuple[int, int, int]) -> None:
    pauses = gctune.GcPauses(keep=3)
    undo = gctune.tune(0, pauses)
    try:
        assert gc.get_threshold() == pristine and gc.get_freeze_count() == 0
        for _ in range(5):
            gc.collect(1)
        assert len(pauses.pending) == 3  # bounded between drains: the oldest dropped
    finally:
        undo()
    undo()  # idempotent
    assert pauses not in gc.callbacks
