"""The transaction workloads: ``bank`` (multi-key transactions across groups) and ``lock``
(the Mutex recipe with fencing tokens).

``bank``: ``accounts`` keys ``acct/<i>`` (hashed whole, so with ``--groups`` >= 2 they land in
several groups; the final phase records each account's group). The first worker creates them all
in one transaction (``create(acct/i) = 0`` for every i, else nothing). A transfer reads its two
accounts (one read-only transaction: a ``get`` of each, at one revision), then commits a
transaction ``mod(src) = r1 and mod(dst) = r2 -> put src, put dst``: it applies only if neither
account changed since the read, so no transfer is lost or applied on a stale balance. A read is
one linearizable scan of ``acct/`` (across groups one consistent snapshot, docs/REVISIONS.md).
Records: ``transfer`` (value ``[src, dst, amount, new src balance, new dst balance]``; output:
the transaction succeeded) and
``balances`` (output ``{key: balance}``); neither goes through the per-key linearizability
checker, the bank check (:func:`check_bank`) judges them.

``lock``: each worker loops: open a session (a lease of ``lock_ttl`` seconds), acquire the mutex
``lock/m`` (bounded wait), then write the protected resource twice with the fencing token. The
resource is key ``fence/token``: a write is the transaction ``value(fence/token) > mine ->
(rejected) else put fence/token = mine, put fence/last = writer`` (tokens are zero-padded, so
bytes order is number order; a missing key makes the compare false: accepted). With probability
``lock_pause`` the holder *pauses* between its writes like a stopped process: its session stops
renewing and it waits past its lease's TTL, so another worker may take the lock and the paused
holder's second write must be refused. Records: ``acquire`` (output: the token), ``fenced``
(value: the token; output ``[accepted, revision]``) and ``release``. :func:`check_lock`: accepted
writes ordered by revision have non-decreasing tokens (no stale holder accepted after a newer
one), no two acquisitions got the same token, and the final resource holds the highest accepted
token (or a higher indeterminate one).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from kvstore.client import AsyncClient
from kvstore.client.concurrency import Mutex, Session
from kvstore.client.types import Compare, Op
from kvstore.errors import Timeout

from .workload import OpRecord, Recorder, Workload, WorkloadOptions

__all__ = ["BankTxnWorkload", "LockWorkload", "check_bank", "check_lock", "parse_balance", "parse_token"]

ACCT = "acct/"
FINAL_P = 10_000_000


def account(i: int) -> bytes:
    return f"{ACCT}{i:03d}".encode()


def parse_balance(value: bytes | str) -> int:
    """A balance as stored (a decimal integer); ValueError on anything else."""
    if not isinstance(value, (bytes, str)):
        raise ValueError(f"not a balance: {str(value)[:40]!r}")
    s = value.decode(errors="replace") if isinstance(value, bytes) else value
    if not s or len(s) > 20 or not (s.isdigit() or (s[0] == "-" and s[1:].isdigit())):
        raise ValueError(f"not a balance: {s[:40]!r}")
    return int(s)


class BankTxnWorkload(Workload):
    name = "bank"

    def __init__(self, opts: WorkloadOptions, rec: Recorder) -> None:
        super().__init__(opts, rec)
        if opts.accounts < 2:
            raise ValueError("the bank workload needs at least 2 accounts")
        self.created = False
        self.final_read: OpRecord | None = None
        self.groups: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self.opts.balance * self.opts.accounts

    async def _create(self, cl: AsyncClient, p: int) -> bool:
        keys = [account(i) for i in range(self.opts.accounts)]

        async def create() -> bool:
            r = await cl.txn([Compare.create(k, "=", 0) for k in keys],
                             [Op.put(k, str(self.opts.balance).encode()) for k in keys])
            return r.succeeded

        rec = await self.rec.call(p, "create", ACCT, self.opts.accounts, create, is_write=True, workload=self.name)
        if rec.status == "ok":
            self.created = True
        elif rec.status == "fail":
            await asyncio.sleep(0.3)  # e.g. a new cluster not yet at the transactions' feature level
        return rec.status == "info"

    async def read_balances(self, cl: AsyncClient, p: int, *, final: bool = False) -> OpRecord:
        async def scan() -> dict[str, str]:
            out: dict[str, str] = {}
            async for k, v in cl.scan(ACCT.encode(), timeout=self.opts.op_timeout * 2):
                out[k.decode()] = v.decode(errors="replace")
            return out

        return await self.rec.call(p, "balances", ACCT, None, scan, is_write=False, workload=self.name, final=final)

    async def step(self, cl: AsyncClient, p: int, w: int) -> bool:
        if not self.created:
            return await self._create(cl, p)
        if self.rng.random() < 0.25:
            await self.read_balances(cl, p)
            return False
        src, dst = self.rng.sample(range(self.opts.accounts), 2)
        ks, kd = account(src), account(dst)
        try:
            r = await cl.txn([], [Op.get(ks), Op.get(kd)])
        except Exception:  # a failed read: nothing happened, nothing to record but the attempt
            return False
        kvs = [o.kv for o in r.responses]
        if any(kv is None for kv in kvs):
            return False
        assert kvs[0] is not None and kvs[1] is not None
        try:
            bs, bd = parse_balance(kvs[0].value), parse_balance(kvs[1].value)
        except ValueError:
            return False  # the balances reads report it
        amount = self.rng.randint(1, 10)
        if bs < amount:
            return False
        rs, rd = kvs[0].mod_revision, kvs[1].mod_revision

        async def transfer() -> bool:
            t = await cl.txn([Compare.mod(ks, "=", rs), Compare.mod(kd, "=", rd)],
                             [Op.put(ks, str(bs - amount).encode()), Op.put(kd, str(bd + amount).encode())])
            return t.succeeded

        rec = await self.rec.call(p, "transfer", ACCT, [src, dst, amount, bs - amount, bd + amount], transfer, is_write=True, workload=self.name)
        return rec.status == "info"

    async def final(self, deadline: float) -> None:
        cl = self.client(self.opts.seed * 1000 + 999)
        try:
            while time.monotonic() < deadline:
                rec = await self.read_balances(cl, FINAL_P, final=True)
                if rec.status == "ok":
                    self.final_read = rec
                    break
                await asyncio.sleep(0.2)
            self.groups = {account(i).decode(): cl.router.group_for_key(account(i))
                           for i in range(self.opts.accounts)}
        finally:
            await cl.close()

    def keys_used(self) -> list[str]:
        return []


def _written(records: Sequence[OpRecord], initial: int | None, *, applied: bool = True) -> dict[str, set[int]]:
    """Per account, every balance some transfer that may have applied (ok and succeeded, or
    indeterminate) wrote, and the initial balance; with ``applied=False`` instead the balances
    of transfers the client was told did not apply (refused by their compares, or failed)."""
    out: dict[str, set[int]] = {}
    for r in records:
        maybe = r.status == "info" or (r.status == "ok" and r.output is True)
        if r.f != "transfer" or r.status == "invoke" or maybe is not applied:
            continue
        v = r.value
        if not (isinstance(v, list) and len(v) == 5 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            continue  # malformed: contributes nothing, so reads of what it wrote are flagged
        src, dst, _amount, new_src, new_dst = v
        out.setdefault(account(src).decode(), set()).add(new_src)
        out.setdefault(account(dst).decode(), set()).add(new_dst)
    if initial is not None and applied:
        for vals in out.values():
            vals.add(initial)
    return out


def check_bank(records: Sequence[OpRecord], total: int | None, accounts: int | None) -> dict[str, Any]:
    """Every successful balances read (once the accounts exist) shows all accounts, the constant
    total, no negative balance, and per account only the initial balance or a balance some
    transfer that may have applied wrote (nothing out of thin air); a final read after heal is
    required. Indeterminate transfers need no special case for the total: a transfer moves money
    between two accounts atomically, so applied or not the total holds; what must never be seen
    is half of one. (Full serializability, ordering every read against the transfers, is not
    searched: the total and the written-values check are what it implies per read.)"""
    reads = [r for r in records if r.f == "balances" and r.status == "ok" and isinstance(r.output, dict)]
    initial = total // accounts if total is not None and accounts else None
    written = _written(records, initial)
    denied = _written(records, None, applied=False)
    bad: list[dict[str, Any]] = []
    totals: dict[int, int] = {}
    empty = 0
    for r in reads:
        out = r.output
        assert isinstance(out, dict)
        if not out:
            empty += 1
            if r.final:
                bad.append({"op": f"final balances at {r.invoke:.3f}", "why": "no account exists"})
            continue
        try:
            bal = {k: parse_balance(v) for k, v in out.items()}
        except ValueError as e:
            bad.append({"op": f"balances at {r.invoke:.3f}", "why": f"malformed: {e}"})
            continue
        s = sum(bal.values())
        totals[s] = totals.get(s, 0) + 1
        if accounts is not None and len(bal) != accounts:
            bad.append({"op": f"balances at {r.invoke:.3f}", "why": f"{len(bal)} accounts, expected {accounts}"})
        elif total is not None and s != total:
            bad.append({"op": f"balances at {r.invoke:.3f}", "value": bal, "why": f"total {s} != {total}"})
        elif min(bal.values()) < 0:
            bad.append({"op": f"balances at {r.invoke:.3f}", "value": bal, "why": "negative balance"})
        else:
            thin = sorted(k for k, b in bal.items() if b != initial and b not in written.get(k, ()))
            if thin:
                lied = [k for k in thin if bal[k] in denied.get(k, ())]
                why = f"balance of {', '.join(thin)} written by no transfer that may have applied"
                if lied:
                    why += f" ({', '.join(lied)}: the value of a transfer reported refused or failed)"
                bad.append({"op": f"balances at {r.invoke:.3f}", "value": bal, "why": why})
    transfers = [r for r in records if r.f == "transfer"]
    finals = [r for r in reads if r.final]
    return {
        "reads": len(reads), "empty_reads": empty, "totals": {str(k): v for k, v in sorted(totals.items())},
        "bad_reads": bad[:50], "bad_count": len(bad),
        "transfers_ok": sum(1 for r in transfers if r.status == "ok" and r.output),
        "transfers_refused": sum(1 for r in transfers if r.status == "ok" and not r.output),
        "transfers_info": sum(1 for r in transfers if r.status == "info"),
        "transfers_fail": sum(1 for r in transfers if r.status == "fail"),
        "final_read": bool(finals),
        "valid": False if bad else (True if finals else None),
    }


# ----- lock -----------------------------------------------------------------------------------

LOCK_NAME = b"lock/m"
RESOURCE = b"fence/token"
LAST = b"fence/last"


def token_bytes(token: int) -> bytes:
    return f"{token:020d}".encode()


class LockWorkload(Workload):
    name = "lock"

    def __init__(self, opts: WorkloadOptions, rec: Recorder) -> None:
        super().__init__(opts, rec)
        self.final_read: OpRecord | None = None

    async def fenced_write(self, cl: AsyncClient, p: int, token: int, n: int) -> OpRecord:
        meta: dict[str, int] = {}

        async def write() -> list[Any]:
            r = await cl.txn([Compare.value(RESOURCE, ">", token_bytes(token))], [],
                             [Op.put(RESOURCE, token_bytes(token)), Op.put(LAST, f"{p}:{token}:{n}".encode())])
            meta["rev"] = r.revision
            return [not r.succeeded, r.revision]

        return await self.rec.call(p, "fenced", RESOURCE.decode(), token, write, is_write=True, workload=self.name)

    async def step(self, cl: AsyncClient, p: int, w: int) -> bool:
        ttl = max(1, round(self.opts.lock_ttl))
        try:
            session = Session(cl, ttl=ttl)
            await asyncio.wait_for(session.__aenter__(), self.opts.op_timeout * 2)
        except Exception:
            return False  # no lease: nothing held, nothing written
        info = False
        try:
            mutex = Mutex(session, LOCK_NAME)

            async def acquire() -> int:
                try:
                    held = await asyncio.wait_for(mutex.acquire(f"{p}".encode()), self.opts.lock_wait)
                except TimeoutError:
                    raise Timeout(f"the lock was not acquired within {self.opts.lock_wait:g} s",
                                  indeterminate=False) from None
                return held.fence

            # is_write=False: acquiring only matters through the token the resource sees
            a = await self.rec.call(p, "acquire", LOCK_NAME.decode(), None, acquire, is_write=False, workload=self.name)
            if a.status != "ok":
                return False
            token = parse_token(a.output)
            r1 = await self.fenced_write(cl, p, token, 1)
            info = r1.status == "info"
            if self.rng.random() < self.opts.lock_pause:
                # a stopped holder: no renewals, and it wakes up after its lease has expired
                if session._task is not None:
                    session._task.cancel()
                await asyncio.sleep(ttl + 1.5)
            r2 = await self.fenced_write(cl, p, token, 2)
            info = info or r2.status == "info"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(mutex.release(), self.opts.op_timeout)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.__aexit__(None, None, None), self.opts.op_timeout)
        return info

    async def final(self, deadline: float) -> None:
        cl = self.client(self.opts.seed * 1000 + 999)

        async def read() -> str | None:
            v = await cl.get(RESOURCE)
            return None if v is None else v.decode(errors="replace")

        try:
            while time.monotonic() < deadline:
                rec = await self.rec.call(FINAL_P, "resource", RESOURCE.decode(), None, read, is_write=False,
                                          workload=self.name, final=True)
                if rec.status == "ok":
                    self.final_read = rec
                    return
                await asyncio.sleep(0.2)
        finally:
            await cl.close()


def parse_token(value: object) -> int:
    """A fencing token as recorded (an int, or its decimal / zero-padded text); ValueError on
    anything else (the history is read back from disk and may be damaged)."""
    if isinstance(value, bool):
        raise ValueError(f"not a token: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative token: {value}")
        return value
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"not a token: {str(value)[:40]!r}")


def _accepted(r: OpRecord) -> tuple[bool, int] | None:
    """(accepted, revision) of a completed fenced write; None if the record is malformed."""
    out = r.output
    if (isinstance(out, list) and len(out) == 2 and isinstance(out[0], bool)
            and isinstance(out[1], int) and not isinstance(out[1], bool)):
        return out[0], out[1]
    return None


def check_lock(records: Sequence[OpRecord]) -> dict[str, Any]:
    """Fencing holds: accepted writes, in revision order, carry non-decreasing tokens (a holder
    whose lock was taken over is never accepted after the newer holder; with unique tokens this
    also means no two holders' accepted writes interleave); no two acquisitions got one token; the
    resource finally holds the highest accepted token, or a higher one whose write was
    indeterminate. A malformed record is a violation, never a crash."""
    bad: list[str] = []
    seen: dict[int, int] = {}
    acquired = 0
    for r in records:
        if r.f != "acquire" or r.status != "ok":
            continue
        try:
            t = parse_token(r.output)
        except ValueError as e:
            bad.append(f"acquire by process {r.process}: {e}")
            continue
        acquired += 1
        if t in seen:
            bad.append(f"token {t} given to processes {seen[t]} and {r.process}")
        seen[t] = r.process
    writes = [r for r in records if r.f == "fenced"]
    accepted: list[tuple[int, int, OpRecord]] = []
    refused = 0
    maybe: set[int] = set()
    for r in writes:
        try:
            tok = parse_token(r.value)
        except ValueError as e:
            bad.append(f"fenced write by process {r.process}: {e}")
            continue
        if r.status == "info":
            maybe.add(tok)
        if r.status != "ok":
            continue
        res = _accepted(r)
        if res is None:
            bad.append(f"fenced write by process {r.process}: malformed output {str(r.output)[:40]!r}")
        elif res[0]:
            accepted.append((res[1], tok, r))
        else:
            refused += 1
    accepted.sort(key=lambda t: t[0])
    high = 0
    for rev, tok, r in accepted:
        if tok < high:
            bad.append(f"write with token {tok} by process {r.process} accepted at revision {rev} "
                       f"after token {high} (a stale holder)")
        high = max(high, tok)
    finals = [r for r in records if r.f == "resource" and r.final and r.status == "ok"]
    final_token: int | None = None
    if finals:
        v = finals[-1].output
        try:
            final_token = 0 if v is None else parse_token(v)
        except ValueError as e:
            bad.append(f"final resource value: {e}")
        if final_token is not None and final_token != high and not (final_token > high and final_token in maybe):
            bad.append(f"final resource token {final_token}, highest accepted {high}")
    return {
        "acquired": acquired, "writes": len(writes), "accepted": len(accepted), "refused": refused,
        "indeterminate": len([r for r in writes if r.status == "info"]),
        "highest_token": high, "final_token": final_token,
        "violations": bad[:50], "violation_count": len(bad),
        "valid": False if bad else (True if finals else None),
    }
