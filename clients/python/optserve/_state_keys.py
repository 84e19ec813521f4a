"""Which keys of a state dict's per-parameter entries the session's optimizer keeps, and which
are the client's own.

A wrapper around an optimizer may keep its own per-parameter state in the optimizer's
``state`` (timm's ``Lookahead``: ``lookahead_slow_buff``), so a local optimizer's state dict,
or a ``RemoteOptimizer``'s (which carries them: ``optserve._session_state``), holds keys the
session's optimizer does not know, and the server refuses them on import (422
``state_mismatch``). :func:`split_state` parts each entry into what the session takes and what
the client keeps.

What the optimizer keeps is worked out as the server works it out: torch's own class of that
name, made here on one small tensor per parameter shape kind (its number of dimensions:
Adafactor keeps other keys for a matrix than for a vector) with the groups' options, stepped
once with zero gradients; the keys of its state are the optimizer's. LBFGS keeps one state,
under the first parameter, with the keys the server's check names. Where that cannot be
worked out here (no such class in this torch, or it refuses the options), every key goes to
the server, which says what is wrong. So does a key that some other optimizer of torch's keeps
(:func:`torch_keys`: SGD's ``momentum_buffer`` in a state dict loaded into an Adam session): that
is another optimizer's state, not a wrapper's, and the server refuses it (422
``state_mismatch``), as torch's next step would fail on it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["split_state", "state_keys"]

#: options left out of the throwaway optimizer: they change how it steps (a device, a
#: kernel), not which keys it keeps, and some need a device or tensors this one does not have
_PROBE_SKIPS = frozenset({"foreach", "fused", "capturable", "differentiable"})
#: what torch's LBFGS keeps, under its first parameter (the server's check of an LBFGS state)
_LBFGS_KEYS = frozenset({"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro",
                         "H_diag", "prev_flat_grad", "prev_loss", "al"})

#: option variants the classes are made with for :func:`torch_keys` (each class takes those of
#: them it has: the keys some options add, ``max_exp_avg_sq``, ``momentum_buffer``, ``grad_avg``)
_VARIANTS: tuple[dict[str, Any], ...] = (
    {}, {"amsgrad": True}, {"momentum": 0.9}, {"momentum": 0.9, "centered": True})

Keys = frozenset[str] | None


def _probe(cls: type[torch.optim.Optimizer], options: Mapping[str, Any], ndim: int) -> Keys:
    """The keys ``cls`` keeps for a parameter of ``ndim`` dimensions with these options, or
    None when that cannot be worked out here."""
    taken = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    given = {}
    for k, v in options.items():
        if k not in taken or k in _PROBE_SKIPS:
            continue
        if isinstance(v, torch.Tensor):  # (a tensor lr: its number)
            v = v.item() if v.numel() == 1 else v
        given[k] = v
    t = torch.zeros((1,) * ndim)
    grad = torch.zeros_like(t)
    if cls is torch.optim.SparseAdam:
        grad = grad.to_sparse()
    t.grad = grad
    try:
        opt = cls([t], **given)
        # the class's own step, not torch's wrapper of it (Optimizer.profile_hook_step), which
        # would run the process's global step hooks (torch.optim.optimizer
        # .register_optimizer_step_pre_hook / _post_hook) for this probe: a user's hook counting
        # or logging steps saw steps of an optimizer nobody made at each load_state_dict
        step = type(opt).step
        getattr(step, "__wrapped__", step)(opt)
    except Exception:  # noqa: BLE001 - unknown here: the server checks the entry whole
        return None
    return frozenset(str(k) for k in opt.state[t])


@functools.cache
def torch_keys() -> frozenset[str]:
    """Every key torch's optimizers keep per parameter: each class of ``torch.optim`` made on one
    small vector and one small matrix with each of :data:`_VARIANTS`, stepped once, and
    LBFGS's. Worked out once, when a state dict first holds a key the session's optimizer
    does not keep."""
    found = set(_LBFGS_KEYS)
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if (not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer)
                or cls in (torch.optim.Optimizer, torch.optim.LBFGS)):
            continue
        for variant in _VARIANTS:
            for ndim in (1, 2):
                found |= _probe(cls, variant, ndim) or frozenset()
    return frozenset(found)


def state_keys(optimizer: str, groups: Sequence[Mapping[str, Any]],
               params: Sequence[Sequence[torch.Tensor]]) -> list[list[Keys]]:
    """For each group's parameters, the keys of its state entry that the session's
    ``optimizer`` keeps with that group's options (``None``: not known here)."""
    if optimizer == "LBFGS":
        return [[_LBFGS_KEYS if (g, i) == (0, 0) else frozenset() for i in range(len(ps))]
                for g, ps in enumerate(params)]
    cls = getattr(torch.optim, optimizer, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return [[None] * len(ps) for ps in params]
    out: list[list[Keys]] = []
    for options, ps in zip(groups, params, strict=True):
        found: dict[int, Keys] = {}
        for p in ps:
            if p.dim() not in found:
                found[p.dim()] = _probe(cls, options, p.dim())
        out.append([found[p.dim()] for p in ps])
    return out


def split_state(state: Mapping[Any, Any], keys: Mapping[int, Keys]
                ) -> tuple[dict[Any, Any], dict[int, dict[Any, Any]]]:
    """A state dict's ``"state"`` as what the session takes (each entry's keys its optimizer
    keeps, and those another optimizer of torch's keeps (:func:`torch_keys`), under the
    entry's own id; an entry of none of them left out) and what the client keeps (the other
    keys, by param id). ``keys``: by param id, the keys the optimizer keeps
    (an id missing or ``None``: every key goes to the session). Entries that are not dicts go
    to the session as they are (which refuses them)."""
    session: dict[Any, Any] = {}
    client: dict[int, dict[Any, Any]] = {}
    for pid, entry in state.items():
        index = _param_id(pid)
        kept = keys.get(index) if index is not None else None
        if kept is None or not isinstance(entry, Mapping):
            session[pid] = entry
            continue
        theirs = {k: v for k, v in entry.items() if str(k) in kept}
        mine = {k: v for k, v in entry.items() if str(k) not in kept}
        if mine:  # (another optimizer's keys go to the session, which refuses them)
            other = torch_keys()
            theirs.update((k, v) for k, v in mine.items() if str(k) in other)
            mine = {k: v for k, v in mine.items() if str(k) not in other}
        if theirs or not entry:
            session[pid] = theirs
        if mine and index is not None:
            client[index] = mine
    return session, client


def _param_id(key: object) -> int | None:
    """A state dict's param id (an int, or its digits after a trip through JSON)."""
    if type(key) is int:
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None
