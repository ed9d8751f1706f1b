"""``python -m chaos.checker FILE [--format auto|porcupine|jsonl] [--timeout S]``

Prints the verdict as the last line: ``linearizable`` (exit 0), ``not linearizable`` (exit 1)
or ``unknown`` (exit 2). On a violation the refuted key and a minimized set of its operations
that cannot be linearized are printed before it. A file that cannot be read or parsed exits 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import Verdict, check, format_op, load_history

EXIT_CODES = {Verdict.LINEARIZABLE: 0, Verdict.NOT_LINEARIZABLE: 1, Verdict.UNKNOWN: 2}
EXIT_BAD_INPUT = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.checker",
        description="Check a history for linearizability (per key, Wing & Gong / Lowe search).",
    )
    parser.add_argument("file", help="history file: JSON lines, or a porcupine etcd log / kv file")
    parser.add_argument(
        "--format",
        choices=("auto", "porcupine", "jsonl"),
        default="auto",
        help="input format (default: detect from the content; porcupine etcd vs kv is always detected)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before answering unknown (default 30)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="search step budget per key (default: none)"
    )
    parser.add_argument(
        "--minimize-budget",
        type=float,
        default=3.0,
        help="seconds spent shrinking a counterexample (default 3)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print per-key verdicts")
    args = parser.parse_args(argv)

    try:
        ops, model = load_history(args.file, args.format)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    result = check(
        ops,
        model,
        timeout=args.timeout,
        max_steps=args.max_steps,
        minimize_budget=args.minimize_budget,
    )
    keys = result.key_results
    counts = {v: sum(1 for x in keys.values() if x is v) for v in Verdict}
    print(
        f"{len(ops)} operations, {len(keys)} keys: "
        + ", ".join(f"{counts[v]} {v.value}" for v in Verdict)
        + f" ({result.elapsed:.3f} s)"
    )
    if args.verbose:
        for key in sorted(keys):
            print(f"  key {key!r}: {keys[key].value} ({result.steps.get(key, 0)} steps)")
    if result.verdict is Verdict.NOT_LINEARIZABLE:
        print(
            f"key {result.bad_key!r} is not linearizable; these {len(result.counterexample)} "
            "operations cannot be ordered (process [invoke, complete] call -> result status):"
        )
        if result.counterexample_any_start:
            print(
                "  (earlier operations omitted: these cannot be ordered whatever value they left in the key)"
            )
        for op in result.counterexample:
            print(f"  {format_op(op)}")
    elif result.verdict is Verdict.UNKNOWN:
        undecided = sorted(k for k, v in keys.items() if v is Verdict.UNKNOWN)
        shown = ", ".join(repr(k) for k in undecided[:10]) + (" ..." if len(undecided) > 10 else "")
        print(f"undecided within the budget: {shown}")
    print(result.verdict.value)
    return EXIT_CODES[result.verdict]


if __name__ == "__main__":
    sys.exit(main())
