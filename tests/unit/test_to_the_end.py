"""``host._to_the_end``: an operation starts at once and runs to its end even when its caller
gives up. One that never waits ends on the caller's turn (no task); one that waits goes on as
a task of its own from its first wait, through futures, bare yields, results and exceptions,
and a cancelled caller gets CancelledError while the operation finishes alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.engine import host


def test_an_operation_that_never_waits_ends_on_the_callers_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    real = asyncio.ensure_future
    monkeypatch.setattr(host.asyncio, "ensure_future",
                        lambda *a, **k: made.append(a) or real(*a, **k))

    async def quick() -> int:
        return 7

    async def failing() -> int:
        raise KeyError("gone")

    async def go() -> None:
        assert await host._to_the_end(quick()) == 7
        with pytest.raises(KeyError, match="gone"):
            await host._to_the_end(failing())
    asyncio.run(go())
    assert made == []


def test_an_operation_that_waits_goes_on_as_a_task_with_its_results_and_errors() -> None:
    async def waits(fail: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        seen = []
        for i in range(3):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, i)
            seen.append(await fut)
            await asyncio.sleep(0)  # a bare yield
        try:
            fut = loop.create_future()
            loop.call_soon(fut.set_exception, ValueError("inner"))
            await fut
        except ValueError:
            seen.append(-1)
        if fail:
            raise RuntimeError("after waiting")
        return seen

    async def go() -> None:
        assert await host._to_the_end(waits(False)) == [0, 1, 2, -1]
        with pytest.raises(RuntimeError, match="after waiting"):
            await host._to_the_end(waits(True))
    asyncio.run(go())


def test_a_caller_that_gives_up_leaves_the_operation_running_to_its_end() -> None:
    steps: list[str] = []

    async def go() -> None:
        gate = asyncio.Event()

        async def operation() -> str:
            steps.append("started")  # on the caller's turn
            await gate.wait()
            steps.append("applied")
            await asyncio.sleep(0)
            steps.append("logged")
            return "done"

        caller = asyncio.ensure_future(host._to_the_end(operation()))
        await asyncio.sleep(0)
        assert steps == ["started"]
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert steps == ["started", "applied", "logged"]
    asyncio.run(go())


@pytest.mark.parametrize("when", ["before its first step", "while it waits"])
def test_the_operations_own_cancellation_reaches_its_wait(when: str) -> None:
    """At shutdown the operation's task itself may be cancelled, even before that task's first
    step: the CancelledError is thrown in at the operation's ``await`` (where it already
    waits), which may clean up and end."""
    seen: list[str] = []

    async def go() -> None:
        started = asyncio.Event()

        async def operation() -> str:
            try:
                started.set()
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.append("cancelled at its wait")
                await asyncio.sleep(0)  # cleaning up still works
                seen.append("cleaned up")
                raise
            return "never"

        caller = asyncio.ensure_future(host._to_the_end(operation()))
        await started.wait()
        if when == "while it waits":
            for _ in range(3):
                await asyncio.sleep(0)
        tasks = [t for t in asyncio.all_tasks() if t is not caller
                 and t is not asyncio.current_task()]
        assert len(tasks) == 1  # the rest of the operation
        tasks[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    asyncio.run(go())
    assert seen == ["cancelled at its wait", "cleaned up"]


def test_finished_first_lets_a_cancellation_through_only_after_the_work() -> None:
    """``host._finished_first``: a caller cancelled (even twice) while work on another thread
    runs gets its CancelledError only once that work has ended."""
    import time

    ended: list[str] = []

    def work() -> int:
        time.sleep(0.2)
        ended.append("work")
        return 5

    async def go() -> None:
        loop = asyncio.get_running_loop()
        assert await host._finished_first(loop.run_in_executor(None, work)) == 5

        async def caller() -> None:
            try:
                await host._finished_first(loop.run_in_executor(None, work))
            finally:
                ended.append("caller")
        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(go())
    assert ended == ["work", "work", "caller"]
