"""A read meets a cross-group transaction's intents in the read's OWN view (kvchaos bank seed 7:
a linearizable scan summed 807 of 800, showing one side of a transfer). The server's read
functions (`requests.read_version`, `requests.open_scan`) run on a real LMDB node store whose
apply lands a COMMIT right after the read's data view is taken (as the persist thread can,
between the read and any later look at the intents): the read must still be refused (the
intent, prepared at or below the revision served, was pending in its view), never answered with
the data from before the commit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import errors
from kvstore.node import xtxn as logic
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.server.requests import open_scan, read_version
from kvstore.shard.ranges import IntervalSet
from kvstore.storage import mvcc
from kvstore.storage.commands import Command, encode_command
from kvstore.storage.store import LmdbNodeStore
from kvstore.storage.txn import OpKind, Txn, TxnOp
from kvstore.storage.xtxn import TxnId

G = 4
CONF = ConfState((1,))
START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)
TID = TxnId(3, 3)


class CommitAfterView:
    """The store's revision reads, except that right after a read's view is taken (its data
    fixed), `commit` is applied to the store (what the persist thread may do meanwhile)."""

    def __init__(self, store: LmdbNodeStore, commit: bytes) -> None:
        self.store = store
        self.inner = store.revisions
        self.commit: bytes | None = commit

    def _land(self) -> None:
        if self.commit is not None:
            data, self.commit = self.commit, None
            apply(self.store, [data])

    def get_version(self, *args: Any, **kw: Any) -> Any:
        out = self.inner.get_version(*args, **kw)
        self._land()
        return out

    def scan_versions(self, *args: Any, **kw: Any) -> Any:
        out = self.inner.scan_versions(*args, **kw)
        self._land()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def apply(store: LmdbNodeStore, datas: list[bytes]) -> list[Any]:
    """Append `datas` to the group's log and apply every entry not applied yet (the bootstrap
    entries first); the results of `datas`."""
    ls = store.log_storage(G)
    first = ls.last_index() + 1
    es = [Entry(1, first + i, EntryType.NORMAL, d, G) for i, d in enumerate(datas)]
    store.persist_and_apply([GroupWrite(G, es, HardState(1, 0, es[-1].index))], ())
    done = store.revisions.applied(G).index
    todo = ls.entries(done + 1, ls.last_index() + 1)
    return store.persist_and_apply((), [ApplyBatch(G, todo, CONF)])[0][-len(datas):]


@pytest.fixture
def prepared(tmp_path: Path) -> Iterator[tuple[LmdbNodeStore, bytes]]:
    """A store whose group holds a=old and a pending transfer's intent on a (prepared in the
    group), and the transfer's COMMIT (a := new at R)."""
    store = LmdbNodeStore(tmp_path / "s")
    try:
        assert store.bootstrap(G, CONF)
        t = Txn(success=(TxnOp(OpKind.PUT, b"acct/a", b"new"),))
        p = logic.plan(t, [(b"acct/a", G)])
        put = encode_command(Command.put(b"acct/a", b"old"))
        res = apply(store, [put, logic.prepare_commands(p, TID, START, 0)[G]])
        assert res[-1].error is None
        ready = logic.after_prepare(t, p, {G: res[-1]})
        assert isinstance(ready, logic.Ready)
        yield store, logic.commit_commands(TID, ready, [G])[G]
    finally:
        store.close()


def test_a_get_sees_the_intent_of_its_own_view(prepared: tuple[LmdbNodeStore, bytes]) -> None:
    store, commit = prepared
    hooked = CommitAfterView(store, commit)
    v, _st, blocking = read_version(hooked, G, b"acct/a", 0)  # type: ignore[arg-type]
    assert hooked.commit is None  # the COMMIT landed right after the view was taken
    assert v is not None and v.value == b"old"  # the view predates the commit ...
    assert blocking is not None and blocking[1].txn == TID  # ... so the read must be refused
    assert store.get(G, b"acct/a") == b"new"


def test_a_scan_sees_the_intents_of_its_own_view(prepared: tuple[LmdbNodeStore, bytes]) -> None:
    store, commit = prepared
    hooked = CommitAfterView(store, commit)
    _rst, stream, blocking = open_scan(hooked, G, b"acct/", b"acct0", 0, 0, IntervalSet.full())  # type: ignore[arg-type]
    try:
        assert hooked.commit is None
        assert [(k, v.value) for chunk in stream for k, v in chunk] == [(b"acct/a", b"old")]
        assert blocking is not None and blocking[1].txn == TID
    finally:
        stream.close()
    # once the commit applied, a new read is not blocked and sees it
    v, _st, blocking = read_version(store.revisions, G, b"acct/a", 0)
    assert blocking is None and v is not None and v.value == b"new"


def test_a_corrupt_intent_row_is_a_definite_internal_error() -> None:
    from kvstore.server.requests import blocking_in_view
    from kvstore.storage.xtxn import IntentProbe

    with pytest.raises(errors.InternalError) as exc:
        blocking_in_view(G, IntentProbe(8, [(b"k", b"garbage")]), 5)
    assert exc.value.definite
