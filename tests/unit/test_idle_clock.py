"""When an idle host gives its heap back (``app.engine.idle``)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.engine.idle import MAX_POLLS, IdleClock, available, available_share, short_of_memory


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


def _meminfo(root: Path, total_kb: int, available_kb: int) -> None:
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal: {total_kb} kB\nMemFree: 1 kB\nMemAvailable: {available_kb} kB\n")


def test_short_of_memory_when_the_heap_keeps_a_sixteenth_of_what_is_available(
        tmp_path: Path) -> None:
    """Short: the heap's free bytes are more than 1/16 of the memory available, the machine's
    or, with a limit below it, the container's; not a share of the machine being in use."""
    mb = 1 << 20
    _meminfo(tmp_path, 24 << 20, 7 << 20)  # 24 GB, 7 GB available (29%)
    assert available(tmp_path) == (7 << 30, 24 << 30)
    assert not short_of_memory(lambda: 200 * mb, tmp_path)  # a 1e7 Adam step's blocks
    assert short_of_memory(lambda: 500 * mb, tmp_path)  # more than 7 GB / 16
    _meminfo(tmp_path, 24 << 20, 1 << 20)  # 1 GB available
    assert short_of_memory(lambda: 200 * mb, tmp_path)
    assert not short_of_memory(lambda: 0, tmp_path)  # nothing to give back
    # a container's limit: 2 GB, 1.5 GB used
    cgroup = tmp_path / "sys/fs/cgroup"
    cgroup.mkdir(parents=True)
    _meminfo(tmp_path, 24 << 20, 20 << 20)
    (cgroup / "memory.max").write_text(f"{2 << 30}\n")
    (cgroup / "memory.current").write_text(f"{3 << 29}\n")
    assert available(tmp_path) == (1 << 29, 2 << 30)
    assert short_of_memory(lambda: 40 * mb, tmp_path)  # > 512 MB / 16
    assert not short_of_memory(lambda: 20 * mb, tmp_path)
    # where the heap cannot be read: less than half available
    assert short_of_memory(lambda: None, tmp_path)
    (cgroup / "memory.current").write_text(f"{1 << 29}\n")
    assert not short_of_memory(lambda: None, tmp_path)
    # where memory cannot be read: never short
    assert not short_of_memory(lambda: 1 << 40, tmp_path / "nowhere")


def test_the_heap_reports_what_it_keeps_free() -> None:
    """``heap_free_bytes``, in a child process tuned as the server is: a freed 100 MB block is
    kept (and counted) until ``release_memory`` gives it back."""
    code = (
        "from app.runtime import heap_free_bytes, release_memory, tune_allocator\n"
        "tune_allocator()\n"
        "block = bytearray(100_000_000)\n"
        "before = heap_free_bytes()\n"
        "del block\n"
        "kept = heap_free_bytes()\n"
        "release_memory()\n"
        "print(before, kept, heap_free_bytes())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    before, kept, after = (int(x) for x in out.stdout.split())
    assert kept >= 100_000_000 > 10_000_000 > before
    assert after < 10_000_000


def test_asks_says_beforehand_whether_poll_will_ask() -> None:
    """``asks(active)`` is True exactly when the next ``poll(active, ...)`` calls its
    ``short_of_memory`` (the host finds the answer off the event loop first)."""
    rng = random.Random(7)
    clock = IdleClock()
    for _ in range(2000):
        active = rng.random() < 0.3
        predicted = clock.asks(active)
        asked: list[int] = []
        short = rng.random() < 0.2

        def answer(short: bool = short, asked: list[int] = asked) -> bool:
            asked.append(1)
            return short
        clock.poll(active, answer)
        assert predicted == bool(asked)


class _PatientClock(IdleClock):
    def wait(self) -> int:
        return 10**6


def test_the_host_asks_about_memory_off_the_event_loop_and_trims_when_short(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle host waits for its rhythm unless memory is short: the question (it reads
    ``/proc/self/smaps``, milliseconds) is answered on an I/O thread, not on the event loop's,
    at each idle poll, and a short answer trims at the next one."""
    import asyncio

    import torch

    from app.engine import CreateSpec, GroupSpec, embedded_engine
    from app.engine import host as host_module

    asked: list[str] = []
    trims: list[float] = []
    short = {"now": False}

    def question() -> bool:
        asked.append(threading.current_thread().name)
        return short["now"]
    monkeypatch.setattr(host_module, "POLL_S", 0.05)
    # a rhythm that never runs out here (it is tested above): only a short answer trims
    monkeypatch.setattr(host_module, "IdleClock", _PatientClock)
    monkeypatch.setattr(host_module, "short_of_memory", question)
    monkeypatch.setattr(host_module, "_at_rest", lambda: trims.append(time.monotonic()))

    async def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def main() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"w": torch.zeros(4)}, {})],
                                        options={"lr": 0.1}, id="s"))
            g = {"w": torch.ones(4)}
            await eng.step("s", g, return_params=False)
            await until(lambda: len(asked) >= 3)  # asked at each idle poll: not short,
            assert not trims  # nothing given back
            short["now"] = True
            await until(lambda: bool(trims))  # short: given back at the next idle poll
        finally:
            await eng.stop()

    asyncio.run(main())
    loop_thread = threading.current_thread().name
    assert asked and all(name != loop_thread and name.startswith("optserve-io")
                         for name in asked)
