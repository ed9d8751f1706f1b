"""One chaos run: set up hosts, run the cluster under workload and nemesis, tear down, judge.

Two phases, so that the harness's own client traffic never needs a route from the root
namespace into the test network:

* :func:`run` (the ``kvchaos run`` command, root namespace): creates the run folder and its
  state record, sets up the hosts, starts the *execute* phase (inside the client namespace on
  the netns backend, in-process on the local backend), and always tears everything down from
  the record, even if the execute phase crashed. Then it checks the history and writes the
  report, and prints ``verdict: ...`` as its last line.
* :func:`execute` (``kvchaos execute RUN_DIR``, hidden): starts the nodes, runs the workload and
  the nemesis schedule, heals, waits the quiet period, makes the final reads, and writes
  ``ops.jsonl`` (every operation with its error text), ``faults.json`` and ``execution.json``
  (with ``--watchers``, also ``watches.jsonl``: the watchers of `chaos.watchers` run alongside the
  workload and stop after the final reads once told about the last acknowledged write).
  On a sharded run (``--groups`` > 1 or the ``rebalance`` nemesis) it first waits, bounded by
  ``--moves-timeout``, for every range move to finish (``execution.json["shards"]``); moves that
  never finish fail the run as a *liveness* failure, reported apart from linearizability
  (``summary.json["liveness"]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chaos.checker import dump_jsonl

from . import containers, netns
from .checks import analyze_records
from .cluster import Backend, Cluster, LocalBackend, NetnsBackend
from .config import RunConfig
from .nemesis import Nemesis, NemesisOptions
from .pki import WORKLOAD_USER, RunPki
from .registry import make_workload
from .state import RunState
from .watchers import Watchers, load_watchers, write_records, writes_of
from .workload import OpRecord, Recorder, WorkloadOptions

__all__ = ["RunConfig", "analyze", "execute", "run"]


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# execute phase


def _backend(cfg: RunConfig, state: RunState) -> Backend:
    if cfg.backend == "container":
        return containers.ContainerBackend(containers.ContainerTopology.from_state(state))
    if cfg.backend == "netns":
        return NetnsBackend(netns.Topology(cfg.run_id, cfg.hosts))
    return LocalBackend(cfg.hosts, cfg.ports or None)


def execute(run_dir: Path) -> int:
    """The execute phase (see the module doc). Returns 0 if it completed, 2 if the cluster never
    became ready (the analysis then says unknown)."""
    run_dir = Path(run_dir)
    cfg = RunConfig.from_json(json.loads((run_dir / "config.json").read_text()))
    state = RunState(run_dir / "state.json")
    backend = _backend(cfg, state)
    pki = RunPki.create(run_dir / "certs") if cfg.tls else None
    opts: dict[str, Any] = dict(
        tick_ms=cfg.tick_ms, log_level=cfg.log_level, learners=cfg.learners, extra_args=cfg.server_args(),
        metrics="forge" in cfg.nemesis, tls=pki, env=cfg.server_env(),
    )
    cluster = (
        containers.ContainerCluster(backend, run_dir, cfg.nodes, state, image=cfg.image, **opts)
        if isinstance(backend, containers.ContainerBackend) else Cluster(backend, run_dir, cfg.nodes, state, **opts)
    )
    # SIGTERM (e.g. from the outer harness) unwinds like Ctrl-C so the nodes are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(_execute(cfg, run_dir, cluster))
    finally:
        cluster.stop_all()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _execute(cfg: RunConfig, run_dir: Path, cluster: Cluster) -> int:
    t_setup = time.monotonic()
    shards: dict[str, Any] | None = None
    cluster.start_all()
    leader = await cluster.wait_leader(30)
    execution: dict[str, Any] = {"endpoints": cluster.endpoints, "backend": cfg.backend, "tls": cfg.tls}
    if leader is None:
        _say("kvchaos: the cluster did not elect a leader within 30 s; see nodes/*.log")
        execution["error"] = "no leader at start"
        (run_dir / "execution.json").write_text(json.dumps(execution, indent=1))
        await cluster.close()
        return 2
    if cfg.learners:
        ready = await cluster.wait_learners(30)
        _say(f"kvchaos: read replicas on hosts {cluster.learner_hosts}: "
             + ("registered and caught up" if ready else "NOT all registered within 30 s"))
    _say(f"kvchaos: cluster up in {time.monotonic() - t_setup:.1f}s, leader on host {leader}; "
         f"endpoints {', '.join(cluster.endpoints)}; "
         + ("mutual TLS (certificates in certs/)" if cfg.tls else "plaintext (--insecure)"))
    rec = Recorder()
    wopts = WorkloadOptions(
        concurrency=cfg.concurrency, rate=cfg.rate, op_timeout=cfg.op_timeout,
        attempt_timeout=min(0.6, cfg.op_timeout / 2), stale_reads=cfg.stale_reads, seed=cfg.seed,
        endpoints=cluster.endpoints, replica_endpoints=[cluster.hosts[h].address for h in cluster.learner_hosts],
        read_from=cfg.read_from, read_consistency=cfg.read_consistency, max_staleness=cfg.max_staleness,
        certs_dir=str(cluster.tls.root) if cluster.tls is not None else "", user=WORKLOAD_USER,
        deletes=0.05 if cfg.watchers else 0.0, accounts=8 if cfg.workload == "bank" else 5,
    )
    wl = make_workload(cfg.workload, wopts, rec)
    watchers = Watchers(cfg.watchers, cfg.workload, wopts, rec, stagger=min(1.0, cfg.time * 0.05))
    quiet = cfg.quiet_seconds()
    fault_until = max(0.0, cfg.time - quiet)
    scale = min(1.0, max(0.3, cfg.time / 60.0))
    nopts = NemesisOptions(
        families=cfg.nemesis,
        fault_min=cfg.fault_min if cfg.fault_min is not None else 3.0 * scale + 1.0,
        fault_max=cfg.fault_max if cfg.fault_max is not None else 6.0 * scale + 1.0,
        heal_min=1.5 * scale + 0.5, heal_max=3.0 * scale + 1.0, seed=cfg.seed,
    )

    def log(msg: str) -> None:
        _say(f"[{rec.now():6.1f}s] {msg}")

    nem = Nemesis(cluster, nopts, rec.now, log)
    stop_wl = asyncio.Event()
    stop_nem = asyncio.Event()
    log(f"workload {cfg.workload} x{cfg.concurrency} for {cfg.time:g}s; nemesis {','.join(cfg.nemesis) or 'none'} "
        f"until {fault_until:.0f}s, then heal and {quiet:.0f}s quiet")
    wl_task = asyncio.ensure_future(wl.run(stop_wl))
    watch_task = asyncio.ensure_future(watchers.run())
    warmup = min(2.0, cfg.time * 0.1)

    async def nemesis_after_warmup() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_nem.wait(), warmup)
        if not stop_nem.is_set():
            await nem.run(fault_until, stop_nem)

    nem_task = asyncio.ensure_future(nemesis_after_warmup())

    async def progress() -> None:
        last = 0
        while True:
            await asyncio.sleep(3.0)
            n = len(rec.ops)
            c = rec.counts
            fault = nem.current.family + " " + nem.current.kind if nem.current else "-"
            log(f"ops {n} (+{(n - last) / 3:.0f}/s) ok {c['ok']} fail {c['fail']} info {c['info']} | fault: {fault}")
            last = n

    prog_task = asyncio.ensure_future(progress())
    try:
        end_at = rec.t0 + cfg.time
        while time.monotonic() < end_at and not wl_task.done():
            await asyncio.sleep(min(0.2, max(0.0, end_at - time.monotonic())))
        stop_nem.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nem_task, 60)
        stop_wl.set()
        try:
            await asyncio.wait_for(wl_task, cfg.op_timeout * 3 + 5)
        except TimeoutError:
            log("workload did not stop in time")
        workload_end = rec.now()
        log(f"workload stopped: {len(rec.ops)} ops; final reads")
        # heal again in case the nemesis task was cancelled
        await nem.heal_all()
        if cfg.sharded():
            shards = await nem.wait_moves_settled(cfg.moves_timeout)
        await wl.final(time.monotonic() + 30)
        finals = [r for r in rec.ops if r.final]
        log(f"final reads: {sum(1 for r in finals if r.status == 'ok')} ok of {len(finals)} attempts")
        if cfg.watchers:
            end_revision = max((r.revision or 0 for r in rec.ops), default=0)
            waited = await watchers.finish(end_revision, cfg.watch_timeout)
            logs = watchers.logs()
            log(f"watchers stopped after {waited:.1f}s: {sum(len(w.batches) for w in logs)} batches, "
                f"{sum(len(b.events) for w in logs for b in w.batches)} events, {sum(w.resumes for w in logs)} resumes")
            execution["watch"] = {"end_revision": end_revision, "waited": round(waited, 2)}
    finally:
        prog_task.cancel()
        for t in (nem_task, wl_task, watch_task):
            if not t.done():
                t.cancel()
        await asyncio.gather(prog_task, nem_task, wl_task, watch_task, return_exceptions=True)
        await watchers.close()
        if cfg.watchers:
            write_records(run_dir / "watches.jsonl", watchers.logs())
        await wl.close()
        await cluster.close()
        _write_ops(run_dir / "ops.jsonl", rec.ops)
        (run_dir / "faults.json").write_text(json.dumps([w.to_json() for w in nem.windows], indent=1))
    execution.update(
        workload_end=workload_end, fault_until=fault_until, time=cfg.time, quiet=quiet,
        keys=wl.keys_used(), bank_total=getattr(wl, "total", None),
        bank_accounts=wopts.accounts if cfg.workload in ("bank", "bank1") else None,
        account_groups=getattr(wl, "groups", None),
        shards=shards,
        nodes={str(h): {"node_id": nh.node_id, "address": nh.address, "history": nh.history}
               for h, nh in cluster.hosts.items()},
    )
    (run_dir / "execution.json").write_text(json.dumps(execution, indent=1))
    return 0


def _write_ops(path: Path, ops: list[OpRecord]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in ops:
            fh.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")


def load_ops(path: Path) -> list[OpRecord]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(OpRecord.from_json(json.loads(line)))
    return out


# --------------------------------------------------------------------------------------------
# analysis


def analyze(run_dir: Path, *, check_timeout: float | None = None) -> dict[str, Any]:
    """Check the run's history, write history.jsonl, summary.json and index.html; return the
    summary."""
    from .report import write_report

    run_dir = Path(run_dir)
    cfg = RunConfig.from_json(json.loads((run_dir / "config.json").read_text()))
    execution = _load_json(run_dir / "execution.json", {})
    faults = _load_json(run_dir / "faults.json", [])
    records = load_ops(run_dir / "ops.jsonl") if (run_dir / "ops.jsonl").exists() else []
    expected_keys = execution.get("keys") or [] if cfg.workload in ("register", "bank1") else []
    a = analyze_records(
        records, workload=cfg.workload, check_timeout=check_timeout or cfg.check_timeout,
        bank_total=execution.get("bank_total"), bank_accounts=execution.get("bank_accounts"),
        account_groups=execution.get("account_groups"), expected_final_keys=expected_keys,
    )
    if execution.get("error"):
        a.verdict = "unknown"
        a.reasons.insert(0, execution["error"])
    for f in faults:
        for note in f.get("notes") or []:
            if "was not running" in note:
                a.reasons.append(f"{note} (a node exited on its own: see its log)")
    forge = _forge_check(cfg, records, faults, execution)
    if forge.get("valid") is False:
        a.verdict = "invalid"
        a.reasons.extend(forge["reasons"])
    watch = _watch_check(cfg, run_dir, records, execution)
    if watch.get("valid") is False:
        a.verdict = "invalid"
        a.reasons.extend(f"watch: {m}" for m in watch["messages"][:5])
        if len(watch["messages"]) > 5:
            a.reasons.append(f"watch: {sum(watch['violations'].values()) - 5} more violation(s): see summary.json")
    elif watch.get("reason") and a.verdict == "valid":
        a.verdict = "unknown"
        a.reasons.append(watch["reason"])
    liveness = _liveness(cfg, execution, faults)
    if liveness.get("valid") is False:
        a.verdict = "invalid"
        a.reasons.append(liveness["reason"])
    elif liveness.get("valid") is None and liveness.get("reason") and a.verdict == "valid":
        a.verdict = "unknown"
        a.reasons.append(liveness["reason"])
    if not records and not execution.get("error"):
        a.verdict = "unknown"
        a.reasons.insert(0, "no history recorded (the execute phase failed; see harness.log)")
    dump_jsonl(a.operations, run_dir / "history.jsonl")
    summary: dict[str, Any] = {
        "verdict": a.verdict,
        "config": cfg.to_json(),
        "analysis": a.to_json(),
        "execution": execution,
        "faults": faults,
        "throughput": round(a.counts.get("ok", 0) / cfg.time, 1) if cfg.time else None,
        "liveness": liveness,
        "forge": forge,
        "watch": watch,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(run_dir, cfg, records, faults, a, execution, watch)
    return summary


#: Least ok throughput during forge windows, as a share of the healthy throughput.
FORGE_MIN_AVAILABILITY = 0.5


def _forge_check(
    cfg: RunConfig, records: list[OpRecord], faults: list[dict[str, Any]], execution: dict[str, Any]
) -> dict[str, Any]:
    """The forge nemesis's verdict (``valid`` None when the run had none): no read ever returned
    a forged value; every non-member call was refused; no node died or wedged under forged
    traffic (nor exited on its own anywhere in the run); and the ok throughput during the forge
    windows stayed at least ``FORGE_MIN_AVAILABILITY`` of the throughput outside every fault.
    On a TLS run also: no call of the TLS outsiders (no certificate, a client certificate to
    internal RPCs, a node certificate claiming another node, another CA) was answered instead of
    refused, and each of them was refused at least once (else it proved nothing)."""
    from .forge import FORGED_VALUE, TLS_CASES

    windows = [f for f in faults if f.get("family") == "forge"]
    out: dict[str, Any] = {"checked": False, "valid": None, "windows": len(windows)}
    if "forge" not in cfg.nemesis:
        return out
    forged = FORGED_VALUE.decode()
    seen = [r for r in records if r.output is not None and forged in json.dumps(r.output)]
    infos = [f.get("info") or {} for f in windows]

    def total(name: str) -> dict[str, int]:
        acc: dict[str, int] = {}
        for i in infos:
            for k, v in (i.get(name) or {}).items():
                acc[k] = acc.get(k, 0) + int(v)
        return dict(sorted(acc.items()))

    spans = [(f["start"], f["end"]) for f in windows if f.get("end") is not None]
    faulted = [(f["start"], f["end"]) for f in faults if f.get("end") is not None and f.get("family") != "heal"]
    ok = [r.complete for r in records if r.status == "ok" and not r.final and r.complete is not None]
    end = execution.get("fault_until") or cfg.time
    start = min((s for s, _ in faulted), default=0.0)

    def rate(inside: list[tuple[float, float]]) -> float | None:
        length = sum(b - a for a, b in inside)
        return sum(1 for t in ok if any(a <= t <= b for a, b in inside)) / length if length > 0 else None

    # the faulted time inside [start, end] only (a fault may outlast fault_until, e.g. a member
    # replacement; windows may overlap): merged, clipped intervals
    clipped = sorted((max(a, start), min(b, end)) for a, b in faulted if min(b, end) > max(a, start))
    merged: list[tuple[float, float]] = []
    for a, b in clipped:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    healthy_len = max(0.0, end - start) - sum(b - a for a, b in merged)
    healthy_ok = sum(1 for t in ok if start <= t <= end and not any(a <= t <= b for a, b in faulted))
    healthy = healthy_ok / healthy_len if healthy_len > 1.0 else None
    during = rate(spans)
    ratio = during / healthy if during is not None and healthy else None
    failed = sum(1 for r in records if r.status != "ok" and not r.final and any(a <= r.invoke <= b for a, b in spans))
    exited = [n for f in faults for n in f.get("notes") or [] if "was not running" in n]
    tls_codes: dict[str, dict[str, int]] = {}
    for i in infos:
        for case, codes in (i.get("tls") or {}).items():
            acc = tls_codes.setdefault(case, {})
            for k, v in codes.items():
                acc[k] = acc.get(k, 0) + int(v)
    out.update(
        checked=True,
        tls=cfg.tls,
        tls_codes={c: dict(sorted(v.items())) for c, v in sorted(tls_codes.items())},
        tls_refused=total("tls_refused"),
        handshakes_failed=sum(int(i.get("handshakes_failed") or 0) for i in infos),
        not_refused=sum(int(i.get("not_refused") or 0) for i in infos),
        rounds=sum(int(i.get("rounds") or 0) for i in infos),
        forged_messages=sum(int(i.get("forged_messages") or 0) for i in infos),
        forged_rpcs=sum(int(i.get("forged_rpcs") or 0) for i in infos),
        outsider_codes=total("outsider_codes"), member_codes=total("member_codes"), refused=total("refused"),
        refused_total=sum(int(i.get("refused_total") or 0) for i in infos),
        accepted_from_outsider=sum(int(i.get("accepted_from_outsider") or 0) for i in infos),
        nodes_dead=sorted({h for i in infos for h in i.get("nodes_dead") or []}),
        nodes_unresponsive=sorted({h for i in infos for h in i.get("nodes_unresponsive") or []}),
        nodes_exited=exited, forged_reads=len(seen),
        ok_per_s_healthy=round(healthy, 1) if healthy is not None else None,
        ok_per_s_forge=round(during, 1) if during is not None else None,
        availability=round(ratio, 3) if ratio is not None else None,
        failed_or_info_during_forge=failed,
    )
    reasons = []
    if seen:
        reasons.append(f"forge: {len(seen)} read(s) returned the forged value {forged!r} (first: {seen[0].f} "
                       f"{seen[0].key} -> {seen[0].output!r})")
    if out["accepted_from_outsider"]:
        reasons.append(f"forge: {out['accepted_from_outsider']} call(s) from a non-member were not refused")
    if out["not_refused"]:
        detail = [d for i in infos for d in i.get("not_refused_detail") or []][:3]
        reasons.append(f"forge: {out['not_refused']} forged call(s) over TLS were not refused: {detail}")
    if cfg.tls and out["rounds"]:
        never = [c for c in TLS_CASES if not out["tls_refused"].get(c)]
        if never:
            reasons.append(f"forge: TLS outsider(s) {never} were never refused in {out['rounds']} round(s): "
                           f"not exercised (codes {out['tls_codes']})")
    if out["nodes_dead"] or out["nodes_unresponsive"]:
        reasons.append(f"forge: after forged traffic, nodes dead on hosts {out['nodes_dead']}, wedged on hosts "
                       f"{out['nodes_unresponsive']}")
    if exited:
        reasons.append(f"forge: a node exited on its own during a run with forged traffic: {exited[0]}")
    if ratio is not None and ratio < FORGE_MIN_AVAILABILITY:
        reasons.append(f"forge: availability dented: {during:.1f} ok/s during forged traffic, {healthy:.1f} ok/s "
                       f"when healthy ({ratio:.0%} < {FORGE_MIN_AVAILABILITY:.0%})")
    out.update(valid=not reasons, reasons=reasons)
    return out


def _watch_check(
    cfg: RunConfig, run_dir: Path, records: list[OpRecord], execution: dict[str, Any]
) -> dict[str, Any]:
    """The watch workload's verdict (`chaos.watchcheck`; ``valid`` None when the run had no
    watchers)."""
    from .watchcheck import check_all

    path = run_dir / "watches.jsonl"
    if not cfg.watchers:
        return {"checked": False, "valid": None}
    if not path.exists():  # the execute phase did not get that far (the run is unknown)
        return {"checked": False, "valid": None, "reason": "watch unknown: no watches.jsonl was recorded"}
    end = int((execution.get("watch") or {}).get("end_revision") or 0)
    res = check_all(load_watchers(path), writes_of(records), end_revision=end)
    return {"checked": True, **res.to_json(), "end_revision": end,
            "waited": (execution.get("watch") or {}).get("waited"), "planted": cfg.plant_watch_bug or None}


def _liveness(cfg: RunConfig, execution: dict[str, Any], faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Did every range move finish once the faults healed? ``valid`` is True / False, or None
    when it was not checked (not a sharded run: nothing to say; a sharded run: unknown)."""
    changes = [f for f in faults if f.get("family") == "rebalance"]
    out: dict[str, Any] = {
        "checked": False, "valid": None,
        "layout_changes": len(changes),
        "layout_changes_planned": sum(1 for f in changes if (f.get("info") or {}).get("planned_moves") is not None),
        "moves_planned": sum((f.get("info") or {}).get("planned_moves") or 0 for f in changes),
        "changes_with_moves_pending_at_fault_heal": sum(
            1 for f in changes if ((f.get("info") or {}).get("pending_at_heal") or 0) > 0
        ),
    }
    if not cfg.sharded():
        return out
    shards = execution.get("shards")
    if not shards:
        if not execution.get("error"):
            out["reason"] = "liveness unknown: the range moves were not checked after the heal"
        return out
    out.update(checked=True, valid=bool(shards.get("settled")), moves=shards)
    if not out["valid"]:
        out["reason"] = (
            f"liveness: range moves did not finish within {shards.get('timeout')}s after the faults healed "
            f"({shards.get('moves_pending')} pending, groups awaiting drop {shards.get('awaiting_drop')}; "
            f"{shards.get('message')}) - a liveness failure, not a linearizability one"
        )
    return out


def _load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


# --------------------------------------------------------------------------------------------
# the whole run


def new_run_dir(out: Path, cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = Path(out) / f"{stamp}-{cfg.workload}-{cfg.run_id}"
    d.mkdir(parents=True, exist_ok=False)
    return d


def run(cfg: RunConfig) -> tuple[int, Path, dict[str, Any]]:
    """A whole run; returns (exit code, run dir, summary). Exit code 0 only on valid."""
    if not cfg.run_id:
        cfg.run_id = secrets.token_hex(3)
    if cfg.backend == "netns":
        netns.require_tools()
    if cfg.backend == "container":
        containers.require(cfg.image)
    run_dir = new_run_dir(Path(cfg.out), cfg)
    state = RunState.create(run_dir, cfg.run_id, cfg.backend)
    if cfg.backend == "local" and not cfg.ports:
        from .cluster import free_ports

        cfg.ports = free_ports(cfg.hosts)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    _say(f"kvchaos: run {cfg.run_id} in {run_dir} ({cfg.nodes} nodes, {cfg.backend} backend, seed {cfg.seed}, "
         f"{'mutual TLS' if cfg.tls else 'plaintext'})")
    t0 = time.monotonic()
    interrupted = False
    try:
        if cfg.backend == "netns":
            topo = netns.Topology(cfg.run_id, cfg.hosts)
            netns.setup(topo, state)
            _say(f"kvchaos: hosts {', '.join(topo.address(h) for h in range(1, cfg.hosts + 1))} "
                 f"(namespaces {topo.prefix}-*); client in {topo.client_ns} ({topo.client_ip})")
            cmd = [*netns.ip_netns_exec(topo.client_ns), sys.executable, "-m", "chaos.cli", "execute", str(run_dir)]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            state.add_pid(proc.pid, "execute phase", topo.client_ns)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                interrupted = True
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)
                code = -1
            state.remove_pid(proc.pid)
        else:
            if cfg.backend == "container":
                ctopo = containers.setup(cfg.run_id, cfg.hosts, cfg.image, state)
                _say(f"kvchaos: containers of {cfg.image} on network {ctopo.network} ({ctopo.subnet}): "
                     f"{', '.join(ctopo.address(h) for h in range(1, cfg.hosts + 1))}; the harness in the root "
                     "namespace")
            try:
                code = execute(run_dir)
            except KeyboardInterrupt:
                interrupted = True
                code = -1
        if code not in (0, 2):
            _say(f"kvchaos: the execute phase exited with {code}")
            execution = _load_json(run_dir / "execution.json", {})
            execution.setdefault("error", f"the execute phase exited with {code}: the history may be incomplete")
            (run_dir / "execution.json").write_text(json.dumps(execution, indent=1))
    finally:
        done = teardown(state)
        _say(f"kvchaos: teardown: {len(done)} action(s); everything the run created is gone")
    if interrupted:
        _say("verdict: unknown")
        return 1, run_dir, {"verdict": "unknown"}
    _say("kvchaos: checking the history ...")
    summary = analyze(run_dir)
    a = summary["analysis"]
    _say(f"kvchaos: {a['counts'].get('total', 0)} ops (ok {a['counts'].get('ok', 0)}, info {a['counts'].get('info', 0)},"
         f" fail {a['counts'].get('fail', 0)}) in {time.monotonic() - t0:.0f}s; linearizability "
         f"{a['linearizability'].get('verdict')} over {a['linearizability'].get('keys')} keys")
    lv = summary.get("liveness") or {}
    if lv.get("checked"):
        mv = lv.get("moves") or {}
        _say(f"kvchaos: range moves: {lv['layout_changes_planned']} of {lv['layout_changes']} layout change(s) "
             f"planned {lv['moves_planned']} move(s); after the heal "
             + (f"none pending within {mv.get('waited')}s (map version {mv.get('version')}, "
                f"groups {[g['id'] for g in mv.get('groups') or []]})" if lv["valid"]
                else f"{mv.get('moves_pending')} still pending after {mv.get('waited')}s: LIVENESS FAILURE"))
    fg = summary.get("forge") or {}
    if fg.get("checked"):
        _say(f"kvchaos: forge: {fg['windows']} window(s), {fg['forged_messages']} forged message(s) in "
             f"{fg['forged_rpcs']} RPC(s); non-member codes {fg['outsider_codes']}; member-id codes "
             f"{fg['member_codes']}; "
             + (f"TLS outsiders refused {fg['tls_refused']} ({fg['handshakes_failed']} failed handshakes), "
                f"not refused {fg['not_refused']}; " if fg.get("tls") else "")
             + f"refused on the nodes {fg['refused_total']} {fg['refused']}; forged reads "
             f"{fg['forged_reads']}; ok/s {fg['ok_per_s_forge']} under forged traffic vs {fg['ok_per_s_healthy']} "
             f"healthy; nodes dead {fg['nodes_dead']}, wedged {fg['nodes_unresponsive']}")
    for reason in a["reasons"]:
        _say(f"kvchaos: {reason}")
    wt = summary.get("watch") or {}
    if wt.get("checked"):
        _say(f"kvchaos: watch: {wt['watchers']} watcher(s), {wt['batches']} batches ({wt['progress']} progress), "
             f"{wt['events']} events, {wt['resumes']} resumes, {wt['acked_checked']} acknowledged writes checked, "
             f"{wt['indeterminate_seen']} indeterminate seen, {wt['cross_checked']} cross-watcher revisions; "
             f"violations {wt['violations'] or 'none'}")
    _say(f"kvchaos: report {run_dir / 'index.html'}")
    if summary["verdict"] == "valid" and not cfg.keep_data:
        shutil.rmtree(run_dir / "data", ignore_errors=True)
        shutil.rmtree(run_dir / "certs", ignore_errors=True)  # the run's throwaway CA and keys
    _say(f"verdict: {summary['verdict']}")
    return (0 if summary["verdict"] == "valid" else 1), run_dir, summary


def teardown(state: RunState) -> list[str]:
    """Remove everything the run's record lists, whatever its backend (what `kvchaos clean`
    runs); returns what it did."""
    backend = state.read().get("backend")
    if backend == "netns":
        return netns.teardown(state)
    if backend == "container":
        return containers.teardown(state)  # the harness ran in-process: no process of its own recorded
    return _teardown_local(state)


def _teardown_local(state: RunState) -> list[str]:
    """Kill any recorded process that is still alive (the execute phase normally stops them)."""
    from .state import pid_alive

    log = []
    data = state.read()
    for spid, info in (data.get("pids") or {}).items():
        pid = int(spid)
        if pid != os.getpid() and pid_alive(pid, info.get("start")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                log.append(f"killed pid {pid}")
    with state.update() as d:
        d["pids"] = {}
        d["torn_down"] = True
    state.unregister()
    return log
