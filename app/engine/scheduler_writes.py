"""What a scheduler's step may write into a session's param groups.

torch's schedulers write each group's ``lr`` at every step (CyclicLR and OneCycleLR also its
``momentum``, or beta1 of its ``betas``) and check nothing. A schedule that grows (ExponentialLR,
StepLR or MultiStepLR with gamma > 1, CyclicLR's ``exp_range`` with gamma > 1, PolynomialLR
with a negative power) takes them, some steps later, where the session can no longer use them:

- past the range of the parameters' dtype (``lr: 1e59`` for float32 parameters): torch's next
  ``optimizer.step()`` raises "value cannot be converted ... without overflow", so every later
  step was refused and the session's export was refused by its own import (stuck for good);
- to an infinity or NaN (an option must be finite everywhere else);
- a ``momentum`` below 0, or a beta of ``betas`` outside [0, 1) (CyclicLR's ``exp_range``
  cycling momentum): values torch's constructors refuse, so the session's export did not
  import into another session.

A step, or a scheduler step by hand, asked for now whose scheduler step would write such a
value is refused whole, before anything changes: 409 ``scheduler_out_of_range`` naming the
group key (``param_groups.0.lr``). The client changes the group's lr (``PATCH
.../param_groups/{i}``: the chainable schedulers take it from there) or removes the scheduler
(``PATCH /v1/sessions/{id}`` with ``{"scheduler": null}``), and steps again. An lr below zero
is taken: a schedule that ends at 0 (LinearLR's ``end_factor: 0``) lands a hair below it in
torch's own arithmetic, and an import takes the lr the scheduler's state says it wrote
(:func:`app.engine.state_dicts.prepare_import`). Records logged before this check replay as
they ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from app.engine.optimizers import float_max
from app.engine.option_values import float_words, nonfinite_values
from app.errors import Conflict
from app.wire.tree import tree_to_json

if TYPE_CHECKING:
    from app.engine.session import Session

#: group keys that are not options
_NOT_OPTIONS = ("params", "param_names")


def _same(a: Any, b: Any) -> bool:
    """Whether the step left a value as it was (NaN as NaN: only what it changes is checked)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype
                and bool(((a == b) | (a.isnan() & b.isnan())).all()))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if type(a) is float and type(b) is float and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _floats(value: Any) -> Iterable[float]:
    """The plain floats of an option value (a number, or a tuple of them such as ``betas``)."""
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if type(v) is float:
            yield v


def out_of_range(key: str, value: Any, dtype: torch.dtype) -> str | None:
    """Why a value a scheduler writes under ``key`` cannot stay in a group of ``dtype``
    parameters (None: it can)."""
    for _, x in nonfinite_values(value, key):
        return f"{float_words(x)}: an option must be a finite number"
    if dtype.is_floating_point:
        top = float_max(dtype)
        for x in _floats(value):
            if abs(x) > top:
                return (f"beyond the range of the parameters' dtype "
                        f"({str(dtype).removeprefix('torch.')}): torch's next step would "
                        "overflow")
    if key == "momentum" and any(x < 0 for x in _floats(value)):
        return "a negative momentum, which torch refuses"
    if key == "betas" and any(not 0.0 <= x < 1.0 for x in _floats(value)):
        return "a beta outside [0, 1), which torch refuses"
    return None


def check_written(scheduler: str, before: Sequence[dict[str, Any]],
                  groups: Sequence[dict[str, Any]], dtypes: Sequence[torch.dtype],
                  by_hand: bool = False) -> None:
    """409 ``scheduler_out_of_range`` when ``scheduler``'s step (just taken on the groups, to be
    put back by the caller) wrote a value :func:`out_of_range` refuses into some group: the
    first, naming it. ``before``: the groups' options as they were before that step;
    ``by_hand``: a scheduler step by hand (``POST .../scheduler/step``), not an optimizer
    step's."""
    what = f"this {scheduler} step" if by_hand else f"this step's {scheduler} step"
    for i, (old, group, dtype) in enumerate(zip(before, groups, dtypes, strict=True)):
        for key, value in group.items():
            if key in _NOT_OPTIONS or (key in old and _same(old[key], value)):
                continue
            why = out_of_range(key, value, dtype)
            if why is None:
                continue
            shown = tree_to_json(value)
            raise Conflict(
                f"{what} would set param_groups.{i}.{key} to "
                f"{shown!r}, {why}. The step was refused and nothing changed: change the "
                f"group's lr (PATCH .../param_groups/{i}) or remove the scheduler (PATCH "
                "/v1/sessions/{id} with {\"scheduler\": null}), then step again",
                code="scheduler_out_of_range", field=f"param_groups.{i}.{key}",
                value=shown, scheduler=scheduler)


def written_check(s: Session, by_hand: bool = False) -> Callable[[list[dict[str, Any]]], None]:
    """The ``written`` check of :func:`app.engine.schedulers.dry_run` for the session's
    scheduler: :func:`check_written` on its groups."""
    name = type(s.scheduler).__name__

    def check(before: list[dict[str, Any]]) -> None:
        check_written(name, before, s.optimizer.param_groups, s.group_dtypes(), by_hand)
    return check
