"""Print the longest modules and classes of a package, by lines (a size check for reviews).

    python scripts/longest.py [ROOT] [--top N]

ROOT defaults to the `kvstore` package next to this script. Generated protobuf modules (`*_pb2*.py`)
are left out. A class's length is from its `class` line to its last line (`ast` end_lineno),
decorators not counted.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def modules(root: Path) -> list[tuple[int, str]]:
    """(lines, path) of every hand-written module under `root`, longest first."""
    out = []
    for p in sorted(root.rglob("*.py")):
        if "_pb2" in p.name:
            continue
        out.append((len(p.read_text().splitlines()), str(p.relative_to(root.parent))))
    return sorted(out, reverse=True)


def classes(root: Path) -> list[tuple[int, str]]:
    """(lines, path:Class) of every class under `root`, nested ones included, longest first."""
    out = []
    for p in sorted(root.rglob("*.py")):
        if "_pb2" in p.name:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                out.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root.parent)}:{node.name}"))
    return sorted(out, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "kvstore")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    print("longest modules:")
    for n, name in modules(args.root)[: args.top]:
        print(f"  {n:6d}  {name}")
    print("longest classes:")
    for n, name in classes(args.root)[: args.top]:
        print(f"  {n:6d}  {name}")


if __name__ == "__main__":
    main()
