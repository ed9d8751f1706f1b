"""`kvstore serve` from environment variables (natural names and the older automatic ones), and
`--id-from-hostname` / `KVSTORE_ID=auto` (kvstore/cli/serve_env.py)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from kvstore.cli import kvctl
from kvstore.cli.serve_env import (
    AUTO,
    NodeIdParam,
    id_from_hostname,
    natural_envvar,
    natural_envvars,
    resolve_node_id,
)
from kvstore.cli.server import cli, serve


def _params(env: dict[str, str], args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `kvstore serve ARGS` resolves its parameters to under `env` (click's real parsing,
    through the `kvstore` group's context so its automatic KVSTORE_SERVE_* prefix applies)."""
    for name in list(natural_envvars(serve)) + [f"KVSTORE_SERVE_{p.name.upper()}" for p in serve.params if p.name]:
        monkeypatch.delenv(name, raising=False)
    required = {"listen": "127.0.0.1:1", "peers": "1=127.0.0.1:1", "data_dir": "d"}
    for name, value in required.items():
        if f"KVSTORE_{name.upper()}" not in env and f"KVSTORE_SERVE_{name.upper()}" not in env:
            monkeypatch.setenv(f"KVSTORE_{name.upper()}", value)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parent = click.Context(cli, info_name="kvstore", **cli.context_settings)
    ctx = serve.make_context("serve", list(args), parent=parent)
    return dict(ctx.params)


def test_natural_names_set_serve_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "KVSTORE_ID": "2", "KVSTORE_PEERS": "1=a:1,2=b:2,3=c:3", "KVSTORE_DATA_DIR": str(tmp_path),
        "KVSTORE_LISTEN": "0.0.0.0:2379", "KVSTORE_ADVERTISE": "b:2", "KVSTORE_GROUPS": "4",
        "KVSTORE_CERTS_DIR": str(tmp_path / "certs"), "KVSTORE_METRICS_LISTEN": "0.0.0.0:9090",
        "KVSTORE_INSECURE": "true", "KVSTORE_DRAIN_TIMEOUT": "7.5", "KVSTORE_CLIENT_LISTEN": "0.0.0.0:2479",
        "KVSTORE_STATE_SYNC": "commit", "KVSTORE_ID_FROM_HOSTNAME": "false",
    }
    p = _params(env, [], monkeypatch)
    assert p["node_id"] == 2 and p["peers"] == "1=a:1,2=b:2,3=c:3" and p["data_dir"] == tmp_path
    assert p["listen"] == "0.0.0.0:2379" and p["advertise"] == "b:2" and p["groups"] == 4
    assert p["certs_dir"] == tmp_path / "certs" and p["metrics_listen"] == "0.0.0.0:9090"
    assert p["insecure"] is True and p["drain_timeout"] == 7.5 and p["client_listen"] == "0.0.0.0:2479"
    assert p["state_sync"] == "commit" and p["id_from_hostname"] is False


def test_old_automatic_names_still_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"KVSTORE_SERVE_NODE_ID": "3", "KVSTORE_SERVE_DATA_DIR": str(tmp_path),
           "KVSTORE_SERVE_STATE_SYNC": "commit", "KVSTORE_SERVE_RATE_LIMIT": "100:10"}
    p = _params(env, [], monkeypatch)
    assert p["node_id"] == 3 and p["data_dir"] == tmp_path and p["state_sync"] == "commit"
    assert p["rate_limit"] == "100:10"


def test_flag_beats_natural_name_beats_automatic_name(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KVSTORE_ID": "2", "KVSTORE_SERVE_NODE_ID": "3", "KVSTORE_SERVE_GROUPS": "5"}
    assert _params(env, [], monkeypatch)["node_id"] == 2
    assert _params(env, ["--id", "1"], monkeypatch)["node_id"] == 1
    assert _params(env, [], monkeypatch)["groups"] == 5
    assert _params({**env, "KVSTORE_GROUPS": "6"}, [], monkeypatch)["groups"] == 6


def test_every_option_has_a_natural_name_that_kvctl_does_not_use() -> None:
    names = natural_envvars(serve)
    assert len(names) == sum(isinstance(p, click.Option) for p in serve.params)
    for p in serve.params:
        assert isinstance(p, click.Option) and isinstance(p.envvar, list) and p.envvar[0] == natural_envvar(p)
    assert {"KVSTORE_ID", "KVSTORE_PEERS", "KVSTORE_DATA_DIR", "KVSTORE_LISTEN", "KVSTORE_ADVERTISE",
            "KVSTORE_GROUPS", "KVSTORE_CERTS_DIR", "KVSTORE_METRICS_LISTEN", "KVSTORE_INSECURE",
            "KVSTORE_ID_FROM_HOSTNAME", "KVSTORE_DRAIN_TIMEOUT"} <= set(names)
    kvctl_vars: set[str] = set()
    for p in kvctl.cli.params:
        if p.envvar:
            kvctl_vars.update([p.envvar] if isinstance(p.envvar, str) else p.envvar)
    assert "KVSTORE_ENDPOINTS" in kvctl_vars
    # The one shared name, on purpose: a directory with a node's and a client's certificates.
    assert kvctl_vars & set(names) == {"KVSTORE_CERTS_DIR"}


@pytest.mark.parametrize(("host", "nid"), [
    ("kvstore-0", 1), ("kvstore-2", 3), ("KVSTORE-4", 5), ("my-db-10", 11),
    ("kvstore-2.kvstore-peer.default.svc.cluster.local", 3), ("k-999999", 1_000_000),
])
def test_id_from_hostname(host: str, nid: int) -> None:
    assert id_from_hostname(host) == nid


@pytest.mark.parametrize("host", ["", "kvstore", "kvstore-", "-1", "kvstore-01", "kvstore-x", "kvstore-1a",
                                  "kvstore_1", "k-1000000", ".kvstore-1", "kvstore--1x", "kvstore-+1",
                                  "kvstore-\u0663", "kvstore-1\n-2"])
def test_id_from_hostname_refuses_other_names(host: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        id_from_hostname(host)


@given(st.text(max_size=80))
def test_id_from_hostname_is_total(host: str) -> None:
    try:
        nid = id_from_hostname(host)
    except ValueError:
        return
    assert 1 <= nid <= 1_000_000


def test_resolve_node_id() -> None:
    assert resolve_node_id(4, False, "anything") == 4
    assert resolve_node_id(AUTO, False, "kvstore-1") == 2
    assert resolve_node_id(None, True, "kvstore-1") == 2
    assert resolve_node_id(AUTO, True, "kvstore-0") == 1
    with pytest.raises(ValueError, match="exclude each other"):
        resolve_node_id(4, True, "kvstore-1")
    with pytest.raises(ValueError, match="give the node id"):
        resolve_node_id(None, False, "kvstore-1")
    with pytest.raises(ValueError, match="cannot derive"):
        resolve_node_id(AUTO, False, "laptop")


@given(st.one_of(st.text(max_size=30), st.integers(), st.booleans()))
def test_node_id_param_is_total(value: object) -> None:
    try:
        out = NodeIdParam().convert(value, None, None)
    except click.BadParameter:
        return
    assert out == AUTO or (isinstance(out, int) and out >= 1)


def test_node_id_param() -> None:
    p = NodeIdParam()
    assert p.convert("3", None, None) == 3 and p.convert(" Auto ", None, None) == AUTO
    for bad in ("0", "-1", "1.5", "three", "", "1" * 19, "\u00b2", "\u0663"):
        with pytest.raises(click.BadParameter):
            p.convert(bad, None, None)


def _serve(args: list[str], env: dict[str, str]) -> Any:
    clean = {name: None for name in natural_envvars(serve)}
    return CliRunner().invoke(cli, ["serve", *args], env={**clean, **env})


def test_serve_takes_its_id_from_the_host_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The id is derived before the configuration is checked: peers without node 3 name node 3.
    monkeypatch.setattr(socket, "gethostname", lambda: "kvstore-2")
    env = {"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_LISTEN": "127.0.0.1:1", "KVSTORE_PEERS": "1=127.0.0.1:1"}
    for args, extra in (([], {"KVSTORE_ID": "auto"}), (["--id-from-hostname"], {}),
                        ([], {"KVSTORE_ID_FROM_HOSTNAME": "1"})):
        r = _serve(args, {**env, **extra})
        assert r.exit_code == 2 and "--peers must include this node (id 3)" in r.output, r.output
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    r = _serve(["--id-from-hostname"], env)
    assert r.exit_code == 2 and "cannot derive a node id from host name 'laptop'" in r.output, r.output
    r = _serve(["--id-from-hostname", "--id", "2"], env)
    assert r.exit_code == 2 and "exclude each other" in r.output, r.output
    r = _serve([], env)
    assert r.exit_code == 2 and "give the node id" in r.output, r.output
    r = _serve(["--id", "0"], env)
    assert r.exit_code == 2 and "must be >= 1" in r.output, r.output


def test_planted_watch_bug_is_an_option_read_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """`watch_service.PLANT_ENV` is `--plant-watch-bug`'s natural name: the node takes it into
    `NodeConfig.plant_watch_bug` once, and nothing reads the environment at request time."""
    from kvstore.server import watch_service

    assert _params({watch_service.PLANT_ENV: "drop"}, [], monkeypatch)["plant_watch_bug"] == "drop"
    assert _params({}, [], monkeypatch)["plant_watch_bug"] == ""
    assert "os.environ" not in Path(watch_service.__file__).read_text()
