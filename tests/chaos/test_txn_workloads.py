"""kvchaos's transaction workloads: ``bank`` (transfers by multi-key transactions over accounts in
two groups) and ``lock`` (the Mutex recipe, writes fenced by the token), their checkers on
planted histories and on fuzzed records, and short real runs (local backend; netns when root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.checks import analyze_records
from chaos.txnworkloads import check_bank, check_lock, parse_balance, parse_token
from chaos.workload import OpRecord

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the netns backend needs root")


@pytest.fixture(autouse=True)
def private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCHAOS_REGISTRY", str(tmp_path / "registry"))


def kvchaos(args: list[str], timeout: float = 180) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "chaos.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))
    # stderr first: the verdict is stdout's last line, and grpc's C core may log to stderr at any
    # moment (e.g. a failed TLS handshake with a port another test's node took after a kill).
    return proc.returncode, proc.stderr + proc.stdout


def summary_of(out: Path) -> dict[str, Any]:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    s: dict[str, Any] = json.loads((d / "summary.json").read_text())
    return s


# ----- the bank checker ------------------------------------------------------------------------


def balances(t: float, bal: list[int], *, final: bool = False) -> OpRecord:
    out = {f"acct/{i:03d}": str(b) for i, b in enumerate(bal)}
    return OpRecord(9, "balances", "acct/", None, out, t, t + 0.01, "ok", workload="bank", final=final)


def transfer(t: float, src: int, dst: int, amount: int, new: tuple[int, int], status: str = "ok",
             applied: bool = True) -> OpRecord:
    return OpRecord(1, "transfer", "acct/", [src, dst, amount, *new], applied if status == "ok" else None,
                    t, t + 0.01, status, workload="bank")


def test_bank_conserved_total_with_indeterminate_transfers_is_valid() -> None:
    recs = [
        balances(0.0, [100, 100, 100]),
        transfer(1.0, 0, 1, 10, (90, 110)),
        transfer(2.0, 1, 2, 5, (105, 105), status="info"),  # may have applied: it did
        balances(3.0, [90, 105, 105]),
        transfer(4.0, 2, 0, 7, (98, 97), status="ok", applied=False),  # refused by its compares
        balances(5.0, [90, 105, 105], final=True),
    ]
    res = check_bank(recs, 300, 3)
    assert res["valid"] is True and res["bad_count"] == 0, res
    assert (res["transfers_ok"], res["transfers_refused"], res["transfers_info"]) == (1, 1, 1)
    a = analyze_records(recs, workload="bank", bank_total=300, bank_accounts=3)
    assert a.verdict == "valid", a.reasons


@pytest.mark.parametrize(("bal", "why"), [
    ([90, 100, 100], "total 290 != 300"),  # half a transfer
    ([110, 110, 80], "written by no transfer"),  # right total, values from nowhere
    ([90, 110], "2 accounts, expected 3"),
])
def test_bank_violations_are_reported(bal: list[int], why: str) -> None:
    recs = [transfer(1.0, 0, 1, 10, (90, 110)), balances(2.0, bal), balances(3.0, [90, 110, 100], final=True)]
    res = check_bank(recs, 300, 3)
    assert res["valid"] is False and why in res["bad_reads"][0]["why"], res
    a = analyze_records(recs, workload="bank", bank_total=300, bank_accounts=3)
    assert a.verdict == "invalid" and a.reasons[0].startswith("bank:"), a.reasons


def test_bank_read_of_a_transfer_reported_refused_is_a_violation() -> None:
    """A transfer the client was told did not apply (compares failed) whose writes are seen:
    the total holds, the reply was wrong."""
    recs = [transfer(1.0, 0, 1, 10, (90, 110), applied=False), balances(2.0, [90, 110, 100]),
            balances(3.0, [90, 110, 100], final=True)]
    res = check_bank(recs, 300, 3)
    assert res["valid"] is False and "reported refused or failed" in res["bad_reads"][0]["why"], res


def test_bank_negative_balance_and_missing_final_read() -> None:
    res = check_bank([transfer(1.0, 0, 1, 10, (-10, 210)), balances(2.0, [-10, 210, 100], final=True)], 300, 3)
    assert res["valid"] is False and res["bad_reads"][0]["why"] == "negative balance"
    res = check_bank([balances(2.0, [100, 100, 100])], 300, 3)
    assert res["valid"] is None and res["final_read"] is False
    a = analyze_records([balances(2.0, [100, 100, 100])], workload="bank", bank_total=300, bank_accounts=3)
    assert a.verdict == "unknown"


# ----- the lock checker ------------------------------------------------------------------------


def acquire(p: int, t: float, token: int) -> OpRecord:
    return OpRecord(p, "acquire", "lock/m", None, token, t, t + 0.01, "ok", workload="lock")


def fenced(p: int, t: float, token: int, accepted: bool, rev: int, status: str = "ok") -> OpRecord:
    out = [accepted, rev if accepted else 0] if status == "ok" else None
    return OpRecord(p, "fenced", "fence/token", token, out, t, t + 0.01, status, workload="lock")


def resource(token: int) -> OpRecord:
    return OpRecord(10_000_000, "resource", "fence/token", None, f"{token:020d}", 50.0, 50.1, "ok",
                    workload="lock", final=True)


def test_lock_paused_holder_refused_is_valid() -> None:
    recs = [
        acquire(1, 0.0, 10), fenced(1, 0.1, 10, True, 11),
        acquire(2, 5.0, 20), fenced(2, 5.1, 20, True, 21),
        fenced(1, 6.0, 10, False, 0),  # the paused holder wakes up: refused by the fence
        fenced(2, 6.1, 20, True, 22, status="info"),
        resource(20),
    ]
    res = check_lock(recs)
    assert res["valid"] is True and (res["accepted"], res["refused"], res["indeterminate"]) == (2, 1, 1), res
    assert analyze_records(recs, workload="lock").verdict == "valid"


def test_lock_stale_holder_accepted_is_a_violation() -> None:
    recs = [
        acquire(1, 0.0, 10), fenced(1, 0.1, 10, True, 11),
        acquire(2, 5.0, 20), fenced(2, 5.1, 20, True, 21),
        fenced(1, 6.0, 10, True, 23),  # accepted after token 20: two holders interleaved
        resource(20),
    ]
    res = check_lock(recs)
    assert res["valid"] is False and "after token 20" in res["violations"][0], res
    a = analyze_records(recs, workload="lock")
    assert a.verdict == "invalid" and a.reasons[0].startswith("lock:"), a.reasons


def test_lock_duplicate_token_and_wrong_final_value() -> None:
    res = check_lock([acquire(1, 0.0, 10), acquire(2, 1.0, 10), fenced(1, 0.1, 10, True, 11), resource(9)])
    assert res["valid"] is False
    assert any("given to processes 1 and 2" in v for v in res["violations"])
    assert any("final resource token 9" in v for v in res["violations"])
    # a higher final token is fine only if that write was indeterminate
    ok = check_lock([acquire(1, 0.0, 10), fenced(1, 0.1, 10, True, 11), acquire(2, 1.0, 12),
                     fenced(2, 1.1, 12, False, 0, status="info"), resource(12)])
    assert ok["valid"] is True, ok


# ----- fuzz: damaged histories never crash the checkers ---------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**25, 10**25) | st.text(max_size=30) | st.floats(allow_nan=True),
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)
records = st.builds(
    OpRecord,
    process=st.integers(0, 5),
    f=st.sampled_from(["balances", "transfer", "acquire", "fenced", "resource", "get", "put"]),
    key=st.sampled_from(["acct/", "fence/token", "lock/m"]),
    value=junk, output=junk,
    invoke=st.floats(0, 100), complete=st.floats(0, 100),
    status=st.sampled_from(["ok", "fail", "info", "invoke"]),
    final=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=12), st.integers(1, 5))
def test_checkers_are_total_on_damaged_histories(recs: list[OpRecord], accounts: int) -> None:
    b = check_bank(recs, 100 * accounts, accounts)
    assert b["valid"] in (True, False, None)
    k = check_lock(recs)
    assert k["valid"] in (True, False, None)
    json.dumps(b), json.dumps(k)


@settings(max_examples=300, deadline=None)
@given(junk | st.binary(max_size=30))
def test_decoders_raise_only_value_error(v: object) -> None:
    for parse in (parse_balance, parse_token):
        try:
            n = parse(v)
        except ValueError:
            continue
        assert isinstance(n, int)


# ----- real runs --------------------------------------------------------------------------------


def test_local_bank_across_two_groups_under_kill_and_pause(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--backend", "local", "--nodes", "3", "--groups", "2", "--time", "10",
                          "--nemesis", "kill,pause", "--workload", "bank", "--seed", "3", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    b = summary_of(out)["analysis"]["bank"]
    assert b["valid"] is True and b["final_read"] is True and b["bad_count"] == 0, b
    assert b["groups_spanned"] == 2, b["account_groups"]
    assert b["transfers_ok"] > 10 and b["reads"] > 3, b
    assert set(b["totals"]) == {"800"}, b["totals"]


def test_local_lock_with_fencing_under_pause_and_kill(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--backend", "local", "--nodes", "3", "--time", "10",
                          "--nemesis", "pause,kill", "--workload", "lock", "--seed", "4", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    k = summary_of(out)["analysis"]["lock"]
    assert k["valid"] is True and k["violation_count"] == 0, k
    assert k["acquired"] >= 5 and k["accepted"] >= 5 and k["final_token"] == k["highest_token"] > 0, k


@needs_root
def test_netns_bank_under_partitions(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "3", "--groups", "2", "--time", "12", "--nemesis", "partition",
                          "--workload", "bank", "--seed", "5", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    b = summary_of(out)["analysis"]["bank"]
    assert b["valid"] is True and b["groups_spanned"] == 2 and b["transfers_ok"] > 10, b
