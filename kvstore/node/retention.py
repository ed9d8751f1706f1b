"""Retention by revisions (`kvstore serve --history-retention-revisions N`): the definition and
its checks. Synchronous and deterministic, no I/O (`tests/unit/test_purity.py`); the metadata
leader's loop that drives it is `kvstore/server/compaction.py`. docs/REVISIONS.md, "Retention".

Definition: **the cluster keeps its newest N write revisions**, and compacts every group at one
revision R:

- each data group's leader computes its own point p_g from its change log
  (`mvcc.retention_point`: the revision of its (N+1)-th newest write revision, 0 if it has N or
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

MAX_KEEP = 100_000_000
"""The largest N: a group's leader walks up to N + 1 rows of its change log per round."""


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
