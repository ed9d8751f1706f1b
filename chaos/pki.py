"""The certificates of a TLS chaos run (``kvchaos run --tls``, the default).

A run's PKI lives in ``RUN_DIR/certs`` and is made with the project's own tooling
(:mod:`kvstore.security.certs`, what ``kvstore cert`` runs), so a chaos run exercises exactly
the certificates an operator would make:

  certs/ca.crt, ca.key                    the run's CA (the cluster trusts it and nothing else)
  certs/client.<user>.crt/.key            client certificates: :data:`WORKLOAD_USER` (the
                                          workload's clients and its stale / pinned-read
                                          channels), :data:`ADMIN_USER` (the harness's admin,
                                          health-check and checker channels) and
                                          :data:`FORGER_USER` (the forge nemesis's case (b):
                                          a genuine client certificate aimed at internal RPCs)
  certs/n<id>/ca.crt, node.crt, node.key  one directory per node id (``kvstore serve
                                          --certs-dir``), valid for the address of the host the
                                          node runs on and naming its node id; made when a node
                                          id is first started (the membership nemesis starts new
                                          ids mid-run)
  certs/other-ca/...                      a second, unrelated CA with a client certificate and
                                          a node certificate (the forge nemesis's case (d): it
                                          must fail the handshake)

Invariants: the cluster's nodes only ever see ``certs/n<id>`` directories (never ``ca.key``);
a node certificate names exactly one node id and the one host address it is dialled at; the
other CA shares nothing with the run's CA. Everything is made once and reused (a restarted
node keeps its certificate; an existing directory is never overwritten).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore.security import certs
from kvstore.security.tls import client_credentials

__all__ = ["ADMIN_USER", "FORGER_USER", "WORKLOAD_USER", "RunPki"]

WORKLOAD_USER = "kvchaos"
ADMIN_USER = "kvchaos-admin"
FORGER_USER = "forger"
OTHER_CA = "other-ca"


def _node_creds(d: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (d / certs.CA_CERT).read_bytes(), (d / certs.NODE_KEY).read_bytes(), (d / certs.NODE_CERT).read_bytes()
    )


@dataclass(frozen=True, slots=True)
class RunPki:
    """A run's certificates under ``root`` (``RUN_DIR/certs``); see the module doc."""

    root: Path

    @classmethod
    def create(cls, root: Path) -> RunPki:
        """Make the CA, the client certificates and the other CA (idempotent: what exists is
        kept, so the execute phase can call this on a folder ``kvchaos run`` prepared)."""
        root = Path(root)
        if not (root / certs.CA_CERT).exists():
            certs.create_ca(root)
        for user in (WORKLOAD_USER, ADMIN_USER, FORGER_USER):
            if not (root / certs.client_cert_name(user)).exists():
                certs.create_client(root, user)
        other = root / OTHER_CA
        if not (other / certs.CA_CERT).exists():
            certs.create_ca(other)
            certs.create_client(other, FORGER_USER)
        return cls(root)

    @property
    def ca_cert(self) -> bytes:
        return (self.root / certs.CA_CERT).read_bytes()

    def node_dir(self, node_id: int, host: str) -> Path:
        """The certs directory of node ``node_id`` (made on first use), valid for ``host`` (the
        IP or name the node is dialled at)."""
        d = self.root / f"n{node_id}"
        if not (d / certs.NODE_CERT).exists():
            certs.create_node(d, node_id, [host], ca_key=self.root / certs.CA_KEY)
        return d

    def client(self, user: str) -> grpc.ChannelCredentials:
        """Channel credentials presenting ``client.<user>.crt`` and trusting the run's CA."""
        return client_credentials(self.root, user)

    def node(self, node_id: int, host: str) -> grpc.ChannelCredentials:
        """Channel credentials presenting node ``node_id``'s certificate (what a peer holds)."""
        return _node_creds(self.node_dir(node_id, host))

    def scraper_context(self, user: str) -> ssl.SSLContext:
        """The TLS context a metrics scraper uses on a secure node (its `/metrics` is HTTPS with
        mutual TLS): trusts the run's CA and presents ``client.<user>.crt``."""
        ctx = ssl.create_default_context(cafile=str(self.root / certs.CA_CERT))
        ctx.load_cert_chain(str(self.root / certs.client_cert_name(user)),
                            str(self.root / certs.client_key_name(user)))
        return ctx

    def ca_only(self) -> grpc.ChannelCredentials:
        """TLS that trusts the run's CA but presents no certificate at all."""
        return grpc.ssl_channel_credentials(self.ca_cert)

    def other_client(self) -> grpc.ChannelCredentials:
        """A client certificate of another CA (trusting the run's CA, so only the server's
        check of the client can refuse it)."""
        other = self.root / OTHER_CA
        return grpc.ssl_channel_credentials(
            self.ca_cert, (other / certs.client_key_name(FORGER_USER)).read_bytes(),
            (other / certs.client_cert_name(FORGER_USER)).read_bytes(),
        )

    def other_node(self, node_id: int, host: str) -> grpc.ChannelCredentials:
        """A node certificate of another CA naming ``node_id`` at ``host``: a perfect forgery of
        that node's identity, but not signed by the cluster's CA."""
        d = self.root / OTHER_CA / f"n{node_id}"
        if not (d / certs.NODE_CERT).exists():
            certs.create_node(d, node_id, [host], ca_key=self.root / OTHER_CA / certs.CA_KEY)
        return grpc.ssl_channel_credentials(
            self.ca_cert, (d / certs.NODE_KEY).read_bytes(), (d / certs.NODE_CERT).read_bytes()
        )
