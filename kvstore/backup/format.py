"""The backup file of `kvctl snapshot save`: the whole keyspace at one revision. No I/O but the
file object handed in; imports only the standard library and `authstate` (standard library only).

Layout (integers big-endian):

    header   magic b"KVBK"  version:u8 (=1)
    record   tag:u8  length:u32  payload
               INFO (1)  exactly once, first: revision:u64 created_ms:u64 groups:u32
                         replication:u8 vnodes:u32  (the source cluster's shard-map facts)
               AUTH (2)  at most once, before any KEYS: the encoded auth state (users, roles)
               KEYS (3)  a chunk: count:u32, then per key klen:u16 vlen:u32 create:u64 mod:u64
                         version:u64 key value
               LEASES (4) after every KEYS: a chunk: count:u32, then per lease id:u64 ttl_s:u64
                         remaining_ms:u64 nkeys:u32, then per attached key klen:u16 key
               END  (0)  exactly once, last: keys:u64 records:u64
    trailer  SHA-256 (32 bytes) of every byte before it
    [etcd]   optional, for etcd's `Maintenance.Snapshot` (`etcd_envelope`): zero bytes, then
             the backup's length:u64, then the SHA-256 of every byte before it, so that the
             whole is 32 bytes past a multiple of 512 (what `etcdctl snapshot save` checks for)

Invariants a reader checks (`read_backup`, total: any damage raises `BackupFormatError` and
nothing else): the magic and version; every record's tag and length (a payload at most
`MAX_RECORD` bytes, read only as far as the file has it); INFO first and once, AUTH at most once
and decodable (`AuthState.decode`), END last with the counts of what came before; no key attached
to two leases (nor twice to one); keys strictly ascending across the
whole file, 1..`MAX_KEY` bytes, values at most `MAX_VALUE`; 1 <= create <= mod <= revision and
version >= 1 for every key; the trailer equals the SHA-256 of everything before it, and nothing
follows it but, optionally, a well-formed etcd envelope. Keys come in key order, so a restore streams them into each group's snapshot in order.

Memory: the writer holds one chunk (`CHUNK_BYTES`, or one key if larger); the reader one record.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from kvstore.security.authstate import AuthError, AuthState
from kvstore.shard.shardmap import MAX_GROUP_ID
from kvstore.storage import leases
from kvstore.storage.keylimit import MAX_KEY_SIZE
from kvstore.storage.mvcc import ROW_HEADER_BYTES
from kvstore.storage.snapfile import MAX_RECORD_VALUE

MAGIC = b"KVBK"
VERSION = 1
TAG_END = 0
TAG_INFO = 1
TAG_AUTH = 2
TAG_KEYS = 3
TAG_LEASES = 4
CHUNK_BYTES = 256 << 10
MAX_KEY = MAX_KEY_SIZE
MAX_VALUE = MAX_RECORD_VALUE - ROW_HEADER_BYTES
"""The longest value a restore can put in a group snapshot's history row (`snapfile` bounds a record)."""
MAX_RECORD = MAX_VALUE + (1 << 20)
MAX_AUTH = 1 << 20
REVISION_MAX = (1 << 63) - 1

_HEAD = struct.Struct(">4sB")
_REC = struct.Struct(">BI")
_INFO = struct.Struct(">QQIBI")
_COUNT = struct.Struct(">I")
_KV = struct.Struct(">HIQQQ")
_END = struct.Struct(">QQ")
_LEASE = struct.Struct(">QQQI")
_KLEN = struct.Struct(">H")
HASH_BYTES = 32


class BackupFormatError(ValueError):
    """The file is not a kvstore backup, or it is damaged (the message says where)."""


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """What the INFO record says: the revision R every key is as of, when the file was written,
    and the source cluster's data groups, replication and virtual nodes (restore's defaults)."""

    revision: int
    created_ms: int
    groups: int
    replication: int
    vnodes: int


@dataclass(frozen=True, slots=True)
class BackupKey:
    """One key as of the backup's revision, with etcd's metadata."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True, slots=True)
class BackupLease:
    """A live lease when the backup was saved: its granted TTL, its remaining TTL then, and the
    keys attached to it (ids strictly ascending in the file)."""

    id: int
    ttl_s: int
    remaining_ms: int
    keys: tuple[bytes, ...] = ()


def check_lease(le: BackupLease, prev: int) -> None:
    """BackupFormatError unless `le` is valid after the lease of id `prev`."""
    try:
        leases.check_id(le.id)
        leases.check_ttl(le.ttl_s)
    except ValueError as err:
        raise BackupFormatError(f"lease: {err}") from None
    if le.id <= prev:
        raise BackupFormatError(f"leases out of order at {le.id:x}")
    if not 0 <= le.remaining_ms <= le.ttl_s * 1000:
        raise BackupFormatError(f"lease {le.id:x}: remaining {le.remaining_ms} ms beyond its TTL of {le.ttl_s} s")
    for k in le.keys:
        if not 1 <= len(k) <= MAX_KEY:
            raise BackupFormatError(f"lease {le.id:x}: an attached key of {len(k)} bytes (1..{MAX_KEY})")


def check_attachments(le: BackupLease, attached: set[bytes]) -> None:
    """BackupFormatError if `le` names a key twice or a key of `attached` (the keys of the leases
    before it): a key has at most one lease (a forged file, or a save that raced a key's
    re-attachment). Adds its keys to `attached` only if it passes."""
    if len(set(le.keys)) != len(le.keys):
        raise BackupFormatError(f"lease {le.id:x} lists an attached key twice")
    for k in le.keys:
        if k in attached:
            raise BackupFormatError(f"key {k[:64]!r} is attached to lease {le.id:x} and to an earlier lease")
    attached.update(le.keys)


def encode_lease(le: BackupLease) -> bytes:
    return _LEASE.pack(le.id, le.ttl_s, le.remaining_ms, len(le.keys)) + b"".join(
        _KLEN.pack(len(k)) + k for k in le.keys)


def decode_leases(payload: bytes) -> list[BackupLease]:
    """A LEASES record's leases (total: BackupFormatError on any damage; order is the caller's)."""
    if len(payload) < _COUNT.size:
        raise BackupFormatError("lease chunk without its count")
    (count,) = _COUNT.unpack_from(payload)
    if count == 0:
        raise BackupFormatError("empty lease chunk")
    pos, n, out = _COUNT.size, len(payload), []
    for _ in range(count):
        if n - pos < _LEASE.size:
            raise BackupFormatError("lease chunk truncated in a lease's header")
        lid, ttl, rem, nkeys = _LEASE.unpack_from(payload, pos)
        pos += _LEASE.size
        keys = []
        for _ in range(nkeys):
            if n - pos < _KLEN.size:
                raise BackupFormatError("lease chunk truncated in a key's length")
            (klen,) = _KLEN.unpack_from(payload, pos)
            pos += _KLEN.size
            if n - pos < klen:
                raise BackupFormatError("lease chunk truncated in a key")
            keys.append(payload[pos : pos + klen])
            pos += klen
        out.append(BackupLease(lid, ttl, rem, tuple(keys)))
    if pos != n:
        raise BackupFormatError(f"lease chunk has {n - pos} bytes after its {count} leases")
    return out


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """A verified file: its info, auth state (b"" if none), counts, size and hash."""

    info: BackupInfo
    auth: bytes
    keys: int
    records: int
    size: int
    sha256: str


def check_info(info: BackupInfo) -> None:
    if not 0 <= info.revision <= REVISION_MAX:
        raise BackupFormatError(f"revision {info.revision} out of range")
    if not 1 <= info.groups <= MAX_GROUP_ID:
        raise BackupFormatError(f"{info.groups} data groups (1..{MAX_GROUP_ID})")
    if not 1 <= info.replication <= 7:
        raise BackupFormatError(f"replication {info.replication} (1..7)")
    if not 1 <= info.vnodes <= 4096:
        raise BackupFormatError(f"{info.vnodes} virtual nodes (1..4096)")


def check_key(k: BackupKey, revision: int, prev: bytes | None) -> None:
    if not 1 <= len(k.key) <= MAX_KEY:
        raise BackupFormatError(f"a key of {len(k.key)} bytes (1..{MAX_KEY})")
    if len(k.value) > MAX_VALUE:
        raise BackupFormatError(f"a value of {len(k.value)} bytes (at most {MAX_VALUE})")
    if prev is not None and k.key <= prev:
        raise BackupFormatError(f"keys out of order at {k.key!r}")
    if not (1 <= k.create_revision <= k.mod_revision <= revision) or k.version < 1:
        raise BackupFormatError(
            f"key {k.key!r}: create {k.create_revision}, mod {k.mod_revision}, version {k.version} "
            f"are not 1 <= create <= mod <= revision {revision} with version >= 1"
        )


class BackupWriter:
    """Writes a backup to an open binary file: `add` keys in ascending order, then `finish`.
    Validates what it writes with the reader's rules (a file it writes always reads back)."""

    def __init__(self, f: BinaryIO, info: BackupInfo, auth: bytes = b"") -> None:
        check_info(info)
        if len(auth) > MAX_AUTH:
            raise BackupFormatError(f"auth state of {len(auth)} bytes (at most {MAX_AUTH})")
        if auth:
            try:  # the reader decodes it: a save must not write a file its restore refuses
                AuthState.decode(auth)
            except AuthError as err:
                raise BackupFormatError(f"auth state does not decode: {err}") from None
        self._f = f
        self._hash = hashlib.sha256()
        self.info = info
        self.keys = 0
        self.records = 0
        self.size = 0
        self._prev: bytes | None = None
        self._chunk = bytearray()
        self._chunk_count = 0
        self.leases = 0
        self._prev_lease = 0
        self._attached: set[bytes] = set()
        self._write(_HEAD.pack(MAGIC, VERSION))
        self._record(TAG_INFO, _INFO.pack(info.revision, info.created_ms, info.groups, info.replication, info.vnodes))
        if auth:
            self._record(TAG_AUTH, auth)

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._f.write(data)
        self.size += len(data)

    def _record(self, tag: int, payload: bytes) -> None:
        self._write(_REC.pack(tag, len(payload)))
        self._write(payload)
        self.records += 1

    def add(self, k: BackupKey) -> None:
        if self.leases:
            raise BackupFormatError("keys after leases")
        check_key(k, self.info.revision, self._prev)
        self._prev = k.key
        self._chunk += _KV.pack(len(k.key), len(k.value), k.create_revision, k.mod_revision, k.version)
        self._chunk += k.key
        self._chunk += k.value
        self._chunk_count += 1
        self.keys += 1
        if len(self._chunk) >= CHUNK_BYTES:
            self._flush()

    def add_lease(self, le: BackupLease) -> None:
        """A lease (after every key; ids ascending)."""
        check_lease(le, self._prev_lease)
        enc = encode_lease(le)
        if len(enc) + _COUNT.size > MAX_RECORD:
            raise BackupFormatError(f"lease {le.id:x} has too many keys for one record")
        check_attachments(le, self._attached)
        if not self.leases:
            self._flush()
        if len(self._chunk) + len(enc) > CHUNK_BYTES:
            self._flush()
        self._prev_lease = le.id
        self._chunk += enc
        self._chunk_count += 1
        self.leases += 1

    def _flush(self) -> None:
        if self._chunk_count:
            tag = TAG_LEASES if self.leases else TAG_KEYS
            self._record(tag, _COUNT.pack(self._chunk_count) + bytes(self._chunk))
            self._chunk.clear()
            self._chunk_count = 0

    def finish(self) -> str:
        """Write the END record and the trailer; returns the SHA-256 (hex)."""
        self._flush()
        self._record(TAG_END, _END.pack(self.keys, self.records + 1))
        digest = self._hash.digest()
        self._f.write(digest)
        self.size += len(digest)
        return digest.hex()


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise BackupFormatError(f"file truncated in {what} ({len(data)} of {n} bytes)")
    return data


def _decode_keys(payload: bytes) -> Iterator[BackupKey]:
    if len(payload) < _COUNT.size:
        raise BackupFormatError("key chunk without its count")
    (count,) = _COUNT.unpack_from(payload)
    if count == 0:
        raise BackupFormatError("empty key chunk")
    pos, n = _COUNT.size, len(payload)
    for _ in range(count):
        if n - pos < _KV.size:
            raise BackupFormatError("key chunk truncated in a key's header")
        klen, vlen, create, mod, version = _KV.unpack_from(payload, pos)
        pos += _KV.size
        if n - pos < klen + vlen:
            raise BackupFormatError("key chunk truncated in a key")
        key = payload[pos : pos + klen]
        value = payload[pos + klen : pos + klen + vlen]
        pos += klen + vlen
        yield BackupKey(key, value, create, mod, version)
    if pos != n:
        raise BackupFormatError(f"key chunk has {n - pos} bytes after its {count} keys")


class BackupReader:
    """Streams a backup file record by record, checking every invariant of the module docstring.
    `info` and `auth` are read on open (they precede the keys); iterate `entries()` once to the end:
    only then is the file verified (the hash is checked after the END record)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0
        self.records = 0
        head = self._read(_HEAD.size, "the header")
        magic, version = _HEAD.unpack(head)
        if magic != MAGIC:
            raise BackupFormatError(f"not a kvstore backup (magic {magic!r})")
        if version != VERSION:
            raise BackupFormatError(f"unknown backup format version {version}")
        tag, payload = self._next()
        if tag != TAG_INFO or len(payload) != _INFO.size:
            raise BackupFormatError("the first record is not a well-formed INFO record")
        self.info = BackupInfo(*_INFO.unpack(payload))
        check_info(self.info)
        self.auth = b""
        self._pending: tuple[int, bytes] | None = self._next()
        if self._pending[0] == TAG_AUTH:
            self.auth = self._pending[1]
            if not self.auth or len(self.auth) > MAX_AUTH:
                raise BackupFormatError(f"auth record of {len(self.auth)} bytes (1..{MAX_AUTH})")
            try:
                AuthState.decode(self.auth)
            except AuthError as err:
                raise BackupFormatError(f"auth record does not decode: {err}") from None
            self._pending = None
        self.keys_read = 0
        self.sha256 = ""
        self.leases: list[BackupLease] = []
        """The leases, once `entries()` has run to the end."""
        self._attached: set[bytes] = set()

    def _read(self, n: int, what: str) -> bytes:
        data = _read_exact(self._f, n, what)
        self._hash.update(data)
        self.size += n
        return data

    def _next(self) -> tuple[int, bytes]:
        tag, length = _REC.unpack(self._read(_REC.size, "a record header"))
        if tag not in (TAG_END, TAG_INFO, TAG_AUTH, TAG_KEYS, TAG_LEASES):
            raise BackupFormatError(f"unknown record tag {tag}")
        if length > MAX_RECORD:
            raise BackupFormatError(f"record of {length} bytes (at most {MAX_RECORD})")
        payload = self._read(length, f"a record of tag {tag}")
        self.records += 1
        return tag, payload

    def entries(self) -> Iterator[BackupKey]:
        """Every key in order; raises BackupFormatError on any damage (possibly after yielding
        the keys before it: use the keys only once the iteration has ended)."""
        prev: bytes | None = None
        rev = self.info.revision
        while True:
            if self._pending is not None:
                (tag, payload), self._pending = self._pending, None
            else:
                tag, payload = self._next()
            if tag == TAG_END:
                break
            if tag == TAG_LEASES:
                for le in decode_leases(payload):
                    check_lease(le, self.leases[-1].id if self.leases else 0)
                    check_attachments(le, self._attached)
                    self.leases.append(le)
                continue
            if tag != TAG_KEYS or self.leases:
                raise BackupFormatError(f"record of tag {tag} among the keys")
            for k in _decode_keys(payload):
                check_key(k, rev, prev)
                prev = k.key
                self.keys_read += 1
                yield k
        if len(payload) != _END.size:
            raise BackupFormatError("END record is malformed")
        keys, records = _END.unpack(payload)
        if (keys, records) != (self.keys_read, self.records):
            raise BackupFormatError(
                f"END says {keys} keys in {records} records; the file has {self.keys_read} in {self.records}"
            )
        want = self._hash.digest()
        got = _read_exact(self._f, HASH_BYTES, "the SHA-256 trailer")
        if got != want:
            raise BackupFormatError(f"SHA-256 mismatch: the file says {got.hex()}, its contents hash to {want.hex()}")
        self.size += HASH_BYTES
        self.sha256 = want.hex()
        rest = self._f.read(ENVELOPE_MAX + 1)
        if rest and rest != etcd_envelope(self.size, self._hash_with(got)):
            raise BackupFormatError("data after the SHA-256 trailer (not an etcd snapshot envelope)")

    def _hash_with(self, trailer: bytes) -> Any:
        h = self._hash.copy()
        h.update(trailer)
        return h


ENVELOPE_ALIGN = 512
ENVELOPE_MAX = ENVELOPE_ALIGN + 8 + HASH_BYTES
"""An etcd envelope's most bytes."""


def etcd_envelope(size: int, hashed: Any) -> bytes:
    """The bytes that follow a `size`-byte backup in etcd's snapshot stream: zeros, the size as
    u64, and the SHA-256 of everything before it (`hashed`: a hashlib SHA-256 of the backup's
    `size` bytes, not changed here), so the whole is 32 bytes past a multiple of 512."""
    pad = (-(size + 8)) % ENVELOPE_ALIGN
    body = bytes(pad) + struct.pack(">Q", size)
    h = hashed.copy()
    h.update(body)
    return body + h.digest()


def verify(f: BinaryIO) -> BackupSummary:
    """Read a whole backup; its summary if intact, else BackupFormatError."""
    r = BackupReader(f)
    for _ in r.entries():
        pass
    return BackupSummary(r.info, r.auth, r.keys_read, r.records, r.size, r.sha256)
