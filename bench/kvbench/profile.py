"""Where a kvstore node spends its time under load: py-spy samples, per-thread CPU from /proc,
and the node's own Prometheus metrics, over the same window.

- ``thread_cpu(pid)``: utime / stime of every thread of a process (``/proc/PID/task``), by name;
  this sees the threads py-spy cannot (gRPC's C-core threads carry no Python frames).
- ``parse_raw``: py-spy's ``--format raw`` output (collapsed stacks: ``frame;frame;... count``).
- ``categorize``: each sample goes to the first category whose rule matches a frame, walking
  from the leaf (innermost frame) towards the root.
- ``scrape``: a node's /metrics (kvstore's persist / proposal histograms and write counter).
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ThreadCpu:
    tid: int
    name: str
    utime: float
    stime: float
    runqueue: float = 0.0
    """Seconds spent runnable but waiting for a CPU (/proc/.../schedstat): the cost of sharing
    the cores with the other processes."""


def thread_cpu(pid: int) -> dict[int, ThreadCpu]:
    out: dict[int, ThreadCpu] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        wait = 0.0
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                wait = int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
        out[int(t)] = ThreadCpu(int(t), name, int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK, wait)
    return out


def thread_cpu_delta(
    before: dict[int, ThreadCpu], after: dict[int, ThreadCpu], main_pid: int
) -> list[tuple[str, float, float, float]]:
    """(thread kind, user s, system s, runqueue wait s) per kind of thread, largest first. The
    thread whose tid is the pid is the event loop ("main (event loop)"); others are grouped by
    their OS name with digits stripped (Python threads are all "python": the persist worker,
    gRPC's poller, the metrics server; gRPC's C-core threads have their own names)."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for tid, a in after.items():
        b = before.get(tid, ThreadCpu(tid, a.name, 0.0, 0.0, 0.0))
        kind = "main (event loop)" if tid == main_pid else re.sub(r"[_-]?\d+$", "", a.name) or a.name
        acc[kind][0] += a.utime - b.utime
        acc[kind][1] += a.stime - b.stime
        acc[kind][2] += a.runqueue - b.runqueue
    rows = [(k, u, s, w) for k, (u, s, w) in acc.items()]
    rows.sort(key=lambda r: -(r[1] + r[2]))
    return rows


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy raw output -> {stack (root first): samples}."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def split_thread(stack: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """With --threads, py-spy puts the process and thread as the outermost frames."""
    thread = ""
    frames = list(stack)
    while frames and (frames[0].startswith("process ") or frames[0].startswith("thread ")):
        head = frames.pop(0)
        if head.startswith("thread "):
            thread = head
    return thread, tuple(frames)


#: (category, substrings of a frame: function and file); the first category matching a frame,
#: walking from the leaf towards the root, takes the sample. Order matters only within one frame.
#: Native frames (py-spy --native) come first: a sample in fdatasync is fsync whoever called it.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("fsync (fdatasync, in the LMDB commit)", ("fdatasync", "fsync (")),
    ("waiting for the GIL (pthread_cond_timedwait)", ("pthread_cond_timedwait", "take_gil")),
    ("idle: persist worker waiting for work", ("_queue_SimpleQueue_get",)),
    ("LMDB C code (mdb_*)", ("mdb_",)),
    ("waiting in epoll / poll", ("epoll_wait", "epoll_pwait", "poll (", "__poll", "uv__io_poll")),
    ("Raft core (kvstore/raft)", ("kvstore/raft/",)),
    ("LMDB: log append (raftlog.py)", ("kvstore/storage/raftlog.py",)),
    ("apply: state machine (kvstate/machine/commands)", (
        "kvstore/storage/kvstate.py", "kvstore/storage/machine.py", "kvstore/storage/commands.py")),
    ("LMDB: write txn, commit + fsync (lmdb_env/store)", ("kvstore/storage/lmdb_env.py", "kvstore/storage/store.py")),
    ("storage, other", ("kvstore/storage/",)),
    ("replication transport (peer streams, codec)", ("kvstore/transport/",)),
    ("host: Ready loop, answering waiters (host.py)", ("kvstore/node/host.py",)),
    ("KV service: request, proposal, reply (kv_service.py, requests.py, op_stream.py)", (
        "kvstore/server/kv_service.py", "kvstore/server/requests.py", "kvstore/server/op_stream.py")),
    ("node driver (ready loop, ticker: node.py)", ("kvstore/server/node.py",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("protobuf", ("google/protobuf/", "_pb2", "upb_", "_upb")),
    ("gRPC (grpc.aio, Cython, C core)", ("grpc/", "grpc_health/", "cygrpc", "grpc_core", "libgrpc", "grpc_")),
    ("logging", ("logging/",)),
    ("event loop (asyncio / uvloop / libuv)", ("asyncio/", "uvloop", "uv_", "uv__")),
    ("thread pool (persist worker idle / handoff)", ("concurrent/futures/", "threading.py")),
]


def categorize(stacks: Counter[tuple[str, ...]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        _, frames = split_thread(stack)
        cat = "other"
        for frame in reversed(frames):
            f = frame
            hit = next((c for c, pats in CATEGORIES if any(p in f for p in pats)), None)
            if hit is not None:
                cat = hit
                break
        out[cat] += n
    return out


#: Categories that are a thread waiting for work, not doing any.
IDLE = ("waiting in epoll / poll", "idle: persist worker waiting for work")


def busy(stacks: Counter[tuple[str, ...]]) -> Counter[tuple[str, ...]]:
    """The samples that are not a thread waiting for work (see IDLE)."""
    out: Counter[tuple[str, ...]] = Counter()
    for stack, n in stacks.items():
        if next(iter(categorize(Counter({stack: n})))) not in IDLE:
            out[stack] = n
    return out


def self_time(stacks: Counter[tuple[str, ...]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        _, frames = split_thread(stack)
        if frames:
            out[frames[-1]] += n
    return out


def inclusive(stacks: Counter[tuple[str, ...]], needles: Iterable[str]) -> Counter[str]:
    """Samples whose stack contains a frame matching each needle (a regex)."""
    out: Counter[str] = Counter()
    pats = [(n, re.compile(n)) for n in needles]
    for stack, n in stacks.items():
        for name, pat in pats:
            if any(pat.search(f) for f in stack):
                out[name] += n
    return out


def by_thread(stacks: Counter[tuple[str, ...]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        thread, _ = split_thread(stack)
        out[thread or "?"] += n
    return out


def scrape(address: str, timeout: float = 2.0) -> dict[str, float]:
    """The numeric samples of a Prometheus text endpoint (name{labels} -> value)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            continue
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    def d(k: str) -> float:
        return after.get(k, 0.0) - before.get(k, 0.0)

    cycles = d("kvstore_persist_seconds_count")
    writes = d("kvstore_writes_total")
    props = d("kvstore_proposal_seconds_count")
    return {
        "window_s": seconds,
        "writes_per_s": writes / seconds if seconds else 0.0,
        "persist_cycles_per_s": cycles / seconds if seconds else 0.0,
        "writes_per_cycle": writes / cycles if cycles else 0.0,
        "persist_ms_mean": 1000 * d("kvstore_persist_seconds_sum") / cycles if cycles else 0.0,
        "persist_busy_fraction": d("kvstore_persist_seconds_sum") / seconds if seconds else 0.0,
        "proposal_to_applied_ms_mean": 1000 * d("kvstore_proposal_seconds_sum") / props if props else 0.0,
        "raft_msgs_sent_per_write": d("kvstore_raft_messages_sent_total") / writes if writes else 0.0,
        "raft_msgs_received_per_write": d("kvstore_raft_messages_received_total") / writes if writes else 0.0,
    }


def pct_table(counts: Counter[str], total: int, title: str, limit: int = 25) -> str:
    lines = [f"| {title} | samples | % |", "|---|---|---|"]
    for name, n in counts.most_common(limit):
        lines.append(f"| {name.replace('|', '/')} | {n} | {100 * n / total:.1f} |")
    return "\n".join(lines)


def thread_table(rows: Sequence[tuple[str, float, float, float]], seconds: float) -> str:
    lines = [
        "| thread | user (cores) | system (cores) | total (cores) | runnable, waiting for a CPU (fraction of the window) |",
        "|---|---|---|---|---|",
    ]
    for kind, u, s, w in rows:
        if u + s < 0.005 * seconds:
            continue
        lines.append(f"| {kind} | {u / seconds:.3f} | {s / seconds:.3f} | {(u + s) / seconds:.3f} | {w / seconds:.3f} |")
    return "\n".join(lines)


def read_raw(path: Path) -> Counter[tuple[str, ...]]:
    return parse_raw(path.read_text(errors="replace")) if path.exists() else Counter()
