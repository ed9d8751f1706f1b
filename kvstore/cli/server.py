"""`kvstore`: run a node (`serve`) or a whole local cluster (`dev`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from kvstore.cli.audit import audit
from kvstore.cli.cert import cert
from kvstore.cli.restore import restore
from kvstore.cli.serve_env import NodeIdParam, add_natural_envvars, natural_envvars, resolve_node_id
from kvstore.node.host import RaftSettings
from kvstore.server.config import DEFAULT_WRITEBACK_MS, MAX_WRITEBACK_MS, NodeConfig, parse_peers
from kvstore.server.gctune import DEFAULT_GEN0
from kvstore.storage.commands import MAX_KEY_SIZE

DEV_BASE_PORT = 2379
DEV_CLIENT_PORT_OFFSET = 100
"""`dev --secure`: node i's client-only port is base port + 100 + i - 1 (2479, 2480, 2481)."""


@click.group(context_settings={"auto_envvar_prefix": "KVSTORE", "help_option_names": ["-h", "--help"]})
def cli() -> None:
    """kvstore: a Raft-based, linearizable key-value store."""


@cli.command()
@click.option("--id", "node_id", type=NodeIdParam(), default=None,
              help="This node's id (>= 1); 'auto': from the host name, like --id-from-hostname.")
@click.option("--id-from-hostname", is_flag=True,
              help="Take the id from the host name, a StatefulSet pod's: kvstore-0 is node 1, kvstore-2 node 3.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--listen", required=True, help="HOST:PORT to serve clients and peers on.")
@click.option("--peers", required=True, help="The initial cluster: 1=HOST:PORT,2=HOST:PORT,... (includes this node).")
@click.option("--cluster-id", default="kvstore", show_default=True, help="Nodes of other clusters are refused.")
@click.option("--join", is_flag=True, help="Do not bootstrap: wait to be added with `kvctl member add`.")
@click.option("--learner", is_flag=True,
              help="Start a read replica: like --join, and ask the members in --peers to add this node as a learner.")
@click.option("--force-new-cluster", is_flag=True,
              help="Recovery after losing quorum: start this node as a new single-member cluster from its data "
              "(every group it hosts; groups it does not host are lost). The other --peers are ignored.")
@click.option("--probe-ticks", type=int, default=2, show_default=True,
              help="Ticks between two staleness probes (ReadIndex) of each group; 0 disables bounded reads on replicas.")
@click.option("--advertise", default="", help="Address others reach this node at (default: its --peers entry).")
@click.option("--client-listen", default="",
              help="HOST:PORT of a second, client-only port (etcd's client URLs): the KV, Admin, Auth and "
              "health services only, never node-to-node RPCs; with --certs-dir it is TLS without a client "
              "certificate, so every call but login needs a token (auth must be enabled).")
@click.option("--client-advertise", default="",
              help="Address clients reach the client port at (default: --client-listen); published in the shard map.")
@click.option("--metrics-listen", default="",
              help="HOST:PORT for the Prometheus /metrics endpoint and the /livez and /readyz probes.")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=5.0, show_default=True,
              help="On SIGTERM, seconds spent handing the groups this node leads to other voters before "
              "stopping (0: stop at once).")
@click.option("--tick-ms", type=int, default=100, show_default=True)
@click.option("--election-ticks", type=int, default=5, show_default=True)
@click.option("--lease-read", is_flag=True, help="Serve linearizable reads from the leader lease.")
@click.option("--quiesce-ticks", type=click.IntRange(min=0), default=20, show_default=True,
              help="An idle Raft group stops heartbeating after this many ticks (0: never).")
@click.option("--request-timeout", type=float, default=5.0, show_default=True)
@click.option("--max-key", type=click.IntRange(1, MAX_KEY_SIZE), default=MAX_KEY_SIZE, show_default=True,
              help="Longest key accepted, in bytes (at most the storage's key limit).")
@click.option("--max-value", type=int, default=1 << 20, show_default=True)
@click.option("--max-request", type=int, default=4 << 20, show_default=True)
@click.option("--compact-threshold", type=int, default=10_000, show_default=True)
@click.option("--history-retention", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Keep this many seconds of MVCC history: older versions are compacted automatically (0: keep "
              "all until `kvctl compact`).")
@click.option("--history-retention-revisions", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Keep the cluster's newest N write revisions: every group is compacted at one revision that "
              "keeps them, each group keeping at most its own newest N (0: off; not with --history-retention).")
@click.option("--history-retention-interval", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="SECONDS", help="How often the automatic compaction runs (0: min(60, retention / 2) with "
              "--history-retention, 300 with --history-retention-revisions).")
@click.option("--lease-orphan-sweep", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              metavar="SECONDS", help="How often each data group's leader sweeps its keys attached to leases "
              "that are dead at their home (README: Leases).")
@click.option("--groups", type=click.IntRange(1, 100_000), default=1, show_default=True,
              help="Data Raft groups a new cluster starts with (keys are spread over them by consistent hashing).")
@click.option("--replication", type=click.IntRange(1, 7), default=3, show_default=True,
              help="Replicas per data group (at most the number of nodes).")
@click.option("--vnodes", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Virtual nodes per group on the hash ring.")
@click.option("--log-level", default="info", show_default=True)
@click.option("--certs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="TLS: ca.crt, node.crt, node.key (`kvstore cert`). Clients and peers must present a "
              "certificate of the same CA. SIGHUP reloads them.")
@click.option("--insecure", is_flag=True,
              help="Serve plaintext, unauthenticated gRPC even on a non-loopback address (anyone who can "
              "reach the port can read, write and join the cluster).")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write an audit log (MAC-chained JSON lines: admin operations, auth events) to this file; "
              "`kvstore audit verify` checks it. Its key is <data-dir>/audit.key.")
@click.option("--audit-writes", is_flag=True, help="Also audit every data write (put / delete / cas).")
@click.option("--audit-max-bytes", type=click.IntRange(min=4096), default=64 << 20, show_default=True,
              help="Rotate the audit log at this size (PATH -> PATH.1 -> ...).")
@click.option("--audit-keep", type=click.IntRange(1, 10_000), default=8, show_default=True,
              help="Audit log files kept (PATH and PATH.1 .. PATH.<keep-1>).")
@click.option("--audit-sync-lines", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Fsync the audit log and record its head in the store after at most this many lines ...")
@click.option("--audit-sync-ms", type=click.IntRange(min=1), default=1000, show_default=True,
              help="... or this many milliseconds (a machine crash can lose at most that window of lines).")
@click.option("--rate-limit", default="", metavar="OPS_PER_SEC[:BURST]",
              help="Per-identity token bucket for client operations (a stream batch of N costs N); over it: "
              "RESOURCE_EXHAUSTED with a retry-after. Default: no limit.")
@click.option("--max-apply-lag", type=click.IntRange(min=0), default=0, show_default=True,
              help="Refuse new writes to a group whose applied index is this far behind its commit (0: never).")
@click.option("--memory-limit", type=str, default="0", show_default=True,
              help="Resident memory ceiling (bytes; K/M/G suffixes): writes are refused above 90%% of it, "
              "again accepted below 80%% (0: none).")
@click.option("--quota-bytes", type=str, default="0", show_default=True,
              help="Space quota of the store (bytes; K/M/G suffixes): above it the NOSPACE alarm is raised "
              "cluster-wide and puts are refused until `kvctl alarm disarm` (0: none).")
@click.option("--wal-segment-bytes", type=str, default="8M", show_default=True,
              help="Size of a segment of the write-ahead log holding the Raft logs (bytes; K/M/G suffixes; "
              "preallocated on disk).")
@click.option("--state-sync", type=click.Choice(["checkpoint", "commit"]), default="checkpoint", show_default=True,
              help="How the state machine (LMDB) becomes durable: 'commit' syncs every apply transaction; "
              "'checkpoint' syncs none (a cycle costs the write-ahead log's one fdatasync) and checkpoints "
              "it every few seconds, a restart after a crash replaying the log from the last checkpoint.")
@click.option("--inline-apply", type=click.IntRange(min=0), default=16, show_default=True,
              help="A Ready cycle that only applies committed entries (at most this many) and needs no flush "
              "runs on the event loop instead of the persist thread (0: never).")
@click.option("--inline-persist", type=click.IntRange(min=0), default=4, show_default=True,
              help="A Ready cycle that writes at most this many new log entries (and applies at most "
              "--inline-apply) runs on the event loop, which waits out its fdatasync, instead of the persist "
              "thread (0: never).")
@click.option("--lmdb-writeback-ms", type=click.IntRange(min=0, max=MAX_WRITEBACK_MS), default=DEFAULT_WRITEBACK_MS,
              show_default=True,
              help="With --state-sync checkpoint: start the writeback of the state machine's dirty pages every N "
              "ms between checkpoints, so they reach the disk steadily, not in bursts that stall the WAL's "
              "flushes (timing only: nothing becomes durable by it; 0: off).")
@click.option("--gc-threshold", type=click.IntRange(min=0), default=DEFAULT_GEN0, show_default=True,
              help="Allocations per young garbage collection once the node started, whose objects are then "
              "frozen out of every collection (fewer, shorter pauses of the event loop; 0: Python's settings).")
@click.option("--max-streams-per-connection", type=click.IntRange(min=0), default=0, show_default=True,
              help="Concurrent RPCs one client connection may have open (HTTP/2 MAX_CONCURRENT_STREAMS; "
              "0: gRPC's default).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Close a client connection with no RPC in flight after this many seconds (0: never).")
@click.option("--max-ping-strikes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Close a connection that sends this many keepalive pings less than 5 s apart without "
              "data (0: never).")
@click.option("--plant-xtxn-halt", default="", hidden=True,
              help="PLANTED FAULT (recovery tests only): NODE:prepare or NODE:record makes that node's "
              "transaction coordinator halt there for good.")
@click.option("--plant-watch-bug", type=click.Choice(["", "drop", "repeat"]), default="", hidden=True,
              help="PLANTED BUG (kvchaos's watch-check tests only): drop or repeat an event in every "
              "20th watch response.")
def serve(
    node_id: int | str | None, id_from_hostname: bool, data_dir: Path, listen: str, peers: str, cluster_id: str, join: bool, learner: bool,
    force_new_cluster: bool, probe_ticks: int, advertise: str, client_listen: str, client_advertise: str, metrics_listen: str, drain_timeout: float, tick_ms: int, election_ticks: int, lease_read: bool,
    quiesce_ticks: int,
    request_timeout: float, max_key: int, max_value: int, max_request: int, compact_threshold: int, groups: int,
    replication: int, vnodes: int, log_level: str, certs_dir: Path | None, insecure: bool,
    audit_log: Path | None, audit_writes: bool, audit_max_bytes: int, audit_keep: int, audit_sync_lines: int,
    audit_sync_ms: int, rate_limit: str, max_apply_lag: int, memory_limit: str, quota_bytes: str, max_streams_per_connection: int,
    idle_timeout: float, max_ping_strikes: int, history_retention: float, history_retention_revisions: int,
    history_retention_interval: float, wal_segment_bytes: str, state_sync: str, inline_apply: int, inline_persist: int, gc_threshold: int,
    lmdb_writeback_ms: int, plant_xtxn_halt: str,
    plant_watch_bug: str, lease_orphan_sweep: float,
) -> None:
    """Run one node of a cluster. Restarting with the same --data-dir resumes it.

    Without --certs-dir the node only listens and advertises on loopback addresses, unless
    --insecure is given. Every option --foo-bar can also be set by the environment variable
    KVSTORE_FOO_BAR (KVSTORE_ID, KVSTORE_PEERS, KVSTORE_DATA_DIR, ...; the older KVSTORE_SERVE_*
    names work too)."""
    try:
        nid = resolve_node_id(node_id, id_from_hostname)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    from kvstore.server import grpc_env

    grpc_env.apply()  # before anything imports grpc
    from kvstore.node.ratelimit import parse_rate_limit
    from kvstore.node.shedding import ShedSettings
    from kvstore.security.audit import AuditSettings
    from kvstore.server.admission import AdmissionSettings
    from kvstore.server.config import Limits
    from kvstore.server.main import run
    from kvstore.server.reads import ReadSettings

    logging.basicConfig(
        level=log_level.upper(), format=f"%(asctime)s n{nid} %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = NodeConfig(
            id=nid, data_dir=data_dir, listen=listen, peers=parse_peers(peers), cluster_id=cluster_id,
            join=join or learner, learner=learner, force_new_cluster=force_new_cluster, advertise=advertise,
            metrics_listen=metrics_listen, drain_timeout=drain_timeout,
            client_listen=client_listen, client_advertise=client_advertise,
            request_timeout=request_timeout, wal_segment_bytes=parse_bytes(wal_segment_bytes),
            state_sync=state_sync, inline_apply=inline_apply, inline_persist=inline_persist, gc_threshold=gc_threshold,
            lmdb_writeback_ms=lmdb_writeback_ms, plant_xtxn_halt=plant_xtxn_halt, plant_watch_bug=plant_watch_bug,
            raft=RaftSettings(
                tick_ms=tick_ms, election_tick=election_ticks, lease_read=lease_read, quiesce_ticks=quiesce_ticks,
                compact_threshold=compact_threshold, compact_keep=min(1000, compact_threshold // 2),
            ),
            limits=Limits(max_key, max_value, max_request),
            groups=groups, replication=replication, vnodes=vnodes,
            reads=ReadSettings(probe_ticks=max(0, probe_ticks)), history_retention=history_retention,
            history_retention_revisions=history_retention_revisions,
            history_retention_interval=history_retention_interval, lease_orphan_sweep=lease_orphan_sweep,
            certs_dir=certs_dir, insecure=insecure,
            audit=None if audit_log is None else AuditSettings(
                audit_log.absolute(), writes=audit_writes, max_bytes=audit_max_bytes, keep=audit_keep,
                sync_lines=audit_sync_lines, sync_ms=audit_sync_ms,
            ),
            admission=AdmissionSettings(
                rate_limit=parse_rate_limit(rate_limit) if rate_limit else None,
                shed=ShedSettings(max_apply_lag=max_apply_lag, memory_limit=parse_bytes(memory_limit)),
                quota_bytes=parse_bytes(quota_bytes), max_streams_per_connection=max_streams_per_connection,
                idle_timeout=idle_timeout, max_ping_strikes=max_ping_strikes,
            ),
        )
        if audit_writes and audit_log is None:
            raise ValueError("--audit-writes needs --audit-log")
        cfg.validate()
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if certs_dir is None and insecure:
        logging.getLogger("kvstore").warning(
            "*** --insecure: node %d serves PLAINTEXT gRPC on %s without authentication: anyone who can "
            "reach it can read and write every key and join the cluster. Use --certs-dir. ***",
            nid, ", ".join(filter(None, [listen, client_listen])),
        )
    sys.exit(run(cfg))


add_natural_envvars(serve)


def parse_bytes(text: str) -> int:
    """`1048576`, `512K`, `64M`, `2G` (powers of 1024) -> bytes; ValueError otherwise."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    if not num.isdigit():
        raise ValueError(f"bad size {text!r}: expected a number of bytes, optionally with K, M, G or T")
    return int(num) * mult


@cli.command()
@click.option("--nodes", type=click.Choice(["3", "5"]), default="3", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("kvstore-dev-data"),
              show_default=True)
@click.option("--base-port", type=int, default=DEV_BASE_PORT, show_default=True)
@click.option("--groups", type=click.IntRange(1, 100_000), default=4, show_default=True,
              help="Data Raft groups (shards) of the new cluster.")
@click.option("--secure", is_flag=True,
              help="Run with TLS and auth: create (once) a CA, node and client certificates under "
              "<data-dir>/certs, user root (its password in <data-dir>/certs/root.password), and enable auth; "
              "each node also opens a client-only port (base port + 100 + i: TLS, a password instead of a "
              "client certificate).")
def dev(nodes: str, data_dir: Path, base_port: int, groups: int, secure: bool) -> None:
    """Run a local cluster in the foreground (data under --data-dir); Ctrl-C stops it.

    Plaintext on 127.0.0.1 unless --secure."""
    n = int(nodes)
    client_eps = [f"127.0.0.1:{base_port + DEV_CLIENT_PORT_OFFSET + i - 1}" for i in range(1, n + 1)]
    tls_args: dict[int, list[str]] = {i: [] for i in range(1, n + 1)}
    certs_dir = (data_dir / "certs").resolve()
    if secure:
        from kvstore.security import certs

        if not (certs_dir / certs.CA_CERT).exists():
            certs.create_ca(certs_dir)
        if not (certs_dir / certs.client_cert_name("root")).exists():
            certs.create_client(certs_dir, "root")
        for i in range(1, n + 1):
            nd = certs_dir / f"node{i}"
            if not (nd / certs.NODE_CERT).exists():
                certs.create_node(nd, i, ["127.0.0.1", "localhost"], ca_key=certs_dir / certs.CA_KEY)
            tls_args[i] = ["--certs-dir", str(nd), "--client-listen", client_eps[i - 1]]

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a shell may start us with SIGINT ignored (e.g. in the background).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    peers = ",".join(f"{i}=127.0.0.1:{base_port + i - 1}" for i in range(1, n + 1))
    data_dir.mkdir(parents=True, exist_ok=True)
    # The nodes get every setting from their flags: none from a KVSTORE_* variable of this shell
    # (one exported for kvctl, like KVSTORE_CERTS_DIR, must not turn into a node's setting).
    child_env = {k: v for k, v in os.environ.items() if k not in natural_envvars(serve)}
    procs: list[subprocess.Popen[bytes]] = []
    endpoints = [f"127.0.0.1:{base_port + i - 1}" for i in range(1, n + 1)]
    click.echo(f"kvstore dev: {n} nodes, data in {data_dir.resolve()}")
    try:
        for i in range(1, n + 1):
            log = open(data_dir / f"node{i}.log", "ab")  # noqa: SIM115 - kept open for the child
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "kvstore.cli.server", "serve", "--id", str(i),
                     "--data-dir", str(data_dir / f"node{i}"), "--listen", endpoints[i - 1], "--peers", peers,
                     "--groups", str(groups), *tls_args[i]],
                    stdout=log, stderr=subprocess.STDOUT, env=child_env,
                )
            )
        click.echo("endpoints: " + ",".join(endpoints))
        click.echo(f"logs: {data_dir.resolve()}/node*.log")
        if secure:
            pw_file = _enable_dev_auth(endpoints, certs_dir)
            click.echo(f"TLS certificates: {certs_dir}")
            click.echo(f"auth enabled; user root's password is in {pw_file}")
            click.echo(f"try: KVSTORE_CERTS_DIR={certs_dir} kvctl --endpoints {','.join(endpoints)} put hello world")
            click.echo(f"  or: KVSTORE_CERTS_DIR={certs_dir} KVSTORE_PASSWORD=$(cat {pw_file}) "
                       f"kvctl --endpoints {','.join(endpoints)} --user root auth status")
            click.echo(f"client-only ports (a password, no client certificate): {','.join(client_eps)}")
            click.echo(f"  try: KVSTORE_PASSWORD=$(cat {pw_file}) kvctl --endpoints {','.join(client_eps)} "
                       f"--cacert {certs_dir / 'ca.crt'} --user root get hello")
        else:
            click.echo(f"try: kvctl --endpoints {','.join(endpoints)} put hello world")
        click.echo("Ctrl-C stops the cluster.")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [i + 1 for i, p in enumerate(procs) if p.poll() is not None]
        click.echo(f"kvstore dev: node(s) {dead} exited; see their logs", err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
    os._exit(0)


def _enable_dev_auth(endpoints: list[str], certs_dir: Path) -> Path:
    """`dev --secure`: create user root (a random password, written 0600 to
    <certs-dir>/root.password) and enable auth, once; the root client certificate is the admin
    identity that does it. Returns the password file."""
    import secrets

    from kvstore.client import Client
    from kvstore.v1 import auth_pb2

    pw_file = certs_dir / "root.password"
    if not pw_file.exists():
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18))
    password = pw_file.read_text().strip()
    c = Client(endpoints, certs_dir=certs_dir, user="root", timeout=60)
    try:
        Op = auth_pb2.AuthChangeRequest
        deadline = time.monotonic() + 60
        while True:  # the cluster is starting: its first calls fail until the metadata group has a leader
            try:
                st = c.auth_call("Status", auth_pb2.AuthStatusRequest())
                if not st.enabled:
                    if not any(u.name == "root" for u in st.users):
                        c.auth_call("Change", Op(op=Op.USER_ADD, user="root", password=password))
                    c.auth_call("Change", Op(op=Op.ENABLE))
                return pw_file
            except Exception as err:
                if time.monotonic() > deadline:
                    raise click.ClickException(f"could not enable auth on the dev cluster: {err}") from err
                time.sleep(0.5)
    finally:
        c.close()


cli.add_command(cert)
cli.add_command(audit)
cli.add_command(restore)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
