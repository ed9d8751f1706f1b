"""gRPC TLS for kvstore: server and channel credentials from a certs directory, certificate
reload (SIGHUP), and the identity of the peer behind an internal RPC.

Design: the node's main (peer) port serves clients and peers, so it REQUIRES a client certificate
signed by the cluster's CA from every connection when TLS is on (`require_client_auth=True`); the
optional client-only port (`--client-listen`, `server/clientport.py`) asks for none and serves
token holders only (grpcio has no "verify a client certificate if presented" mode). A connection
without one, or with one from another CA, fails its handshake: the caller sees UNAVAILABLE and no
RPC of any service runs. Clients present `client.<user>.crt` (user `root` by default); nodes
present their `node.crt` both as servers and as clients of their peers. Which certificate may
call what is decided per RPC: the internal RPCs (`Raft.Send`, `Raft.SendSnapshot`,
`Shard.GroupPropose`, `Shard.ExportRange`) need a *node* certificate (extended key usage
serverAuth) naming the node id the request claims in `from` / `from_node` (`PeerVerifier`).

Invariants: private keys are read, never logged; a reload that fails (missing file, a key that is
not the certificate's, a certificate that does not name this node) changes nothing and is logged;
a reload that succeeds is used by every connection accepted or dialled after it, and connections
already open keep working (TLS authenticates a connection once, at its handshake).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certs import CA_CERT, NODE_CERT, NODE_KEY, NODE_URI_PREFIX, client_cert_name, client_key_name
from .net import host_of, is_loopback

log = logging.getLogger("kvstore.tls")

__all__ = ["CERTS_DIR_ENV", "DEFAULT_USER", "Identity", "NodeCerts", "NodeTls", "PeerVerifier",
           "client_credentials", "identity_of", "is_loopback"]

CERTS_DIR_ENV = "KVSTORE_CERTS_DIR"
DEFAULT_USER = "root"


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified certificate says about its holder."""

    node_ids: frozenset[int]
    """Node ids named by `kvstore://node/<id>` SAN URIs."""
    hosts: frozenset[str]
    """DNS names and IP addresses (normalized text) of its SANs."""
    is_node: bool
    """It may act as a server (extended key usage serverAuth): a node certificate."""
    common_name: str

    @property
    def user(self) -> str:
        return self.common_name


def identity_of(cert: x509.Certificate) -> Identity:
    ids: set[int] = set()
    hosts: set[str] = set()
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    if sans is not None:
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(NODE_URI_PREFIX) and uri[len(NODE_URI_PREFIX):].isdigit():
                ids.add(int(uri[len(NODE_URI_PREFIX):]))
        hosts.update(h.lower().rstrip(".") for h in sans.get_values_for_type(x509.DNSName))
        hosts.update(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        is_node = ExtendedKeyUsageOID.SERVER_AUTH in eku
    except x509.ExtensionNotFound:
        is_node = False  # a certificate that does not say it may serve is not a node's
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    return Identity(frozenset(ids), frozenset(hosts), is_node, cn)


class PeerVerifier:
    """Checks that the caller of an internal RPC is the node it claims to be.

    The caller's certificate was verified against the cluster's CA by the TLS handshake; here it
    must be a node certificate (serverAuth) that names the claimed node: its SAN URI
    `kvstore://node/<id>` is authoritative when present; a node certificate without such a URI
    (e.g. one per StatefulSet pod, issued for its hostname) matches when one of its DNS/IP SANs is
    the host of the address the cluster has for that node (`address_of`).
    """

    def __init__(self, address_of: Callable[[int], str]) -> None:
        self.address_of = address_of
        self._cache: dict[bytes, Identity] = {}

    def identity(self, context: grpc.aio.ServicerContext) -> Identity | None:
        """The verified certificate's identity, or None (no certificate: not a TLS connection)."""
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            return None
        pem = pems[0]
        ident = self._cache.get(pem)
        if ident is None:
            ident = identity_of(x509.load_pem_x509_certificate(pem))
            if len(self._cache) >= 1024:
                self._cache.clear()
            self._cache[pem] = ident
        return ident

    def refusal(self, context: grpc.aio.ServicerContext, claimed: int) -> str | None:
        """Why the caller may not speak for node `claimed` (None: it may)."""
        try:
            ident = self.identity(context)
        except ValueError:
            return "unreadable peer certificate"
        if ident is None:
            return "no peer certificate"
        if not ident.is_node:
            return f"a client certificate (CN {ident.common_name[:64]!r}) may not call internal RPCs"
        if ident.node_ids:
            if claimed in ident.node_ids:
                return None
            return f"certificate of node(s) {sorted(ident.node_ids)} claims to be node {claimed}"
        addr = self.address_of(claimed)
        if addr and host_of(addr) in ident.hosts:
            return None
        return f"certificate for hosts {sorted(ident.hosts)[:4]} does not match node {claimed} at {addr!r}"


# --- credentials ---------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None


def _check_pair(cert_pem: bytes, key_pem: bytes, where: Path) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"the key in {where} is not the certificate's")
    return cert


@dataclass(frozen=True, slots=True)
class NodeCerts:
    """A node's certificate material, read and checked together."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, certs_dir: Path, node_id: int) -> NodeCerts:
        """Read ca.crt, node.crt, node.key; raises (FileNotFoundError, ValueError) unless the key
        is the certificate's and the certificate is a node certificate naming `node_id` (or, for
        a hostname certificate, names no node id at all)."""
        ca, cert_pem, key = _read(certs_dir / CA_CERT), _read(certs_dir / NODE_CERT), _read(certs_dir / NODE_KEY)
        x509.load_pem_x509_certificates(ca)
        ident = identity_of(_check_pair(cert_pem, key, certs_dir / NODE_KEY))
        if not ident.is_node:
            raise ValueError(f"{certs_dir / NODE_CERT} is not a node certificate (no serverAuth usage)")
        if ident.node_ids and node_id not in ident.node_ids:
            raise ValueError(f"{certs_dir / NODE_CERT} is the certificate of node(s) {sorted(ident.node_ids)}, "
                             f"not of node {node_id}")
        return cls(ca, cert_pem, key)


class NodeTls:
    """A node's TLS: dynamic server credentials and the channel credentials of its outbound
    connections, both reloadable from `certs_dir` (`reload`, on SIGHUP).

    `generation` grows by one on every successful reload: holders of channels compare it with
    the generation their channel was made at and redial with `channel_credentials()`.
    """

    def __init__(self, certs_dir: Path, node_id: int) -> None:
        self.certs_dir = certs_dir
        self.node_id = node_id
        self._lock = threading.Lock()
        self.certs = NodeCerts.load(certs_dir, node_id)
        self.generation = 0
        self._channel_creds = self._make_channel_creds(self.certs)

    @staticmethod
    def _make_channel_creds(c: NodeCerts) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=c.ca, private_key=c.key, certificate_chain=c.cert)

    @staticmethod
    def _server_config(c: NodeCerts) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(c.key, c.cert)], root_certificates=c.ca)

    def server_credentials(self, require_client_certificate: bool = True) -> grpc.ServerCredentials:
        """Server credentials presenting the node's certificate. By default they require a client
        certificate of the cluster's CA on every connection (the peer port); with
        `require_client_certificate=False` (the client-only port, `server/clientport.py`) no client
        certificate is asked for at all. The certificate configuration is fetched again at each
        new handshake, so a reload applies to every connection accepted after it, on every port
        (each credentials object follows the reloads on its own)."""
        return grpc.dynamic_ssl_server_credentials(
            self._server_config(self.certs), self._fetcher(),
            require_client_authentication=require_client_certificate,
        )

    def _fetcher(self) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
        seen = self.generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC (from its own threads) before handshakes: None keeps the current config.
            nonlocal seen
            with self._lock:
                if seen == self.generation:
                    return None
                seen = self.generation
                return self._server_config(self.certs)

        return fetch

    def channel_credentials(self) -> grpc.ChannelCredentials:
        with self._lock:
            return self._channel_creds

    def reload(self) -> bool:
        """Read the certs directory again; on success new connections (both ways) use it.
        On failure nothing changes (the error is logged: never the key material)."""
        try:
            certs = NodeCerts.load(self.certs_dir, self.node_id)
        except (OSError, ValueError) as err:
            log.error("certificate reload from %s failed, keeping the current certificates: %s",
                      self.certs_dir, err)
            return False
        with self._lock:
            self.certs = certs
            self._channel_creds = self._make_channel_creds(certs)
            self.generation += 1
        log.info("certificates reloaded from %s (generation %d)", self.certs_dir, self.generation)
        return True


def client_credentials(certs_dir: Path | str, user: str = DEFAULT_USER) -> grpc.ChannelCredentials:
    """Channel credentials of a client: trust the cluster's CA, present `client.<user>.crt`."""
    d = Path(certs_dir)
    ca = _read(d / CA_CERT)
    cert, key = _read(d / client_cert_name(user)), _read(d / client_key_name(user))
    _check_pair(cert, key, d / client_key_name(user))
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
