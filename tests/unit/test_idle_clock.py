"""When an idle host gives its heap back (``app.engine.idle.IdleClock``)."""

from __future__ import annotations

from app.engine.idle import MAX_POLLS, IdleClock


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
