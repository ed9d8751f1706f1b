"""kill -9 loop for a whole node: a one-node `kvstore serve` (its Raft logs in the write-ahead log,
its state machine in LMDB) takes puts from several client threads; after a random time the loop
kills it with SIGKILL, restarts it on the same data directory, and checks that every
acknowledged put is there with its value and that nothing else is (a put whose answer was lost to
the kill may or may not be there; if it is, it holds its own value) before the next round.

    python -m chaos.nodekill --kills 200 [--dir D] [--seed S] [--state-sync checkpoint|commit]
                                                                  # the long soak (~3 s a kill)

One node, so nothing can come back from a peer: what the restarted node serves is what its own
disk held. A kill -9 keeps the page cache, so this proves the process-crash path (a cycle killed
between its WAL sync and its apply transaction, in the middle of either, during a checkpoint or a
segment rotation). With `--state-sync checkpoint` every restart also puts LMDB back to its last
checkpoint (the meta pages the kill left are newer than the record) and replays the WAL from
there, so each kill exercises the checkpointer's restore and replay. The `fdatasync`s themselves are proven on the simulated file system
(`python -m chaos.sim.walcrash`, `tests/unit/test_nodelogs.py`). CI runs three kills
(`tests/integration/test_node_kill9.py`).

Every process this starts is stopped by its PID; the node listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvstore import errors
from kvstore.client import Client

WRITERS = 4
START_TIMEOUT = 30.0


@dataclass(slots=True)
class Outcome:
    kills: int = 0
    acked: int = 0
    maybe: int = 0
    problems: list[str] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One `kvstore serve` process on a fixed address and data directory."""

    def __init__(self, root: Path, port: int, state_sync: str | None = None) -> None:
        self.address = f"127.0.0.1:{port}"
        self.state_sync = state_sync
        self.data_dir = root / "n1"
        self.log_path = root / "n1.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore.cli.server", "serve", "--id", "1", "--data-dir", str(self.data_dir),
                 "--listen", self.address, "--peers", f"1={self.address}", "--replication", "1",
                 "--tick-ms", "50", "--log-level", "warning",
                 *(["--state-sync", self.state_sync] if self.state_sync else [])],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def wait_serving(self) -> float:
        """Seconds until a linearizable read succeeds (the node elected itself and applied its log)."""
        t0 = time.monotonic()
        with Client([self.address], timeout=2.0) as c:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the node exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    c.get(b"__probe__")
                    return time.monotonic() - t0
                except errors.KVError:
                    if time.monotonic() - t0 > START_TIMEOUT:
                        raise RuntimeError(f"the node did not serve within {START_TIMEOUT}s:\n{self.log_tail()}") from None
                    time.sleep(0.05)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


def _writer(address: str, prefix: bytes, stop: threading.Event, acked: dict[bytes, bytes], maybe: set[bytes],
            lock: threading.Lock) -> None:
    n = 0
    with Client([address], timeout=2.0, attempt_timeout=1.0) as c:
        while not stop.is_set():
            key = prefix + b"%06d" % n
            value = b"v" + key
            n += 1
            with lock:
                maybe.add(key)
            try:
                c.put(key, value)
            except errors.KVError as err:
                if not err.indeterminate:
                    with lock:
                        maybe.discard(key)  # definitely not written
                continue
            with lock:
                maybe.discard(key)
                acked[key] = value


def _verify(address: str, acked: dict[bytes, bytes], maybe: set[bytes]) -> list[str]:
    problems: list[str] = []
    with Client([address], timeout=10.0) as c:
        found = dict(c.scan(b"w"))
    for k, v in acked.items():
        if found.get(k) != v:
            problems.append(f"acknowledged put {k!r} lost (found {found.get(k)!r})")
    for k, v in found.items():
        if k not in acked and k not in maybe:
            problems.append(f"key {k!r} was never written")
        elif v != b"v" + k:
            problems.append(f"key {k!r} holds {v!r}")
    for k in [k for k in maybe if k in found]:
        acked[k] = found.pop(k)  # it was applied after all: from now on it must stay
        maybe.discard(k)
    return problems


def run(root: Path, kills: int, seed: int, say: Callable[[str], None] = print,
        state_sync: str | None = None) -> Outcome:
    """`kills` rounds of write, kill -9, restart, verify (module docstring); `state_sync`: the
    node's `--state-sync` (None: its default)."""
    rng = random.Random(seed)
    node = Node(root, _free_port(), state_sync)
    out = Outcome()
    acked: dict[bytes, bytes] = {}
    maybe: set[bytes] = set()
    lock = threading.Lock()
    try:
        node.start()
        node.wait_serving()
        for r in range(kills):
            stop = threading.Event()
            threads = [
                threading.Thread(target=_writer, args=(node.address, b"w%03d-%d-" % (r, i), stop, acked, maybe, lock),
                                 daemon=True)
                for i in range(WRITERS)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.5))  # let the writers run a random while: a kill lands anywhere
            node.kill9()
            stop.set()
            for t in threads:
                t.join(15)
            out.kills += 1
            node.start()
            out.restart_seconds.append(node.wait_serving())
            with lock:
                problems = _verify(node.address, acked, maybe)
            out.problems += [f"kill {r + 1}: {p}" for p in problems]
            say(f"kill {r + 1}/{kills}: {len(acked)} acknowledged puts present, {len(maybe)} indeterminate, "
                f"restart {out.restart_seconds[-1]:.2f}s{'' if not problems else f', {len(problems)} PROBLEMS'}")
            if problems:
                break
    finally:
        node.stop()
    out.acked, out.maybe = len(acked), len(maybe)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--state-sync", choices=["checkpoint", "commit"], default=None,
                    help="the node's --state-sync (default: the node's default)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        root = a.dir if a.dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        out = run(root, a.kills, a.seed, state_sync=a.state_sync)
    rs = sorted(out.restart_seconds)
    print(f"{out.kills} kills, {out.acked} acknowledged puts all present, {out.maybe} indeterminate; restart "
          f"p50 {rs[len(rs) // 2]:.2f}s max {rs[-1]:.2f}s" if rs else "no kills")
    for p in out.problems:
        print("PROBLEM:", p)
    sys.exit(1 if out.problems else 0)


if __name__ == "__main__":
    main()
