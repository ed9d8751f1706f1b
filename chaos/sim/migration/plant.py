"""Known migration bugs that can be planted, to prove the simulator finds them.

Each one replaces a function for the duration of `with planted(name):`; the product code carries
no trace of them. Bugs of the coordinator's ordering are planted where its commands leave it (the
simulated cluster's `propose`), so they do not depend on how `MoveCoordinator.drive` is written:

- `flip-before-activate`: ACTIVATE is acknowledged at once and applied in the background, so the
  coordinator flips the map before the target serves the ranges;
- `cache-wrong-shard`: the state machine caches a WRONG_SHARD refusal in the session table, so a
  retry at the new owner gets the refusal again (the cache travels with the move);
- `export-without-sessions`: an export carries the data rows only, not the session table;
- `no-freeze`: the source never freezes the ranges (FREEZE is acknowledged, not applied; the
  export's own check that the ranges are frozen is lifted too, else the move would just hang);
- `activate-before-install`: ACTIVATE follows BEGIN at once, before any INSTALL;
- `shared-install-token`: every coordinator uses the same install token, which brings back the race
  fixed by the tokens (a racing coordinator's BEGIN wipes what the other installed, and the other's
  ACTIVATE then serves the wiped ranges).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvstore import errors
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import machine
from kvstore.storage.commands import ApplyResult, Command, encode_result
from kvstore.storage.machine import DictState
from kvstore.storage.shardcmd import (
    REC_DATA,
    ShardOp,
    decode_shard_command,
    encode_record,
    encode_shard_command,
    is_shard_command,
)

from . import sim as _sim
from . import world
from .world import SimCluster

_real_propose = SimCluster.propose


def _op(data: bytes) -> ShardOp | None:
    return decode_shard_command(data).op if is_shard_command(data) else None


async def _propose_activate_in_background(self: SimCluster, group: int, data: bytes) -> ApplyResult:
    if _op(data) == ShardOp.ACTIVATE:
        # BUG: acknowledged before it is applied; the coordinator goes on to flip the map.
        async def later() -> None:
            await self.sim.sleep(self.sim.rng.uniform(0.0, 0.02))
            with contextlib.suppress(errors.KVError):
                await _real_propose(self, group, data)

        self.sim.spawn(later(), "background ACTIVATE")
        return ApplyResult()
    return await _real_propose(self, group, data)


async def _propose_without_freeze(self: SimCluster, group: int, data: bytes) -> ApplyResult:
    if _op(data) == ShardOp.FREEZE:
        return ApplyResult()  # BUG: the source goes on serving the ranges it exports
    return await _real_propose(self, group, data)


async def _propose_activate_after_begin(self: SimCluster, group: int, data: bytes) -> ApplyResult:
    res = await _real_propose(self, group, data)
    if _op(data) == ShardOp.BEGIN and not res.error and not res.existed:
        cmd = decode_shard_command(data)
        # BUG: the target serves the ranges before their data (and sessions) are installed.
        await _real_propose(self, group, encode_shard_command(ShardOp.ACTIVATE, cmd.ranges, token=cmd.token, move=cmd.move))
    return res


_real_apply_command = machine.apply_command


def _apply_command_caching_refusals(view: machine.StateView, cmd: Command) -> ApplyResult:
    res = _real_apply_command(view, cmd)
    head = view.session_head(cmd.client_id) if cmd.client_id else None
    floor = 0 if head is None else head.floor
    if res.wrong_shard and cmd.client_id and cmd.seq >= floor and view.session_result(cmd.client_id, cmd.seq) is None:
        # BUG: the refusal is cached like a result, so the retry at the new owner returns it.
        view.put_session_result(cmd.client_id, cmd.seq, encode_result(res))
        machine.touch_session(view, cmd.client_id, head, floor)
    return res


def _export_without_sessions(state: DictState, ranges: IntervalSet, chunk_bytes: int) -> list[bytes]:
    # BUG: only the data rows travel; the session table stays behind.
    recs = [encode_record(REC_DATA, k, state.data[k]) for k in sorted(state.data) if key_hash(k) in ranges]
    return [b"".join(recs)] if recs else []


class _SameToken(random.Random):
    def getrandbits(self, k: int) -> int:
        return 0  # BUG: every coordinator's installation looks like every other's (token 1)


def _same_token_rng(sim: Any) -> random.Random:
    return _SameToken(0)


Patch = tuple[Any, str, Any]

BUGS: dict[str, list[Patch]] = {
    "flip-before-activate": [(SimCluster, "propose", _propose_activate_in_background)],
    "cache-wrong-shard": [(machine, "apply_command", _apply_command_caching_refusals)],
    "export-without-sessions": [(world, "export_records", _export_without_sessions)],
    "no-freeze": [(SimCluster, "propose", _propose_without_freeze), (world, "EXPORT_REQUIRES_FROZEN", False)],
    "activate-before-install": [(SimCluster, "propose", _propose_activate_after_begin)],
    "shared-install-token": [(_sim, "token_rng", _same_token_rng)],
}
"""name -> [(object, attribute, replacement)]."""


@contextmanager
def planted(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    patches = BUGS[name]
    saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _ in patches]
    try:
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


__all__ = ["BUGS", "planted"]
