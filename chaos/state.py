"""The record of what a chaos run created, so that anything left behind can be removed.

Every resource (network namespace, iptables chain, process) is written to the run's
``state.json`` *before* it is created, and the file is registered under ``REGISTRY`` so that
``kvchaos clean --all-stale`` finds runs whose harness died. Removal works from the record
alone: it never looks for things by a broad name.

Processes are recorded with their start time (field 22 of ``/proc/PID/stat``), so a PID that was
reused by an unrelated process after a crash is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "REGISTRY",
    "RunState",
    "pid_alive",
    "proc_start_time",
    "registered_states",
]


def _registry_dir() -> Path:
    env = os.environ.get("KVCHAOS_REGISTRY")
    if env:
        return Path(env)
    run = Path("/run")
    if run.is_dir() and os.access(run, os.W_OK):
        return run / "kvchaos"
    return Path(tempfile.gettempdir()) / "kvchaos-registry"


REGISTRY = _registry_dir()


def proc_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = text[text.rfind(")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, T, Z, ...) or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return rest[0] if rest else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` exists (and, when ``start`` is given, is the process started then) and is
    not a zombie."""
    st = proc_start_time(pid)
    if st is None:
        return False
    if start is not None and st != start:
        return False
    return proc_state(pid) != "Z"


class RunState:
    """``state.json`` of one run: a JSON object updated under an exclusive file lock.

    Keys: ``run_id``, ``backend``, ``run_dir``, ``owner`` ({pid, start}), ``namespaces`` (names,
    in creation order), ``bridge_ns``, ``chains`` ([ns, ...] that hold our iptables chains),
    ``pids`` ({pid: {start, what, ns}}), ``torn_down`` (bool).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_suffix(".lock")

    # ----- low level -----

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
                return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any]:
        with self._locked():
            return self._read()

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """``with state.update() as data: data[...] = ...`` (written back atomically)."""
        with self._locked():
            data = self._read()
            yield data
            self._write(data)

    # ----- creation / registry -----

    @classmethod
    def create(cls, run_dir: Path, run_id: str, backend: str) -> RunState:
        st = cls(Path(run_dir) / "state.json")
        me = os.getpid()
        with st.update() as data:
            data.update(
                run_id=run_id, backend=backend, run_dir=str(Path(run_dir).resolve()),
                owner={"pid": me, "start": proc_start_time(me)}, created=time.time(),
                namespaces=[], bridge_ns=None, chains=[], pids={}, torn_down=False,
            )
        st.register()
        return st

    def register(self) -> None:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        data = self.read()
        entry = REGISTRY / f"{data.get('run_id', 'unknown')}.json"
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(json.dumps({"state": str(self.path.resolve())}))
        os.replace(tmp, entry)

    def unregister(self) -> None:
        data = self.read()
        with contextlib.suppress(OSError):
            (REGISTRY / f"{data.get('run_id', 'unknown')}.json").unlink()

    def owner_alive(self) -> bool:
        owner = self.read().get("owner") or {}
        pid = owner.get("pid")
        return isinstance(pid, int) and pid_alive(pid, owner.get("start"))

    # ----- resources -----

    def add_namespace(self, name: str) -> None:
        with self.update() as data:
            if name not in data.setdefault("namespaces", []):
                data["namespaces"].append(name)

    def add_chain_ns(self, ns: str) -> None:
        with self.update() as data:
            if ns not in data.setdefault("chains", []):
                data["chains"].append(ns)

    def add_pid(self, pid: int, what: str, ns: str | None = None) -> None:
        with self.update() as data:
            data.setdefault("pids", {})[str(pid)] = {"start": proc_start_time(pid), "what": what, "ns": ns}

    def remove_pid(self, pid: int) -> None:
        with self.update() as data:
            data.setdefault("pids", {}).pop(str(pid), None)


def registered_states() -> list[RunState]:
    """Every run recorded in the registry (the state files may be gone)."""
    if not REGISTRY.is_dir():
        return []
    out = []
    for entry in sorted(REGISTRY.glob("*.json")):
        try:
            path = json.loads(entry.read_text())["state"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(RunState(Path(path)))
    return out
