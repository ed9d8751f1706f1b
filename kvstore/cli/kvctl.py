"""kvctl: the kvstore command-line client.

Exit codes (every command):
  0  success
  1  the answer is "no": get found no such key; cas did not swap
  2  usage error, or the operation failed and definitely did not take effect
  3  the operation failed and MAY have taken effect (indeterminate write)
Errors are reported as one line on stderr, starting with "kvctl: ".
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click

from kvstore.backup.format import BackupSummary
from kvstore.cli.txnparse import TxnSyntaxError, parse_txn
from kvstore.client import (
    AdminResult,
    Alarm,
    Client,
    GroupStatus,
    KeyValue,
    Member,
    NodeStatus,
    Status,
    TxnResponse,
    WatchEvent,
)
from kvstore.client.checks import INT64_MAX
from kvstore.client.readpref import READ_PREFERENCES, parse_duration
from kvstore.client.routing import DEFAULT_GROUP, parse_endpoints
from kvstore.errors import KVError
from kvstore.storage import leases

DEFAULT_ENDPOINTS = "127.0.0.1:2379,127.0.0.1:2380,127.0.0.1:2381"

EXIT_OK = 0
EXIT_NO = 1
EXIT_FAILED = 2
EXIT_INDETERMINATE = 3

_EPILOG = """\b
Exit codes:
  0  success
  1  get: no such key; cas: not swapped
  2  usage error, or the operation definitely did not take effect
  3  the outcome is unknown: the write may have been applied
"""


@dataclass
class _Ctx:
    endpoints: list[str]
    timeout: float
    output: str
    hex: bool
    certs_dir: str | None = None
    user: str = "root"
    password: str | None = None
    cacert: str | None = None
    client_port: bool = False
    _client: Client | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return self.output == "json"

    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = Client(
                    self.endpoints, timeout=self.timeout, attempt_timeout=min(2.0, self.timeout),
                    certs_dir=self.certs_dir or None, user=self.user, password=self.password,
                    cacert=self.cacert or None, client_port=self.client_port or None,
                )
            except (OSError, ValueError) as err:
                _fail(f"cannot load the TLS certificates: {err}")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # keys and values on the command line / in the output
    def parse(self, text: str, what: str) -> bytes:
        if self.hex:
            try:
                return bytes.fromhex(text)
            except ValueError:
                raise click.BadParameter(f"{what} is not valid hex: {text!r}") from None
        return text.encode("utf-8", "surrogateescape")

    def show(self, data: bytes) -> str:
        return data.hex() if self.hex else data.decode("utf-8", "backslashreplace")

    def raw(self, data: bytes) -> bytes:
        return data.hex().encode() if self.hex else data


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"kvctl: {message}", err=True)
    sys.exit(code)


def _report(err: KVError, *, is_write: bool) -> NoReturn:
    if err.indeterminate:
        what = "write" if is_write else "operation"
        _fail(f"{err.message} (indeterminate: the {what} may have been applied)", EXIT_INDETERMINATE)
    _fail(err.message)


@contextmanager
def _errors(*, is_write: bool) -> Iterator[None]:
    """Turn client errors into one stderr line and the documented exit code."""
    try:
        yield
    except KVError as err:
        _report(err, is_write=is_write)
    except (TypeError, ValueError) as err:
        _fail(str(err))


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


@click.group("kvctl", context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.option(
    "--endpoints",
    envvar="KVSTORE_ENDPOINTS",
    default=DEFAULT_ENDPOINTS,
    show_default=True,
    metavar="HOST:PORT,...",
    help="Comma-separated node addresses (any subset; the rest is discovered). Env: KVSTORE_ENDPOINTS.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.001),
    default=10.0,
    show_default=True,
    envvar="KVSTORE_TIMEOUT",
    help="Total deadline of the operation in seconds, retries included.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)
@click.option("--hex", "hex_", is_flag=True, help="Keys and values are given and printed as hex.")
@click.option(
    "--certs-dir", envvar="KVSTORE_CERTS_DIR", default="", metavar="DIR",
    help="TLS: a directory with ca.crt and client.<user>.crt/.key (`kvstore cert create-client`). "
    "Env: KVSTORE_CERTS_DIR. Unset: plaintext.",
)
@click.option(
    "--cacert", envvar="KVSTORE_CACERT", default="", metavar="FILE",
    help="TLS without a client certificate: the cluster's CA certificate (ca.crt), for nodes' client-only "
    "ports (`kvstore serve --client-listen`); needs --password. Env: KVSTORE_CACERT.",
)
@click.option("--client-port", is_flag=True, envvar="KVSTORE_CLIENT_PORT",
              help="--endpoints are client-only ports: follow the nodes' client addresses (implied by --cacert). "
              "Env: KVSTORE_CLIENT_PORT.")
@click.option("--user", envvar="KVSTORE_USER", default="root", show_default=True,
              help="Who you are: the user to log in as (with --password), whose client certificate to "
              "present (with --certs-dir). Env: KVSTORE_USER.")
@click.option("--password", envvar="KVSTORE_PASSWORD", default=None, metavar="PASSWORD",
              help="Log in as --user with this password (a token is fetched and sent with every call); "
              "'-' prompts for it. Env: KVSTORE_PASSWORD.")
@click.option("--debug", is_flag=True, envvar="KVCTL_DEBUG",
              help="Log what the client does behind a command (a watch's restarts and why) to stderr. "
              "Env: KVCTL_DEBUG.")
@click.pass_context
def cli(ctx: click.Context, endpoints: str, timeout: float, output: str, hex_: bool, certs_dir: str,
        cacert: str, client_port: bool, user: str, password: str | None, debug: bool) -> None:
    """Talk to a kvstore cluster.

    Keys and values on the command line are UTF-8 text (hex with --hex).
    """
    if debug:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("kvstore").setLevel(logging.DEBUG)
    eps = parse_endpoints(endpoints)
    if not eps:
        raise click.BadParameter("no endpoints given", param_hint="--endpoints")
    if password == "-":
        password = click.prompt(f"password of {user}", hide_input=True)
    if cacert and certs_dir:
        raise click.UsageError("give --certs-dir (a client certificate) or --cacert (a token), not both")
    if cacert and password is None:
        raise click.UsageError("--cacert (no client certificate) needs --password: a client-only port serves "
                               "logged-in users only")
    obj = _Ctx(endpoints=eps, timeout=timeout, output=output, hex=hex_, certs_dir=certs_dir or None, user=user,
               password=password, cacert=cacert or None, client_port=client_port)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


pass_ctx = click.make_pass_decorator(_Ctx)


def _output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Accept `-o/--output` after the subcommand too (`kvctl status -o json`)."""

    @click.option(
        "-o", "--output", "sub_output", type=click.Choice(["text", "json"]), default=None,
        help="Output format (same as the global -o).",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, sub_output: str | None = None, **kwargs: Any) -> Any:
        if sub_output:
            obj = click.get_current_context().find_object(_Ctx)
            if obj is not None:
                obj.output = sub_output
        return f(*args, **kwargs)

    return wrapper


# ----- KV -----


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@cli.command(
    epilog="\b\nExamples:\n  kvctl get k --consistency stale --read-from replica\n"
    "  kvctl get k --consistency bounded --max-staleness 500ms --read-from nearest -o json"
)
@click.argument("key")
@click.option(
    "--consistency", type=click.Choice(["linearizable", "bounded", "stale"]), default=None,
    help="linearizable (default): never stale, from the leader or a replica that confirmed a read index; "
    "bounded: at most --max-staleness behind; stale: the answering node's local state at once.",
)
@click.option("--max-staleness", callback=_duration, default=None, metavar="DURATION",
              help="For bounded reads: how far behind the answer may be (500ms, 2s; implies --consistency bounded).")
@click.option("--read-from", "read_from", type=click.Choice(list(READ_PREFERENCES)), default="leader",
              show_default=True, help="Read preference: the leader, any member (nearest), or replicas (learners first).")
@click.option("--serializable", is_flag=True, help="Same as --consistency stale.")
@click.option("--rev", "rev", type=click.IntRange(min=1, max=INT64_MAX), default=None, metavar="REV",
              help="Read KEY as it was at revision REV (exit 2 naming the compact revision if REV was compacted).")
@_output_option
@pass_ctx
def get(
    c: _Ctx, key: str, consistency: str | None, max_staleness: float | None, read_from: str, serializable: bool,
    rev: int | None,
) -> None:
    """Print the value of KEY (exit 1, printing nothing, if there is no such key).

    With -o json: the key's create_revision, mod_revision and version, and the revision the read
    was served at; a read that is not a linearizable read at the leader also says which node served
    it, at which applied index, and how stale it may be (staleness_ms: null if unknown)."""
    k = c.parse(key, "KEY")
    level = consistency or ("stale" if serializable else "bounded" if max_staleness is not None else "linearizable")
    if level == "bounded" and not max_staleness:
        raise click.UsageError("--consistency bounded needs --max-staleness (e.g. 500ms)")
    with _errors(is_write=False):
        res = c.client().read(
            k, consistency=level, max_staleness=max_staleness, read_preference=read_from,  # type: ignore[arg-type]
            revision=rev or 0,
        )
    value = res.value
    if c.json:
        out: dict[str, Any] = {"key": c.show(k), "found": value is not None, "value": None if value is None else c.show(value)}
        out.update(revision=res.revision)
        if value is not None:
            out.update(create_revision=res.create_revision, mod_revision=res.mod_revision, version=res.version)
        if level != "linearizable" or read_from != "leader":
            out.update(
                consistency=level, node_id=res.node_id, index=res.index,
                staleness_ms=None if res.staleness is None else round(res.staleness * 1000),
            )
        _emit_json(out)
    elif value is not None:
        click.echo(c.raw(value))
    if value is None:
        sys.exit(EXIT_NO)


def _lease_id(value: str) -> int:
    """A lease id in hexadecimal, as etcdctl prints and takes it."""
    try:
        lid = int(value, 16)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a lease id in hexadecimal") from None
    try:
        return leases.check_id(lid)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


class _LeaseId(click.ParamType):
    name = "LEASE_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return _lease_id(value)
        except click.BadParameter as err:
            self.fail(err.message, param, ctx)


LEASE_ID = _LeaseId()


@cli.command()
@click.argument("key")
@click.argument("value")
@click.option("--lease", "lease", type=LEASE_ID, default=None, help="Attach KEY to this lease (hexadecimal id).")
@_output_option
@pass_ctx
def put(c: _Ctx, key: str, value: str, lease: int | None) -> None:
    """Set KEY to VALUE. A VALUE of `-` reads the value (raw bytes) from standard input, for
    values larger than a command-line argument may be. With --lease, KEY is deleted when the
    lease expires or is revoked (refused if the lease is not live)."""
    k = c.parse(key, "KEY")
    v = sys.stdin.buffer.read() if value == "-" else c.parse(value, "VALUE")
    with _errors(is_write=True):
        revision = c.client().put(k, v, lease=lease or 0)
    if c.json:
        _emit_json({"key": c.show(k), "ok": True, "revision": revision})


@cli.command()
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Delete every key starting with KEY, in every group, atomically.")
@_output_option
@pass_ctx
def delete(c: _Ctx, key: str, prefix: bool) -> None:
    """Delete KEY (exit 0 whether or not it existed; -o json says which). With --prefix, every
    key starting with KEY, atomically at one revision, printing how many (as etcdctl del --prefix)."""
    k = c.parse(key, "KEY")
    if prefix:
        with _errors(is_write=True):
            n = c.client().delete_prefix(k)
        if c.json:
            _emit_json({"prefix": c.show(k), "deleted": n, "revision": c.client().revision if n else None})
        else:
            click.echo(n)
        return
    with _errors(is_write=True):
        existed = c.client().delete(k)
    if c.json:
        _emit_json({"key": c.show(k), "existed": existed, "revision": c.client().revision if existed else None})


@cli.command(
    epilog="\b\nExamples:\n  kvctl cas counter 41 42       # set counter to 42 if it is 41\n"
    "  kvctl cas --absent lock me    # create lock only if it does not exist"
)
@click.argument("args", nargs=-1, metavar="KEY [EXPECTED] NEW")
@click.option("--absent", is_flag=True, help="Swap only if KEY does not exist; then EXPECTED is omitted.")
@pass_ctx
def cas(c: _Ctx, args: tuple[str, ...], absent: bool) -> None:
    """Compare-and-swap: set KEY to NEW if its value is EXPECTED (or, with --absent, if KEY
    does not exist). Exit 0 if swapped, 1 if not."""
    want = 2 if absent else 3
    if len(args) != want:
        usage = "KEY NEW (with --absent)" if absent else "KEY EXPECTED NEW (or --absent KEY NEW)"
        raise click.UsageError(f"cas takes {usage}; got {len(args)} argument(s)")
    k = c.parse(args[0], "KEY")
    expected = None if absent else c.parse(args[1], "EXPECTED")
    new = c.parse(args[-1], "NEW")
    with _errors(is_write=True):
        swapped = c.client().cas(k, expected, new)
    if c.json:
        _emit_json({"key": c.show(k), "swapped": swapped, "revision": c.client().revision if swapped else None})
    if not swapped:
        sys.exit(EXIT_NO)


@cli.command(
    epilog="\b\nExample (etcdctl's format: compares, blank line, success ops, blank line, failure ops):\n"
    "  printf 'value(\"k\") = \"old\"\\n\\nput k new\\nget j\\n\\nget k\\n' | kvctl txn"
)
@_output_option
@pass_ctx
def txn(c: _Ctx) -> None:
    """Run a transaction read from standard input, in etcdctl's format: compare lines
    (value("k") = "v", version("k") > "3", create("k") = "0", mod("k") < "10"), a blank line,
    the operations to run if every compare holds (put KEY VALUE, get KEY, del KEY; a range:
    get KEY RANGE_END, get --prefix KEY, get --from-key KEY, with --limit N; a range delete:
    del KEY RANGE_END, del --prefix KEY, del --from-key KEY), a blank line, the operations to run
    otherwise. Prints SUCCESS or FAILURE, then each operation's result after a blank line (put:
    OK; get: key and value lines for each key found, nothing if none; del: the number deleted),
    as etcdctl does. Exit 0 either way; 2 or 3 if it could not run. Keys may be in several groups
    (a two-phase commit); a range shows the keys as they are at its place in the transaction
    (its writes before it, not those after it); a range delete runs across every group."""
    try:
        parsed = parse_txn(sys.stdin.read(), lambda t: c.parse(t, "key or value"))
    except (TxnSyntaxError, click.BadParameter) as err:
        raise click.UsageError(str(err)) from None
    with _errors(is_write=True):
        resp = c.client().txn(parsed.compares, parsed.success, parsed.failure)
    if c.json:
        _emit_json(_txn_json(c, resp))
        return
    click.echo("SUCCESS" if resp.succeeded else "FAILURE")
    for r in resp.responses:
        click.echo("")
        if r.kind == "put":
            click.echo("OK")
        elif r.kind == "delete":
            click.echo("1" if r.deleted else "0")
        elif r.kind == "delete_range":
            click.echo(str(r.count))
        elif r.kind == "get" and r.kv is not None:
            click.echo(c.raw(r.kv.key))
            click.echo(c.raw(r.kv.value))
        elif r.kind == "scan":
            for kv in r.items:
                click.echo(c.raw(kv.key))
                click.echo(c.raw(kv.value))


def _kv_json(c: _Ctx, kv: KeyValue) -> dict[str, Any]:
    return {"key": c.show(kv.key), "value": c.show(kv.value), "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision, "version": kv.version}


def _txn_json(c: _Ctx, resp: TxnResponse) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for r in resp.responses:
        if r.kind == "put":
            out.append({"put": {"revision": r.revision}})
        elif r.kind == "delete":
            out.append({"delete": {"deleted": int(r.deleted)}})
        elif r.kind == "delete_range":
            out.append({"delete_range": {"deleted": r.count}})
        elif r.kind == "get":
            kv = r.kv
            out.append({"get": None if kv is None else _kv_json(c, kv)})
        elif r.kind == "scan":
            out.append({"scan": {"revision": r.revision, "more": r.more, "items": [_kv_json(c, kv) for kv in r.items]}})
        elif r.txn is not None:
            out.append({"txn": _txn_json(c, r.txn)})
    return {"succeeded": resp.succeeded, "revision": resp.revision, "responses": out}


@cli.command()
@click.argument("prefix", required=False, default="")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most N pairs (0 = all).")
@click.option("--start", default=None, help="Only keys >= START.")
@click.option("--end", default=None, help="Only keys < END.")
@click.option("--keys-only", is_flag=True, help="Print keys only.")
@click.option("--consistency", type=click.Choice(["linearizable", "bounded", "stale"]), default=None,
              help="As for get (default linearizable).")
@click.option("--max-staleness", callback=_duration, default=None, metavar="DURATION",
              help="For bounded scans (implies --consistency bounded).")
@click.option("--read-from", "read_from", type=click.Choice(list(READ_PREFERENCES)), default="leader",
              show_default=True, help="Read preference, as for get.")
@click.option("--rev", "rev", type=click.IntRange(min=1, max=INT64_MAX), default=None, metavar="REV",
              help="The keys as they were at revision REV.")
@_output_option
@pass_ctx
def scan(
    c: _Ctx, prefix: str, limit: int, start: str | None, end: str | None, keys_only: bool,
    consistency: str | None, max_staleness: float | None, read_from: str, rev: int | None,
) -> None:
    """Print the pairs whose key starts with PREFIX, as KEY<TAB>VALUE lines in key order
    (-o json: one JSON object per line, with each key's create_revision, mod_revision and
    version)."""
    p = c.parse(prefix, "PREFIX")
    lo = None if start is None else c.parse(start, "--start")
    hi = None if end is None else c.parse(end, "--end")
    level = consistency or ("bounded" if max_staleness is not None else "linearizable")
    if level == "bounded" and not max_staleness:
        raise click.UsageError("--consistency bounded needs --max-staleness (e.g. 500ms)")
    with _errors(is_write=False):
        items = c.client().scan_kvs(
            p, start=lo, end=hi, limit=limit, consistency=level,  # type: ignore[arg-type]
            max_staleness=max_staleness, read_preference=read_from,  # type: ignore[arg-type]
            revision=rev or 0,
        )
        for kv in items:
            key, value = kv.key, kv.value
            if c.json:
                obj: dict[str, Any] = {"key": c.show(key)} if keys_only else {"key": c.show(key), "value": c.show(value)}
                obj.update(create_revision=kv.create_revision, mod_revision=kv.mod_revision, version=kv.version)
                _emit_json(obj)
            elif keys_only:
                click.echo(c.raw(key))
            else:
                click.echo(c.raw(key) + b"\t" + c.raw(value))


@cli.command(epilog="\b\nExample:\n  kvctl compact 1234567   # reads below revision 1234567 then fail (COMPACTED)")
@click.argument("rev", type=click.IntRange(min=1, max=INT64_MAX), metavar="REV")
@_output_option
@pass_ctx
def compact(c: _Ctx, rev: int) -> None:
    """Drop the history at or below revision REV in every group (needs the admin permission).
    Reads at a revision below REV then fail with COMPACTED, naming it. Compacting again at the
    same or a lower revision changes nothing."""
    with _errors(is_write=True):
        done = c.client().compact(rev)
    if c.json:
        _emit_json({"compact_revision": done})
    else:
        click.echo(f"compacted at revision {done}")


@cli.command(epilog="\b\nExamples:\n  kvctl watch app/config\n  kvctl watch --prefix app/ --rev 1234567 --prev-kv -o json")
@click.argument("key", required=False, default=None)
@click.option("--prefix", default=None, help="Watch every key starting with PREFIX (instead of KEY).")
@click.option("--range-end", default=None, help="Watch the keys in [KEY, RANGE_END) (\\0: every key >= KEY).")
@click.option("--rev", "rev", type=click.IntRange(min=1, max=INT64_MAX), default=None, metavar="REV",
              help="Start at revision REV (default: from now).")
@click.option("--prev-kv", is_flag=True, help="Show each key's previous value too.")
@_output_option
@pass_ctx
def watch(c: _Ctx, key: str | None, prefix: str | None, range_end: str | None, rev: int | None, prev_kv: bool) -> None:
    """Print every change of KEY (or of the keys with --prefix) as it happens, until Ctrl-C: one
    line per event, `PUT KEY VALUE` or `DELETE KEY` (-o json: {"type", "key", "value",
    "create_revision", "mod_revision", "version", "revision"}, and "prev_value" with --prev-kv).
    Events come in revision order, each once; the watch resumes by itself after a node or
    connection fails. Exit 2 naming the compact revision when REV is compacted."""
    if (key is None) == (prefix is None):
        raise click.UsageError("give a KEY or --prefix PREFIX")
    if prefix is not None and range_end is not None:
        raise click.UsageError("--range-end goes with KEY, not with --prefix")
    k = b"" if key is None else c.parse(key, "KEY")
    p = b"" if prefix is None else c.parse(prefix, "--prefix")
    end = b"" if range_end is None else (b"\0" if range_end == "\\0" else c.parse(range_end, "--range-end"))
    try:
        with _errors(is_write=False):
            for ev in c.client().watch(k, prefix=p, range_end=end, start_revision=rev or 0, prev_kv=prev_kv):
                _print_event(c, ev, prev_kv)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)


def _print_event(c: _Ctx, ev: WatchEvent, prev_kv: bool) -> None:
    prev = None if ev.prev is None else ev.prev.value
    if c.json:
        obj: dict[str, Any] = {
            "type": ev.type, "key": c.show(ev.key), "value": None if ev.value is None else c.show(ev.value),
            "create_revision": ev.create_revision, "mod_revision": ev.mod_revision, "version": ev.version,
            "revision": ev.revision,
        }
        if prev_kv:
            obj["prev_value"] = None if prev is None else c.show(prev)
        _emit_json(obj)
        return
    line = c.raw(ev.key) if ev.value is None else c.raw(ev.key) + b" " + c.raw(ev.value)
    if prev_kv and prev is not None:
        line += b" (was " + c.raw(prev) + b")"
    click.echo(ev.type.encode() + b" " + line)


# ----- status -----


def _group(st: Status, group: int | None = None) -> GroupStatus | None:
    """The given group's status; by default the metadata group's (group 0, whose leader leads
    the cluster's membership), or the data group's for a server without one."""
    wanted = (0, DEFAULT_GROUP) if group is None else (group,)
    for want in wanted:
        for g in st.groups:
            if g.group == want:
                return g
    return None


def _members(nodes: list[NodeStatus]) -> list[Member]:
    """The member list of the most recent view (highest term of the default group)."""
    best: Status | None = None
    best_term = -1
    for ns in nodes:
        if ns.status is None:
            continue
        g = _group(ns.status)
        term = g.term if g is not None else 0
        if term > best_term:
            best, best_term = ns.status, term
    return list(best.members) if best is not None else []


def _leader(nodes: list[NodeStatus]) -> tuple[int, int]:
    """(leader id, term) of the default group, from the answer with the highest term."""
    lead, term = 0, 0
    for ns in nodes:
        g = _group(ns.status) if ns.status is not None else None
        if g is not None and g.leader_id and g.term >= term:
            lead, term = g.leader_id, g.term
    return lead, term


def _leader_commit(nodes: list[NodeStatus], group: int) -> int | None:
    """The commit index reported by the leader of ``group`` (highest term), if it answered."""
    best: tuple[int, int] | None = None
    for ns in nodes:
        g = _group(ns.status, group) if ns.status is not None else None
        if g is not None and g.role == "leader" and (best is None or g.term > best[0]):
            best = (g.term, g.commit)
    return best[1] if best is not None else None


def _lag(g: GroupStatus, leader_commit: int | None) -> tuple[int | None, int | None]:
    """(entries behind the leader's commit index, staleness bound in ms) of one node's group;
    None where unknown. The leader is 0 entries behind by definition."""
    if g.role == "leader":
        return 0, max(0, g.staleness_ms) if g.staleness_ms >= 0 else None
    entries = None if leader_commit is None else max(0, leader_commit - g.applied)
    return entries, g.staleness_ms if g.staleness_ms >= 0 else None


def _lag_text(entries: int | None, ms: int | None) -> str:
    e = "?" if entries is None else str(entries)
    s = "?" if ms is None else f"{ms / 1000:.2f}s"
    return f"{e} / {s}"


def _status_json(nodes: list[NodeStatus]) -> dict[str, Any]:
    lead, term = _leader(nodes)
    members = _members(nodes)
    out: dict[str, Any] = {
        "leader": {"id": lead, "address": next((m.address for m in members if m.id == lead), ""), "term": term},
        "members": [{"id": m.id, "address": m.address, "client_address": m.client_address, "learner": m.learner}
                    for m in members],
        "nodes": [],
    }
    for ns in nodes:
        node: dict[str, Any] = {"endpoint": ns.address, "reachable": ns.status is not None}
        if ns.status is None:
            node["error"] = ns.error.message if ns.error is not None else "unknown"
        else:
            st = ns.status
            node.update(
                node_id=st.node_id,
                cluster_id=st.cluster_id,
                address=st.address,
                storage_full=st.storage_full,
                cluster_version=st.cluster_version,
                supported_level=st.supported_level,
                member_levels={str(n): lv for n, lv in st.member_levels},
                groups=[
                    {
                        "lag_entries": _lag(g, _leader_commit(nodes, g.group))[0],
                        "staleness_ms": _lag(g, _leader_commit(nodes, g.group))[1],
                        "leader_contact_ms": g.leader_contact_ms if g.leader_contact_ms >= 0 else None,
                        "group": g.group,
                        "role": g.role,
                        "term": g.term,
                        "leader_id": g.leader_id,
                        "commit": g.commit,
                        "applied": g.applied,
                        "first_index": g.first_index,
                        "last_index": g.last_index,
                        "voters": list(g.voters),
                        "learners": list(g.learners),
                    }
                    for g in st.groups
                ],
            )
        out["nodes"].append(node)
    return out


def _version_line(nodes: list[NodeStatus]) -> str:
    """"cluster version N; feature levels: node 1 = 2, ..." from the most advanced answer ("" if
    no node reports a cluster version)."""
    best = max((ns.status for ns in nodes if ns.status is not None and ns.status.cluster_version),
               key=lambda st: (st.cluster_version, len(st.member_levels)), default=None)
    if best is None:
        return ""
    levels = ", ".join(f"node {n} = {lv}" for n, lv in best.member_levels) or "none advertised yet"
    return f"cluster version {best.cluster_version}; feature levels: {levels}"


def _status_table(nodes: list[NodeStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False)
    lead, term = _leader(nodes)
    members = _members(nodes)
    learners = {m.id for m in members if m.learner}
    cluster = next((ns.status.cluster_id for ns in nodes if ns.status is not None and ns.status.cluster_id), "")
    lead_addr = next((m.address for m in members if m.id == lead), "")
    head = f"cluster {cluster}: " if cluster else ""
    if lead:
        console.print(f"{head}leader node {lead} ({lead_addr or '?'}), term {term}, {len(members)} members")
    else:
        console.print(f"{head}no leader known, {len(members)} members")
    multi = any(ns.status is not None and len(ns.status.groups) > 1 for ns in nodes)
    table = Table(show_edge=False, header_style="bold")
    cols = ["ID", "ENDPOINT", *(["GROUP"] if multi else []), "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "LOG", "LAG"]
    for col in cols:
        table.add_column(
            col,
            justify="right" if col in ("ID", "TERM", "LEADER", "COMMIT", "APPLIED", "LAG") else "left",
            no_wrap=col in ("ID", "ENDPOINT"),
            min_width=len(max((ns.address for ns in nodes), key=len, default="")) if col == "ENDPOINT" else None,
        )
    problems: list[str] = []
    for ns in nodes:
        st = ns.status
        if st is None:
            problems.append(ns.error.message if ns.error is not None else f"{ns.address}: unreachable")
            table.add_row("?", ns.address, *([""] if multi else []), "[red]unreachable[/red]", "", "", "", "", "", "")
            continue
        groups = list(st.groups) or [GroupStatus(group=DEFAULT_GROUP)]
        for g in groups:
            role = g.role or "?"
            if st.node_id in learners and "learner" not in role:
                role += " (learner)"
            if g.role == "leader":
                role = f"[bold green]{role}[/bold green]"
            if st.storage_full:
                role += " [red]storage full[/red]"
            table.add_row(
                str(st.node_id),
                ns.address,
                *([str(g.group)] if multi else []),
                role,
                str(g.term),
                str(g.leader_id or "-"),
                str(g.commit),
                str(g.applied),
                f"{g.first_index}..{g.last_index}",
                "-" if g.role == "leader" else _lag_text(*_lag(g, _leader_commit(nodes, g.group))),
            )
    console.print(table)
    version = _version_line(nodes)
    if version:
        console.print(version)
    if any(ns.status is not None and any(g.role != "leader" for g in ns.status.groups) for ns in nodes):
        console.print("LAG: entries behind the leader's commit index / upper bound on how far behind in time")
    for line in problems:
        console.print(f"[red]![/red] {line}", soft_wrap=True)


@cli.command()
@_output_option
@pass_ctx
def status(c: _Ctx) -> None:
    """Show every node: role, term, leader, commit and applied indexes (queries each endpoint
    and every member they report)."""
    with _errors(is_write=False):
        nodes = c.client().cluster_status()
    if c.json:
        _emit_json(_status_json(nodes))
    else:
        _status_table(nodes)


@cli.command(epilog="\b\nExit codes: 0 every group's replicas agree; 1 some group's replicas differ (named);\n"
             "2 the check could not be made (a replica unreachable, a range move in progress).")
@_output_option
@pass_ctx
def check(c: _Ctx) -> None:
    """Check that every group's voters hold the same data: each hashes the group's key space at
    one revision (the leader's last), and the hashes are compared (etcd's HashKV)."""
    from kvstore.client.replicacheck import CheckError, check_replicas

    with _errors(is_write=False):
        try:
            results = check_replicas(c.client())
        except CheckError as err:
            _fail(str(err))
    bad = [r for r in results if not r.consistent]
    if c.json:
        _emit_json({"ok": not bad, "groups": [
            {"group": r.group, "leader": r.leader, "revision": r.revision, "consistent": r.consistent,
             "hashes": {str(n): {"hash": h.hash.hex(), "keys": h.keys, "applied": h.applied}
                        for n, h in sorted(r.hashes.items())},
             "errors": {str(n): e for n, e in sorted(r.errors.items())}}
            for r in results]})
    else:
        for r in results:
            lead = r.hashes[r.leader]
            state = "ok" if r.consistent else "DIFFERS" if r.diverged else "INCOMPLETE"
            click.echo(f"group {r.group}: {state} at revision {r.revision}: {lead.keys} keys, hash "
                       f"{lead.hash.hex()[:16]} on {len(r.hashes)} of {len(r.voters)} voters")
            for n in r.diverged:
                h = r.hashes[n]
                click.echo(f"  node {n}: hash {h.hash.hex()[:16]}, {h.keys} keys (the leader, node {r.leader}: "
                           f"{lead.hash.hex()[:16]}, {lead.keys} keys)")
            for n, e in sorted(r.errors.items()):
                click.echo(f"  node {n}: not checked: {e}")
    if any(r.errors for r in results):
        _fail("some replicas could not be checked: " + ", ".join(
            f"group {r.group} node {n}" for r in results for n in sorted(r.errors)))
    diverged = [r for r in bad if r.diverged]
    if diverged:
        _fail("replicas differ in group(s) " + ", ".join(
            f"{r.group} (node(s) {', '.join(map(str, r.diverged))})" for r in diverged), EXIT_NO)


# ----- admin -----


def _admin_result(c: _Ctx, resp: AdminResult, default: str) -> None:
    if c.json:
        _emit_json(
            {
                "ok": True,
                "message": resp.message or default,
                "members": [{"id": m.id, "address": m.address, "client_address": m.client_address, "learner": m.learner} for m in resp.members],
            }
        )
    else:
        click.echo(resp.message or default)


def _admin(c: _Ctx, call: Callable[[Client], AdminResult], default: str) -> None:
    with _errors(is_write=True):
        resp = call(c.client())
    _admin_result(c, resp, default)


@cli.group()
def member() -> None:
    """Cluster membership: add (as learner), promote, remove."""


@member.command("add")
@click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
@click.argument("address")
@click.option("--voter", is_flag=True, help="Add as a voter instead of a learner (the server may insist on learner first).")
@click.option("--learner", is_flag=True, help="Add as a learner: a read replica (the default).")
@click.option("--group", "groups", type=click.IntRange(min=1), multiple=True,
              help="Only this data group (repeatable). Default: the metadata group and every data group.")
@_output_option
@pass_ctx
def member_add(c: _Ctx, node_id: int, address: str, voter: bool, learner: bool, groups: tuple[int, ...]) -> None:
    """Add node ID at ADDRESS (HOST:PORT), as a learner (a read replica, which never votes) unless
    --voter. Promote a learner with `kvctl member promote ID`."""
    if voter and learner:
        raise click.UsageError("--voter and --learner exclude each other")
    kind = "voter" if voter else "learner"
    _admin(c, lambda cl: cl.add_member(node_id, address, learner=not voter, groups=list(groups)),
           f"added {kind} {node_id} at {address}")


@member.command("promote")
@click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--group", "groups", type=click.IntRange(min=1), multiple=True,
              help="Only this data group (repeatable). Default: the metadata group and every data group.")
@_output_option
@pass_ctx
def member_promote(c: _Ctx, node_id: int, groups: tuple[int, ...]) -> None:
    """Promote learner ID to voter."""
    _admin(c, lambda cl: cl.promote_member(node_id, groups=list(groups)), f"promoted {node_id} to voter")


@member.command("remove")
@click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--group", "groups", type=click.IntRange(min=1), multiple=True,
              help="Only this data group (repeatable). Default: the metadata group and every data group.")
@_output_option
@pass_ctx
def member_remove(c: _Ctx, node_id: int, groups: tuple[int, ...]) -> None:
    """Remove node ID from the cluster (or from the --group(s) given)."""
    _admin(c, lambda cl: cl.remove_member(node_id, groups=list(groups)), f"removed {node_id}")


@cli.command("transfer-leader")
@click.argument("node_id", metavar="[ID]", type=click.IntRange(min=0), required=False, default=0)
@click.option("--group", "groups", type=click.IntRange(min=0), multiple=True,
              help="Only this group (repeatable; 0 is the metadata group). Default: every group.")
@_output_option
@pass_ctx
def transfer_leader(c: _Ctx, node_id: int, groups: tuple[int, ...]) -> None:
    """Hand leadership to node ID (default: the most up-to-date voter), of every group or of
    the --group(s) given. The leader balancer hands data groups back to their preferred leaders
    300 ticks later (30 s at the default --tick-ms)."""
    target = f"node {node_id}" if node_id else "the most up-to-date voter"
    _admin(c, lambda cl: cl.transfer_leader(node_id, groups=list(groups)), f"leadership transferred to {target}")


# ----- shards -----


def _shards_table(resp: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False)
    total = sum(g.keys for g in resp.groups)
    console.print(f"shard map version {resp.version}: {len(resp.groups)} data groups, {total} keys; {resp.message}")
    table = Table(show_edge=False, header_style="bold")
    for col in ("GROUP", "LEADER", "VOTERS", "LEARNERS", "RANGES", "SHARE", "KEYS", "APPLIED"):
        table.add_column(col, justify="left" if col in ("VOTERS", "LEARNERS") else "right")
    for g in resp.groups:
        table.add_row(
            str(g.id), str(g.leader_id or "-"), ",".join(map(str, g.voters)), ",".join(map(str, g.learners)) or "-",
            str(g.ranges), f"{100 * g.share:.1f}%", str(g.keys), str(g.applied),
        )
    console.print(table)


def _shard_result(c: _Ctx, resp: Any) -> None:
    if c.json:
        _emit_json({"ok": True, "message": resp.message, "version": resp.version, "moves_pending": resp.moves_pending})
    else:
        click.echo(resp.message)


@cli.group(invoke_without_command=True)
@_output_option
@click.pass_context
def shards(ctx: click.Context) -> None:
    """The shard map: groups, their ranges, key counts and leaders (and changing it)."""
    if ctx.invoked_subcommand is not None:
        return
    c = ctx.find_object(_Ctx)
    assert c is not None
    with _errors(is_write=False):
        resp = c.client().shards()
    if c.json:
        _emit_json({
            "version": resp.version,
            "moves_pending": resp.moves_pending,
            "moves": resp.message,
            "groups": [
                {"id": g.id, "leader_id": g.leader_id, "voters": list(g.voters), "learners": list(g.learners),
                 "ranges": g.ranges, "share": g.share, "keys": g.keys, "applied": g.applied}
                for g in resp.groups
            ],
        })
    else:
        _shards_table(resp)


@shards.command("add-group")
@click.option("--no-wait", is_flag=True, help="Return once the moves are planned, not when they are done.")
@click.option("--wait-timeout", type=float, default=300.0, show_default=True)
@_output_option
@pass_ctx
def shards_add_group(c: _Ctx, no_wait: bool, wait_timeout: float) -> None:
    """Add a data group; ranges of the ring move into it, with their data."""
    with _errors(is_write=True):
        resp = c.client().add_group(wait=not no_wait, timeout=wait_timeout)
    _shard_result(c, resp)


@shards.command("remove-group")
@click.argument("group", type=click.IntRange(min=1))
@click.option("--no-wait", is_flag=True, help="Return once the moves are planned, not when they are done.")
@click.option("--wait-timeout", type=float, default=300.0, show_default=True)
@_output_option
@pass_ctx
def shards_remove_group(c: _Ctx, group: int, no_wait: bool, wait_timeout: float) -> None:
    """Move GROUP's ranges to the other groups, then drop it."""
    with _errors(is_write=True):
        resp = c.client().remove_group(group, wait=not no_wait, timeout=wait_timeout)
    _shard_result(c, resp)


@shards.command("rebalance")
@click.option("--no-wait", is_flag=True, help="Return once the moves are planned, not when they are done.")
@click.option("--wait-timeout", type=float, default=300.0, show_default=True)
@_output_option
@pass_ctx
def shards_rebalance(c: _Ctx, no_wait: bool, wait_timeout: float) -> None:
    """Give every group its even share of the ring again, moving ranges as needed."""
    with _errors(is_write=True):
        resp = c.client().rebalance(wait=not no_wait, timeout=wait_timeout)
    _shard_result(c, resp)


@cli.command("raft-snapshot")
@click.option("--node", "node", default=None, metavar="HOST:PORT", help="Snapshot this node instead of the leader.")
@_output_option
@pass_ctx
def raft_snapshot(c: _Ctx, node: str | None) -> None:
    """Take a Raft snapshot now (and compact the log) on the leader, or on --node."""
    _admin(c, lambda cl: cl.snapshot(node), "snapshot taken")


@cli.group(invoke_without_command=True)
@click.option("--node", "node", default=None, metavar="HOST:PORT", hidden=True)
@_output_option
@click.pass_context
def snapshot(ctx: click.Context, node: str | None) -> None:
    """Backups: `save FILE` writes the whole keyspace at one revision, `status FILE` checks one.

    (Called with no subcommand: the old spelling of `kvctl raft-snapshot`.)"""
    if ctx.invoked_subcommand is None:
        c = ctx.find_object(_Ctx)
        assert c is not None
        _admin(c, lambda cl: cl.snapshot(node), "snapshot taken")


def _summary_json(s: BackupSummary, path: str, verified: bool) -> dict[str, Any]:
    return {
        "file": path, "verified": verified, "revision": s.info.revision, "keys": s.keys, "total_size": s.size,
        "sha256": s.sha256, "created_ms": s.info.created_ms, "groups": s.info.groups,
        "replication": s.info.replication, "vnodes": s.info.vnodes, "has_auth": bool(s.auth),
    }


def _summary_text(s: BackupSummary) -> str:
    return (f"revision {s.info.revision}, {s.keys} keys, {s.size} bytes, sha256 {s.sha256}, "
            f"source: {s.info.groups} data groups")


@snapshot.command("save")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--save-timeout", type=click.FloatRange(min=0.001), default=3600.0, show_default=True,
              help="Deadline of the whole scan in seconds, retries included.")
@_output_option
@pass_ctx
def snapshot_save(c: _Ctx, path: str, save_timeout: float) -> None:
    """Write every key of the cluster as of ONE revision (and the users and roles) to FILE.

    R is the revision a linearizable scan across the groups settles on (every write acknowledged
    before the save is at or below it); then every key is read by a scan at R, exact in every
    group: every write with revision <= R is in the file, none above, whatever writes run
    meanwhile. The file is written under a temporary name, fsynced and renamed (mode 0600: it
    holds the password hashes). Needs the admin permission."""
    from kvstore.backup.save import save

    with _errors(is_write=False), _progress("saving") as progress:
        try:
            summary = save(c.client(), Path(path), timeout=save_timeout, progress=progress)
        except OSError as err:
            _fail(f"cannot write {path}: {err}")
    if c.json:
        _emit_json(_summary_json(summary, path, True))
    else:
        click.echo(f"saved {path}: {_summary_text(summary)}")


@snapshot.command("status")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@_output_option
@pass_ctx
def snapshot_status(c: _Ctx, path: str) -> None:
    """Verify a backup file whole (structure, counts, SHA-256) and print what it holds; exits 2
    if it is damaged or not a backup."""
    from kvstore.backup.format import BackupFormatError, verify

    try:
        with open(path, "rb") as f:
            summary = verify(f)
    except OSError as err:
        _fail(f"cannot read {path}: {err}")
    except BackupFormatError as err:
        if c.json:
            _emit_json({"file": path, "verified": False, "error": str(err)})
        _fail(f"{path} is damaged or not a backup: {err}")
    if c.json:
        _emit_json(_summary_json(summary, path, True))
    else:
        click.echo(f"{path}: {_summary_text(summary)}, verified")


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress line on stderr when it is a terminal (keys and bytes so far), else None."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what)

        def update(keys: int, size: int) -> None:
            bar.update(task, description=f"{what}: {keys} keys, {size / (1 << 20):.1f} MiB")

        yield update


@cli.group()
def lease() -> None:
    """Leases (TTL): keys attached to a lease are deleted when it expires or is revoked. Ids are
    hexadecimal, as etcdctl's; the output is etcdctl 3.4's."""


@lease.command("grant")
@click.argument("ttl", type=click.IntRange(min=leases.MIN_TTL_S, max=leases.MAX_TTL_S))
@click.option("--id", "lease_id", type=LEASE_ID, default=None, help="Grant this id (hexadecimal) instead of a random one.")
@_output_option
@pass_ctx
def lease_grant(c: _Ctx, ttl: int, lease_id: int | None) -> None:
    """Grant a lease of TTL seconds."""
    with _errors(is_write=True):
        lid = c.client().lease_grant(ttl, lease_id or 0)
    if c.json:
        _emit_json({"id": f"{lid:016x}", "ttl": ttl})
    else:
        click.echo(f"lease {lid:016x} granted with TTL({ttl}s)")


@lease.command("revoke")
@click.argument("lease_id", type=LEASE_ID)
@_output_option
@pass_ctx
def lease_revoke(c: _Ctx, lease_id: int) -> None:
    """Revoke a lease: every key attached to it is deleted."""
    with _errors(is_write=True):
        c.client().lease_revoke(lease_id)
    if c.json:
        _emit_json({"id": f"{lease_id:016x}", "revoked": True})
    else:
        click.echo(f"lease {lease_id:016x} revoked")


@lease.command("keep-alive")
@click.argument("lease_id", type=LEASE_ID)
@click.option("--once", is_flag=True, help="Renew once and exit.")
@pass_ctx
def lease_keep_alive(c: _Ctx, lease_id: int, once: bool) -> None:
    """Keep a lease alive (a renewal every third of its TTL) until interrupted; exit 1 once it
    is found expired or revoked."""
    while True:
        with _errors(is_write=True):
            ttl = c.client().lease_keep_alive_once(lease_id)
        if ttl <= 0:
            click.echo(f"lease {lease_id:016x} expired or revoked.")
            sys.exit(EXIT_NO)
        click.echo(f"lease {lease_id:016x} keepalived with TTL({ttl})")
        if once:
            return
        try:
            time.sleep(max(ttl / 3, 0.5))
        except KeyboardInterrupt:
            return


@lease.command("timetolive")
@click.argument("lease_id", type=LEASE_ID)
@click.option("--keys", is_flag=True, help="List the keys attached to the lease.")
@_output_option
@pass_ctx
def lease_timetolive(c: _Ctx, lease_id: int, keys: bool) -> None:
    """Show a lease's granted and remaining TTL (and, with --keys, its keys)."""
    with _errors(is_write=False):
        info = c.client().lease_time_to_live(lease_id, keys)
    if c.json:
        _emit_json({"id": f"{lease_id:016x}", "ttl": info.ttl, "granted_ttl": info.granted_ttl,
                    "keys": [c.show(k) for k in info.keys]})
        return
    if info.ttl == -1:
        click.echo(f"lease {lease_id:016x} already expired")
        return
    txt = f"lease {lease_id:016x} granted with TTL({info.granted_ttl}s), remaining({info.ttl}s)"
    if info.keys:
        txt += f", attached keys([{' '.join(c.show(k) for k in info.keys)}])"
    click.echo(txt)


@lease.command("list")
@_output_option
@pass_ctx
def lease_list(c: _Ctx) -> None:
    """List the live leases."""
    with _errors(is_write=False):
        ids = c.client().lease_list()
    if c.json:
        _emit_json({"leases": [f"{i:016x}" for i in ids]})
        return
    click.echo(f"found {len(ids)} leases")
    for i in ids:
        click.echo(f"{i:016x}")


def _hold(c: _Ctx, name: str, proposal: bytes | None, command: tuple[str, ...], ttl: int) -> int:
    """Acquire NAME's lock (or campaign with PROPOSAL), print the key (and value), then run
    COMMAND with the fencing token in its environment, or hold until interrupted. Returns the
    exit code: COMMAND's, or 1 if the session's lease was lost while holding."""
    import asyncio
    import os
    import subprocess

    from kvstore.client.concurrency import Election, Mutex, Session

    client = c.client()
    state: dict[str, Any] = {}

    async def acquire() -> None:
        session = Session(client._async, ttl)
        await session.__aenter__()
        state["session"] = session
        m = Election(session, c.parse(name, "NAME")) if proposal is not None else Mutex(session, c.parse(name, "NAME"))
        state["mutex"] = m
        held = await (m.campaign(proposal) if isinstance(m, Election) and proposal is not None else m.acquire())
        state["held"] = held

    async def wait_lost(proc: subprocess.Popen[bytes] | None) -> bool:
        session = state["session"]
        while proc is None or proc.poll() is None:
            if session.lost.is_set():
                return True
            await asyncio.sleep(0.1)
        return False

    async def release() -> None:
        if "mutex" in state and not state["session"].lost.is_set():
            with suppress(KVError):
                await state["mutex"].release()
        if "session" in state:
            await state["session"].__aexit__(None, None, None)

    try:
        with _errors(is_write=True):
            client._run(acquire(), write=True)
        held = state["held"]
        click.echo(c.show(held.key))
        if proposal is not None:
            click.echo(c.show(proposal))
        proc = None
        if command:
            env = {**os.environ, "KVSTORE_LOCK_FENCE": str(held.fence), "KVSTORE_LOCK_KEY": c.show(held.key)}
            proc = subprocess.Popen(list(command), env=env)
        lost = client._run(wait_lost(proc))
        if lost:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait()
            click.echo(f"kvctl: the session's lease was lost: {c.show(held.key)} is no longer held", err=True)
            return EXIT_NO
        return proc.returncode if proc is not None else 0
    except KeyboardInterrupt:
        return 0
    finally:
        with suppress(Exception):
            client._run(release())


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--ttl", type=click.IntRange(min=1, max=3600), default=10, show_default=True,
              help="The session lease's TTL in seconds.")
@pass_ctx
def lock(c: _Ctx, name: str, command: tuple[str, ...], ttl: int) -> None:
    """Acquire the distributed lock NAME and print its key; then run COMMAND (after `--`) with
    the fencing token in $KVSTORE_LOCK_FENCE (the key's create revision: a resource should refuse
    any token below the highest it has seen) and release the lock when it exits, or hold the lock
    until interrupted. Exit: COMMAND's status, or 1 if the session's lease was lost."""
    sys.exit(_hold(c, name, None, command, ttl))


@cli.command()
@click.argument("name")
@click.argument("proposal", required=False)
@click.option("--ttl", type=click.IntRange(min=1, max=3600), default=10, show_default=True,
              help="The session lease's TTL in seconds.")
@pass_ctx
def elect(c: _Ctx, name: str, proposal: str | None, ttl: int) -> None:
    """Campaign in election NAME with PROPOSAL: once elected print the key and the proposal and
    hold the leadership until interrupted (exit 1 if the session's lease is lost). Without
    PROPOSAL, observe: print the leader's key and value each time the leadership changes."""
    if proposal is not None:
        sys.exit(_hold(c, name, c.parse(proposal, "PROPOSAL"), (), ttl))
    client = c.client()
    prefix = c.parse(name, "NAME").rstrip(b"/") + b"/"

    async def observe() -> None:
        last: bytes | None = None
        while True:
            kvs = []
            async for chunk in client._async.scan_kvs(prefix):
                kvs += chunk
            if kvs:
                first = min(kvs, key=lambda kv: kv.create_revision)
                if first.key != last:
                    last = first.key
                    click.echo(c.show(first.key))
                    click.echo(c.show(first.value))
            rev = max((kv.mod_revision for kv in kvs), default=0)
            async for _ev in client._async.watch(prefix=prefix, start_revision=rev + 1 if rev else 0):
                break

    try:
        with _errors(is_write=False):
            client._run(observe())
    except KeyboardInterrupt:
        return


@cli.group()
def alarm() -> None:
    """Cluster alarms: NOSPACE is raised when a node's store exceeds its --quota-bytes; while it
    is, puts and compare-and-swaps are refused cluster-wide (reads and deletes are served)."""


def _alarms_out(c: _Ctx, alarms: list[Alarm]) -> None:
    if c.json:
        _emit_json({"alarms": [{"node_id": a.node_id, "type": a.type} for a in alarms]})
    elif not alarms:
        click.echo("no alarms")
    else:
        for a in alarms:
            click.echo(f"{a.type}\tnode {a.node_id}")


@alarm.command("list")
@_output_option
@pass_ctx
def alarm_list(c: _Ctx) -> None:
    """Show the alarms raised."""
    with _errors(is_write=False):
        alarms = c.client().alarms()
    _alarms_out(c, alarms)


@alarm.command("disarm")
@click.option("--node", "node_id", type=click.IntRange(min=1), default=None, help="Only this node's alarms.")
@click.option("--type", "kind", type=click.Choice(["NOSPACE"], case_sensitive=False), default=None,
              help="Only alarms of this type.")
@_output_option
@pass_ctx
def alarm_disarm(c: _Ctx, node_id: int | None, kind: str | None) -> None:
    """Disarm alarms (default: all) once space is back under the quota (delete keys, then
    `kvctl raft-snapshot` to compact the logs); prints the alarms still raised. A node still over its
    quota raises NOSPACE again about a second later."""
    with _errors(is_write=True):
        alarms = c.client().disarm_alarms(node_id or 0, kind)
    _alarms_out(c, alarms)


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="kvctl")
    except KeyboardInterrupt:
        click.echo("kvctl: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()


# --- users, roles, auth -----------------------------------------------------------------------

def _auth_change(c: _Ctx, what: str, **kw: Any) -> None:
    from kvstore.v1 import auth_pb2

    with _errors(is_write=True):
        r = c.client().auth_call("Change", auth_pb2.AuthChangeRequest(**kw))
    if c.json:
        _emit_json({"ok": True, "revision": r.revision})
    else:
        click.echo(f"{what} (auth revision {r.revision})")


def _new_password(password: str | None, user: str) -> str:
    if password is None or password == "-":
        return str(click.prompt(f"new password of {user}", hide_input=True, confirmation_prompt=True))
    return password


def _perm(kind: str, key: str, end: str | None, prefix: bool, c: _Ctx) -> Any:
    from kvstore.v1 import auth_pb2

    k = c.parse(key, "key")
    if prefix and end is not None:
        raise click.BadParameter("give --prefix or a range end, not both")
    if prefix:
        stripped = k.rstrip(b"\xff")
        range_end = stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else b"\x00"
    elif end is not None:
        range_end = b"\x00" if end == "" else c.parse(end, "range end")
    else:
        range_end = b""
    kinds = {"read": auth_pb2.READ, "write": auth_pb2.WRITE, "readwrite": auth_pb2.READWRITE}
    return auth_pb2.Permission(kind=kinds[kind], key=k, range_end=range_end)


@cli.group()
def user() -> None:
    """Users (log in with --user/--password, or a client certificate whose name is the user)."""


@user.command("add")
@click.argument("name")
@click.option("--new-password", default=None, help="The user's password ('-' or absent: prompt; "
              "--no-password: certificate login only).")
@click.option("--no-password", is_flag=True, help="No password: the user logs in with a client certificate only.")
@pass_ctx
def user_add(c: _Ctx, name: str, new_password: str | None, no_password: bool) -> None:
    """Create user NAME."""
    from kvstore.v1 import auth_pb2

    pw = "" if no_password else _new_password(new_password, name)
    _auth_change(c, f"user {name} added", op=auth_pb2.AuthChangeRequest.USER_ADD, user=name, password=pw)


@user.command("delete")
@click.argument("name")
@pass_ctx
def user_delete(c: _Ctx, name: str) -> None:
    """Delete user NAME (its tokens stop working at once)."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, f"user {name} deleted", op=auth_pb2.AuthChangeRequest.USER_DELETE, user=name)


@user.command("passwd")
@click.argument("name")
@click.option("--new-password", default=None, help="The new password ('-' or absent: prompt).")
@pass_ctx
def user_passwd(c: _Ctx, name: str, new_password: str | None) -> None:
    """Change NAME's password (its earlier tokens stop working)."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, f"password of {name} changed", op=auth_pb2.AuthChangeRequest.USER_PASSWD, user=name,
                 password=_new_password(new_password, name))


@user.command("grant-role")
@click.argument("name")
@click.argument("role")
@pass_ctx
def user_grant_role(c: _Ctx, name: str, role: str) -> None:
    """Give user NAME role ROLE."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, f"role {role} granted to {name}", op=auth_pb2.AuthChangeRequest.USER_GRANT_ROLE,
                 user=name, role=role)


@user.command("revoke-role")
@click.argument("name")
@click.argument("role")
@pass_ctx
def user_revoke_role(c: _Ctx, name: str, role: str) -> None:
    """Take role ROLE from user NAME."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, f"role {role} revoked from {name}", op=auth_pb2.AuthChangeRequest.USER_REVOKE_ROLE,
                 user=name, role=role)


def _auth_status(c: _Ctx) -> Any:
    from kvstore.v1 import auth_pb2

    with _errors(is_write=False):
        return c.client().auth_call("Status", auth_pb2.AuthStatusRequest())


@user.command("list")
@pass_ctx
def user_list(c: _Ctx) -> None:
    """List users and their roles (admins only)."""
    s = _auth_status(c)
    if c.json:
        _emit_json([{"name": u.name, "roles": list(u.roles), "password": u.has_password} for u in s.users])
        return
    for u in s.users:
        click.echo(f"{u.name}\troles: {', '.join(u.roles) or '-'}{'' if u.has_password else ' (certificate only)'}")


@cli.group()
def role() -> None:
    """Roles: read / write / readwrite permissions on keys, prefixes and ranges; role `admin`
    (and user root) has the admin permission."""


@role.command("add")
@click.argument("name")
@pass_ctx
def role_add(c: _Ctx, name: str) -> None:
    """Create role NAME."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, f"role {name} added", op=auth_pb2.AuthChangeRequest.ROLE_ADD, role=name)


@role.command("delete")
@click.argument("name")
@pass_ctx
def role_delete(c: _Ctx, name: str) -> None:
    """Delete role NAME (and revoke it from every user)."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, f"role {name} deleted", op=auth_pb2.AuthChangeRequest.ROLE_DELETE, role=name)


def _perm_command(verb: str) -> Callable[..., Any]:
    @role.command(verb, help=f"{verb.capitalize()} KIND (read, write, readwrite) on KEY, on the range "
                  "[KEY, END) (END '' = to the end), or with --prefix on every key starting with KEY.")
    @click.argument("name")
    @click.argument("kind", type=click.Choice(["read", "write", "readwrite"]))
    @click.argument("key")
    @click.argument("end", required=False, default=None)
    @click.option("--prefix", is_flag=True, help="KEY is a prefix.")
    @pass_ctx
    def cmd(c: _Ctx, name: str, kind: str, key: str, end: str | None, prefix: bool) -> None:
        from kvstore.v1 import auth_pb2

        op = auth_pb2.AuthChangeRequest.ROLE_GRANT if verb == "grant" else auth_pb2.AuthChangeRequest.ROLE_REVOKE
        _auth_change(c, f"role {name}: {verb} {kind} on {key}{' (prefix)' if prefix else ''}", op=op, role=name,
                     permission=_perm(kind, key, end, prefix, c))

    return cmd


_perm_command("grant")
_perm_command("revoke")


@role.command("list")
@pass_ctx
def role_list(c: _Ctx) -> None:
    """List roles and their permissions (admins only)."""
    s = _auth_status(c)
    kinds = {1: "read", 2: "write", 3: "readwrite"}

    def where(p: Any) -> str:
        if not p.range_end:
            return c.show(p.key)
        if p.range_end == b"\x00":
            return f"[{c.show(p.key)}, end)"
        return f"[{c.show(p.key)}, {c.show(p.range_end)})"

    if c.json:
        _emit_json([{"name": r.name, "permissions": [
            {"kind": kinds.get(p.kind, "?"), "key": c.show(p.key), "range_end": c.show(p.range_end)}
            for p in r.permissions]} for r in s.roles])
        return
    for r in s.roles:
        perms = ", ".join(f"{kinds.get(p.kind, '?')} {where(p)}" for p in r.permissions)
        click.echo(f"{r.name}\t{perms or '-'}")


@cli.group("auth")
def auth_group() -> None:
    """Turn authentication on or off, and show its state."""


@auth_group.command("enable")
@pass_ctx
def auth_enable(c: _Ctx) -> None:
    """Enable auth (user root must exist). From then on every call needs a token or a client
    certificate, and everything not granted is refused (PERMISSION_DENIED)."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, "auth enabled", op=auth_pb2.AuthChangeRequest.ENABLE)


@auth_group.command("disable")
@pass_ctx
def auth_disable(c: _Ctx) -> None:
    """Disable auth (admin only); every token stops working."""
    from kvstore.v1 import auth_pb2

    _auth_change(c, "auth disabled", op=auth_pb2.AuthChangeRequest.DISABLE)


@auth_group.command("status")
@pass_ctx
def auth_status(c: _Ctx) -> None:
    """Whether auth is enabled, and who the cluster thinks you are."""
    s = _auth_status(c)
    if c.json:
        _emit_json({"enabled": s.enabled, "revision": s.revision, "identity": s.identity, "admin": s.admin})
        return
    click.echo(f"auth {'enabled' if s.enabled else 'disabled'} (revision {s.revision}); you are {s.identity}"
               f"{' (admin)' if s.admin else ''}")
