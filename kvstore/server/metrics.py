"""Prometheus metrics of a node (served on --metrics-listen when given)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.term = Gauge("kvstore_raft_term", "Current Raft term", ["group"], registry=r)
        self.leader = Gauge("kvstore_raft_leader", "Leader node id as seen by this node", ["group"], registry=r)
        self.is_leader = Gauge("kvstore_raft_is_leader", "1 if this node leads the group", ["group"], registry=r)
        self.commit = Gauge("kvstore_raft_commit_index", "Commit index", ["group"], registry=r)
        self.applied = Gauge("kvstore_raft_applied_index", "Applied index", ["group"], registry=r)
        self.sessions = Gauge(
            "kvstore_sessions", "Client sessions the group keeps (replicated state, capped)", ["group"], registry=r
        )
        self.sessions_evicted = Gauge(
            "kvstore_sessions_evicted", "Client sessions the group evicted so far (replicated state)", ["group"],
            registry=r,
        )
        self.proposal_seconds = Histogram(
            "kvstore_proposal_seconds", "Time from proposal to applied", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.fsync_seconds = Histogram(
            "kvstore_persist_seconds", "Time of one persist+apply transaction (including fsync)", registry=r,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        self.gc_pause_seconds = Histogram(
            "kvstore_gc_pause_seconds", "Pause of one cyclic garbage collection, by generation (2: full)",
            ["generation"], registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        self.ready_groups = Histogram(
            "kvstore_ready_groups", "Groups handled per Ready cycle", registry=r, buckets=(1, 2, 4, 8, 16, 64, 256)
        )
        self.messages_sent = Counter("kvstore_raft_messages_sent_total", "Raft messages sent", registry=r)
        self.messages_received = Counter("kvstore_raft_messages_received_total", "Raft messages received", registry=r)
        self.inbound_refused = Counter(
            "kvstore_inbound_refused_total",
            "Raft traffic from other nodes refused before reaching a core, by reason (malformed, "
            "not_member, unknown_group, not_group_member, term_jump, timeout_now, beyond_log, snapshot, identity)",
            ["reason"], registry=r,
        )
        self.reads = Counter("kvstore_reads_total", "Reads served", registry=r)
        self.writes = Counter("kvstore_writes_total", "Writes applied and answered", registry=r)
        self.storage_full = Gauge("kvstore_storage_full", "1 if the node stopped on a full disk", registry=r)
        self.admission_refused = Counter(
            "kvstore_admission_refused_total",
            "Client requests refused by admission control, by reason (rate_limit, apply_lag, memory, nospace)",
            ["reason"], registry=r,
        )
        self.alarms = Gauge("kvstore_alarms", "Cluster alarms raised (as this node applied them), by type",
                            ["type"], registry=r)
        self.watchers = Gauge("kvstore_watchers", "Watches this node serves", registry=r)
        self.watch_pending_bytes = Gauge(
            "kvstore_watch_pending_bytes", "Bytes of watch responses queued here, not yet sent", registry=r)
        self.watch_canceled = Gauge(
            "kvstore_watch_canceled", "Watches this node canceled since it started, by reason (slow, moved)",
            ["reason"], registry=r)
        self.watch_closes = Gauge(
            "kvstore_watch_closes", "CLOSE commands this node sent so that watches get past idle groups", registry=r)
        self.leases = Gauge("kvstore_leases", "Live leases homed in the groups this node leads", registry=r)
        self.lease_expired = Counter(
            "kvstore_lease_expired_total", "Leases this node's lease clock expired (EXPIRE applied)", registry=r)
        self.cluster_version = Gauge(
            "kvstore_cluster_version", "The cluster version (feature level) as this node applied it", registry=r)
        self.supported_level = Gauge(
            "kvstore_supported_feature_level", "The highest feature level this node's binary supports", registry=r)
