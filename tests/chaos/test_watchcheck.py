"""The watch checks of kvchaos (`chaos.watchcheck`) on hand-made histories: a correct history
passes, and each guarantee (ordered, unique, atomic, bookmarkable, reliable, live) is violated
once and reported under its name; plus the records' round trip through `watches.jsonl` and the
writes taken from a run's operations."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.watchcheck import (
    FeedState,
    KeyRange,
    WatchBatchRecord,
    WatcherLog,
    WatchEventRecord,
    WriteRecord,
    check_all,
    check_batch,
)
from chaos.watchers import load_watchers, write_records, writes_of
from chaos.workload import OpRecord

ALL = KeyRange("\0", "")


def put(key: str, value: str, rev: int, version: int = 1, create: int = 0, prev: str | None = None) -> WatchEventRecord:
    return WatchEventRecord("PUT", key, value, rev, create or rev, version, prev)


def delete(key: str, rev: int, prev: str | None = None) -> WatchEventRecord:
    return WatchEventRecord("DELETE", key, None, rev, 0, 0, prev)


def history() -> tuple[list[WriteRecord], list[WatchEventRecord]]:
    """Writes to r/1 and r/2 at revisions 10..14 (one indeterminate that took effect at 13), and
    the events a correct watcher of everything gets for them."""
    writes = [
        WriteRecord("r/1", "a", 10, True),
        WriteRecord("r/2", "b", 11, True),
        WriteRecord("r/1", "c", 12, True),
        WriteRecord("r/2", "d", 0, False),  # indeterminate: took effect at 13
        WriteRecord("r/1", None, 14, True),
        WriteRecord("r/2", "never", 0, False),  # indeterminate: never took effect
    ]
    events = [put("r/1", "a", 10), put("r/2", "b", 11), put("r/1", "c", 12, 2, 10, prev="a"),
              put("r/2", "d", 13, 2, 11, prev="b"), delete("r/1", 14, prev="c")]
    return writes, events


def watcher(wid: int, batches: list[tuple[int, list[WatchEventRecord]]], *, rng: KeyRange = ALL, start: int = 0,
            prev_kv: bool = True, ended: str = "stopped") -> WatcherLog:
    return WatcherLog(wid, rng, start, prev_kv, [WatchBatchRecord(r, list(evs)) for r, evs in batches], 0, ended)


def good_batches() -> list[tuple[int, list[WatchEventRecord]]]:
    _, ev = history()
    return [(9, []), (11, ev[:2]), (11, []), (13, ev[2:4]), (20, ev[4:])]


def test_a_correct_history_passes() -> None:
    writes, ev = history()
    key_only = [(e.revision, [e]) for e in ev if e.key == "r/2"]
    res = check_all([watcher(0, good_batches()), watcher(1, [(10, []), *key_only, (20, [])], rng=KeyRange("r/2"), start=11)],
                    writes, end_revision=14)
    assert res.valid, res.messages
    assert res.events == 7 and res.batches == 9 and res.progress == 4
    assert res.acked_checked == 5  # 4 acknowledged writes for watcher 0, 1 (r/2 at 11) for watcher 1
    assert res.indeterminate_seen == 1 and res.cross_checked == 2


def violated(logs: list[WatcherLog], end: int = 14) -> dict[str, int]:
    writes, _ = history()
    res = check_all(logs, writes, end_revision=end)
    assert not res.valid and res.messages
    return res.violations


def test_ordered() -> None:
    _, ev = history()
    assert "ordered" in violated([watcher(0, [(9, []), (12, [ev[1], ev[0]])])])


def test_unique() -> None:
    _, ev = history()
    assert "unique" in violated([watcher(0, [(9, []), (10, [ev[0], ev[0]])])])


def test_atomic_within_a_watcher() -> None:
    """Revision 13 of a transaction touching two keys split over two responses."""
    ev = [put("r/1", "x", 13), put("r/2", "y", 13)]
    writes = [WriteRecord("r/1", "x", 13, True), WriteRecord("r/2", "y", 13, True)]
    res = check_all([watcher(0, [(9, []), (13, ev[:1]), (13, ev[1:])], prev_kv=False)], writes)
    assert res.violations == {"atomic": 1}, res.messages


def test_atomic_across_watchers() -> None:
    """The indeterminate write at 13 shows up in one watcher of r/2 but not in the other."""
    _, ev = history()
    with13 = [(10, []), (11, [ev[1]]), (13, [ev[3]]), (20, [])]
    without = [(10, []), (11, [ev[1]]), (20, [])]
    v = violated([watcher(0, with13, rng=KeyRange("r/2")), watcher(1, without, rng=KeyRange("r/2"))])
    assert v == {"atomic": 1}


def test_a_merged_watch_whose_sub_broke_the_contract_is_a_violation() -> None:
    """The client library restarts a merged watch when a node's sub-watch breaks the contract, so
    the feed the harness sees is correct: the breach count it reports makes the run invalid."""
    w = watcher(0, good_batches())
    w.breaches = 1
    assert violated([w]) == {"ordered": 1}


def test_bookmarkable() -> None:
    """An event at or below a progress notification's revision, after it."""
    _, ev = history()
    assert "bookmarkable" in violated([watcher(0, [(9, []), (12, []), (12, [ev[2]])])])
    assert "bookmarkable" in violated([watcher(0, [(9, []), (10, [ev[1]])])])  # event above its response


def test_reliable_missing_acknowledged_write() -> None:
    b = good_batches()
    b[3] = (13, b[3][1][1:])  # r/1=c at 12 dropped, the response still covers it
    v = violated([watcher(0, b, prev_kv=False)])
    assert v["reliable"] >= 1 and set(v) == {"reliable"}


def test_reliable_event_nobody_wrote() -> None:
    b = good_batches()
    b.append((30, [put("r/3", "forged", 25)]))
    assert violated([watcher(0, b)]) == {"reliable": 1}


def test_reliable_wrong_revision_and_outside_the_window() -> None:
    _, ev = history()
    moved = put("r/1", "a", 9)
    assert violated([watcher(0, [(8, []), (9, [moved])], rng=KeyRange("r/1"), prev_kv=False)], end=9) == {"reliable": 1}
    assert violated([watcher(0, [(11, [ev[0]])], rng=KeyRange("r/1"), start=11)], end=9) == {"reliable": 1}


def test_reliable_prev_kv_and_versions() -> None:
    b = good_batches()
    b[3] = (13, [put("r/1", "c", 12, 2, 10, prev="zz"), b[3][1][1]])
    assert violated([watcher(0, b)]) == {"reliable": 1}
    b = good_batches()
    b[3] = (13, [put("r/1", "c", 12, 3, 10, prev="a"), b[3][1][1]])
    assert violated([watcher(0, b)]) == {"reliable": 1}


def test_live() -> None:
    assert violated([watcher(0, good_batches()[:2])]) == {"live": 1}  # told through 11, last write at 14
    assert violated([watcher(0, good_batches(), ended="Unauthenticated: token expired")]) == {"live": 1}


def test_check_batch_keeps_its_state_only_when_the_response_passes() -> None:
    s = FeedState()
    assert check_batch(s, 5, [(3, b"k"), (5, b"j")]) is None
    assert (s.bookmark, s.last_event) == (5, 5)
    bad = check_batch(s, 7, [(6, b"k"), (6, b"k")])
    assert bad is not None and bad.prop == "unique"
    assert (s.bookmark, s.last_event) == (5, 5)


@settings(max_examples=60, deadline=None)
@given(revs=st.lists(st.integers(1, 40), min_size=1, max_size=12, unique=True), data=st.data())
def test_any_split_of_a_correct_feed_passes_and_any_dropped_event_is_caught(revs: list[int], data: st.DataObject) -> None:
    """A correct feed cut into responses anywhere (with progress notifications between) passes;
    dropping one of its events fails `reliable`, repeating one fails `unique`."""
    revs.sort()
    writes = [WriteRecord("k", f"v{r}", r, True) for r in revs]
    events = [put("k", f"v{r}", r, i + 1, revs[0]) for i, r in enumerate(revs)]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(events)), max_size=4))) | {len(events)})
    batches: list[tuple[int, list[WatchEventRecord]]] = [(0, [])]
    at = 0
    for c in cuts:
        batches.append((events[c - 1].revision, events[at:c]))
        at = c
    log = watcher(0, batches, rng=KeyRange("k"), prev_kv=False)
    assert check_all([log], writes, end_revision=revs[-1]).valid
    i = data.draw(st.integers(0, len(events) - 1))
    dropped = [(r, [e for e in evs if e is not events[i]]) for r, evs in batches]
    res = check_all([watcher(0, dropped, rng=KeyRange("k"), prev_kv=False)], writes, end_revision=revs[-1])
    assert "reliable" in res.violations
    repeated = [(r, [*evs, events[i]] if events[i] in evs else evs) for r, evs in batches]
    res = check_all([watcher(0, repeated, rng=KeyRange("k"), prev_kv=False)], writes, end_revision=revs[-1])
    assert "unique" in res.violations


def test_records_round_trip_and_writes_of_a_history(tmp_path: Path) -> None:
    logs = [watcher(0, good_batches()), watcher(1, [(10, [])], rng=KeyRange("r/", "r0"), start=3, ended="Compacted: x")]
    logs[0].resumes = 2
    logs[0].breaches = 1
    write_records(tmp_path / "watches.jsonl", logs)
    back = load_watchers(tmp_path / "watches.jsonl")
    assert back == logs
    ops = [
        OpRecord(1, "put", "r/1", "a", status="ok", revision=10),
        OpRecord(1, "cas", "r/1", ["a", "b"], output=False, status="ok"),  # no change
        OpRecord(1, "cas", "r/1", ["a", "c"], output=True, status="ok", revision=12),
        OpRecord(2, "put", "r/2", "d", status="info"),
        OpRecord(2, "put", "r/2", "e", status="fail"),  # definitely nothing
        OpRecord(3, "delete", "r/1", output=False, status="ok"),  # absent: no change
        OpRecord(3, "delete", "r/1", output=True, status="ok", revision=14),
        OpRecord(3, "get", "r/1", output="a", status="ok"),
    ]
    assert writes_of(ops) == [WriteRecord("r/1", "a", 10, True), WriteRecord("r/1", "c", 12, True),
                              WriteRecord("r/2", "d", 0, False), WriteRecord("r/1", None, 14, True)]
