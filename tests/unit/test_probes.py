"""The HTTP probes (`kvstore/server/probes.py`) on a real metrics endpoint and a real event loop."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from kvstore.server.metrics_http import MetricsEndpoint
from kvstore.server.probes import LoopProbe


class Loop:
    """An event loop running in its own thread (the node's, seen from the HTTP thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    try:
        yield lp
    finally:
        lp.close()


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_probes_answer_from_the_loop_and_metrics_stay(loop: Loop) -> None:
    reg = CollectorRegistry()
    Counter("kvstore_probe_test", "a metric", registry=reg).inc()
    state: dict[str, str | None] = {"live": None, "ready": "catching up:\nline two"}
    seen_threads: list[threading.Thread] = []

    def ready() -> str | None:
        seen_threads.append(threading.current_thread())
        return state["ready"]

    lp = LoopProbe(loop.loop, lambda: state["live"], ready)
    ep = MetricsEndpoint("127.0.0.1:0", reg, probe=lp.answer)
    try:
        assert _get(ep.port, "/livez") == (200, b"ok\n")
        assert _get(ep.port, "/readyz") == (503, b"catching up: line two\n")  # always one line
        assert seen_threads == [loop.thread]  # computed on the loop
        state["ready"] = None
        assert _get(ep.port, "/readyz") == (200, b"ok\n")
        assert _get(ep.port, "/readyz", "HEAD") == (200, b"")
        assert _get(ep.port, "/readyz", "POST")[0] == 405
        state["live"] = "a loop of the node died"
        assert _get(ep.port, "/livez") == (503, b"a loop of the node died\n")
        assert _get(ep.port, "/readyz")[0] == 503  # not live: not ready either
        status, body = _get(ep.port, "/metrics")
        assert status == 200 and b"kvstore_probe_test_total 1.0" in body
    finally:
        ep.close()


def test_a_wedged_loop_is_not_live(loop: Loop) -> None:
    release = threading.Event()
    loop.loop.call_soon_threadsafe(release.wait, 30)  # the loop blocks
    lp = LoopProbe(loop.loop, lambda: None, lambda: None, timeout=0.2)
    try:
        assert lp.answer("/livez") == "the event loop did not answer within 0.2 s"
        assert lp.answer("/readyz") == "the event loop did not answer within 0.2 s"
    finally:
        release.set()


def test_a_check_that_raises_is_a_failed_probe(loop: Loop) -> None:
    def boom() -> str | None:
        raise KeyError("x")

    lp = LoopProbe(loop.loop, lambda: None, boom)
    assert lp.answer("/readyz") == "the check failed: KeyError: 'x'"


def test_a_stopped_loop_is_not_live() -> None:
    lp = Loop()
    probe = LoopProbe(lp.loop, lambda: None, lambda: None, timeout=0.2)
    lp.close()
    assert probe.answer("/livez") == "the event loop has stopped"


_PATH = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(lambda s: "/" + s)


@pytest.fixture(scope="module")
def not_ready_port() -> Iterator[int]:
    lp = Loop()
    ep = MetricsEndpoint("127.0.0.1:0", CollectorRegistry(),
                         probe=LoopProbe(lp.loop, lambda: None, lambda: "not ready").answer)
    try:
        yield ep.port
    finally:
        ep.close()
        lp.close()


@settings(max_examples=100, deadline=None)
@given(path=_PATH, method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "BREW"]))
def test_hostile_requests_never_break_the_endpoint(not_ready_port: int, path: str, method: str) -> None:
    """Any path and method: a definite HTTP answer (never a 5xx but the probe's 503), and the
    endpoint keeps answering."""
    status, body = _get(not_ready_port, path, method)
    if path.split("?")[0] == "/readyz" and method in ("GET", "HEAD"):
        assert status == 503
    else:
        assert status < 500, (status, body)
    assert _get(not_ready_port, "/livez") == (200, b"ok\n")
