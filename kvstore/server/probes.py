"""HTTP probes on the metrics port: `/livez` and `/readyz` (Kubernetes probes, etcd's `/health`).

- `GET /livez`: 200 `ok` while the process works: its event loop runs a callback within
  `LOOP_TIMEOUT` seconds (not wedged), no loop the node needs has died, and no storage call has
  been running for more than `PERSIST_STUCK` seconds (a hung disk). Otherwise 503 and the reason.
  A supervisor restarts a node that is not live.
- `GET /readyz`: 200 `ok` once the node is live and serving (`kvstore.node.readiness`: storage
  works, joined, a live metadata leader known, caught up once); 503 and the reason otherwise,
  also while the node drains and stops (SIGTERM). A load balancer sends clients only to ready
  nodes; it never restarts one.
- `HEAD` answers as `GET` without a body; any other method gets 405, any other path falls
  through to the metrics app (`/metrics`; 404 elsewhere).

The answer is computed ON the event loop (the node's state belongs to it): the HTTP thread posts
a callback and waits for it at most `LOOP_TIMEOUT` seconds. Bodies are one line of text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["LOOP_TIMEOUT", "PERSIST_STUCK", "PROBE_PATHS", "LoopProbe", "probe_app"]

LOOP_TIMEOUT = 2.0
"""Seconds the event loop has to run a probe's callback before the node counts as wedged."""
PERSIST_STUCK = 60.0
"""Seconds one storage call (a Ready cycle's fsync and apply) may run before the node counts as
wedged (a full disk is not wedged: its cycle fails at once and is retried)."""
PROBE_PATHS = ("/livez", "/readyz")

Check = Callable[[], str | None]
"""Runs on the event loop: None when healthy, else the reason (one line)."""


class LoopProbe:
    """Answers probes by running `live` / `ready` on `loop` (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, live: Check, ready: Check,
                 timeout: float = LOOP_TIMEOUT) -> None:
        self._loop = loop
        self._checks = {"/livez": live, "/readyz": ready}
        self.timeout = timeout

    def answer(self, path: str) -> str | None:
        """The reason `path`'s probe fails, or None (call from any thread but the loop's)."""
        live, check = self._checks["/livez"], self._checks[path]
        # one trip through the loop (each may wait LOOP_TIMEOUT: a probe answers within one)
        return self._on_loop(lambda: live() or (None if check is live else check()))

    def _on_loop(self, check: Check) -> str | None:
        fut: concurrent.futures.Future[str | None] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(check())
            except Exception as err:  # a probe must answer, whatever the check raised
                fut.set_result(f"the check failed: {type(err).__name__}: {err}")

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:
            return "the event loop has stopped"
        try:
            return fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            return f"the event loop did not answer within {self.timeout:g} s"


def probe_app(probe: Callable[[str], str | None], fallback: Callable[..., Iterable[bytes]]) -> Callable[..., Any]:
    """A WSGI app serving `PROBE_PATHS` with `probe(path)` and everything else with `fallback`."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in PROBE_PATHS:
            return fallback(environ, start_response)
        method = environ.get("REQUEST_METHOD", "")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"method not allowed\n"]
        reason = probe(path)
        status = "200 OK" if reason is None else "503 Service Unavailable"
        body = b"ok\n" if reason is None else (" ".join(reason.split()) + "\n").encode("utf-8", "replace")
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [b""] if method == "HEAD" else [body]

    return app
