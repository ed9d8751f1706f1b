"""Loads a generator script of `tests/fixtures/` as a module (the scripts are not a package: each
must also run alone, with an old release's code, to write its fixture)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_module(name: str) -> ModuleType:
    """`tests/fixtures/<name>.py`, imported."""
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
