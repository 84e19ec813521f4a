"""Operations on gradients: ``step``, ``push`` (accumulate) and ``zero_grad``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from app.engine import (
    chunked,
    foreach_steps,
    metrics,
    optimizers,
    ps,
    scheduler_writes,
    schedulers,
    shared_options,
    sparse,
)
from app.engine.answer_stream import AnswerStream, ChunksInto
from app.engine.interface import GradsResult, StepResult, Tensors
from app.engine.ops.base import ApplyFailed, Operation, register
from app.engine.ops.params import changed_groups, check_group_changes
from app.engine.rounds import DISCARDED_BY
from app.engine.session import Session, TakenNorms, lr_value
from app.errors import Conflict, Invalid


def staleness_of(s: Session, base_version: int, *, replaced: bool = False) -> int:
    """How many versions old gradients computed at ``base_version`` are; 409 past
    ``max_staleness``. ``replaced`` (requests): also 409 when they were computed before the
    session's latest overwrite or state import, whatever ``max_staleness`` says (the
    parameters, or the state, they were computed with are gone)."""
    if not 0 <= base_version <= s.version:
        raise Invalid(f"base version {base_version} is not a version of this session "
                      f"(it is at version {s.version})", code="invalid_base_version",
                      field="base_version", current_version=s.version)
    if replaced and s.replaced is not None and base_version < s.replaced[0]:
        at, by = s.replaced
        raise Conflict(f"gradients computed at version {base_version} are refused whatever "
                       f"max_staleness says: {DISCARDED_BY.get(by, by)} at version {at}, "
                       f"after they were computed; the session is at version {s.version}. "
                       "Pull the parameters and push again",
                       code="stale_gradient", field="base_version", current_version=s.version,
                       base_version=base_version, discarded_by=by, replaced_version=at)
    staleness = s.version - base_version
    bound = s.ps.max_staleness
    if bound is not None and staleness > bound:
        note = ps.staleness_note(base_version, s.version, bound)
        raise Conflict(f"stale gradients refused: {note}; pull the parameters and push again",
                       code="stale_gradient", field="base_version",
                       current_version=s.version, base_version=base_version,
                       staleness=staleness, max_staleness=bound)
    return staleness


@dataclass
class StepPlan:
    total: Tensors
    nonfinite: list[str]
    skip: bool
    staleness: int | None
    lr_div: float | None
    #: group option changes to make before the optimizer steps, by group index
    changes: dict[int, dict[str, Any]]
    #: gradient norms the non-finite check took (the metrics reuse them)
    grad_norms: TakenNorms = field(default_factory=TakenNorms)


def check_empty_gradients(s: Session, grads: Tensors, field: str = "grads") -> None:
    """A gradient with no elements, for a parameter torch's step cannot take one for
    (:func:`optimizers.empty_step_refusal`): a 422 naming it, before anything changes, where
    the step would raise in the middle (torch steps a parameter only with a gradient: one
    left out is no refusal)."""
    empty = [n for n in s.empty_params() if n in grads]  # (a gradient has its parameter's shape)
    if not empty:
        return
    group_of = {n: i for i, g in enumerate(s.optimizer.param_groups) for n in g["param_names"]}
    groups = s.group_options()
    for name in empty:
        g = grads[name]
        why = optimizers.empty_step_refusal(s.cls, s.defaults, groups[group_of[name]], g.shape,
                                            g.dtype, s.device)
        if why is not None:
            raise Invalid(f"{s.optimizer_name} cannot step {name!r:.80}, a parameter with no "
                          f"elements ({why}); leave its gradient out", code="invalid_gradient",
                          field=f"{field}.{name}")


@register
@dataclass
class Step(Operation):
    """Set each parameter's ``.grad`` to the pushed gradient plus anything accumulated, call
    ``optimizer.step()``, step the scheduler when it steps per optimizer step, clear the
    gradients, bump the version."""

    kind = "step"
    bumps_version = True
    grads: Tensors
    #: the version the gradients were computed from (async parameter server)
    base_version: int | None = None
    #: first-format records only: the staleness divisor they logged
    lr_div: float | None = None
    #: per-group option changes made with this step, atomically (validated like a PATCH): the
    #: one round trip per step a local scheduler changing lr and betas needs
    options: dict[int, dict[str, Any]] | None = None
    #: float16/bfloat16 gradients for wider parameters are widened on the device (the record
    #: keeps the narrow ones; replay widens them the same way)
    upcast: bool = False
    #: the client's own scalars (loss, accuracy, ...), recorded in the step's history row
    scalars: dict[str, float] | None = None
    #: the step's wall time (set when it is checked, logged: replay rebuilds the same row)
    time: float | None = None
    #: a sync round's step: the workers whose pushes it reduced
    workers: list[str] | None = None
    #: False (``?metrics=history``): the answer carries no ``metrics``; the step's norms are
    #: taken after the answer and filled into its history row (not logged: replay takes them
    #: at once, the same values)
    answer_metrics: bool = True
    #: ``?return=touched``: the answer holds what the step touched, and so must a retry's
    #: (logged: replay rebuilds the idempotency table's entry, :meth:`result_json`)
    touched: bool = False
    #: the answer's buffer, to be written and handed out as the step's chunks are stepped
    #: (not logged; taken only where :meth:`_streamed` allows, else answered as ever)
    answer: AnswerStream | None = field(default=None, repr=False, compare=False)
    #: a touched step onto accumulated gradients: what the step touched of each accumulated
    #: parameter (:func:`sparse.touched_rows`), which a retry's gradients cannot tell
    accumulated: dict[str, str | None] | None = field(default=None, init=False, repr=False,
                                                       compare=False)
    #: set by requests: its option changes are also refused what servers before it accepted
    #: (non-finite options, scheduler-kept keys out of range). It travels with the operation
    #: (logged with its options); records logged before these checks lack it and replay as
    #: they ran
    request: bool = False
    #: set by requests: a ``base_version`` from before the session's latest overwrite or
    #: state import is refused (409 ``stale_gradient``) whatever ``max_staleness`` says. It
    #: travels with the operation (logged with its base version); records logged before this
    #: check lack it and replay as they ran
    refuse_replaced: bool = False
    #: set for steps asked for now (requests, sync rounds): refused (409
    #: ``scheduler_out_of_range``) when the scheduler's step after it would write a group value
    #: out of range (:mod:`app.engine.scheduler_writes`). Logged; records logged before this
    #: check lack it and replay as they ran
    scheduler_range: bool = False
    #: set by requests: the range checks (422 ``option_overflow`` of a group's options, 409
    #: ``scheduler_out_of_range`` of what its scheduler writes) see a tensor ``lr``'s value
    #: too (a float64 tensor holds values past float32's range). Logged; records logged
    #: before this check lack it and replay as they ran
    tensor_range: bool = False
    #: set for steps asked for now (requests, sync rounds): refused (422 ``counter_overflow``
    #: naming it) when the scheduler's step after it would count an integer of its state past
    #: int64 (an imported ``last_epoch`` of 2**63 - 1). Logged; records logged before this
    #: check lack it and replay as they ran
    counter_range: bool = False
    #: set for steps asked for now (requests, sync rounds): a scalar name past the session's
    #: :data:`metrics.MAX_SCALAR_NAMES` is refused (422 ``invalid_scalars``). Logged; records
    #: logged before this check lack it and replay as they ran
    scalar_names: bool = False
    #: set by requests: its option changes are refused a Muon ``lr`` its step would scale
    #: past the dtype's range (as a PATCH's, :func:`check_group_changes`). Logged; records
    #: logged before this check lack it and replay as they ran (a skipped step took one)
    scaled_lr: bool = False

    def check(self, s: Session) -> StepPlan:
        # a body whose header the session has checked: no per-tensor checks, the gradients
        # as they are (on its device, in its dtypes), every name a parameter's
        known = s.known_body(self.grads)
        if not known:
            s.check_tensors(self.grads, "grads", self.upcast, sparse_ok=True)
        self.scalars = metrics.check_scalars(
            self.scalars, session=s if self.scalar_names else None) or None
        if self.time is None:
            self.time = time.time()
        # (entries that change nothing go, once they are checked to name a group)
        self.options = changed_groups(len(s.optimizer.param_groups), self.options)
        changes = (check_group_changes(s, self.options, request=self.request,
                                       tensors=self.tensor_range, scaled_lr=self.scaled_lr)
                   if self.options else {})
        staleness, lr_div = None, self.lr_div
        if self.base_version is not None:
            staleness = staleness_of(s, self.base_version, replaced=self.refuse_replaced)
            if lr_div is None and s.ps.staleness_lr == "inverse" and staleness > 0:
                lr_div = 1.0 + staleness
        if lr_div is not None and not (math.isfinite(lr_div) and lr_div >= 1.0):
            raise Invalid("lr_div must be a finite number >= 1", code="invalid_option",
                          field="lr_div")
        grads = self.grads if known else s.on_device(self.grads)
        total = grads if known and not s.accum else self._total(s, grads)
        sparse.check_optimizer_takes(s, total)
        norms = TakenNorms(groups=[g["param_names"] for g in s.optimizer.param_groups])
        bad = s.nonfinite_names(total, norms if s.metrics_on else None)
        if bad and s.nonfinite == "reject":
            s.reject_nonfinite(bad, "grads")
        skip = bool(bad) and s.nonfinite == "skip"
        if not skip:
            # the checks see the groups as the step will: with this step's option changes
            saved = schedulers.capture(s.optimizer, None) if changes else None
            try:
                # (copies: the dry run fills a tensor lr; a ``$fill`` fills the session's
                # tensor, which the restore puts back)
                shared_options.apply_changes(s.optimizer.param_groups, {
                    index: optimizers.fresh(opts) for index, opts in changes.items()})
                check_empty_gradients(s, total)
                s.check_group_scalars(self.tensor_range)
                if s.steps_scheduler():
                    assert s.scheduler is not None
                    schedulers.dry_run(s.optimizer, s.scheduler, None, written=(
                        scheduler_writes.written_check(s, tensors=self.tensor_range)
                        if self.scheduler_range else None), counters=self.counter_range,
                        session_id=s.shown_id)
            finally:
                if saved is not None:
                    schedulers.restore(s.optimizer, None, saved)
        return StepPlan(total, bad, skip, staleness, lr_div, changes, norms)

    @staticmethod
    def _total(s: Session, grads: Tensors) -> Tensors:
        """Per parameter, the gradient to step with: pushed plus accumulated."""
        total: Tensors = {}
        for name in s.params:
            a, g = s.accum.get(name), grads.get(name)
            if a is not None and g is not None:
                total[name] = sparse.add_checked(name, a, g)
            elif a is not None:
                total[name] = a
            elif g is not None:
                total[name] = g
        return total

    def version_after(self, s: Session, plan: StepPlan) -> int:
        return s.version if plan.skip else s.version + 1

    def apply(self, s: Session, plan: StepPlan) -> StepResult:
        groups = s.optimizer.param_groups
        # what may raise first, before anything changes
        bad = metrics.count_nonfinite([plan.total[n] for n in plan.nonfinite])
        if self.touched and s.accum:
            self.accumulated = sparse.touched_rows(plan.total, s.accum)
        shared_options.apply_changes(groups, plan.changes)  # (even when the step is skipped)
        if plan.skip:
            s.accum.clear()
            found = self._record(s, plan, [{"lr": lr} for lr in s.lrs()], bad, skipped=True)
            return StepResult(s.version, s.step_count, s.lrs(), skipped=True,
                              nonfinite=plan.nonfinite, staleness=plan.staleness,
                              metrics=self._answered(found))
        used_lrs = [lr_value(g["lr"]) / plan.lr_div if plan.lr_div is not None
                    else lr_value(g["lr"]) for g in groups]
        sparse.own_storage(s, plan.total)
        saved_lrs = [group["lr"] for group in groups]
        try:
            for name, p in s.params.items():
                p.grad = plan.total.get(name)
            splits = chunked.plan(s.optimizer, s.optimizer_name)
            probe = metrics.before_step(s, plan.total, plan.grad_norms, splits,
                                        self.answer_metrics)
            into = self._streamed(s, plan, splits, probe)
            if plan.lr_div is not None:
                for group in groups:
                    group["lr"] = group["lr"] / plan.lr_div
            with foreach_steps.switched(s.optimizer, s.optimizer_name, splits):
                chunked.step(s.optimizer, s.optimizer_name, splits,
                             probe.watch if probe is not None else None, into)
            if into is not None:
                into.finish()  # (the copies a held answer kept waiting)
        except BaseException as exc:
            raise ApplyFailed(f"optimizer.step() raised {type(exc).__name__}: {exc}") from exc
        finally:
            for group, lr in zip(groups, saved_lrs, strict=True):
                group["lr"] = lr
            for p in s.params.values():
                p.grad = None
        if s.steps_scheduler():
            assert s.scheduler is not None
            try:
                schedulers.step(s.scheduler)
            except BaseException as exc:
                raise ApplyFailed(f"the scheduler's step() raised {type(exc).__name__}: "
                                  f"{exc}") from exc
        s.accum.clear()
        s.version += 1
        s.step_count += 1
        if into is not None and self.answer is not None:
            mismatch = self.answer.mismatch(s.version, s.step_count, s.lrs())
            if mismatch is not None:  # (never expected: the answer stays incomplete)
                raise ApplyFailed(mismatch)
        if self.answer_metrics or probe is None:
            found = self._record(s, plan, metrics.after_step(s, probe, used_lrs, bad), bad)
        else:
            found = self._record(s, plan, metrics.pending(used_lrs), bad)
            metrics.after_answer(s, probe, used_lrs, found.n if found is not None else None)
        return StepResult(s.version, s.step_count, s.lrs(), nonfinite=plan.nonfinite,
                          staleness=plan.staleness, metrics=self._answered(found))

    def _streamed(self, s: Session, plan: StepPlan, splits: list[chunked.Split],
                  probe: metrics.Probe | None) -> ChunksInto | None:
        """Begin this step's answer now and fill it chunk by chunk (:attr:`answer`), where
        that is simple and its scalars are known before the step: every large parameter
        stepped in chunks with state already made, no scheduler stepping with it (its lr
        would be the answer's), no norms for the answer, the answer's views fitting every
        parameter. Durability ``step`` only where the host holds the answer's copies until
        the record written from the same body has been written (:meth:`AnswerStream.hold`);
        its last byte waits for the fsync, as the step's result does."""
        stream = self.answer
        if (stream is None or not splits or any(sp.fresh for sp in splits)
                or (probe is not None and probe.watch is not None)
                or s.steps_scheduler() or (s.durability == "step" and not stream.held)
                or not s.fits_answer(stream.tensors, stream.dtype)):
            return None
        stream.begin(StepResult(s.version + 1, s.step_count + 1, s.lrs(),
                                nonfinite=plan.nonfinite, staleness=plan.staleness).scalars())
        return ChunksInto(stream, s.params, [sp.param for sp in splits])

    def _answered(self, found: metrics.StepMetrics | None) -> dict[str, Any] | None:
        """The answer's ``metrics``: none for ``?metrics=history`` (its row's norms are still
        NaN here; the idempotency table keeps the answer as given)."""
        return found.to_json() if found is not None and self.answer_metrics else None

    def _record(self, s: Session, plan: StepPlan, groups: list[dict[str, float]],
                nonfinite: int, skipped: bool = False) -> metrics.StepMetrics | None:
        """The step's metrics into the session's history (after the step is done: nothing
        here can fail it): the answer's ``metrics`` object, its row's ``n`` set."""
        try:
            sums = {k: list(v) for k, v in s.pending_scalars.items()}
            s.pending_scalars = {}
            for k, v in (self.scalars or {}).items():
                total, count = sums.get(k, (0.0, 0.0))
                sums[k] = [total + v, count + 1]
            step = metrics.StepMetrics(groups, nonfinite, skipped, plan.staleness,
                                       self.workers, {k: v[0] / v[1] for k, v in sums.items()},
                                       self.time if self.time is not None else time.time())
            step.n = s.history.append(step.row(s.step_count, s.version))
            return step
        except Exception:  # noqa: BLE001 - metrics never fail a step
            return None

    def revised(self, result: Any) -> bool:
        return not getattr(result, "skipped", False) or bool(self.options)

    def result_json(self, result: Any) -> dict[str, Any]:
        out = super().result_json(result)
        if self.accumulated:
            out["touched"] = self.accumulated
        return out

    def to_tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {"grads": self.grads}
        if self.base_version is not None:
            out["base_version"] = self.base_version
            if self.refuse_replaced:
                out["refuse_replaced"] = True
        if self.lr_div is not None:
            out["lr_div"] = self.lr_div
        if self.options:
            out["options"] = {str(i): opts for i, opts in self.options.items()}
            if self.request:
                out["request"] = True
        if self.upcast:
            out["upcast"] = True
        if self.scalars:
            out["scalars"] = self.scalars
        if self.time is not None:
            out["time"] = self.time
        if self.workers is not None:
            out["workers"] = self.workers
        if self.touched:
            out["touched"] = True
        if self.scheduler_range:
            out["scheduler_range"] = True
        if self.tensor_range:
            out["tensor_range"] = True
        if self.counter_range:
            out["counter_range"] = True
        if self.scalar_names:
            out["scalar_names"] = True
        if self.scaled_lr:
            out["scaled_lr"] = True
        return out

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Step:
        base = tree.get("base_version")
        lr_div = tree.get("lr_div")
        options = tree.get("options")
        at = tree.get("time")
        workers = tree.get("workers")
        return cls(dict(tree["grads"]), None if base is None else int(base),
                   None if lr_div is None else float(lr_div),
                   {int(i): dict(o) for i, o in options.items()} if options else None,
                   bool(tree.get("upcast", False)), tree.get("scalars") or None,
                   None if at is None else float(at),
                   None if workers is None else [str(w) for w in workers],
                   touched=bool(tree.get("touched", False)),
                   request=tree.get("request") is True,
                   refuse_replaced=tree.get("refuse_replaced") is True,
                   scheduler_range=tree.get("scheduler_range") is True,
                   tensor_range=tree.get("tensor_range") is True,
                   counter_range=tree.get("counter_range") is True,
                   scalar_names=tree.get("scalar_names") is True,
                   scaled_lr=tree.get("scaled_lr") is True)


@register
@dataclass
class Push(Operation):
    """Add gradients into the accumulator (several pushes make one step)."""

    kind = "push"
    grads: Tensors
    upcast: bool = False
    #: the client's scalars, recorded with the next step (means of all sent for it)
    scalars: dict[str, float] | None = None
    #: set by requests: as :attr:`Step.scalar_names`
    scalar_names: bool = False
    #: one shard's part of a sharded session's push, which goes to every shard (its part
    #: empty where the push has none there): a crash that cuts it between their commits is
    #: then found at start (some shards hold its key, others not) and undone
    #: (``ShardedSession.undo_cut``). Pushes logged before it was sent went to some shards only:
    #: never undone
    every_shard: bool = False

    def check(self, s: Session) -> Tensors:
        """The accumulator's new values for the pushed names: summed here, out of place, so
        that a sum torch refuses is a 422 before anything is applied."""
        self.scalars = metrics.check_scalars(
            self.scalars, session=s if self.scalar_names else None) or None
        grads = s.check_grads(self.grads, self.upcast)
        return {n: (sparse.add_checked(n, s.accum[n], g) if n in s.accum else g)
                for n, g in grads.items()}

    def apply(self, s: Session, plan: Tensors) -> GradsResult:
        pending = dict(s.pending_scalars)
        for k, v in (self.scalars or {}).items():
            total, count = pending.get(k, (0.0, 0.0))
            pending[k] = [total + v, count + 1]
        s.accum.update(plan)
        s.pending_scalars = pending
        return GradsResult(s.version, s.step_count, sorted(s.accum))

    def revised(self, result: Any) -> bool:
        return False  # (the accumulator only)

    def to_tree(self) -> dict[str, Any]:
        return {"grads": self.grads, **({"upcast": True} if self.upcast else {}),
                **({"scalars": self.scalars} if self.scalars else {}),
                **({"scalar_names": True} if self.scalar_names else {}),
                **({"every_shard": True} if self.every_shard else {})}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Push:
        return cls(dict(tree["grads"]), bool(tree.get("upcast", False)),
                   tree.get("scalars") or None, tree.get("scalar_names") is True,
                   tree.get("every_shard") is True)


@register
@dataclass
class ZeroGrad(Operation):
    """Clear the accumulator."""

    kind = "zero_grad"

    def apply(self, s: Session, plan: Any) -> GradsResult:
        s.accum.clear()
        s.pending_scalars = {}
        return GradsResult(s.version, s.step_count, [])

    def revised(self, result: Any) -> bool:
        return False  # (the accumulator only)

    def to_tree(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> ZeroGrad:
        return cls()


