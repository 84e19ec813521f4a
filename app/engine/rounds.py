"""Synchronous rounds of a parameter-server session, kept by the session's host.

Each worker's push is checked against the session, then waits in the open round; when K
distinct workers have pushed (or the timeout applies the partial round), the host reduces the
pushes (:func:`app.engine.ps.reduce`) and applies ONE ``step`` operation with the reduced
gradients; every waiter gets its result. Rounds live where the session lives (not in an HTTP
front), so workers of one round may talk to different fronts. Rounds are not persisted: a round
open at a crash was never acknowledged, and its workers' retries (same idempotency keys) form
the next one; so do those of a round that failed (``round_timeout``, ``round_aborted``): it
changed nothing, and its keys are not recorded (only a discarded push's 409 is, below). A
retry of a push still in flight (being checked, waiting in its round, or in the round's step)
gets that push's answer; once answered, the session's idempotency table has it.

A push is checked only once the rounds closed before it have stepped, and checked again when a
round closes while it is being checked (pushes checked before it filled the round, ``K`` was
lowered, a partial timeout), so every push of a round is checked at the version the round steps
from. An operation that changes the parameters or the
version outside a round (an overwrite, a state import) discards what was gathered at the old
version: :meth:`SyncRounds.seal` holds new pushes back while it runs; if it is applied,
:meth:`SyncRounds.discard` fails every push of the open round, of rounds closed but not yet
stepped, and every push still being checked, each with 409 ``stale_gradient``
(:func:`discarded_push`); the operation's record names their idempotency keys, so a retry gets
the same 409, also after a restart (``Operation.refusals``). Refused, it leaves them alone
(:meth:`SyncRounds.unseal`). ``_apply_round`` checks again, under the session's lock, that the
session is still at the round's version.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine import ps
from app.engine.idempotency import key_reused
from app.engine.interface import IdemKey, StepResult, Tensors
from app.errors import Conflict, Invalid, OptserveError

#: what discarded a round, by the discarding operation's kind
DISCARDED_BY = {"overwrite": "the parameters were overwritten (PUT .../params)",
                "import": "the optimizer state was loaded (PUT .../state_dict)",
                "create": "the session was deleted and made again under its id (POST "
                          "/v1/sessions), its versions continuing the deleted one's"}


def discarded_push(by: str, worker: str, base_version: int, version: int) -> Conflict:
    """The answer of a push whose round an operation of kind ``by`` discarded, leaving the
    session at ``version``: its live answer, and its retries' (the idempotency table keeps it,
    rebuilt by replay from the operation's record)."""
    return Conflict(f"this push's round was discarded: {DISCARDED_BY.get(by, by)} while it "
                    f"was open; the session is at version {version}, and gradients computed "
                    f"at version {base_version} are not applied to it. Pull the parameters "
                    "and push again", code="stale_gradient", field="base_version",
                    current_version=version, base_version=base_version, worker=worker,
                    discarded_by=by)


@dataclass(frozen=True)
class DiscardedPush:
    """A keyed push a discarding operation answers (logged with it)."""

    key: str
    fingerprint: str
    worker: str
    base_version: int

    def to_json(self) -> list[Any]:
        return [self.key, self.fingerprint, self.worker, self.base_version]

    @classmethod
    def from_json(cls, item: Any) -> DiscardedPush:
        key, fingerprint, worker, base = item
        return cls(str(key), str(fingerprint), str(worker), int(base))


@dataclass(eq=False)
class Pending:
    """A push from its arrival until it is in its round (or refused): being checked."""

    worker: str
    idem: IdemKey | None
    base_version: int | None
    waiter: asyncio.Future[StepResult]
    #: set when a discarding operation was applied while it was being checked
    discarded: OptserveError | None = None


@dataclass(eq=False)
class Round:
    """Pushes gathered for the next synchronous step, and the requests waiting for it."""

    pushes: dict[str, Tensors] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future[StepResult]] = field(default_factory=dict)
    keys: dict[str, IdemKey] = field(default_factory=dict)  # worker -> its idempotency key
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)  # worker -> its scalars
    bases: dict[str, int | None] = field(default_factory=dict)  # worker -> its base_version
    #: worker -> the front its push came through (a Ray front's identity; None: unnamed)
    fronts: dict[str, str | None] = field(default_factory=dict)
    #: the session versions its pushes were checked at (one, unless something went wrong)
    versions: set[int] = field(default_factory=set)
    want_params: bool = False
    timer: asyncio.TimerHandle | None = None
    #: the timeout its timer started with (a PATCH of ``timeout_s`` is the next round's)
    timeout_s: float | None = None
    timed_out: bool = False  # its timer fired while the session was sealed
    discarded: bool = False
    #: done once the round has stepped, failed or been discarded
    resolved: asyncio.Future[None] | None = None

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

    def resolve(self) -> None:
        if self.resolved is not None and not self.resolved.done():
            self.resolved.set_result(None)


@dataclass(eq=False)
class Seal:
    """A session's rounds held for a discarding operation (:meth:`SyncRounds.seal`)."""

    key: str
    version: int  # the session's version when sealed: what the pushes were checked at
    gate: asyncio.Future[None]
    rounds: list[Round]
    checking: list[Pending]

    def discarded(self) -> list[DiscardedPush]:
        """The keyed pushes the operation discards if it is applied, to log with it."""
        out: dict[str, DiscardedPush] = {}
        for rnd in self.rounds:
            for worker, idem in rnd.keys.items():
                base = rnd.bases.get(worker)
                out[idem.key] = DiscardedPush(idem.key, idem.fingerprint, worker,
                                              self.version if base is None else base)
        for p in self.checking:
            if p.idem is not None:
                out[p.idem.key] = DiscardedPush(
                    p.idem.key, p.idem.fingerprint, p.worker,
                    self.version if p.base_version is None else p.base_version)
        return sorted(out.values(), key=lambda d: (d.worker, d.key))


#: applies a closed round on the device: (session key, the round, how to reduce its pushes,
#: the round's ``sync`` answer); under the session's lock it refuses a round discarded
#: meanwhile, or one gathered at another version than the session's
ApplyRound = Callable[[str, Round, ps.Reduce, dict[str, Any]], Awaitable[StepResult]]
#: checks one push against the session: (key, grads, base version, the views a same-host
#: binding takes the answer in, its scalars, the scalar names the open round has gathered)
#: -> (grads on the device, the session's version it was checked at)
CheckPush = Callable[[str, Tensors, int | None, Tensors | None, dict[str, float] | None,
                      frozenset[str]], Awaitable[tuple[Tensors, int]]]
#: whether the session's idempotency table answers this push already (raises what it keeps
#: for a discarded push, or 422 for a key reused with another request)
Answered = Callable[[str, IdemKey], bool]


class SyncRounds:
    """The open rounds of every sync session of one host."""

    def __init__(self, apply_round: ApplyRound, check_push: CheckPush,
                 answered: Answered) -> None:
        self._apply_round = apply_round
        self._check_push = check_push
        self._answered = answered
        self._configs: dict[str, ps.SyncConfig] = {}
        self._rounds: dict[str, Round] = {}
        #: rounds closed and not yet stepped (their step waits for the session's lock)
        self._closing: dict[str, list[Round]] = {}
        #: how many rounds of each session have closed (a push checked while one closed is
        #: checked again, at the version that round steps to)
        self._closed: dict[str, int] = {}
        #: pushes being checked, by session and worker
        self._checking: dict[str, dict[str, Pending]] = {}
        #: sessions whose rounds a discarding operation holds (new pushes wait)
        self._seals: dict[str, Seal] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: pushes with an idempotency key, from their arrival until their round's step is
        #: answered (after that the session's idempotency table answers a retry)
        self._in_flight: dict[tuple[str, str], tuple[IdemKey, asyncio.Future[StepResult]]] = {}
        #: the server is shutting down (:meth:`abort`): no round gathers pushes any more
        self._aborted = False

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
        if rnd is not None and len(rnd.pushes) >= config.workers and key not in self._seals:
            self._close(key, config, partial=False)  # K lowered: the round is complete

    def drop(self, key: str, exc: OptserveError) -> None:
        """The session is gone: fail its open round."""
        self._configs.pop(key, None)
        self._closed.pop(key, None)
        rnd = self._rounds.pop(key, None)
        if rnd is not None:
            rnd.fail(exc)

    def abort(self) -> None:
        """The server is shutting down (SIGTERM): every open round fails now with 409
        ``round_aborted`` (nothing of it was applied: its workers' retries, same keys, form the
        next round once a server runs again), and so does every push that would join a round
        later; rounds closed already still step. Without it the waiting workers held the drain
        until their rounds timed out (or the graceful shutdown ran out: a bare 500)."""
        self._aborted = True
        for rnd in self._rounds.values():
            rnd.fail(_shutting_down())
        self._rounds.clear()

    def withdraw(self, key: str, worker: str, idem: IdemKey | None,
                 front: str | None = None) -> bool:
        """Take this worker's push (with this idempotency key, or none) that came through
        ``front`` out of the session's open round, and fail it with 409 ``round_aborted``:
        that Ray front is draining (SIGTERM, :meth:`app.engine.ray_host.RayRouter.drain`).
        A keyless push of the same worker through another front is left alone (matched by
        the worker's name alone, a draining front asking for its own keyless push, still on
        its way to the host, took another front's out of the round); a keyed one is its
        key's, whichever front it came through (a retry of it through another front waits
        on the same push, and is answered with it).
        Nothing of it was applied, nor ever will be, and its key is not recorded: its retry
        (same key, through any front) joins a round as a new push. The round goes on with
        the other workers' pushes (a round left empty is dropped, its timer with it). False,
        leaving everything as it is, when the push is not waiting in the open round (not
        there yet, being checked, in a round that closed: that one steps) or a discarding
        operation holds the rounds (it answers the push)."""
        rnd = self._rounds.get(key)
        if rnd is None or key in self._seals or worker not in rnd.waiters \
                or rnd.keys.get(worker) != idem \
                or (idem is None and rnd.fronts.get(worker) != front):
            return False
        waiter = rnd.waiters.pop(worker)
        del rnd.pushes[worker]
        for kept in (rnd.keys, rnd.scalars, rnd.bases, rnd.fronts):
            kept.pop(worker, None)
        if not rnd.pushes:
            rnd.cancel_timer()
            del self._rounds[key]
        if not waiter.done():
            waiter.set_exception(_front_draining())
        return True

    def reopen(self) -> None:
        """Rounds gather pushes again (a host started again after :meth:`abort`)."""
        self._aborted = False

    async def stop(self) -> None:
        self.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ discarding operations
    def seal(self, key: str, version: int) -> Seal | None:
        """Hold the session's rounds for an operation that would discard them (the caller
        holds the session's lock, at ``version``): new pushes wait until :meth:`discard` or
        :meth:`unseal`; pushes being checked and rounds waiting to step stay as they are, and
        no round closes meanwhile. None when the session has no sync rounds."""
        if key not in self._configs or key in self._seals:
            return None
        rounds = list(self._closing.get(key, []))
        rnd = self._rounds.get(key)
        if rnd is not None:
            rounds.append(rnd)
        seal = Seal(key, version, asyncio.get_running_loop().create_future(), rounds,
                    list(self._checking.get(key, {}).values()))
        self._seals[key] = seal
        return seal

    def unseal(self, seal: Seal) -> None:
        """The operation was refused: the rounds go on as they were (a round that filled or
        timed out meanwhile closes now)."""
        self._release(seal)
        key = seal.key
        rnd, config = self._rounds.get(key), self._configs.get(key)
        if rnd is not None and config is not None:
            if rnd.timed_out:
                self._timeout(key, rnd)
            elif len(rnd.pushes) >= config.workers:
                self._close(key, config, partial=False)

    def discard(self, seal: Seal, by: str, version: int) -> None:
        """The operation (of kind ``by``) was applied, leaving the session at ``version``:
        every push gathered before it fails with 409 ``stale_gradient``
        (:func:`discarded_push`), the open round, the rounds closed and not yet stepped, and
        the pushes being checked (once their check returns)."""
        key = seal.key
        rounds = list(seal.rounds)
        rnd = self._rounds.pop(key, None)
        if rnd is not None and rnd not in rounds:
            rounds.append(rnd)  # opened meanwhile by a push being checked at the seal
        for r in rounds:
            r.discarded = True
            r.cancel_timer()
            for worker, fut in r.waiters.items():
                if not fut.done():
                    base = r.bases.get(worker)
                    fut.set_exception(discarded_push(by, worker, seal.version if base is None
                                                     else base, version))
            r.resolve()
        for p in seal.checking:
            base = seal.version if p.base_version is None else p.base_version
            p.discarded = discarded_push(by, p.worker, base, version)
            if not p.waiter.done():
                p.waiter.set_exception(p.discarded)
        self._release(seal)

    def _release(self, seal: Seal) -> None:
        if self._seals.get(seal.key) is seal:
            del self._seals[seal.key]
        if not seal.gate.done():
            seal.gate.set_result(None)

    async def _unsealed(self, key: str) -> None:
        while True:
            seal = self._seals.get(key)
            if seal is None:
                return
            await asyncio.shield(seal.gate)

    async def _after_closed(self, key: str) -> None:
        """Until the rounds closed before now have stepped (or failed, or been discarded):
        a push is checked at the version its round will step from."""
        while True:
            waiting = [r.resolved for r in self._closing.get(key, [])
                       if r.resolved is not None and not r.resolved.done()]
            if not waiting:
                return
            await asyncio.wait(waiting)

    # ------------------------------------------------------------------ pushes
    async def push(self, key: str, worker: str | None, grads: Tensors, base_version: int | None,
                   idem: IdemKey | None, want_params: bool,
                   scalars: dict[str, float] | None = None,
                   room: Tensors | None = None, front: str | None = None
                   ) -> StepResult | None:
        """This worker's push into the open round; waits for the round's step. ``room``: the
        views a same-host binding will take the answer in, checked with the gradients;
        ``front``: the front it came through (:meth:`withdraw`). None
        when the session's idempotency table answers the push (a retry of one answered
        meanwhile: its caller replays that answer)."""
        if worker is None:
            raise Invalid("this session steps in synchronous rounds: name the worker in the "
                          "X-Optserve-Worker header", code="missing_worker",
                          field="X-Optserve-Worker")
        pending = self._in_flight.get((key, idem.key)) if idem is not None else None
        if pending is None and key in self._seals:
            await self._unsealed(key)  # a discarding operation runs: after it
            pending = self._in_flight.get((key, idem.key)) if idem is not None else None
        if pending is not None:
            if pending[0] != idem:
                raise key_reused()
            # a retry of a push still being checked, waiting in its round or being stepped:
            # the same answer (or error) as the push itself
            return _for(await asyncio.shield(pending[1]), want_params)
        if idem is not None and self._answered(key, idem):
            return None
        if self._aborted:
            raise _shutting_down()
        config = self._configs.get(key)
        if config is None:
            raise Conflict("the session left synchronous mode while this push waited; push "
                           "again", code="round_aborted")
        checking = self._checking.setdefault(key, {})
        rnd = self._rounds.get(key)
        if worker in checking or (rnd is not None and worker in rnd.pushes):
            raise Conflict(f"worker {worker!r} already pushed to this round; wait for its step",
                           code="duplicate_push", field="X-Optserve-Worker", worker=worker)
        waiter: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        if idem is not None:
            self._in_flight[(key, idem.key)] = (idem, waiter)
            waiter.add_done_callback(lambda done: self._landed(key, idem.key, done))
        else:
            waiter.add_done_callback(_retrieved)
        mine = checking[worker] = Pending(worker, idem, base_version, waiter)
        try:
            try:
                while True:
                    await self._after_closed(key)
                    if mine.discarded is not None:
                        raise mine.discarded
                    closed = self._closed.get(key, 0)
                    gathered = self._scalar_names(key)
                    try:
                        checked, version = await self._check_push(key, grads, base_version,
                                                                  room, scalars, gathered)
                    except Exception:
                        seal = self._seals.get(key)
                        if seal is not None and mine in seal.checking:
                            # discarded or not, the operation decides this push's answer
                            await asyncio.shield(seal.gate)
                        raise
                    if mine.discarded is not None:
                        raise mine.discarded
                    if self._closed.get(key, 0) == closed and (
                            not scalars or self._scalar_names(key) == gathered):
                        break
                    # (or pushes joined the round meanwhile with scalar names of their own:
                    # checked again with them, the session's bound on names counting them)
                    # a round closed while this push was checked (filled by pushes checked
                    # before it, K lowered, a partial timeout): it steps from the version
                    # this push was checked at, so the push joins the next round, checked
                    # again once that round has stepped
            except Exception as exc:
                if mine.discarded is not None and exc is not mine.discarded:
                    raise mine.discarded from None
                raise
            finally:
                if self._checking.get(key, {}).get(worker) is mine:
                    del self._checking[key][worker]
            config = self._configs.get(key) or config
            if self._aborted:  # the server began shutting down while it was checked
                raise _shutting_down()
            if key not in self._configs:  # sync turned off (or deleted) meanwhile
                raise Conflict("the session left synchronous mode while this push was checked; "
                               "push again", code="round_aborted")
            rnd = self._rounds.setdefault(key, Round())  # the same one unless it closed
            if worker in rnd.pushes:
                raise Conflict(f"worker {worker!r} already pushed to this round; wait for its "
                               "step", code="duplicate_push", field="X-Optserve-Worker",
                               worker=worker)
        except BaseException as exc:
            if not waiter.done():
                if isinstance(exc, Exception):
                    waiter.set_exception(exc)
                else:
                    waiter.cancel()
            raise
        rnd.pushes[worker] = checked
        rnd.waiters[worker] = waiter
        rnd.bases[worker] = base_version
        rnd.fronts[worker] = front
        rnd.versions.add(version)
        if idem is not None:
            rnd.keys[worker] = idem
        if scalars:
            rnd.scalars[worker] = scalars
        rnd.want_params = rnd.want_params or want_params
        if rnd.timer is None and not rnd.timed_out:
            rnd.timeout_s = config.timeout_s
            rnd.timer = asyncio.get_running_loop().call_later(
                config.timeout_s, self._timeout, key, rnd)
        if len(rnd.pushes) >= config.workers and key not in self._seals:
            self._close(key, config, partial=False)
        return _for(await asyncio.shield(waiter), want_params)

    def _scalar_names(self, key: str) -> frozenset[str]:
        """The scalar names of the pushes the open round holds (its step records them all)."""
        rnd = self._rounds.get(key)
        if rnd is None:
            return frozenset()
        return frozenset(name for sent in rnd.scalars.values() for name in sent)

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
        self._closed[key] = self._closed.get(key, 0) + 1
        rnd.resolved = asyncio.get_running_loop().create_future()
        self._closing.setdefault(key, []).append(rnd)
        task = asyncio.create_task(self._apply(key, rnd, config, partial))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, key: str, rnd: Round, config: ps.SyncConfig, partial: bool) -> None:
        sync = {"workers": sorted(rnd.pushes), "expected": config.workers, "partial": partial}
        try:
            result = await self._apply_round(key, rnd, config.reduce, sync)
        except BaseException as exc:
            rnd.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            closing = self._closing.get(key, [])
            if rnd in closing:
                closing.remove(rnd)
                if not closing:
                    del self._closing[key]
            rnd.resolve()
        rnd.settle(result)

    def _timeout(self, key: str, rnd: Round) -> None:
        if self._rounds.get(key) is not rnd:
            return
        rnd.timer = None
        if key in self._seals:  # a discarding operation decides first
            rnd.timed_out = True
            return
        config = self._configs[key]
        if config.on_timeout == "apply_partial":
            self._close(key, config, partial=True)
            return
        del self._rounds[key]
        arrived = sorted(rnd.pushes)
        ran = config.timeout_s if rnd.timeout_s is None else rnd.timeout_s
        rnd.fail(Conflict(f"the round timed out after {ran:g} s with "
                          f"{len(arrived)} of {config.workers} workers ({', '.join(arrived)}); "
                          "its gradients were discarded (on_timeout: fail)",
                          code="round_timeout", field="sync.timeout_s", workers=arrived,
                          expected=config.workers, timeout_s=ran))


def _shutting_down() -> Conflict:
    return Conflict("the server is shutting down; this round's gradients were discarded (nothing "
                    "was applied): push again, with the same Idempotency-Key, once it runs "
                    "again", code="round_aborted")


def _front_draining() -> Conflict:
    return Conflict("the server this push came through is shutting down; the push was taken "
                    "out of its round (nothing of it was applied): push again, with the same "
                    "Idempotency-Key, through another server or this one once it runs again",
                    code="round_aborted")


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
