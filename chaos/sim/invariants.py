"""Raft's safety properties (Raft paper, Figure 3), checked while the simulation runs.

- Election Safety: at most one leader per term.
- Log Matching: if two logs hold an entry with the same index and term, the entries are identical
  and so are all entries before them (checked inductively: identical data and identical term of
  the previous entry, for every (index, term) ever made durable anywhere).
- Leader Completeness: a leader's log holds every entry committed before its term.
- State Machine Safety: no two nodes apply different entries at the same index; more strictly,
  no two nodes ever consider different entries committed at the same index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.raft import Entry, RaftNode


class SafetyViolation(AssertionError):
    """A Raft safety property does not hold."""


@dataclass(slots=True)
class SafetyChecker:
    leaders: dict[int, int] = field(default_factory=dict)
    """term -> the node that was leader in it."""
    log_entries: dict[tuple[int, int], tuple[bytes, int, int]] = field(default_factory=dict)
    """(index, term) -> (data, entry type, term of the previous entry)."""
    applied: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    """index -> (term, data) of the entry applied there."""
    committed: dict[int, int] = field(default_factory=dict)
    """index -> term of the entry some node considers committed there."""
    checks: int = 0

    def on_leader(self, node: RaftNode) -> None:
        """Called whenever `node` is seen as leader."""
        self.checks += 1
        term = node.term
        prev = self.leaders.get(term)
        if prev is None:
            self.leaders[term] = node.id
            self._check_leader_completeness(node)
        elif prev != node.id:
            raise SafetyViolation(f"election safety: nodes {prev} and {node.id} are both leader in term {term}")

    def _check_leader_completeness(self, node: RaftNode) -> None:
        log = node.log
        first = log.first_index()
        last = log.last_index()
        for index, term in self.committed.items():
            if term >= node.term or index < first:
                continue
            if index > last or log.term_or_zero(index) != term:
                raise SafetyViolation(
                    f"leader completeness: leader {node.id} of term {node.term} lacks committed entry "
                    f"{index} (term {term}); its log ends at {last}"
                )

    def on_persist(self, node_id: int, entries: list[Entry], prev_terms: list[int | None]) -> None:
        """`entries` became durable on `node_id`; prev_terms[i] is the durable term before entries[i]."""
        self.checks += 1
        for e, pt in zip(entries, prev_terms, strict=True):
            key = (e.index, e.term)
            seen = self.log_entries.get(key)
            if seen is None:
                self.log_entries[key] = (e.data, int(e.type), -1 if pt is None else pt)
                continue
            data, typ, spt = seen
            if data != e.data or typ != int(e.type):
                raise SafetyViolation(
                    f"log matching: node {node_id} holds a different entry at index {e.index} term {e.term}"
                )
            if pt is not None and spt != -1 and pt != spt:
                raise SafetyViolation(
                    f"log matching: node {node_id} has term {pt} before ({e.index}, {e.term}); "
                    f"another log has {spt}"
                )

    def on_commit(self, node_id: int, index: int, term: int) -> None:
        """`node_id` considers the entry (index, term) committed."""
        seen = self.committed.get(index)
        if seen is None:
            self.committed[index] = term
        elif seen != term:
            raise SafetyViolation(
                f"commit safety: node {node_id} committed term {term} at index {index}, "
                f"another node committed term {seen} there"
            )

    def on_apply(self, node_id: int, entry: Entry) -> None:
        self.checks += 1
        seen = self.applied.get(entry.index)
        if seen is None:
            self.applied[entry.index] = (entry.term, entry.data)
            return
        if seen != (entry.term, entry.data):
            raise SafetyViolation(
                f"state machine safety: node {node_id} applied (term {entry.term}) at index {entry.index}, "
                f"another node applied term {seen[0]}"
            )
