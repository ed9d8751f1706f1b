"""Retention by revisions (`kvstore serve --history-retention-revisions N`): the definition and
its checks. Synchronous and deterministic, no I/O (`tests/unit/test_purity.py`); the metadata
leader's loop that drives it is `kvstore/server/compaction.py`. docs/REVISIONS.md, "Retention".

Definition: **the cluster keeps its newest N write revisions**, and compacts every group at one
revision R:

- each data group's leader computes its own point p_g from its change log
  (`mvcc.retention_step`, in bounded steps: the revision of its (N+1)-th newest write revision, 0 if it has N or
  fewer);
- R = max over the data groups of p_g (`cluster_point`), and every group, the metadata group
  included, is compacted at R (each clamps R to its own last revision, as for `KV.Compact`).

Invariants:
- every write revision among the cluster's N newest (all data groups merged) stays above R, so
  reads at it and watches from it work in every group: the cluster's (N+1)-th newest revision is
  at least every p_g (a group's N+1 newest are among the cluster's), so at least R;
- no group keeps more than its own N newest changes (R >= p_g), so history is bounded by N per
  group;
- one compact revision for the whole cluster: a read or watch across groups at a revision is
  refused (COMPACTED) by all of them or by none, except a group whose last revision is below R
  (it clamps and keeps what it has);
- safe with stale inputs: a point read from a lagging replica, a group that did not answer, or
  a group whose history moved meanwhile only lowers R (keeps more), since each p_g is taken
  over a subset of the cluster's changes.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvstore import errors
from kvstore.node.host import Host
from kvstore.storage import mvcc
from kvstore.storage.errors import StorageError

MAX_KEEP = 10_000_000
"""The largest N: a group's leader walks up to N + 1 rows of its change log per round (~0.6 µs
each on LMDB, in steps of `STEP_ROWS`)."""


def check_keep(keep: int) -> int:
    """`keep` if it is a number of revisions to keep (1..MAX_KEEP); definite InvalidArgument
    otherwise (total over every int)."""
    if not 1 <= keep <= MAX_KEEP:
        raise errors.InvalidArgument(f"a number of revisions to keep must be in 1..{MAX_KEEP}, not {keep}")
    return keep


def cluster_point(points: Mapping[int, int]) -> int:
    """The revision to compact every group at, from the data groups' own points (group -> p_g;
    0: the group has N or fewer write revisions): the highest (0: nothing to compact)."""
    return max(points.values(), default=0)


STEP_ROWS = 10_000
"""Change-log rows one step of a walk reads (~6 ms on LMDB): the shell yields to its event loop
between steps, so a large N never stalls the leader's loop for long."""


def begin_walk(host: Host, group: int, keep: int) -> mvcc.RetentionWalk:
    """Start this node's answer to a retention request for `group` (a GroupPropose with
    `retention_keep`): a walk of its change log (`walk_step`), which only the group's leader with
    a current view starts (`Host.leads_current`: it has applied everything committed before its
    term). Definite errors: InvalidArgument for a bad `keep`, WrongShard for a group not here,
    NotLeader / NoLeader elsewhere."""
    check_keep(keep)
    g = host.groups.get(group)
    if g is None:
        raise errors.WrongShard(f"group {group} is not on this node")
    if not host.leads_current(group):
        lead = g.core.lead
        if lead and lead != host.node_id:
            raise errors.NotLeader(lead, host.members.get(lead, ""))
        raise errors.NoLeader(f"group {group} has no current leader here")
    return mvcc.RetentionWalk(keep)


def walk_step(host: Host, group: int, walk: mvcc.RetentionWalk) -> bool:
    """One bounded step (`STEP_ROWS`) of `walk` over this node's applied change log of `group`;
    True once `walk.point` is the group's point. A step after this node lost the leadership or
    after writes is still safe (`mvcc.retention_step`: a resumed walk only keeps more).
    InternalError for a corrupt change log."""
    try:
        return host.store.revisions.retention_step(group, walk, STEP_ROWS)
    except (StorageError, ValueError) as err:
        raise errors.InternalError(f"group {group}: {err}") from None


def check_point(group: int, revision: int) -> int:
    """A point a group's leader answered (from the wire): `revision` if it is 0 or a revision of
    `group`'s slot within the int64 range; definite InvalidArgument otherwise, so a garbled or
    forged answer never becomes a compaction."""
    if revision == 0:
        return 0
    if not 0 < revision <= mvcc.REVISION_MAX or revision % mvcc.STEP != mvcc.slot_of(group):
        raise errors.InvalidArgument(f"group {group}: {revision} is not a retention point of this group")
    return revision
