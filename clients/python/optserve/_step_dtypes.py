"""The dtype torch's optimizer would keep each parameter's ``step`` count in.

A session's optimizer runs under torch's default dtype, float32, so it keeps its ``step``
counts (Adam's, Adagrad's, ...) as float32 tensors. A local optimizer made them in
``_get_scalar_dtype()``, float64 under ``torch.set_default_dtype(torch.float64)`` (float32
for a fused group), when the parameter's state was first made (its first step with a
gradient), and keeps a loaded count's own dtype (float32 for a capturable or fused group,
which ``load_state_dict`` casts). ``RemoteOptimizer.state`` and ``state_dict()`` give each
count in the dtype torch's would have, so they compare with torch's dtype for dtype: the
count is the same number (the optimizers whose steps compute with the float64 count, or
other float64 scalar state, are refused under a float64 default: see ``_optimizer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def fresh_step_dtype(group: Mapping[str, Any]) -> torch.dtype:
    """The dtype torch makes a new ``step`` count in for a parameter of ``group`` now
    (``torch.optim.optimizer._get_scalar_dtype``, fused groups' float32 included)."""
    if group.get("fused"):
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


#: optimizers that make every parameter's state (its count included) at construction, not at
#: its first step (torch's ``Adagrad.__init__``; a group added later makes it at its step)
STATE_MADE_AT_CONSTRUCTION = frozenset({"Adagrad"})


class StepDtypes:
    """Each parameter's ``step`` dtype as torch's optimizer would keep it (the tensors
    themselves as keys, as torch's ``state``); a parameter not here has no count yet as a
    local optimizer would see it (its next step with a gradient makes one; a worker joining
    a session takes it as made there, at its first step), and its session's float32 stands."""

    def __init__(self) -> None:
        self._dtypes: dict[torch.Tensor, torch.dtype] = {}

    def made(self, groups: Iterable[Mapping[str, Any]]) -> None:
        """Every parameter of ``groups`` that has no state made its count now."""
        for group in groups:
            dtype = fresh_step_dtype(group)
            for p in group["params"]:
                self._dtypes.setdefault(p, dtype)

    def stepped(self, groups: Iterable[Mapping[str, Any]]) -> None:
        """A step was applied: each parameter that had a gradient and no state made its
        count now, in the dtype torch would make it in (nothing to look at once every
        parameter has its count: a step of 100,000 parameters walked them all, ~20 ms)."""
        groups = list(groups)
        if len(self._dtypes) >= sum(len(group["params"]) for group in groups):
            return
        for group in groups:
            dtype = fresh_step_dtype(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._dtypes.setdefault(p, dtype)

    def replaced(self, entries: Mapping[torch.Tensor, Any],
                 groups: Iterable[Mapping[str, Any]] | None = None) -> None:
        """The state became ``entries`` (each parameter's as given): torch keeps a count
        tensor's own dtype. With ``groups`` (a ``load_state_dict``, whose groups they are),
        a capturable or fused group's counts become float32, and a count given as a number
        is made a tensor as the optimizer's ``__setstate__`` makes it."""
        policy = {p: group for group in groups or () for p in group["params"]}
        self._dtypes = {}
        for p, entry in entries.items():
            step = entry.get("step") if isinstance(entry, Mapping) else None
            group = policy.get(p)
            if group is not None and (group.get("capturable") or group.get("fused")):
                self._dtypes[p] = torch.float32
            elif isinstance(step, torch.Tensor):
                self._dtypes[p] = step.dtype
            elif group is not None and isinstance(step, (int, float)):
                self._dtypes[p] = fresh_step_dtype(group)

    def as_torch_keeps(self, p: torch.Tensor, entry: Any) -> Any:
        """``entry`` (the session's state of ``p``) with its float32 ``step`` count in the
        dtype torch's would have it in."""
        if not isinstance(entry, dict):
            return entry
        step = entry.get("step")
        dtype = self._dtypes.get(p)
        if isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0 \
                and dtype is not None and dtype != torch.float32:
            entry["step"] = step.to(dtype)
        return entry
