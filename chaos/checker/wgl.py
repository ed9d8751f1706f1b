"""Wing & Gong / Lowe linearizability search over one partition (one key).

This is the algorithm of porcupine's ``checkSingle``: the history becomes a doubly linked list
of call and return entries in real-time order. The search walks the list; at a call entry it
tries to linearize that operation next (apply the model step, and if legal "lift" the call and
its return out of the list and restart from the head); at a return entry whose operation has
not been linearized yet it backtracks (pops the last linearized operation, "unlifts" it and
tries the next candidate). A cache of (set of linearized operations, model state) prunes
configurations already explored. The list is empty when every operation has been linearized.

One addition to porcupine's search: an operation that never changes the state (a get, a cas
that reported a failed compare) is linearized greedily as soon as it is legal, and never
backtracked over on its own: any linearization of the configuration can be reordered to take
it first. Read-only calls are also tried first among calls with no return between them.

The search is iterative (an explicit stack, no recursion) and resumable: :meth:`Search.run`
does at most ``max_steps`` steps and returns ``None`` if it has not finished, so a caller can
interleave several partitions and enforce deadlines and step budgets.

FAIL operations are dropped before the search. INFO operations return at +infinity (after
every other event), so they may take effect anywhere after their invocation, or never (being
linearized at the very end, where their unknown output makes them legal from any state).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Sequence
from typing import Any

from .history import Operation, Status
from .model import Model

__all__ = ["Search", "Verdict", "check_partition", "entry_order", "prepare", "return_time"]


_INIT: Any = object()  # "start from model.init()"


class Verdict(enum.Enum):
    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not linearizable"
    UNKNOWN = "unknown"


def return_time(op: Operation) -> float:
    """When an operation returns for the search: +inf unless it completed (status OK)."""
    if op.status is not Status.OK or op.complete is None:
        return math.inf
    return max(op.complete, op.invoke)


def entry_order(ops: Sequence[Operation]) -> list[tuple[float, int, int]]:
    """The call (kind 0) and return (kind 1) events of ``ops`` in real-time order, as
    (time, kind, op index). Calls sort before returns at equal times (the two operations are
    then concurrent, the permissive reading); INFO returns are at +inf, after everything."""
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.invoke, 0, i))
        events.append((return_time(op), 1, i))
    events.sort()
    return events


class Search:
    """A resumable WGL search over the operations of one partition (one key).

    ``ops`` must not contain FAIL operations (use :func:`prepare`). The search starts from
    ``initial`` (default: ``model.init()``). Entries are numbered
    1..2n; 0 is the head sentinel and 2n+1 the tail sentinel.
    """

    __slots__ = (
        "_bit",
        "_cache",
        "_calls",
        "_entry",
        "_lin",
        "_match",
        "_model",
        "_nxt",
        "_opof",
        "_prv",
        "_ro",
        "_state",
        "furthest",
        "max_depth",
        "ops",
        "result",
        "steps",
    )

    def __init__(self, ops: Sequence[Operation], model: Model, initial: Any = _INIT) -> None:
        self.ops: list[Operation] = list(ops)
        self._model = model
        n = len(self.ops)
        read_only = [model.read_only(op) for op in self.ops]
        events = entry_order(self.ops)
        # Within each run of consecutive calls (no return in between) the order is free: those
        # calls are always candidates together. Put read-only ones first: they are linearized
        # greedily (see run()), so trying them first saves exploring branches.
        i = 0
        while i < len(events):
            j = i
            while j < len(events) and events[j][1] == 0:
                j += 1
            if j - i > 1:
                events[i:j] = sorted(events[i:j], key=lambda e: not read_only[e[2]])
            i = j + 1
        size = 2 * n + 2
        self._nxt: list[int] = list(range(1, size + 1))
        self._nxt[size - 1] = -1
        self._prv: list[int] = list(range(-1, size - 1))
        self._match: list[int] = [0] * size  # call entry -> its return entry; 0 for non-calls
        self._opof: list[int] = [-1] * size  # call entry -> op index
        self._bit: list[int] = [0] * size  # call entry -> 1 << op index
        self._ro: list[bool] = [False] * size  # call entry -> its op never changes the state
        call_entry: dict[int, int] = {}
        for pos, (_t, kind, i) in enumerate(events, 1):
            if kind == 0:
                call_entry[i] = pos
                self._opof[pos] = i
                self._bit[pos] = 1 << i
                self._ro[pos] = read_only[i]
            else:
                self._match[call_entry[i]] = pos
        self._entry: int = self._nxt[0]
        self._state: Any = model.init() if initial is _INIT else initial
        self._lin: int = 0
        self._calls: list[tuple[int, Any]] = []
        self._cache: set[tuple[int, Any]] = set()
        self.steps: int = 0
        self.max_depth: int = 0
        # the latest position (1-based, in real-time event order) at which the search got stuck
        # on the return of an operation it could not linearize: the history cut after this
        # many events is refuted too (see chaos.checker.minimize)
        self.furthest: int = 0
        self.result: Verdict | None = Verdict.LINEARIZABLE if n == 0 else None

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def run(self, max_steps: int) -> Verdict | None:
        """Search for at most ``max_steps`` steps; the verdict, or None if not finished yet."""
        if self.result is not None:
            return self.result
        nxt = self._nxt
        prv = self._prv
        match = self._match
        opof = self._opof
        bit = self._bit
        ro = self._ro
        ops = self.ops
        step = self._model.step
        cache = self._cache
        calls = self._calls
        entry = self._entry
        state = self._state
        lin = self._lin
        max_depth = self.max_depth
        furthest = self.furthest
        tail = len(nxt) - 1
        steps = 0
        result: Verdict | None = None
        while steps < max_steps:
            steps += 1
            if nxt[0] == tail:
                result = Verdict.LINEARIZABLE
                break
            ret = match[entry]
            if ret:  # a call entry: try to linearize its operation next
                ok, new_state = step(state, ops[opof[entry]])
                if not ok:
                    entry = nxt[entry]
                    continue
                new_lin = lin | bit[entry]
                key = (new_lin, new_state)
                if key not in cache:
                    cache.add(key)
                    calls.append((entry, state))
                    state = new_state
                    lin = new_lin
                    # lift the call and its return out of the list
                    p, q = prv[entry], nxt[entry]
                    nxt[p] = q
                    prv[q] = p
                    p, q = prv[ret], nxt[ret]
                    nxt[p] = q
                    prv[q] = p
                    if len(calls) > max_depth:
                        max_depth = len(calls)
                    entry = nxt[0]
                    continue
                if not ro[entry]:
                    entry = nxt[entry]
                    continue
                # a legal read-only op whose configuration already failed: so does this one
            elif entry > furthest:
                furthest = entry
            # Backtrack. A read-only operation legal in configuration C is linearized greedily:
            # any linearization of C can be reordered to take it first (it changes no state and
            # every operation that must precede it is linearized already). So when C + r fails,
            # C fails too, and popping r means popping on.
            while True:
                if not calls:
                    result = Verdict.NOT_LINEARIZABLE
                    break
                entry, state = calls.pop()
                lin ^= bit[entry]
                # unlift: put the return back, then the call (reverse order of lifting)
                ret = match[entry]
                nxt[prv[ret]] = ret
                prv[nxt[ret]] = ret
                nxt[prv[entry]] = entry
                prv[nxt[entry]] = entry
                if not ro[entry]:
                    break
            if result is not None:
                break
            entry = nxt[entry]
        self.steps += steps
        self._entry = entry
        self._state = state
        self._lin = lin
        self.max_depth = max_depth
        self.furthest = furthest
        self.result = result
        if result is not None:
            self._cache = set()  # free memory; the verdict is final
        return result


def prepare(ops: Sequence[Operation]) -> list[Operation]:
    """Drop FAIL operations (they definitely had no effect)."""
    return [op for op in ops if op.status is not Status.FAIL]


def check_partition(
    ops: Sequence[Operation],
    model: Model,
    *,
    max_steps: int | None = None,
    deadline: float | None = None,
    slice_steps: int = 20_000,
) -> Verdict:
    """Check one partition to the end, or UNKNOWN once ``max_steps`` or ``deadline`` (a
    ``time.monotonic()`` value) is exceeded."""
    search = Search(prepare(ops), model)
    while True:
        budget = slice_steps
        if max_steps is not None:
            left = max_steps - search.steps
            if left <= 0:
                return Verdict.UNKNOWN
            budget = min(budget, left)
        verdict = search.run(budget)
        if verdict is not None:
            return verdict
        if deadline is not None and time.monotonic() >= deadline:
            return Verdict.UNKNOWN
