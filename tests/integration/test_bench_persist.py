"""Smoke of bench/persist_cycle.py (`ab_revisions.py`'s persist phase): it runs on this checkout's
store and checks its puts were applied. Nothing about speed is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))


def test_persist_cycle_bench_persists_and_applies(tmp_path: Path) -> None:
    from bench import persist_cycle

    user, system, rate = persist_cycle.run(640, 64, False, str(tmp_path))
    assert rate > 0 and user >= 0 and system >= 0
    assert not any(tmp_path.iterdir()), "the temporary store was not removed"
