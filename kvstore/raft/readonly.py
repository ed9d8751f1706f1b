"""ReadIndex bookkeeping on the leader: batched leadership confirmation rounds.

Reads queue up as `unsent`. When the application next collects a Ready, all of them become one
*round*: the round records the commit index at that moment and the leader broadcasts one heartbeat
carrying the round number. At most `max_rounds` rounds (the core's `Config.max_read_rounds`) are
unconfirmed at once: reads arriving meanwhile stay `unsent` and leave together as the next round
once an older one is confirmed, so reads that arrive one at a time share rounds under load. A follower's heartbeat response echoes the highest round it has seen;
since a response to round r proves the leader was still leader after every round <= r started, a
round is confirmed once a majority of voters has echoed it or a later one. Confirming round r
releases every read of rounds <= r at that round's index.

Reads that arrive before the leader has committed an entry of its own term wait in
`waiting_for_commit` (the leader's commit index may lag the true one until then).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class ReadRequest:
    context: bytes
    frm: int
    """Node that asked (the leader itself, or a follower/learner that forwarded the read)."""


@dataclass(slots=True)
class ReadRound:
    number: int
    index: int
    requests: list[ReadRequest] = field(default_factory=list)


class ReadOnly:
    __slots__ = ("last_round", "rounds", "unsent", "waiting_for_commit")

    def __init__(self) -> None:
        self.waiting_for_commit: list[ReadRequest] = []
        self.unsent: list[ReadRequest] = []
        self.rounds: deque[ReadRound] = deque()
        self.last_round = 0

    def may_start(self, max_rounds: int) -> bool:
        """Whether unsent reads wait and fewer than `max_rounds` rounds are unconfirmed."""
        return bool(self.unsent) and len(self.rounds) < max_rounds

    def start_round(self, commit: int, max_rounds: int) -> ReadRound | None:
        """Turn all unsent reads into one round at `commit`, unless `max_rounds` rounds are
        unconfirmed already (then they wait for the next round, which starts once one is)."""
        if not self.may_start(max_rounds):
            return None
        self.last_round += 1
        r = ReadRound(self.last_round, commit, self.unsent)
        self.unsent = []
        self.rounds.append(r)
        return r

    def confirm(self, number: int) -> list[ReadRound]:
        """Leadership is confirmed as of round `number`: release it and all older rounds."""
        out: list[ReadRound] = []
        while self.rounds and self.rounds[0].number <= number:
            out.append(self.rounds.popleft())
        return out

    def pending(self) -> int:
        return len(self.waiting_for_commit) + len(self.unsent) + sum(len(r.requests) for r in self.rounds)

    def reset(self) -> None:
        """Drop every pending read (the node stopped being leader). Round numbers keep growing."""
        self.waiting_for_commit = []
        self.unsent = []
        self.rounds.clear()
