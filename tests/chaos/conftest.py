"""Every kvchaos run a test starts is cleaned up, whatever the outcome: a `subprocess.run(...,
timeout=...)` that kills the `kvchaos` CLI (or a failed assertion before the run's own teardown)
would otherwise leave the run's node processes and network namespaces behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def not_torn_down(root: Path) -> list[Path]:
    """The run directories under `root` (each holds its record, `state.json`) whose record does
    not say they were torn down (an unreadable record counts as not torn down)."""
    out = []
    for state in sorted(root.rglob("state.json")):
        try:
            done = json.loads(state.read_text()).get("torn_down") is True
        except (OSError, ValueError, AttributeError):
            done = False
        if not done:
            out.append(state.parent)
    return out


def clean_runs(root: Path) -> list[str]:
    """`python -m chaos.cli clean RUN_DIR` on every run under `root` not torn down; its output."""
    runs = not_torn_down(root)
    if not runs:
        return []
    env = dict(os.environ)
    if (root / "registry").is_dir():  # the test's private registry (its monkeypatch is undone by now)
        env["KVCHAOS_REGISTRY"] = str(root / "registry")
    proc = subprocess.run([sys.executable, "-m", "chaos.cli", "clean", *map(str, runs)], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    return [proc.stdout, proc.stderr]


@pytest.fixture(autouse=True)
def clean_kvchaos_runs(tmp_path: Path) -> Iterator[None]:
    """After each test: clean every run directory it created under its `tmp_path` (where every
    test here puts `--out`) that its run did not tear down itself."""
    yield
    clean_runs(tmp_path)
