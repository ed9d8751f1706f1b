"""RaftNode: one member of one Raft group, as a pure deterministic state machine.

Inputs are method calls: `step(message)`, `tick()`, `propose(...)`, `propose_conf_change(...)`,
`read_index(ctx)`, `transfer_leader(id)`, `report_snapshot(...)`, `report_unreachable(...)`.
Output is a `Ready` batch from `ready()`, acknowledged by `advance(ready)`. The core never touches a
clock, a socket, a disk or global randomness: time is `tick()`, randomness comes from the
`random.Random` it is handed, and storage is read through the `LogStorage` it is handed.

Safety-relevant rules kept here:
- Votes (and the term) are durable before a vote response leaves: all non-leader messages are
  in `Ready.persisted_messages`. A leader's own log entries count toward commitment only after
  `advance()` reports them durable.
- An entry is committed only by counting replicas of an entry of the leader's current term
  (Raft §5.4.2); a new leader appends an empty entry to get there.
- A ReadIndex read is released only after the leader has committed an entry of its term and a
  majority has confirmed its leadership after the read arrived (or, in lease mode, while the
  leader's lease holds).

Commit propagation (a cost choice, not a safety rule). etcd-raft broadcasts an append whenever
the leader's commit index advances. Here, while entries are still in flight, the new commit index
rides on the next append carrying entries (under a steady stream of writes this halves the
messages and follower write transactions per write). Once the whole log is committed, so that no
append would come soon to carry it, `Config.announce_commit` sends each caught-up member that was
not yet told it one empty append carrying it (`_announce_commit`): followers and learners apply a
lone write within a round trip instead of at the next heartbeat (a watch or a replica read served
there waited up to a heartbeat for it). Such an append is marked `commit_only`, and a member that
accepts it does not answer: the answer would repeat the match the leader already holds, and on a
lone write it was two of the four messages the leader took in per write. Without it they learn from the next heartbeat
(`heartbeat_tick`). Either way, a follower or learner that asked for a read index is sent an
append with the commit index right after the answer. Which index is committed, and when, is
unchanged.

Membership changes are single-server changes (Ongaro's dissertation §4.1): each CONF_CHANGE entry
adds or removes one voter (or changes learners, which never count toward a quorum). A node uses
the latest configuration in its log, committed or not, and reverts it if that entry is
truncated. The majorities of two configurations that differ by one voter always intersect, so two
leaders cannot be elected in one term even while members disagree on the configuration. The leader
proposes a change only when (a) no earlier change is uncommitted, so at most two configurations
are in use at any time, and (b) it has committed an entry of its own term, which fixes the known
flaw of single-server changes across leader changes (Ongaro, raft-dev 2015): it ensures a change
appended by a previous leader that never committed cannot coexist with the new one. A leader that
removes itself keeps leading (without counting itself) until the change commits, then steps down.

Quiescence (`Config.quiesce_ticks` > 0; with 0 none of this happens). A node may host thousands of
groups, so idle ones stop ticking and heartbeating:
- A leader quiesces after `quiesce_ticks` consecutive ticks on which nothing was proposed, read or
  transferred, its commit index is its last index, and every member (voters and learners) is in
  REPLICATE state with match == last index and has reported (in a heartbeat response) a commit
  index == last index. It then sends every member one last heartbeat marked `quiesce`, carrying
  commit == last index and the term of that entry.
- A follower quiesces on such a heartbeat from its leader of its term if its log ends exactly there
  (same index and term) and it has received no newer heartbeat (heartbeat `index` grows with every
  heartbeat a leader sends in a term, also across its quiescence); it answers "quiesced too".
  Otherwise it answers with a wake request (HEARTBEAT_RESP with reject set) and stays awake.
- `tick()` on a quiesced node returns at once: no timers, no check-quorum, no messages.
- Waking: `wake()`, any local request (propose, read_index, propose_conf_change, transfer_leader,
  campaign), or a message. A quiesced leader wakes on every message of its term or newer except
  late acknowledgements of what it sent before quiescing (heartbeat responses without reject,
  append responses at or below match): they carry no news, and waking on them would keep a
  group with a round trip longer than a tick from ever staying quiescent. A quiesced follower
  wakes on every such message except heartbeats from its leader that are no newer than the one
  it quiesced on (duplicates, reordered ones), and quiesces again on a newer quiesce heartbeat.
  Messages of older terms never wake anyone; they are answered as usual. A woken leader
  heartbeats at once (waking its followers); a follower woken by anything but its leader's
  heartbeat sends its leader a wake request. A woken follower restarts its election timer with a
  fresh randomized timeout, so it waits a full timeout for its leader before campaigning. An
  awake voter that hears nothing from its leader for an election timeout campaigns as usual (its
  pre-vote wakes the leader); an awake learner, which cannot campaign, sends its leader (if it
  knows none, every voter) a wake request instead.
- Quiescence is only about cost and liveness: elections, commitment and ReadIndex rounds are
  untouched (a read round needs acknowledgements of a heartbeat sent after the read arrived, so
  quiescence cannot confirm it). The one rule it touches is the leader lease.

Why lease reads stay safe. Without quiescence, a leader's lease rests on a majority that
acknowledged a heartbeat sent at leader tick t: each of them ignores vote requests for an election
timeout after receiving it (the "in leader lease" rule), and the leader serves lease reads only
until t + election_tick - lease_drift_ticks by its own clock. A quiesced node has no clock, and a
quiesced follower woken by a (pre-)vote request must be free to vote at once: the leader may be
dead, and the follower has not heard from it for an unknown real time. Quiescence therefore ends
the lease, on both sides:
- the leader, when it quiesces, forgets every heartbeat acknowledgement (lease ticks cleared) and
  raises a floor so that only heartbeats sent after it quiesced (that is, after it woke: it sends
  none while quiesced) ever count again, however late an older acknowledgement arrives; answers
  to quiesce heartbeats and wake requests never count. A quiesced leader serves no read at all:
  a read wakes it first, and its lease then needs a majority acknowledging post-wake heartbeats.
- a follower that acknowledges a post-wake heartbeat received it while awake (a quiesced follower
  wakes on it, and a woken follower is bound by the lease rule again from the moment it hears
  from its leader); it quiesces again only on a quiesce heartbeat newer than every heartbeat it
  has received, i.e. only after the leader quiesced again and gave that lease up. So every
  acknowledgement that counts toward a lease comes from a follower that was awake, heard the
  leader after it woke, and keeps the ordinary lease promise until the leader quiesces again; a
  follower released from the promise by quiescence (`_lease_void`) is never part of a live lease.
  After a restart the boot rule still applies first: quiescence never shortens it.
"""

from __future__ import annotations

import logging
import random
import struct
from dataclasses import dataclass

from . import quorum
from .log import RaftLog
from .progress import Progress, ProgressState
from .readonly import ReadOnly, ReadRequest
from .storage import CompactedError, LogStorage, SnapshotTemporarilyUnavailable
from .types import (
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ProposalDropped,
    RaftError,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SoftState,
)

MT = MessageType
CAMPAIGN_TRANSFER = b"transfer"

# Messages a leader may send before its Ready is durable: they depend only on its term (already
# durable: it was persisted as candidate) and on entries it does not count until durable.
_LEADER_IMMEDIATE = frozenset({MT.APP, MT.HEARTBEAT, MT.SNAP, MT.TIMEOUT_NOW, MT.READ_INDEX_RESP})


@dataclass(slots=True)
class Config:
    id: int
    group: int = 0
    election_tick: int = 10
    """Ticks a follower waits without hearing from a leader before it campaigns (randomized
    in [election_tick, 2 * election_tick))."""
    heartbeat_tick: int = 1
    applied: int = 0
    """Index the application's state machine had applied when this node was (re)started."""
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    max_committed_size_per_ready: int | None = 8 << 20
    check_quorum: bool = True
    pre_vote: bool = True
    lease_read: bool = False
    """Serve ReadIndex from the leader lease instead of a heartbeat round. Relies on
    check_quorum and on clocks drifting less than `lease_drift_ticks` per election timeout."""
    lease_drift_ticks: int = 2
    max_read_rounds: int = 1
    """ReadIndex rounds a leader keeps unconfirmed at once. Reads that arrive while that many are
    out wait and leave together as the next round once one is confirmed (as etcd's server keeps one
    ReadIndex in flight): reads arriving one by one (unary calls) then share rounds as their rate
    grows instead of each costing a heartbeat to every follower. A round whose heartbeats were lost
    is confirmed by the next periodic heartbeat, which carries the latest round number."""
    announce_commit: bool = False
    """Tell caught-up members a new commit index at once when it covers the whole log (see
    "Commit propagation"); off: they learn it from the next append or heartbeat."""
    quiesce_ticks: int = 0
    """Quiescence (hibernation) of idle groups: a leader that has been idle for this many
    consecutive ticks, with every member caught up, quiesces and tells its followers to quiesce
    too; quiesced nodes stop ticking until `wake()`, a local request or a message wakes them.
    0 disables quiescence (see "Quiescence" in the module docstring)."""

    def validate(self) -> None:
        if self.id == NONE:
            raise RaftError("node id must be >= 1")
        if self.heartbeat_tick <= 0 or self.election_tick <= self.heartbeat_tick:
            raise RaftError("need 0 < heartbeat_tick < election_tick")
        if self.max_inflight_msgs <= 0:
            raise RaftError("max_inflight_msgs must be > 0")
        if self.lease_read and not self.check_quorum:
            raise RaftError("lease_read requires check_quorum")
        if self.lease_read and not 0 <= self.lease_drift_ticks < self.election_tick:
            raise RaftError("lease_drift_ticks must be in [0, election_tick)")
        if self.quiesce_ticks < 0:
            raise RaftError("quiesce_ticks must be >= 0 (0 disables quiescence)")
        if self.max_read_rounds < 1:
            raise RaftError("max_read_rounds must be >= 1")


class RaftNode:
    def __init__(
        self,
        config: Config,
        storage: LogStorage,
        rng: random.Random,
        logger: logging.Logger | None = None,
    ) -> None:
        config.validate()
        self.cfg = config
        self.id = config.id
        self.group = config.group
        self.rng = rng
        self.logger = logger
        self.log = RaftLog(storage, config.applied)
        hs, snap_conf = storage.initial_state()
        self.term = hs.term
        self.vote = hs.vote
        self.lead = NONE
        self.role = Role.FOLLOWER
        # Configuration history: (index of the CONF_CHANGE entry, configuration after it).
        self._conf_history: list[tuple[int, ConfState]] = [(self.log.first_index() - 1, snap_conf)]
        first, last = self.log.first_index(), self.log.last_index()
        if last >= first:
            self._scan_conf(storage.entries(first, last + 1))
        self.prs: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.msgs: list[Message] = []
        self.msgs_after_persist: list[Message] = []
        self.read_states: list[ReadState] = []
        self._commit_notify: set[int] = set()
        """Replicas just answered a read index: each gets an append with the commit index in
        the next Ready (one however many of its reads were answered)."""
        self.read_only = ReadOnly()
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.lead_transferee = NONE
        self.transfer_sent_this_term = False
        self.tick_count = 0
        self.boot_ticks = 0
        self._prev_hs = hs
        self._prev_ss = SoftState()
        self._ready_number = 0
        self._outstanding: Ready | None = None
        # Quiescence (all stay at their initial values while cfg.quiesce_ticks == 0).
        self._quiesced = False
        self._idle_ticks = 0
        """Leader: consecutive ticks on which the group was idle and fully caught up."""
        self._lease_floor = 0
        """Leader: only heartbeats sent at or after this tick count toward the lease."""
        self._quiesce_index = 0
        """Follower: index (leader tick) of the quiesce heartbeat it went to sleep on."""
        self._leader_hb = (0, -1)
        """Follower: (term, index) of the newest heartbeat received from a leader."""
        self._lease_void = False
        """Follower: woke from quiescence and has not heard from a leader since, so it is not
        bound by the leader-lease rule (the leader gave its lease up when it quiesced)."""
        self._reset(self.term)

    # --- configuration ----------------------------------------------------------------------
    @property
    def conf(self) -> ConfState:
        return self._conf_history[-1][1]

    def _scan_conf(self, ents: list[Entry]) -> bool:
        changed = False
        for e in ents:
            if e.type == EntryType.CONF_CHANGE:
                try:
                    new = self.conf.apply(ConfChange.decode(e.data))
                except ValueError as err:
                    self._warn("ignoring invalid conf change at %d: %s", e.index, err)
                    continue
                self._conf_history.append((e.index, new))
                changed = True
        return changed

    def _truncate_conf(self, from_index: int) -> bool:
        changed = False
        while len(self._conf_history) > 1 and self._conf_history[-1][0] >= from_index:
            self._conf_history.pop()
            changed = True
        return changed

    def _conf_changed(self) -> None:
        conf = self.conf
        members = set(conf.voters) | set(conf.learners)
        last = self.log.last_index()
        for nid in list(self.prs):
            if nid not in members:
                del self.prs[nid]
        for nid in sorted(members):
            pr = self.prs.get(nid)
            if pr is None:
                pr = self.prs[nid] = Progress(next=last + 1)
                pr.recent_active = True
            pr.is_learner = nid in conf.learners
        if self.lead_transferee != NONE and self.lead_transferee not in conf.voters:
            self.lead_transferee = NONE
        if self.role == Role.LEADER:
            self._maybe_commit()

    def conf_state_at(self, index: int) -> ConfState:
        """The configuration in force after the entry at `index` (for snapshots taken there)."""
        conf = self._conf_history[0][1]
        for i, c in self._conf_history:
            if i > index:
                break
            conf = c
        return conf

    def _pending_conf_change(self) -> bool:
        return len(self._conf_history) > 1 and self._conf_history[-1][0] > self.log.committed

    def promotable(self) -> bool:
        return self.id in self.conf.voters

    # --- helpers ----------------------------------------------------------------------------
    def _warn(self, msg: str, *args: object) -> None:
        if self.logger is not None:
            self.logger.warning("[g%d n%d t%d] " + msg, self.group, self.id, self.term, *args)

    def _debug(self, msg: str, *args: object) -> None:
        if self.logger is not None and self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("[g%d n%d t%d] " + msg, self.group, self.id, self.term, *args)

    def _send(self, m: Message) -> None:
        m.frm = self.id
        m.group = self.group
        if m.type not in (MT.VOTE, MT.VOTE_RESP, MT.PRE_VOTE, MT.PRE_VOTE_RESP):
            m.term = self.term
        if self.role == Role.LEADER and m.type in _LEADER_IMMEDIATE:
            self.msgs.append(m)
        else:
            self.msgs_after_persist.append(m)

    def _stable_last_index(self) -> int:
        log = self.log
        if log.unstable_snapshot is not None:
            return 0
        if log.unstable:
            return log.unstable_offset - 1
        return log.last_index()

    def _in_lease(self) -> bool:
        """This node has heard from a live leader within an election timeout.

        With lease reads, a node that has just (re)started also counts as in lease for its first
        election timeout: it may have acknowledged a leader's heartbeat just before crashing, and
        that leader's lease relies on it not voting for anyone else until the lease runs out.
        """
        if self.cfg.lease_read and self.boot_ticks < self.cfg.election_tick:
            return True
        if self._lease_void:
            return False
        return self.lead != NONE and self.election_elapsed < self.cfg.election_tick

    # --- role transitions -------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.rng.randrange(
            self.cfg.election_tick, 2 * self.cfg.election_tick
        )
        self.lead_transferee = NONE
        self.votes = {}
        self._quiesced = False
        self._idle_ticks = 0
        self._lease_void = False
        last = self.log.last_index()
        self.prs = {}
        for nid in self.conf.members():
            pr = Progress(next=last + 1, is_learner=nid in self.conf.learners)
            if nid == self.id:
                pr.match = self._stable_last_index()
                pr.next = max(pr.match + 1, last + 1)
            self.prs[nid] = pr
        self.read_only.reset()

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        self._debug("became follower, leader %d", lead)

    def _become_pre_candidate(self) -> None:
        if self.role == Role.LEADER:
            raise RaftError("leader cannot become pre-candidate")
        self.role = Role.PRE_CANDIDATE
        self.votes = {}
        self.lead = NONE

    def _become_candidate(self) -> None:
        if self.role == Role.LEADER:
            raise RaftError("leader cannot become candidate")
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self._debug("became candidate")

    def _become_leader(self) -> None:
        if self.role == Role.FOLLOWER:
            raise RaftError("follower cannot become leader")
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        self.transfer_sent_this_term = False
        for pr in self.prs.values():
            pr.recent_active = True
        self._debug("became leader")
        self._append_entries([Entry(self.term, 0)])

    def campaign(self) -> None:
        """Start an election now (with pre-vote if enabled), as if the election timer fired."""
        if self._quiesced:
            self._wake(notify=True)
        self._hup()

    def _hup(self, transfer: bool = False) -> None:
        if self.role == Role.LEADER or not self.promotable():
            return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_type, term = MT.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, term = MT.VOTE, self.term
        self.votes[self.id] = True
        if self._tally_votes():
            return
        last, lt = self.log.last_index(), self.log.last_term()
        ctx = CAMPAIGN_TRANSFER if transfer else b""
        for nid in self.conf.voters:
            if nid != self.id:
                self._send(Message(vote_type, nid, self.id, term=term, index=last, log_term=lt, context=ctx))

    def _tally_votes(self) -> bool:
        """Returns True if the campaign ended (won or lost)."""
        res = quorum.vote_result(self.conf.voters, self.votes)
        if res is True:
            if self.role == Role.PRE_CANDIDATE:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
                self._bcast_append()
            return True
        if res is False:
            self._become_follower(self.term, NONE)
            return True
        return False

    # --- ticks ------------------------------------------------------------------------------
    def tick(self) -> None:
        if self._quiesced:
            return
        self.tick_count += 1
        if self.boot_ticks < self.cfg.election_tick:
            self.boot_ticks += 1
        if self.role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self.election_elapsed += 1
            if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
                self.election_elapsed = 0
                self._hup()
            elif (
                self.cfg.quiesce_ticks
                and self.election_elapsed >= self.randomized_election_timeout
                and self.id in self.conf.learners
            ):
                # A learner cannot campaign: if it missed its leader's quiesce heartbeat (or
                # restarted while the group was quiescent) it would wait for a heartbeat forever.
                # Ask the leader (unknown: every voter) to wake; the group then quiesces again.
                self.election_elapsed = 0
                for nid in [self.lead] if self.lead != NONE else self.conf.voters:
                    self._send(Message(MT.HEARTBEAT_RESP, nid, self.id, reject=True))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                active = [
                    nid for nid in self.conf.voters if nid == self.id or self.prs[nid].recent_active
                ]
                if len(active) < quorum.majority(len(self.conf.voters)):
                    self._warn("stepping down: no quorum heard within an election timeout")
                    self._become_follower(self.term, NONE)
                    return
                for nid, pr in self.prs.items():
                    if nid != self.id:
                        pr.recent_active = False
            if self.lead_transferee != NONE:
                self._debug("leadership transfer to %d timed out", self.lead_transferee)
                self.lead_transferee = NONE
        if self.cfg.quiesce_ticks and self._tick_quiesce():
            return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    # --- quiescence -------------------------------------------------------------------------
    @property
    def quiesced(self) -> bool:
        """The node is quiescent: `tick()` does nothing until it is woken."""
        return self._quiesced

    def wake(self) -> None:
        """Leave quiescence (no-op if not quiesced). Always safe to call.

        The host calls it on every group whose leader's node it suspects dead; a woken follower
        waits a full randomized election timeout for its leader before it campaigns, and asks
        the leader to wake too. A woken leader resumes heartbeats (which wake its followers)."""
        if self._quiesced:
            self._wake(notify=True)

    def _tick_quiesce(self) -> bool:
        """Leader, once per tick with quiescence enabled: returns True if it just quiesced."""
        if not self._quiescable():
            self._idle_ticks = 0
            return False
        self._idle_ticks += 1
        if self._idle_ticks < self.cfg.quiesce_ticks:
            return False
        self._quiesce()
        return True

    def _quiescable(self) -> bool:
        """Nothing is in flight and every member (voters and learners) holds, and knows to be
        committed, the leader's whole log."""
        log = self.log
        last = log.last_index()
        ro = self.read_only
        if (
            log.committed != last
            or self.lead_transferee != NONE
            or not self.promotable()
            or ro.waiting_for_commit
            or ro.unsent
            or ro.rounds
        ):
            return False
        for nid, pr in self.prs.items():
            if pr.match != last:
                return False
            if nid != self.id and (pr.state != ProgressState.REPLICATE or pr.commit_known < last):
                return False
        return True

    def _quiesce(self) -> None:
        self._debug("quiescing after %d idle ticks", self._idle_ticks)
        self._quiesced = True
        self._idle_ticks = 0
        log = self.log
        last, last_term = log.last_index(), log.last_term()
        seq = self.read_only.last_round
        for nid in sorted(self.prs):
            if nid != self.id:
                self._send(
                    Message(
                        MT.HEARTBEAT, nid, self.id, commit=last, log_term=last_term, seq=seq,
                        index=self.tick_count, quiesce=True,
                    )
                )
        # Heartbeats sent after waking carry a larger index than the quiesce heartbeat, so a
        # follower can tell a late quiesce heartbeat from a fresh one.
        self.tick_count += 1
        self._forfeit_lease()

    def _forfeit_lease(self) -> None:
        """A quiescing leader gives its lease up: no acknowledgement of a heartbeat sent before
        now will ever count toward a lease again (see the module docstring)."""
        for pr in self.prs.values():
            pr.lease_tick = -1
        self._lease_floor = self.tick_count

    def _wake(self, notify: bool) -> None:
        self._quiesced = False
        self._idle_ticks = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        if self.role == Role.LEADER:
            self._debug("waking up")
            # Check-quorum starts a fresh round: followers must answer after the wake-up.
            for nid, pr in self.prs.items():
                if nid != self.id:
                    pr.recent_active = False
            self._bcast_heartbeat()  # wakes the followers
            return
        self.randomized_election_timeout = self.rng.randrange(
            self.cfg.election_tick, 2 * self.cfg.election_tick
        )
        self._lease_void = True
        if notify and self.lead not in (NONE, self.id):
            self._debug("waking up; asking leader %d to wake", self.lead)
            self._send(Message(MT.HEARTBEAT_RESP, self.lead, self.id, reject=True))

    def _step_quiesced(self, m: Message) -> bool:
        """A message (of this node's term or newer) reaches a quiesced node: wake it unless the
        message carries no news. Returns True if the message is fully handled (dropped)."""
        if self.role == Role.LEADER:
            if m.term == self.term:
                # Late acknowledgements of traffic sent before quiescing carry no news: the
                # leader quiesced only after every member had acknowledged everything.
                if m.type == MT.HEARTBEAT_RESP and not m.reject:
                    return True
                if m.type == MT.APP_RESP:
                    pr = self.prs.get(m.frm)
                    if pr is not None and m.index <= pr.match:
                        return True
            self._wake(notify=False)
            return False
        if m.type == MT.HEARTBEAT and m.term == self.term and m.frm == self.lead:
            if m.index <= self._quiesce_index:
                return True  # a duplicate or a late heartbeat from before this node quiesced
            if m.quiesce:
                self._quiesced = False  # a newer quiesce round: handled normally (sleeps again)
            else:
                self._wake(notify=False)  # the leader is awake and heartbeating again
            return False
        self._wake(notify=True)
        return False

    # --- leader: replication ----------------------------------------------------------------
    def _append_entries(self, ents: list[Entry]) -> None:
        self._idle_ticks = 0
        idx = self.log.last_index()
        for e in ents:
            idx += 1
            e.term = self.term
            e.index = idx
            e.group = self.group
        self.log.append(ents)
        if self._scan_conf(ents):
            self._conf_changed()

    def _send_append(self, to: int, send_if_empty: bool = True, commit_only: bool = False) -> bool:
        """Send `to` the entries from its `next` (an empty append if none and `send_if_empty`);
        `commit_only`: mark an empty one as a commit announcement (`_announce_commit`)."""
        pr = self.prs[to]
        if pr.is_paused(self.cfg.max_inflight_msgs):
            return False
        try:
            prev_term = self.log.term(pr.next - 1)
            ents = self.log.entries_from(pr.next, self.cfg.max_size_per_msg)
        except CompactedError:
            return self._send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        commit = self.log.committed
        self._send(
            Message(
                MT.APP, to, self.id, index=pr.next - 1, log_term=prev_term, entries=ents,
                commit=commit, commit_only=commit_only and not ents,
            )
        )
        pr.commit_sent = commit
        pr.sent_entries(ents[-1].index if ents else pr.next - 1)
        return True

    def _announce_commit(self, only: int = NONE) -> None:
        """See "Commit propagation": once the whole log is committed, send every caught-up member
        in REPLICATE state (`only`: just that one) that no append told the commit index yet an
        empty append carrying it. Called where the commit index advances or a member catches up."""
        log = self.log
        commit = log.committed
        if log.last_index() != commit:
            return  # entries in flight: the next append carries it
        for nid in [only] if only != NONE else sorted(self.prs):
            pr = self.prs.get(nid)
            if nid != self.id and pr is not None and pr.state == ProgressState.REPLICATE \
                    and pr.match == commit and pr.commit_sent < commit:
                self._send_append(nid, commit_only=True)

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        try:
            snap = self.log.storage.snapshot()
        except SnapshotTemporarilyUnavailable:
            self._debug("snapshot for %d temporarily unavailable", to)
            return False
        if snap.is_empty():
            raise RaftError("need a snapshot but storage has none")
        pr.become_snapshot(snap.meta.index)
        self._debug("sending snapshot %d to %d", snap.meta.index, to)
        self._send(Message(MT.SNAP, to, self.id, snapshot=snap))
        return True

    def _bcast_append(self) -> None:
        for nid in sorted(self.prs):
            if nid != self.id:
                self._send_append(nid)

    def _bcast_heartbeat(self) -> None:
        seq = self.read_only.last_round
        for nid in sorted(self.prs):
            if nid != self.id:
                pr = self.prs[nid]
                self._send(
                    Message(
                        MT.HEARTBEAT, nid, self.id, commit=min(pr.match, self.log.committed), seq=seq,
                        index=self.tick_count,
                    )
                )

    def _maybe_commit(self) -> bool:
        prs = self.prs
        voters = self.conf.voters
        mci = quorum.committed_index(voters, lambda v: prs[v].match if v in prs else 0)
        if not self.log.maybe_commit(mci, self.term):
            return False
        self._on_leader_commit()
        return True

    def _on_leader_commit(self) -> None:
        # Reads that waited for the first commit of this term can now proceed.
        if self.read_only.waiting_for_commit and self._committed_in_term():
            waiting = self.read_only.waiting_for_commit
            self.read_only.waiting_for_commit = []
            for req in waiting:
                self._leader_read(req)
        # A leader removed from the configuration steps down once the removal is committed.
        if not self.promotable() and not self._pending_conf_change():
            self._debug("removed from the configuration; stepping down")
            self._bcast_append()
            self._become_follower(self.term, NONE)

    def _committed_in_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    # --- proposals --------------------------------------------------------------------------
    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise ProposalDropped(f"not leader (leader is {self.lead})")
        if self.lead_transferee != NONE:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        if not self.promotable():
            raise ProposalDropped("leader is being removed from the configuration")

    def propose(self, data: bytes | list[bytes]) -> int:
        """Append normal entries; returns the index of the last one. Raises ProposalDropped."""
        if self._quiesced:
            self._wake(notify=True)
        self._check_can_propose()
        items = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        if not items:
            return self.log.last_index()
        self._append_entries([Entry(0, 0, EntryType.NORMAL, bytes(d)) for d in items])
        self._bcast_append()
        return self.log.last_index()

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Append a single-server membership change; returns its index. Raises ProposalDropped."""
        if self._quiesced:
            self._wake(notify=True)
        self._check_can_propose()
        if self._pending_conf_change():
            raise ProposalDropped("a membership change is already in progress")
        if not self._committed_in_term():
            raise ProposalDropped("leader has not yet committed an entry of its term")
        try:
            # Only a change every replica can decode goes into the log (followers refuse appends
            # carrying one they cannot: it would stop replication of the group for good).
            data = cc.encode()
            ConfChange.decode(data)
            new = self.conf.apply(cc)
        except (ValueError, OverflowError, struct.error) as err:
            raise ProposalDropped(f"invalid membership change: {err}") from err
        if new == self.conf:
            raise ProposalDropped("membership change is a no-op")
        self._append_entries([Entry(0, 0, EntryType.CONF_CHANGE, data)])
        self._bcast_append()
        return self.log.last_index()

    # --- reads ------------------------------------------------------------------------------
    def read_index(self, context: bytes) -> None:
        """Request a linearizable read. The answer is a ReadState in a later Ready, carrying the
        same context; the application serves it once it has applied through ReadState.index.
        Raises ProposalDropped if no leader is known."""
        if self._quiesced:
            self._wake(notify=True)
        if self.role == Role.LEADER:
            self._leader_read(ReadRequest(context, self.id))
        elif self.lead != NONE:
            self._send(Message(MT.READ_INDEX, self.lead, self.id, context=context))
        else:
            raise ProposalDropped("no leader known")

    def _leader_read(self, req: ReadRequest) -> None:
        self._idle_ticks = 0
        if not self._committed_in_term():
            self.read_only.waiting_for_commit.append(req)
            return
        if self.conf.voters == (self.id,):
            self._release_read(self.log.committed, req)
            return
        if self.cfg.lease_read and self._lease_valid():
            self._release_read(self.log.committed, req)
            return
        self.read_only.unsent.append(req)

    def _lease_valid(self) -> bool:
        if self.transfer_sent_this_term or not self.promotable():
            return False
        prs = self.prs
        tc = self.tick_count
        start = quorum.committed_index(
            self.conf.voters, lambda v: tc if v == self.id else (prs[v].lease_tick if v in prs else -1)
        )
        return start >= self._lease_floor and tc < start + self.cfg.election_tick - self.cfg.lease_drift_ticks

    def _release_read(self, index: int, req: ReadRequest) -> None:
        if req.frm == self.id:
            self.read_states.append(ReadState(index, req.context))
        else:
            self._send(Message(MT.READ_INDEX_RESP, req.frm, self.id, index=index, context=req.context))
            # The replica serves the read once it has applied through `index`: tell it the
            # commit index now rather than at the next heartbeat (see "Commit propagation").
            self._commit_notify.add(req.frm)

    def _flush_reads(self) -> None:
        if self.role != Role.LEADER:
            return
        rnd = self.read_only.start_round(self.log.committed, self.cfg.max_read_rounds)
        if rnd is not None:
            self._bcast_heartbeat()
            self._check_read_rounds()

    def _check_read_rounds(self) -> None:
        prs = self.prs
        last = self.read_only.last_round
        confirmed = quorum.committed_index(
            self.conf.voters, lambda v: last if v == self.id else (prs[v].read_round if v in prs else 0)
        )
        if not self.promotable():
            confirmed = 0
        for rnd in self.read_only.confirm(confirmed):
            for req in rnd.requests:
                self._release_read(rnd.index, req)

    # --- leadership transfer ----------------------------------------------------------------
    def transfer_leader(self, target: int) -> None:
        if self._quiesced:
            self._wake(notify=True)
        if self.role != Role.LEADER:
            if self.lead != NONE:
                self._send(Message(MT.TRANSFER_LEADER, self.lead, self.id, index=target))
            return
        self._handle_transfer(target)

    def _handle_transfer(self, target: int) -> None:
        if target not in self.conf.voters or target == self.id:
            return
        if self.lead_transferee == target:
            return
        self._idle_ticks = 0
        self.lead_transferee = target
        self.election_elapsed = 0
        if self.prs[target].match == self.log.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target)

    def _send_timeout_now(self, target: int) -> None:
        self.transfer_sent_this_term = True
        self._send(Message(MT.TIMEOUT_NOW, target, self.id))

    # --- status reports from the transport -------------------------------------------------
    def report_snapshot(self, to: int, failed: bool) -> None:
        pr = self.prs.get(to)
        if self.role != Role.LEADER or pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        if failed:
            pr.pending_snapshot = 0
        pr.become_probe()
        pr.paused = True  # wait for a heartbeat response before probing again

    def report_unreachable(self, to: int) -> None:
        pr = self.prs.get(to)
        if self.role == Role.LEADER and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    # --- messages ---------------------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.group != self.group:
            raise RaftError(f"message for group {m.group} stepped into group {self.group}")
        if m.frm == self.id or m.to != self.id:
            return
        if self._quiesced and m.term >= self.term and self._step_quiesced(m):
            return
        if m.term > self.term:
            if m.type in (MT.VOTE, MT.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                if self.cfg.check_quorum and not force and self._in_lease():
                    self._debug("ignoring %s from %d: in leader lease", m.type.name, m.frm)
                    return
            if m.type == MT.PRE_VOTE or (m.type == MT.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change the term
            elif m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (MT.HEARTBEAT, MT.APP):
                # Tell a stale leader about the newer term so it steps down.
                self._send(Message(MT.APP_RESP, m.frm, self.id))
            elif m.type == MT.PRE_VOTE:
                self._send(Message(MT.PRE_VOTE_RESP, m.frm, self.id, term=self.term, reject=True))
            return

        if m.type in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(m)
            return
        if self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == MT.PRE_VOTE and m.term > self.term)
        )
        resp = MT.VOTE_RESP if m.type == MT.VOTE else MT.PRE_VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(Message(resp, m.frm, self.id, term=m.term))
            if m.type == MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, m.frm, self.id, term=self.term, reject=True))

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MT.APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._lease_void = False
            self._handle_append(m)
        elif t == MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._lease_void = False
            self._handle_heartbeat(m)
        elif t == MT.SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._lease_void = False
            self._handle_snapshot(m)
        elif t == MT.TIMEOUT_NOW:
            if self.promotable():
                self._debug("received TimeoutNow from %d; campaigning", m.frm)
                self._hup(transfer=True)
        elif t == MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))
        elif t == MT.TRANSFER_LEADER and self.lead != NONE:
            self._send(Message(MT.TRANSFER_LEADER, self.lead, self.id, index=m.index))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MT.APP, MT.HEARTBEAT, MT.SNAP):
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif (t == MT.PRE_VOTE_RESP and self.role == Role.PRE_CANDIDATE) or (
            t == MT.VOTE_RESP and self.role == Role.CANDIDATE
        ):
            self.votes.setdefault(m.frm, not m.reject)
            self._tally_votes()

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MT.READ_INDEX:
            if m.frm in self.prs:
                self._leader_read(ReadRequest(m.context, m.frm))
            return
        if t == MT.TRANSFER_LEADER:
            self._handle_transfer(m.index)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if t == MT.APP_RESP:
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif t == MT.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.paused = False
            if m.commit > pr.commit_known:
                pr.commit_known = m.commit
            if not (m.reject or m.quiesce):
                # (Answers to quiesce heartbeats and wake requests never confirm leadership.)
                if m.seq > pr.read_round:
                    pr.read_round = m.seq
                if m.index > pr.lease_tick:
                    pr.lease_tick = m.index
            if pr.state == ProgressState.REPLICATE and len(pr.inflight) >= self.cfg.max_inflight_msgs:
                # The window is full and the follower is alive: an append was probably lost.
                # Free one slot so the next append (which will be rejected if there is a gap)
                # gets the pipeline moving again.
                pr.inflight.popleft()
            if pr.match < self.log.last_index() or (
                self.cfg.quiesce_ticks and pr.state == ProgressState.PROBE
            ):
                # (With quiescence, also probe a caught-up follower stuck in PROBE, e.g. after
                # report_unreachable, so that it returns to REPLICATE and the group can quiesce.)
                self._send_append(m.frm)
            if self.read_only.rounds and not pr.is_learner:
                self._check_read_rounds()

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint, _ = self.log.find_conflict_by_term(hint, m.log_term)
            if pr.maybe_decr_to(m.index, hint):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        if pr.maybe_update(m.index):
            if pr.state == ProgressState.PROBE:
                pr.become_replicate()
            elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                pr.become_probe()
                pr.become_replicate()
            advanced = self._maybe_commit()
            if advanced and self.role != Role.LEADER:
                return
            while self._send_append(m.frm, send_if_empty=False):
                pass
            if self.cfg.announce_commit:
                self._announce_commit(NONE if advanced else m.frm)
            if m.frm == self.lead_transferee and pr.match == self.log.last_index():
                self._send_timeout_now(m.frm)
        elif self.cfg.quiesce_ticks and pr.state == ProgressState.PROBE and m.index == pr.match:
            pr.become_replicate()  # a caught-up follower answered a probe (as etcd does)

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            self._send(Message(MT.APP_RESP, m.frm, self.id, index=log.committed))
            return
        if log.match_term(m.index, m.log_term):
            ents = m.entries
            last_new = m.index + len(ents)
            ci = log.find_conflict(ents)
            if ci:
                if ci <= log.committed:
                    raise RaftError(f"entry {ci} conflicts with committed entry {log.committed}")
                new = ents[ci - ents[0].index :]
                changed = self._truncate_conf(ci)
                log.append(new)
                changed = self._scan_conf(new) or changed
                if changed:
                    self._conf_changed()
            log.commit_to(min(m.commit, last_new))
            if not (m.commit_only and not ents):
                # (A commit announcement's answer would only repeat the match the leader knows.)
                self._send(Message(MT.APP_RESP, m.frm, self.id, index=last_new))
            return
        hint = min(m.index, log.last_index())
        hint, hint_term = log.find_conflict_by_term(hint, m.log_term)
        self._send(
            Message(
                MT.APP_RESP, m.frm, self.id, index=m.index, reject=True, reject_hint=hint, log_term=hint_term
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(m.commit)
        resp = Message(MT.HEARTBEAT_RESP, m.frm, self.id, seq=m.seq, index=m.index)
        hb_term, hb_index = self._leader_hb
        fresh = hb_term != m.term or m.index >= hb_index
        if fresh:
            self._leader_hb = (m.term, m.index)
        if self.cfg.quiesce_ticks:
            log = self.log
            resp.commit = log.committed
            # A quiesce heartbeat older than a heartbeat already received is stale: the leader
            # has woken since, and may count on this follower's lease promise again.
            if m.quiesce and fresh:
                if log.last_index() == m.commit and log.last_term() == m.log_term:
                    self._quiesced = True
                    self._quiesce_index = m.index
                    resp.quiesce = True
                    self._debug("quiesced with leader %d at index %d", m.frm, m.commit)
                else:
                    resp.reject = True  # not caught up: keep the leader awake
        self._send(resp)

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is None:
            return
        if self._restore(snap):
            self._send(Message(MT.APP_RESP, m.frm, self.id, index=self.log.last_index()))
        else:
            self._send(Message(MT.APP_RESP, m.frm, self.id, index=self.log.committed))

    def _restore(self, snap: Snapshot) -> bool:
        meta = snap.meta
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # We already have the snapshot's last entry: just fast-forward the commit index.
            self.log.commit_to(meta.index)
            return False
        self._debug("restoring snapshot at %d", meta.index)
        self.log.restore(snap)
        self._conf_history = [(meta.index, meta.conf_state)]
        self._conf_changed()
        return True

    # --- Ready / advance --------------------------------------------------------------------
    def _soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        log = self.log
        return bool(
            self.msgs
            or self.msgs_after_persist
            or self.read_states
            or log.unstable
            or log.unstable_snapshot is not None
            or log.committed > log.applied
            or self._hard_state() != self._prev_hs
            or self._soft_state() != self._prev_ss
            or (self.role == Role.LEADER and self.read_only.may_start(self.cfg.max_read_rounds))
        )

    def ready(self) -> Ready:
        """Collect everything the application must do. Only one Ready may be outstanding."""
        if self._outstanding is not None:
            raise RaftError("ready() called again before advance()")
        self._flush_reads()
        if self._commit_notify:
            if self.role == Role.LEADER:
                for nid in sorted(self._commit_notify):
                    if nid in self.prs:
                        self._send_append(nid)
            self._commit_notify.clear()
        self._ready_number += 1
        rd = Ready(self._ready_number)
        ss = self._soft_state()
        if ss != self._prev_ss:
            rd.soft_state = ss
            self._prev_ss = ss
        hs = self._hard_state()
        if hs != self._prev_hs:
            rd.hard_state = hs
        log = self.log
        rd.entries = list(log.unstable)
        rd.snapshot = log.unstable_snapshot
        if log.committed > log.applied:
            rd.committed_entries = log.next_committed_entries(self.cfg.max_committed_size_per_ready)
        rd.messages = self.msgs
        rd.persisted_messages = self.msgs_after_persist
        rd.read_states = self.read_states
        self.msgs = []
        self.msgs_after_persist = []
        self.read_states = []
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The application has persisted `rd`, sent its messages and applied its committed entries."""
        if rd is not self._outstanding:
            raise RaftError("advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        log = self.log
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.meta.index)
            if rd.snapshot.meta.index > log.applied:
                log.applied = rd.snapshot.meta.index
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
        if self.role == Role.LEADER:
            pr = self.prs.get(self.id)
            stable = self._stable_last_index()
            if pr is not None and pr.maybe_update(stable) and self._maybe_commit() \
                    and self.cfg.announce_commit and self.role == Role.LEADER:
                self._announce_commit()

    # --- introspection ----------------------------------------------------------------------
    @property
    def committed(self) -> int:
        return self.log.committed

    @property
    def applied(self) -> int:
        return self.log.applied

    @property
    def leader_contact_ticks(self) -> int | None:
        """Ticks since this node last heard from its leader (an append, heartbeat or snapshot):
        0 on the leader itself, None while no leader is known. Read-only; the host uses it to
        refuse reads on a replica that is cut off from the leader."""
        if self.role == Role.LEADER:
            return 0
        if self.lead == NONE:
            return None
        return self.election_elapsed

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "group": self.group,
            "term": self.term,
            "vote": self.vote,
            "leader": self.lead,
            "role": self.role.name.lower(),
            "commit": self.log.committed,
            "applied": self.log.applied,
            "last_index": self.log.last_index(),
            "voters": list(self.conf.voters),
            "learners": list(self.conf.learners),
            "quiesced": self._quiesced,
            "progress": {
                nid: {"match": pr.match, "next": pr.next, "state": pr.state.name.lower()}
                for nid, pr in sorted(self.prs.items())
            }
            if self.role == Role.LEADER
            else {},
        }
