"""Operations on parameters and param groups: ``overwrite``, ``add_group``, ``update_group``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import optimizers, schedulers, shared_options
from app.engine.idempotency import refusal
from app.engine.interface import GroupSpec, ParamsResult, SessionInfo, Tensors
from app.engine.ops.base import Operation, register
from app.engine.option_values import (
    check_scheduler_group_keys,
    refuse_lbfgs_history,
    refuse_nonfinite_options,
)
from app.engine.rounds import DiscardedPush, discarded_push
from app.engine.session import (
    Session,
    check_param_name,
    check_param_tensor,
    flat_block,
    group_dtype,
    refuse_nonfinite_params,
    torch_group,
)
from app.errors import Invalid

_PROBE_NAME = "__optserve_probe__"


@register
@dataclass
class Overwrite(Operation):
    """Copy new values into parameters (``PUT .../params``). In a sync session it discards
    the gradients gathered for the old values (:mod:`app.engine.rounds`): ``discarded``, the
    keyed pushes it answers with 409 ``stale_gradient``, is set by the host under the
    session's lock and logged with it."""

    kind = "overwrite"
    bumps_version = True
    params: Tensors
    discarded: list[DiscardedPush] = field(default_factory=list)

    def check(self, s: Session) -> Tensors:
        if not self.params:
            raise Invalid("give at least one parameter", code="invalid_params", field="params")
        s.check_tensors(self.params, "params")
        on_device = s.on_device(self.params)
        if s.nonfinite != "allow":
            refuse_nonfinite_params(on_device, "params")
        return on_device

    def apply(self, s: Session, plan: Tensors) -> ParamsResult:
        with torch.no_grad():
            for name, t in plan.items():
                s.params[name].copy_(t)
        s.version += 1
        s.replaced = (s.version, self.kind)
        return ParamsResult(s.version, s.step_count, s.lrs(), s.pack_params(list(plan)))

    def refusals(self, s: Session) -> list[tuple[str, str, dict[str, Any]]]:
        return discarded_answers(self.kind, self.discarded, s.version)

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {"params": self.params}
        if self.discarded:
            tree["discarded"] = [d.to_json() for d in self.discarded]
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Overwrite:
        return cls(dict(tree["params"]), [DiscardedPush.from_json(d)
                                          for d in tree.get("discarded") or []])


def discarded_answers(kind: str, discarded: list[DiscardedPush], version: int
                      ) -> list[tuple[str, str, dict[str, Any]]]:
    """What the keyed pushes whose round an operation of ``kind`` discarded are answered,
    the session at ``version`` after it (its table keeps them: retries get the same 409)."""
    return [(d.key, d.fingerprint, refusal(discarded_push(kind, d.worker, d.base_version,
                                                          version)))
            for d in discarded]


@dataclass
class GroupPlan:
    options: dict[str, Any]
    params: Tensors


@register
@dataclass
class AddParamGroup(Operation):
    """``optimizer.add_param_group``: new named parameters with options of their own."""

    kind = "add_group"
    params: Tensors
    options: dict[str, Any]
    #: set by requests: also refuses what servers before it accepted (a group the session's
    #: scheduler would fail on at a later step, :data:`TAKE_ADDED_GROUPS`; non-finite values
    #: unless the session allows them; non-finite options). It travels with the operation;
    #: records logged before these checks existed lack it and replay as they ran
    request: bool = False
    #: the most param groups the session may have after it (a request's bound)
    max_groups: int | None = None
    #: set by requests: a tensor ``lr`` is checked against the parameters' dtype by its value
    #: (422 ``option_overflow``). Logged; records logged before this check lack it and replay
    #: as they ran
    tensor_range: bool = False
    #: the most parameter elements the session may hold after it (a request's bound,
    #: ``OPTSERVE_MAX_SESSION_ELEMENTS``), checked here, under the session's lock: groups
    #: added at once each fitting the session as it was could pass it together
    max_elements: int | None = None
    #: the most parameters the session may hold after it (a request's bound,
    #: ``OPTSERVE_MAX_SESSION_PARAMS``), checked here for the same reason
    max_params: int | None = None
    #: set by requests: a Muon ``lr`` its step would scale past the dtype's range for the
    #: group's parameter shapes is refused (422 ``option_overflow``). Logged; records logged
    #: before this check lack it and replay as they ran (servers before it took one)
    scaled_lr: bool = False

    def check(self, s: Session) -> GroupPlan:
        index = len(s.optimizer.param_groups)
        where = f"param_groups.{index}"
        if self.max_groups is not None:
            check_group_count(index + 1, self.max_groups)
        if self.max_elements is not None:
            check_element_count(sum(p.numel() for p in s.params.values())
                                + sum(t.numel() for t in self.params.values()),
                                self.max_elements)
        if self.max_params is not None:
            check_param_count(len(s.params) + len(self.params), self.max_params)
        opts = optimizers.normalize_options(s.cls, self.options, where)
        for name, t in self.params.items():  # (none: torch takes an empty group too)
            check_param_name(name, f"{where}.params")
            if name in s.params:
                raise Invalid(f"parameter {name!r:.60} is already in this session",
                              code="invalid_params", field=f"{where}.params.{name}")
            check_param_tensor(name, t, f"{where}.params.{name}")
        if self.request:
            refuse_nonfinite_options(s.optimizer_name, opts, where)
            refuse_lbfgs_history(s.optimizer_name, opts, where)
            if s.nonfinite != "allow":
                refuse_nonfinite_params(self.params, f"{where}.params")
        dtype = group_dtype(self.params)
        fields = {k: f"{where}.{k}" for k in opts}
        optimizers.check_overflow({**s.defaults, **opts}, dtype, where, self.tensor_range)
        optimizers.probe(s.cls, s.defaults, [*s.group_options(), opts],
                         [*s.group_dtypes(), dtype], s.device, fields, where, check=[index])
        if self.scaled_lr and s.cls is torch.optim.Muon:  # (by the parameters' own shapes)
            why = optimizers.muon_lr_overflow(
                {**s.optimizer.defaults, **opts, "params": list(self.params.values()),
                 "param_names": list(self.params)}, dtype)
            if why is not None:
                raise Invalid(why, code="option_overflow", field=f"{where}.lr")
        if s.scheduler is not None:
            if self.request and not takes_added_groups(s.scheduler):
                raise Invalid(f"the session's scheduler ({type(s.scheduler).__name__}) keeps "
                              "per-group values made when it was made (torch would fail on a "
                              "group added later at some later step); add the group before "
                              "attaching a scheduler, or use StepLR, MultiStepLR, "
                              "ExponentialLR, LinearLR, ConstantLR, PolynomialLR or "
                              "ReduceLROnPlateau", code="scheduler_incompatible", field=where)
            _scheduler_takes_group(s, opts, dtype, where)
        return GroupPlan(opts, flat_block(self.params, s.device))

    def apply(self, s: Session, plan: GroupPlan) -> SessionInfo:
        try:
            s.optimizer.add_param_group(torch_group(list(plan.params.items()), plan.options))
        except optimizers.TORCH_ERRORS as exc:  # torch checks before it appends anything
            raise Invalid(str(exc), code="invalid_option",
                          field=f"param_groups.{len(s.optimizer.param_groups)}") from None
        s.params.update(plan.params)
        s.group_spec_options.append(dict(self.options))
        info = s.describe()
        info.added_group = len(s.optimizer.param_groups) - 1
        return info

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {"params": self.params, "options": self.options}
        if self.request:
            tree["request"] = True
        if self.max_groups is not None:
            tree["max_groups"] = self.max_groups
        if self.tensor_range:
            tree["tensor_range"] = True
        if self.max_elements is not None:
            tree["max_elements"] = self.max_elements
        if self.max_params is not None:
            tree["max_params"] = self.max_params
        if self.scaled_lr:
            tree["scaled_lr"] = True
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> AddParamGroup:
        bound, elements = tree.get("max_groups"), tree.get("max_elements")
        params = tree.get("max_params")
        return cls(dict(tree["params"]), dict(tree["options"]),
                   tree.get("request") is True, bound if type(bound) is int else None,
                   tree.get("tensor_range") is True,
                   elements if type(elements) is int else None,
                   params if type(params) is int else None,
                   scaled_lr=tree.get("scaled_lr") is True)

    def group(self) -> GroupSpec:
        return GroupSpec(self.params, self.options)


def check_element_count(n: int, limit: int) -> None:
    """422 ``session_too_large`` for a session of ``n`` parameter elements past ``limit``
    (``OPTSERVE_MAX_SESSION_ELEMENTS``; 0: none)."""
    _within(n, limit, "parameter elements", "OPTSERVE_MAX_SESSION_ELEMENTS", "session_too_large")


#: torch's ``LBFGS`` default ``history_size``
LBFGS_HISTORY = 100


def check_lbfgs_history(n: int, history_size: Any, limit: int, field: str) -> None:
    """422 ``session_too_large`` for an LBFGS session of ``n`` parameter elements whose history
    would take it past ``limit`` (``OPTSERVE_MAX_SESSION_ELEMENTS``; 0: none). LBFGS keeps
    ``2 * history_size`` vectors of every parameter's elements between steps (``old_dirs``,
    ``old_stps``), so the limit counts them with the parameters. A ``history_size`` that is
    not an integer of at least 1 (whose second step fails in torch) is left to
    :func:`app.engine.option_values.refuse_lbfgs_history`, which every create, PATCH and
    import runs: a 422 ``invalid_option`` whether or not there is a limit."""
    if not limit or type(history_size) is not int or history_size < 1:
        return
    total = n * (1 + 2 * history_size)
    if total > limit:
        raise Invalid(f"the session would hold {total} elements: {n} parameter elements and "
                      f"an LBFGS history of 2 x history_size ({history_size}) vectors of "
                      f"them; the limit (OPTSERVE_MAX_SESSION_ELEMENTS) is {limit}",
                      code="session_too_large", field=field, limit=limit)


def check_param_count(n: int, limit: int) -> None:
    """422 ``too_many_params`` for a session of ``n`` parameters (tensors) past ``limit``
    (``OPTSERVE_MAX_SESSION_PARAMS``; 0: none)."""
    _within(n, limit, "parameters (tensors)", "OPTSERVE_MAX_SESSION_PARAMS", "too_many_params")


def _within(n: int, limit: int, what: str, setting: str, code: str) -> None:
    """A 422 ``code`` naming ``params`` when a session would hold ``n`` of ``what``, past the
    ``limit`` of ``setting`` (0: none)."""
    if limit and n > limit:
        raise Invalid(f"the session would hold {n} {what}; the limit ({setting}) is {limit}",
                      code=code, field="params", limit=limit)


def check_group_count(n: int, limit: int) -> None:
    """422 ``too_many_param_groups`` for a session of ``n`` param groups past ``limit``
    (torch's ``add_param_group`` compares each new group with every one before it)."""
    if n > limit:
        raise Invalid(f"the session would have {n} param groups; at most {limit} are "
                      "allowed", code="too_many_param_groups", field="param_groups",
                      limit=limit)


#: schedulers that take each group's lr from its own ``lr`` at every step (torch's chainable
#: form), so that a group added after them steps with them for good. The others keep
#: per-group lists made with them (``base_lrs``, CyclicLR's and OneCycleLR's bounds) that
#: torch zips with the groups at some step, and fail on an added group there: CyclicLR,
#: OneCycleLR and CosineAnnealingWarmRestarts at the next step, CosineAnnealingLR at
#: ``T_max + 1``, SequentialLR at its first milestone
TAKE_ADDED_GROUPS = frozenset({"StepLR", "MultiStepLR", "ExponentialLR", "LinearLR",
                               "ConstantLR", "PolynomialLR", "ReduceLROnPlateau"})


def takes_added_groups(scheduler: Any) -> bool:
    """Whether a group added after ``scheduler`` steps with it at every later step (a
    ReduceLROnPlateau given one ``min_lr`` per group fails at its next reduction)."""
    name = type(scheduler).__name__
    if name == "ChainedScheduler":
        return all(map(takes_added_groups, scheduler._schedulers))
    if name == "ReduceLROnPlateau":
        return getattr(scheduler, "default_min_lr", None) is not None
    return name in TAKE_ADDED_GROUPS


def _scheduler_takes_group(s: Session, opts: dict[str, Any], dtype: torch.dtype,
                           where: str) -> None:
    """Refuse a group the session's scheduler could not step with (CyclicLR, OneCycleLR and
    others keep per-group lists sized at construction: torch would raise at the next step).
    The trial group holds what torch's ``add_param_group`` gives it: the optimizer's defaults
    under the group's own options (``s.defaults`` holds only the options the create gave: a
    group added without an ``lr`` to a session made without one was refused, the scheduler's
    trial step raising ``KeyError: 'lr'``)."""
    assert s.scheduler is not None
    placeholder = torch.zeros(1, dtype=dtype, device=s.device)
    groups = s.optimizer.param_groups
    groups.append({**optimizers.fresh({**s.optimizer.defaults, **opts}),
                   "params": [placeholder], "param_names": [_PROBE_NAME]})
    try:
        schedulers.dry_run(s.optimizer, s.scheduler, None, field=where)
    except Invalid as exc:
        raise Invalid(f"the session's scheduler ({type(s.scheduler).__name__}) cannot take a "
                      f"new param group: {exc.detail}", code="scheduler_incompatible",
                      field=where) from None
    finally:
        groups.pop()
        s.optimizer.state.pop(placeholder, None)


@register
@dataclass
class UpdateParamGroup(Operation):
    """Change one group's options (``PATCH .../param_groups/{i}``), validated with torch's own
    constructor checks on the whole resulting group."""

    kind = "update_group"
    index: int
    options: dict[str, Any]
    #: set by requests: also refuses what servers before it accepted (non-finite options,
    #: scheduler-kept keys out of range: :func:`check_group_changes`). It travels with the
    #: operation; records logged before these checks existed lack it and replay as they ran
    request: bool = False
    #: set by requests: a tensor ``lr`` is checked against the parameters' dtype by its value
    #: (422 ``option_overflow``). Logged; records logged before this check lack it and replay
    #: as they ran
    tensor_range: bool = False
    #: the most elements the session may hold after it (a request's bound,
    #: ``OPTSERVE_MAX_SESSION_ELEMENTS``): an LBFGS ``history_size`` is checked against it
    #: with the session's elements (:func:`check_lbfgs_history`). Logged; records
    #: logged before this check lack it and replay as they ran
    max_elements: int | None = None
    #: set by requests: one that changes no option (``{}``, or the values the group holds)
    #: is no revision (:meth:`changes`). Logged; records logged before it lack it and replay
    #: as they ran (each a revision)
    noop_kept: bool = False
    #: set by requests: a Muon ``lr`` its step would scale past the dtype's range for the
    #: group's parameter shapes is refused (:func:`check_group_changes`). Logged; records
    #: logged before this check lack it and replay as they ran (servers before it took one)
    scaled_lr: bool = False

    def check(self, s: Session) -> dict[str, Any]:
        plan = check_group_changes(s, {self.index: self.options}, index_field="index",
                                   request=self.request, tensors=self.tensor_range,
                                   scaled_lr=self.scaled_lr)[self.index]
        if "history_size" in self.options:
            where = f"param_groups.{self.index}.history_size"
            if self.request:
                check_history_fits(s, self.options["history_size"], where)
            if self.max_elements is not None and s.optimizer_name == "LBFGS":
                check_lbfgs_history(sum(p.numel() for p in s.params.values()),
                                    self.options["history_size"], self.max_elements, where)
        return plan

    def changes(self, s: Session, plan: dict[str, Any]) -> bool:
        return not self.noop_kept or not shared_options.holds_already(
            s.optimizer.param_groups[self.index], plan)

    def apply(self, s: Session, plan: dict[str, Any]) -> SessionInfo:
        shared_options.apply_changes(s.optimizer.param_groups, {self.index: plan})
        return s.describe()

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {"index": self.index, "options": self.options}
        if self.request:
            tree["request"] = True
        if self.tensor_range:
            tree["tensor_range"] = True
        if self.max_elements is not None:
            tree["max_elements"] = self.max_elements
        if self.noop_kept:
            tree["noop_kept"] = True
        if self.scaled_lr:
            tree["scaled_lr"] = True
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> UpdateParamGroup:
        bound = tree.get("max_elements")
        return cls(int(tree["index"]), dict(tree["options"]), tree.get("request") is True,
                   tree.get("tensor_range") is True, bound if type(bound) is int else None,
                   tree.get("noop_kept") is True, scaled_lr=tree.get("scaled_lr") is True)


def check_history_fits(s: Session, history_size: Any, field: str) -> None:
    """422 ``invalid_option`` for an LBFGS ``history_size`` changed after the session stepped
    to one torch's next steps fail with. torch drops its oldest curvature pair only when the
    history is exactly ``history_size`` long, and sizes its scratch list ``al`` once, at the
    first pair it keeps: below the pairs the history holds, the history grows past ``al`` (an
    ``IndexError`` some step later, and no bound on its memory until then); above ``al``'s
    length, it grows past it too. So the new size must lie between the two (a session that has
    kept no pair yet takes any). What torch's constructor refuses, and sizes that are no whole
    number of at least 1, are refused by the options' own checks."""
    if s.optimizer_name != "LBFGS" or type(history_size) is not int:
        return
    for st in s.optimizer.state.values():
        dirs, al = st.get("old_dirs"), st.get("al")
        held = len(dirs) if isinstance(dirs, list) else 0
        room = len(al) if isinstance(al, list) else None
        if history_size < held or (room is not None and history_size > room):
            span = (f"from {held} to {room}" if room is not None else f"at least {held}")
            raise Invalid(f"history_size {history_size} does not fit the history this LBFGS "
                          f"session holds ({held} curvature pairs"
                          + (f", a scratch list of {room}" if room is not None else "")
                          + "): torch drops its oldest pair only at exactly history_size and "
                          "sizes its scratch list once, so its steps would fail from some "
                          f"next step on; give a size {span}, or import a state made with "
                          "the size you want", code="invalid_option", field=field)


def check_group_indexes(count: int, indexes: Iterable[int], prefix: str = "param_groups",
                        index_field: str | None = None) -> None:
    """Each of ``indexes`` names one of a session's ``count`` groups, else a 422
    ``unknown_param_group`` naming it: also one whose entry changes nothing (a step's ``{}``
    or ``null`` for a group the session lacks is a client's mistake, not a no-op)."""
    for index in indexes:
        if type(index) is not int or not 0 <= index < count:
            raise Invalid(f"param group {index} does not exist; this session has {count}",
                          code="unknown_param_group", field=index_field or f"{prefix}.{index}")


def changed_groups(count: int, options: dict[int, dict[str, Any]] | None
                   ) -> dict[int, dict[str, Any]] | None:
    """A step's option changes without its entries that change nothing, once every entry is
    checked to name one of the session's ``count`` groups (:func:`check_group_indexes`)."""
    if not options:
        return None
    check_group_indexes(count, options)
    return {index: opts for index, opts in options.items() if opts} or None


def check_group_changes(s: Session, changes: dict[int, dict[str, Any]],
                        prefix: str = "param_groups",
                        index_field: str | None = None,
                        request: bool = False, tensors: bool = False,
                        scaled_lr: bool = False) -> dict[int, dict[str, Any]]:
    """Option changes for some groups (by index), validated with torch's own constructor
    checks on each whole resulting group, whatever it held before, and against the dtype of
    its parameters; the constructor values to set, by index, for
    :func:`shared_options.apply_changes`. ``index_field`` names where an unknown index came
    from (``PATCH``: its path's ``index``), else ``prefix.index``. A ``request`` (not a logged
    record) is also refused a non-finite option and a scheduler-kept key out of range
    (``initial_lr: -5``), which torch's checks let through; ``tensors``: a tensor ``lr`` past
    the dtype's range too (422 ``option_overflow``), which some of torch's step functions take
    and make the parameters infinite with; ``scaled_lr``: a Muon ``lr`` its step would scale
    past the range of the dtype it converts it to, for the group's own parameter shapes
    (:func:`optimizers.muon_lr_overflow`, the create's check; 422 ``option_overflow``), which
    torch's constructor and a throwaway step over tiny square parameters take: a PATCH took
    it, then every step was refused until it was changed back.

    An option an entry's ``$fill`` lists (:data:`shared_options.FILL`) is filled into the
    tensor the group holds: every group holding that tensor (torch's defaults and the groups
    built from them hold one) is checked with the value the fill leaves there. One that holds
    a number there is replaced, as without ``$fill`` (nothing else holds it)."""
    groups = s.optimizer.param_groups
    current = s.group_options()
    proposed = [dict(g) for g in current]
    # the objects each group's options hold as the changes before it in ``changes`` leave them
    # (a replaced value shares nothing any more)
    held = [dict(g) for g in current]
    out: dict[int, dict[str, Any]] = {}
    fields: dict[str, str] = {}
    group_fields: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
    checked: list[int] = []
    check_group_indexes(len(groups), changes, prefix, index_field)
    for index, options in changes.items():
        where = f"{prefix}.{index}"
        given, fills = shared_options.take_fills(options, where)
        opts = optimizers.normalize_options(s.cls, given, where, current[index])
        if request:
            refuse_nonfinite_options(s.optimizer_name, opts, where)
            refuse_lbfgs_history(s.optimizer_name, opts, where)
            check_scheduler_group_keys(s.cls, opts, where)
        proposed[index].update(opts)
        plan = dict(opts)
        sharers: list[int] = []
        filling: list[str] = []
        for key in opts:
            target = held[index].get(key)
            if key not in fills or not isinstance(target, torch.Tensor):
                held[index][key] = object()
                continue
            plan[key] = shared_options.fill_value(opts[key], f"{where}.{key}")
            filling.append(key)
            after = shared_options.filled(target, plan[key], f"{where}.{key}")
            for j, slots in enumerate(held):
                for name, value in slots.items():
                    if value is target:
                        proposed[j][name] = after
                        if j != index:
                            sharers.append(j)
        if filling:
            plan[shared_options.FILL] = filling
        out[index] = plan
        # the whole resulting group is checked: name the option given, else the one torch names
        fields.update({k: f"{where}.{k}" for k in proposed[index]})
        fields.update({k: f"{where}.{k}" for k in opts})
        for j in [index, *sharers]:
            at = f"{prefix}.{j}"
            sent = {k: f"{where}.{k}" for k in (opts if j == index else filling)}
            group_fields[j] = (sent, {**{k: f"{at}.{k}" for k in proposed[j]}, **sent})
            optimizers.check_overflow(proposed[j], s.group_dtypes()[j], at, tensors)
            if j not in checked:
                checked.append(j)
    if out:
        optimizers.probe(s.cls, s.defaults, proposed, s.group_dtypes(), s.device, fields,
                         f"{prefix}.{next(iter(out))}", check=sorted(checked),
                         group_fields=group_fields)
        for index in checked:
            optimizers.check_state_for_options(
                s.cls, proposed[index], [s.optimizer.state.get(p, {})
                                         for p in groups[index]["params"]], f"{prefix}.{index}")
        if scaled_lr and s.cls is torch.optim.Muon:
            _refuse_scaled_lr(s, proposed, checked, group_fields, prefix)
    return out


def _refuse_scaled_lr(s: Session, proposed: list[dict[str, Any]], checked: list[int],
                      group_fields: dict[int, tuple[dict[str, str], dict[str, str]]],
                      prefix: str) -> None:
    """422 ``option_overflow`` for a Muon group whose changed options (``proposed``) its step
    would scale the ``lr`` of past the dtype's range over the group's own parameters, naming
    the ``lr`` sent, else the ``adjust_lr_fn`` sent (``match_rms_adamw`` scales by the larger
    side), else the group's ``lr``."""
    groups, dtypes = s.optimizer.param_groups, s.group_dtypes()
    for j in checked:
        why = optimizers.muon_lr_overflow(
            {**proposed[j], "params": groups[j]["params"],
             "param_names": groups[j].get("param_names")}, dtypes[j])
        if why is not None:
            sent = group_fields.get(j, ({}, {}))[0]
            raise Invalid(why, code="option_overflow",
                          field=sent.get("lr") or sent.get("adjust_lr_fn") or f"{prefix}.{j}.lr")
