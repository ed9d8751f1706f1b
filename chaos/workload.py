"""Workloads: concurrent clients generating histories (invoke / ok / fail / info).

Each worker is a Jepsen-style *process*: it runs one operation at a time through the project's
client library (:class:`kvstore.client.AsyncClient`, with a deadline per operation) and records
it as an :class:`OpRecord`: invocation and completion times on the run's monotonic clock, the
outcome (``ok``; ``fail`` when the operation definitely did not happen; ``info`` when it may
have, i.e. the client's error was ``indeterminate``) and the client's error text. After an
``info`` the worker continues as a new process (the old one may still be "running" forever).

Workloads:

* ``register``: get / put / cas on a few keys with unique values; each key takes at most
  ``ops_per_key`` operations, then a fresh key replaces it (keeps the checker's search small).
  With ``deletes`` (the watch workload, ``--watchers``) that share of its operations deletes the
  key instead, so that watchers see DELETEs.
* ``set``: every operation adds a new element (a put of a unique key under ``s/``); at the end
  one linearizable scan must return every acknowledged element.
* ``bank1``: one key per bank holds all the balances; a transfer reads the bank and cas-es it to
  the new balances. Every read must show the same total and no negative balance. (``bank`` and
  ``lock``, the multi-key transaction workloads, are in :mod:`chaos.txnworkloads`.)

* ``replicas``: ``register`` with every get read through the read replicas (learners) at the
  run's read consistency: half routed by the client library (read preference, ``replica`` unless
  the run says otherwise, with its load balancing and fallbacks), half pinned to one replica (one
  attempt, no fallback), so that a replica's own answers and refusals are in the history. Each
  read records the node that served it and its staleness bound; at ``linearizable`` the history
  must stay linearizable under partitions, at ``stale`` it is expected not to be (the checker
  must see the stale reads), and either way every read must be honest about its staleness.

All of them record their operations as get / put / cas (/ delete) on keys, so every workload's
history is also checked for linearizability, key by key. A write that took effect records the
revision its reply carried (``OpRecord.revision``: what the watch checks compare events with).

``stale_reads`` is a planted bug for testing the harness: gets are served by a random node's
local state (``consistency=SERIALIZABLE``), which is not linearizable under partitions.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import grpc.aio

from chaos.checker import Operation, Status
from kvstore.client import AsyncClient
from kvstore.errors import KVError, from_proto
from kvstore.v1 import kv_pb2, kv_pb2_grpc

__all__ = [
    "WORKLOADS",
    "OpRecord",
    "Recorder",
    "WorkloadOptions",
    "make_workload",
    "to_operations",
]


@dataclass
class OpRecord:
    """One client operation, as the client saw it."""

    process: int
    f: str  # get / put / cas / scan
    key: str
    value: Any = None  # put: value; cas: [expected, new]; scan: prefix
    output: Any = None  # get: value read; cas: swapped; scan: {key: value}
    invoke: float = 0.0
    complete: float | None = None
    status: str = "invoke"  # ok / fail / info (invoke while running)
    error: str | None = None
    workload: str = ""
    final: bool = False  # a read of the final phase, after heal
    node: str | None = None  # endpoint that served a pinned (stale) read
    consistency: str | None = None  # reads below linearizable: stale / bounded
    staleness: float | None = None  # the staleness bound the serving node reported (seconds)
    revision: int | None = None  # a write that took effect: its revision (the client's reply)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None and v is not False}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpRecord:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)


class Recorder:
    """Collects operations; times are seconds on the monotonic clock since ``t0``."""

    def __init__(self, t0: float | None = None) -> None:
        self.t0 = time.monotonic() if t0 is None else t0
        self.ops: list[OpRecord] = []
        self.counts = {"ok": 0, "fail": 0, "info": 0}

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def call(
        self,
        process: int,
        f: str,
        key: str,
        value: Any,
        fn: Callable[[], Awaitable[Any]],
        *,
        is_write: bool,
        workload: str,
        final: bool = False,
        node: str | None = None,
    ) -> OpRecord:
        rec = OpRecord(process, f, key, value, invoke=self.now(), workload=workload, final=final, node=node)
        self.ops.append(rec)
        try:
            out = await fn()
        except KVError as err:
            rec.status = "info" if (is_write and err.indeterminate) else "fail"
            rec.error = f"{type(err).__name__}: {err}"
        except Exception as err:  # anything else (gRPC, OS, a bug in the client): may have happened
            rec.status = "info" if is_write else "fail"
            rec.error = f"{type(err).__name__}: {err}"
        else:
            rec.status = "ok"
            rec.output = out
        rec.complete = self.now()
        self.counts[rec.status] += 1
        return rec


@dataclass
class WorkloadOptions:
    concurrency: int = 5
    keys: int = 3  # register: keys in use at once; bank: banks in use at once
    ops_per_key: int = 120
    rate: float = 150.0  # operations per second, all workers together (0 = as fast as possible)
    op_timeout: float = 2.0
    attempt_timeout: float = 0.6
    max_ops: int = 200_000
    accounts: int = 5
    balance: int = 100
    stale_reads: bool = False
    seed: int = 0
    endpoints: list[str] = field(default_factory=list)
    replica_endpoints: list[str] = field(default_factory=list)  # the learners (read replicas)
    read_from: str = ""  # read preference of gets ("": the workload's default)
    read_consistency: str = "linearizable"
    max_staleness: float = 0.5
    pinned_reads: float = 0.5  # replicas workload: fraction of gets pinned to one replica
    certs_dir: str = ""  # TLS: a certs dir with ca.crt and client.<user>.crt/.key ("": plaintext)
    user: str = "root"  # TLS: whose client certificate the clients present
    deletes: float = 0.0  # register: share of operations that delete the key (the watch workload's DELETEs)
    lock_ttl: float = 2.0  # lock: the session's lease TTL (whole seconds)
    lock_wait: float = 4.0  # lock: how long a worker waits for the mutex before giving up (fail)
    lock_pause: float = 0.2  # lock: share of holders that stop (no renewals) past their TTL between writes


class _KeyRing:
    """``slots`` keys in use; a key is retired after ``limit`` operations and replaced."""

    def __init__(self, prefix: str, slots: int, limit: int) -> None:
        self.prefix = prefix
        self.limit = limit
        self.next_gen = 0
        self.slots: list[tuple[str, int]] = []
        self.used: list[str] = []
        for _ in range(slots):
            self.slots.append((self._new(), 0))

    def _new(self) -> str:
        k = f"{self.prefix}{self.next_gen}"
        self.next_gen += 1
        self.used.append(k)
        return k

    def pick(self, rng: random.Random) -> str:
        i = rng.randrange(len(self.slots))
        key, n = self.slots[i]
        if n >= self.limit:
            key, n = self._new(), 0
        self.slots[i] = (key, n + 1)
        return key


class Workload:
    name = "base"

    def __init__(self, opts: WorkloadOptions, rec: Recorder) -> None:
        self.opts = opts
        self.rec = rec
        self.rng = random.Random(opts.seed)
        self._stale_channels: dict[str, grpc.aio.Channel] = {}
        self.started = 0

    # ----- plumbing -----

    def client(self, seed: int) -> AsyncClient:
        return AsyncClient(
            self.opts.endpoints, timeout=self.opts.op_timeout, attempt_timeout=self.opts.attempt_timeout,
            seed=seed, backoff_cap=0.3, breaker_cooldown=0.5,
            certs_dir=self.opts.certs_dir or None, user=self.opts.user,
        )

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        """A raw channel to one node (the planted stale reads, the pinned replica reads): mutual
        TLS with the workload's client certificate on a TLS run, like the clients."""
        ch = self._stale_channels.get(endpoint)
        if ch is None:
            if self.opts.certs_dir:
                from kvstore.security.tls import client_credentials

                creds = client_credentials(self.opts.certs_dir, self.opts.user)
                ch = grpc.aio.secure_channel(endpoint, creds, options=[("grpc.enable_http_proxy", 0)])
            else:
                ch = grpc.aio.insecure_channel(endpoint, options=[("grpc.enable_http_proxy", 0)])
            self._stale_channels[endpoint] = ch
        return ch

    async def close(self) -> None:
        chans = list(self._stale_channels.values())
        self._stale_channels.clear()
        for ch in chans:
            await ch.close()

    async def _stale_get(self, endpoint: str, key: bytes) -> bytes | None:
        """PLANTED BUG: a read from one node's local state (serializable), wherever it is."""
        ch = self._channel(endpoint)
        resp = await kv_pb2_grpc.KVStub(ch).Get(
            kv_pb2.GetRequest(key=key, consistency=kv_pb2.SERIALIZABLE), timeout=self.opts.attempt_timeout
        )
        err = from_proto(resp.error, is_write=False)
        if err is not None:
            raise err
        return resp.value if resp.found else None

    async def get(self, cl: AsyncClient, p: int, key: str, *, final: bool = False) -> OpRecord:
        if self.opts.stale_reads and not final:
            ep = self.rng.choice(self.opts.endpoints)

            async def stale() -> str | None:
                v = await self._stale_get(ep, key.encode())
                return None if v is None else v.decode()

            return await self.rec.call(p, "get", key, None, stale, is_write=False, workload=self.name, node=ep)

        async def read() -> str | None:
            v = await cl.get(key.encode())
            return None if v is None else v.decode()

        return await self.rec.call(p, "get", key, None, read, is_write=False, workload=self.name, final=final)

    async def put(self, cl: AsyncClient, p: int, key: str, value: str) -> OpRecord:
        revision = 0

        async def write() -> None:
            nonlocal revision
            revision = await cl.put(key.encode(), value.encode())

        rec = await self.rec.call(p, "put", key, value, write, is_write=True, workload=self.name)
        if rec.status == "ok":
            rec.revision = revision
        return rec

    async def cas(self, cl: AsyncClient, p: int, key: str, expected: str | None, new: str) -> OpRecord:
        async def swap() -> bool:
            return await cl.cas(key.encode(), None if expected is None else expected.encode(), new.encode())

        rec = await self.rec.call(p, "cas", key, [expected, new], swap, is_write=True, workload=self.name)
        if rec.status == "ok" and rec.output:
            rec.revision = cl.revision  # a worker's client runs one call at a time: its reply's revision
        return rec

    async def delete(self, cl: AsyncClient, p: int, key: str) -> OpRecord:
        async def remove() -> bool:
            return await cl.delete(key.encode())

        rec = await self.rec.call(p, "delete", key, None, remove, is_write=True, workload=self.name)
        if rec.status == "ok" and rec.output:
            rec.revision = cl.revision
        return rec

    # ----- the loop -----

    async def run(self, stop: asyncio.Event) -> None:
        """Run ``concurrency`` workers until ``stop`` is set or ``max_ops`` were started."""
        await asyncio.gather(*(self._worker(w, stop) for w in range(self.opts.concurrency)))

    async def _worker(self, w: int, stop: asyncio.Event) -> None:
        cl = self.client(self.opts.seed * 1000 + w)
        process = w
        interval = self.opts.concurrency / self.opts.rate if self.opts.rate > 0 else 0.0
        next_at = time.monotonic() + self.rng.random() * interval
        try:
            while not stop.is_set() and self.started < self.opts.max_ops:
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        with_stop = asyncio.ensure_future(stop.wait())
                        await asyncio.wait([with_stop], timeout=delay)
                        with_stop.cancel()
                        if stop.is_set():
                            break
                    next_at = max(next_at + interval, time.monotonic() - interval)
                self.started += 1
                crashed = await self.step(cl, process, w)
                if crashed:
                    process += self.opts.concurrency
        finally:
            await cl.close()

    async def step(self, cl: AsyncClient, p: int, w: int) -> bool:
        """One operation (or a few); True if one ended ``info`` (the process must change)."""
        raise NotImplementedError

    async def final(self, deadline: float) -> None:
        """Final reads after heal: retried until they succeed or ``deadline`` (monotonic)."""

    async def _final_get(self, cl: AsyncClient, key: str, deadline: float) -> OpRecord | None:
        p = 10_000_000
        while time.monotonic() < deadline:
            rec = await self.get(cl, p, key, final=True)
            if rec.status == "ok":
                return rec
            await asyncio.sleep(0.2)
        return None

    def keys_used(self) -> list[str]:
        return []


class RegisterWorkload(Workload):
    name = "register"

    def __init__(self, opts: WorkloadOptions, rec: Recorder) -> None:
        super().__init__(opts, rec)
        self.ring = _KeyRing("r/", opts.keys, opts.ops_per_key)
        self.seen: dict[tuple[int, str], str | None] = {}  # (worker, key) -> last value known
        self.counter = 0

    def _unique(self, p: int) -> str:
        self.counter += 1
        return f"{p}-{self.counter}"

    async def step(self, cl: AsyncClient, p: int, w: int) -> bool:
        key = self.ring.pick(self.rng)
        r = self.rng.random()
        if self.opts.deletes and self.rng.random() < self.opts.deletes:
            rec = await self.delete(cl, p, key)
            if rec.status == "ok":
                self.seen[(w, key)] = None
        elif r < 0.4:
            rec = await self.get(cl, p, key)
            if rec.status == "ok":
                self.seen[(w, key)] = rec.output
        elif r < 0.7:
            v = self._unique(p)
            rec = await self.put(cl, p, key, v)
            if rec.status == "ok":
                self.seen[(w, key)] = v
        else:
            exp = self.seen.get((w, key))
            v = self._unique(p)
            rec = await self.cas(cl, p, key, exp, v)
            if rec.status == "ok" and rec.output:
                self.seen[(w, key)] = v
        return rec.status == "info"

    def keys_used(self) -> list[str]:
        return list(self.ring.used)

    async def final(self, deadline: float) -> None:
        cl = self.client(self.opts.seed * 1000 + 999)
        try:
            for key in self.keys_used():
                await self._final_get(cl, key, deadline)
        finally:
            await cl.close()


class SetWorkload(Workload):
    name = "set"

    def __init__(self, opts: WorkloadOptions, rec: Recorder) -> None:
        super().__init__(opts, rec)
        self.counter = 0
        self.final_scan: OpRecord | None = None

    async def step(self, cl: AsyncClient, p: int, w: int) -> bool:
        self.counter += 1
        e = f"{p}-{self.counter:06d}"
        rec = await self.put(cl, p, f"s/{e}", e)
        return rec.status == "info"

    async def final(self, deadline: float) -> None:
        cl = self.client(self.opts.seed * 1000 + 999)

        async def scan() -> dict[str, str]:
            out: dict[str, str] = {}
            async for k, v in cl.scan(b"s/", timeout=self.opts.op_timeout * 2):
                out[k.decode()] = v.decode()
            return out

        try:
            while time.monotonic() < deadline:
                rec = await self.rec.call(10_000_000, "scan", "s/", "s/", scan, is_write=False,
                                          workload=self.name, final=True)
                if rec.status == "ok":
                    self.final_scan = rec
                    return
                await asyncio.sleep(0.2)
        finally:
            await cl.close()


def bank_value(tag: str, balances: list[int]) -> str:
    return tag + "|" + ",".join(str(b) for b in balances)


def parse_bank(value: str) -> list[int] | None:
    try:
        _tag, _, rest = value.partition("|")
        return [int(x) for x in rest.split(",")]
    except ValueError:
        return None


class BankWorkload(Workload):
    name = "bank1"

    def __init__(self, opts: WorkloadOptions, rec: Recorder) -> None:
        super().__init__(opts, rec)
        self.ring = _KeyRing("b/", opts.keys, opts.ops_per_key)
        self.counter = 0

    @property
    def initial(self) -> str:
        return bank_value("init", [self.opts.balance] * self.opts.accounts)

    @property
    def total(self) -> int:
        return self.opts.balance * self.opts.accounts

    async def step(self, cl: AsyncClient, p: int, w: int) -> bool:
        key = self.ring.pick(self.rng)
        rec = await self.get(cl, p, key)
        if rec.status != "ok" or self.rng.random() < 0.3:
            return False  # a read (fail: definitely no effect)
        current = rec.output
        if current is None:
            rec = await self.cas(cl, p, key, None, self.initial)
            return rec.status == "info"
        balances = parse_bank(current)
        if balances is None or len(balances) != self.opts.accounts:
            return False  # the checker reports it
        src, dst = self.rng.sample(range(self.opts.accounts), 2)
        amount = self.rng.randint(0, min(balances[src], 10))
        new = list(balances)
        new[src] -= amount
        new[dst] += amount
        self.counter += 1
        rec = await self.cas(cl, p, key, current, bank_value(f"{p}-{self.counter}", new))
        return rec.status == "info"

    def keys_used(self) -> list[str]:
        return list(self.ring.used)

    async def final(self, deadline: float) -> None:
        cl = self.client(self.opts.seed * 1000 + 999)
        try:
            for key in self.keys_used():
                await self._final_get(cl, key, deadline)
        finally:
            await cl.close()


class ReplicasWorkload(RegisterWorkload):
    """``register`` with its gets read through the read replicas (see the module doc)."""

    name = "replicas"

    async def _pinned_get(self, endpoint: str, key: bytes, meta: dict[str, Any]) -> bytes | None:
        """One attempt at one replica, at the run's consistency: its own answer or refusal."""
        ch = self._channel(endpoint)
        level = self.opts.read_consistency
        cons = {"linearizable": kv_pb2.LINEARIZABLE, "bounded": kv_pb2.BOUNDED, "stale": kv_pb2.STALE}[level]
        ms = round(self.opts.max_staleness * 1000) if level == "bounded" else 0
        resp = await kv_pb2_grpc.KVStub(ch).Get(
            kv_pb2.GetRequest(key=key, consistency=cons, max_staleness_ms=ms), timeout=self.opts.attempt_timeout
        )
        err = from_proto(resp.error, is_write=False)
        if err is not None:
            raise err
        meta["staleness"] = None if level != "linearizable" and resp.staleness_ms < 0 else resp.staleness_ms / 1000
        return resp.value if resp.found else None

    async def get(self, cl: AsyncClient, p: int, key: str, *, final: bool = False) -> OpRecord:
        if final or self.opts.stale_reads:
            return await super().get(cl, p, key, final=final)
        level = self.opts.read_consistency
        targets = self.opts.replica_endpoints or self.opts.endpoints
        meta: dict[str, Any] = {}
        node: str | None = None
        if self.rng.random() < self.opts.pinned_reads:
            node = self.rng.choice(targets)

            async def pinned() -> str | None:
                assert node is not None
                v = await self._pinned_get(node, key.encode(), meta)
                return None if v is None else v.decode()

            fn: Callable[[], Awaitable[Any]] = pinned
        else:

            async def routed() -> str | None:
                res = await cl.read(
                    key.encode(), consistency=level,  # type: ignore[arg-type]
                    max_staleness=self.opts.max_staleness if level == "bounded" else None,
                    read_preference=self.opts.read_from or "replica",  # type: ignore[arg-type]
                )
                meta["staleness"] = res.staleness
                meta["node"] = f"node {res.node_id}"
                return None if res.value is None else res.value.decode()

            fn = routed
        rec = await self.rec.call(p, "get", key, None, fn, is_write=False, workload=self.name, node=node)
        if level != "linearizable":
            rec.consistency = level
        if rec.status == "ok":
            rec.staleness = meta.get("staleness")
            rec.node = rec.node or meta.get("node")
        return rec


WORKLOADS: dict[str, type[Workload]] = {
    "register": RegisterWorkload,
    "set": SetWorkload,
    "bank1": BankWorkload,
    "replicas": ReplicasWorkload,
}


def make_workload(name: str, opts: WorkloadOptions, rec: Recorder) -> Workload:
    try:
        return WORKLOADS[name](opts, rec)
    except KeyError:
        raise ValueError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})") from None


# ----- conversion to the checker's vocabulary -----

_STATUS = {"ok": Status.OK, "fail": Status.FAIL, "info": Status.INFO, "invoke": Status.INFO}


def to_operations(records: list[OpRecord]) -> list[Operation]:
    """The checker's operations for a list of records. A final ``scan`` of the set workload
    becomes one get per element ever attempted, all spanning the scan's interval (each key's
    value at the scan's linearization point)."""
    ops: list[Operation] = []
    attempted: set[str] = set()
    for r in records:
        if r.f == "put" and r.key.startswith("s/"):
            attempted.add(r.key)
    for r in records:
        st = _STATUS[r.status]
        complete = r.complete if st is not Status.INFO else None
        if r.f == "get":
            ops.append(Operation(r.process, "get", r.key, None, r.output if st is Status.OK else None,
                                 r.invoke, complete, st))
        elif r.f == "put":
            ops.append(Operation(r.process, "put", r.key, r.value, None, r.invoke, complete, st))
        elif r.f == "delete":
            ops.append(Operation(r.process, "delete", r.key, None, None, r.invoke, complete, st))
        elif r.f == "cas":
            exp, new = r.value
            out = bool(r.output) if st is Status.OK else None
            ops.append(Operation(r.process, "cas", r.key, (exp, new), out, r.invoke, complete, st))
        elif r.f == "scan" and st is Status.OK and isinstance(r.output, dict):
            for i, k in enumerate(sorted(attempted | set(r.output))):
                ops.append(Operation(r.process + 1 + i, "get", k, None, r.output.get(k), r.invoke, complete, st))
    ops.sort(key=lambda o: o.invoke)
    return ops
