"""The node's Prometheus endpoint (`--metrics-listen HOST:PORT`, path `/metrics`), which also
answers the `/livez` and `/readyz` probes (`probes.py`) when given a `probe`.

Without `--certs-dir` it is plain HTTP (bind it to loopback or a private network). With
`--certs-dir` it is HTTPS with the node's certificate (`node.crt` / `node.key`) and, like every
other connection to a secure node, MUTUAL TLS: the scraper must present a certificate signed by
the cluster's CA (any one: `kvstore cert create-client prometheus` makes one; metrics are not
per-user). A plaintext request, or a TLS one without such a certificate, gets no metrics.

Invariants:
- the TLS handshake runs in the connection's own thread with a timeout (`TIMEOUT`), never in
  the accept loop: a client that connects and stays silent holds one thread for at most
  `TIMEOUT` seconds and blocks nobody else;
- at most `MAX_CONNECTIONS` connections are served at once; more are closed at once;
- `reload` (SIGHUP, after the node's own reload succeeded) builds a whole new TLS context from
  the certs directory and swaps it in for later connections; a reload that fails changes nothing;
- private keys are read, never logged.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from kvstore.security.certs import CA_CERT, NODE_CERT, NODE_KEY

from .probes import probe_app

log = logging.getLogger("kvstore.metrics")

__all__ = ["MAX_CONNECTIONS", "TIMEOUT", "MetricsEndpoint", "server_context"]

TIMEOUT = 10.0
"""Seconds a connection may take for its handshake and each read or write."""
MAX_CONNECTIONS = 16
"""Connections served at once (a scraper needs one)."""


def server_context(certs_dir: Path) -> ssl.SSLContext:
    """The endpoint's TLS context: the node's certificate, TLS 1.2 or later, and a client
    certificate of the cluster's CA required. Raises OSError / ssl.SSLError on bad material."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certs_dir / NODE_CERT, certs_dir / NODE_KEY)
    ctx.load_verify_locations(cafile=str(certs_dir / CA_CERT))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (a scraper calls every few seconds)."""


class _Server(ThreadingWSGIServer):
    """A threading WSGI server that wraps each accepted connection with the current TLS context
    (if any) and handshakes in the connection's thread."""

    ssl_context: ssl.SSLContext | None = None
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: refuse this one
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TIMEOUT)
        ctx = self.ssl_context
        if ctx is None:
            super().finish_request(request, client_address)
            return
        tls = ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()  # raises (logged at debug by handle_error) for a bad client
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class MetricsEndpoint:
    """Serves `registry` on `listen` ("HOST:PORT"; port 0 picks one) from a daemon thread,
    over HTTPS with mutual TLS when `certs_dir` is given (see the module docstring); with
    `probe` (path -> None when healthy, else the reason) it answers `/livez` and `/readyz` too."""

    def __init__(self, listen: str, registry: CollectorRegistry, certs_dir: Path | None = None,
                 probe: Callable[[str], str | None] | None = None) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self.certs_dir = certs_dir
        ctx = server_context(certs_dir) if certs_dir is not None else None
        family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(_Server):
            address_family = family

        self._httpd = Server((host, int(port)), _Handler)
        self._httpd.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._httpd.ssl_context = ctx
        metrics = make_wsgi_app(registry)
        self._httpd.set_app(metrics if probe is None else probe_app(probe, metrics))
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.certs_dir is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/metrics"

    def reload(self) -> bool:
        """Read the certs directory again (SIGHUP); later connections use it. On failure
        (logged) nothing changes. False without TLS."""
        if self.certs_dir is None:
            return False
        try:
            ctx = server_context(self.certs_dir)
        except (OSError, ssl.SSLError) as err:
            log.error("metrics endpoint: certificate reload from %s failed, keeping the current ones: %s",
                      self.certs_dir, err)
            return False
        self._httpd.ssl_context = ctx
        return True

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
