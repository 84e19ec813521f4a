"""When an idle host gives its heap back (``app.engine.idle``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.idle import MAX_POLLS, IdleClock, available_share


def polls(clock: IdleClock, pattern: str) -> str:
    """Feed ``pattern`` ("x": an operation ran since the last poll, ".": none); return where
    the clock said to trim ("T") or not ("-")."""
    return "".join("T" if clock.poll(c == "x") else "-" for c in pattern)


def test_after_steps_without_pauses_one_idle_poll_trims_once() -> None:
    clock = IdleClock()
    assert polls(clock, "xxxx....") == "----T---"


def test_nothing_to_give_back_before_any_work() -> None:
    assert polls(IdleClock(), "......") == "------"


def test_pauses_between_bursts_stretch_the_wait() -> None:
    """A loop that pauses two polls between bursts: after the first pause (which trims once,
    as nothing was known yet) the host waits twice the longest pause and trims no more while
    the rhythm holds; when work stops, it trims after that wait."""
    clock = IdleClock()
    assert polls(clock, "x..x") == "-T--"
    assert clock.wait() == 4
    assert polls(clock, "..x..x..x..x") == "------------"
    assert polls(clock, "....") == "---T"


def test_the_wait_is_capped_and_forgets_old_pauses() -> None:
    clock = IdleClock(remembered=2)
    polls(clock, "x" + "." * 100 + "x")  # a long rest
    assert clock.wait() == MAX_POLLS
    polls(clock, "xx.xx.x")  # two short pauses push it out of memory
    assert clock.wait() == 2


def test_short_of_memory_the_heap_goes_back_after_one_idle_poll() -> None:
    """Whatever the rhythm, when memory is short the next idle poll trims."""
    clock = IdleClock()
    polls(clock, "x..x..x")
    assert clock.wait() == 4
    assert clock.poll(False, short_of_memory=lambda: True) is True
    assert clock.poll(False, short_of_memory=lambda: True) is False  # once per idle stretch


def test_available_share_reads_the_cgroup_limit_then_the_machine(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    300 kB\n")
    assert available_share(tmp_path) == 0.3
    cgroup = tmp_path / "sys/fs/cgroup"
    (cgroup / "memory").mkdir(parents=True)
    # cgroup v1 without a limit (a huge number), then with one below the machine's memory
    (cgroup / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")
    (cgroup / "memory/memory.usage_in_bytes").write_text("500000\n")
    assert available_share(tmp_path) == 0.3
    (cgroup / "memory/memory.limit_in_bytes").write_text("800000\n")
    assert available_share(tmp_path) == pytest.approx(1 - 500_000 / 800_000)
    # cgroup v2 comes first: "max" is no limit (then v1's), a number is one
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("900\n")
    assert available_share(tmp_path) == pytest.approx(1 - 500_000 / 800_000)
    (cgroup / "memory.max").write_text("1000\n")
    assert available_share(tmp_path) == pytest.approx(0.1)
    (cgroup / "memory.current").write_text("1200\n")  # over the limit (reclaim lags)
    assert available_share(tmp_path) == 0.0
    assert available_share(tmp_path / "nowhere") is None


def test_this_machine_reports_a_share() -> None:
    share = available_share()
    assert share is not None and 0.0 <= share <= 1.0


def test_memory_is_asked_only_when_its_answer_decides() -> None:
    """Idle with nothing to give back, or past the rhythm's wait: no reading of memory."""
    asked = []

    def short() -> bool:
        asked.append(1)
        return False

    idle = IdleClock()
    for _ in range(5):
        idle.poll(False, short)  # no work yet: nothing to give back
    assert asked == []
    clock = IdleClock()
    clock.poll(True, short)
    assert clock.poll(False, short) is True  # the wait (one poll) ran out: not asked
    assert asked == []
    clock.pauses.append(3)
    clock.poll(True, short)
    assert clock.poll(False, short) is False  # within the wait: asked
    assert asked == [1]
