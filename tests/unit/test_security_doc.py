"""docs/SECURITY.md maps each threat to the test that checks its control: every test it names
must exist, so the threat model cannot silently point at a renamed or deleted test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _defined_tests() -> dict[str, set[str]]:
    """test function names per test file (path relative to the repository)."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        names = set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
        out[str(path.relative_to(ROOT))] = names
    return out


def test_every_test_the_threat_model_names_exists() -> None:
    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    defined = _defined_tests()
    everywhere = set().union(*defined.values())
    named_files = set(re.findall(r"(tests/[\w/]+\.py)", doc))
    missing = [f for f in sorted(named_files) if not (ROOT / f).exists()]
    assert not missing, f"SECURITY.md names files that do not exist: {missing}"
    # `file::test` pairs must match exactly; a bare name (after a `::` shorthand or in a list)
    # must exist in some test file.
    pairs = re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", doc)
    wrong = [f"{f}::{t}" for f, t in pairs if t not in defined.get(f, set())]
    assert not wrong, f"SECURITY.md names tests that do not exist: {wrong}"
    bare = set(re.findall(r"\b(test_\w+)\b", doc)) - {Path(f).stem for f in named_files}
    modules = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    unknown = sorted(t for t in bare if t not in everywhere and t not in modules)
    assert not unknown, f"SECURITY.md names tests that do not exist: {unknown}"
    assert len(pairs) >= 10 and len(bare) >= 40  # the model really maps threats to tests
