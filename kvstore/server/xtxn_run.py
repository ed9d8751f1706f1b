"""The asyncio shell of transactions across groups: proposes what `kvstore.node.xtxn` decides, at
each group's leader (`GroupCaller`, which also reaches groups led here), and feeds the results
back. No decision is made here beyond retry timing.

Errors the client sees (kvstore/errors.py): before the commit point (the RECORD applied) every
failure is definite (the intents are aborted, best effort; an intent left behind is resolved to
ABORTED by whoever meets it, since no record says COMMITTED); a RECORD whose outcome is unknown
is settled by a RESOLVE in the primary (which writes ABORTED if the record is absent); only if
that cannot be done before the deadline is the answer indeterminate. After the commit point the
answer is success, whatever happens to the COMMITs (a participant left with intents is resolved
to COMMITTED by whoever meets them).

A failure that is no KVError (a bug, a broken proposal path) is never let through with intents
held: before the RECORD is proposed every participant is released (ABORT) and the client gets a
definite `ProposalDropped` (an INTERNAL code would read as indeterminate for a write at the
client); while the RECORD's outcome is unknown it gets an indeterminate one
(the RECORD may have applied: nothing is aborted, the resolvers settle it); after the RECORD
committed the answer stays success (the COMMITs left undone are resolved from the record). A
RECORD or COMMIT that cannot be built releases every participant and answers a definite
`InvalidArgument`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.node.hlc import HybridClock
from kvstore.storage import mvcc, txn
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.storage.xtxn import Intent, Record, TxnId

Propose = Callable[[int, bytes], Awaitable[ApplyResult]]
_T = TypeVar("_T")

log = logging.getLogger("kvstore.xtxn")

SWEEP_BATCH = 64
"""The most intents of one group the background sweep looks at per round."""

PLANT_ENV = "KVSTORE_PLANT_XTXN_HALT"
"""PLANTED FAULT, for testing recovery only: the variable of `kvstore serve`'s hidden option
`--plant-xtxn-halt` (`NodeConfig.plant_xtxn_halt`, handed to `CrossTxns` as `halt`; nothing here
reads the environment). ``NODE:prepare`` or ``NODE:record`` (comma-separated for several nodes)
makes node NODE's coordinator stop for good after a writing transaction's PREPAREs (or its
RECORD), as if it died there, so a test can kill it and check that readers and writers recover
its intents. Never set unless a test asks for it."""


def planted_halt(node_id: int, value: str) -> str | None:
    """The stage at which node `node_id`'s coordinator halts, from the option's value."""
    for part in value.split(","):
        nid, _, stage = part.partition(":")
        if nid.strip() == str(node_id) and stage in ("prepare", "record"):
            return stage
    return None


class CrossTxns:
    """Runs transactions across groups for one node, and resolves intents its requests meet."""

    def __init__(
        self, node_id: int, propose: Propose, clock: HybridClock, timeout: float,
        rng: random.Random | None = None, now_ms: Callable[[], int] | None = None,
        txn_timeout_ms: int = logic.TXN_TIMEOUT_MS, halt: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.propose = propose
        self.clock = clock
        self.timeout = timeout
        self.rng = rng or random.SystemRandom()
        self.now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self.txn_timeout_ms = txn_timeout_ms
        self._resolving: dict[TxnId, asyncio.Task[None]] = {}
        self.halt = halt
        """`PLANT_ENV`'s stage for this node (None: never halts)."""

    async def _halt(self, stage: str) -> None:
        if self.halt == stage:
            await asyncio.Event().wait()  # the planted coordinator death: never returns

    def new_id(self) -> TxnId:
        return TxnId(self.node_id, self.rng.getrandbits(64))

    async def _all(self, cmds: dict[int, bytes]) -> dict[int, ApplyResult | errors.KVError]:
        """Propose each group's command at once; every one is awaited. A failure that is no
        KVError is raised after all are done (the first, by group)."""
        groups = sorted(cmds)
        got = await asyncio.gather(*(self.propose(g, cmds[g]) for g in groups), return_exceptions=True)
        out: dict[int, ApplyResult | errors.KVError] = {}
        for g, r in zip(groups, got, strict=True):
            if isinstance(r, (ApplyResult, errors.KVError)):
                out[g] = r
            elif isinstance(r, BaseException):
                raise r
        return out

    async def _release(self, tid: TxnId, groups: list[int]) -> None:
        """Abort the attempt's intents (best effort, never raises but on cancellation: an intent
        left behind has no COMMITTED record, so whoever meets it resolves it to ABORTED)."""
        if not groups:
            return
        try:
            await self._all(logic.abort_commands(tid, groups))
        except Exception:  # best effort: the caller reports its own failure
            log.exception("releasing transaction %s in groups %s", tid, groups)

    async def _prepared_or_released(self, tid: TxnId, groups: list[int], step: Awaitable[_T]) -> _T:
        """Await a step before the commit point; if it fails with anything but a KVError,
        release every participant and answer a definite ProposalDropped (no RECORD was
        proposed: the transaction did not happen)."""
        try:
            return await step
        except errors.KVError:
            raise
        except Exception as err:
            await self._release(tid, groups)
            log.exception("transaction %s failed before its commit point", tid)
            raise errors.ProposalDropped(f"the transaction failed before its commit point and was released "
                                         f"(nothing was written): {err!r}") from err

    async def run(self, t: txn.Txn | None, p: logic.Plan, floor: int = 0, client_id: int = 0, seq: int = 0,
                  ack: int = 0, retry: bool = False, horizon: int = 0) -> ApplyResult:
        """Run `t` over the participants of `p` (None: the range delete `p.lock`) until it
        commits, aborts for good, or the deadline passes (definite `Timeout` then, unless the
        commit point's outcome is unknown)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        delay = 0.005
        last = "no attempt finished"
        start = 0
        while True:
            tid = self.new_id()
            # Every attempt keeps the first one's start: it is the run's age, by which conflicts
            # are decided (`met`: an older run aborts a younger one's intents at once).
            start = start or self.clock.propose(floor)
            try:
                prepares = logic.prepare_commands(p, tid, start, self.clock.propose(floor))
            except ValueError as bad:  # nothing proposed
                raise errors.InvalidArgument(f"the transaction cannot be prepared: {bad}") from None
            got = await self._prepared_or_released(tid, sorted(p.keys), self._all(prepares))
            failed = {g: r for g, r in got.items() if not isinstance(r, ApplyResult)}
            if failed:
                await self._release(tid, sorted(got))
                g, err = next(iter(sorted(failed.items())))
                if isinstance(err, errors.InvalidArgument):
                    raise errors.InvalidArgument(f"group {g}: {err.message}")
                last = f"group {g}: {err.message}"
            else:
                results = {g: r for g, r in got.items() if isinstance(r, ApplyResult)}
                try:
                    decision = (logic.after_prepare(t, p, results) if t is not None
                                else logic.after_prepare_range(p, results))
                except txn.ResultTooLarge as err:
                    await self._release(tid, sorted(got))
                    raise errors.InvalidArgument(str(err)) from None
                if isinstance(decision, logic.Refused):
                    await self._release(tid, sorted(got))
                    if decision.wrong_shard:
                        raise errors.WrongShard(decision.message)
                    if decision.lease_not_found:
                        raise errors.LeaseNotFound(decision.message)
                    raise errors.InvalidArgument(decision.message)
                if isinstance(decision, logic.Conflict):
                    await self._release(tid, [g for g, r in results.items() if r.error is None])
                    last = f"key {decision.key[:32]!r} is locked by transaction {decision.intent.txn}"
                    self.met(decision.group, decision.intent, wounds=start)
                else:
                    done = await self._commit(t, p, tid, start, decision, (client_id, seq, ack, retry, horizon), end)
                    if done is not None:
                        return done
                    last = "a resolver aborted the attempt before its commit point"
            if loop.time() + delay >= end:
                raise errors.Timeout(f"the transaction did not commit in time: {last}", indeterminate=False)
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, 0.2)

    async def _commit(
        self, t: txn.Txn | None, p: logic.Plan, tid: TxnId, start: int, r: logic.Ready,
        session: tuple[int, int, int, bool, int], end: float,
    ) -> ApplyResult | None:
        """From a prepared attempt to its answer (None: aborted by a resolver, retry).

        A client's retry (`retry` with a session: an earlier attempt of the request may have
        committed) always goes through the RECORD, even when this attempt writes nothing: its
        compares now see the earlier attempt's own writes, and only the RECORD's session check
        gives the answer of the attempt that committed (exactly once); when none did, the
        RECORD commits this attempt's answer. A lease's deletion (`p.lease`) always goes
        through the RECORD too, even when it finds no key: its RECORD revokes the lease."""
        groups = sorted(p.keys)
        client_id, seq, ack, retry, horizon = session
        if not r.writes_anything and not p.lease and not (client_id and retry):
            # a read-only answer, or a first attempt that writes nothing: its reads were one
            # snapshot at R, and no earlier attempt of this request can have committed
            await self._release(tid, groups)
            return ApplyResult(revision=r.result.revision, txn=r.result)
        await self._halt("prepare")
        try:  # both built before the commit point: a COMMIT that cannot be built must not follow it
            record = logic.record_command(tid, start, r, client_id, seq, ack, retry, horizon, p.lease, p.renews)
            commit_cmds = logic.commit_commands(tid, r, groups)
        except ValueError as err:
            await self._release(tid, groups)
            raise errors.InvalidArgument(f"the transaction cannot be recorded: {err}") from None
        try:
            outcome = await self._record(tid, p.primary, record, start, end)
        except errors.KVError:
            raise
        except Exception as err:  # the RECORD may have applied: settled by the resolvers, never aborted here
            log.exception("transaction %s: its RECORD failed", tid)
            raise errors.InternalError(f"the transaction's commit point failed: {err!r}", indeterminate=True) from err
        if isinstance(outcome, logic.Aborted):
            await self._release(tid, groups)
            if outcome.expired:
                raise errors.SessionExpired(f"group {p.primary}: {outcome.message}")
            if not outcome.retry:
                raise errors.InvalidArgument(f"group {p.primary} refused the transaction: {outcome.message}")
            return None
        if not outcome.mine:  # this request's session already committed an earlier attempt
            await self._release(tid, groups)
            return ApplyResult(revision=outcome.at, txn=outcome.result)
        self.clock.observe(r.at)
        await self._halt("record")
        answer = ApplyResult(revision=r.result.revision, txn=r.result)
        try:
            commits = await self._all(commit_cmds)
            done = [g for g, x in commits.items() if isinstance(x, ApplyResult) and x.error is None]
            if len(done) == len(commits):
                await self._all({p.primary: logic.finalize_command(tid)})
            else:  # the record keeps only the writes of the participants still holding intents
                for g in done:
                    await self._all({p.primary: logic.finalize_command(tid, g)})
        except Exception:  # committed: the record stays COMMITTED, the resolvers finish its COMMITs
            log.exception("transaction %s committed at %d; finishing its COMMITs failed", tid, r.at)
        return answer

    async def _record(self, tid: TxnId, primary: int, record: bytes, start: int, end: float
                      ) -> logic.Committed | logic.Aborted:
        try:
            return logic.after_record(tid, await self.propose(primary, record))
        except errors.KVError as err:
            if not err.indeterminate:
                return logic.Aborted(err.message)
        # The RECORD may have applied: settle it with a RESOLVE (absent -> ABORTED is written).
        loop = asyncio.get_running_loop()
        intent = Intent(tid, primary, start, 0)
        while loop.time() < end:
            try:
                settled = logic.committed_record(await self.propose(primary, logic.resolve_command(intent)))
            except (errors.KVError, ValueError):
                await asyncio.sleep(0.05)
                continue
            if settled is None:
                return logic.Aborted("the record was settled ABORTED")
            return logic.Committed(settled.at, settled.result, True)
        raise errors.Timeout("the transaction's commit point could not be confirmed in time", indeterminate=True)

    # --- meeting intents ---------------------------------------------------------------------
    def met(self, group: int, intent: Intent, wounds: int = 0) -> None:
        """An intent met in `group`: resolve it in the background if it is older than the
        transaction timeout, or (`wounds`: the start of the transaction that met it) if its
        transaction started after that one (at most one resolution per transaction at a time).

        The second rule is wound-wait (Rosenkrantz, Stearns and Lewis, 1978): an older
        transaction aborts a younger one in its way (RESOLVE in the younger's primary writes
        ABORTED unless its RECORD committed first, and then it is rolled forward), a younger one
        waits for an older one. Without it, runs over the same keys only backed off and retried,
        and enough of them at once (kvchaos bank: five clients creating the same accounts, each
        retry one more run) could all keep failing their PREPAREs for longer than any deadline.
        With it the oldest run still going is never aborted by another, so it commits. Safety
        does not depend on the rule: a resolution is the same whoever asks for it and when."""
        if intent.txn in self._resolving:
            return
        younger = 0 < wounds < intent.start
        if not younger and not logic.expired(intent, self.now_ms(), self.txn_timeout_ms):
            return
        task = asyncio.get_running_loop().create_task(self._resolve(group, intent))
        self._resolving[intent.txn] = task
        task.add_done_callback(lambda _t: self._resolving.pop(intent.txn, None))

    async def _resolve(self, group: int, intent: Intent) -> None:
        try:
            res = await self.propose(intent.primary, logic.resolve_command(intent))
            follow = logic.resolution(intent, group, res)
            if follow is not None and (await self.propose(group, follow)).error is None:
                done = logic.finalize_after(intent, group, follow)
                if done is not None:  # the record forgets this participant's writes
                    await self.propose(intent.primary, done)
        except errors.KVError:
            pass  # the next request that meets the intent tries again

    def finish(self, primary: int, tid: TxnId, rec: Record) -> None:
        """A COMMITTED record its coordinator did not FINALIZE in time (it died between its
        RECORD and its FINALIZE): send every participant's COMMIT again and then FINALIZE it, in
        the background (at most one at a time per transaction)."""
        if tid in self._resolving:
            return
        task = asyncio.get_running_loop().create_task(self._finish(primary, tid, rec))
        self._resolving[tid] = task
        task.add_done_callback(lambda _t: self._resolving.pop(tid, None))

    async def _finish(self, primary: int, tid: TxnId, rec: Record) -> None:
        try:
            got = await self._all(logic.finish_commands(tid, rec))
            if all(isinstance(r, ApplyResult) for r in got.values()):  # every participant applied it
                await self.propose(primary, logic.finalize_command(tid))
        except errors.KVError:
            pass  # the next round tries again

    async def sweep(self, led: Callable[[], list[int]], intents: Callable[[int], list[tuple[bytes, bytes]]],
                    interval: float = 1.0,
                    records: Callable[[int, int], list[tuple[TxnId, Record]]] | None = None) -> None:
        """Forever: resolve the expired intents of the groups this node leads (`led`), so an
        intent nobody meets (a dead coordinator's, on a key nobody touches) does not hold back
        the groups' watch frontier and compaction for ever. At most `SWEEP_BATCH` per group and
        round; each resolution is the same as a request's that meets the intent. With `records`
        (group, before -> `xtxn_apply.unfinished` of the group, at most `RECORD_SWEEP_BATCH`),
        it also finishes the COMMITTED records of those groups whose coordinator did not
        FINALIZE them within the transaction timeout (`finish`), so they are forgotten by age."""
        while True:
            await asyncio.sleep(interval)
            if records is not None:
                before = logic.sweep_before(self.now_ms(), self.txn_timeout_ms)
                for g in led():
                    try:
                        stale = records(g, before)
                    except (StorageError, mvcc.RevisionError) as err:
                        log.warning("record sweep of group %d: %s", g, err)
                        continue
                    for tid, rec in stale:
                        self.finish(g, tid, rec)
            for g in led():
                try:
                    rows = intents(g)
                except StorageError as err:  # a group going away, a damaged read: next round
                    log.warning("intent sweep of group %d: %s", g, err)
                    continue
                for _key, raw in rows:
                    try:
                        self.met(g, Intent.decode(raw))
                    except ValueError:
                        log.warning("intent sweep of group %d: a corrupt intent row", g)

    def locked_error(self, group: int, result: ApplyResult) -> errors.KVError | None:
        """For a write refused because a key holds an intent: the definite, retryable error the
        client gets (after starting the intent's resolution if it is old); None otherwise."""
        lock = logic.lock_of(result)
        if lock is None:
            return None
        key, intent = lock
        self.met(group, intent)
        return errors.ProposalDropped(
            f"key {key[:32]!r} is locked by transaction {intent.txn} in progress (group {group}); retry"
        )
