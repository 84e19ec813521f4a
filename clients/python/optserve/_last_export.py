"""A state dict read from a session kept so that reading it again while the session did not
change downloads nothing: the read is conditional on the state tag it was read with
(``If-None-Match: "r<revision>.<token>"``, the ``X-Optserve-State-Tag`` header sent back as is:
every change to the session moves its revision, and the token is minted anew with each creation
of a session and each restore, so a session deleted and made again under the same id, or a
restarted server, is read whole), and a 304 answer is served from what was kept.
:class:`StateExport` is what ``Client.export_state_if_changed`` and
``AsyncClient.export_state_if_changed`` answer and take back (one request-and-answer,
``optserve._api.export_state_if_changed``, for both); ``RemoteOptimizer`` keeps its last one
the same way.

What is kept (:class:`Held`) is the answer's tree (dicts and lists of its own, copied at each
use, since the callers change the dicts they get) around the answer's tensors themselves, so
that the tensors a 304 hands out are those handed out before. A torch tensor of it changed in
place since (its version counter moved: an edit of ``opt.state`` or of a returned state dict's
tensor) makes it unusable: the next read is unconditional. An edit through ``.data`` moves no
counter and is not seen here, nor is an edit of a NumPy array (the SDK without torch), which has
none: a 304 hands such an edited tensor out again as the session's (copy a tensor before
editing it that way). ``RemoteOptimizer(..., detect_state_data_edits=True)`` finds those edits
of its state itself (``optserve._session_state``: a copy of what it read, compared before the
next step or ``state_dict()``) and sends them, which moves the session's revision.
``RemoteOptimizer`` drops it whenever it changes the session's state (a step, an import,
a group added): the session's revision moved, and it would only hold memory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ._tensors import _torch_loaded

__all__ = ["Held", "StateExport", "tree_copy"]

StateFormat = Literal["safetensors", "json", "torch"]


def tree_copy(obj: Any, versions: list[tuple[Any, int]] | None = None,
              tensor_type: Any = None) -> Any:
    """``obj`` with its dicts, lists and tuples copied, everything else (tensors) kept; with
    ``versions``, each ``tensor_type`` met on the way is appended to it with its version
    counter (the same walk)."""
    if isinstance(obj, dict):
        return {k: tree_copy(v, versions, tensor_type) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_copy(v, versions, tensor_type) for v in obj]
    if isinstance(obj, tuple):
        return tuple(tree_copy(v, versions, tensor_type) for v in obj)
    if versions is not None and tensor_type is not None and isinstance(obj, tensor_type):
        versions.append((obj, obj._version))
    return obj


@dataclass(frozen=True, eq=False)
class Held:
    """A state dict as read (its tree copied, its tensors themselves with their version
    counters then), the session, format and state tag it was read with."""

    session_id: str
    format: str
    #: the answer's ``X-Optserve-State-Tag``, quoted, as ``If-None-Match`` sends it back
    tag: str
    tree: Any
    tensors: tuple[tuple[Any, int], ...]

    @classmethod
    def of(cls, session_id: str, fmt: str, tag: str | None,
           state_dict: dict[str, Any]) -> Held | None:
        """``state_dict`` read with state tag ``tag`` (``None``: the server gave none, as
        one before state tags: nothing kept), its tree copied and its torch tensors' counters
        taken in one walk."""
        if tag is None:
            return None
        torch = _torch_loaded()
        versions: list[tuple[Any, int]] = []
        tree = tree_copy(state_dict, versions, None if torch is None else torch.Tensor)
        return cls(session_id, fmt, tag, tree, tuple(versions))

    def since(self, session_id: str, fmt: str) -> str | None:
        """The state tag to read ``session_id``'s state in ``fmt`` on the condition of
        (``None``: read it unconditionally): this one's, if it is of that session and format
        and none of its tensors changed since."""
        if session_id != self.session_id or fmt != self.format:
            return None
        if any(t._version != version for t, version in self.tensors):
            return None
        return self.tag

    def copy(self) -> dict[str, Any]:
        """The state dict (a 304 answered its read again): a tree of its own, the same
        tensors."""
        out: dict[str, Any] = tree_copy(self.tree)
        return out


@dataclass(frozen=True)
class StateExport:
    """A session's state dict as ``export_state_if_changed`` read it, with what its next
    read needs: pass it back (``client.export_state_if_changed(id, last)``) and, while the
    session did not change (no step, import, option change, ...), the server answers 304 and
    nothing is downloaded: the answer then holds the same values, the very tensors of
    ``last`` (in a ``state_dict`` tree of its own), ``not_modified=True``. A tensor of it
    changed in place (torch's version counter moved) makes the next read whole."""

    session_id: str
    #: how it travelled: ``"safetensors"``, ``"json"`` or ``"torch"``
    format: StateFormat
    #: torch's ``{"state": {int: {...}}, "param_groups": [...]}`` (``"scheduler"`` too when
    #: the session has one), as :meth:`~optserve.Client.export_state` returns it
    state_dict: dict[str, Any]
    #: the session version it is of
    version: int | None
    #: the session revision it is of (every change to the session moves it)
    revision: int | None
    #: ``True``: the server answered 304, the state dict is the one passed back as ``last``
    not_modified: bool = False
    _held: Held | None = field(default=None, repr=False, compare=False)
    #: the state tag it was read with (the answer's ``X-Optserve-State-Tag``, quoted:
    #: ``"r<revision>.<token>"``), which the next read sends back in ``If-None-Match``;
    #: ``None`` from a server that gives none (each read is then whole)
    tag: str | None = None

    def since(self, session_id: str, fmt: str) -> str | None:
        """The state tag a read of ``session_id``'s state in ``fmt`` after this one is
        conditional on (``None``: none, read it whole)."""
        return None if self._held is None else self._held.since(session_id, fmt)

    def again(self, version: int | None, revision: int | None, tag: str | None
              ) -> StateExport:
        """This state read again, answered 304 at ``version``, ``revision`` and state tag
        ``tag`` (the 304's own; this one's where it gave none): a tree of its own around the
        same tensors."""
        if self._held is None:
            raise ValueError("a 304 to an unconditional state read")
        return StateExport(self.session_id, self.format, self._held.copy(), version,
                           revision, True, self._held, self._held.tag if tag is None else tag)

    def kept_as_given(self) -> StateExport:
        """This export with its :attr:`state_dict` as it now stands kept for the next read
        (``RemoteOptimizer`` lays the state's tensors out as torch's before handing them out,
        and keeps those, not the ones that came off the wire)."""
        return dataclasses.replace(self, _held=Held.of(self.session_id, self.format,
                                                       self.tag, self.state_dict))
