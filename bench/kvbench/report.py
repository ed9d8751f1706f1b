"""Summaries of the JSON lines: medians over repetitions, pair-by-pair ratios, markdown tables,
the plot (matplotlib, an optional extra: ``pip install -e '.[bench]'``), and machine facts."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.kvbench.clusters import etcd_binary

ROOT = Path(__file__).resolve().parents[2]


def _median(xs: Iterable[float]) -> float | None:
    v = list(xs)
    return statistics.median(v) if v else None


def machine_info(data_root: Path, fstype: str) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    etcd = ""
    try:
        out = subprocess.run([etcd_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
        etcd = out.splitlines()[0].split(":", 1)[1].strip() if out else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        ).stdout.strip()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // (1 << 20)} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "kind": "meta",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "etcd": etcd,
        "kvstore_commit": commit,
        "data_root": str(data_root),
        "data_fs": fstype,
    }


def machine_line(meta: dict[str, Any]) -> str:
    return (
        f"{meta['date']}; {meta['cores']} cores ({meta['cpu'] or 'unknown CPU'}), {meta['memory']}, "
        f"Linux {meta['kernel']}, Python {meta['python']}, etcd {meta['etcd'] or '?'}, "
        f"kvstore {meta['kvstore_commit'] or '?'}, data on {meta['data_fs'] or '?'}"
    )


def competition_note(cores: int | None) -> str:
    return (
        f"note: {cores} cores on this machine, shared by the 3 server processes and this load generator: "
        "their CPU competes (both are reported: 'server CPU' is the 3 servers' utime+stime over the "
        "window, 'loadgen CPU' this process's, in cores)."
    )


# ----- the throughput / latency comparison ----------------------------------------------------


def summarize(points: Sequence[dict[str, Any]], systems: Sequence[str]) -> list[dict[str, Any]]:
    """One summary per (workload, in-flight), in first-seen order: medians over repetitions for
    each system, and the kvstore/etcd ratios computed rep by rep (pairs from the same rep), then
    their median."""
    by: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    order: list[tuple[str, int]] = []
    for p in points:
        k = (p["workload"], p["inflight"])
        if k not in order:
            order.append(k)
        by[(p["workload"], p["inflight"], p["system"])].append(p)
    out = []
    for w, i in order:
        row: dict[str, Any] = {"kind": "summary", "workload": w, "inflight": i}
        for s in systems:
            rs = by.get((w, i, s), [])
            if not rs:
                continue
            row[s] = {
                "reps": len(rs),
                "ops_per_s": _median(r["ops_per_s"] for r in rs),
                "p50_us": _median(r["p50_us"] for r in rs),
                "p99_us": _median(r["p99_us"] for r in rs),
                "p999_us": _median(r["p999_us"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "server_cores": _median(r["server_cores"] for r in rs),
                "loadgen_cores": _median(r["loadgen_cores"] for r in rs),
                "server_cpu_us_per_op": _median(r["server_cpu_us_per_op"] for r in rs),
                "loadgen_cpu_us_per_op": _median(r["loadgen_cpu_us_per_op"] for r in rs),
            }
        ratios = {}
        for a, b in RATIO_PAIRS:
            r = _ratios(by.get((w, i, a), []), by.get((w, i, b), []))
            if r["pairs"]:
                ratios[f"{a}/{b}"] = r
        base = _ratios(by.get((w, i, "kvstore"), []), by.get((w, i, "etcd"), []))
        row["ratio_ops_per_s"] = base["ops_per_s"]
        row["ratio_p99"] = base["p99"]
        row["ratio_pairs"] = base["pairs"]
        row["ratios"] = ratios
        out.append(row)
    return out


RATIO_PAIRS = (("kvstore", "etcd"), ("kvstore-tls", "etcd-tls"), ("kvstore-tls", "kvstore"), ("etcd-api", "etcd"),
               ("etcd-api", "kvstore"))
"""The ratios the summary computes (a/b) when both systems ran: against etcd, TLS against TLS,
the cost of TLS to kvstore itself (A/B in the same run), and kvstore through its etcd API
against etcd (one identical client) and against kvstore's own client."""


def _ratios(a_runs: Sequence[dict[str, Any]], b_runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and p99 ratios a/b, pairing runs of the same rep, then the median."""
    a = {r["rep"]: r for r in a_runs}
    b = {r["rep"]: r for r in b_runs}
    pairs = [(a[r], b[r]) for r in sorted(a.keys() & b.keys())]
    tput = [x["ops_per_s"] / y["ops_per_s"] for x, y in pairs if y["ops_per_s"] > 0]
    p99 = [x["p99_us"] / y["p99_us"] for x, y in pairs if y["p99_us"] > 0 and x["ops"] > 0]
    return {"ops_per_s": _median(tput), "p99": _median(p99), "pairs": len(pairs)}


def ratio_table(summary: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    """Every system's ops/s and p99 per point, and every ratio of `RATIO_PAIRS` that ran."""
    names = [f"{a}/{b}" for a, b in RATIO_PAIRS if a in systems and b in systems]
    head = ("| workload | in flight | " + " | ".join(f"{s} ops/s" for s in systems) + " | "
            + " | ".join(f"ops/s {n} | p99 {n}" for n in names) + " |")
    lines = [head, "|" + "---|" * (2 + len(systems) + 2 * len(names))]
    for row in summary:
        cells = [row["workload"], str(row["inflight"])]
        cells += [_f(row[s]["ops_per_s"], ",.0f") if s in row else "-" for s in systems]
        for n in names:
            r = row.get("ratios", {}).get(n)
            cells += [_f(r["ops_per_s"] if r else None, ".2f"), _f(r["p99"] if r else None, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _lat(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    return f"{_ms(d['p50_us'])} / {_ms(d['p99_us'])} / {_ms(d['p999_us'])}"


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    head = (
        "| workload | in flight | kvstore ops/s | etcd ops/s | ops/s kvstore/etcd "
        "| kvstore p50 / p99 / p99.9 ms | etcd p50 / p99 / p99.9 ms | p99 kvstore/etcd "
        "| errors kvstore / etcd | server CPU kvstore / etcd (cores) | loadgen CPU kvstore / etcd (cores) |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in summary:
        kv, et = row.get("kvstore"), row.get("etcd")

        def pair(key: str, fmt: str, kv: dict[str, Any] | None = kv, et: dict[str, Any] | None = et) -> str:
            a = _f(kv[key], fmt) if kv else "-"
            b = _f(et[key], fmt) if et else "-"
            return f"{a} / {b}"

        lines.append(
            f"| {row['workload']} | {row['inflight']} "
            f"| {_f(kv['ops_per_s'] if kv else None, ',.0f')} | {_f(et['ops_per_s'] if et else None, ',.0f')} "
            f"| {_f(row['ratio_ops_per_s'], '.2f')} | {_lat(kv)} | {_lat(et)} | {_f(row['ratio_p99'], '.2f')} "
            f"| {pair('errors', 'd')} | {pair('server_cores', '.2f')} | {pair('loadgen_cores', '.2f')} |"
        )
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], systems: Sequence[str], path: Path, title: str) -> Path | None:
    """Throughput and p99 against in-flight operations, both systems on each chart, one column
    per workload. Returns None (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    workloads = list(dict.fromkeys(r["workload"] for r in summary))
    if not workloads:
        return None
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.6 * len(workloads), 7.2), squeeze=False)
    styles = {"kvstore": ("tab:blue", "o"), "etcd": ("tab:orange", "s"),
              "kvstore-tls": ("tab:cyan", "^"), "etcd-tls": ("tab:red", "v")}
    for col, w in enumerate(workloads):
        rows = sorted((r for r in summary if r["workload"] == w), key=lambda r: r["inflight"])
        xs_all = [r["inflight"] for r in rows]
        for s in systems:
            pts = [(r["inflight"], r[s]) for r in rows if s in r]
            if not pts:
                continue
            color, marker = styles.get(s, (None, "x"))
            xs = [x for x, _ in pts]
            axes[0][col].plot(xs, [d["ops_per_s"] for _, d in pts], marker=marker, color=color, label=s)
            axes[1][col].plot(xs, [d["p99_us"] / 1000 for _, d in pts], marker=marker, color=color, label=s)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([str(x) for x in xs_all])
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("operations in flight")
        axes[0][col].set_title(w)
        axes[0][col].set_ylim(bottom=0)
        axes[0][col].set_ylabel("ops/s (median of reps)")
        axes[1][col].set_ylabel("p99 latency, ms (median of reps)")
        axes[1][col].set_yscale("log")
        axes[0][col].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----- failover, restart, groups ----------------------------------------------------------------


def failover_table(records: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    lines = ["| system | kills | median s | min s | max s | all (s) |", "|---|---|---|---|---|---|"]
    for s in systems:
        xs = [r["seconds"] for r in records if r["system"] == s]
        if not xs:
            lines.append(f"| {s} | 0 | - | - | - | - |")
            continue
        lines.append(
            f"| {s} | {len(xs)} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} "
            f"| {', '.join(f'{x:.2f}' for x in xs)} |"
        )
    return "\n".join(lines)


def restart_table(records: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| system | keys | load puts/s | data on disk | restart to first linearizable read (s) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['keys']:,} | - | - | failed: {one_line(r['error'])} |")
        else:
            lines.append(
                f"| {r['system']} | {r['keys']:,} | {r['load_ops_per_s']:,.0f} | {r['disk_mib']:,.0f} MiB "
                f"| {r['restart_s']:.2f} |"
            )
    return "\n".join(lines)


def one_line(text: str, limit: int = 120) -> str:
    """An error message flattened for a table cell: its last ``limit`` characters on one line."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]


def groups_table(records: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| groups | in flight | ops/s | p50 / p99 / p99.9 ms | errors | server CPU (cores) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("kind") == "error":
            lines.append(f"| {r['groups']} | {r.get('inflight', '-')} | - | - | - | - | failed: {one_line(r['error'])} |")
        else:
            lines.append(
                f"| {r['extra']['groups']} | {r['inflight']} | {r['ops_per_s']:,.0f} | {_lat(r)} | {r['errors']} "
                f"| {r['server_cores']:.2f} | |"
            )
    return "\n".join(lines)


def dir_size_mib(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total / (1 << 20)
