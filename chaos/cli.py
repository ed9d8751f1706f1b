"""`kvchaos`: Jepsen-style chaos runs against real kvstore clusters.

    kvchaos run --nodes 3 --time 60 --nemesis partition,kill --workload register
    kvchaos clean --all-stale
    kvchaos check RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .containers import DEFAULT_IMAGE
from .nemesis import ALL_FAMILIES, EXTRA_FAMILIES, parse_families
from .registry import WORKLOADS

RUN_HELP = f"""Run a cluster under a workload and a nemesis, check the history, write a report.

Prints progress, then a last line `verdict: valid|invalid|unknown`; exits 0 only on valid.
The run folder (under --out) holds history.jsonl, ops.jsonl (with the clients' errors),
summary.json, faults.json, nodes/*.log and index.html.

\b
Backends:
  netns  (root) one network namespace per node on a bridge in its own namespace, nodes on
         10.77.X.N:2379; the harness's clients run in a client namespace; partitions are
         iptables DROP rules in both directions.
  local  nodes on 127.0.0.1 ports, no root. Partitions cannot be made there: the partition
         nemesis PAUSES (SIGSTOP) the side that would be cut off instead.
  container  (root, podman) every node a podman container of --image (built from
         docker/Dockerfile) on a network the run creates (kvc-RUN, 10.78.X.0/24), with a named
         volume each; kill = podman kill -s KILL + start, pause = podman pause; partitions are
         iptables DROP rules inside the containers' namespaces (where another rule lets a node
         send only to loopback and the run's subnet). The harness runs in the root namespace and
         talks only to the run's containers.

\b
Nemesis families (comma-separated, or `all`): {", ".join(ALL_FAMILIES)}; and {", ".join(EXTRA_FAMILIES)}
  partition: one node, the leader, halves, bridge, random cuts, ring
  kill:      kill -9 one node, the leader or a majority; restart
  pause:     SIGSTOP / SIGCONT one node or the leader
  transfer:  leadership transfer to a random voter
  member:    remove a voter, re-add it as a NEW id with an empty data dir
  forge:     (alias garbage) forged Raft / Shard traffic as non-member node 99 (must be refused:
             PERMISSION_DENIED) and malformed traffic under member ids (dropped); checks that no
             node dies or wedges, no forged value is read, and throughput holds. With TLS also
             outsiders with no certificate, a client certificate (to internal RPCs), a member's
             node certificate claiming another member, and another CA's: all must be refused
Not in `all` ({", ".join(EXTRA_FAMILIES)}):
  replicas:  cut the read replicas (--learners) off from every other node
  rebalance: (use with --groups N) add a data group, remove one (never the last) or rebalance,
             without waiting for the range moves, then partition / kill (/ pause, if enabled)
             while the moves run; "leader" faults hit the metadata leader, which drives the moves
The schedule always ends with every fault healed and a quiet period. With --groups > 1 or the
rebalance nemesis, every range move must then finish within --moves-timeout, or the run fails
(liveness, reported apart from linearizability).

\b
TLS (the default; --insecure for plaintext): the run makes a CA, a node certificate per node
id (its id, its host's address) and client certificates in RUN_DIR/certs; the nodes run with
--certs-dir and every harness channel (workload, admin, health checks) is mutual TLS.

\b
Read replicas: --learners N adds N learner hosts (`kvstore serve --learner`). The `replicas`
workload reads through them at --read-consistency (half routed by the client library with
--read-from, half pinned to one replica); at `stale` the run is expected to be invalid, and
every run checks that each read was no staler than the bound it reported.

\b
Watch: --watchers N runs N watchers for the whole run (every key, the workload's prefix, one key,
a range; from now or from an earlier write's revision; some with prev_kv), recording every batch
and progress notification the client library delivers across its resumes. Their histories are
checked for etcd's watch guarantees (ordered, unique, atomic, bookmarkable, reliable, resumable)
against the acknowledged writes; any violation makes the run invalid.
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "KVCHAOS"})
def cli() -> None:
    """kvchaos: break a real kvstore cluster and check that it stays linearizable."""


def _nemesis(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    try:
        return parse_families(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err


@cli.command(help=RUN_HELP)
@click.option("--nodes", type=click.Choice(["3", "5"]), default="3", show_default=True)
@click.option("--time", "seconds", type=float, default=60.0, show_default=True, help="Length of the workload (s).")
@click.option("--nemesis", default="partition,kill", show_default=True, callback=_nemesis,
              help="Comma-separated nemesis families, `all` or `none`.")
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="register", show_default=True)
@click.option("--backend", type=click.Choice(["netns", "local", "container"]), default="netns", show_default=True)
@click.option("--image", default=None, metavar="IMAGE",
              help=f"The container backend's kvstore image (default {DEFAULT_IMAGE}; never pulled).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the nemesis schedule and the workload.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("kvchaos-runs"),
              show_default=True, help="Folder for run folders.")
@click.option("--concurrency", type=int, default=5, show_default=True, help="Client processes.")
@click.option("--rate", type=float, default=150.0, show_default=True, help="Target ops/s (0: unlimited).")
@click.option("--quiet", type=float, default=None, help="Quiet period after the final heal (s; default scales with --time).")
@click.option("--tick-ms", type=int, default=50, show_default=True, help="Raft tick of the nodes.")
@click.option("--op-timeout", type=float, default=2.0, show_default=True, help="Client deadline per operation (s).")
@click.option("--fault-min", type=float, default=None, help="Shortest fault (s).")
@click.option("--fault-max", type=float, default=None, help="Longest fault (s).")
@click.option("--check-timeout", type=float, default=60.0, show_default=True, help="Linearizability checker budget (s).")
@click.option("--groups", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Data Raft groups the cluster starts with (kvstore serve --groups).")
@click.option("--moves-timeout", type=float, default=60.0, show_default=True,
              help="After the heal: how long range moves may take to finish (s).")
@click.option("--keep-data", is_flag=True, help="Keep the nodes' data dirs even when the run is valid.")
@click.option("--stale-reads", is_flag=True, hidden=True,
              help="PLANTED BUG for testing the harness: serve gets from a random node's local state.")
@click.option("--learners", type=click.IntRange(0, 5), default=None,
              help="Read replicas (learner hosts) besides the voters [default: 2 for --workload replicas, else 0].")
@click.option("--read-from", type=click.Choice(["leader", "nearest", "replica"]), default=None,
              help="Read preference of the replicas workload's routed gets [default: replica].")
@click.option("--read-consistency", type=click.Choice(["linearizable", "bounded", "stale"]), default="linearizable",
              show_default=True, help="Consistency of the replicas workload's gets.")
@click.option("--max-staleness", type=float, default=0.5, show_default=True, help="Bound of bounded reads (s).")
@click.option("--tls/--insecure", "tls", default=True, show_default=True,
              help="Mutual TLS everywhere (a CA and certificates made for the run), or plaintext nodes (--insecure).")
@click.option("--watchers", type=click.IntRange(0, 32), default=0, show_default=True,
              help="The watch workload: watchers (key, prefix, range, everything) through the client library, "
                   "checked for etcd's watch guarantees; the register workload then also deletes.")
@click.option("--watch-timeout", type=float, default=30.0, show_default=True,
              help="After the final reads: how long the watchers may take to be told about the last write (s).")
@click.option("--plant-watch-bug", type=click.Choice(["drop", "repeat"]), default=None, hidden=True,
              help="PLANTED BUG for testing the harness: the nodes drop or repeat a watch event now and then.")
def run(
    nodes: str, seconds: float, nemesis: list[str], workload: str, backend: str, seed: int, out: Path,
    concurrency: int, rate: float, quiet: float | None, tick_ms: int, op_timeout: float,
    fault_min: float | None, fault_max: float | None, check_timeout: float, groups: int, moves_timeout: float,
    keep_data: bool, stale_reads: bool,
    learners: int | None, read_from: str | None, read_consistency: str, max_staleness: float, tls: bool,
    watchers: int, watch_timeout: float, plant_watch_bug: str | None, image: str | None,
) -> None:
    from . import containers, netns
    from .runner import RunConfig
    from .runner import run as do_run

    cfg = RunConfig(
        nodes=int(nodes), time=seconds, nemesis=nemesis, workload=workload, backend=backend, seed=seed,
        out=str(out), tick_ms=tick_ms, concurrency=concurrency, rate=rate, quiet=quiet, op_timeout=op_timeout,
        fault_min=fault_min, fault_max=fault_max, stale_reads=stale_reads, keep_data=keep_data,
        check_timeout=check_timeout, groups=groups, moves_timeout=moves_timeout,
        learners=learners if learners is not None else (2 if workload == "replicas" else 0),
        read_from=read_from or "", read_consistency=read_consistency, max_staleness=max_staleness, tls=tls,
        watchers=watchers, watch_timeout=watch_timeout, plant_watch_bug=plant_watch_bug or "",
        image=(image or DEFAULT_IMAGE) if backend == "container" else "",
    )
    if image is not None and backend != "container":
        raise click.UsageError("--image is for --backend container")
    if watchers and workload in ("bank", "lock"):
        raise click.UsageError(f"--watchers checks writes recorded as put / cas / delete; the {workload} "
                               "workload writes by transactions (use bank1 or register)")
    try:
        code, _run_dir, _summary = do_run(cfg)
    except (netns.NetnsError, containers.ContainerError) as err:
        click.echo(f"kvchaos: {err}", err=True)
        click.echo("verdict: unknown")
        sys.exit(2)
    sys.exit(code)


@cli.command(hidden=True)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def execute(run_dir: Path) -> None:
    """The execute phase of a run (started by `kvchaos run`, inside the client namespace)."""
    from .runner import execute as do_execute

    try:
        sys.exit(do_execute(run_dir))
    except KeyboardInterrupt:
        sys.exit(130)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--check-timeout", type=float, default=None, help="Linearizability checker budget (s).")
def check(run_dir: Path, check_timeout: float | None) -> None:
    """Check a finished run's history again and rewrite its summary and report."""
    from .runner import analyze

    summary = analyze(run_dir, check_timeout=check_timeout)
    for reason in summary["analysis"]["reasons"]:
        click.echo(reason)
    click.echo(f"verdict: {summary['verdict']}")
    sys.exit(0 if summary["verdict"] == "valid" else 1)


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--all-stale", is_flag=True, help="Every registered run whose harness is no longer running.")
def clean(run_dirs: tuple[Path, ...], all_stale: bool) -> None:
    """Remove what runs left behind (processes, namespaces with their bridge and iptables
    rules; the container backend's containers, volumes and network with the iptables rules CNI
    left for its bridge), from each run's record (RUN_DIR/state.json), by recorded name only."""
    from .containers import ContainerError
    from .runner import teardown
    from .state import REGISTRY, RunState, registered_states

    states: list[RunState] = [RunState(Path(d) / "state.json") for d in run_dirs]
    if all_stale:
        for st in registered_states():
            if not st.path.exists():
                click.echo(f"{st.path}: record gone; dropping its registry entry")
                for entry in REGISTRY.glob("*.json"):
                    if str(st.path) in entry.read_text():
                        entry.unlink(missing_ok=True)
                continue
            if st.owner_alive():
                click.echo(f"{st.path}: its harness is still running; left alone")
                continue
            states.append(st)
    if not states:
        click.echo("nothing to clean")
        return
    for st in states:
        if not st.path.exists():
            click.echo(f"{st.path}: no such record", err=True)
            continue
        data = st.read()
        try:
            done = teardown(st)
        except ContainerError as err:
            click.echo(f"{st.path}: {err}; nothing removed", err=True)
            continue
        click.echo(f"{data.get('run_dir', st.path.parent)}: " + ("; ".join(done) if done else "nothing left"))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
