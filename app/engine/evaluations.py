"""LBFGS over the network: the closure as a round trip.

``torch.optim.LBFGS.step(closure)`` calls its closure several times per step (its line search
needs the loss and gradient at new points). Here torch's own ``LBFGS.step`` runs on a thread
of its own, on a copy of the session (:mod:`app.engine.ops.lbfgs`), with a closure that hands
control back to the event loop: the parameters it is asked at go to the client
(:class:`~app.engine.interface.EvaluationRequest`), and the closure returns when the client
posts the loss and gradients there. When ``LBFGS.step`` returns, the step is one
``lbfgs_step`` operation holding every evaluation in order: logged (fsynced for durability
``step``) and applied like any other operation, then answered.

- The device worker never waits on the network: it only validates evaluations, makes the copy
  and commits the result; other sessions keep stepping meanwhile.
- The session's lock is held from the open to the end; other mutations of that session (a
  second ``POST .../step`` included) get 409 ``step_in_progress`` meanwhile, a delete abandons
  the step first; reads see the session as it was before the step (the step runs on a copy).
- All or nothing: a step whose evaluation does not come within ``timeout_s`` (or that is
  abandoned with ``DELETE``, or whose torch code raises, or that a shutdown or a delete
  interrupts) drops its copy; the session is exactly as before.
- Evaluation posts are safe to retry: the evaluation id names what they answer; a repeat with
  the same body gets the same answer. Also after a restart, for the evaluation whose answer
  was the step's commit (its answer lost with the server): the commit is kept in the
  session's idempotency table under that evaluation's id as well (:func:`commit_key`), logged
  with it, so the repeat is answered (``replayed``), not 404 ``evaluation_not_found`` with
  the step applied (a client that then opened a new step from its own, older values went on
  from the wrong parameters).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from app.engine.idempotency import key_reused
from app.engine.interface import (
    Evaluation,
    EvaluationRequest,
    IdemKey,
    ReturnParams,
    StepResult,
)
from app.engine.ops.lbfgs import Copy, LbfgsPlan, LbfgsStep, check_lbfgs, make_copy, run
from app.engine.session import Session
from app.errors import Conflict, Invalid, NotFound, OptserveError
from app.wire.safetensors_body import pack

if TYPE_CHECKING:
    from app.engine.host import EmbeddedHost


def new_step_id() -> str:
    """A fresh open step's id: 16 hex digits, the first a letter. A safetensors answer carries
    its ``step_id`` and ``evaluation`` (``<step id>.<n>``) as ``__metadata__`` text, which
    clients read as JSON when it parses (the protocol's convention: JSON texts, bare words as
    they are); an id of decimal digits alone (one in ~1,800 of ``token_hex(8)``) read as a
    number, and ``...853.1`` as the float ``...853.0``, so the client posted an evaluation the
    step did not wait for. An id that starts with a letter never reads as JSON."""
    token = secrets.token_hex(8)
    return "abcdef"[int(token[0], 16) % 6] + token[1:]


def commit_key(eval_id: str) -> str:
    """The key a committed step's answer is kept under besides its open's Idempotency-Key:
    the id of the evaluation that answered last (a client's key has no spaces)."""
    return f"lbfgs evaluation {eval_id}"


log = logging.getLogger("optserve.evaluations")
_FINISHED_KEPT = 256
MAX_TIMEOUT_S = 3600.0
Answer = EvaluationRequest | StepResult


class _Signal(enum.Enum):
    ABANDON = "abandon"
    SKIP = "skip"


class _Abandoned(Exception):
    pass


class _Skipped(Exception):
    pass


@dataclass
class _Done:
    plan: LbfgsPlan
    evaluations: list[Evaluation]


@dataclass
class _Failed:
    error: OptserveError


@dataclass
class _SkippedEvent:
    pass


@dataclass(eq=False)
class OpenStep:
    key: str
    id: str
    idem: IdemKey | None
    timeout_s: float
    want_params: ReturnParams
    first: Evaluation | None
    #: the version the client's first evaluation was taken at (``base_version``/``If-Match``)
    base_version: int | None = None
    replies: queue.SimpleQueue[Evaluation | _Signal] = field(default_factory=queue.SimpleQueue)
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    #: the answer that follows each question: "open" first, then each evaluation id
    answers: dict[str, asyncio.Future[Answer]] = field(default_factory=dict)
    #: evaluation id -> "validating", or the fingerprint of the body that answered it
    states: dict[str, str] = field(default_factory=dict)
    pending: EvaluationRequest | None = None
    last: str = "open"
    version: int = 0
    step_count: int = 0
    task: asyncio.Task[None] | None = None
    finished: bool = False
    outcome: str = "open"


def _check_base(s: Session, base_version: int) -> None:
    """An LBFGS step's ``base_version`` must be the session's version: its evaluations are of
    the current parameters, and a client's first evaluation of older ones would be wrong."""
    if base_version == s.version:
        return
    if not 0 <= base_version <= s.version:
        raise Invalid(f"base version {base_version} is not a version of this session (it is "
                      f"at version {s.version})", code="invalid_base_version",
                      field="base_version", current_version=s.version)
    raise Conflict(f"an LBFGS step evaluates the current parameters (version {s.version}), "
                   f"not those of version {base_version}; pull the parameters and open the "
                   "step again", code="stale_gradient", field="base_version",
                   current_version=s.version, base_version=base_version,
                   staleness=s.version - base_version, max_staleness=0)


def _settle(fut: asyncio.Future[Answer], value: Answer | BaseException) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
        fut.exception()  # retrieved here: nobody may be waiting for it (a client gone)
    else:
        fut.set_result(value)


class Evaluations:
    """The open LBFGS steps of one session host."""

    def __init__(self, host: EmbeddedHost) -> None:
        self._host = host
        self._open: dict[str, OpenStep] = {}
        self._finished: OrderedDict[str, OpenStep] = OrderedDict()

    def is_open(self, key: str) -> bool:
        return key in self._open

    def knows(self, key: str) -> bool:
        """Whether a step of the session ``key`` is open or kept finished (a repeat of its
        evaluations is answered from it, even after the session's delete)."""
        return key in self._open or any(step.key == key for step in self._finished.values())

    def refuse_if_open(self, key: str) -> None:
        """409 for another mutation while a step is open (rather than waiting as long as the
        client takes to answer)."""
        step = self._open.get(key)
        if step is not None:
            waiting = step.pending.evaluation if step.pending is not None else None
            raise Conflict(f"an LBFGS step ({step.id}) is open on this session; other changes "
                           "wait until it ends: answer its evaluations, or abandon it with "
                           "DELETE .../step/{step_id}", code="step_in_progress",
                           field="session_id", step_id=step.id, evaluation=waiting)

    # ------------------------------------------------------------------ the client's calls
    async def open(self, key: str, first: Evaluation | None, *, idem: IdemKey | None,
                   timeout_s: float, want_params: ReturnParams,
                   base_version: int | None = None) -> Answer:
        """Open a step (answered with its first question, or at once with its end).
        ``base_version``: the version the client holds; an LBFGS step evaluates the current
        parameters, so it must be the session's version (else 409 ``stale_gradient``, checked
        when the step starts, after an idempotent retry of an ended step is answered)."""
        current = self._open.get(key)
        if current is not None:
            if idem is not None and current.idem is not None and current.idem.key == idem.key:
                if current.idem.fingerprint != idem.fingerprint:
                    raise key_reused()
                return await self._latest(current)  # a retry: the step's latest question
            self.refuse_if_open(key)
        step = OpenStep(key, new_step_id(), idem, timeout_s, want_params, first,
                        base_version)
        step.answers["open"] = asyncio.get_running_loop().create_future()
        self._open[key] = step
        step.task = asyncio.create_task(self._drive(step))
        return await asyncio.shield(step.answers["open"])

    async def evaluate(self, key: str, eval_id: str, ev: Evaluation, fingerprint: str
                       ) -> Answer:
        """The client's answer to evaluation ``eval_id``; the step's next question or end."""
        try:
            step = self._locate(key, eval_id)
        except NotFound:
            # (a session of another optimizer has no evaluations: 422, not a 404 for the id)
            check_lbfgs(self._host._get(key))
            committed = await self._committed(key, eval_id, fingerprint)
            if committed is None:
                raise
            return committed
        state = step.states.get(eval_id)
        if state == "validating":
            raise Conflict(f"evaluation {eval_id} is being taken; wait for its answer",
                           code="evaluation_in_progress", field="eval_id")
        if state is not None:
            if state != fingerprint:
                raise Conflict(f"evaluation {eval_id} was already answered with other values",
                               code="evaluation_answered", field="eval_id")
            return await asyncio.shield(step.answers[eval_id])
        if step.finished:
            raise Conflict(f"step {step.id} has ended ({step.outcome}) without evaluation "
                           f"{eval_id}; the session is as it was before it: open a new step",
                           code="step_ended", field="eval_id", outcome=step.outcome)
        if step.pending is None or step.pending.evaluation != eval_id:
            waiting = step.pending.evaluation if step.pending is not None else None
            raise Conflict(f"step {step.id} does not wait for evaluation {eval_id} (it waits "
                           f"for {waiting})", code="evaluation_not_pending", field="eval_id",
                           evaluation=waiting)
        step.states[eval_id] = "validating"
        try:
            checked = await self._host._worker.run(
                lambda: self._check_evaluation(self._host._get(key), ev), "lbfgs_evaluation")
        except BaseException:
            del step.states[eval_id]
            raise
        if step.finished:  # timed out while it was being checked
            del step.states[eval_id]
            raise Conflict(f"step {step.id} has ended ({step.outcome}); the session is as it "
                           "was before it: open a new step", code="step_ended", field="eval_id",
                           outcome=step.outcome)
        step.states[eval_id] = fingerprint
        step.pending = None
        step.replies.put(checked)
        return await asyncio.shield(step.answers[eval_id])

    async def abandon(self, key: str, step_id: str) -> str:
        """Abandon the open step ``step_id``: how it ended (``abandoned``, or ``committed`` when
        it had finished before the abandon reached it)."""
        step = self._open.get(key)
        if step is None or step.id != step_id:
            done = self._finished.get(step_id)
            if done is not None and done.key == key:
                return done.outcome
            raise NotFound(f"no open step {step_id!r:.40} on this session",
                           code="step_not_found", field="step_id")
        step.replies.put(_Signal.ABANDON)
        assert step.task is not None
        await asyncio.shield(step.task)
        return step.outcome

    async def abandon_all(self, key: str | None = None) -> None:
        """Abandon the open steps (of one session, or all: at shutdown) and wait for them."""
        steps = [s for k, s in list(self._open.items()) if key is None or k == key]
        for step in steps:
            step.replies.put(_Signal.ABANDON)
        tasks = [s.task for s in steps if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    async def _latest(self, step: OpenStep) -> Answer:
        if step.pending is not None:
            return step.pending
        return await asyncio.shield(step.answers[step.last])

    async def _committed(self, key: str, eval_id: str, fingerprint: str) -> StepResult | None:
        """The commit of a step this server no longer knows (it restarted since) whose last
        evaluation was ``eval_id``, replayed from the session's idempotency table, with the
        session's parameters (``params_version``); None when no step committed with it. The
        same evaluation answered with other values is 409 ``evaluation_answered``, as live.
        On the device worker, without the session's lock (a step open now holds it until it
        ends; the worker runs one job at a time, a commit included)."""
        host = self._host

        def replay() -> StepResult | None:
            session = host._get(key)
            try:
                hit = session.idem.lookup(commit_key(eval_id), fingerprint)
            except Invalid:
                raise Conflict(f"evaluation {eval_id} was already answered with other values",
                               code="evaluation_answered", field="eval_id") from None
            return None if hit is None else self._replayed(session, hit, True)
        result: StepResult | None = await host._worker.run(replay)
        return result

    def _locate(self, key: str, eval_id: str) -> OpenStep:
        step_id = eval_id.partition(".")[0]
        step = self._open.get(key)
        if step is None or step.id != step_id:
            step = self._finished.get(step_id)
        if step is None or step.key != key:
            raise NotFound(f"no LBFGS step of this session asked for evaluation {eval_id!r:.60}",
                           code="evaluation_not_found", field="eval_id")
        return step

    def _check_evaluation(self, s: Session, ev: Evaluation) -> Evaluation | _Signal:
        """An evaluation's gradients checked like a step's (names, dtypes, shapes, dense) and
        on the device; its loss and gradients checked against the non-finite policy (``skip``
        skips the whole step)."""
        s.check_tensors(ev.grads, "grads")
        grads = s.on_device(ev.grads)
        bad = s.nonfinite_names(grads)
        lossy = ev.loss != ev.loss or ev.loss in (float("inf"), float("-inf"))
        if (bad or lossy) and s.nonfinite == "skip":
            return _Signal.SKIP
        if s.nonfinite == "reject":
            if lossy:
                raise Invalid(f"the loss is {ev.loss}; this session rejects non-finite values "
                              "(nonfinite: reject)", code="nonfinite_loss", field="loss")
            if bad:
                s.reject_nonfinite(bad, "grads")
        return Evaluation(ev.loss, grads)

    def _prepare(self, s: Session, step: OpenStep) -> Copy:
        if step.base_version is not None:
            _check_base(s, step.base_version)
        if step.first is not None:
            checked = self._check_evaluation(s, step.first)
            if isinstance(checked, _Signal):
                raise _Skipped
            step.first = checked
        work = make_copy(s, scheduler_range=True)
        step.version, step.step_count = s.version, s.step_count
        return work

    def _replayed(self, s: Session, hit: dict[str, Any], want_params: ReturnParams
                  ) -> StepResult:
        from app.engine.host import _float

        loss = hit.get("loss")
        result = StepResult(int(hit["version"]), int(hit["step"]),
                            [_float(x) for x in hit["lr"]], skipped=bool(hit.get("skipped")),
                            replayed=True, params_version=s.version,
                            loss=None if loss is None else _float(loss),
                            evaluations=hit.get("evaluations"))
        if want_params:
            result.params = s.pack_params()
        return result

    async def _drive(self, step: OpenStep) -> None:
        """The step from its open to its end, holding the session's lock."""
        host = self._host
        loop = asyncio.get_running_loop()
        thread: threading.Thread | None = None
        try:
            async with host._lock(step.key):
                session = host._get(step.key)
                if step.idem is not None:
                    idem = step.idem
                    hit = session.idem.lookup(idem.key, idem.fingerprint, idem.legacy)
                    if hit is not None:  # a retry of a step that has ended
                        result = await host._worker.run(
                            lambda: self._replayed(session, hit, step.want_params))
                        step.outcome = "committed"
                        _settle(step.answers["open"], result)
                        return
                try:
                    work = await host._worker.run(lambda: self._prepare(session, step),
                                                  "lbfgs_open")
                except _Skipped:
                    step.outcome = "skipped"
                    _settle(step.answers["open"], StepResult(
                        session.version, session.step_count, session.lrs(), skipped=True))
                    return
                thread = threading.Thread(target=self._run_torch, args=(step, work, loop),
                                          name=f"optserve-lbfgs-{step.id}", daemon=True)
                thread.start()
                while True:
                    event = await step.events.get()
                    if isinstance(event, EvaluationRequest):
                        step.answers[event.evaluation] = loop.create_future()
                        step.pending = event
                        _settle(step.answers[step.last], event)
                        step.last = event.evaluation
                        continue
                    step.pending = None
                    if isinstance(event, _Done):
                        op = LbfgsStep(event.evaluations, plan=event.plan)
                        keys = [step.idem] if step.idem is not None else []
                        if step.last != "open":  # (its last evaluation's repeat: see above)
                            keys.append(IdemKey(commit_key(step.last),
                                                str(step.states.get(step.last, ""))))
                        result = await host._run(step.key, session, op, keys,
                                                 step.want_params)
                        step.outcome = "committed"
                        _settle(step.answers[step.last], result)
                    elif isinstance(event, _SkippedEvent):
                        step.outcome = "skipped"
                        _settle(step.answers[step.last], StepResult(
                            session.version, session.step_count, session.lrs(), skipped=True))
                    else:
                        assert isinstance(event, _Failed)
                        step.outcome = "abandoned" if event.error.code == "step_abandoned" \
                            else "failed"
                        _settle(step.answers[step.last], event.error)
                    break
            if step.outcome == "committed":
                host._version_changed(step.key)
        except BaseException as exc:
            if step.outcome == "open":
                step.outcome = "failed"
            error = exc if isinstance(exc, OptserveError) else OptserveError(
                f"the LBFGS step failed: {type(exc).__name__}: {exc}", code="step_failed")
            if isinstance(exc, OptserveError):
                # (a commit refused for want of room or a storage error: the step has ended
                # with it, and the answer kept for its evaluation's repeats says so; a repeat
                # cannot succeed once there is room, a new step can)
                error.detail = (f"{error.detail}; LBFGS step {step.id} has ended with it (the "
                                "session as it was before the step): once that is done, open "
                                "a new step, as a repeat of this evaluation gets this answer")
                error.extra.setdefault("outcome", step.outcome)
            _settle(step.answers[step.last], error)
            if not isinstance(exc, Exception):
                raise
        finally:
            step.finished = True
            step.pending = None
            if self._open.get(step.key) is step:
                del self._open[step.key]
            self._finished[step.id] = step
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)
            if thread is not None and thread.is_alive():
                step.replies.put(_Signal.ABANDON)

    def _run_torch(self, step: OpenStep, work: Copy, loop: asyncio.AbstractEventLoop) -> None:
        """The thread: torch's LBFGS.step on the copy; each closure call waits for the client."""
        self._host._worker.pin_threads()
        def post(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(step.events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

        asked = 0

        def next_evaluation(params: dict[str, torch.Tensor]) -> Evaluation:
            nonlocal asked
            asked += 1
            if asked == 1 and step.first is not None:
                return step.first
            post(EvaluationRequest(step.id, f"{step.id}.{asked}", asked - 1, step.version,
                                   step.step_count, pack(params), step.timeout_s))
            try:
                item = step.replies.get(timeout=step.timeout_s)
            except queue.Empty:
                raise _Abandoned(f"no evaluation came within {step.timeout_s:g} s") from None
            if item is _Signal.ABANDON:
                raise _Abandoned("it was abandoned")
            if item is _Signal.SKIP:
                raise _Skipped
            assert isinstance(item, Evaluation)
            return item

        try:
            if work.params[0].device.type == "cuda":
                torch.cuda.set_device(work.params[0].device)
            plan, evaluations = run(work, next_evaluation)
            post(_Done(plan, evaluations))
        except _Abandoned as exc:
            post(_Failed(Conflict(f"the LBFGS step {step.id} was abandoned: {exc}; the session "
                                  "is as it was before it", code="step_abandoned",
                                  field="eval_id")))
        except _Skipped:
            post(_SkippedEvent())
        except Exception as exc:  # torch's own errors: the session is untouched (a copy ran)
            log.warning("LBFGS step %s failed: %s", step.id, exc)
            post(_Failed(Invalid(f"torch's LBFGS.step raised {type(exc).__name__}: {exc}; the "
                                 "session is as it was before the step", code="step_failed",
                                 field="evaluation")))
