"""``RemoteOptimizer``'s last state dict read from the session, so that reading it again while
the session did not change downloads nothing: the read is conditional on the session revision
it was read at (``If-None-Match: "r<revision>"``; every change to the session moves its
revision), and a 304 answer is served from here.

What is kept is the answer's tree (dicts and lists of its own, copied at each use, since the
callers change the dicts they get) around the answer's tensors themselves, so that the tensors
``state_dict()`` and ``opt.state`` hand out are those of the answer as before. A tensor of it
changed in place since (its version counter moved: an edit of ``opt.state`` or of a returned
state dict's tensor that no write-back sent, say after a refused step forgot the view) makes
it unusable: the next read is unconditional. Like ``opt.state``, an edit through ``.data``
moves no counter and is not seen. It is dropped whenever the optimizer changes the session's
state (a step, an import, a group added): the session's revision moved, and it would only hold
memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LastExport", "tree_copy"]


def tree_copy(obj: Any) -> Any:
    """``obj`` with its dicts, lists and tuples copied, everything else (tensors) kept."""
    if isinstance(obj, dict):
        return {k: tree_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(tree_copy(v) for v in obj)
    return obj


def _tensors(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


@dataclass
class _Held:
    format: str
    revision: int
    tree: Any
    tensors: list[tuple[torch.Tensor, int]]


class LastExport:
    """The last state dict read, its format and the session revision it was read at."""

    def __init__(self) -> None:
        self._held: _Held | None = None

    def revision(self, fmt: str) -> int | None:
        """The revision to read on the condition of (``None``: read unconditionally): the
        one the kept state was read at, if it was read in ``fmt`` and none of its tensors
        changed since."""
        held = self._held
        if held is None or held.format != fmt:
            return None
        if any(t._version != version for t, version in held.tensors):
            self._held = None
            return None
        return held.revision

    def keep(self, fmt: str, revision: int | None, state_dict: dict[str, Any]) -> None:
        """``state_dict`` was just read at ``revision`` (``None``: the server did not say:
        nothing kept). Its tree is copied; its tensors are kept as they are."""
        if revision is None:
            self._held = None
            return
        tree = tree_copy(state_dict)
        self._held = _Held(fmt, revision, tree, [(t, t._version) for t in _tensors(tree, [])])

    def copy(self) -> dict[str, Any]:
        """The kept state dict (a 304 answered its read): a tree of its own, the same
        tensors."""
        held = self._held
        if held is None:
            raise RuntimeError("no state dict kept")
        out: dict[str, Any] = tree_copy(held.tree)
        return out

    def drop(self) -> None:
        """The session's state changed (or may have): nothing kept."""
        self._held = None
