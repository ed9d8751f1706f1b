"""A leadership transfer (`shards.transfer_leader`: Admin.TransferLeader, etcd's MoveLeader)
returns once this node sees the target leading, as etcd's MoveLeader waits; stepping down alone
is not enough (the target is only a candidate then, and may lose). A stand-in core whose state
the test moves through the transfer's steps."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from kvstore import errors
from kvstore.raft import Role
from kvstore.server.shards import transfer_leader


class _Core:
    def __init__(self) -> None:
        self.role = Role.LEADER
        self.lead = 1
        self.lead_transferee = 0

    def transfer_leader(self, to: int) -> None:
        self.lead_transferee = to


def _host(core: _Core) -> Any:
    def transfer(group: int, to: int) -> None:
        core.transfer_leader(to)

    return SimpleNamespace(node_id=1, groups={5: SimpleNamespace(core=core)}, transfer_leader=transfer)


def _run(core: _Core, steps: list[tuple[str, int]], timeout: float = 5.0) -> tuple[BaseException | None, list[str]]:
    """Run the transfer while `steps` move the core ((role name, lead) each, one per 20 ms);
    returns its exception (None: it returned) and which step had been reached when it ended."""
    reached: list[str] = []

    async def main() -> BaseException | None:
        async def drive() -> None:
            for role, lead in steps:
                await asyncio.sleep(0.02)
                core.role, core.lead = Role[role], lead
                if role != "LEADER":
                    core.lead_transferee = 0
                reached.append(f"{role}:{lead}")

        d = asyncio.ensure_future(drive())
        try:
            await transfer_leader(cast(Any, _host(core)), lambda: None, 5, 3, timeout)
            return None
        except BaseException as err:
            return err
        finally:
            d.cancel()

    return asyncio.run(main()), reached


def test_it_returns_only_once_the_target_leads_not_when_this_node_steps_down() -> None:
    err, reached = _run(_Core(), [("FOLLOWER", 0), ("FOLLOWER", 0), ("FOLLOWER", 3)])
    assert err is None
    assert reached == ["FOLLOWER:0", "FOLLOWER:0", "FOLLOWER:3"]  # not done at a candidate's term


def test_another_node_winning_is_a_definite_failure() -> None:
    err, _ = _run(_Core(), [("FOLLOWER", 0), ("FOLLOWER", 2)])
    assert isinstance(err, errors.ProposalDropped) and "node 2" in err.message and not err.indeterminate


def test_no_leader_seen_in_time_is_indeterminate() -> None:
    err, _ = _run(_Core(), [("FOLLOWER", 0)], timeout=0.2)
    assert isinstance(err, errors.Timeout) and err.indeterminate and "did not see node 3" in err.message


def test_a_transfer_to_the_leader_itself_returns_at_once() -> None:
    core = _Core()

    async def main() -> None:
        await transfer_leader(cast(Any, _host(core)), lambda: None, 5, 1, 0.1)

    asyncio.run(main())
    assert core.lead_transferee == 0 and core.role == Role.LEADER
