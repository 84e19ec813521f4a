"""The device worker: jobs run in the order submitted; a job marked ``inline`` runs on the
caller's thread only when the device is the CPU and nothing is queued or running, and never
at the same time as a job on the worker thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from app.engine.interface import Engine
from app.engine.worker import DeviceWorker, after_job

T = TypeVar("T")


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    w = DeviceWorker(torch.device("cpu"))
    w.start()
    yield w
    w.stop()


def test_an_inline_job_runs_here_when_the_worker_is_idle(worker: DeviceWorker) -> None:
    async def main() -> tuple[int, int]:
        here = await worker.run(threading.get_ident, inline=True)
        there = await worker.run(threading.get_ident)
        return here, there

    here, there = asyncio.run(main())
    assert here == threading.get_ident()
    assert there == worker._thread.ident


def test_an_inline_job_waits_its_turn_behind_queued_work(worker: DeviceWorker) -> None:
    """While a job runs on the worker, an inline job is queued behind it (not run beside it):
    the order of submission is the order of execution, and no two jobs overlap."""
    order: list[str] = []
    running = threading.Event()
    release = threading.Event()
    overlap: list[str] = []
    active = threading.Lock()

    def job(name: str, hold: bool = False) -> str:
        if not active.acquire(blocking=False):
            overlap.append(name)
            return threading.current_thread().name
        try:
            order.append(name)
            if hold:
                running.set()
                release.wait(10)
            return threading.current_thread().name
        finally:
            active.release()

    async def main() -> list[str]:
        first = asyncio.ensure_future(worker.run(lambda: job("first", hold=True)))
        while not running.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(worker.run(lambda: job("queued")))
        second = asyncio.ensure_future(worker.run(lambda: job("inline"), inline=True))
        await asyncio.sleep(0.05)
        release.set()
        return list(await asyncio.gather(first, queued, second))

    threads = asyncio.run(main())
    assert order == ["first", "queued", "inline"]
    assert overlap == []
    assert threads == [worker._thread.name] * 3


def test_an_inline_job_excludes_the_worker_thread(worker: DeviceWorker) -> None:
    """A job submitted from another thread while an inline job runs waits for it."""
    log: list[str] = []
    started = threading.Event()

    def inline_job() -> None:
        log.append("inline start")
        started.set()
        time.sleep(0.2)
        log.append("inline end")

    def submit_other() -> None:
        started.wait(5)

        async def other() -> None:
            await worker.run(lambda: log.append("other"))
        asyncio.run(other())

    t = threading.Thread(target=submit_other)
    t.start()

    async def main() -> None:
        await worker.run(inline_job, inline=True)

    asyncio.run(main())
    t.join(10)
    assert log == ["inline start", "inline end", "other"]


def test_inline_failures_propagate_and_leave_the_worker_usable(worker: DeviceWorker) -> None:
    def boom() -> None:
        raise ValueError("refused")

    async def main() -> int:
        with pytest.raises(ValueError, match="refused"):
            await worker.run(boom, inline=True)
        with pytest.raises(ValueError, match="refused"):
            await worker.run(boom)
        return await worker.run(lambda: 7, inline=True) + await worker.run(lambda: 1)

    assert asyncio.run(main()) == 8


def test_a_non_cpu_device_never_runs_inline() -> None:
    w = DeviceWorker(torch.device("meta"))
    w.start()
    try:
        async def main() -> int:
            return await w.run(threading.get_ident, inline=True)
        assert asyncio.run(main()) == w._thread.ident
    finally:
        w.stop()


def _in_new_thread(fn: Callable[[], T]) -> T:
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(timeout=60)
    return out[0]


def test_every_thread_that_runs_torch_work_uses_torch_threads() -> None:
    """``torch_threads`` reaches the event loop's thread (inline jobs and the request path's
    tensor work run there) and the worker thread, not only the latter: torch's thread count is
    per OS thread under OpenMP (a thread takes the last count set anywhere when it first runs
    torch work, and keeps it), and a thread left at the default spins a pool of its own (found
    as 0.89 ms of CPU per 1e3 step on a thread nobody had pinned). The worker asks for one
    thread more than the threads here start with."""
    fresh = _in_new_thread(torch.get_num_threads)
    want = fresh + 1

    def serve() -> tuple[int, int, int, int, int]:
        async def main() -> tuple[int, int, int, int, int]:
            before = torch.get_num_threads()  # this thread's count is now set, as a server's
            w = DeviceWorker(torch.device("cpu"), want)
            w.start()
            try:
                loop_thread = torch.get_num_threads()
                inline = await w.run(torch.get_num_threads, inline=True)
                queued = await w.run(torch.get_num_threads)
                return before, loop_thread, inline, queued, await w.run(_pinned_elsewhere(w))
            finally:
                w.stop()
        return asyncio.run(main())

    assert _in_new_thread(serve) == (fresh, want, want, want, want)


def _pinned_elsewhere(w: DeviceWorker) -> Callable[[], int]:
    """Another thread of the host's own (LBFGS's step thread), its count set to another value
    first, then pinned."""
    def other() -> int:
        torch.set_num_threads(w.torch_threads + 1)
        w.pin_threads()
        return torch.get_num_threads()
    return lambda: _in_new_thread(other)


def test_a_worker_with_torch_threads_0_leaves_threads_alone() -> None:
    def here() -> tuple[int, int]:
        before = torch.get_num_threads()
        DeviceWorker(torch.device("cpu")).pin_threads()
        return before, torch.get_num_threads()

    before, after = _in_new_thread(here)
    assert after == before


def test_work_deferred_after_a_job_runs_after_its_answer_and_before_the_next_job(
        worker: DeviceWorker, caplog: pytest.LogCaptureFixture) -> None:
    """``after_job``: the caller gets the job's result without waiting for the deferred work;
    that work runs on the worker thread before the next job (and before an inline job could
    run beside it); its errors are logged, not raised. An inline job cannot defer."""
    events: list[str] = []
    release = threading.Event()

    def deferred() -> None:
        release.wait(timeout=30)  # held until the caller has its answer
        events.append("deferred")

    def job() -> str:
        assert after_job(deferred)
        assert after_job(lambda: 1 / 0)  # type: ignore[arg-type, return-value]
        events.append("job")
        return "answer"

    async def main() -> tuple[str, bool]:
        answer = await worker.run(job)
        events.append("caller has the answer")
        release.set()
        await worker.run(lambda: events.append("next job"), inline=True)
        inline_deferred = await worker.run(lambda: after_job(lambda: None), inline=True)
        return answer, inline_deferred

    answer, inline_deferred = asyncio.run(main())
    assert answer == "answer"
    assert events == ["job", "caller has the answer", "deferred", "next job"]
    assert inline_deferred is False
    assert any("deferred after" in r.message for r in caplog.records)


def test_the_worker_lets_go_of_the_work_it_deferred_once_that_ran(worker: DeviceWorker) -> None:
    """Deferred work (a step's norms for its next step, which holds the session it steps) is
    let go as soon as it ran, as the job itself is: the worker thread kept the last deferred
    function until another job deferred something, and with it a deleted session, whole
    (its parameters and optimizer state), however large."""
    import gc
    import weakref

    class Held:
        pass

    held = [Held()]
    gone = weakref.ref(held[0])

    def job(kept: Held) -> None:
        assert after_job(lambda: kept.__class__)

    async def main() -> None:
        await worker.run(lambda: job(held[0]))
        await worker.run(lambda: None)  # (the deferred work has run: the worker is idle after)

    asyncio.run(main())
    held.clear()
    deadline = time.monotonic() + 30
    while gone() is not None and time.monotonic() < deadline:  # (only a hang is timed)
        gc.collect()
        time.sleep(0.05)
    assert gone() is None


def _tensors_of_shape(shape: tuple[int, ...]) -> int:
    """The tensors of ``shape`` in this process (a test's session takes a shape no other
    tensor of the tests has)."""
    import gc
    return sum(1 for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and tuple(o.shape) == shape)


async def _made_and_stepped(eng: Engine, n: int, shape: tuple[int, ...]) -> str:
    """A session of ``n`` Adam parameters of ``shape`` stepped once (its state made): its id."""
    from app.engine.interface import CreateSpec, GroupSpec
    info = await eng.create(CreateSpec(
        "Adam", [GroupSpec({f"p{i}": torch.zeros(shape) for i in range(n)})], {"lr": 1e-3}))
    await eng.step(info.id, {f"p{i}": torch.ones(shape) for i in range(n)},
                   return_params=False)
    return info.id


def test_a_deleted_sessions_tensors_are_freed_once_its_delete_is_answered(
        tmp_path: Path) -> None:
    """A session of many parameters (stepped on the worker thread, its norms for the next
    step deferred) deleted: none of its tensors stays in the server's memory."""
    import gc

    from app.engine import embedded_engine

    n, shape = 2000, (3, 1, 7)  # (a shape no other tensor of the test has)

    def left() -> int:
        gc.collect()
        return _tensors_of_shape(shape)

    async def main() -> None:
        before = left()  # (tests run before it in this process may have left some)
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="memory", warm_up=False)
        await eng.start()
        try:
            sid = await _made_and_stepped(eng, n, shape)
            assert left() >= before + 3 * n  # (parameters, exp_avg, exp_avg_sq)
            await eng.delete(sid)
            deadline = time.monotonic() + 30  # (only a hang is timed)
            while left() > before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert left() <= before
        finally:
            await eng.stop()
    asyncio.run(main())


def test_a_deleted_session_of_many_parameters_is_freed_on_the_device_worker(
        tmp_path: Path) -> None:
    """Freeing a session of many parameters (each with its optimizer state) takes long (0.7 s at
    100,000 Adam parameters): a delete lets go of it on the device worker's thread, not on the
    event loop's, where every other request would wait as long; its tensors are gone when the
    delete is answered, and the next step of another session is torch's."""
    import gc
    import weakref

    from app.engine import embedded_engine
    from app.engine.interface import CreateSpec, GroupSpec
    from app.engine.session import Session

    n, shape = 1500, (2, 1, 9)  # (a shape no other tensor of the test has)

    async def main() -> list[str]:
        freed_on: list[str] = []
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="memory", warm_up=False)
        await eng.start()
        try:
            sid = await _made_and_stepped(eng, n, shape)
            other = await eng.create(CreateSpec("Adam", [GroupSpec({"w": torch.zeros(3)})],
                                                {"lr": 0.1}))
            gc.collect()
            before = _tensors_of_shape(shape)
            assert before >= 3 * n  # (parameters, exp_avg, exp_avg_sq)
            found = [o for o in gc.get_objects() if type(o) is Session and o.id == sid]
            assert len(found) == 1
            weakref.finalize(found[0], lambda: freed_on.append(threading.current_thread().name))
            del found
            await eng.delete(sid)
            assert freed_on == [f"optserve-{torch.device('cpu')}"]
            assert _tensors_of_shape(shape) <= before - 3 * n  # (freed, no collection needed)
            got = await eng.step(other.id, {"w": torch.tensor([1.0, -2.0, 0.5])},
                                 return_params=True)
            w = torch.zeros(3, requires_grad=True)
            opt = torch.optim.Adam([w], lr=0.1)
            w.grad = torch.tensor([1.0, -2.0, 0.5])
            opt.step()
            assert got.params is not None and torch.equal(got.params["w"], w.detach())
        finally:
            await eng.stop()
        return freed_on
    asyncio.run(main())
