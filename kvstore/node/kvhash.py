"""The hash of a group's key space at a revision (`Admin.HashKV`, `kvctl check`).

Definition (the same on every replica, whatever its physical layout or compaction state): for
each key present at revision R, in ascending key order, the record
`len(key) key create_revision mod_revision version len(value) value` (lengths and numbers as
8-byte big-endian unsigned integers; revisions are positive int64s) fed to BLAKE2b with a
32-byte digest, after the 16-byte domain tag `kvstore-hashkv-1`. Deleted keys and versions after
R contribute nothing, so two replicas that applied the group's log through (at least) the entry
of revision R give the same hash, and any difference in a key, value or metadata at or below R
changes it. Incremental (`add` per chunk), so a server can hash a big group a chunk at a time.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvstore.storage.mvcc import Version

__all__ = ["DOMAIN", "KVHasher"]

DOMAIN = b"kvstore-hashkv-1"
_HEAD = struct.Struct(">QQQQ")
_LEN = struct.Struct(">Q")


@dataclass(slots=True)
class KVHasher:
    """Invariant: `keys` counts the records added; `add` must see keys in ascending order (a
    store's scan order) for two replicas' hashes to be comparable."""

    keys: int = 0
    _h: hashlib.blake2b = field(default_factory=lambda: hashlib.blake2b(DOMAIN, digest_size=32))

    def add(self, items: Iterable[tuple[bytes, Version]]) -> None:
        h = self._h
        for key, v in items:
            if v.value is None:
                continue  # absent at the revision
            m = v.meta
            h.update(_HEAD.pack(len(key), m.create_revision, m.mod_revision, m.version))
            h.update(key)
            h.update(_LEN.pack(len(v.value)))
            h.update(v.value)
            self.keys += 1

    def digest(self) -> bytes:
        return self._h.digest()
