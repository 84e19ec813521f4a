"""``torch.optim.lr_scheduler`` classes built from JSON specs.

A spec is ``{"name": "StepLR", "options": {...}, "step_on": "optimizer" | "manual"}``;
SequentialLR and ChainedScheduler take ``options.schedulers`` as a list of nested specs.
Options are type-checked against torch's own annotations, then tried on a throwaway optimizer
(built and stepped once) before the real scheduler is made.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import inspect
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import lr_scheduler

from app.engine.optimizers import TORCH_ERRORS, blame, probe_step
from app.errors import Conflict, Invalid, shown
from app.wire.integers import INT64
from app.wire.tree import int_outside, is_float_tag, nodes_once, untag_float

SUPPORTED = (
    "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
    "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR",
    "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler",
)
UNSUPPORTED = {
    "LambdaLR": "LambdaLR needs lr_lambda, a Python callable, which cannot travel as JSON; "
                "use a built-in schedule, or run LambdaLR in the client against the SDK's "
                "RemoteOptimizer",
    "MultiplicativeLR": "MultiplicativeLR needs lr_lambda, a Python callable, which cannot "
                        "travel as JSON; use ExponentialLR, or run it in the client against the "
                        "SDK's RemoteOptimizer",
}
NESTED = ("SequentialLR", "ChainedScheduler")
StepOn = Literal["optimizer", "manual"]
Scheduler = Any  # LRScheduler | ReduceLROnPlateau


@dataclass
class SchedulerSpec:
    name: str
    options: dict[str, Any]
    step_on: StepOn
    children: list[SchedulerSpec]

    def to_json(self, nested: bool = False) -> dict[str, Any]:
        """The spec as :func:`parse_spec` accepts it back (a nested scheduler steps with its
        parent, so only the top level carries ``step_on``)."""
        options = dict(self.options)
        if self.children:
            options["schedulers"] = [c.to_json(nested=True) for c in self.children]
        out = {"name": self.name, "options": _tag_floats(options)}
        if not nested:
            out["step_on"] = self.step_on
        return out


def _tag_floats(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, dict):
        return {k: _tag_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tag_floats(v) for v in obj]
    return obj


def _signature(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(getattr(lr_scheduler, name).__init__).parameters
    return {k: p for k, p in params.items() if k not in ("self", "optimizer")}


def catalogue() -> dict[str, Any]:
    out = []
    for name in SUPPORTED:
        sig = _signature(name)
        out.append({
            "name": name,
            "required": [k for k, p in sig.items() if p.default is inspect.Parameter.empty],
            "defaults": {k: _tag_floats(p.default) for k, p in sig.items()
                         if p.default is not inspect.Parameter.empty},
            "default_step_on": "manual" if name == "ReduceLROnPlateau" else "optimizer",
        })
    unsupported = [{"name": n, "reason": r} for n, r in UNSUPPORTED.items()]
    return {"schedulers": out, "unsupported": unsupported}


def _is_num(x: object) -> bool:
    return type(x) in (int, float)


def _check_value(annotation: str, value: Any, name: str, field: str) -> Any:
    if is_float_tag(value):
        value = untag_float(value, field, "invalid_option")
    if "Callable" in annotation:
        raise Invalid(f"{name} is a Python callable and cannot travel as JSON",
                      code="unsupported_option", field=field)
    literal = re.match(r"Literal\[(.*)\]", annotation)
    if literal:
        choices = re.findall(r"'([^']*)'", literal.group(1))
        if value not in choices:
            raise Invalid(f"{name} must be one of {choices}, got {shown(value, 40)}",
                          code="invalid_option", field=field)
        return value
    alternatives = [a.strip() for a in annotation.split("|")]
    for alt in alternatives:
        if alt == "None" and value is None:
            return value
        if alt == "int" and type(value) is int:
            return value
        if alt == "float" and _is_num(value):
            return value
        if alt == "bool" and type(value) is bool:
            return value
        if alt in ("list[float]",) and isinstance(value, list) and all(map(_is_num, value)):
            return value
        if alt in ("list[int]", "Iterable[int]") and isinstance(value, list) and all(
            type(v) is int for v in value
        ):
            return value
    raise Invalid(f"{name} must be {annotation}, got {shown(value, 60)}", code="invalid_option",
                  field=field)


def parse_spec(spec: object, field: str = "scheduler", nested: bool = False) -> SchedulerSpec:
    if not isinstance(spec, dict):
        raise Invalid("a scheduler must be an object {\"name\", \"options\", \"step_on\"}",
                      code="invalid_scheduler", field=field)
    unknown = spec.keys() - {"name", "options", "step_on"}
    if unknown:
        raise Invalid(f"unknown scheduler key(s) {sorted(unknown)}", code="invalid_scheduler",
                      field=f"{field}.{sorted(unknown)[0]}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise Invalid(f"a scheduler's name must be a string, one of {', '.join(SUPPORTED)}",
                      code="unknown_scheduler", field=f"{field}.name")
    if name in UNSUPPORTED:
        raise Invalid(UNSUPPORTED[str(name)], code="unsupported_scheduler", field=f"{field}.name")
    if not isinstance(name, str) or name not in SUPPORTED:
        raise Invalid(f"unknown scheduler {name!r:.60}; supported: {', '.join(SUPPORTED)}",
                      code="unknown_scheduler", field=f"{field}.name")
    options = spec.get("options", {})
    if not isinstance(options, dict):
        raise Invalid("options must be a JSON object", code="invalid_option",
                      field=f"{field}.options")
    default_step_on = "manual" if name == "ReduceLROnPlateau" else "optimizer"
    step_on = spec.get("step_on", default_step_on)
    if step_on not in ("optimizer", "manual"):
        raise Invalid("step_on must be \"optimizer\" or \"manual\"", code="invalid_scheduler",
                      field=f"{field}.step_on")
    if name == "ReduceLROnPlateau" and step_on == "optimizer":
        raise Invalid("ReduceLROnPlateau steps on a metric, so it can only be stepped by hand "
                      "(POST .../scheduler/step with {\"metric\": x}); use step_on \"manual\"",
                      code="invalid_scheduler", field=f"{field}.step_on")
    if nested and "step_on" in spec:
        raise Invalid("a nested scheduler steps with its parent; step_on belongs on the parent",
                      code="invalid_scheduler", field=f"{field}.step_on")
    sig = _signature(name)
    checked: dict[str, Any] = {}
    children: list[SchedulerSpec] = []
    for key, value in options.items():
        where = f"{field}.options.{key}"
        if key not in sig:
            raise Invalid(f"{name} has no option {key!r:.60}; its options are: "
                          f"{', '.join(sig)}", code="unknown_option", field=where)
        if key == "schedulers" and name in NESTED:
            if not isinstance(value, list) or not value:
                raise Invalid("schedulers must be a non-empty list of scheduler specs",
                              code="invalid_scheduler", field=where)
            children = [parse_spec(v, f"{where}.{i}", nested=True) for i, v in enumerate(value)]
            continue
        checked[key] = _check_value(str(sig[key].annotation), value, key, where)
    missing = [k for k, p in sig.items()
               if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise Invalid(f"{name} needs option(s) {', '.join(missing)}", code="invalid_option",
                      field=f"{field}.options.{missing[0]}")
    return SchedulerSpec(name, checked, step_on, children)


def _construct(spec: SchedulerSpec, optimizer: torch.optim.Optimizer) -> Scheduler:
    cls = getattr(lr_scheduler, spec.name)
    if spec.name == "ChainedScheduler":
        kids = [_construct(c, optimizer) for c in spec.children]
        return cls(kids, optimizer=optimizer)
    if spec.name == "SequentialLR":
        kids = [_construct(c, optimizer) for c in spec.children]
        return cls(optimizer, schedulers=kids, **spec.options)
    return cls(optimizer, **spec.options)


def option_fields(spec: SchedulerSpec, field: str) -> dict[str, str]:
    """Each option of ``spec`` and of its nested schedulers by name, with where it is (the
    first place a name is given): a nested scheduler's option is named in its place, not put on
    its parent's (a SequentialLR's only option, ``milestones``, was blamed for whatever its
    children's options made torch raise)."""
    out: dict[str, str] = {}
    for at, _, key in _option_paths(spec, field):
        out.setdefault(key, at)
    return out


def _option_paths(spec: SchedulerSpec, field: str
                  ) -> list[tuple[str, SchedulerSpec, str]]:
    """(field, the spec holding it, option name) of every option in the tree, parents first."""
    out: list[tuple[str, SchedulerSpec, str]] = []
    stack = [(spec, field)]
    while stack:
        node, at = stack.pop(0)
        out.extend((f"{at}.options.{k}", node, k) for k in node.options)
        stack.extend((child, f"{at}.options.schedulers.{i}")
                     for i, child in enumerate(node.children))
    return out


def _without(spec: SchedulerSpec, target: SchedulerSpec, key: str) -> SchedulerSpec:
    """``spec`` with ``target``'s option ``key`` left out (torch's default then)."""
    if spec is target:
        return dataclasses.replace(spec, options={k: v for k, v in spec.options.items()
                                                  if k != key})
    return dataclasses.replace(spec, children=[_without(c, target, key)
                                               for c in spec.children])


#: at most this many options are tried one by one to find the one a refusal is about
_MOST_TRIALS = 64


def build(spec: SchedulerSpec, optimizer: torch.optim.Optimizer, field: str) -> Scheduler:
    """Make the scheduler on ``optimizer``; torch's errors become 422 naming the option."""
    fields = option_fields(spec, field)
    try:
        return _construct(spec, optimizer)
    except TORCH_ERRORS as exc:
        raise Invalid(str(exc) or type(exc).__name__, code="invalid_option",
                      field=blame(str(exc), fields, f"{field}.options")) from None


def probe(spec: SchedulerSpec, make_optimizer: Any, field: str,
          check_built: Callable[[torch.optim.Optimizer, Scheduler], None] | None = None,
          children: bool = False) -> None:
    """Build the scheduler on a throwaway optimizer and step both once; ``check_built``
    sees the throwaway and its scheduler as built, before the step. A refusal whose message
    names no option (``(34, 'Numerical result out of range')``, PolynomialLR's ``power: -1e6``;
    ``float division by zero``) names the option whose leaving out (torch's default in its
    place) lets the probe through, the first such in the spec's order, where there is one.
    ``children``: each later child of a SequentialLR is also stepped once after its restart
    (:func:`_probe_restarts`; made by requests: a create logged before this check, which a
    server took, replays as it ran)."""
    try:
        _probe_once(spec, make_optimizer, field, check_built, children)
    except Invalid as exc:
        vague = exc.field in (f"{field}.options", field) or exc.guessed
        if exc.code == "invalid_option" and vague:
            exc.field = _blame_by_trial(spec, make_optimizer, field, check_built,
                                        exc.detail, children) or exc.field
        raise


def _blame_by_trial(spec: SchedulerSpec, make_optimizer: Any, field: str,
                    check_built: Callable[[torch.optim.Optimizer, Scheduler], None] | None,
                    message: str, children: bool = False) -> str | None:
    """The option whose leaving out lets the probe through (the first in the spec's order);
    else, for a division by zero, the first option that is 0; else None."""
    paths = _option_paths(spec, field)
    for at, node, key in paths[:_MOST_TRIALS]:
        default = _signature(node.name).get(key)
        if default is None or default.default is inspect.Parameter.empty \
                or key == "schedulers":
            continue
        try:
            _probe_once(_without(spec, node, key), make_optimizer, field, check_built,
                        children)
        except Invalid:
            continue
        return at
    if "by zero" in message:
        for at, node, key in paths:
            value = node.options[key]
            if type(value) in (int, float) and value == 0:
                return at
    return None


def _probe_once(spec: SchedulerSpec, make_optimizer: Any, field: str,
                check_built: Callable[[torch.optim.Optimizer, Scheduler], None] | None,
                children: bool = False) -> None:
    opt = make_optimizer()
    sched = build(spec, opt, field)
    if check_built is not None:
        check_built(opt, sched)
    fields = option_fields(spec, field)
    try:
        probe_step(opt)
        if spec.name == "ReduceLROnPlateau":
            sched.step(1.0)
        else:
            sched.step()
    except TORCH_ERRORS as exc:
        if isinstance(exc, NotImplementedError):
            # (a first milestone of 1 restarts a later child in this very step: a nested
            # scheduler torch cannot restart is named as at a later milestone, not as a bare
            # "NotImplementedError" of the whole spec)
            _probe_restarts(spec, sched, field)
        raise Invalid(str(exc) or type(exc).__name__, code="invalid_option",
                      field=blame(str(exc), fields, f"{field}.options")) from None
    _probe_restarts(spec, sched, field, children)


def _probe_restarts(spec: SchedulerSpec, sched: Scheduler, field: str,
                    children: bool = False) -> None:
    """At each milestone SequentialLR restarts its next child with ``_update_lr(0)`` and steps
    it from then on; do both on the throwaway now (the restart, then one step where the child
    runs for one), so a child torch cannot restart (a nested ChainedScheduler or SequentialLR
    raises NotImplementedError) or step (PolynomialLR's ``power: -1e6`` overflows at its first
    step) is refused here, naming the child's option, not at its milestone: there every step
    would be refused, all or nothing, and the session could never step past it. The probe's
    own step steps only the child that runs first. ``children``: as :func:`probe`'s (without
    it, only the restarts)."""
    kids = getattr(sched, "_schedulers", None)
    if spec.name not in NESTED or not isinstance(kids, list):
        return
    for i, (child_spec, child) in enumerate(zip(spec.children, kids, strict=True)):
        where = f"{field}.options.schedulers.{i}"
        if spec.name == "SequentialLR" and i > 0:
            try:
                child._update_lr(0)
            except NotImplementedError as exc:  # (a nested scheduler: no option helps)
                raise Invalid(f"SequentialLR cannot switch to {child_spec.name} at its "
                              f"milestone: torch raises {type(exc).__name__}"
                              f"{': ' + str(exc) if str(exc) else ''} when it restarts it",
                              code="invalid_scheduler", field=where) from None
            except TORCH_ERRORS as exc:
                raise _child_refused(child_spec, where, exc, "restart at its milestone"
                                     ) from None
            if children and _runs_after_restart(sched, i):
                try:
                    step(child)
                except TORCH_ERRORS as exc:
                    raise _child_refused(child_spec, where, exc, "step after its milestone"
                                         ) from None
        _probe_restarts(child_spec, child, where, children)


def _runs_after_restart(sched: lr_scheduler.SequentialLR, i: int) -> bool:
    """Whether SequentialLR's child ``i`` (restarted at milestone ``i - 1``) is stepped before
    the next milestone restarts the child after it (the last one always is)."""
    milestones = list(sched._milestones)
    return i == len(milestones) or milestones[i] > milestones[i - 1] + 1


def _child_refused(spec: SchedulerSpec, field: str, exc: Exception, what: str) -> Invalid:
    """torch's refusal of a SequentialLR's child, restarted or stepped on the throwaway as the
    SequentialLR will at its milestone: a 422 naming the child's option in its place (by
    torch's words, else left to :func:`probe`'s trial)."""
    at = blame(str(exc), option_fields(spec, field), f"{field}.options")
    problem = Invalid(f"SequentialLR's {spec.name} ({field}) cannot {what}: torch raises "
                      f"{type(exc).__name__}{': ' + str(exc) if str(exc) else ''}",
                      code="invalid_option", field=at)
    problem.guessed = at == f"{field}.options"
    return problem


def _stepped_leaves(sched: Scheduler) -> list[Scheduler]:
    """The leaf schedulers that ``sched.step()`` will step next. A SequentialLR steps only its
    current child, and at a milestone restarts the next child at epoch 0 instead."""
    if isinstance(sched, lr_scheduler.SequentialLR):
        upcoming = sched.last_epoch + 1
        idx = bisect.bisect_right(sched._milestones, upcoming)
        if idx > 0 and sched._milestones[idx - 1] == upcoming:
            return []
        return _stepped_leaves(sched._schedulers[idx])
    kids = getattr(sched, "_schedulers", None)
    if isinstance(kids, list):
        return [leaf for k in kids for leaf in _stepped_leaves(k)]
    return [sched]


def _path_of(sched: Scheduler, leaf: Scheduler, field: str) -> str | None:
    """Where ``leaf`` is in ``sched``'s spec (``scheduler.options.schedulers.1``); None where
    it is ``sched`` itself or not in it."""
    for i, kid in enumerate(getattr(sched, "_schedulers", None) or []):
        at = f"{field}.options.schedulers.{i}"
        if kid is leaf:
            return at
        found = _path_of(kid, leaf, at)
        if found is not None:
            return found
    return None


def capture(optimizer: torch.optim.Optimizer, sched: Scheduler | None) -> Any:
    """The small state a scheduler step changes: every group's options and the scheduler's
    own state. A tensor value (a tensor lr, which torch's schedulers fill in place) is kept as
    the object itself with a copy of its value: :func:`restore` puts the same object back with
    that value, so what shares it (torch's ``defaults["lr"]`` and every group built from the
    defaults hold one tensor) still does."""
    kept = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in optimizer.param_groups]
    values = copy.deepcopy(kept)  # (one copy: tensors shared between groups stay shared)
    return kept, values, None if sched is None else copy.deepcopy(sched.state_dict())


def restore(optimizer: torch.optim.Optimizer, sched: Scheduler | None, saved: Any) -> None:
    """Put back what :func:`capture` saved (the group options, tensor values into the tensors
    they were, and the scheduler's state)."""
    kept, values, sched_state = saved
    for group, objects, options in zip(optimizer.param_groups, kept, values, strict=True):
        for key in [k for k in group if k not in ("params", "param_names") and k not in options]:
            del group[key]
        for key, value in options.items():
            obj = objects[key]
            if isinstance(obj, torch.Tensor):
                with torch.no_grad():
                    obj.copy_(value)
                group[key] = obj
            else:
                group[key] = copy.deepcopy(value)
    if sched is not None and sched_state is not None:
        sched.load_state_dict(copy.deepcopy(sched_state))


def step(sched: Scheduler, metric: float | None = None) -> None:
    """Step a session's scheduler. torch's advice about call order (a manual step before any
    optimizer step) is a warning for a training script's author, not for a service's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if metric is not None or isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step(metric)
        else:
            sched.step()


def dry_run(optimizer: torch.optim.Optimizer, sched: Scheduler, metric: float | None,
            field: str = "scheduler",
            written: Callable[[list[dict[str, Any]]], None] | None = None,
            counters: bool = False, session_id: str | None = None) -> None:
    """Step the scheduler once and put everything back: a scheduler that would raise is refused
    here, before the optimizer or anything else has changed (torch steps the scheduler after
    the optimizer, when a failure could no longer be undone cheaply). ``written(before)`` sees
    the groups as the step left them (``before``: their options as they were), before they are
    put back, and may refuse what it wrote (:mod:`app.engine.scheduler_writes`).
    ``counters``: a step that would count an integer of the scheduler's state past int64
    (``last_epoch``, ``_step_count``, ``num_bad_epochs``, ...) is refused too
    (:func:`refuse_counted_past_int64`). ``session_id`` (the session's id as its path names
    it): the step is one of the session's own (an optimizer step, or the scheduler's by hand),
    so a refusal also says how to step on (every later step would be refused the same way:
    the scheduler's state is as it was)."""
    check_can_step(sched, session_id)
    leaves = _stepped_leaves(sched)
    saved = capture(optimizer, sched)
    try:
        try:
            is_plateau = isinstance(sched, lr_scheduler.ReduceLROnPlateau)
            step(sched, 1.0 if is_plateau and metric is None else metric)
        except TORCH_ERRORS as exc:
            name = type(sched).__name__
            at = _path_of(sched, leaves[0], "scheduler") if len(leaves) == 1 else None
            child = f" (its {type(leaves[0]).__name__}, {at})" if at else ""
            raise Invalid(f"the scheduler cannot step: {name}.step(){child} raises "
                          f"{type(exc).__name__}{': ' + str(exc) if str(exc) else ''}; nothing "
                          f"was changed{way_out(session_id)}", code="scheduler_failed",
                          field=field) from None
        if counters:
            refuse_counted_past_int64(saved[2], sched.state_dict(), "state_dict.scheduler")
        if written is not None:
            written(saved[1])
    finally:
        restore(optimizer, sched, saved)


def refuse_counted_past_int64(before: Any, after: Any, where: str, what: str = "step") -> None:
    """422 ``counter_overflow`` naming the first integer of ``after`` (a state as a step left
    it) that is past int64 and not what ``before`` held there: a count the step took past what
    a state's JSON export, and so its import, holds (an imported ``last_epoch`` of 2**63 - 1,
    stepped). Nothing has changed (the caller steps a copy, or puts the state back). Every step
    of a session with a scheduler asks: a state with no such integer (all but the rarest) is
    passed by one quick walk of ``after``."""
    if not int_outside(after, *INT64):
        return
    held = {str(at): node for node, at in nodes_once(before, where) if type(node) is int}
    for node, at in nodes_once(after, where):
        if type(node) is int and not INT64[0] <= node <= INT64[1] and held.get(str(at)) != node:
            raise Invalid(f"this {what} would count {at} past int64 (to {node}), which no "
                          "state can hold: its export could not be imported; nothing was "
                          "changed. Import a state with a smaller count, or remove the "
                          "scheduler", code="counter_overflow", field=str(at), limit=INT64[1])


#: how many steps ahead a CosineAnnealingWarmRestarts' restarts are checked for a period past
#: int64 (:func:`restart_past_int64`): no session steps this often (285 years at a step a
#: microsecond), and it leaves alone the common ``T_mult`` 2 with a ``T_0`` of a power of two,
#: whose period passes int64 only a few steps before the step count itself does
RESTART_HORIZON = 2**53


def restart_past_int64(state: Any, where: str) -> Invalid | None:
    """The 422 of a scheduler state (``state_dict()``'s, or one being imported; ``where``:
    the field it is at) holding a CosineAnnealingWarmRestarts, at any depth, that would restart
    within :data:`RESTART_HORIZON` steps with a period ``T_i`` (the last one times ``T_mult``)
    past int64: every step from that restart on would be refused (422 ``counter_overflow``:
    no state export or import holds it), though torch in-process carries on with a Python
    int. Named: ``<where>.T_mult`` (a nested one's at ``<where>._schedulers.<i>``). None when
    there is none."""
    if not isinstance(state, dict):
        return None
    for i, child in enumerate(state.get("_schedulers") or []):
        found = restart_past_int64(child, f"{where}._schedulers.{i}")
        if found is not None:
            return found
    counts = [state.get(k) for k in ("T_i", "T_cur", "T_mult", "last_epoch", "T_0")]
    if not all(type(c) is int for c in counts):
        return None
    t_i, t_cur, t_mult, epoch, t_0 = (int(c) for c in counts)  # type: ignore[arg-type]
    if t_mult <= 1 or t_i < 1:
        return None
    # (the step of the next restart, by its own count: a SequentialLR's later child, at -1
    # until its milestone starts it at 0, counts from there)
    epoch = max(epoch, 0)
    at = epoch + max(1, t_i - t_cur)
    while at - epoch <= RESTART_HORIZON:
        t_i *= t_mult
        if t_i > INT64[1]:
            return Invalid(
                f"CosineAnnealingWarmRestarts (T_0 {t_0}, T_mult {t_mult}) would restart at "
                f"its step {at} (its last_epoch) with a period T_i of {t_i}, past int64 "
                "(2**63 - 1), which no session state holds: every step from there on would be "
                "refused (422 counter_overflow). torch in-process goes on with a Python int; "
                f"give a T_mult or T_0 whose periods stay within int64 for {RESTART_HORIZON} "
                "steps",
                code="invalid_option", field=f"{where}.T_mult", limit=INT64[1])
        at += t_i
    return None


def exhausted(sched: Scheduler) -> lr_scheduler.OneCycleLR | None:
    """The OneCycleLR that the next step would take past its total_steps (torch raises), if
    any."""
    for leaf in _stepped_leaves(sched):
        if isinstance(leaf, lr_scheduler.OneCycleLR) and leaf.last_epoch + 1 > leaf.total_steps:
            return leaf
    return None


def way_out(session_id: str | None) -> str:
    """What a refusal of a session's own scheduler step that every later step would meet says
    to do ("" where the refused step is not the session's own: an import, an added group)."""
    if session_id is None:
        return ""
    return (f". The scheduler cannot step from here, so every later step would be refused the "
            f"same way: remove it (PATCH /v1/sessions/{session_id} with {{\"scheduler\": "
            "null}; the param groups keep their current lr) and step again, or import a state "
            "whose scheduler can step")


def check_can_step(sched: Scheduler, session_id: str | None = None) -> None:
    """Refuse before anything changes when stepping would make torch raise (OneCycleLR past
    its total_steps); ``session_id``: as :func:`dry_run`'s."""
    leaf = exhausted(sched)
    if leaf is not None:
        raise Conflict(f"OneCycleLR has run its {leaf.total_steps} total_steps; it cannot "
                       f"step again; nothing was changed{way_out(session_id)}",
                       code="scheduler_exhausted", field="scheduler")
