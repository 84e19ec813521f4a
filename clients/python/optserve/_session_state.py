"""``RemoteOptimizer.state``: a lazy view of the session's optimizer state, and what assigning
a new mapping to it sends.

The view is torch's ``{param: {"step": ..., "exp_avg": ..., ...}}`` as the session holds it,
fetched (one ``GET .../state_dict``) when first read after the key it was fetched at changed:
the newest session version the optimizer has learned from any answer, and an epoch bumped by
whatever may change the state besides (a step under way, an import, ``add_param_group``).
Reads while neither moved make no request.

Assigning ``opt.state = mapping`` (training code that resets with
``opt.state = defaultdict(dict)``) loads that state into the session: :func:`assigned_state`
checks it and gives it in a state dict's ``{id: {...}}`` form.
"""

from __future__ import annotations

from _collections_abc import dict_items, dict_keys, dict_values
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = ["SessionState", "assigned_state"]


class SessionState(defaultdict[torch.Tensor, Any]):
    """``RemoteOptimizer.state``: the session's state, fetched by ``load`` when first read
    after ``key()`` changed; never fetched while nothing reads it. Writes go to this copy only.
    A ``defaultdict(dict)`` as torch's own ``state`` is."""

    def __init__(self, load: Callable[[], dict[torch.Tensor, Any]],
                 key: Callable[[], object]) -> None:
        super().__init__(dict)
        self._load = load
        self._key = key
        self._loaded_at: object = None
        self._loaded = False

    def forget(self) -> None:
        """Drop the fetched copy (a step changes the session's state: the copy would only
        hold memory until the next read fetched a new one)."""
        dict.clear(self)
        self._loaded = False

    def known_empty(self) -> None:
        """The session holds no state now (it was just reset): reads need not fetch it."""
        dict.clear(self)
        self._loaded, self._loaded_at = True, self._key()

    def _fresh(self) -> None:
        if self._loaded and self._key() == self._loaded_at:
            return
        values = self._load()
        dict.clear(self)
        dict.update(self, values)
        # (after the load: the answer may have taught a newer version, which it shows)
        self._loaded, self._loaded_at = True, self._key()

    def __getitem__(self, key: torch.Tensor) -> Any:
        self._fresh()
        return super().__getitem__(key)

    def __setitem__(self, key: torch.Tensor, value: Any) -> None:
        self._fresh()
        super().__setitem__(key, value)

    def __delitem__(self, key: torch.Tensor) -> None:
        self._fresh()
        super().__delitem__(key)

    def __contains__(self, key: object) -> bool:
        self._fresh()
        return super().__contains__(key)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._fresh()
        return super().__iter__()

    def __len__(self) -> int:
        self._fresh()
        return super().__len__()

    def __repr__(self) -> str:
        self._fresh()
        return repr(dict(self))

    def __eq__(self, other: object) -> bool:
        self._fresh()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: torch.Tensor, default: Any = None) -> Any:
        self._fresh()
        return super().get(key, default)

    def keys(self) -> dict_keys[torch.Tensor, Any]:
        self._fresh()
        return super().keys()

    def values(self) -> dict_values[torch.Tensor, Any]:
        self._fresh()
        return super().values()

    def items(self) -> dict_items[torch.Tensor, Any]:
        self._fresh()
        return super().items()

    def copy(self) -> defaultdict[torch.Tensor, Any]:  # type: ignore[override]
        """A plain ``defaultdict(dict)`` of the current state (no longer following the
        session): ``defaultdict.copy`` would call this class with its own arguments."""
        self._fresh()
        return defaultdict(dict, dict.items(self))

    __copy__ = copy  # type: ignore[assignment]

    def __reduce__(self) -> Any:  # copy.deepcopy, pickle: the plain defaultdict
        return (defaultdict, (dict,), None, None, iter(self.copy().items()))


def assigned_state(value: object, params: Sequence[torch.Tensor]) -> dict[int, dict[str, Any]]:
    """The state assigned to ``RemoteOptimizer.state`` as a state dict's ``"state"``: each
    parameter's dict under its id (its position across the groups, ``params``). ``value`` must
    be a mapping of this optimizer's parameters (the tensors themselves) to dicts, as torch's
    ``state`` is; an empty one resets the state (each parameter's is made afresh at its next
    step, as torch makes it). Anything else raises here, before anything is sent."""
    if not isinstance(value, Mapping):
        raise TypeError(
            "RemoteOptimizer.state takes a mapping of this optimizer's parameters to their "
            f"state dicts (as torch's defaultdict(dict)), not {type(value).__name__}: assign "
            "defaultdict(dict) to reset the session's state, or call load_state_dict()")
    ids = {id(p): i for i, p in enumerate(params)}
    out: dict[int, dict[str, Any]] = {}
    for key, entry in value.items():
        index = ids.get(id(key)) if isinstance(key, torch.Tensor) else None
        if index is None:
            what = (f"a tensor of shape {list(key.shape)}" if isinstance(key, torch.Tensor)
                    else repr(key)[:40])
            raise ValueError(
                f"RemoteOptimizer.state is keyed by this optimizer's parameters; {what} is not "
                "one of them (a copy of a parameter is another tensor): key the state by the "
                "tensors in param_groups, or call load_state_dict() with a state dict")
        if not isinstance(entry, Mapping):
            raise TypeError(f"the state of parameter {index} must be a dict (torch's "
                            f"{{'step': ..., 'exp_avg': ...}}), not {type(entry).__name__}")
        out[index] = dict(entry)
    return out
