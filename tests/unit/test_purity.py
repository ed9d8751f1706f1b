"""The Raft core (and the state machine's apply logic) import only the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    ROOT / "kvstore" / "raft",
    ROOT / "kvstore" / "storage" / "commands.py",
    ROOT / "kvstore" / "storage" / "machine.py",
    ROOT / "kvstore" / "storage" / "shardcmd.py",
    ROOT / "kvstore" / "storage" / "mvcc.py",
    ROOT / "kvstore" / "storage" / "mvcc_mem.py",
    ROOT / "kvstore" / "storage" / "txn.py",
    ROOT / "kvstore" / "storage" / "keylimit.py",
    ROOT / "kvstore" / "storage" / "changefeed.py",
    ROOT / "kvstore" / "shard" / "ranges.py",
    ROOT / "kvstore" / "node" / "store.py",
    ROOT / "kvstore" / "node" / "memstore.py",
]
NODE_LOGIC = ROOT / "kvstore" / "node"
"""The node's logic may use the project's own modules (protobuf messages among them), but no I/O,
no clock, no thread and no event loop: the simulator runs it as is."""
IO_LIBRARIES = {"grpc", "lmdb", "uvloop", "prometheus_client"}
FORBIDDEN_STDLIB = {"asyncio", "socket", "time", "threading", "os", "select", "selectors", "subprocess"}


def _imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def test_core_imports_only_the_standard_library_and_no_io() -> None:
    files = [p for base in PURE for p in ([base] if base.is_file() else sorted(base.rglob("*.py")))]
    assert len(files) >= 8
    for f in files:
        for mod in _imports(f):
            assert mod in sys.stdlib_module_names or mod == "__future__", f"{f.name} imports {mod}"
            assert mod not in FORBIDDEN_STDLIB, f"{f.name} imports {mod}: the core must stay free of I/O and clocks"


def test_node_logic_does_no_io() -> None:
    files = sorted(NODE_LOGIC.glob("*.py"))
    assert len(files) >= 6
    for f in files:
        for mod in _imports(f):
            assert mod not in FORBIDDEN_STDLIB | IO_LIBRARIES, f"{f.name} imports {mod}: node logic does no I/O"
        text = f.read_text()
        assert "random.Random()" not in text, f"{f.name}: randomness must be handed in (seeded)"


def test_core_uses_no_global_randomness() -> None:
    for f in sorted((ROOT / "kvstore" / "raft").rglob("*.py")):
        text = f.read_text()
        assert "random.random(" not in text and "random.randrange(" not in text and "random.choice(" not in text, f.name


def test_the_node_package_loads_no_lmdb_and_no_grpc() -> None:
    """Transitively: the simulator's store (and the protocol) import nothing outside the stdlib."""
    code = (
        "import sys, kvstore.node.memstore, kvstore.node.store;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'lmdb', 'grpc', 'google'});"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_txn_scan_logic_does_no_io() -> None:
    """`txnscan` / `txnpath` (where a transaction's scans are read and how their answers are put
    together) are pure: the server's shell (`server/txn_scans.py`) does the reads."""
    for f in (ROOT / "kvstore" / "txnscan.py", ROOT / "kvstore" / "txnpath.py"):
        for mod in _imports(f):
            assert mod not in FORBIDDEN_STDLIB | IO_LIBRARIES, f"{f.name} imports {mod}: it does no I/O"
