"""Linearizability checking for kvstore histories.

    from chaos.checker import check, load_jsonl
    result = check(load_jsonl("history.jsonl"), timeout=30)
    result.verdict  # Verdict.LINEARIZABLE / NOT_LINEARIZABLE / UNKNOWN

The history is partitioned by key (P-compositionality: a history is linearizable iff each
key's sub-history is) and each partition is checked with the Wing & Gong / Lowe search
(:mod:`chaos.checker.wgl`), smallest first, interleaved in bounded slices so that one
partition that explodes cannot starve the others. The first refuted partition stops the check.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import (
    Operation,
    Status,
    detect_format,
    dump_jsonl,
    format_op,
    load_jsonl,
    load_porcupine_etcd,
    load_porcupine_kv,
)
from .model import KVModel, Model
from .wgl import Search, Verdict, check_partition, entry_order, prepare, return_time

__all__ = [
    "DEFAULT_MODEL",
    "CheckResult",
    "Counterexample",
    "KVModel",
    "Model",
    "Operation",
    "Status",
    "Verdict",
    "check",
    "check_partition",
    "detect_format",
    "dump_jsonl",
    "format_op",
    "load_history",
    "load_jsonl",
    "load_porcupine_etcd",
    "load_porcupine_kv",
    "minimize",
    "minimize_witness",
]

DEFAULT_MODEL = KVModel()

# Steps a partition gets per turn of the round robin. A step of the search takes well under a
# microsecond, so a slice is a few ms: fine-grained enough for deadlines and fairness.
_SLICE_STEPS = 10_000


@dataclass
class CheckResult:
    verdict: Verdict
    key_results: dict[str, Verdict]  # per key; keys not (fully) checked are UNKNOWN
    bad_key: str | None  # the refuted key, if any
    counterexample: list[Operation]  # on violation: a small non-linearizable set of the bad key's ops
    elapsed: float
    steps: dict[str, int] = field(default_factory=dict)  # search steps spent per key
    # True if the counterexample's earlier history was cut away: its operations cannot be
    # ordered whatever value the earlier operations left in the key
    counterexample_any_start: bool = False
    minimize_elapsed: float = 0.0  # part of `elapsed` spent minimizing the counterexample


def _partition(ops: Sequence[Operation]) -> dict[str, list[Operation]]:
    parts: dict[str, list[Operation]] = {}
    for op in ops:
        if op.status is Status.FAIL:
            continue
        parts.setdefault(op.key, []).append(op)
    return parts


def check(
    ops: Sequence[Operation],
    model: Model = DEFAULT_MODEL,
    timeout: float = 30.0,
    *,
    max_steps: int | None = None,
    minimize_budget: float = 3.0,
    max_cache: int | None = 4_000_000,
) -> CheckResult:
    """Check that ``ops`` is linearizable w.r.t. ``model`` (applied to each key separately).

    Partitions are checked smallest first, round robin in slices of search steps, and the
    check stops at the first refuted partition. ``timeout`` (seconds, wall clock) bounds the
    whole check: partitions not finished by then are UNKNOWN. ``max_steps`` bounds the search
    steps of each partition (UNKNOWN once exceeded). ``max_cache`` bounds the memory: when the
    search caches of the partitions still running hold more (linearized set, state) entries
    than that in total (~120 bytes each), the biggest is abandoned as UNKNOWN. On a violation the counterexample is
    minimized for at most ``minimize_budget`` seconds (also within ``timeout``).
    """
    start = time.monotonic()
    deadline = start + timeout
    parts = _partition(ops)
    key_results: dict[str, Verdict] = {k: Verdict.UNKNOWN for k in parts}
    steps: dict[str, int] = {}
    order = sorted(parts, key=lambda k: (len(parts[k]), k))
    active: list[tuple[str, Search]] = [(k, Search(parts[k], model)) for k in order]
    bad_key: str | None = None
    bad_cut = 0
    timed_out = False
    while active and bad_key is None and not timed_out:
        still: list[tuple[str, Search]] = []
        for i, (k, search) in enumerate(active):
            budget = _SLICE_STEPS
            if max_steps is not None:
                budget = min(budget, max_steps - search.steps)
            outcome = search.run(budget) if budget > 0 else Verdict.UNKNOWN
            steps[k] = search.steps
            if outcome is None:
                still.append((k, search))
            else:
                key_results[k] = outcome
                if outcome is Verdict.NOT_LINEARIZABLE:
                    bad_key = k
                    bad_cut = search.furthest
                    break
            if time.monotonic() >= deadline:
                timed_out = True
                still.extend(active[i + 1 :])
                break
        active = still
        if max_cache is not None:
            # memory guard: give up on the partitions with the biggest caches (UNKNOWN)
            while active and sum(s.cache_size for _k, s in active) > max_cache:
                victim = max(active, key=lambda ks: ks[1].cache_size)
                active.remove(victim)
    verdict: Verdict
    counterexample: list[Operation] = []
    any_start = False
    t_minimize = time.monotonic()
    if bad_key is not None:
        verdict = Verdict.NOT_LINEARIZABLE
        budget_end = min(deadline, time.monotonic() + minimize_budget)
        witness = minimize_witness(parts[bad_key], model, deadline=budget_end, cut=bad_cut)
        counterexample = witness.ops
        any_start = witness.any_start
    elif any(v is Verdict.UNKNOWN for v in key_results.values()):
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.LINEARIZABLE
    return CheckResult(
        verdict=verdict,
        key_results=key_results,
        bad_key=bad_key,
        counterexample=counterexample,
        elapsed=time.monotonic() - start,
        counterexample_any_start=any_start,
        minimize_elapsed=time.monotonic() - t_minimize if bad_key is not None else 0.0,
        steps=steps,
    )


# --------------------------------------------------------------------------------------------
# Counterexample minimization


def _refute(
    ops: Sequence[Operation],
    model: Model,
    max_steps: int,
    deadline: float,
    initials: Sequence[Any] | None = None,
) -> int | None:
    """Search steps it took to refute ``ops`` from every state of ``initials`` (default: from
    ``model.init()``), or None if some search found a linearization or ran out of budget."""
    total = 0
    for initial in [model.init()] if initials is None else initials:
        search = Search(ops, model, initial)
        while True:
            budget = max_steps - search.steps
            if budget <= 0 or time.monotonic() >= deadline:
                return None
            verdict = search.run(min(5_000, budget))
            if verdict is Verdict.NOT_LINEARIZABLE:
                break
            if verdict is Verdict.LINEARIZABLE:
                return None
        total += search.steps
    return total


def _as_pending(op: Operation) -> Operation:
    return Operation(op.process, op.f, op.key, op.value, None, op.invoke, None, Status.INFO)


@dataclass
class Counterexample:
    """A minimized witness of a violation (see :func:`minimize`).

    ``any_start``: the operations before ``ops`` were cut away and ``ops`` cannot be ordered
    whatever value those earlier operations left in the key (starting from the initial value
    or from any value one of them, or one of ``ops``, wrote).
    """

    ops: list[Operation]
    any_start: bool = False


def minimize(
    ops: Sequence[Operation],
    model: Model = DEFAULT_MODEL,
    *,
    deadline: float | None = None,
    cut: int | None = None,
    max_steps: int = 1_000_000,
) -> list[Operation]:
    """Shrink a non-linearizable single-key history to a small subset of its operations that
    still cannot be linearized (see :func:`minimize_witness`, which also says whether the
    earlier history was cut away)."""
    return minimize_witness(ops, model, deadline=deadline, cut=cut, max_steps=max_steps).ops


def minimize_witness(
    ops: Sequence[Operation],
    model: Model = DEFAULT_MODEL,
    *,
    deadline: float | None = None,
    cut: int | None = None,
    max_steps: int = 1_000_000,
) -> Counterexample:
    """Shrink a non-linearizable single-key history by sound steps only: each step turns a
    refuted history W into a smaller W' such that W' refuted implies W refuted. So the result
    is a genuine witness: no operation that could explain an observation is left out.

    1. Cut the future: the shortest refuted prefix. Cut the history after its first m events
       (in the search's real-time event order); operations open at the cut become pending
       (INFO). If a prefix is refuted, so is the history (operations invoked after the cut can
       only be linearized after it), and refutation is monotone in m. ``cut`` (the furthest
       point the search of the whole history reached, :attr:`Search.furthest`) is a prefix
       length to start from; a binary search below it finds the shortest refuted one.
    2. Cut the past (models with ``cut_states``): drop every operation that returned before a
       time T, make the ones running across T pending (they may have taken effect before T),
       and require a refutation from every state the key may hold at T
       (``model.cut_states``). In any linearization of W, the operations after the last
       dropped one form a linearization of W' from such a state. The latest T that still
       refutes is found by binary search.
    3. Drop read-only operations (gets, cas that reported a failed compare), in chunks and
       then one by one, latest first, while the rest stays refuted: dropping an operation
       that cannot change the state only removes constraints. Writes are never dropped one by
       one: without them an observation could look impossible when it is not.

    The operations returned are the original records (with their real completions: a
    completed operation constrains more than a pending one, so the set is still refuted),
    sorted by invocation time. Every candidate is checked with a step budget and the
    ``deadline``; an UNKNOWN answer keeps the larger set.
    """
    if deadline is None:
        deadline = time.monotonic() + 5.0
    base = prepare(ops)
    events = entry_order(base)

    def prefix(m: int) -> dict[int, Operation]:
        invoked: dict[int, None] = {}
        returned: set[int] = set()
        for _t, kind, i in events[:m]:
            if kind == 0:
                invoked[i] = None
            else:
                returned.add(i)
        return {i: (base[i] if i in returned else _as_pending(base[i])) for i in invoked}

    def result(witness: dict[int, Operation], any_start: bool) -> Counterexample:
        chosen = sorted((base[i] for i in witness), key=lambda o: (o.invoke, return_time(o)))
        return Counterexample(chosen, any_start)

    def budget(cost: int) -> int:
        return min(max_steps, 2 * cost + 20_000)

    def drop_read_only(
        witness: dict[int, Operation], initials: list[Any] | None, cost: int
    ) -> tuple[dict[int, Operation], int]:
        witness = dict(witness)
        removable = sorted((i for i, op in witness.items() if model.read_only(op)), reverse=True)
        chunk = max(1, len(removable) // 2)
        while removable and time.monotonic() < deadline:
            kept_ids: list[int] = []
            for start in range(0, len(removable), chunk):
                group = set(removable[start : start + chunk])
                if len(group) >= len(witness) or time.monotonic() >= deadline:
                    kept_ids.extend(group)
                    continue
                rest = [op for j, op in witness.items() if j not in group]
                steps = _refute(rest, model, budget(cost), deadline, initials)
                if steps is not None:
                    for j in group:
                        del witness[j]
                    cost = steps
                else:
                    kept_ids.extend(group)
            removable = sorted(kept_ids, reverse=True)
            if chunk == 1:
                break
            chunk = max(1, chunk // 2)
        return witness, cost

    # 1. the future
    hi = len(events) if not cut or cut > len(events) else cut
    cost = _refute(list(prefix(hi).values()), model, max_steps, deadline)
    if cost is None:
        if hi == len(events):
            return result(dict(enumerate(base)), False)
        hi = len(events)
        cost = max_steps
    lo = 1  # invariant: the prefix of length hi is refuted, in about `cost` steps
    while lo < hi and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        steps = _refute(list(prefix(mid).values()), model, budget(cost), deadline)
        if steps is not None:
            hi, cost = mid, steps
        else:
            lo = mid + 1
    witness = prefix(hi)
    initials: list[Any] | None = None

    # 2. the past (after dropping the reads the cut does not need: fewer comparisons)
    witness, cost = drop_read_only(witness, None, cost)
    cut_states = getattr(model, "cut_states", None)
    if cut_states is not None:
        times = sorted({op.invoke for op in witness.values()})

        def past_cut(t: float) -> tuple[dict[int, Operation], list[Any]] | None:
            dropped = [op for op in witness.values() if return_time(op) < t]
            kept = {
                i: (op if op.invoke >= t else _as_pending(op))
                for i, op in witness.items()
                if return_time(op) >= t
            }
            states = cut_states(dropped, list(kept.values()))
            return None if states is None else (kept, states)

        best: tuple[dict[int, Operation], list[Any]] | None = None
        lo, hi = 1, len(times) - 1  # candidate cut times: times[lo..hi]
        while lo <= hi and time.monotonic() < deadline:
            mid = (lo + hi) // 2
            candidate = past_cut(times[mid])
            if candidate is None:
                break
            steps = _refute(list(candidate[0].values()), model, budget(cost), deadline, candidate[1])
            if steps is not None:
                best, cost = candidate, max(steps, 1)
                lo = mid + 1
            else:
                hi = mid - 1
        if best is not None:
            witness, initials = best

    # 3. read-only operations
    witness, cost = drop_read_only(witness, initials, cost)
    return result(witness, initials is not None)


def load_history(path: str, fmt: str = "auto") -> tuple[list[Operation], KVModel]:
    """Load a history file and the model to check it with.

    ``fmt``: "jsonl", "porcupine" (etcd log or kv file, told apart by content) or "auto".
    Porcupine kv files use ``KVModel(missing="")``; everything else ``KVModel()``.
    """
    kind = detect_format(path)
    if fmt == "jsonl":
        kind = "jsonl"
    elif fmt == "porcupine" and kind == "jsonl":
        raise ValueError(f"{path}: looks like a JSON-lines history, not a porcupine file")
    if kind == "jsonl":
        return load_jsonl(path), KVModel()
    if kind == "kv":
        return load_porcupine_kv(path), KVModel(missing="")
    return load_porcupine_etcd(path), KVModel()
