"""Runs every transcript in tests/raft_transcripts/ (see tests/rafttranscript.py for the format
and the commands) and compares the output with the expected one.

Rewrite the expected outputs after a deliberate change of behaviour, then review the diff:

    KVSTORE_REWRITE_TRANSCRIPTS=1 .venv/bin/pytest tests/unit/test_raft_transcripts.py
    .venv/bin/pytest tests/unit/test_raft_transcripts.py --rewrite
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rafttranscript import (
    REWRITE_ENV,
    TRANSCRIPT_DIR,
    InteractionEnv,
    check_file,
    parse_transcript,
    render_transcript,
    run_transcript,
    transcript_files,
)

from chaos.sim.plant import BUGS, planted

FILES = transcript_files()


def _rewrite(config: pytest.Config) -> bool:
    return os.environ.get(REWRITE_ENV) == "1" or bool(config.getoption("--rewrite", default=False))


def test_there_are_transcripts() -> None:
    assert len(FILES) >= 8


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_transcript(path: Path, pytestconfig: pytest.Config) -> None:
    diff = check_file(path, rewrite=_rewrite(pytestconfig))
    if diff is not None:
        pytest.fail(f"transcript {path.name} differs (rewrite with {REWRITE_ENV}=1):\n{diff}", pytrace=False)


def test_a_changed_expectation_fails_with_a_diff(tmp_path: Path) -> None:
    text = "add-nodes 1 voters=(1)\n----\nnot what it prints\n"
    f = tmp_path / "t.txt"
    f.write_text(text)
    diff = check_file(f)
    assert diff is not None and "-not what it prints" in diff and "+1: StateFollower" in diff
    assert check_file(f, rewrite=True) is None and check_file(f) is None
    assert f.read_text().startswith("add-nodes 1 voters=(1)\n----\n1: StateFollower Term:1")


def test_format_round_trips_comments_and_blank_lines() -> None:
    text = "# a comment\n\nraft-state\n----\nok\n\n\n# between\nraft-state\n----\nok\n"
    tf, outputs = run_transcript(text)
    assert outputs == ["ok", "ok"]
    assert render_transcript(tf, outputs) == text
    assert parse_transcript(text).directives[1].line == 9


def test_bad_directives_print_errors() -> None:
    env = InteractionEnv()
    assert env.run("frobnicate 1") == "error: unknown command 'frobnicate'"
    assert env.run("add-nodes 1 voters=(1) colour=red").endswith("error: unknown argument(s): colour")
    assert env.run("propose 1 x") == "ProposalDropped: not leader (leader is 0)"


# Every known core bug of chaos/sim/plant.py, and a transcript that must notice it ("no-admission"
# plants into the server's admission of peer messages, which the core transcripts do not use).
PLANTED = {
    "forget-vote": "elections.txt",
    "apply-before-commit": "commit_previous_term.txt",
    "vote-without-log-check": "prevote.txt",
    "commit-previous-term": "commit_previous_term.txt",
    "read-without-confirmation": "read_index.txt",
    "lease-across-quiescence": "quiescence_lease.txt",
    "wake-does-nothing": "quiescence.txt",
    "skip-log-consistency-check": "elections.txt",
    "apply-before-persist": "leader_persistence.txt",
}


def test_every_core_plant_is_checked() -> None:
    assert set(PLANTED) == set(BUGS) - {"no-admission"}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_fails_a_transcript(bug: str) -> None:
    path = TRANSCRIPT_DIR / PLANTED[bug]
    assert check_file(path) is None, f"{path.name} must pass without the bug"
    with planted(bug):
        try:
            diff = check_file(path)
        except Exception as err:  # the interpreter tripping over the bug counts as noticing it
            diff = f"raised {err!r}"
    assert diff is not None, f"planted bug {bug!r} went unnoticed by {path.name}"
    assert check_file(path) is None
