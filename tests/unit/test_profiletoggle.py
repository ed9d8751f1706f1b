"""The benchmark's profiler switch (`kvstore.server.profiletoggle`): off without `KVSTORE_PROFILE`;
SIGUSR1 twice profiles the window in between; `KVSTORE_PROFILE_CLOCK=thread` charges a function
its thread's CPU time only, so time blocked in a system call is not counted."""

from __future__ import annotations

import asyncio
import pstats
import time
from pathlib import Path

import pytest

from kvstore.server import profiletoggle


def _sleeper() -> None:
    time.sleep(0.2)  # blocked: wall time, no CPU


def _spinner() -> None:
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass


def _charged(path: Path, name: str) -> float:
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    return next(v[3] for k, v in stats.items() if k[2] == name)


@pytest.mark.parametrize("clock", ["wall", "thread"])
def test_the_window_between_two_toggles_is_profiled_by_the_chosen_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: str) -> None:
    out = tmp_path / "p.prof"
    monkeypatch.setenv(profiletoggle.ENV, str(out))
    monkeypatch.setenv(profiletoggle.CLOCK_ENV, clock)
    loop = asyncio.new_event_loop()
    try:
        toggle = profiletoggle.install(loop)
        assert toggle is not None
        toggle.toggle()
        _sleeper()
        _spinner()
        toggle.toggle()
    finally:
        loop.close()
    slept, spun = _charged(out, "_sleeper"), _charged(out, "_spinner")
    assert spun >= 0.04
    if clock == "thread":
        assert slept < 0.05  # the sleep cost no CPU
    else:
        assert slept >= 0.19


def test_off_without_a_file_and_a_bad_clock_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.new_event_loop()
    try:
        monkeypatch.delenv(profiletoggle.ENV, raising=False)
        assert profiletoggle.install(loop) is None
        monkeypatch.setenv(profiletoggle.ENV, "/nonexistent/p.prof")
        monkeypatch.setenv(profiletoggle.CLOCK_ENV, "cpu")
        with pytest.raises(ValueError, match="KVSTORE_PROFILE_CLOCK"):
            profiletoggle.install(loop)
    finally:
        loop.close()
