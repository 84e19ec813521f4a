"""Tensor options that are one object in torch, kept one object across a restore.

torch keeps a tensor ``lr`` given as the optimizer's default as ``defaults["lr"]`` and gives
that same tensor to every group built from the defaults; a scheduler fills it in place, so the
defaults follow the schedule and a group added later starts from the scheduled value. A
snapshot records which option slots (``defaults`` or a group's index, and the key) hold one
tensor; a restore, which rebuilds the optimizer and loads the groups' values from the state
dict (separate tensors), links them again."""

from __future__ import annotations

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
