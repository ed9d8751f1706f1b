"""The cluster version: which state-machine commands the whole cluster may use (etcd's cluster
version), so a rolling upgrade never puts into a log a command some member cannot apply.

Feature levels: each binary supports every level up to `SUPPORTED_LEVEL` (`FEATURES` says what
each adds); `COMMAND_LEVELS` maps every command kind (`commands.Op` code) to the lowest level that
knows it. A new command kind is one line there (TXN: `LEVEL_TRANSACTIONS`); a new form of a kind
that an older member would decode as malformed is one line in `FORM_LEVELS` (`command_level`).

The replicated state is the value of the reserved key `VERSIONS_KEY` in the metadata group
(`ClusterVersion`): the cluster version and each node's advertised level. It changes only by
compare-and-swap of the whole encoded value, in two ways:
- a node ADVERTISES its own level (`advertise_command`; writes through a GroupPropose are checked
  by `check_version_change`: only the sender's own entry may change, or the value is exactly the
  raise below);
- the metadata group's leader RAISES the cluster version (`raise_command`) to the minimum level
  over all members (voters and learners of every group, `members_of`) once every member has
  advertised; the value it writes keeps only members' entries.

Invariants:
- the cluster version never decreases (`raise_command` only raises; `check_version_change` refuses
  a lower one), and it starts at `LEVEL_BASE` (an absent key means `LEVEL_BASE`);
- levels, advertised or replicated, are in 1..`MAX_LEVEL` and node ids in 1..2**63-1:
  `decode_versions` raises `ValueError` on anything else, and on any non-canonical encoding;
- a proposal of a command whose level exceeds the cluster version is refused before it reaches a
  log (`CommandGate.check`, called by `Host.propose`), with a definite `ClusterVersionTooLow`
  naming the level needed and the members that lag. Only a command the gate admitted can be in a
  log, and the cluster version was raised only after every member advertised at least that level,
  so every member's binary knows every kind in its logs. (A member added later with an older
  binary would not: `kvstore serve` refuses to run a binary below the applied cluster version,
  see `VersionTracker.too_old`, and its apply stops at the first entry of a kind it does not
  know, below.)

What an unknown command kind does at apply: before this module, `decode_command` raised and the
entry yielded an error result that changed nothing: deterministic among replicas of one release,
but a replica of an older release would have diverged from newer ones that apply the kind. Now
`machine.apply_data` raises `UnknownCommandKind` for what a newer release writes for a new kind
(the current format's whole, well-formed header with an op code outside `Op`: `commands.unknown_kind`): the apply transaction is abandoned whole and the node stops (etcd panics likewise) until
it runs a release that knows the kind. Garbage (an unknown format) is still an error result.

Synchronous and pure (no I/O): the asyncio loop that proposes is `kvstore.server.versions`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from kvstore import errors
from kvstore.node.metakey import MetaKeyTracker, MetaStore
from kvstore.shard.shardmap import ShardMap
from kvstore.storage import commands, txn
from kvstore.storage.shardcmd import (
    REC_CLOSED,
    REC_LEASE,
    ShardOp,
    decode_closed,
    decode_shard_command,
    is_shard_command,
    iter_records,
)

__all__ = [
    "COMMAND_LEVELS",
    "FEATURES",
    "FORM_LEVELS",
    "LEVEL_BASE",
    "LEVEL_COMPACT_KEEP",
    "LEVEL_CROSS_TRANSACTIONS",
    "LEVEL_LEASES",
    "LEVEL_LEASES_2",
    "LEVEL_TRANSACTIONS",
    "LEVEL_TXN_RANGES",
    "LEVEL_XTXN_LEASES",
    "MAX_LEVEL",
    "SUPPORTED_LEVEL",
    "SWEEP_OPS",
    "VERSIONS_KEY",
    "ClusterVersion",
    "CommandGate",
    "VersionTracker",
    "advertise_command",
    "check_level",
    "check_version_change",
    "command_level",
    "decode_versions",
    "encode_versions",
    "form_level",
    "install_level",
    "members_of",
    "raise_command",
]

log = logging.getLogger("kvstore.version")

LEVEL_BASE = 1
LEVEL_TRANSACTIONS = 2
LEVEL_CROSS_TRANSACTIONS = 3
LEVEL_LEASES = 4
LEVEL_LEASES_2 = 5
LEVEL_TXN_RANGES = 6
LEVEL_XTXN_LEASES = 7
LEVEL_COMPACT_KEEP = 8

FEATURES: dict[int, str] = {
    LEVEL_BASE: "PUT, DELETE, CAS, COMPACT, CLOSE, shard commands, the metadata keys",
    LEVEL_TRANSACTIONS: "TXN: multi-key transactions",
    LEVEL_CROSS_TRANSACTIONS: "PREPARE, COMMIT, ABORT, RECORD, RESOLVE, FINALIZE: transactions across groups "
                              "and range deletes (with the COMMIT/RECORD form that deletes every key prepared)",
    LEVEL_LEASES: "LEASE_GRANT..LEASE_PUT: leases (TTL) and keys attached to them; a lease's deletion across "
                  "groups (the lease forms of PREPARE and RECORD)",
    LEVEL_LEASES_2: "TXN with a lease (a put that attaches its key to a lease, the PUT_LEASE operation, or a "
                    "LEASE compare, `storage/txn.py`); the orphan sweep's LEASE_STATUS and LEASE_ORPHAN",
    LEVEL_TXN_RANGES: "range deletes inside transactions (a TXN's DELETE_RANGE operation; the COMMIT and RECORD "
                      "form with the ranges, tail 4 of `storage/xtxn.py`)",
    LEVEL_XTXN_LEASES: "transactions across groups with leased puts or LEASE compares (the leased forms of "
                       "PREPARE, COMMIT and RECORD, `storage/xtxn.py`)",
    LEVEL_COMPACT_KEEP: "compaction that keeps the changes at the compact revision, so a watch from exactly it "
                        "works (the COMPACT form with the keep byte; the INSTALL whose source kept them, "
                        "`mvcc.compact`)",
}
"""What each feature level adds."""

SUPPORTED_LEVEL = LEVEL_COMPACT_KEEP
"""The highest level this binary supports (it knows every command kind of `COMMAND_LEVELS`)."""

MAX_LEVEL = 0xFFFF
"""Levels are u16 on the wire; anything outside 1..MAX_LEVEL is malformed."""

SWEEP_OPS = frozenset({commands.Op.LEASE_STATUS, commands.Op.LEASE_ORPHAN})
"""The orphan sweep's command kinds (`node/orphans.py`): level `LEVEL_LEASES_2`."""

COMMAND_LEVELS: dict[int, int] = {
    commands.Op.PUT: LEVEL_BASE,
    commands.Op.DELETE: LEVEL_BASE,
    commands.Op.CAS: LEVEL_BASE,
    commands.Op.COMPACT: LEVEL_BASE,
    commands.Op.CLOSE: LEVEL_BASE,
    commands.Op.TXN: LEVEL_TRANSACTIONS,
    **{op: LEVEL_CROSS_TRANSACTIONS for op in sorted(commands.X_OPS)},
    **{op: LEVEL_LEASES for op in commands.Op if op.name.startswith("LEASE_") and op not in SWEEP_OPS},
    **{op: LEVEL_LEASES_2 for op in sorted(SWEEP_OPS)},
}
"""command kind (`commands.Op` code) -> the lowest cluster version that may propose it. The
orphan sweep's kinds (`SWEEP_OPS`) are level 5, not 4 like the other LEASE_* kinds: binaries of
level 4 without them exist (they came after it), and such a member would stop on them."""

FORM_LEVELS: dict[int, int] = {
    commands.Op.PREPARE: LEVEL_XTXN_LEASES, commands.Op.RECORD: LEVEL_XTXN_LEASES,
    commands.Op.COMMIT: LEVEL_XTXN_LEASES, commands.Op.TXN: LEVEL_TXN_RANGES,
    commands.Op.COMPACT: LEVEL_COMPACT_KEEP,
}
"""Kinds with later forms -> the level of the kind's NEWEST form (`form_level` says which form a
decoded command is; `command_level` decodes only while the cluster version is below this). The
forms: the lease forms of PREPARE and RECORD (a lease's deletion across groups: PREPARE's range
flag 2, RECORD's lease tail, `storage/xtxn.py`) are level 4, above their kind's: a node of level
3 decodes them as malformed, so they must never reach a log while such a member exists. Level 4 grew with these forms rather than taking a level
of their own (it had not been released then). A TXN with a leased put (`txn.PUT_LEASE`, etcd's
Txn with a leased put: `etcdctl lock`) is level 5: a level-4 node decodes it as malformed (an
unknown operation kind), and level-4 binaries exist. Shard commands have one such form too:
an INSTALL carrying lease attachments (`install_level`).

Not here: the compact COMMIT/RECORD form of a range delete (tail 2, "delete every key
prepared", `XCmd.delete_prepared`) is part of level 3's own meaning. No release of level 3 (or
2) exists: the last release (the one `tests/integration/test_rolling_upgrade.py` upgrades from)
supports level 1 only, so no member that knows COMMIT and RECORD without that form can meet it.
A lease's deletion uses both tails; its lease tail alone makes it level 4.

A kind may have several later forms: its entry is the highest, and `command_level` decodes the
command (only while the cluster version is below that) to find which form it is (`form_level`:
a new form of a kind means a new line here AND a new case there). Level 6 (`LEVEL_TXN_RANGES`):
a TXN with a DELETE_RANGE operation (never applied as one group's TXN, but a level-5 node would
decode it as malformed, not refuse it as level 6 does), and the COMMIT and RECORD with ranges
(tail 4) that carry such a transaction's range deletes across groups. Level 7
(`LEVEL_XTXN_LEASES`): PREPARE, COMMIT and RECORD with leased puts (and PREPARE reading keys'
leases: range flag 3, or 4 with a range lock too; the leased tail 3); a level-5 or level-6 node
decodes them as malformed. A form using several later features needs the highest of their
levels (a COMMIT with both leased puts and ranges: 7). Level 8 (`LEVEL_COMPACT_KEEP`): the
COMPACT with the keep byte (`mvcc.compact`'s keep rule): a level-7 node decodes it as malformed
(an error result that changes nothing) where newer ones compact, and the two rules leave
different rows (key ids reused or not), so replicas would diverge: the compacting paths
(`server/compaction.py`) propose it only once the cluster version is 8, and apply follows the
command, never the binary."""


def form_level(cmd: commands.Command) -> int:
    """The level decoded command `cmd`'s form needs (`LEVEL_BASE` for a kind's first form; the
    highest level among the later features it uses; see `FORM_LEVELS`)."""
    x = cmd.x
    if x is not None:
        if x.leased or x.read_leases:
            return LEVEL_XTXN_LEASES
        if x.ranges:
            return LEVEL_TXN_RANGES
        return LEVEL_LEASES if x.lease else LEVEL_BASE
    if cmd.txn is not None:
        return (LEVEL_TXN_RANGES if txn.has_delete_range(cmd.txn)
                else LEVEL_LEASES_2 if txn.has_lease(cmd.txn) else LEVEL_BASE)
    if cmd.keep:
        return LEVEL_COMPACT_KEEP
    return LEVEL_BASE


def command_level(data: bytes, levels: Mapping[int, int] = COMMAND_LEVELS) -> int | None:
    """The lowest cluster version that may propose the encoded command `data`: its kind's level,
    or its form's (`FORM_LEVELS`) if it is a later form of the kind; None if the table does not
    know the kind. Garbage gets its kind's level (it is refused where it is decoded)."""
    if len(data) < 2:
        return None
    need = levels.get(data[1])
    form = FORM_LEVELS.get(data[1])
    if need is None or form is None or form <= need:
        return need
    try:
        cmd = commands.decode_command(data)
    except ValueError:
        return need
    return max(need, form_level(cmd))


_FORM_NAMES = {LEVEL_LEASES: " (a lease's deletion across groups)", LEVEL_LEASES_2: " with a lease",
               LEVEL_TXN_RANGES: " with a range delete",
               LEVEL_COMPACT_KEEP: " keeping the changes at the compact revision",
               LEVEL_XTXN_LEASES: " with leased puts or lease compares (a transaction across groups)"}


def install_level(data: bytes) -> int:
    """The lowest cluster version that may propose the shard command `data`: `LEVEL_COMPACT_KEEP`
    for an INSTALL whose source kept the changes at its compact revision (the 17-byte
    `shardcmd.REC_CLOSED`, which a level-7 member decodes as malformed), `LEVEL_LEASES` for one
    carrying a moved key's lease attachment (`shardcmd.REC_LEASE`, a later form of INSTALL that a
    level-3 member decodes as malformed), else `LEVEL_BASE` (garbage too: it is refused where it
    is decoded). Only a range holding an attached key exports a lease record, and a key is
    attached only by a LEASE_PUT, itself level 4; only a source compacted under the keep rule
    (level 8) exports the kept form: the gate is a second line of defence."""
    if len(data) < 2 or data[1] != ShardOp.INSTALL:
        return LEVEL_BASE
    need = LEVEL_BASE
    try:
        body = decode_shard_command(data).records
        for tag, _, value in iter_records(body):
            if tag == REC_CLOSED and decode_closed(value)[2]:
                need = max(need, LEVEL_COMPACT_KEEP)
            elif tag == REC_LEASE:
                need = max(need, LEVEL_LEASES)
    except ValueError:
        return LEVEL_BASE
    return need


VERSIONS_KEY = b"\x00kvstore/versions"
"""The reserved key of the `ClusterVersion` in the metadata group (clients cannot reach it)."""

_MAGIC = b"KVV1"
_HEAD = struct.Struct(">4sHI")
_ENTRY = struct.Struct(">QH")
MAX_MEMBERS = 4096
_MAX_NODE = (1 << 63) - 1


def check_level(level: int, what: str = "level") -> int:
    """`level` if it is an int in 1..MAX_LEVEL, else `ValueError` (hostile advertisements)."""
    if type(level) is not int or not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"{what} {level!r} is not in 1..{MAX_LEVEL}")
    return level


@dataclass(frozen=True, slots=True)
class ClusterVersion:
    """The replicated cluster version and every node's advertised level (node id -> level)."""

    cluster: int = LEVEL_BASE
    advertised: Mapping[int, int] = field(default_factory=dict)

    def lagging(self, members: Collection[int], level: int) -> list[str]:
        """The members below `level`, each as "node N (advertises L)" or "node N (not advertised)"."""
        out = []
        for n in sorted(members):
            got = self.advertised.get(n)
            if got is None:
                out.append(f"node {n} (not advertised)")
            elif got < level:
                out.append(f"node {n} (advertises {got})")
        return out


def encode_versions(v: ClusterVersion) -> bytes:
    """Canonical: magic, cluster u16, count u32, then (node u64, level u16) by node id.
    `ValueError` beyond `MAX_MEMBERS` entries (never write what `decode_versions` refuses: every
    later compare-and-swap would expect a value no tracker could read)."""
    items = sorted(v.advertised.items())
    if len(items) > MAX_MEMBERS:
        raise ValueError(f"a cluster version holds at most {MAX_MEMBERS} members' levels, not {len(items)}")
    return _HEAD.pack(_MAGIC, v.cluster, len(items)) + b"".join(_ENTRY.pack(n, lv) for n, lv in items)


def decode_versions(data: bytes) -> ClusterVersion:
    """The `ClusterVersion` of a stored value; `ValueError` for anything but a canonical encoding."""
    if len(data) < _HEAD.size:
        raise ValueError(f"cluster version of {len(data)} bytes is shorter than its {_HEAD.size}-byte header")
    magic, cluster, n = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("not a cluster version value")
    check_level(cluster, "cluster version")
    if n > MAX_MEMBERS or len(data) != _HEAD.size + n * _ENTRY.size:
        raise ValueError(f"cluster version of {len(data)} bytes does not hold {n} members")
    adv: dict[int, int] = {}
    prev = 0
    for i in range(n):
        node, level = _ENTRY.unpack_from(data, _HEAD.size + i * _ENTRY.size)
        if not 1 <= node <= _MAX_NODE:
            raise ValueError(f"level advertised for node id {node}")
        if node <= prev:
            raise ValueError("advertised levels not in canonical order")
        adv[node] = check_level(level, f"level advertised by node {node}")
        prev = node
    return ClusterVersion(cluster, adv)


def _decode_or_base(raw: bytes | None) -> ClusterVersion:
    return ClusterVersion() if raw is None else decode_versions(raw)


def _cas(raw: bytes | None, new: ClusterVersion) -> bytes:
    value = encode_versions(new)
    if raw is None:
        return commands.encode_cas(VERSIONS_KEY, True, b"", value)
    return commands.encode_cas(VERSIONS_KEY, False, raw, value)


def members_of(m: ShardMap | None) -> frozenset[int]:
    """Every member of the cluster as the shard map has it: its nodes and the voters and learners
    of every group."""
    if m is None:
        return frozenset()
    out = set(m.nodes)
    for p in m.groups.values():
        out.update(p.members())
    return frozenset(out)


def advertise_command(v: ClusterVersion, raw: bytes | None, node: int, level: int) -> bytes | None:
    """The metadata-group command that makes `v` (stored as `raw`, None if absent) carry `level`
    as node `node`'s advertised level, or None when it already does."""
    check_level(level)
    if v.advertised.get(node) == level:
        return None
    adv = dict(v.advertised)
    adv[node] = level
    return _cas(raw, ClusterVersion(v.cluster, adv))


def raise_command(v: ClusterVersion, raw: bytes | None, members: Collection[int]) -> bytes | None:
    """The command (for the metadata group's leader) that raises the cluster version to the
    minimum advertised level over `members`, or None: some member has not advertised, or the
    minimum is not above the current version (never lowered). Non-members' entries are dropped."""
    if not members or any(n not in v.advertised for n in members):
        return None
    target = min(v.advertised[n] for n in members)
    if target <= v.cluster:
        return None
    return _cas(raw, ClusterVersion(target, {n: v.advertised[n] for n in members}))


def check_version_change(
    expect_absent: bool, expected: bytes, value: bytes, sender: int, members: Collection[int] = (),
) -> None:
    """Refuse (`ValueError`) a compare-and-swap of the cluster version sent through a GroupPropose
    that is neither node `sender` advertising its own level (the cluster version stays, no entry
    but the sender's changes) nor exactly the raise `raise_command` makes from the old value over
    `members` (the checking node's view of the members: a raise from a different view is refused
    and decided again). Both values must decode."""
    if expect_absent and expected:
        raise ValueError("a compare-and-swap expecting absence carries no expected value")
    old = ClusterVersion() if expect_absent else decode_versions(expected)
    new = decode_versions(value)
    if new.cluster != old.cluster:
        want = raise_command(old, None if expect_absent else expected, members)
        if want is None or commands.decode_command(want).value != value:
            raise ValueError(
                f"a raise of the cluster version ({old.cluster} -> {new.cluster}) must be to the lowest level every "
                f"member advertised, keeping exactly the members' entries"
            )
        return
    for n in set(old.advertised) | set(new.advertised):
        if n != sender and old.advertised.get(n) != new.advertised.get(n):
            raise ValueError(f"node {sender} may not change node {n}'s advertised level")


class VersionTracker(MetaKeyTracker[ClusterVersion]):
    """The cluster version as of the metadata group's applied state on this node (`raw`: the
    stored value, None if never written: what a CAS expects)."""

    __slots__ = ("supported",)

    def __init__(self, store: MetaStore, supported: int = SUPPORTED_LEVEL) -> None:
        super().__init__(store, VERSIONS_KEY, "cluster version", decode_versions, ClusterVersion())
        self.supported = check_level(supported, "supported level")

    @property
    def raw(self) -> bytes | None:
        return self.stored

    @property
    def too_old(self) -> bool:
        """This binary supports less than the applied cluster version (it was downgraded, or
        joined with an older release): it may not know some command kind in the logs."""
        return self.supported < self.value.cluster

    def _updated(self, old: ClusterVersion, new: ClusterVersion) -> None:
        if new.cluster != old.cluster:
            log.warning("cluster version now %d (%s)", new.cluster, FEATURES.get(new.cluster, "a newer release's features"))


class CommandGate:
    """Refuses proposals of command kinds above the cluster version (see the module docstring).
    `version` reads the cluster version, `members` the cluster's members (for the message).
    `levels` is the table (the real `COMMAND_LEVELS` unless a test adds a kind)."""

    __slots__ = ("levels", "members", "top", "version")

    def __init__(
        self, version: Callable[[], ClusterVersion], members: Callable[[], Collection[int]],
        levels: Mapping[int, int] = COMMAND_LEVELS,
    ) -> None:
        self.version = version
        self.members = members
        self.levels = levels
        self.top = max(levels.values(), default=LEVEL_BASE)
        """The highest level of the table: while the cluster version reaches it (or it is the base
        level, as long as no kind needs more), `check` is one comparison per proposal."""

    def check(self, data: bytes) -> None:
        """Raise `errors.ClusterVersionTooLow` (definite) if `data` is a KV command whose kind
        (or form: `FORM_LEVELS`, decoded only while the cluster version is below the form's
        level) needs a level above the cluster version. Shard commands and garbage pass (garbage is
        refused where it is decoded, and yields an error result at apply) but an INSTALL with lease
        attachments below level 4 (`install_level`); a kind the table does not
        know that has a well-formed header (`commands.unknown_kind`: its apply would stop every
        replica) never does."""
        if len(data) < 2:
            return
        if is_shard_command(data):
            cluster = self.version().cluster
            if cluster < LEVEL_COMPACT_KEEP:
                inst = install_level(data)  # LEVEL_BASE unless an INSTALL
                if inst > cluster:
                    what = "lease attachments" if inst == LEVEL_LEASES else "changes kept at its compact revision"
                    raise errors.ClusterVersionTooLow(
                        f"an INSTALL carrying {what} needs cluster version {inst} "
                        f"({FEATURES[inst]}); the cluster version is {cluster}")
            return
        need = self.levels.get(data[1])
        if need is None:
            if commands.unknown_kind(data) is not None:
                raise errors.InvalidArgument(f"command kind {data[1]} is unknown to this release")
            return
        if self.top <= LEVEL_BASE or (need <= LEVEL_BASE and data[1] not in FORM_LEVELS):
            return
        v = self.version()
        if need <= v.cluster and data[1] in FORM_LEVELS and v.cluster < FORM_LEVELS[data[1]]:
            need = command_level(data, self.levels) or need  # decoded only below the form's level
        if need <= v.cluster:
            return
        if data[1] in FORM_LEVELS:  # refused: name the level its form needs (decoded on this path only)
            need = command_level(data, self.levels) or need
        lag = v.lagging(self.members(), need)
        name = commands.Op(data[1]).name if data[1] in commands.Op._value2member_map_ else f"kind {data[1]}"
        if need > self.levels.get(data[1], need):
            name += _FORM_NAMES.get(need, " (a later form)")
        raise errors.ClusterVersionTooLow(
            f"{name} needs cluster version {need} ({FEATURES.get(need, 'a newer feature level')}); the cluster "
            f"version is {v.cluster}" + (f"; members below level {need}: {', '.join(lag)}" if lag else
                                          "; every member supports it: the metadata leader raises the version shortly")
        )
