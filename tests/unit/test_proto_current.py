"""The committed generated code in kvstore/v1 and kvstore/etcdpb is exactly what scripts/gen_proto.sh produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True, cwd=ROOT, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(
        p.relative_to(tmp_path)
        for d in ("v1", "etcdpb/etcdserverpb", "etcdpb/mvccpb", "etcdpb/authpb", "etcdpb/v3lockpb",
                  "etcdpb/v3electionpb")
        for p in (tmp_path / "kvstore" / d).iterdir()
    )
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed; run scripts/gen_proto.sh"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale; run scripts/gen_proto.sh"
