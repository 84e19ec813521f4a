"""Tensor options that are one object in torch, kept one object across a restore.

torch keeps a tensor ``lr`` given as the optimizer's default as ``defaults["lr"]`` and gives
that same tensor to every group built from the defaults; a scheduler fills it in place, so the
defaults follow the schedule and a group added later starts from the scheduled value. A
snapshot records which option slots (``defaults`` or a group's index, and the key) hold one
tensor; a restore, which rebuilds the optimizer and loads the groups' values from the state
dict (separate tensors), links them again.

A client's option change may fill such a tensor the same way (``$fill``, :data:`FILL`), as a
scheduler run by the client does, instead of replacing the group's value."""

from __future__ import annotations

import math
from typing import Any

import torch

from app.errors import Invalid

#: where a tensor option is: ``"defaults"`` or a group's index, and the option's key
Slot = list[Any]


def shared_slots(optimizer: torch.optim.Optimizer) -> list[list[Slot]]:
    """The option slots that hold the same tensor object, one list per tensor held by more
    than one slot (the defaults' first, then the groups' in order)."""
    found: dict[int, list[Slot]] = {}
    for key, value in optimizer.defaults.items():
        if isinstance(value, torch.Tensor):
            found.setdefault(id(value), []).append(["defaults", key])
    for index, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key not in ("params", "param_names") and isinstance(value, torch.Tensor):
                found.setdefault(id(value), []).append([index, key])
    return [slots for slots in found.values() if len(slots) > 1]


def relink(optimizer: torch.optim.Optimizer, defaults: dict[str, Any],
           shared: list[list[Slot]]) -> None:
    """After a restore: put the defaults' tensor values back to ``defaults`` (the session's
    options as the snapshot held them: rebuilding with a scheduler filled them in place), then
    make each set of ``shared`` slots hold one tensor again (the defaults' where they are
    among them, else the first group's, as the state dict loaded it)."""
    with torch.no_grad():
        for key, value in defaults.items():
            held = optimizer.defaults.get(key)
            if isinstance(value, torch.Tensor) and isinstance(held, torch.Tensor):
                held.copy_(value)
    link_groups(optimizer.param_groups, shared, optimizer.defaults)


def link_groups(groups: list[dict[str, Any]], shared: list[list[Slot]],
                defaults: dict[str, Any] | None = None) -> None:
    """Make each set of ``shared`` option slots hold one tensor, the first slot's (a group's,
    ``[group index, key]``, or ``["defaults", key]`` in ``defaults``; only the first slot may
    be the defaults'): what a snapshot recorded (:func:`relink`), or what an imported state
    dict held as one tensor, as torch's ``load_state_dict`` keeps it
    (:func:`app.engine.state_aliases.shared_group_options`)."""
    for slots in shared:
        owner, key = slots[0]
        target = (defaults or {})[key] if owner == "defaults" else groups[owner][key]
        for where, name in slots[1:]:
            groups[where][name] = target


def check_group_links(options: list[dict[str, Any]], shared: list[list[Slot]]) -> None:
    """``shared`` names group option slots that exist and hold tensors alike (one dtype and
    shape) in ``options``, the groups' options as an import gives them."""
    for slots in shared:
        held = []
        for slot in slots:
            index, key = slot if isinstance(slot, list) and len(slot) == 2 else (None, None)
            value = (options[index].get(key) if type(index) is int
                     and 0 <= index < len(options) and isinstance(key, str) else None)
            if not isinstance(value, torch.Tensor):
                raise Invalid(f"shared option slot {slot!r:.60} names no tensor option of the "
                              "imported groups", code="state_mismatch",
                              field="state_dict.param_groups")
            held.append(value)
        if len(held) < 2 or any(t.dtype != held[0].dtype or t.shape != held[0].shape
                                for t in held):
            raise Invalid(f"shared option slots {slots!r:.80} do not hold one tensor",
                          code="state_mismatch", field="state_dict.param_groups")


#: in a group's option changes (a step's ``param_groups`` entry, a ``PATCH
#: .../param_groups/{i}`` body): the options, among those given there, to fill into the tensor
#: the group holds, as torch's schedulers do (``group["lr"].fill_(v)``): every group and the
#: defaults holding that tensor take the value. Without it a value replaces the group's own
#: (torch's ``group["lr"] = v``), as before it existed
FILL = "$fill"


def take_fills(options: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """``options`` without :data:`FILL`, and the option names it lists: distinct names of
    options ``options`` gives (422 ``invalid_option`` naming ``<where>.$fill`` otherwise)."""
    if FILL not in options:
        return options, []
    rest = {k: v for k, v in options.items() if k != FILL}
    names = options[FILL]
    field = f"{where}.{FILL}"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise Invalid(f"{FILL} must be a list of option names, got {names!r:.60}",
                      code="invalid_option", field=field)
    if len(set(names)) != len(names):
        raise Invalid(f"{FILL} names an option twice: {names!r:.80}", code="invalid_option",
                      field=field)
    missing = [n for n in names if n not in rest]
    if missing:
        raise Invalid(f"{FILL} names {missing[0]!r:.60}, which this change does not give a "
                      "value", code="invalid_option", field=field)
    return rest, names


def fill_value(value: Any, where: str) -> Any:
    """What ``Tensor.fill_`` takes of a (normalized) option value: a number, or a one-element
    tensor as a 0-dim one (422 ``invalid_option`` naming ``where`` otherwise)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().reshape(())
    if type(value) in (int, float):
        return value
    raise Invalid(f"only a number or a one-element tensor fills a tensor option in place "
                  f"({FILL}), got {value!r:.60}", code="invalid_option", field=where)


def filled(held: torch.Tensor, value: Any, where: str) -> torch.Tensor:
    """``held`` as filling it with ``value`` (:func:`fill_value`) would leave it, in a tensor
    of its own (the checks' view of the change). A finite value past the range of ``held``'s
    dtype is a 422 ``option_overflow`` naming ``where``: ``fill_`` raises for a number
    (``value cannot be converted to type float without overflow``), and makes a one-element
    tensor's value, or a number in a float16 tensor, infinite without a word."""
    with torch.no_grad():
        try:
            out: torch.Tensor | None = held.detach().clone().fill_(value)
        except (RuntimeError, OverflowError):
            out = None
        finite = (bool(value.isfinite().all()) if isinstance(value, torch.Tensor)
                  else type(value) is int or math.isfinite(value))
        if out is None or (finite and not bool(out.isfinite().all())):
            number = value.item() if isinstance(value, torch.Tensor) else value
            name = str(held.dtype).removeprefix("torch.")
            raise Invalid(f"{where.rsplit('.', 1)[-1]} is {number!r:.40}, beyond the range of "
                          f"the tensor it fills ({name}, at most {torch.finfo(held.dtype).max!r} "
                          f"in magnitude)", code="option_overflow", field=where)
        return out


def apply_changes(groups: list[dict[str, Any]], changes: dict[int, dict[str, Any]]) -> None:
    """Make checked option changes (:func:`app.engine.ops.params.check_group_changes`), in
    their order: a value :data:`FILL` lists is filled into the tensor the group holds (every
    group and the defaults holding it take it), any other replaces the group's value."""
    for index, options in changes.items():
        group = groups[index]
        fills = options.get(FILL, ())
        for key, value in options.items():
            if key == FILL:
                continue
            held = group.get(key)
            if key in fills and isinstance(held, torch.Tensor):
                with torch.no_grad():
                    held.fill_(value)
            else:
                group[key] = value


def holds_already(group: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether :func:`apply_changes` of checked ``options`` would leave ``group`` as it is:
    every value it sets is the one held (:func:`same_value`), every one it fills in place
    already the tensor's value. Unsure (a tensor replaced by another) counts as a change."""
    fills = options.get(FILL, ())
    for key, value in options.items():
        if key == FILL:
            continue
        if key not in group:
            return False
        held = group[key]
        if key in fills and isinstance(held, torch.Tensor):
            with torch.no_grad():
                if not torch.equal(held.detach().clone().fill_(value), held):
                    return False
        elif not same_value(held, value):
            return False
    return True


def same_value(held: Any, value: Any) -> bool:
    """``value`` is ``held`` as a group holds it: the same object (a tensor: only itself, as
    another would no longer be the one other slots share), or a number, string, ``None`` or
    tuple/list of them of the same type and value (a float's sign of zero too)."""
    if held is value:
        return True
    if type(held) is not type(value) or isinstance(held, torch.Tensor):
        return False
    if isinstance(held, (tuple, list)):
        return len(held) == len(value) and all(
            same_value(a, b) for a, b in zip(held, value, strict=True))
    if isinstance(held, float):
        return held == value and math.copysign(1.0, held) == math.copysign(1.0, value)
    return isinstance(held, (bool, int, str)) and held == value
