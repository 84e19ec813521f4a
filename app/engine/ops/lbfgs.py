"""``lbfgs_step``: one ``torch.optim.LBFGS.step(closure)`` whose closure calls were answered by
the client (:mod:`app.engine.evaluations` runs the live exchange).

torch's LBFGS changes its parameters in place during the line search, before it knows where
the step ends. The step therefore runs on a *copy*: the session's parameters cloned, and an
LBFGS optimizer over the clones holding a deep copy of the session's LBFGS state and the very
same group options. ``check`` runs torch's own ``LBFGS.step`` on that copy (live: with a
closure that asks the client; at replay: with a closure that returns the recorded evaluations
in order) and its plan is the result; ``apply`` copies the new parameter values and the new
LBFGS state into the session (and steps the scheduler). The session itself is never half
changed: an abandoned step just drops the copy. The cost is one copy of the parameters and of
the LBFGS state (its history: ``2 * history_size`` vectors of the parameters' size) per step,
which is fine for the small problems LBFGS is for.

The log record holds the evaluations (each closure call's loss and gradients, in order), so
replay is exact: the same torch code on the same inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import scheduler_writes, schedulers
from app.engine.interface import Evaluation, StepResult, Tensors
from app.engine.ops.base import ApplyFailed, Operation, register
from app.engine.session import Session
from app.errors import Invalid

NAME = "LBFGS"


@dataclass
class LbfgsPlan:
    params: Tensors
    state: dict[str, Any]
    #: the first evaluation's loss: what torch's ``LBFGS.step`` returns
    loss: float
    evaluations: int
    #: the session version the step ran from
    version: int
    #: the step left its ``t`` the group's tensor lr itself (torch's ``t = lr`` at an iteration
    #: past the first, without a line search): a scheduler's fill of the lr moves it too, and
    #: the next step's first update reads it. The run's lr is the copy's: ``apply`` makes
    #: ``t`` the session's lr tensor, as torch holds it (it held a copy apart from the lr)
    t_is_lr: bool = False


@dataclass
class Copy:
    """The parameters (by name, in the optimizer's order) and an LBFGS optimizer over clones of
    the session's, with its state and options."""

    names: list[str]
    params: list[torch.Tensor]
    optimizer: torch.optim.LBFGS
    version: int


class ReplayMismatch(Exception):
    """A replayed step asked for more evaluations than its record holds."""


def check_lbfgs(s: Session) -> None:
    if s.optimizer_name != NAME:
        raise Invalid(f"this session runs {s.optimizer_name}, which takes pushed gradients; only "
                      "LBFGS steps through evaluations", code="not_an_evaluation_session",
                      field="optimizer")


def make_copy(s: Session, scheduler_range: bool = False) -> Copy:
    """What the step runs on (and the scheduler checked: a scheduler that would fail after the
    step is refused now, before any evaluation; one that would write a group value out of
    range too, for a step asked for now: ``scheduler_range``,
    :mod:`app.engine.scheduler_writes`)."""
    check_lbfgs(s)
    if s.steps_scheduler():
        assert s.scheduler is not None
        schedulers.dry_run(s.optimizer, s.scheduler, None, written=(
            scheduler_writes.written_check(s, tensors=True) if scheduler_range else None),
            counters=scheduler_range, session_id=s.shown_id)
    names = s.names()
    params = [s.params[n].detach().clone() for n in names]
    opt = torch.optim.LBFGS(params)
    group = s.optimizer.param_groups[0]
    opt.param_groups[0].update({k: copy.deepcopy(v) for k, v in group.items()
                                if k not in ("params", "param_names")})
    state = s.optimizer.state.get(s.params[names[0]])
    if state:
        opt.state[params[0]] = copy.deepcopy(state)
    return Copy(names, params, opt, s.version)


def run(work: Copy, next_evaluation: Callable[[dict[str, torch.Tensor]], Evaluation]
        ) -> tuple[LbfgsPlan, list[Evaluation]]:
    """torch's own ``LBFGS.step`` on the copy; ``next_evaluation(params)`` answers each closure
    call (the parameters, by name, as the closure sees them)."""
    answered: list[Evaluation] = []
    named = dict(zip(work.names, work.params, strict=True))

    def closure() -> float:
        ev = next_evaluation(named)
        for name, p in named.items():
            g = ev.grads.get(name)
            p.grad = None if g is None else g.to(p.device)
        answered.append(ev)
        return ev.loss

    loss = work.optimizer.step(closure)  # type: ignore[no-untyped-call]
    for p in work.params:
        p.grad = None
    state = dict(work.optimizer.state[work.params[0]])
    lr = work.optimizer.param_groups[0]["lr"]
    t_is_lr = isinstance(lr, torch.Tensor) and state.get("t") is lr
    return LbfgsPlan(dict(named), state, float(loss), len(answered), work.version,
                     t_is_lr), answered


@register
@dataclass
class LbfgsStep(Operation):
    """One LBFGS step from the evaluations the client gave, in order."""

    kind = "lbfgs_step"
    bumps_version = True
    evaluations: list[Evaluation]
    #: the live run's result (not logged): ``check`` takes it as the plan while the session is
    #: still at the version it ran from
    plan: LbfgsPlan | None = field(default=None, repr=False, compare=False)

    def check(self, s: Session) -> LbfgsPlan:
        check_lbfgs(s)
        if self.plan is not None and self.plan.version == s.version:
            # (the live run: its counts, n_iter and func_evals, stay within int64, as its
            # export and import hold them; replay takes what was logged)
            before = s.optimizer.state.get(s.params[s.names()[0]], {})
            schedulers.refuse_counted_past_int64(before, self.plan.state, "state_dict.state.0",
                                                 "LBFGS step")
            return self.plan
        for i, ev in enumerate(self.evaluations):
            s.check_tensors(ev.grads, f"evaluations.{i}.grads")
        work = make_copy(s)
        recorded = iter(self.evaluations)

        def replayed(_: dict[str, torch.Tensor]) -> Evaluation:
            try:
                return next(recorded)
            except StopIteration:
                raise ReplayMismatch from None
        try:
            plan, _ = run(work, replayed)
        except ReplayMismatch:
            raise Invalid(f"the step asks for more than the {len(self.evaluations)} recorded "
                          "evaluations", code="replay_mismatch", field="evaluations") from None
        if plan.evaluations != len(self.evaluations):
            raise Invalid(f"the step took {plan.evaluations} of the {len(self.evaluations)} "
                          "recorded evaluations", code="replay_mismatch", field="evaluations")
        return plan

    def apply(self, s: Session, plan: LbfgsPlan) -> StepResult:
        first = s.params[s.names()[0]]
        with torch.no_grad():
            for name, value in plan.params.items():
                s.params[name].copy_(value)
        state = dict(plan.state)
        if plan.t_is_lr:
            state["t"] = s.optimizer.param_groups[0]["lr"]  # (the same value: see LbfgsPlan)
        s.optimizer.state[first] = state
        # what torch's lr_scheduler notes when the optimizer's own step() runs (it ran on the
        # copy): without it the scheduler's first step warns that it came first
        s.optimizer._opt_called = True  # type: ignore[attr-defined]
        if s.steps_scheduler():
            assert s.scheduler is not None
            try:
                s.scheduler.step()
            except BaseException as exc:
                raise ApplyFailed(f"the scheduler's step() raised {type(exc).__name__}: "
                                  f"{exc}") from exc
        s.accum.clear()
        s.version += 1
        s.step_count += 1
        return StepResult(s.version, s.step_count, s.lrs(), loss=plan.loss,
                          evaluations=plan.evaluations)

    def to_tree(self) -> dict[str, Any]:
        return {"evaluations": [{"loss": ev.loss, "grads": ev.grads} for ev in self.evaluations]}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> LbfgsStep:
        return cls([Evaluation(float(ev["loss"]), dict(ev["grads"]))
                    for ev in tree["evaluations"]])


def loss_value(value: object, field: str) -> float:
    """A loss from the wire: a JSON number, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if isinstance(value, str):
        named = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if value in named:
            return named[value]
    elif type(value) in (int, float):
        return float(value)  # type: ignore[arg-type]
    raise Invalid("loss must be a number (or \"NaN\", \"Infinity\", \"-Infinity\")",
                  code="invalid_loss", field=field)
