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
(:func:`app.engine.state_dicts.prepare_import`).

A tensor ``lr`` is checked by its value (a float64 tensor holds values past float32's range:
torch converts it in the step, and raises or makes the parameters infinite). A state import
after which the session's next scheduler step would write such a value is refused whole too,
as a 422 naming the imported key (:func:`import_check`): taken, every step after it would be
refused. Records logged before each of these checks (the operations' ``scheduler_range`` and
``tensor_range`` flags) replay as they ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import torch

from app.engine.optimizers import float_max, muon_lr_overflow, option_numbers, overflow_words
from app.engine.option_values import float_words, nonfinite_values
from app.errors import Conflict, Invalid
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


def out_of_range(key: str, value: Any, dtype: torch.dtype, tensors: bool = False
                 ) -> str | None:
    """Why a value a scheduler writes under ``key`` cannot stay in a group of ``dtype``
    parameters (None: it can). ``tensors``: a tensor ``lr`` is checked by its value against
    the dtype too (its NaN or infinity always is)."""
    for _, x in nonfinite_values(value, key):
        return f"{float_words(x)}: an option must be a finite number"
    numbers = option_numbers(value, tensors)
    if dtype.is_floating_point and any(abs(x) > float_max(dtype) for x in numbers):
        return f"{overflow_words(dtype)}: torch's next step would overflow"
    if key == "momentum" and any(x < 0 for x in numbers):
        return "a negative momentum, which torch refuses"
    if key == "betas" and any(not 0.0 <= x < 1.0 for x in numbers):
        return "a beta outside [0, 1), which torch refuses"
    return None


def first_written(before: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]],
                  dtypes: Sequence[torch.dtype], tensors: bool = False, muon: bool = False
                  ) -> tuple[int, str, Any, str] | None:
    """The first value a scheduler's step (just taken on ``groups``; ``before``: their options
    as they were) wrote that :func:`out_of_range` refuses: its group, key, value and why.
    ``muon``: the groups are torch's Muon's, whose ``lr`` is also refused past the range Muon's
    shape scaling leaves it (:func:`app.engine.optimizers.muon_lr_overflow`: taken, every next step
    would be refused, and the scheduler would write it again over a PATCH)."""
    for i, (old, group, dtype) in enumerate(zip(before, groups, dtypes, strict=True)):
        for key, value in group.items():
            if key in _NOT_OPTIONS or (key in old and _same(old[key], value)):
                continue
            why = out_of_range(key, value, dtype, tensors)
            if why is None and muon and key == "lr":
                why = muon_lr_overflow(group, dtype)
            if why is not None:
                return i, key, value, why
    return None


def problem_value(value: Any) -> Any:
    """A group value as a problem's ``value`` carries it: plain JSON (a tensor as a JSON
    tensor whose ``data`` is a list, a non-finite float as a ``$float`` tag)."""
    return orjson.loads(orjson.dumps(tree_to_json(value), option=orjson.OPT_SERIALIZE_NUMPY))


def words(value: Any) -> str:
    """A group value as a problem's detail names it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{problem_value(value.reshape(-1)[0].item())!r} (a {dtype} tensor)"
    return repr(problem_value(value))


def check_written(session_id: str, scheduler: str, before: Sequence[dict[str, Any]],
                  groups: Sequence[dict[str, Any]], dtypes: Sequence[torch.dtype],
                  by_hand: bool = False, tensors: bool = False, muon: bool = False) -> None:
    """409 ``scheduler_out_of_range`` when ``scheduler``'s step (just taken on the groups, to be
    put back by the caller) wrote a value :func:`out_of_range` refuses into some group: the
    first, naming it. ``before``: the groups' options as they were before that step;
    ``by_hand``: a scheduler step by hand (``POST .../scheduler/step``), not an optimizer
    step's; ``session_id``: the session's id as its path names it."""
    found = first_written(before, groups, dtypes, tensors, muon)
    if found is None:
        return
    i, key, value, why = found
    what = f"this {scheduler} step" if by_hand else f"this step's {scheduler} step"
    raise Conflict(
        f"{what} would set param_groups.{i}.{key} to "
        f"{words(value)}, {why}. The step was refused and nothing changed: change the "
        f"group's lr (PATCH .../param_groups/{i}) or remove the scheduler (PATCH "
        f"/v1/sessions/{session_id} with {{\"scheduler\": null}}), then step again",
        code="scheduler_out_of_range", field=f"param_groups.{i}.{key}",
        value=problem_value(value), scheduler=scheduler)


def written_check(s: Session, by_hand: bool = False, tensors: bool = False
                  ) -> Callable[[list[dict[str, Any]]], None]:
    """The ``written`` check of :func:`app.engine.schedulers.dry_run` for the session's
    scheduler: :func:`check_written` on its groups."""
    name = type(s.scheduler).__name__

    def check(before: list[dict[str, Any]]) -> None:
        check_written(s.shown_id, name, before, s.optimizer.param_groups, s.group_dtypes(),
                      by_hand, tensors, s.cls is torch.optim.Muon)
    return check


def import_check(s: Session) -> Callable[[list[dict[str, Any]]], None]:
    """The ``written`` check of a state import's dry run (the session's groups and scheduler
    as the import leaves them): 422 ``scheduler_out_of_range`` naming the imported group key
    (``state_dict.param_groups.0.lr``) when the session's next scheduler step would write a
    value out of range. Taken, every step after it would be refused (409, the same rule)
    until a PATCH: the import is refused instead, whole, saying what to change."""
    name = type(s.scheduler).__name__

    def check(before: list[dict[str, Any]]) -> None:
        found = first_written(before, s.optimizer.param_groups, s.group_dtypes(), True,
                              s.cls is torch.optim.Muon)
        if found is None:
            return
        i, key, value, why = found
        if key == "lr":
            fix = (f"give state_dict.param_groups.{i}.lr a value from which that step stays "
                   "in range (the schedulers that scale the group's lr, ExponentialLR, "
                   "StepLR, ..., go on from it)")
            there = f"change its lr (PATCH .../param_groups/{i}) or remove its scheduler"
        else:
            fix = f"{name} computes {key} from its own state, not the group's"
            there = "remove its scheduler"
        raise Invalid(
            f"with this state, the session's next {name} step would set "
            f"param_groups.{i}.{key} to {words(value)}, {why}, so every step would be refused. "
            f"Nothing was imported: {fix}; or import it into a session without a scheduler "
            f"(PATCH /v1/sessions/{s.shown_id} with {{\"scheduler\": null}} first), leaving "
            "out state_dict.scheduler. The session that exported this state refuses that step "
            f"too: {there} there, then export again",
            code="scheduler_out_of_range", field=f"state_dict.param_groups.{i}.{key}",
            value=problem_value(value), scheduler=name)
    return check
