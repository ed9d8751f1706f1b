#!/opt/kvstore/bin/python
"""The image's HEALTHCHECK: `kvstore-healthcheck [readyz|livez]` asks the node in this container
for its probe and exits 0 on `200`, 1 otherwise (printing the node's one-line reason).

The port is the one of KVSTORE_METRICS_LISTEN (the node's --metrics-listen; a wildcard host is
asked on 127.0.0.1). With KVSTORE_CERTS_DIR the endpoint is mutual TLS (the same rules as the
node's /metrics): the check presents the node's own certificate (node.crt: a client certificate
of the cluster's CA too) and verifies the node's against ca.crt. Arguments carry no spaces
(podman 4.3 splits a health check's arguments on spaces). Standard library only, 3 s timeout.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from pathlib import Path

TIMEOUT = 3.0


def target(listen: str) -> tuple[str, int]:
    """(host, port) to ask, from a HOST:PORT listen address; ValueError if it is not one."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"KVSTORE_METRICS_LISTEN={listen!r} is not HOST:PORT")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return host, int(port)


def main(argv: list[str]) -> int:
    probe = argv[1] if len(argv) > 1 else "readyz"
    if probe not in ("readyz", "livez"):
        print(f"usage: kvstore-healthcheck [readyz|livez], not {probe!r}", file=sys.stderr)
        return 2
    try:
        host, port = target(os.environ.get("KVSTORE_METRICS_LISTEN", ""))
    except ValueError as err:
        print(f"{err}: set it (the node's --metrics-listen) for the health check", file=sys.stderr)
        return 1
    certs = os.environ.get("KVSTORE_CERTS_DIR", "")
    conn: http.client.HTTPConnection
    if certs:
        ctx = ssl.create_default_context(cafile=str(Path(certs) / "ca.crt"))
        ctx.check_hostname = False  # our own node, on loopback; its certificate is still verified
        ctx.load_cert_chain(Path(certs) / "node.crt", Path(certs) / "node.key")
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", f"/{probe}")
        resp = conn.getresponse()
        body = resp.read(512).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as err:
        print(f"/{probe}: {err}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(f"/{probe}: {resp.status} {body}")
    return 0 if resp.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
