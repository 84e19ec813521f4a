"""``app.after_answer.later``: on the event loop's next turn, in the order asked, before the
loop serves anything that arrives later; at once on a thread without a running loop."""

from __future__ import annotations

import asyncio
import threading

from app.after_answer import later


def test_without_a_running_loop_it_runs_now() -> None:
    ran: list[int] = []
    later(ran.append, 1)
    assert ran == [1]
    thread = threading.Thread(target=later, args=(ran.append, 2))
    thread.start()
    thread.join()
    assert ran == [1, 2]


def test_in_a_loop_it_runs_once_the_task_lets_go_in_order_before_later_work() -> None:
    ran: list[str] = []

    async def answer() -> None:
        later(ran.append, "counted 1")
        later(ran.append, "counted 2")
        ran.append("answered")  # (the task goes on to its answer before either runs)

    async def main() -> None:
        await answer()
        assert ran == ["answered"]
        next_request = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(next_request.set_result, None)
        await next_request
        ran.append("next request")

    asyncio.run(main())
    assert ran == ["answered", "counted 1", "counted 2", "next request"]
