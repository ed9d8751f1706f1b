"""Certificates for benchmarking both systems with TLS on (`--tls`): one CA per cluster, a node
certificate per member (valid for 127.0.0.1, serverAuth + clientAuth, so etcd can use it as its
client and peer certificate alike) and the client certificate of user `root`.

Made with kvstore's own `kvstore.security.certs` (the `cryptography` library), so kvstore and
etcd run with the same key type (ECDSA P-256) and the same chain: the comparison measures the
servers, not different certificates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from kvstore.security.certs import (
    CA_CERT,
    NODE_CERT,
    NODE_KEY,
    client_cert_name,
    client_key_name,
    create_ca,
    create_client,
    create_node,
)

BENCH_USER = "root"


@dataclass(frozen=True, slots=True)
class ClusterCerts:
    """The files of one cluster's TLS setup, all under `root`."""

    client_dir: Path
    """`ca.crt` and the client certificate of `BENCH_USER` (what a kvstore client's `certs_dir` is)."""
    node_dirs: dict[int, Path]
    """Per member: `ca.crt`, `node.crt`, `node.key` (what `kvstore serve --certs-dir` takes)."""

    @property
    def ca(self) -> Path:
        return self.client_dir / CA_CERT

    @property
    def client_cert(self) -> Path:
        return self.client_dir / client_cert_name(BENCH_USER)

    @property
    def client_key(self) -> Path:
        return self.client_dir / client_key_name(BENCH_USER)

    def node_cert(self, member: int) -> Path:
        return self.node_dirs[member] / NODE_CERT

    def node_key(self, member: int) -> Path:
        return self.node_dirs[member] / NODE_KEY


def make_cluster_certs(root: Path, members: list[int], host: str = "127.0.0.1") -> ClusterCerts:
    """A fresh CA under `root/certs` (its key stays there), a certificate per member under
    `root/certs-n<id>`, and the client certificate of `BENCH_USER`."""
    client_dir = root / "certs"
    create_ca(client_dir)
    ca_key = client_dir / "ca.key"
    create_client(client_dir, BENCH_USER)
    node_dirs: dict[int, Path] = {}
    for m in members:
        d = root / f"certs-n{m}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(client_dir / CA_CERT, d / CA_CERT)
        create_node(d, m, [host], ca_key=ca_key)
        node_dirs[m] = d
    return ClusterCerts(client_dir, node_dirs)
