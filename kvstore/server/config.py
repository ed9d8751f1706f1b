"""Node configuration: flags, environment (KVSTORE_*) and defaults, loaded once into NodeConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvstore.node.host import RaftSettings
from kvstore.node.retention import MAX_KEEP
from kvstore.node.version import SUPPORTED_LEVEL
from kvstore.security.audit import AuditSettings
from kvstore.security.net import is_loopback
from kvstore.shard.endpoints import check_address
from kvstore.shard.shardmap import MAX_GROUP_ID
from kvstore.storage.commands import MAX_KEY_SIZE, command_size_bound
from kvstore.storage.lmdbckpt import STATE_SYNC_MODES
from kvstore.storage.writeback import DEFAULT_INTERVAL_MS as DEFAULT_WRITEBACK_MS

from .admission_settings import AdmissionSettings
from .gctune import DEFAULT_GEN0
from .reads import ReadSettings

MAX_WRITEBACK_MS = 60_000

META_GROUP = 0
"""The metadata group: holds the shard map, replicated on every voter of the cluster."""


@dataclass(slots=True)
class Limits:
    """Size limits of client requests: ONE limit per quantity, enforced identically by the client
    library (its defaults are these), the server's validation and the command encoder.

    Invariants (`validate`): `max_key` is at most `MAX_KEY_SIZE`, the longest key the storage can
    hold (so a key the server accepts can always be encoded and stored), and `max_request` admits
    the largest valid command (a CAS with a key and two values at their limits), so that a key or
    value at exactly its limit always works and one byte over gets KEY/VALUE_TOO_LARGE (definite).
    """

    max_key: int = MAX_KEY_SIZE
    max_value: int = 1 << 20
    max_request: int = 4 << 20

    def validate(self) -> None:
        if not 1 <= self.max_key <= MAX_KEY_SIZE:
            raise ValueError(f"--max-key must be in 1..{MAX_KEY_SIZE} (the storage's key limit)")
        if self.max_value < 0:
            raise ValueError("--max-value must be >= 0")
        need = command_size_bound(self.max_key, self.max_value)
        if self.max_request < need:
            raise ValueError(
                f"--max-request must be >= {need} (a CAS with a key and two values at their limits)"
            )


@dataclass(slots=True)
class NodeConfig:
    id: int
    data_dir: Path
    listen: str
    peers: dict[int, str]
    cluster_id: str = "kvstore"
    join: bool = False
    """Start without bootstrapping: wait to be added to an existing cluster (`kvctl member add`)."""
    learner: bool = False
    """A read replica: start like `join`, and ask the cluster to add this node as a learner."""
    force_new_cluster: bool = False
    """Recovery after losing quorum: make this node's data a new single-member cluster
    (`kvstore.node.forcenew`); the other --peers are ignored."""
    plant_xtxn_halt: str = ""
    """PLANTED FAULT for recovery tests only (`kvstore serve`'s hidden `--plant-xtxn-halt`,
    `xtxn_run.PLANT_ENV`): where this node's transaction coordinator halts; "" never."""
    plant_watch_bug: str = ""
    """PLANTED BUG for kvchaos's watch-check tests only (hidden `--plant-watch-bug`,
    `watch_service.PLANT_ENV`): ``drop`` or ``repeat``; "" never."""
    feature_level: int = SUPPORTED_LEVEL
    """The feature level this node advertises (`kvstore.node.version`): this binary's highest by
    default; lower only to run a node as an older release would (upgrade tests)."""
    advertise: str = ""
    """Address peers and clients use to reach this node (defaults to `listen`)."""
    client_listen: str = ""
    """HOST:PORT of the client-only port (`--client-listen`; "" for none): the client services
    only, with server-side TLS and no client certificate asked (with `certs_dir`); every call but
    login and health needs a token, and auth must be enabled (`server/clientport.py`)."""
    client_advertise: str = ""
    """Address clients reach the client port at (defaults to `client_listen`), published in the
    shard map."""
    metrics_listen: str = ""
    """HOST:PORT of `/metrics`, `/livez` and `/readyz` (`--metrics-listen`; "" for none)."""
    request_timeout: float = 5.0
    drain_timeout: float = 5.0
    """Seconds a SIGTERM'd node spends handing the groups it leads to other voters (and waiting
    for its writes in flight to be answered) before it stops anyway (`--drain-timeout`; 0: no
    drain)."""
    sync: bool = True
    state_sync: str = "checkpoint"
    """How the state machine (LMDB) becomes durable (`--state-sync`): `checkpoint` (the default:
    no apply transaction synced; the checkpointer makes them durable and a restart after a crash
    replays the WAL from the last checkpoint: `storage/store.py`) or `commit` (every apply
    transaction synced)."""
    inline_apply: int = 16
    """A Ready cycle that only applies at most this many committed entries and waits for no
    disk (`NodeStore.waits_for_disk`) runs on the event loop, not the persist thread
    (`--inline-apply`; 0: never)."""
    inline_persist: int = 4
    """A Ready cycle that writes at most this many new entries (and applies at most
    `inline_apply`) runs on the event loop although it flushes: the loop waits out the
    `fdatasync` instead of handing the call to the persist thread and back (`--inline-persist`;
    0: never)."""
    lmdb_writeback_ms: int = DEFAULT_WRITEBACK_MS
    """Checkpoint mode: start the writeback of LMDB's dirty pages every this many milliseconds
    between checkpoints, so they reach the disk steadily instead of in bursts that stall every
    WAL flush (`--lmdb-writeback-ms`; `storage/writeback.py`; timing only; 0: off)."""
    gc_threshold: int = DEFAULT_GEN0
    """Allocations per young garbage collection once the node started; what exists then is
    frozen out of every collection (`--gc-threshold`; `server/gctune.py`; 0: CPython's
    settings)."""
    wal_segment_bytes: int = 8 << 20
    """Size of a segment of the node's write-ahead log (`--wal-segment-bytes`; preallocated)."""
    raft: RaftSettings = field(default_factory=RaftSettings)
    limits: Limits = field(default_factory=Limits)
    groups: int = 1
    """Data groups a new cluster starts with."""
    replication: int = 3
    vnodes: int = 128
    reads: ReadSettings = field(default_factory=ReadSettings)
    certs_dir: Path | None = None
    """TLS: ca.crt, node.crt, node.key (`kvstore cert ...`). None: plaintext."""
    insecure: bool = False
    """Allow plaintext on a non-loopback address (`--insecure`)."""
    audit: AuditSettings | None = None
    """The audit log (`--audit-log PATH ...`); None: no audit log."""

    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    """Rate limits, load shedding, the space quota and connection limits (all off by default)."""
    history_retention: float = 0.0
    """Seconds of MVCC history kept (`--history-retention`): the metadata leader compacts every
    group at now - this, periodically. 0: no automatic compaction."""
    history_retention_revisions: int = 0
    """The cluster's newest write revisions kept (`--history-retention-revisions`): the metadata
    leader compacts every group at one revision that keeps them (`kvstore.node.retention`).
    0: off. Not with `history_retention`."""
    history_retention_interval: float = 0.0
    """Seconds between automatic compactions (0: min(60, history_retention / 2) by time, 300 by
    revisions, as etcd's revision mode)."""
    lease_orphan_sweep: float = 5.0
    """Seconds between two passes of each data group's orphan-attachment sweep
    (`--lease-orphan-sweep`, `kvstore/node/orphans.py`)."""

    @property
    def audit_writes(self) -> bool:
        return self.audit is not None and self.audit.writes

    def validate(self) -> None:
        if self.state_sync not in STATE_SYNC_MODES:
            raise ValueError(f"--state-sync {self.state_sync!r} must be one of {', '.join(STATE_SYNC_MODES)}")
        if not 64 << 10 <= self.wal_segment_bytes <= 1 << 30:
            raise ValueError(f"--wal-segment-bytes {self.wal_segment_bytes} must be in 64K..1G")
        if not 0 <= self.history_retention <= 100 * 365 * 86400:
            raise ValueError(f"--history-retention {self.history_retention} must be 0 (off) or a positive duration")
        if self.history_retention and self.history_retention_revisions:
            raise ValueError("--history-retention and --history-retention-revisions exclude each other: choose one")
        if not 0 <= self.history_retention_revisions <= MAX_KEEP:
            raise ValueError(f"--history-retention-revisions {self.history_retention_revisions} must be in 0..{MAX_KEEP}")
        if not (self.history_retention_interval == 0 or 0.1 <= self.history_retention_interval <= 86400):
            raise ValueError(f"--history-retention-interval {self.history_retention_interval} must be 0 or in 0.1..86400")
        if not 0.1 <= self.lease_orphan_sweep <= 3600:
            raise ValueError(f"--lease-orphan-sweep {self.lease_orphan_sweep} must be in 0.1..3600 seconds")
        if not 0 <= self.lmdb_writeback_ms <= MAX_WRITEBACK_MS:
            raise ValueError(f"--lmdb-writeback-ms {self.lmdb_writeback_ms} must be in 0..{MAX_WRITEBACK_MS}")
        if not 0 <= self.drain_timeout <= 3600:
            raise ValueError(f"--drain-timeout {self.drain_timeout} must be in 0..3600 seconds")
        if not 1 <= self.feature_level <= SUPPORTED_LEVEL:
            raise ValueError(f"feature level {self.feature_level} must be in 1..{SUPPORTED_LEVEL} (this release's)")
        self.limits.validate()
        self.admission.validate()
        if self.audit is not None:
            self.audit.validate()
        if self.id < 1:
            raise ValueError("--id must be >= 1")
        if not self.join and self.id not in self.peers:
            raise ValueError(f"--peers must include this node (id {self.id})")
        if self.force_new_cluster and self.join:
            raise ValueError("--force-new-cluster starts from this node's own data: not with --join or --learner")
        if self.learner and not any(nid != self.id for nid in self.peers):
            raise ValueError("--learner needs the address of at least one other member in --peers")
        for nid, addr in self.peers.items():
            if nid < 1 or ":" not in addr:
                raise ValueError(f"bad peer {nid}={addr!r}: expected ID=HOST:PORT")
        if self.groups < 1 or self.replication < 1 or not 1 <= self.vnodes <= 4096:
            raise ValueError("--groups and --replication must be >= 1, --vnodes in 1..4096")
        if self.groups > MAX_GROUP_ID:
            raise ValueError(f"--groups must be at most {MAX_GROUP_ID} (group ids are revision slots)")
        if ":" not in self.listen:
            raise ValueError(f"bad --listen {self.listen!r}: expected HOST:PORT")
        if self.client_listen or self.client_advertise:
            if not self.client_listen:
                raise ValueError("--client-advertise needs --client-listen")
            for flag, value in (("--client-listen", self.client_listen), ("--client-advertise", self.client_address)):
                try:
                    check_address(value)
                except ValueError as err:
                    raise ValueError(f"bad {flag}: {err}") from None
            if not self.client_advertise and _wildcard(self.client_listen):
                raise ValueError("--client-listen on every interface needs --client-advertise (the address "
                                 "clients reach it at)")
            if self.client_listen == self.listen:
                raise ValueError("--client-listen must differ from --listen")
        if self.certs_dir is None and not self.insecure:
            exposed = [a for a in dict.fromkeys([self.listen, self.address, self.client_listen, self.client_address])
                       if a and not is_loopback(a.rpartition(":")[0])]
            if exposed:
                raise ValueError(
                    f"refusing to serve plaintext on non-loopback address(es) {', '.join(exposed)}: give "
                    "--certs-dir (see `kvstore cert --help`), or --insecure to run without TLS anyway"
                )

    @property
    def address(self) -> str:
        return self.advertise or self.peers.get(self.id) or self.listen

    @property
    def client_address(self) -> str:
        """The client port's address published to clients ("" without a client port)."""
        return self.client_advertise or self.client_listen


def _wildcard(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("", "0.0.0.0", "::")


def parse_peers(text: str) -> dict[int, str]:
    """`1=127.0.0.1:2379,2=127.0.0.1:2380` -> {1: "127.0.0.1:2379", 2: ...}."""
    peers: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        nid, sep, addr = part.partition("=")
        if not sep or not nid.strip().isdigit():
            raise ValueError(f"bad peer {part!r}: expected ID=HOST:PORT")
        peers[int(nid)] = addr.strip()
    return peers
