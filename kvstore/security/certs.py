"""Create the certificates of a kvstore cluster (`kvstore cert ...`), CockroachDB-style.

A certs directory holds:
  ca.crt                      the cluster's CA certificate (every node and client trusts it)
  ca.key                      the CA's private key (only where certificates are made; `--ca-key`)
  node.crt, node.key          this node's certificate: serverAuth + clientAuth, SAN URI
                              `kvstore://node/<id>` plus the DNS names / IPs it is reached at
  client.<user>.crt/.key      a client certificate: clientAuth only, the user in the CN

Invariants: every private key file is created with mode 0600 (never world- or group-readable,
not even for an instant: it is opened O_EXCL with that mode, then renamed into place); no
existing file is replaced unless `overwrite` is given; keys are EC P-256; a node certificate
names exactly one node id; a client certificate never carries serverAuth, so it can never be
mistaken for a node's (see `kvstore.security.tls.PeerVerifier`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"
NODE_URI_PREFIX = "kvstore://node/"
"""A node certificate's identity: the SAN URI `kvstore://node/<id>`."""

CA_DAYS = 10 * 366
NODE_DAYS = 5 * 366
CLIENT_DAYS = 5 * 366
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")


def client_cert_name(user: str) -> str:
    return f"client.{user}.crt"


def client_key_name(user: str) -> str:
    return f"client.{user}.key"


def node_uri(node_id: int) -> str:
    return f"{NODE_URI_PREFIX}{node_id}"


def check_user(user: str) -> str:
    """A user name usable in a file name and a CN (letters, digits, `_ . -`); raises ValueError."""
    if not _USER_RE.match(user):
        raise ValueError(f"bad user name {user!r}: letters, digits, '_', '.', '-' (at most 63)")
    return user


@dataclass(frozen=True, slots=True)
class Written:
    """What a `create_*` call wrote."""

    cert: Path
    key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write `data` to `path` with `mode` from the first byte on (a temp file opened O_EXCL with
    that mode, fsynced, renamed into place). Refuses an existing `path` unless `overwrite`."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (use --overwrite to replace it)")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # in case the umask narrowed it (never widens beyond `mode`)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(certs_dir: Path, *, ca_key: Path | None = None, overwrite: bool = False,
              days: int = CA_DAYS) -> Written:
    """Create the cluster's CA: `certs_dir/ca.crt` (0644) and its key (0600, `ca_key` or
    `certs_dir/ca.key`)."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    key_path = ca_key or certs_dir / CA_KEY
    cert_path = certs_dir / CA_CERT
    for p in (cert_path, key_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists (use --overwrite to replace it)")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvstore"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "kvstore CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write(key_path, _key_pem(key), 0o600, overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite)
    return Written(cert_path, key_path)


def _load_ca(certs_dir: Path, ca_key: Path | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key. ca.crt comes from `certs_dir`, else from next to the key (and is
    then copied into `certs_dir`, which every node and client needs)."""
    key_path = ca_key or certs_dir / CA_KEY
    if not key_path.exists():
        raise FileNotFoundError(f"no CA key at {key_path} (create one with `kvstore cert create-ca`)")
    cert_path = certs_dir / CA_CERT
    if not cert_path.exists():
        beside = key_path.parent / CA_CERT
        if not beside.exists():
            raise FileNotFoundError(f"no {CA_CERT} in {certs_dir} nor next to {key_path}")
        certs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(beside, cert_path)
        os.chmod(cert_path, 0o644)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _leaf(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey, cn: str,
    sans: Sequence[x509.GeneralName], usages: Sequence[x509.ObjectIdentifier], days: int,
) -> x509.Certificate:
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvstore"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """DNS or IP SANs for `hosts` (an IP literal becomes an IP SAN)."""
    out: list[x509.GeneralName] = []
    for h in hosts:
        h = h.strip()
        if not h:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def create_node(
    certs_dir: Path, node_id: int, hosts: Sequence[str], *, ca_key: Path | None = None,
    overwrite: bool = False, days: int = NODE_DAYS,
) -> Written:
    """Create `certs_dir/node.crt` and `node.key` (0600) for node `node_id`, valid for `hosts`
    (the DNS names / IPs peers and clients dial it at) and identified by `kvstore://node/<id>`."""
    if node_id < 1:
        raise ValueError("--node-id must be >= 1")
    if not [h for h in hosts if h.strip()]:
        raise ValueError("a node certificate needs at least one --host (a DNS name or IP it is reached at)")
    cert_path, key_path = certs_dir / NODE_CERT, certs_dir / NODE_KEY
    for p in (cert_path, key_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists (use --overwrite to replace it)")
    ca, cakey = _load_ca(certs_dir, ca_key)
    key = _new_key()
    cert = _leaf(
        ca, cakey, key, f"kvstore-node-{node_id}",
        [x509.UniformResourceIdentifier(node_uri(node_id)), *host_names(hosts)],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days,
    )
    _write(key_path, _key_pem(key), 0o600, overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite)
    return Written(cert_path, key_path)


def create_client(
    certs_dir: Path, user: str, *, ca_key: Path | None = None, overwrite: bool = False, days: int = CLIENT_DAYS,
) -> Written:
    """Create `certs_dir/client.<user>.crt` and `.key` (0600): clientAuth only, CN = `user`."""
    check_user(user)
    cert_path, key_path = certs_dir / client_cert_name(user), certs_dir / client_key_name(user)
    for p in (cert_path, key_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists (use --overwrite to replace it)")
    ca, cakey = _load_ca(certs_dir, ca_key)
    key = _new_key()
    cert = _leaf(ca, cakey, key, user, [], [ExtendedKeyUsageOID.CLIENT_AUTH], days)
    _write(key_path, _key_pem(key), 0o600, overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite)
    return Written(cert_path, key_path)
