"""Tensors of an imported state dict that share memory, as a ``torch.load`` gives them back.

``torch.save`` keeps which tensors are one object (or views of one storage), so a state dict
read from a client's ``torch.save`` file may hold one tensor in several places. torch's
``load_state_dict`` deep-copies the param groups in one go (a tensor held by several groups
stays one tensor, apart from the file's) and takes the per-parameter state as it is (a
tensor held by two entries stays one: each update then writes into the other's). What torch
itself makes, checked against torch 2.13 for every optimizer and scheduler a session runs:

- one tensor ``lr`` held by several groups (a tensor lr given as the optimizer's default is
  every group's built from it): kept one tensor across the import (:func:`shared_group_options`),
  so a scheduler's in-place fill moves them all, as in torch;
- LBFGS's ``t`` is its group's ``lr`` tensor after a line search: the groups are copied apart
  from the state, as torch's deep copy does;
- SequentialLR's ``_last_lr`` is its current scheduler's: the scheduler's state is its own copy.

Two per-parameter state tensors on overlapping memory (two parameters' ``exp_avg`` one tensor,
or ``exp_avg`` and ``exp_avg_sq`` views of one storage), or one over the scheduler's state,
is nothing torch makes, and each update would write into the other: a 422 ``invalid_state``
naming the second of them, as a safetensors body whose skeleton references a tensor twice is
refused (:func:`refuse_aliased_state`)."""

from __future__ import annotations

from typing import Any

import torch

from app.errors import Invalid
from app.wire.tree import MAX_STATE_DEPTH
from app.wire.tree_path import TreePath

#: a group option's place: the group's index and the option's key
GroupSlot = list[Any]


def _tensors(obj: Any, path: TreePath, out: list[tuple[TreePath, torch.Tensor]],
             depth: int = 0, memo: dict[int, torch.Tensor | None] | None = None) -> None:
    """The tensors of ``obj`` with their paths, each list or dict walked once: a pickle may
    hold one many times (``[[[None] * 1000] * 1000] * 1000``, a file of 3 KB, was a walk of
    10**9 leaves). A list or dict met again holding a tensor is given as that tensor at the
    second place (it is held twice: shared memory). The paths are written only for the one
    an error names (a path string per node was a copy of every key above it: a long key
    over a long list, gigabytes)."""
    if depth > MAX_STATE_DEPTH:  # (deeper trees are refused where the state is read)
        return
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if not isinstance(obj, (dict, list, tuple)):
        return
    if id(obj) in memo:
        first = memo[id(obj)]
        if first is not None:
            out.append((path, first))
        return
    memo[id(obj)] = None  # (met again while walked: a cycle, nothing to add)
    before = len(out)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        # (what holds no tensor gives none: no path made for a number, nor for an empty list)
        if isinstance(v, torch.Tensor) or (isinstance(v, (dict, list, tuple)) and v):
            _tensors(v, path.child(k), out, depth + 1, memo)
    memo[id(obj)] = out[before][1] if len(out) > before else None


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """The bytes a dense tensor's elements lie in: its first and past-last address (memory
    that overlaps is one memory, whatever storage objects hold it), or None when it has none
    to share (no elements, not a dense CPU tensor: a nested one, whose sizes torch does not
    give, is refused where the state is checked)."""
    if t.is_nested or t.layout != torch.strided or t.device.type != "cpu" or t.numel() == 0:
        return None
    size = t.element_size()
    low = high = t.data_ptr()
    for n, stride in zip(t.shape, t.stride(), strict=True):
        reach = (n - 1) * stride * size
        if reach < 0:
            low += reach
        else:
            high += reach
    return low, high + size


def refuse_aliased_state(state: object) -> None:
    """A 422 ``invalid_state`` naming a per-parameter state tensor whose memory overlaps
    another state tensor's or the scheduler state's (see the module's docs)."""
    if not isinstance(state, dict):
        return  # (the state's own checks say what is wrong with it)
    found: list[tuple[TreePath, torch.Tensor]] = []
    memo: dict[int, torch.Tensor | None] = {}
    root = TreePath("state_dict")
    _tensors(state.get("state"), root.child("state"), found, memo=memo)
    held = len(found)
    _tensors(state.get("scheduler"), root.child("scheduler"), found, memo=memo)
    spans = []
    for index, (_, t) in enumerate(found):
        span = _span(t)
        if span is not None:
            spans.append((span, index < held, index))
    spans.sort()
    # by first byte: a span overlaps one before it exactly when that one reaches past its
    # first byte (the farthest reach of any, and of a state tensor, kept; by index in found)
    farthest = (0, -1)
    farthest_state = (0, -1)
    for (low, high), is_state, index in spans:
        other = farthest if is_state else farthest_state
        if low < other[0]:
            path, other_path = str(found[index][0]), str(found[other[1]][0])
            named, with_ = (path, other_path) if is_state else (other_path, path)
            raise Invalid(f"{named} shares memory with {with_}: each state tensor is its own "
                          "(torch never saves one shared by two entries, and each update would "
                          "write into the other); save each as its own tensor",
                          code="invalid_state", field=named)
        if high > farthest[0]:
            farthest = (high, index)
        if is_state and high > farthest_state[0]:
            farthest_state = (high, index)


def shared_group_options(state: object) -> list[list[GroupSlot]]:
    """The group option slots (``[group index, key]``) that hold one tensor (the same object,
    or views of the same memory alike), one list per tensor held by more than one group
    option, in group order: torch's ``load_state_dict`` keeps each one tensor."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        return []
    found: dict[tuple[int, torch.dtype, tuple[int, ...]], list[GroupSlot]] = {}
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        for key, value in group.items():
            if key in ("params", "param_names") or not isinstance(value, torch.Tensor):
                continue
            span = _span(value)
            if span is None or not isinstance(key, str):
                continue
            found.setdefault((value.data_ptr(), value.dtype, tuple(value.shape)),
                             []).append([index, key])
    return [slots for slots in found.values() if len(slots) > 1]


def examine(state: object) -> list[list[GroupSlot]]:
    """:func:`refuse_aliased_state`, then :func:`shared_group_options`: what an import keeps
    one tensor."""
    refuse_aliased_state(state)
    return shared_group_options(state)
