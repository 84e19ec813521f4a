"""``app.api.body_memory``: the count of request-body bytes held against
``OPTSERVE_MAX_BODIES_MB``, first come first served, and its default."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from app.api.body_memory import BodyMemory, bound
from app.config import Settings


def test_the_bound_is_a_setting_with_a_default_never_under_one_largest_body(
        tmp_path: Path) -> None:
    assert Settings().max_bodies_mb == 0
    assert Settings(max_bodies_mb=7).max_bodies_mb == 7
    with pytest.raises(ValueError, match="max_bodies_mb"):
        Settings(max_bodies_mb=-1)
    assert bound(7, 1 << 20, tmp_path) == 7 << 20
    assert bound(1, 5 << 20, tmp_path) == 5 << 20  # (one body of the largest size fits)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 8000 kB\nMemAvailable: 6000 kB\n")
    assert bound(0, 1024, tmp_path) == 4000 * 1024  # half the machine's
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("2048000\n")
    (tmp_path / "sys/fs/cgroup/memory.current").write_text("100\n")
    assert bound(0, 1024, tmp_path) == 1024000  # half the cgroup's
    assert bound(0, 1024, tmp_path / "nothing") == sys.maxsize  # (unreadable: no bound)


def test_bodies_take_their_bytes_in_the_order_they_asked() -> None:
    async def run() -> None:
        memory = BodyMemory(100)
        assert memory.try_take(60)
        order: list[str] = []

        async def body(name: str, n: int, timeout: float | None = None) -> bool:
            got = await memory.wait_take(n, timeout)
            order.append(f"{name}:{got}")
            return got
        big = asyncio.create_task(body("big", 70))
        await asyncio.sleep(0)
        small = asyncio.create_task(body("small", 10))  # fits, but waits behind "big"
        await asyncio.sleep(0)
        assert memory.waiting == 2 and memory.held == 60
        assert not memory.try_take(1)  # (nor may anything pass the queue...)
        assert memory.try_take(1, first=True)  # (...but more for a body being read)
        memory.give(1)
        assert memory.held == 60 and memory.waiting == 2
        memory.give(60)  # both fit now: taken in order
        assert await big and await small
        assert order == ["big:True", "small:True"] and memory.held == 80
        assert memory.waiting == 0

        # one that never fits in time gives up (False), and lets the one behind it in
        late = asyncio.create_task(body("late", 50, timeout=0.05))
        await asyncio.sleep(0)
        behind = asyncio.create_task(body("behind", 20))
        await asyncio.sleep(0)
        assert not await late
        assert await behind and memory.held == 100 and memory.waiting == 0

        # a waiting body whose request is cancelled (its client gone) takes nothing
        gone = asyncio.create_task(body("gone", 30))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert memory.waiting == 0 and memory.held == 100
        memory.give(100)
        assert memory.held == 0 and memory.try_take(100)
    asyncio.run(run())


def test_a_wait_that_ends_as_room_is_made_keeps_what_it_took() -> None:
    async def run() -> None:
        memory = BodyMemory(10)
        assert memory.try_take(10)
        waiting = asyncio.create_task(memory.wait_take(5, None))
        await asyncio.sleep(0)
        memory.give(10)  # taken for it on the spot...
        waiting.cancel()  # ...and its request cancelled before it ran again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert memory.held == 0  # (given back, not leaked)
    asyncio.run(run())
