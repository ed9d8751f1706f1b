"""`kvstore serve --learner`: a read replica that registers itself with the cluster.

The node starts like `--join` (no bootstrap, an empty group) and asks the cluster, through the
client library (leader discovery, redirects, retries), to add it as a learner at its advertised
address. Once the leader has added it, the log (or a snapshot) arrives and the node knows it is a
member; a restart of a member does nothing here. Promotion to voter stays an explicit operator
step (`kvctl member promote ID`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from kvstore.errors import KVError

log = logging.getLogger("kvstore.learner")


async def register_learner(
    node_id: int,
    address: str,
    peers: Sequence[str],
    is_member: Callable[[], bool],
    group: int,
    *,
    interval: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Until `is_member()`, ask the cluster at `peers` to add node `node_id` (at `address`) as a
    learner of `group` (over TLS with `credentials` when given). Never raises (a cancelled task stops quietly)."""
    from kvstore.client import AsyncClient

    if is_member():
        return
    if not peers:
        log.error("--learner needs the address of at least one other member in --peers")
        return
    async with AsyncClient(list(peers), timeout=5.0, attempt_timeout=1.0, credentials=credentials) as cl:
        added = False
        while not is_member():
            try:
                st = await cl.status()
                g = next((x for x in st.groups if x.group == group), None)
                if g is not None and (node_id in g.voters or node_id in g.learners):
                    if not added:
                        log.info("node %d is a member of group %d; waiting for the log", node_id, group)
                        added = True
                else:
                    resp = await cl.add_member(node_id, address, learner=True)
                    log.info("registered as a learner of group %d at %s: %s", group, address, resp.message)
                    added = True
            except KVError as err:
                log.warning("not registered as a learner yet: %s", err)
            await asyncio.sleep(interval)
    log.info("node %d is a learner (read replica) of group %d", node_id, group)
