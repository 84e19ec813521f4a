"""One worker thread per device, fed by a FIFO queue.

Torch work for a device runs on this thread, so the event loop never blocks on a large step and
operations on a session apply in the order they were submitted. Results come back to the event
loop through futures (torch releases the GIL inside its kernels). A job its caller marks small
(``run(..., inline=True)``: a step of a small session) runs on the caller's own thread instead
when the device is the CPU and nothing is queued or running here: it would hold the GIL for
most of its (short) run anyway, and the hop to this thread and back (two thread switches and a
wake-up of the event loop) cost ~0.1-0.2 ms of a 1 ms SGD step at 1e3 parameters on a 2-core
machine (``benchmarks/ab.py``; no change measured with Adam).

Torch's intra-op thread count (``torch_threads``) is per OS thread under OpenMP, torch's CPU
backend here: a thread that never set it runs torch work on a pool of torch's default size, and
that pool's threads spin at a barrier after each parallel region, on a core the event loop or a
same-host client needs. Every thread that runs torch work for a device sets it first
(:meth:`DeviceWorker.pin_threads`): the worker thread, the event loop's thread (inline jobs and
the request path's tensor work) and LBFGS's step thread. Before the event loop's thread did, a
1e3-parameter Adam step over HTTP on 2 cores cost 0.89 ms of CPU on such a spinning thread
(``benchmarks/peers.py``'s CPU table) and took 1.1-1.9 ms instead of 0.76
(``benchmarks/ab.py --trees T T --n 1e3``, each tree against itself).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from app.after_answer import later

log = logging.getLogger("optserve.worker")
T = TypeVar("T")
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]", str, float]
# Called on the worker thread after each job: (operation, seconds queued, seconds running).
Observer = Callable[[str, float, float], None]
#: ``later``: the work :func:`after_job` deferred, on a worker thread while a job runs there
_job = threading.local()


def after_job(fn: Callable[[], None]) -> bool:
    """Run ``fn`` on this device worker's thread right after the job now running there has
    handed its result to its caller, before the next job (nothing else runs on the device in
    between): work that the caller need not wait for. Its errors are logged, not raised. False,
    and nothing is kept, when no job runs on this thread (an inline job runs on the event
    loop's thread, whose caller would wait for it): the caller then does without."""
    later: list[Callable[[], None]] | None = getattr(_job, "later", None)
    if later is None:
        return False
    later.append(fn)
    return True


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _hand_over(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any,
               error: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, result, error)
    except RuntimeError:  # the loop has closed; nobody is waiting
        log.debug("result dropped: event loop closed")


class DeviceWorker:
    def __init__(
        self, device: torch.device, torch_threads: int = 0, observer: Observer | None = None
    ) -> None:
        self.device = device
        self.observer = observer
        self.torch_threads = torch_threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"optserve-{device}", daemon=True)
        self._started = threading.Event()
        #: jobs submitted so far (idle detection)
        self.jobs = 0
        #: held while a job runs, here or inline; ``_finished`` is written only under it (by
        #: this thread), ``_submitted`` only under ``_counting``: equal while nothing is queued
        #: or running
        self._running = threading.Lock()
        self._counting = threading.Lock()
        self._submitted = 0
        self._finished = 0
        self._inline_ok = device.type == "cpu"

    def start(self) -> None:
        """Start the worker thread; the calling thread is pinned too: the event loop's, where
        inline jobs run (:meth:`run`)."""
        self.pin_threads()
        self._thread.start()
        self._started.wait(timeout=30)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)

    def alive(self) -> bool:
        return self._thread.is_alive()

    async def run(self, fn: Callable[[], T], op: str = "other", inline: bool = False) -> T:
        """Run ``fn`` on the worker thread, after everything submitted before it. ``inline``:
        the caller knows ``fn`` is short CPU work without I/O or waits: on a CPU device with
        nothing queued or running, it runs here and now (see the module's docstring)."""
        if not self._thread.is_alive():
            raise RuntimeError("device worker is not running")
        self.jobs += 1
        if inline and self._inline_ok and self._running.acquire(blocking=False):
            try:
                if self._submitted == self._finished:
                    started = time.perf_counter()
                    try:
                        return fn()
                    finally:
                        # (counted after the answer: the loop's next turn)
                        later(self._observe, op, 0.0, time.perf_counter() - started)
            finally:
                self._running.release()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._counting:
            self._submitted += 1
        self._queue.put((fn, loop, fut, op, time.perf_counter()))
        return await fut

    def pin_threads(self) -> None:
        """Give the calling thread ``torch_threads`` intra-op threads (nothing when it is 0,
        torch's default). Called once by each thread that runs torch work for the device."""
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)

    def _observe(self, op: str, queued_s: float, run_s: float) -> None:
        if self.observer is not None:
            try:
                self.observer(op, queued_s, run_s)
            except Exception:  # metrics must never break a step
                log.exception("worker observer failed")

    def _run(self) -> None:
        self.pin_threads()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._started.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, loop, fut, op, submitted = job
            result: Any = None
            error: BaseException | None = None
            later: list[Callable[[], None]] = []
            with self._running:
                started = time.perf_counter()
                _job.later = later
                try:
                    result = fn()
                except BaseException as exc:  # handed to the awaiting coroutine
                    error = exc
                finally:
                    _job.later = None
                ran = time.perf_counter() - started
                if later:  # the answer first, then the deferred work, still as this job
                    _hand_over(loop, fut, result, error)
                    for deferred in later:
                        try:
                            deferred()
                        except BaseException:  # noqa: BLE001 - nobody waits for it
                            log.exception("work deferred after a %s job failed", op)
                    # (the last deferred work holds its session, whole: a session deleted
                    # since was kept until another job deferred something)
                    del deferred
                self._finished += 1
            self._observe(op, started - submitted, ran)
            if not later:
                _hand_over(loop, fut, result, error)
            # Let go of the job now, not when the next one arrives: what only it still holds
            # (the future with the answer, a step's gradient views and plan: thousands of
            # tensors for a session of many small ones) is then freed by the event loop once
            # the answer is out, not here at the start of the next job, on its critical path
            # (1,000 x 4: 0.17 ms per step; 1e3: 0.015 ms).
            job = fn = fut = result = error = later = None  # type: ignore[assignment]
