"""`kvstore serve` configured by environment variables, and node ids derived from host names.

Every option `--foo-bar` of `kvstore serve` also reads the variable `KVSTORE_FOO_BAR`
(`KVSTORE_ID`, `KVSTORE_PEERS`, `KVSTORE_DATA_DIR`, `KVSTORE_LISTEN`, `KVSTORE_CERTS_DIR`, ...): the
names a container or a Kubernetes manifest sets. The older automatic names `KVSTORE_SERVE_<PARAMETER>`
(click's `auto_envvar_prefix`: `KVSTORE_SERVE_NODE_ID`, `KVSTORE_SERVE_DATA_DIR`, ...) keep working.
Precedence: a flag on the command line, then the natural name, then the automatic one, then the
default.

Invariants: a natural name is a function of the option's long flag alone, and the `kvctl`
variables that a node's name could collide with (`KVSTORE_ENDPOINTS`, `KVSTORE_USER`, ...) name no
option of `serve` except `KVSTORE_CERTS_DIR`, which both read on purpose (a directory holding a
node's and a client's certificates serves both; tests/unit/test_serve_env.py checks this).

`--id-from-hostname` (or `KVSTORE_ID=auto`) takes the node id from the host name the way a
StatefulSet names its pods: `kvstore-0` is node 1, `kvstore-2` node 3 (ordinal + 1).
"""

from __future__ import annotations

import re
import socket
from typing import Any

import click

ENV_PREFIX = "KVSTORE_"
AUTO = "auto"
"""`--id auto`: derive the id from the host name (same as `--id-from-hostname`)."""
MAX_ORDINAL = 999_999
"""The largest StatefulSet ordinal accepted (a sanity bound: node ids are small numbers)."""

_POD_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?-(0|[1-9][0-9]*)$")


def natural_envvar(option: click.Option) -> str:
    """`--data-dir` -> `KVSTORE_DATA_DIR`: the option's first long flag, upper case, `-` -> `_`."""
    longs = [o for o in option.opts if o.startswith("--")]
    if not longs:
        raise ValueError(f"option {option.name!r} has no long flag to name its variable after")
    return ENV_PREFIX + longs[0][2:].upper().replace("-", "_")


def add_natural_envvars(command: click.Command) -> click.Command:
    """Give every option of `command` its natural variable (before any variable it already
    names); click's automatic `KVSTORE_<COMMAND>_<PARAMETER>` still applies after them."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            existing = [] if param.envvar is None else (
                [param.envvar] if isinstance(param.envvar, str) else list(param.envvar))
            name = natural_envvar(param)
            param.envvar = [name, *(e for e in existing if e != name)]
    return command


def natural_envvars(command: click.Command) -> dict[str, str]:
    """{variable: option's parameter name} for every option of `command`."""
    return {natural_envvar(p): str(p.name) for p in command.params if isinstance(p, click.Option)}


class NodeIdParam(click.ParamType):
    """`--id`: a node id (an integer >= 1), or `auto` (from the host name)."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            num = value
        else:
            text = str(value).strip()
            if text.lower() == AUTO:
                return AUTO
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                self.fail(f"{value!r} is not a node id: expected an integer >= 1, or 'auto' "
                          "(from the host name, like --id-from-hostname)", param, ctx)
            num = int(text)
        if num < 1:
            self.fail(f"{value!r} is not a node id: it must be >= 1", param, ctx)
        return num


def id_from_hostname(hostname: str) -> int:
    """The node id of a StatefulSet pod: `kvstore-2` -> 3 (ordinal + 1); only the first label of a
    fully qualified name counts (`kvstore-2.kvstore-peer.default.svc` -> 3). ValueError, naming
    the host name, when it does not end in `-<ordinal>`."""
    label = hostname.strip().split(".", 1)[0].lower()
    m = _POD_NAME.fullmatch(label)
    if m is None:
        raise ValueError(
            f"cannot derive a node id from host name {hostname!r}: expected NAME-ORDINAL, the name of a "
            "StatefulSet's pod (e.g. kvstore-2 -> node 3); give --id instead")
    ordinal = int(m.group(2))
    if ordinal > MAX_ORDINAL:
        raise ValueError(f"host name {hostname!r}: ordinal {ordinal} is above {MAX_ORDINAL}")
    return ordinal + 1


def resolve_node_id(node_id: int | str | None, from_hostname: bool, hostname: str | None = None) -> int:
    """The id `serve` runs as, from `--id` and `--id-from-hostname`; ValueError with the fix when
    they are missing or contradict each other. `hostname` defaults to this machine's."""
    if from_hostname and isinstance(node_id, int):
        raise ValueError(f"--id {node_id} and --id-from-hostname exclude each other: give one")
    if from_hostname or node_id == AUTO:
        return id_from_hostname(socket.gethostname() if hostname is None else hostname)
    if node_id is None:
        raise ValueError("give the node id: --id N (KVSTORE_ID), or --id-from-hostname (KVSTORE_ID=auto)")
    if not isinstance(node_id, int):
        raise ValueError(f"bad node id {node_id!r}: expected an integer >= 1, or 'auto'")
    return node_id
