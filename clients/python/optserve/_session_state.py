"""``RemoteOptimizer.state``: a lazy view of the session's optimizer state, and what assigning
a new mapping to it sends.

The view is torch's ``{param: {"step": ..., "exp_avg": ..., ...}}`` as the session holds it,
fetched (one ``GET .../state_dict``) when first read after the key it was fetched at changed:
the newest session version the optimizer has learned from any answer, and an epoch bumped by
whatever may change the state besides (a step under way, an import, ``add_param_group``).
Reads while neither moved make no request, nor do reads while an edit is not sent yet (below):
the view stays as edited until it is sent.

Each parameter's entry is one dict for the optimizer's life (as in a local optimizer's
``state``), filled anew at each fetch with the session's keys. Keys the session's optimizer
does not keep (anything not in what the server returned for that parameter at the last fetch:
timm's ``Lookahead`` puts ``lookahead_slow_buff`` there) are the client's: they stay in the
entry across fetches, the very objects put there, and :meth:`SessionState.client_entries`
gives them to ``RemoteOptimizer.state_dict()``. The session's own keys are its copy, as
fetched: an edit of one (in place, ``state[p]["exp_avg"].zero_()``; assigned, ``state[p]["exp_avg"]
= t``; or the entry deleted or cleared, ``del state[p]``, ``state.clear()``) is found by
:meth:`SessionState.edited` (the values fetched, their identity and version counters) and sent
by ``RemoteOptimizer`` before its next step or ``state_dict()`` (an edit through ``.data``, which
moves no version counter, only with ``compare_values``: ``detect_state_data_edits=True``, which
keeps a copy of each tensor fetched until the next step), as one import of the view as
it then stands, so that it takes effect as it does on a local optimizer's state. So is a key
that torch's optimizers keep put in an entry the session did not give it (the state of a
parameter the session holds none for, given by hand or by ``ZeroRedundancyOptimizer``'s
``load_state_dict``: :meth:`SessionState.added`): it is the session's to take, not a
wrapper's. That import
is conditional on the session version the view was read at (:attr:`SessionState.fetched_version`):
another client's change since is never overwritten by it.

Assigning ``opt.state = mapping`` (training code that resets with
``opt.state = defaultdict(dict)``) loads that state into the session: :func:`assigned_state`
checks it and gives it in a state dict's ``{id: {...}}`` form.
"""

from __future__ import annotations

from _collections_abc import dict_items, dict_keys, dict_values
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._edits import bitwise_equal
from ._state_keys import torch_keys

__all__ = ["Held", "SessionState", "assigned_state"]


@dataclass(frozen=True)
class Held:
    """:meth:`SessionState.held`: the view's entries and what its last fetch put there."""

    entries: list[tuple[torch.Tensor, Any, dict[Any, Any] | None]]
    session_keys: dict[torch.Tensor, frozenset[Any]]
    fetched: dict[torch.Tensor, dict[Any, tuple[Any, int | None]]]
    version: int | None
    copies: dict[torch.Tensor, dict[Any, torch.Tensor]]


class SessionState(defaultdict[torch.Tensor, Any]):
    """``RemoteOptimizer.state``: the session's state, fetched by ``load`` when first read
    after ``key()`` changed; never fetched while nothing reads it. Writes to the session's
    keys go to this copy only; other keys of an entry are kept (see the module's docs). A
    ``defaultdict(dict)`` as torch's own ``state`` is."""

    def __init__(self, load: Callable[[], tuple[dict[torch.Tensor, Any], int | None]],
                 key: Callable[[], object], *, compare_values: bool = False) -> None:
        """``compare_values``: keep a copy of each tensor a fetch puts here, so that
        :meth:`edited` also finds an edit through ``.data`` (which moves no version counter);
        the copies are dropped with the values (the next step)."""
        super().__init__(dict)
        self._compare = compare_values
        #: with ``compare_values``, a copy of each tensor the last fetch put here, as fetched
        self._copies: dict[torch.Tensor, dict[Any, torch.Tensor]] = {}
        self._load = load
        self._key = key
        self._loaded_at: object = None
        self._loaded = False
        #: each entry's keys as the last fetch filled them from the session
        self._session_keys: dict[torch.Tensor, frozenset[Any]] = {}
        #: the session's values the last fetch put in each entry, a tensor's with its version
        #: counter (what :meth:`edited` compares with)
        self._fetched: dict[torch.Tensor, dict[Any, tuple[Any, int | None]]] = {}
        #: the session version the last fetch read (None: nothing fetched, or not said)
        self._version: int | None = None

    @property
    def fetched_version(self) -> int | None:
        """The session version the session's values held here were read at (``None``: none
        held, or the server did not say): an import of an edit of them is conditional on it,
        so that it never overwrites what another client changed since."""
        return self._version

    def _strip(self) -> None:
        """Take the session's values out of the entries (the client's keys stay); an entry
        they leave empty goes (the next fetch brings it back). An empty entry the session
        gave nothing to stays: the client made it (``opt.state[p]`` read, as torch's
        ``defaultdict`` makes one), and torch's ``state`` keeps it until that parameter
        steps."""
        fetched = self._session_keys
        for p, keys in fetched.items():
            entry = dict.get(self, p)
            if isinstance(entry, dict):
                for k in keys:
                    entry.pop(k, None)
        self._session_keys = {}
        self._fetched = {}
        self._copies = {}
        self._version = None
        for p in [p for p, entry in dict.items(self) if not entry and p in fetched]:
            dict.__delitem__(self, p)

    def forget(self) -> None:
        """Drop the fetched values (a step changes the session's state: the copy would only
        hold memory until the next read fetched a new one); the client's keys stay."""
        self._strip()
        self._loaded = False

    def known_empty(self) -> None:
        """The session holds no state now (it was just reset): reads need not fetch it."""
        self._strip()
        self._loaded, self._loaded_at = True, self._key()

    def client_entries(self) -> dict[torch.Tensor, dict[Any, Any]]:
        """Each parameter's keys that the session's optimizer does not keep (those the last
        fetch did not fill), the values themselves; parameters with none left out, but for
        an empty entry the session gave nothing to (made by reading ``opt.state[p]``: torch's
        ``state_dict()`` lists it, ``{0: {}}``)."""
        out = {}
        for p, entry in dict.items(self):
            if not isinstance(entry, dict):
                continue
            session = self._session_keys.get(p)
            kept = {k: v for k, v in entry.items() if session is None or k not in session}
            if kept or session is None:
                out[p] = kept
        return out

    def edited(self) -> bool:
        """Whether the session's values the last fetch put here were changed since: an entry
        deleted or replaced by one without them, a key deleted or given another object, a
        tensor changed in place (its version counter moved), or, with ``compare_values``, its
        values changed otherwise (through ``.data``: ``state[p]["exp_avg"].data.zero_()``, a
        returned state dict's tensor too; compared bit for bit with the copy the fetch
        took); or whether an entry was given a key of an optimizer's state that the session
        did not give it (:meth:`added`)."""
        for p, seen in self._fetched.items():
            entry = dict.get(self, p)
            if not isinstance(entry, dict):
                return True
            for k, (value, version) in seen.items():
                if k not in entry:
                    return True
                now = entry[k]
                if now is not value or (version is not None and now._version != version):
                    return True
        if self.added():
            return True
        return any(not bitwise_equal(entry[k], copy)
                   for p, copies in self._copies.items()
                   if isinstance(entry := dict.get(self, p), dict)
                   for k, copy in copies.items())

    def added(self) -> bool:
        """Whether an entry holds a key that torch's optimizers keep (``step``, ``exp_avg``,
        ...: :func:`~optserve._state_keys.torch_keys`) which the session did not give it: the
        state of a parameter the session holds none for, put there by the code around the
        optimizer (``opt.state[p] = {"step": ..., "exp_avg": ...}``: torch's
        ``ZeroRedundancyOptimizer.load_state_dict`` loads its local optimizer so), which a
        local optimizer steps from. Such keys are the session's to take, as
        ``load_state_dict()`` gives them to it; other keys are the client's (a wrapper's,
        kept here). Entries of only the session's keys (every step's case) ask nothing."""
        extra = [k for p, entry in dict.items(self) if isinstance(entry, dict)
                 for k in entry if k not in self._session_keys.get(p, ())]
        if not extra:
            return False
        optimizer_keys = torch_keys()
        return any(str(k) in optimizer_keys for k in extra)

    def held(self) -> Held:
        """What :meth:`keep_pending` puts back: the entries (each dict with its contents: a
        fetch or a forget changes them in place) and what the last fetch put there."""
        return Held([(p, entry, dict(entry) if isinstance(entry, dict) else None)
                     for p, entry in dict.items(self)],
                    dict(self._session_keys), dict(self._fetched), self._version,
                    dict(self._copies))

    def keep_pending(self, held: Held) -> None:
        """The view as :meth:`held` took it, edits and all, current at the key as it now
        stands: an import of its edits was refused (the session's state unchanged), and they
        stay to be sent again at the next step (which fails the same way until they are fixed
        or cleared, as a local optimizer keeps failing on its edited state)."""
        dict.clear(self)
        for p, entry, contents in held.entries:
            if isinstance(entry, dict) and contents is not None:
                entry.clear()
                entry.update(contents)
            dict.__setitem__(self, p, entry)
        self._session_keys = dict(held.session_keys)
        self._fetched = dict(held.fetched)
        self._copies = dict(held.copies)
        self._version = held.version
        self._loaded, self._loaded_at = True, self._key()

    def as_it_stands(self) -> dict[torch.Tensor, Any]:
        """The entries as they are now, nothing fetched (what an edit left)."""
        return {p: entry for p, entry in dict.items(self)}

    def keep_only(self, entries: Mapping[torch.Tensor, Mapping[Any, Any]]) -> None:
        """The client's keys become exactly ``entries`` (a state loaded or assigned: it
        replaces the whole state, as torch's ``load_state_dict`` does); the session's are
        fetched at the next read."""
        dict.clear(self)
        self._session_keys = {}
        self._fetched = {}
        self._copies = {}
        self._version = None
        for p, entry in entries.items():
            if entry:
                dict.__setitem__(self, p, dict(entry))
        self._loaded = False

    def _fresh(self) -> None:
        if self._loaded and self._key() == self._loaded_at:
            return
        if self._loaded and self.edited():
            # an edit not sent yet (the next step, push_params() or state_dict() sends it, on
            # the condition that the session is still at fetched_version): the view stays as
            # edited (a fetch at the newer version a pull_params() learned of dropped it
            # unsaid; the send now says that another client changed the session meanwhile)
            self._loaded_at = self._key()
            return
        self.take(*self._load())

    def take(self, values: Mapping[torch.Tensor, Any], version: int | None = None) -> None:
        """The session's state as just read (``values``: each parameter's entry, whose dicts
        are not kept, their values are; ``version``: the session version it was read at), put
        in the view as a fetch puts it, current at the key as it now stands:
        ``RemoteOptimizer.state_dict()`` puts the state it exported, so that an edit of its
        tensors in place is one of this view (:meth:`edited`), sent before the next step as an
        edit of ``opt.state`` is (torch's ``state_dict()`` holds its state's tensors
        themselves)."""
        self._strip()
        entries: dict[torch.Tensor, Any] = {}
        for p, fetched in values.items():
            entry = dict.get(self, p)
            if isinstance(entry, dict) and isinstance(fetched, dict):
                # the session's keys first, then the client's (as torch's entries hold them
                # when a wrapper adds its keys after the optimizer's step); the session's win
                kept = {k: v for k, v in entry.items() if k not in fetched}
                entry.clear()
                entry.update(fetched)
                entry.update(kept)
            else:
                entry = dict(fetched) if isinstance(fetched, dict) else fetched
            entries[p] = entry
            if isinstance(fetched, dict):
                self._session_keys[p] = frozenset(fetched)
                self._fetched[p] = {
                    k: (v, v._version if isinstance(v, torch.Tensor) else None)
                    for k, v in fetched.items()}
                if self._compare:  # (strided tensors: bitwise_equal compares those)
                    self._copies[p] = {k: v.detach().clone() for k, v in fetched.items()
                                       if isinstance(v, torch.Tensor)
                                       and v.layout == torch.strided}
        self._version = version
        for p, entry in dict.items(self):  # (only the client's keys: no session state yet)
            if p not in entries:
                entries[p] = entry
        dict.clear(self)
        dict.update(self, entries)
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

    def clear(self) -> None:
        self._fresh()
        super().clear()

    def pop(self, key: torch.Tensor, *default: Any) -> Any:
        self._fresh()
        return super().pop(key, *default)

    def popitem(self) -> tuple[torch.Tensor, Any]:
        self._fresh()
        return super().popitem()

    def setdefault(self, key: torch.Tensor, default: Any = None) -> Any:
        self._fresh()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._fresh()
        super().update(*args, **kwargs)

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
