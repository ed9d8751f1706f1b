"""The run's ``index.html``: one self-contained page, plots as inline SVG (no JavaScript).

* the verdict and why, the configuration, the counts;
* throughput over time (ok / fail / info completions per second) and latency of every
  operation (log scale), with the fault windows shaded as in Jepsen's plots;
* the fault schedule;
* for a key that is not linearizable: a Porcupine-style timeline of its operations (one row
  per client process, a bar from invocation to completion), the counterexample highlighted,
  plus the operations as text with the client's error messages.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.checker import Operation, Status, format_op

from .workload import OpRecord

if TYPE_CHECKING:
    from .checks import Analysis
    from .config import RunConfig

__all__ = ["write_report"]

COLORS = {"ok": "#2e7d32", "fail": "#c62828", "info": "#ef8f00"}
FAMILY_COLORS = {
    "partition": "#90caf9", "kill": "#ef9a9a", "pause": "#ce93d8", "transfer": "#fff59d",
    "member": "#a5d6a7", "heal": "#e0e0e0", "rebalance": "#ffcc80", "replicas": "#80cbc4",
}
MAX_POINTS = 15000


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


class _Plot:
    """A minimal SVG plot: x = run time (s), y linear or log."""

    def __init__(self, width: int, height: int, x_max: float, y_min: float, y_max: float, *, log_y: bool,
                 title: str, y_label: str) -> None:
        self.w, self.h = width, height
        self.ml, self.mr, self.mt, self.mb = 60, 20, 28, 36
        self.x_max = max(x_max, 1e-6)
        self.log_y = log_y
        self.y_min, self.y_max = y_min, max(y_max, y_min * 10 if log_y else y_min + 1)
        self.parts: list[str] = []
        self.title = title
        self.y_label = y_label

    def x(self, t: float) -> float:
        return self.ml + (self.w - self.ml - self.mr) * max(0.0, min(t, self.x_max)) / self.x_max

    def y(self, v: float) -> float:
        top, bottom = self.mt, self.h - self.mb
        if self.log_y:
            lo, hi = math.log10(self.y_min), math.log10(self.y_max)
            f = (math.log10(max(v, self.y_min)) - lo) / (hi - lo)
        else:
            f = (v - self.y_min) / (self.y_max - self.y_min)
        f = max(0.0, min(1.0, f))
        return bottom - f * (bottom - top)

    def shade(self, faults: Sequence[dict[str, Any]], end: float) -> None:
        for f in faults:
            x0 = self.x(float(f.get("start") or 0.0))
            x1 = self.x(float(f["end"]) if f.get("end") is not None else end)
            color = FAMILY_COLORS.get(str(f.get("family")), "#e0e0e0")
            label = f"{f.get('family')} {f.get('kind')}: {f.get('detail')}"
            self.parts.append(
                f'<rect class="fault" x="{x0:.1f}" y="{self.mt}" width="{max(1.0, x1 - x0):.1f}" '
                f'height="{self.h - self.mt - self.mb}" fill="{color}" opacity="0.45"><title>{_e(label)}</title></rect>'
            )

    def axes(self) -> None:
        p = self.parts
        bottom, right = self.h - self.mb, self.w - self.mr
        p.append(f'<line x1="{self.ml}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
        p.append(f'<line x1="{self.ml}" y1="{self.mt}" x2="{self.ml}" y2="{bottom}" stroke="#333"/>')
        step = _nice_step(self.x_max / 8)
        t = 0.0
        while t <= self.x_max + 1e-9:
            x = self.x(t)
            p.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#333"/>')
            p.append(f'<text x="{x:.1f}" y="{bottom + 16}" font-size="11" text-anchor="middle">{t:g}</text>')
            t += step
        p.append(f'<text x="{(self.ml + right) / 2:.0f}" y="{self.h - 4}" font-size="11" text-anchor="middle">time (s)</text>')
        if self.log_y:
            ticks = [10.0 ** k for k in range(math.floor(math.log10(self.y_min)), math.ceil(math.log10(self.y_max)) + 1)]
        else:
            ys = _nice_step((self.y_max - self.y_min) / 5)
            ticks = [self.y_min + i * ys for i in range(int((self.y_max - self.y_min) / ys) + 1)]
        for v in ticks:
            if not (self.y_min <= v <= self.y_max):
                continue
            y = self.y(v)
            p.append(f'<line x1="{self.ml - 4}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
            p.append(f'<text x="{self.ml - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_fmt_tick(v, self.log_y)}</text>')
        p.append(f'<text x="{self.ml}" y="16" font-size="13" font-weight="bold">{_e(self.title)}</text>')
        p.append(f'<text x="14" y="{(self.mt + bottom) / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(self.mt + bottom) / 2:.0f})">{_e(self.y_label)}</text>')

    def svg(self, cls: str) -> str:
        return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}">' + "".join(self.parts) + "</svg>")


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return float(m * mag)
    return float(10 * mag)


def _fmt_tick(v: float, log_y: bool) -> str:
    if log_y:
        if v >= 1:
            return f"{v:g}s"
        return f"{v * 1000:g}ms"
    return f"{v:g}"


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return "".join(f'<span class="lg"><i style="background:{c}"></i>{_e(n)}</span>' for n, c in items)


def throughput_svg(records: Sequence[OpRecord], faults: Sequence[dict[str, Any]], end: float) -> str:
    bucket = max(0.5, _nice_step(end / 120)) if end > 0 else 1.0
    nb = int(end / bucket) + 1
    series: dict[str, list[int]] = {s: [0] * nb for s in COLORS}
    for r in records:
        if r.complete is None or r.status not in series:
            continue
        i = min(nb - 1, int(r.complete / bucket))
        series[r.status][i] += 1
    y_max = max([max(v) for v in series.values()] + [1]) / bucket * 1.1
    p = _Plot(900, 260, end, 0.0, y_max, log_y=False, title="Throughput (completions per second)", y_label="ops/s")
    p.shade(faults, end)
    p.axes()
    for status, counts in series.items():
        pts = " ".join(f"{p.x((i + 0.5) * bucket):.1f},{p.y(c / bucket):.1f}" for i, c in enumerate(counts))
        p.parts.append(f'<polyline fill="none" stroke="{COLORS[status]}" stroke-width="1.6" points="{pts}"/>')
    return p.svg("throughput")


def latency_svg(records: Sequence[OpRecord], faults: Sequence[dict[str, Any]], end: float) -> str:
    lats = [(r.invoke, (r.complete - r.invoke) if r.complete is not None else None, r.status) for r in records]
    finite = [lat for _, lat, _ in lats if lat is not None and lat > 0]
    y_min = 10 ** math.floor(math.log10(max(1e-4, min(finite, default=1e-3))))
    y_max = 10 ** math.ceil(math.log10(max(finite, default=1.0) * 1.5))
    p = _Plot(900, 300, end, y_min, y_max, log_y=True, title="Latency of every operation (by invocation time)",
              y_label="latency")
    p.shade(faults, end)
    p.axes()
    step = max(1, len(lats) // MAX_POINTS)
    for t, lat, status in lats[::step]:
        if lat is None:
            continue
        p.parts.append(f'<circle cx="{p.x(t):.1f}" cy="{p.y(max(lat, y_min)):.1f}" r="1.6" '
                       f'fill="{COLORS.get(status, "#555")}" opacity="0.6"/>')
    return p.svg("latency")


def _op_label(op: Operation) -> str:
    if op.f == "get":
        return f"get → {op.output!r}" if op.status is Status.OK else "get → ?"
    if op.f == "put":
        return f"put {op.value!r}"
    if op.f == "cas":
        exp, new = op.value
        res = "" if op.status is not Status.OK else (" ✓" if op.output is not False else " ✗")
        return f"cas {exp!r}→{new!r}{res}"
    return f"{op.f} {op.value!r}"


def timeline_svg(ops: Sequence[Operation], highlight: Sequence[Operation], *, t_end: float,
                 max_ops: int = 60) -> str:
    """Porcupine-like: one row per process, a bar per operation from invoke to completion;
    operations in ``highlight`` (the counterexample) in red, INFO ones open-ended (dashed).

    As in Porcupine, the x axis is the *order* of events (every invocation and completion gets
    its own slot), not proportional time, so short operations next to long ones stay legible;
    the ticks give the real times."""
    if not ops:
        return ""
    marked = {(o.process, o.invoke) for o in highlight}
    focus = list(highlight or ops)
    lo = min(o.invoke for o in focus)
    hi = max((o.complete if o.complete is not None and o.status is Status.OK else o.invoke) for o in focus)

    def ret(o: Operation) -> float:
        return o.complete if o.complete is not None and o.status is Status.OK else math.inf

    around = [o for o in ops if (o.process, o.invoke) not in marked and o.invoke <= hi and ret(o) >= lo]
    around.sort(key=lambda o: abs(o.invoke - lo))
    shown = sorted(focus + around[: max(0, max_ops - len(focus))], key=lambda o: o.invoke)
    times = sorted({o.invoke for o in shown} | {ret(o) for o in shown if ret(o) != math.inf})
    slot = {t: i for i, t in enumerate(times)}
    procs = sorted({o.process for o in shown})
    row = {p: i for i, p in enumerate(procs)}
    ml, mr, rh = 90, 30, 30
    width = max(900, min(6000, ml + mr + 64 * (len(times) + 1)))
    step = (width - ml - mr) / (len(times) + 1)
    height = 50 + rh * len(procs) + 34

    def x(t: float) -> float:
        if t == math.inf:
            return width - mr
        return ml + step * (slot[t] + 0.5)

    parts = [f'<text x="{ml}" y="16" font-size="13" font-weight="bold">Operations on the key, in event order '
             f'(red: operations that cannot be linearized; dashed: outcome unknown)</text>']
    for p, i in row.items():
        y = 40 + i * rh
        parts.append(f'<text x="{ml - 8}" y="{y + rh / 2 + 4}" font-size="11" text-anchor="end">p{p}</text>')
        parts.append(f'<line x1="{ml}" y1="{y + rh - 2}" x2="{width - mr}" y2="{y + rh - 2}" stroke="#eee"/>')
    for o in shown:
        y = 40 + row[o.process] * rh + 4
        open_end = ret(o) == math.inf
        x0, x1 = x(o.invoke), x(ret(o))
        bad = (o.process, o.invoke) in marked
        fill = "#e53935" if bad else "#90a4ae"
        dash = ' stroke-dasharray="4 3"' if open_end else ""
        label = _op_label(o)
        chars = max(3, int((x1 - x0) / 6))
        parts.append(
            f'<g class="op{" bad" if bad else ""}"><title>{_e(format_op(o))}</title>'
            f'<rect x="{x0:.1f}" y="{y}" width="{max(2.0, x1 - x0):.1f}" height="{rh - 10}" rx="3" fill="{fill}" '
            f'fill-opacity="{0.85 if bad else 0.5}" stroke="#333" stroke-width="0.6"{dash}/>'
            f'<text x="{x0 + 3:.1f}" y="{y + rh - 15}" font-size="10">{_e(label[:chars])}</text></g>'
        )
    base = 40 + rh * len(procs) + 6
    every = max(1, len(times) // 10)
    for i, t in enumerate(times):
        if i % every:
            continue
        parts.append(f'<line x1="{x(t):.1f}" y1="{base}" x2="{x(t):.1f}" y2="{base + 4}" stroke="#333"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{base + 16}" font-size="10" text-anchor="middle">{t:.4f}s</text>')
    return (f'<div style="overflow-x:auto"><svg class="timeline" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width:.0f}" height="{height}" viewBox="0 0 {width:.0f} {height}">' + "".join(parts) + "</svg></div>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.verdict{display:inline-block;padding:4px 12px;border-radius:4px;color:#fff;font-weight:bold}
.valid{background:#2e7d32}.invalid{background:#c62828}.unknown{background:#757575}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
.lg{margin-right:14px;font-size:12px} .lg i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
"""


def write_report(
    run_dir: Path,
    cfg: RunConfig,
    records: Sequence[OpRecord],
    faults: Sequence[dict[str, Any]],
    analysis: Analysis,
    execution: dict[str, Any],
    watch: dict[str, Any] | None = None,
) -> Path:
    end = max([r.complete or r.invoke for r in records] + [float(cfg.time)])
    a = analysis
    out: list[str] = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>kvchaos {a.verdict}: {_e(cfg.workload)} {_e(','.join(cfg.nemesis))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>kvchaos run {_e(cfg.run_id)} <span class='verdict {a.verdict}' id='verdict'>{a.verdict}</span></h1>",
        "<table>",
        f"<tr><th>workload</th><td>{_e(cfg.workload)}{' (planted bug: stale reads)' if cfg.stale_reads else ''}</td></tr>",
        f"<tr><th>nemesis</th><td>{_e(', '.join(cfg.nemesis) or 'none')}</td></tr>",
        f"<tr><th>cluster</th><td>{cfg.nodes} nodes, {_e(cfg.backend)} backend, tick {cfg.tick_ms} ms, "
        f"{'mutual TLS' if cfg.tls else 'plaintext (--insecure)'}</td></tr>",
        f"<tr><th>time</th><td>{cfg.time:g} s (seed {cfg.seed})</td></tr>",
        f"<tr><th>operations</th><td>{a.counts.get('total', 0)}: ok {a.counts.get('ok', 0)}, "
        f"fail {a.counts.get('fail', 0)}, info {a.counts.get('info', 0)}</td></tr>",
        f"<tr><th>linearizability</th><td>{_e(a.linearizability.get('verdict'))} over "
        f"{a.linearizability.get('keys')} keys ({a.linearizability.get('elapsed')} s)</td></tr>",
        "</table>",
    ]
    if a.reasons:
        out.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in a.reasons) + "</ul>")
    out.append("<h2>Throughput and latency</h2>")
    out.append("<div>" + _legend([(k, v) for k, v in COLORS.items()]) + " &nbsp; faults: "
               + _legend([(k, v) for k, v in FAMILY_COLORS.items()]) + "</div>")
    out.append(throughput_svg(records, faults, end))
    out.append(latency_svg(records, faults, end))
    if a.bad_key is not None:
        out.append(f"<h2 id='violation'>Key {_e(a.bad_key)} is not linearizable</h2>")
        if a.counterexample:
            out.append("<p>These operations cannot be placed in any order consistent with their real-time "
                       "order and a single copy of the key"
                       + (" (whatever value the earlier operations left)" if a.linearizability.get(
                           "counterexample_any_start") else "") + ":</p>")
        out.append(timeline_svg(a.bad_key_ops, a.counterexample, t_end=end))
        by_key = {(r.process, round(r.invoke, 9)): r for r in records if r.key == a.bad_key}
        rows = []
        for o in a.counterexample:
            r = by_key.get((o.process, round(o.invoke, 9)))
            extra = []
            if r is not None and r.node:
                extra.append(f"served by {r.node}")
            if r is not None and r.error:
                extra.append(r.error)
            during = [f"{f.get('family')} {f.get('kind')}" for f in faults
                      if float(f.get("start") or 0) <= o.invoke <= float(f["end"] if f.get("end") is not None else end)]
            rows.append(f"<tr class='cx'><td>{_e(format_op(o))}</td><td>{_e('; '.join(extra))}</td>"
                        f"<td>{_e(', '.join(during) or '-')}</td></tr>")
        out.append("<table><tr><th>operation (process [invoke, complete])</th><th>client's view</th>"
                   "<th>fault at invocation</th></tr>" + "".join(rows) + "</table>")
    if a.set is not None:
        out.append("<h2>Set</h2><pre>" + _e(_pretty(a.set)) + "</pre>")
    if a.bank is not None:
        out.append("<h2>Bank</h2><pre>" + _e(_pretty(a.bank)) + "</pre>")
    if a.lock is not None:
        out.append("<h2>Lock</h2><pre>" + _e(_pretty(a.lock)) + "</pre>")
    if watch is not None and watch.get("checked"):
        planted = f" (planted bug: {watch['planted']})" if watch.get("planted") else ""
        out.append(f"<h2 id='watch'>Watch{_e(planted)}</h2><pre>" + _e(_pretty(watch)) + "</pre>")
    out.append("<h2>Faults</h2><table><tr><th>start</th><th>end</th><th>nemesis</th><th>detail</th><th>notes</th></tr>")
    for f in faults:
        endt = f.get("end")
        out.append(
            f"<tr><td>{float(f.get('start') or 0):.1f}</td><td>{'' if endt is None else f'{float(endt):.1f}'}</td>"
            f"<td>{_e(f.get('family'))} {_e(f.get('kind'))}</td><td>{_e(f.get('detail'))}</td>"
            f"<td>{_e('; '.join(f.get('notes') or []))}</td></tr>"
        )
    out.append("</table>")
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            key = r.error.split(":", 1)[0] + ": " + _strip_numbers(r.error.split(":", 1)[-1])[:90]
            errors[key] = errors.get(key, 0) + 1
    if errors:
        out.append("<h2>Client errors</h2><table><tr><th>count</th><th>error</th></tr>")
        for msg, n in sorted(errors.items(), key=lambda kv: -kv[1])[:25]:
            out.append(f"<tr><td>{n}</td><td>{_e(msg)}</td></tr>")
        out.append("</table>")
    out.append("<h2>Files</h2><ul>")
    for name in ("history.jsonl", "ops.jsonl", "summary.json", "faults.json", "config.json", "harness.log"):
        if (run_dir / name).exists() or name == "history.jsonl":
            out.append(f"<li><a href='{name}'>{name}</a></li>")
    logs = sorted((run_dir / "nodes").glob("*.log")) if (run_dir / "nodes").is_dir() else []
    for lp in logs:
        out.append(f"<li><a href='nodes/{_e(lp.name)}'>nodes/{_e(lp.name)}</a></li>")
    out.append("</ul></body></html>")
    path = run_dir / "index.html"
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _strip_numbers(text: str) -> str:
    import re

    return re.sub(r"\d+(\.\d+)?", "N", text).strip()


def _pretty(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d, indent=1, default=str)
