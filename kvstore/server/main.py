"""Process entry for one node: uvloop (asyncio fallback), signals, graceful shutdown, metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from kvstore.node.forcenew import ForceError
from kvstore.security.audit import AuditOpenError, KeyFileError
from kvstore.storage.dataformat import FormatError

from . import gctune
from .config import NodeConfig
from .metrics_http import MetricsEndpoint
from .node import Node
from .probes import LoopProbe
from .profiletoggle import install as install_profile_toggle

log = logging.getLogger("kvstore")


SWITCH_INTERVAL_US = 500
"""How long a thread may hold the GIL while another waits for it (CPython's default: 5,000 µs).
A node has two busy threads, the event loop and the persist thread (`node.py`); each hand-off
between them (a cycle to persist, applied writes to answer, a peer message to step while the
persist thread applies) waits until the holder blocks or its interval ends. 500 µs measured
better at 1 and 64 in flight (bench/README.md, "Per-hop trace"). `KVSTORE_GIL_SWITCH_US`
overrides it (a benchmark's A/B)."""


def set_switch_interval() -> float:
    """Apply SWITCH_INTERVAL_US (or `KVSTORE_GIL_SWITCH_US`, if it is a positive integer); returns
    the interval set, in seconds."""
    raw = os.environ.get("KVSTORE_GIL_SWITCH_US", "")
    us = int(raw) if raw.isascii() and raw.isdigit() and 0 < int(raw) <= 1_000_000 else SWITCH_INTERVAL_US
    sys.setswitchinterval(us / 1e6)
    return us / 1e6


def install_event_loop() -> str:
    """Use uvloop when available (it is a dependency on POSIX); fall back to asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(cfg: NodeConfig) -> int:
    """Run a node until SIGTERM / SIGINT (returns 0) or until one of its loops dies (returns 1,
    after logging why: a supervisor should restart it)."""
    node = Node(cfg)
    await node.start()
    pauses = gctune.GcPauses()
    untune = gctune.tune(cfg.gc_threshold, pauses)
    drain = asyncio.get_running_loop().create_task(_report_gc_pauses(pauses, node))
    try:
        return await _serve_started(cfg, node)
    finally:
        drain.cancel()
        untune()


async def _report_gc_pauses(pauses: gctune.GcPauses, node: Node, every: float = 1.0) -> None:
    """Hand the collections' pauses to the node's histogram, from the event loop (see
    `gctune.GcPauses`: the collector's hook must not touch a metric itself)."""
    hist = node.metrics.gc_pause_seconds
    while True:
        await asyncio.sleep(every)
        pauses.drain(lambda gen, seconds: hist.labels(str(gen)).observe(seconds))


async def _serve_started(cfg: NodeConfig, node: Node) -> int:
    loop = asyncio.get_running_loop()
    metrics: MetricsEndpoint | None = None
    if cfg.metrics_listen:
        # HTTPS with mutual TLS under --certs-dir (metrics_http.py), plain HTTP otherwise;
        # /livez and /readyz run their checks on this loop (probes.py).
        probe = LoopProbe(loop, node.liveness, node.ready)
        metrics = MetricsEndpoint(cfg.metrics_listen, node.metrics.registry, cfg.certs_dir, probe=probe.answer)
        log.info("metrics on %s (probes: /livez, /readyz)", metrics.url)

    def reload_certificates() -> None:
        if node.reload_certificates() and metrics is not None:
            metrics.reload()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_certificates)
    install_profile_toggle(loop)  # bench only: KVSTORE_PROFILE (off by default)
    clients = f", clients with a token on {cfg.client_listen}" if cfg.client_listen else ""
    print(f"kvstore node {cfg.id} ready on {cfg.listen}{clients} (event loop: {type(loop).__module__})", flush=True)
    stopped = loop.create_task(stop.wait())
    died = loop.create_task(node.died.wait())
    await asyncio.wait([stopped, died], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    died.cancel()
    if node.fatal is not None:
        if metrics is not None:
            metrics.close()
        log.critical("node %d exits: %s", cfg.id, node.fatal)
        await node.stop(grace=0.5)
        return 1
    log.info("shutting down: draining (at most %g s)", cfg.drain_timeout)
    await node.drain(cfg.drain_timeout)  # /readyz answers 503 meanwhile
    if metrics is not None:
        metrics.close()
    await node.stop()
    return 0


def run(cfg: NodeConfig) -> int:
    install_event_loop()
    set_switch_interval()
    try:
        return asyncio.run(serve(cfg))
    except (OSError, AuditOpenError, KeyFileError, FormatError, ForceError) as err:
        print(f"kvstore: {err}", file=sys.stderr)
        return 2
