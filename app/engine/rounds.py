"""Synchronous rounds of a parameter-server session, kept by the session's host.

Each worker's push is checked against the session, then waits in the open round; when K
distinct workers have pushed (or the timeout applies the partial round), the host reduces the
pushes (:func:`app.engine.ps.reduce`) and applies ONE ``step`` operation with the reduced
gradients; every waiter gets its result. Rounds live where the session lives (not in an HTTP
front), so workers of one round may talk to different fronts. Rounds are not persisted: a round
open at a crash was never acknowledged, and its workers' retries (same idempotency keys) form
the next one. A retry of a push still in flight (being checked, waiting in its round, or in the
round's step) gets that push's answer; once answered, the session's idempotency table has it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine import ps
from app.engine.interface import IdemKey, StepResult, Tensors
from app.errors import Conflict, Invalid, OptserveError


@dataclass(eq=False)
class Round:
    """Pushes gathered for the next synchronous step, and the requests waiting for it."""

    pushes: dict[str, Tensors] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future[StepResult]] = field(default_factory=dict)
    keys: dict[str, IdemKey] = field(default_factory=dict)  # worker -> its idempotency key
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)  # worker -> its scalars
    reserved: set[str] = field(default_factory=set)  # pushes being checked
    want_params: bool = False
    timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def fail(self, exc: BaseException) -> None:
        self.cancel_timer()
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(exc)

    def settle(self, result: StepResult) -> None:
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_result(result)


#: applies a closed round on the device: (session key, the pushes by worker, how to reduce
#: them, the workers' idempotency keys, want params, the round's ``sync`` answer, the
#: workers' client scalars)
ApplyRound = Callable[[str, dict[str, Tensors], ps.Reduce, list[IdemKey], bool,
                       dict[str, Any], dict[str, dict[str, float]]], Awaitable[StepResult]]
#: checks one push against the session: (key, grads, base version, the views a same-host
#: binding takes the answer in) -> grads on the device
CheckPush = Callable[[str, Tensors, int | None, Tensors | None], Awaitable[Tensors]]


class SyncRounds:
    """The open rounds of every sync session of one host."""

    def __init__(self, apply_round: ApplyRound, check_push: CheckPush) -> None:
        self._apply_round = apply_round
        self._check_push = check_push
        self._configs: dict[str, ps.SyncConfig] = {}
        self._rounds: dict[str, Round] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: pushes with an idempotency key, from their arrival until their round's step is
        #: answered (after that the session's idempotency table answers a retry)
        self._in_flight: dict[tuple[str, str], tuple[IdemKey, asyncio.Future[StepResult]]] = {}

    def config(self, key: str) -> ps.SyncConfig | None:
        return self._configs.get(key)

    def pending(self, key: str) -> list[str] | None:
        if key not in self._configs:
            return None
        rnd = self._rounds.get(key)
        return sorted(rnd.pushes) if rnd else []

    def set(self, key: str, config: ps.SyncConfig | None) -> None:
        """Take a session's sync configuration (create, restore, configure)."""
        if config is None:
            was = self._configs.pop(key, None)
            rnd = self._rounds.get(key)
            if was is not None and rnd is not None and rnd.pushes:
                # sync turned off: nothing lost, reduced as the round was configured
                self._close(key, was, partial=True)
            return
        self._configs[key] = config
        rnd = self._rounds.get(key)
        if rnd is not None and len(rnd.pushes) >= config.workers:
            self._close(key, config, partial=False)  # K lowered: the round is complete

    def drop(self, key: str, exc: OptserveError) -> None:
        """The session is gone: fail its open round."""
        self._configs.pop(key, None)
        rnd = self._rounds.pop(key, None)
        if rnd is not None:
            rnd.fail(exc)

    async def stop(self) -> None:
        for rnd in self._rounds.values():
            rnd.fail(Conflict("the server is shutting down; this round's gradients were "
                              "discarded", code="round_aborted"))
        self._rounds.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def push(self, key: str, worker: str | None, grads: Tensors, base_version: int | None,
                   idem: IdemKey | None, want_params: bool,
                   scalars: dict[str, float] | None = None,
                   room: Tensors | None = None) -> StepResult:
        """This worker's push into the open round; waits for the round's step. ``room``: the
        views a same-host binding will take the answer in, checked with the gradients."""
        config = self._configs[key]
        if worker is None:
            raise Invalid("this session steps in synchronous rounds: name the worker in the "
                          "X-Optserve-Worker header", code="missing_worker",
                          field="X-Optserve-Worker")
        pending = self._in_flight.get((key, idem.key)) if idem is not None else None
        if pending is not None:
            if pending[0] != idem:
                raise Invalid("this Idempotency-Key was already used for a different request; "
                              "use a fresh key for every new operation",
                              code="idempotency_key_reused", field="Idempotency-Key")
            # a retry of a push still being checked, waiting in its round or being stepped:
            # the same answer (or error) as the push itself
            return _for(await asyncio.shield(pending[1]), want_params)
        rnd = self._rounds.setdefault(key, Round())
        if worker in rnd.pushes or worker in rnd.reserved:
            raise Conflict(f"worker {worker!r} already pushed to this round; wait for its step",
                           code="duplicate_push", field="X-Optserve-Worker", worker=worker)
        waiter: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        if idem is not None:
            self._in_flight[(key, idem.key)] = (idem, waiter)
            waiter.add_done_callback(lambda done: self._landed(key, idem.key, done))
        else:
            waiter.add_done_callback(_retrieved)
        try:
            rnd.reserved.add(worker)
            try:
                checked = await self._check_push(key, grads, base_version, room)
            finally:
                rnd.reserved.discard(worker)
            config = self._configs.get(key) or config
            if key not in self._configs:  # sync turned off (or deleted) meanwhile
                raise Conflict("the session left synchronous mode while this push was checked; "
                               "push again", code="round_aborted")
            rnd = self._rounds.setdefault(key, Round())  # the same one unless it closed
            if worker in rnd.pushes:
                raise Conflict(f"worker {worker!r} already pushed to this round; wait for its "
                               "step", code="duplicate_push", field="X-Optserve-Worker",
                               worker=worker)
        except BaseException as exc:
            if isinstance(exc, Exception):
                waiter.set_exception(exc)
            else:
                waiter.cancel()
            raise
        rnd.pushes[worker] = checked
        rnd.waiters[worker] = waiter
        if idem is not None:
            rnd.keys[worker] = idem
        if scalars:
            rnd.scalars[worker] = scalars
        rnd.want_params = rnd.want_params or want_params
        if rnd.timer is None:
            rnd.timer = asyncio.get_running_loop().call_later(
                config.timeout_s, self._timeout, key, rnd)
        if len(rnd.pushes) >= config.workers:
            self._close(key, config, partial=False)
        return _for(await asyncio.shield(waiter), want_params)

    def _landed(self, key: str, idem_key: str, done: asyncio.Future[StepResult]) -> None:
        entry = self._in_flight.get((key, idem_key))
        if entry is not None and entry[1] is done:
            del self._in_flight[(key, idem_key)]
        _retrieved(done)

    def _close(self, key: str, config: ps.SyncConfig, *, partial: bool) -> None:
        """Take the open round out (new pushes start the next one) and step it, reduced as
        ``config`` says (the session's sync options when it closed: after ``sync: null``, the
        ones it was gathered under)."""
        rnd = self._rounds.pop(key)
        rnd.cancel_timer()
        task = asyncio.create_task(self._apply(key, rnd, config, partial))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, key: str, rnd: Round, config: ps.SyncConfig, partial: bool) -> None:
        sync = {"workers": sorted(rnd.pushes), "expected": config.workers, "partial": partial}
        try:
            result = await self._apply_round(key, rnd.pushes, config.reduce,
                                             list(rnd.keys.values()),
                                             rnd.want_params, sync, rnd.scalars)
        except BaseException as exc:
            rnd.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        rnd.settle(result)

    def _timeout(self, key: str, rnd: Round) -> None:
        if self._rounds.get(key) is not rnd:
            return
        rnd.timer = None
        config = self._configs[key]
        if config.on_timeout == "apply_partial":
            self._close(key, config, partial=True)
            return
        del self._rounds[key]
        arrived = sorted(rnd.pushes)
        rnd.fail(Conflict(f"the round timed out after {config.timeout_s:g} s with "
                          f"{len(arrived)} of {config.workers} workers ({', '.join(arrived)}); "
                          "its gradients were discarded (on_timeout: fail)",
                          code="round_timeout", workers=arrived, expected=config.workers,
                          timeout_s=config.timeout_s))


def _retrieved(done: asyncio.Future[StepResult]) -> None:
    """A push's error marked as seen: the push raised it to its own request already, or its
    request is gone; asyncio would log it at collection as "never retrieved"."""
    if not done.cancelled():
        done.exception()


def _for(result: StepResult, want_params: bool) -> StepResult:
    """The round's result as one worker asked for it (with or without the parameters)."""
    if not want_params and result.params is not None:
        return dataclasses.replace(result, params=None)
    return result
