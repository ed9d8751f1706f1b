"""Transcript (datadriven) tests of the pure Raft core, in the style of etcd-io/raft's
`testdata/*.txt` and `rafttest.InteractionEnv`.

A transcript file is a sequence of directives in the cockroachdb/datadriven format:

    # comments and blank lines are kept as they are
    command arg key=value key=(1,2,3)
    ----
    expected output (never blank lines; "ok" when a command prints nothing)

Each directive runs against one `InteractionEnv` (N `RaftNode`s on `MemoryStorage`, seeded
randomness, one in-order message queue), and its output is compared with the expected text.
Running with `KVSTORE_REWRITE_TRANSCRIPTS=1` (or `pytest --rewrite`, or
`python tests/rafttranscript.py --rewrite [FILE...]`) rewrites the expected outputs instead.

Commands (IDs are node ids; `[...]` optional):

- `add-nodes N [voters=(1,2,3)] [learners=(4)] [index=I] [prevote=B] [checkquorum=B]
  [election=E] [heartbeat=H] [quiesce=Q] [lease=B] [max-msg-size=BYTES] [seed=S]`: add N nodes with the next free
  ids. With voters, each starts as a bootstrapped member (log = one conf-change entry per member
  at term 1, already applied) or, with index=I, from a snapshot at I/1 of that configuration.
  Without voters, a node starts empty (a joiner that learns the group by replication).
  Defaults are the core's `Config` defaults.
- `campaign ID`, `wake ID`, `propose ID DATA...`, `propose-conf-change ID v4|l4|r3`,
  `read-index ID CTX`, `transfer-leadership from=ID to=ID`, `report-unreachable ID to=ID`.
- `tick ID... [n=K]`, `tick-heartbeat ID`, `tick-election ID` (ticks until the node's
  randomized election timer, or as leader its check-quorum timer, fires; prints how many ticks).
- `process-ready ID...`, `deliver-msgs ID... [from=ID] [type=MsgX]`,
  `begin-ready ID` / `end-ready ID` (a cycle split in two, as a host's is while its batch is
  being made durable: take, print, send and stage the Ready; then, after whatever commands come
  in between, send what waited, apply and advance),
  `deliver-msgs drop=(IDs) [from=ID] [type=MsgX]`, `stabilize [ID...] [log-level=none]`.
- `isolate ID`, `cut A B`, `heal`, `crash ID`, `restart ID`, `compact ID INDEX`.
- `status ID`, `raft-state`, `raft-log ID`, `log-level debug|none`.

Every Ready is printed in full: soft state (when it changed), hard state (when it changed),
entries to persist, snapshot, committed entries, messages (sent at once), messages after
persistence, read states. The core's own log lines (debug and warning) are printed where they
happen.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import random
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RaftError,
    RaftNode,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    readyloop,
)

MT = MessageType
TRANSCRIPT_DIR = Path(__file__).parent / "raft_transcripts"
REWRITE_ENV = "KVSTORE_REWRITE_TRANSCRIPTS"

_MSG_NAMES: dict[MessageType, str] = {
    MT.APP: "MsgApp",
    MT.APP_RESP: "MsgAppResp",
    MT.VOTE: "MsgVote",
    MT.VOTE_RESP: "MsgVoteResp",
    MT.PRE_VOTE: "MsgPreVote",
    MT.PRE_VOTE_RESP: "MsgPreVoteResp",
    MT.HEARTBEAT: "MsgHeartbeat",
    MT.HEARTBEAT_RESP: "MsgHeartbeatResp",
    MT.SNAP: "MsgSnap",
    MT.TIMEOUT_NOW: "MsgTimeoutNow",
    MT.READ_INDEX: "MsgReadIndex",
    MT.READ_INDEX_RESP: "MsgReadIndexResp",
    MT.TRANSFER_LEADER: "MsgTransferLeader",
}
_MSG_TYPES = {v: k for k, v in _MSG_NAMES.items()}


class TranscriptError(Exception):
    """A malformed directive (bad command or arguments): printed as `error: ...`."""


# --- formatting -------------------------------------------------------------------------------
def fmt_data(data: bytes) -> str:
    return '"' + data.decode("ascii", "backslashreplace") + '"'


def fmt_ids(ids: tuple[int, ...] | list[int]) -> str:
    return "(" + ",".join(str(i) for i in ids) + ")"


def fmt_conf(cs: ConfState) -> str:
    return f"Voters:{fmt_ids(cs.voters)} Learners:{fmt_ids(cs.learners)}"


def fmt_conf_change(cc: ConfChange) -> str:
    prefix = {ConfChangeType.ADD_VOTER: "v", ConfChangeType.ADD_LEARNER: "l", ConfChangeType.REMOVE_NODE: "r"}
    out = f"{prefix[cc.type]}{cc.node_id}"
    if cc.context:
        out += f" Context:{fmt_data(cc.context)}"
    return out


def fmt_entry(e: Entry) -> str:
    if e.type == EntryType.CONF_CHANGE:
        try:
            body = fmt_conf_change(ConfChange.decode(e.data))
        except ValueError as err:
            body = f"<invalid: {err}>"
        return f"{e.term}/{e.index} EntryConfChange {body}"
    return f"{e.term}/{e.index} EntryNormal {fmt_data(e.data)}"


def fmt_snapshot(s: Snapshot) -> str:
    return f"Index:{s.meta.index} Term:{s.meta.term} {fmt_conf(s.meta.conf_state)} Data:{fmt_data(s.data)}"


def fmt_hard_state(hs: HardState) -> str:
    return f"HardState Term:{hs.term} Vote:{hs.vote} Commit:{hs.commit}"


def fmt_message(m: Message) -> str:
    """One line per message, e.g. `1->2 MsgApp Term:2 Log:1/3 Commit:3 Entries:[2/4 EntryNormal ""]`.

    Fields the type does not normally use are printed too (as Name:value) when they are set, so
    no difference between two messages can hide in the output."""
    t = m.type
    parts = [f"{m.frm}->{m.to}", _MSG_NAMES[t], f"Term:{m.term}"]
    used = {"type", "to", "frm", "term", "group"}
    if t in (MT.APP, MT.VOTE, MT.PRE_VOTE):
        parts.append(f"Log:{m.log_term}/{m.index}")
        used |= {"log_term", "index"}
    if t == MT.APP:
        parts.append(f"Commit:{m.commit}")
        used |= {"commit", "entries"}
        if m.entries:
            parts.append("Entries:[" + ", ".join(fmt_entry(e) for e in m.entries) + "]")
    elif t == MT.APP_RESP:
        parts.append(f"Index:{m.index}")
        used |= {"index", "reject", "reject_hint", "log_term"}
        if m.reject:
            parts.append(f"Rejected (Hint:{m.log_term}/{m.reject_hint})")
    elif t in (MT.VOTE_RESP, MT.PRE_VOTE_RESP):
        used.add("reject")
        if m.reject:
            parts.append("Rejected")
    elif t == MT.HEARTBEAT:
        parts += [f"Commit:{m.commit}", f"Seq:{m.seq}", f"Tick:{m.index}"]
        used |= {"commit", "seq", "index", "quiesce"}
        if m.quiesce:
            parts.append(f"Quiesce LastTerm:{m.log_term}")
            used.add("log_term")
    elif t == MT.HEARTBEAT_RESP:
        parts += [f"Seq:{m.seq}", f"Tick:{m.index}"]
        used |= {"seq", "index", "quiesce", "reject"}
        if m.commit:
            parts.append(f"Commit:{m.commit}")
            used.add("commit")
        if m.quiesce:
            parts.append("Quiesced")
        if m.reject:
            parts.append("Wake")
    elif t == MT.SNAP:
        used.add("snapshot")
        if m.snapshot is not None:
            parts.append("Snapshot[" + fmt_snapshot(m.snapshot) + "]")
    elif t in (MT.READ_INDEX, MT.READ_INDEX_RESP):
        if t == MT.READ_INDEX_RESP:
            parts.append(f"Index:{m.index}")
            used.add("index")
    elif t == MT.TRANSFER_LEADER:
        parts.append(f"Target:{m.index}")
        used.add("index")
    if m.context:
        parts.append(f"Context:{fmt_data(m.context)}")
    used.add("context")
    defaults = Message(t, 0, 0)
    for f in dataclasses.fields(Message):
        if f.name not in used and getattr(m, f.name) != getattr(defaults, f.name):
            parts.append(f"{f.name}:{getattr(m, f.name)!r}")
    return " ".join(parts)


def fmt_role(role: Role) -> str:
    return {
        Role.FOLLOWER: "StateFollower",
        Role.PRE_CANDIDATE: "StatePreCandidate",
        Role.CANDIDATE: "StateCandidate",
        Role.LEADER: "StateLeader",
    }[role]


# --- directives -------------------------------------------------------------------------------
@dataclass
class Directive:
    """One `command args / ---- / output` block, with the comment and blank lines before it."""

    prelude: list[str]
    line: int
    command: str
    expected: str


@dataclass
class TranscriptFile:
    directives: list[Directive]
    trailer: list[str]


def parse_transcript(text: str) -> TranscriptFile:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    directives: list[Directive] = []
    prelude: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not ln.strip() or ln.lstrip().startswith("#"):
            prelude.append(ln)
            i += 1
            continue
        start = i + 1
        cmd = ln
        i += 1
        if i >= len(lines) or lines[i] != "----":
            raise ValueError(f"line {start}: expected '----' after {cmd!r}")
        i += 1
        out: list[str] = []
        while i < len(lines) and lines[i] != "":
            out.append(lines[i])
            i += 1
        directives.append(Directive(prelude, start, cmd, "\n".join(out)))
        prelude = []
        i += 1  # the blank line that ends the output (written back by render_transcript)
    return TranscriptFile(directives, prelude)


def render_transcript(tf: TranscriptFile, outputs: list[str]) -> str:
    out: list[str] = []
    for d, o in zip(tf.directives, outputs, strict=True):
        out += d.prelude
        out += [d.command, "----", o, ""]
    out += tf.trailer
    # Exactly one blank line after the last output, none piling up at the end.
    while len(out) > 1 and out[-1] == "" and out[-2] == "":
        out.pop()
    return "\n".join(out) + ("\n" if out and out[-1] != "" else "")


_TOKEN = re.compile(r"\S+=\([^)]*\)|\S+")


@dataclass
class Args:
    """A command's arguments: positional tokens and key=value pairs (values may be `(a,b,c)`)."""

    positional: list[str]
    kv: dict[str, str]
    _used: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, tokens: list[str]) -> Args:
        pos: list[str] = []
        kv: dict[str, str] = {}
        for tok in tokens:
            if "=" in tok:
                k, v = tok.split("=", 1)
                kv[k] = v
            else:
                pos.append(tok)
        return cls(pos, kv)

    def get(self, key: str) -> str | None:
        self._used.add(key)
        return self.kv.get(key)

    def num(self, key: str, default: int) -> int:
        v = self.get(key)
        if v is None:
            return default
        try:
            return int(v)
        except ValueError:
            raise TranscriptError(f"{key}={v}: not an integer") from None

    def flag(self, key: str, default: bool) -> bool:
        v = self.get(key)
        if v is None:
            return default
        if v not in ("true", "false"):
            raise TranscriptError(f"{key}={v}: expected true or false")
        return v == "true"

    def ids(self, key: str) -> list[int] | None:
        v = self.get(key)
        if v is None:
            return None
        body = v[1:-1] if v.startswith("(") and v.endswith(")") else v
        try:
            return [int(x) for x in body.split(",") if x.strip()]
        except ValueError:
            raise TranscriptError(f"{key}={v}: expected (id,id,...)") from None

    def pos_ids(self) -> list[int]:
        try:
            return [int(x) for x in self.positional]
        except ValueError:
            raise TranscriptError(f"expected node ids, got {' '.join(self.positional)}") from None

    def check_unused(self) -> None:
        extra = sorted(set(self.kv) - self._used)
        if extra:
            raise TranscriptError(f"unknown argument(s): {', '.join(extra)}")


# --- the environment --------------------------------------------------------------------------
def _nothing() -> None:
    """The persist step: staging already made the Ready durable."""


def _apply(n: EnvNode, rd: Ready) -> None:
    if rd.committed_entries:
        n.applied = rd.committed_entries[-1].index


@dataclass
class EnvNode:
    """One member: its core, its durable storage, and what the application applied."""

    id: int
    cfg: dict[str, int | bool]
    seed: int
    storage: MemoryStorage
    node: RaftNode
    applied: int
    down: bool = False
    restarts: int = 0


class _OutputHandler(logging.Handler):
    def __init__(self, env: InteractionEnv) -> None:
        super().__init__(logging.DEBUG)
        self.env = env

    def emit(self, record: logging.LogRecord) -> None:
        self.env.out(f"{record.levelname} {record.getMessage()}")


class InteractionEnv:
    """N Raft cores wired by an in-order, in-memory message queue, driven by directives."""

    def __init__(self) -> None:
        self.nodes: dict[int, EnvNode] = {}
        self.queue: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self._lines: list[str] = []
        self._indent = 0
        self._quiet = False
        self.logger = logging.Logger("rafttranscript")  # unmanaged: never touches the root logger
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(_OutputHandler(self))
        self._turns: dict[int, readyloop.Turn[EnvNode]] = {}
        """Cycles split by `begin-ready`, waiting for their `end-ready`."""
        self._commands: dict[str, Callable[[Args], None]] = {
            "add-nodes": self.cmd_add_nodes,
            "campaign": self.cmd_campaign,
            "wake": self.cmd_wake,
            "propose": self.cmd_propose,
            "propose-conf-change": self.cmd_propose_conf_change,
            "read-index": self.cmd_read_index,
            "transfer-leadership": self.cmd_transfer_leadership,
            "report-unreachable": self.cmd_report_unreachable,
            "tick": self.cmd_tick,
            "tick-heartbeat": self.cmd_tick_heartbeat,
            "tick-election": self.cmd_tick_election,
            "process-ready": self.cmd_process_ready,
            "begin-ready": self.cmd_begin_ready,
            "end-ready": self.cmd_end_ready,
            "deliver-msgs": self.cmd_deliver_msgs,
            "stabilize": self.cmd_stabilize,
            "isolate": self.cmd_isolate,
            "cut": self.cmd_cut,
            "heal": self.cmd_heal,
            "crash": self.cmd_crash,
            "restart": self.cmd_restart,
            "compact": self.cmd_compact,
            "status": self.cmd_status,
            "raft-state": self.cmd_raft_state,
            "raft-log": self.cmd_raft_log,
            "log-level": self.cmd_log_level,
        }

    # --- output ---------------------------------------------------------------------------
    def out(self, line: str) -> None:
        if not self._quiet:
            self._lines.append("  " * self._indent + line)

    @contextmanager
    def indent(self) -> Iterator[None]:
        self._indent += 1
        try:
            yield
        finally:
            self._indent -= 1

    def run(self, command: str) -> str:
        """Run one directive and return its output ("ok" if it printed nothing)."""
        self._lines = []
        self._indent = 0
        self._quiet = False
        tokens = _TOKEN.findall(command)
        name, args = tokens[0], Args.parse(tokens[1:])
        try:
            handler = self._commands.get(name)
            if handler is None:
                raise TranscriptError(f"unknown command {name!r}")
            handler(args)
            args.check_unused()
        except (TranscriptError, ProposalDropped, RaftError) as err:
            self._indent = 0
            self.out(f"{type(err).__name__}: {err}" if not isinstance(err, TranscriptError) else f"error: {err}")
        return "\n".join(self._lines) if self._lines else "ok"

    # --- helpers --------------------------------------------------------------------------
    def member(self, nid: int, *, up: bool = True) -> EnvNode:
        n = self.nodes.get(nid)
        if n is None:
            raise TranscriptError(f"no node {nid}")
        if up and n.down:
            raise TranscriptError(f"node {nid} is down")
        return n

    def one_id(self, args: Args) -> int:
        ids = args.pos_ids()
        if len(ids) != 1:
            raise TranscriptError("expected exactly one node id")
        return ids[0]

    def _new_core(
        self, nid: int, cfg: dict[str, int | bool], storage: MemoryStorage, applied: int, seed: int
    ) -> RaftNode:
        config = Config(id=nid, applied=applied, **cfg)  # type: ignore[arg-type]
        return RaftNode(config, storage, random.Random(seed), self.logger)

    # --- setup ----------------------------------------------------------------------------
    def cmd_add_nodes(self, args: Args) -> None:
        if len(args.positional) != 1:
            raise TranscriptError("add-nodes N")
        count = int(args.positional[0])
        voters, learners = args.ids("voters"), args.ids("learners") or []
        index = args.num("index", 0)
        cfg: dict[str, int | bool] = {}
        for key, name in (("prevote", "pre_vote"), ("checkquorum", "check_quorum"), ("lease", "lease_read")):
            v = args.get(key)
            if v is not None:
                cfg[name] = args.flag(key, False)
        for key, name in (("election", "election_tick"), ("heartbeat", "heartbeat_tick"),
                          ("quiesce", "quiesce_ticks"), ("max-msg-size", "max_size_per_msg")):
            if args.get(key) is not None:
                cfg[name] = args.num(key, 0)
        seed = args.num("seed", 0)
        first = max(self.nodes, default=0) + 1
        for nid in range(first, first + count):
            if voters is None:
                storage = MemoryStorage()
                applied = 0
            else:
                conf = ConfState(tuple(sorted(voters)), tuple(sorted(learners)))
                if index:
                    storage = MemoryStorage()
                    storage.apply_snapshot(Snapshot(SnapshotMeta(index, 1, conf), b""))
                    storage.set_hard_state(HardState(1, 0, index))
                else:
                    storage = MemoryStorage.bootstrap(conf)
                applied = storage.hard_state.commit
            node_seed = seed * 100 + nid
            core = self._new_core(nid, cfg, storage, applied, node_seed * 1000)
            n = self.nodes[nid] = EnvNode(nid, cfg, node_seed, storage, core, applied)
            self.out(self._state_line(n))

    # --- local inputs ---------------------------------------------------------------------
    def cmd_campaign(self, args: Args) -> None:
        self.member(self.one_id(args)).node.campaign()

    def cmd_wake(self, args: Args) -> None:
        self.member(self.one_id(args)).node.wake()

    def cmd_propose(self, args: Args) -> None:
        if len(args.positional) < 2:
            raise TranscriptError("propose ID DATA...")
        n = self.member(int(args.positional[0]))
        data = [d.encode() for d in args.positional[1:]]
        n.node.propose(data[0] if len(data) == 1 else data)

    def cmd_propose_conf_change(self, args: Args) -> None:
        if len(args.positional) != 2:
            raise TranscriptError("propose-conf-change ID v4|l4|r3 (one change: single-server changes)")
        n = self.member(int(args.positional[0]))
        spec = args.positional[1]
        kinds = {"v": ConfChangeType.ADD_VOTER, "l": ConfChangeType.ADD_LEARNER, "r": ConfChangeType.REMOVE_NODE}
        if not spec or spec[0] not in kinds or not spec[1:].isdigit():
            raise TranscriptError(f"bad conf change {spec!r}: expected v4, l4 or r3")
        n.node.propose_conf_change(ConfChange(kinds[spec[0]], int(spec[1:])))

    def cmd_read_index(self, args: Args) -> None:
        if len(args.positional) != 2:
            raise TranscriptError("read-index ID CTX")
        self.member(int(args.positional[0])).node.read_index(args.positional[1].encode())

    def cmd_transfer_leadership(self, args: Args) -> None:
        frm, to = args.num("from", 0), args.num("to", 0)
        self.member(frm).node.transfer_leader(to)

    def cmd_report_unreachable(self, args: Args) -> None:
        self.member(self.one_id(args)).node.report_unreachable(args.num("to", 0))

    # --- time -----------------------------------------------------------------------------
    def cmd_tick(self, args: Args) -> None:
        ids = args.pos_ids()
        if not ids:
            raise TranscriptError("tick ID... [n=K]")
        for _ in range(args.num("n", 1)):
            for nid in ids:
                self.member(nid).node.tick()

    def cmd_tick_heartbeat(self, args: Args) -> None:
        n = self.member(self.one_id(args))
        for _ in range(n.node.cfg.heartbeat_tick):
            n.node.tick()

    def cmd_tick_election(self, args: Args) -> None:
        n = self.member(self.one_id(args))
        node = n.node
        if node.quiesced:
            raise TranscriptError(f"node {n.id} is quiesced: its timers do not run")
        if node.role == Role.LEADER:
            ticks = node.cfg.election_tick - node.election_elapsed
        else:
            ticks = node.randomized_election_timeout - node.election_elapsed
        ticks = max(ticks, 1)
        self.out(f"{n.id} ticks {ticks} times")
        with self.indent():
            for _ in range(ticks):
                node.tick()

    # --- Ready and messages ---------------------------------------------------------------
    def process_ready(self, n: EnvNode) -> None:
        """Handle one Ready the way a host does, through the one Ready loop
        (`kvstore.raft.readyloop`): send, persist, send what waited, apply, advance; print it all."""
        readyloop.run(((n, n.node),), self.queue.extend, self._print_and_persist, _nothing, _apply)

    def _print_and_persist(self, n: EnvNode, node: RaftNode, rd: Ready) -> None:
        if rd.soft_state is not None:
            self.out(f"Lead:{rd.soft_state.leader} State:{fmt_role(rd.soft_state.role)}")
        if rd.hard_state is not None:
            self.out(fmt_hard_state(rd.hard_state))
        if rd.entries:
            self.out("Entries:")
            for e in rd.entries:
                self.out(fmt_entry(e))
        if rd.snapshot is not None:
            self.out("Snapshot " + fmt_snapshot(rd.snapshot))
        if rd.committed_entries:
            self.out("CommittedEntries:")
            for e in rd.committed_entries:
                self.out(fmt_entry(e))
        if rd.messages:
            self.out("Messages:")
            for m in rd.messages:
                self.out(fmt_message(m))
        if rd.persisted_messages:
            self.out("Messages after persist:")
            for m in rd.persisted_messages:
                self.out(fmt_message(m))
        if rd.read_states:
            self.out("ReadStates:")
            for r in rd.read_states:
                self.out(self._fmt_read_state(r))
        readyloop.persist_to_memory(n.storage, rd)  # everything here is durable at once
        if rd.snapshot is not None:
            n.applied = max(n.applied, rd.snapshot.meta.index)

    @staticmethod
    def _fmt_read_state(r: ReadState) -> str:
        return f"Index:{r.index} Context:{fmt_data(r.context)}"

    def cmd_process_ready(self, args: Args) -> None:
        for nid in args.pos_ids():
            n = self.member(nid)
            if n.node.has_ready():
                self.out(f"> {nid} handling Ready")
                with self.indent():
                    self.process_ready(n)
            else:
                self.out(f"> {nid} has no Ready")

    def cmd_begin_ready(self, args: Args) -> None:
        (nid,) = args.pos_ids()
        n = self.member(nid)
        if nid in self._turns:
            raise ValueError(f"node {nid} already has a Ready in flight (end-ready {nid} first)")
        if not n.node.has_ready():
            self.out(f"> {nid} has no Ready")
            return
        self.out(f"> {nid} handling Ready (in flight)")
        with self.indent():
            turn = readyloop.begin(((n, n.node),), self.queue.extend, self._print_and_persist)
        assert turn is not None
        self._turns[nid] = turn

    def cmd_end_ready(self, args: Args) -> None:
        (nid,) = args.pos_ids()
        turn = self._turns.pop(nid, None)
        if turn is None:
            raise ValueError(f"node {nid} has no Ready in flight (begin-ready {nid} first)")
        self.out(f"> {nid} finished its Ready")
        readyloop.end(turn, self.queue.extend, _apply)

    def _take(self, to: int | None, drop_to: list[int] | None, frm: int | None,
              typ: MessageType | None) -> list[Message]:
        taken: list[Message] = []
        rest: list[Message] = []
        for m in self.queue:
            match_to = (to is None or m.to == to) and (drop_to is None or m.to in drop_to)
            if match_to and (frm is None or m.frm == frm) and (typ is None or m.type == typ):
                taken.append(m)
            else:
                rest.append(m)
        self.queue = rest
        return taken

    def deliver(self, to: int, frm: int | None = None, typ: MessageType | None = None) -> None:
        """Step every queued message addressed to `to` (in order); a cut link or a crashed
        recipient drops it."""
        target = self.nodes.get(to)
        for m in self._take(to, None, frm, typ):
            line = fmt_message(m)
            if target is None or target.down:
                self.out(f"dropped (node down): {line}")
            elif (m.frm, m.to) in self.cut:
                self.out(f"dropped (partition): {line}")
            else:
                self.out(line)
                with self.indent():
                    target.node.step(copy.deepcopy(m))  # the wire: nothing shared with the sender

    def _msg_filters(self, args: Args) -> tuple[int | None, MessageType | None]:
        frm = args.num("from", 0) or None
        tname = args.get("type")
        typ = None
        if tname is not None:
            if tname not in _MSG_TYPES:
                raise TranscriptError(f"unknown message type {tname}")
            typ = _MSG_TYPES[tname]
        return frm, typ

    def cmd_deliver_msgs(self, args: Args) -> None:
        frm, typ = self._msg_filters(args)
        drop = args.ids("drop")
        if drop is not None:
            for m in self._take(None, drop, frm, typ):
                self.out(f"dropped: {fmt_message(m)}")
        for nid in args.pos_ids():
            self.out(f"> {nid} receiving messages")
            with self.indent():
                self.deliver(nid, frm, typ)

    def cmd_stabilize(self, args: Args) -> None:
        """`stabilize [ID...] [log-level=none]`: handle Readies and deliver messages among the
        nodes (all by default) until nothing is left; log-level=none prints nothing (set-up)."""
        level = args.get("log-level")
        if level not in (None, "none", "debug"):
            raise TranscriptError("stabilize log-level=none|debug")
        self._quiet = level == "none"
        ids = args.pos_ids() or sorted(self.nodes)
        for _ in range(1000):
            done = True
            for nid in ids:
                n = self.nodes[nid]
                if not n.down and n.node.has_ready():
                    done = False
                    self.out(f"> {nid} handling Ready")
                    with self.indent():
                        self.process_ready(n)
            for nid in ids:
                if any(m.to == nid for m in self.queue):
                    done = False
                    self.out(f"> {nid} receiving messages")
                    with self.indent():
                        self.deliver(nid)
            if done:
                return
        raise TranscriptError("did not stabilize in 1000 rounds")

    # --- faults ---------------------------------------------------------------------------
    def cmd_isolate(self, args: Args) -> None:
        nid = self.one_id(args)
        for other in self.nodes:
            if other != nid:
                self.cut |= {(nid, other), (other, nid)}

    def cmd_cut(self, args: Args) -> None:
        ids = args.pos_ids()
        if len(ids) != 2:
            raise TranscriptError("cut A B")
        a, b = ids
        self.cut |= {(a, b), (b, a)}

    def cmd_heal(self, args: Args) -> None:
        self.cut.clear()

    def cmd_crash(self, args: Args) -> None:
        """The node stops: what its core had not handed out in a Ready is lost; its storage
        (everything persisted by `process-ready`) survives."""
        n = self.member(self.one_id(args))
        n.down = True

    def cmd_restart(self, args: Args) -> None:
        n = self.member(self.one_id(args), up=False)
        if not n.down:
            raise TranscriptError(f"node {n.id} is not down (crash it first)")
        n.down = False
        n.restarts += 1
        for m in self._take(n.id, None, None, None):
            self.out(f"dropped (sent while down): {fmt_message(m)}")
        n.applied = max(n.applied, n.storage.first_index() - 1)
        n.node = self._new_core(n.id, n.cfg, n.storage, n.applied, n.seed * 1000 + n.restarts)
        self.out(self._state_line(n))

    def cmd_compact(self, args: Args) -> None:
        """Snapshot the state machine at INDEX (at most the applied index) and drop the log
        through it."""
        if len(args.positional) != 2:
            raise TranscriptError("compact ID INDEX")
        n = self.member(int(args.positional[0]))
        index = int(args.positional[1])
        if index > n.applied:
            raise TranscriptError(f"compact {index}: node {n.id} has applied only {n.applied}")
        n.storage.create_snapshot(index, n.node.conf_state_at(index), f"snap@{index}".encode())
        n.storage.compact(index)
        self._print_log(n)

    # --- inspection -----------------------------------------------------------------------
    def _state_line(self, n: EnvNode) -> str:
        node = n.node
        st = "down" if n.down else fmt_role(node.role)
        q = " Quiesced" if not n.down and node.quiesced else ""
        return (
            f"{n.id}: {st}{q} Term:{node.term} Vote:{node.vote} Lead:{node.lead} "
            f"Commit:{node.committed} Applied:{n.applied} Last:{node.log.last_index()} {fmt_conf(node.conf)}"
        )

    def cmd_raft_state(self, args: Args) -> None:
        for nid in sorted(self.nodes):
            self.out(self._state_line(self.nodes[nid]))

    def cmd_status(self, args: Args) -> None:
        n = self.member(self.one_id(args), up=False)
        self.out(self._state_line(n))
        node = n.node
        if node.role == Role.LEADER and not n.down:
            with self.indent():
                for pid, pr in sorted(node.prs.items()):
                    kind = " learner" if pr.is_learner else ""
                    extra = " paused" if pr.paused else ""
                    if pr.pending_snapshot:
                        extra += f" pending_snapshot={pr.pending_snapshot}"
                    self.out(
                        f"{pid}: {pr.state.name.capitalize()}{kind} match={pr.match} next={pr.next}"
                        f" inflight={len(pr.inflight)}{extra}"
                    )

    def _print_log(self, n: EnvNode) -> None:
        log = n.node.log
        first, last = log.first_index(), log.last_index()
        snap = n.storage.snapshot()
        if first > 1:
            self.out(f"snapshot {fmt_snapshot(snap)}")
        if last < first:
            self.out("log is empty")
            return
        for e in log.slice(first, last + 1):
            self.out(fmt_entry(e))

    def cmd_raft_log(self, args: Args) -> None:
        self._print_log(self.member(self.one_id(args), up=False))

    def cmd_log_level(self, args: Args) -> None:
        level = args.positional[0] if args.positional else ""
        levels = {"debug": logging.DEBUG, "warning": logging.WARNING, "none": logging.CRITICAL + 1}
        if level not in levels:
            raise TranscriptError("log-level debug|warning|none")
        self.logger.setLevel(levels[level])


# --- running files ----------------------------------------------------------------------------
def run_transcript(text: str) -> tuple[TranscriptFile, list[str]]:
    """Run every directive of a transcript in one fresh environment; returns the actual outputs."""
    tf = parse_transcript(text)
    env = InteractionEnv()
    return tf, [env.run(d.command) for d in tf.directives]


def check_file(path: Path, rewrite: bool = False) -> str | None:
    """Run `path`; return None if every output matches, else a unified diff (expected -> actual).
    With `rewrite`, write the actual outputs into the file instead (and return None)."""
    text = path.read_text()
    tf, outputs = run_transcript(text)
    actual = render_transcript(tf, outputs)
    if actual == text:
        return None
    if rewrite:
        path.write_text(actual)
        return None
    diff = difflib.unified_diff(
        text.splitlines(keepends=True), actual.splitlines(keepends=True),
        fromfile=f"{path.name} (expected)", tofile=f"{path.name} (actual)",
    )
    return "".join(diff)


def transcript_files() -> list[Path]:
    return sorted(TRANSCRIPT_DIR.glob("*.txt"))


def main(argv: list[str]) -> int:
    """`python tests/rafttranscript.py [--rewrite] [FILE...]`: check (or rewrite) transcripts."""
    rewrite = "--rewrite" in argv
    files = [Path(a) for a in argv if a != "--rewrite"] or transcript_files()
    failed = 0
    for f in files:
        diff = check_file(f, rewrite)
        if diff:
            failed += 1
            sys.stdout.write(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["REWRITE_ENV", "InteractionEnv", "check_file", "run_transcript", "transcript_files"]
