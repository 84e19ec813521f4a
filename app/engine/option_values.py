"""Checks on option values that torch's own validation lets through, made on requests only
(records logged before them replay as they ran): non-finite numbers in optimizer options,
scheduler options and scheduler state, and scheduler-kept group keys (``initial_lr``, ...)
out of range.

torch's constructors test ``0.0 <= lr`` and the like, which a NaN fails but an infinity
passes (an ``lr``, ``eps``, ``weight_decay`` or ``momentum`` of inf), and check nothing of
what a scheduler is given or keeps (``gamma: NaN``) or of the keys a scheduler adds to a group
(``initial_lr: -5``): the next step then makes the parameters NaN or infinite, or steps them
the wrong way. Such a value is a 422 ``invalid_option`` naming it, whatever the session's
``nonfinite`` policy (that policy is about gradient, parameter and state values, which a
model's arithmetic makes; an option is the client's choice, and a non-finite one is always a
mistake).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from app.engine.optimizers import default_options
from app.errors import Invalid
from app.wire.json_tensor import decode_json_tensor, is_json_tensor
from app.wire.tree import is_float_tag, untag_float
from app.wire.tree_path import TreePath

#: the options where +inf means something (a bound that is not there), as torch takes it:
#: Adafactor's update-clipping threshold ``d`` (no clipping), ASGD's ``t0`` (never start
#: averaging), Rprop's largest step size (``step_sizes.1``: no cap). NaN is refused in every
#: option, and -inf too.
INF_OPTIONS = frozenset({("Adafactor", "d"), ("ASGD", "t0"), ("Rprop", "step_sizes.1")})
#: the same, each as the optimizer and the keys of its path (``("Rprop", "step_sizes", 1)``)
_INF_KEYS = frozenset((name, *(int(k) if k.isdigit() else k for k in option.split(".")))
                      for name, option in INF_OPTIONS)
#: scheduler state keys that hold an infinity by design (ReduceLROnPlateau's ``best`` before
#: its first metric, and ``mode_worse``)
INF_SCHEDULER_STATE = frozenset({"best", "mode_worse"})
#: the keys torch's schedulers add to a param group that hold a learning rate (>= 0, as torch
#: refuses a negative ``lr``) and a momentum (>= 0; below 1 where it becomes Adam's beta1)
LR_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")
MOMENTUM_GROUP_KEYS = ("base_momentum", "max_momentum")


def nonfinite_values(value: Any, path: str) -> Iterator[tuple[TreePath, float]]:
    """Each non-finite number in ``value`` (a float, a ``{"$float": ...}`` tag, a tensor or a
    JSON tensor, lists and objects of those), with its path, in the order written. Values
    that are not numbers, or are malformed, are left to the checks that refuse them. Walked
    with one iterator per level, not by recursion: a request's value may be nested as deep as
    its JSON text (1,024 levels), past Python's recursion limit; and no path is written but
    where a caller names one (a path string per item was a copy of the keys above it: a list
    of 50,000 under a key of 20,000 characters, a 170 KB body, held 1 GB)."""
    levels: list[Iterator[tuple[Any, TreePath]]] = [iter([(value, TreePath(path))])]
    while levels:
        entry = next(levels[-1], None)
        if entry is None:
            levels.pop()
            continue
        value, at = entry
        if type(value) is float:
            if not math.isfinite(value):
                yield at, value
        elif is_float_tag(value):
            try:
                yield at, untag_float(value, str(at), "invalid_option")
            except (Invalid, TypeError):  # malformed: the option's own check refuses it
                continue
        elif isinstance(value, torch.Tensor) or is_json_tensor(value):
            if not isinstance(value, torch.Tensor):
                try:
                    value = decode_json_tensor(value, at, canonical=False)
                except Invalid:
                    continue
            if (value.layout == torch.strided and value.is_floating_point() and value.numel()
                    and not bool(torch.isfinite(value).all())):
                yield at, float(value[~torch.isfinite(value)].reshape(-1)[0].item())
        elif isinstance(value, Mapping):
            levels.append(_children(value.items(), at))
        elif isinstance(value, (list, tuple)):
            levels.append(_children(enumerate(value), at))


def _children(items: Iterable[tuple[object, Any]], at: TreePath
              ) -> Iterator[tuple[Any, TreePath]]:
    for k, v in items:
        yield v, at.child(k)


def float_words(x: float) -> str:
    """How a problem's detail names a non-finite number."""
    return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def refuse_nonfinite_options(optimizer: object, options: object, where: str) -> None:
    """422 ``invalid_option`` naming the first option of ``options`` (an optimizer's or a
    group's, raw JSON or normalized) holding a NaN or an infinity, but for +inf in
    :data:`INF_OPTIONS`."""
    if not isinstance(options, Mapping):
        return  # (not an object: normalize_options refuses it)
    name = optimizer if isinstance(optimizer, str) else ""
    for key, value in options.items():
        for at, x in nonfinite_values(value, str(key)):
            if x == math.inf and at.depth <= 1 and (name, *at.keys()) in _INF_KEYS:
                continue
            path = str(at)
            allowed = sorted(f"{o}'s {p}" for o, p in INF_OPTIONS if o == name)
            note = f" (+inf is taken only for {', '.join(allowed)})" if allowed else ""
            raise Invalid(f"{path} is {float_words(x)}: an option must be a finite number{note}; "
                          "the next step would make the parameters NaN or infinite",
                          code="invalid_option", field=f"{where}.{path}")


def refuse_nonfinite_scheduler(spec: object, where: str = "scheduler") -> None:
    """422 ``invalid_option`` naming the first NaN or infinity in a scheduler spec's options
    (nested schedulers' too): ``scheduler.options.gamma``."""
    if not isinstance(spec, Mapping):
        return  # (parse_spec refuses it)
    for at, x in nonfinite_values(spec.get("options"), f"{where}.options"):
        path = str(at)
        raise Invalid(f"{path.removeprefix(where + '.options.')} is {float_words(x)}: a "
                      "scheduler's options must be finite numbers; its next step would make "
                      "the learning rate NaN or infinite", code="invalid_option", field=path)


def refuse_nonfinite_scheduler_state(state: object, where: str, live: object) -> None:
    """422 ``invalid_state`` naming the first NaN or infinity in an imported scheduler state,
    but for ±inf in :data:`INF_SCHEDULER_STATE` (ReduceLROnPlateau's ``best``,
    ``mode_worse``) and what the ``live`` state holds at the same place (a session's own
    export imports back)."""
    held = {str(at): float_words(x) for at, x in nonfinite_values(live, where)}
    for at, x in nonfinite_values(state, where):
        if math.isinf(x) and at.key in INF_SCHEDULER_STATE:
            continue
        path = str(at)  # (written for one not held at most: that one is refused)
        if held.get(path) == float_words(x):
            continue
        raise Invalid(f"{path.removeprefix(where + '.')} is {float_words(x)}: a scheduler's "
                      "state must hold finite numbers (its next step would make the learning "
                      "rate NaN or infinite)", code="invalid_state", field=path)


def check_scheduler_group_keys(cls: type[torch.optim.Optimizer], options: Mapping[str, Any],
                               where: str) -> None:
    """422 ``invalid_option`` for a scheduler-kept group key out of range: a negative
    ``initial_lr``/``max_lr``/``min_lr`` (torch refuses such an ``lr``), a negative
    ``base_momentum``/``max_momentum``, or one of 1 or more for an optimizer with ``betas``
    (OneCycleLR makes it the group's beta1, which torch keeps below 1)."""
    betas = "betas" in default_options(cls)
    for key in (*LR_GROUP_KEYS, *MOMENTUM_GROUP_KEYS):
        if key not in options:
            continue
        value = _number(options[key])
        if value is None or math.isnan(value):
            continue  # (not a number, or NaN: refused by their own checks)
        if value < 0:
            what = "learning rate" if key in LR_GROUP_KEYS else "momentum"
            raise Invalid(f"Invalid {key}: {_text(options[key])} (a {what}: torch refuses a "
                          "negative one)", code="invalid_option", field=f"{where}.{key}")
        if key in MOMENTUM_GROUP_KEYS and betas and value >= 1:
            raise Invalid(f"Invalid {key}: {_text(options[key])} (OneCycleLR makes it the "
                          "group's beta1, which must be in [0, 1))", code="invalid_option",
                          field=f"{where}.{key}")


def refuse_lbfgs_history(optimizer: object, options: object, where: str) -> None:
    """422 ``invalid_option`` naming an LBFGS ``history_size`` that is not a whole number of
    at least 1 (an ``int``). torch's constructor takes any, and its step fails at the first
    curvature pair it keeps, the second step: 0 pops from an empty history, a negative number
    makes ``al`` too short, a float (3.0 too) cannot size it; every step of the session from
    there would be refused (``step_failed``), blaming the evaluation."""
    if optimizer != "LBFGS" or not isinstance(options, Mapping) or "history_size" not in options:
        return
    value = options["history_size"]
    if type(value) is int and value >= 1:
        return
    if type(value) is not int and _number(value) is None and not is_float_tag(value):
        return  # (not a number: the options' own check refuses it)
    raise Invalid(f"history_size must be a whole number (an integer), at least 1, not "
                  f"{value!r:.40}: torch's LBFGS keeps that many curvature pairs, and its "
                  "second step fails with any other", code="invalid_option",
                  field=f"{where}.history_size")


def _number(value: Any) -> float | None:
    if type(value) in (int, float):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.item())
    return None



def _text(value: Any) -> str:
    return repr(value) if type(value) in (int, float) else repr(_number(value))
