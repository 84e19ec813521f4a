"""Parameters that live in the same-host segment (``RemoteOptimizer(..., zero_copy=True)``).

Over the same-host transport the server writes a step's new values into the parameter slots
of the session's shared segment (``optserve._local``). Copying them from there into each
parameter is one more pass over every parameter's bytes per step: at 1e7 float32 values
about 5 ms of the worker's CPU on a 2-core machine, half of what a step costs it. Instead, the
first time a parameter comes back through a slot, the parameter's memory becomes the slot
(``p.data`` set to a view of the slot's bytes), and every later step finds its new values
already there.

That is only done where nobody could tell: a plain CPU tensor (``torch.Tensor`` or
``nn.Parameter``, no subclass), dense, contiguous, not pinned, not in shared memory, of the
slot's dtype and shape, that is the whole of its storage, and whose storage nothing else
holds (no view of it, no ``p.data`` kept by anyone, no other optimizer's segment: torch's own
use count of the storage says so). Any other parameter keeps its own memory and gets its new
values copied in, as before. Once moved, a parameter stays where it is until something
replaces its memory (``model.to(...)``, ``p.data = ...``); after a new binding (the session
made again, the server restarted) it moves to the new slot under the same conditions, else
the values are copied into it. Its old segment stays mapped for as long as anything views it.

A child forked from the process (``DataLoader`` workers, ``multiprocessing`` with fork) gets
a copy of each moved parameter taken just before the fork (:func:`_before_fork`,
:func:`_in_child`), as a fork's snapshot; for large CPU models forked often that is a copy per
fork in the parent, and memory each child holds (``zero_copy=False`` avoids both).

Each step bumps the moved parameters' version counters, as the copy did: autograd still
refuses a backward through a graph that saved a parameter the step changed.

The server writes a slot only once the step is acknowledged (under durability ``step``, once
its record is durable: ``EmbeddedHost.execute``'s ``into_seen``), so a refused or failed step
leaves the parameters as they were. One case differs from a copy: a server killed while it
writes the slots (a few ms at 1e7 values) leaves them part new, part old; the step was then
durable, and its retry (``RemoteOptimizer`` retries with the same idempotency key) writes all
of them.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: ``torch._C._storage_Use_Count`` of a storage held by one tensor only (the count includes
#: the handle the call itself makes)
_ALONE: int | None = None


def _use_count(t: torch.Tensor) -> int | None:
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        return int(count(t.untyped_storage()._cdata))
    except Exception:  # noqa: BLE001 - an unusual tensor: not moved
        return None


def _alone() -> int | None:
    global _ALONE
    if _ALONE is None:
        _ALONE = _use_count(torch.empty(1))
    return _ALONE


def same_memory(p: torch.Tensor, slot: torch.Tensor) -> bool:
    """``p`` lives in ``slot`` already."""
    return (p.device.type == "cpu" and p.data_ptr() == slot.data_ptr()
            and p.dtype == slot.dtype and p.shape == slot.shape)


def movable(p: torch.Tensor, slot: torch.Tensor) -> bool:
    """Whether ``p``'s memory may become ``slot`` (see the module's docstring)."""
    if type(p) not in _PLAIN or type(slot) is not torch.Tensor or p.is_inference():
        return False  # (inference tensors have no version counter to bump)
    if (p.device.type != "cpu" or p.layout != torch.strided or p.dtype != slot.dtype
            or p.shape != slot.shape or not p.is_contiguous() or not slot.is_contiguous()
            or p.is_conj() or p.is_neg() or p._base is not None or p.storage_offset() != 0):
        return False
    storage = p.untyped_storage()
    if storage.nbytes() != p.numel() * p.element_size():
        return False
    if storage.is_shared() or p.is_pinned():
        return False
    alone = _alone()
    return alone is not None and _use_count(p) == alone


class InSlots:
    """One optimizer's parameters that live in their slots: each one's slot (the view the
    binding hands out, the same object every step) and its data pointer, so that a step finds
    a parameter still there with one lookup and one ``data_ptr()`` call (1,000 tensors: the
    full checks cost the client more than the copies they save)."""

    def __init__(self) -> None:
        #: by name: the slot, its data pointer, the parameter living in it (held as the
        #: optimizer holds it: no weak reference to a parameter, which
        #: ``torch.utils.swap_tensors`` refuses to swap) and a detached alias of it (:func:`move`
        #: gives it a storage of its own: the alias counts as another holder of that memory,
        #: which another optimizer's segment then never takes: :func:`movable`)
        self._known: dict[str, tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = {}
        _MOVED.add(self)

    def lives_in(self, name: str, p: torch.Tensor, slot: object) -> bool:
        """Whether ``p`` (the parameter ``name``) lives in ``slot`` now: it did, or it was
        moved there (:func:`movable`); False: copy into it."""
        known = self._known.pop(name, None)
        if known is not None and known[0] is slot and known[2] is p \
                and p.data_ptr() == known[1]:
            self._known[name] = known
            return True
        del known  # (its alias of p would count as another holder of p's memory)
        if not isinstance(slot, torch.Tensor):
            return False
        if not same_memory(p, slot):
            if not movable(p, slot):
                return False
            move(p, slot)
        self._known[name] = (slot, slot.data_ptr(), p, p.detach())
        return True

    def living(self) -> list[torch.Tensor]:
        """The parameters that live in their slots now."""
        return [p for _, ptr, p, _ in self._known.values() if p.data_ptr() == ptr]


#: every optimizer's parameters moved into a segment (a forked child takes them back:
#: :func:`_in_child`), weakly: its :class:`InSlots`, never a weak reference to a parameter
#: (``torch.utils.swap_tensors``, which ``load_state_dict`` and ``Module.to`` use under
#: ``torch.__future__.set_swap_module_params_on_conversion(True)``, refuses a tensor with one)
_MOVED: weakref.WeakSet[InSlots] = weakref.WeakSet()


def move(p: torch.Tensor, slot: torch.Tensor) -> None:
    """``p``'s memory becomes ``slot``'s (which holds its new values), through a storage of
    its own over the same bytes (a numpy view of them holds the slot): an in-place change of
    ``p``'s storage (``share_memory_()``, which ``Module.share_memory()`` and
    ``torch.multiprocessing``'s pickling make) moves ``p`` alone, never the binding's view of
    the segment, where the server's next values are (they are then copied into ``p``)."""
    raw = slot.detach().reshape(-1).view(torch.uint8).numpy()
    p.data = torch.from_numpy(raw).view(slot.dtype).view(slot.shape)


#: copies of the moved parameters taken just before a fork (:func:`_before_fork`)
_AT_FORK: list[tuple[torch.Tensor, torch.Tensor]] = []


def _before_fork() -> None:
    """In the process about to fork: a copy of every moved parameter, for the child. Taken
    here, not in the child: the parent goes on at once after the fork, and its next step
    writes the segment the child still shares until it has copied it."""
    _AT_FORK.clear()
    for p in [p for moved in list(_MOVED) for p in moved.living()]:
        try:
            _AT_FORK.append((p, p.detach().clone()))
        except Exception:  # noqa: BLE001 - an unusual tensor by now: left as it is
            continue


def _in_child() -> None:
    """In a child forked from this process (``DataLoader`` workers, ``multiprocessing``):
    every moved parameter gets memory of its own again, its values at the fork. The segment
    is shared memory, so the child would otherwise see the parent's later steps in its
    parameters, and the parent (and the server) the child's writes into them, where a fork
    gives the child a snapshot."""
    for p, copy in _AT_FORK:
        try:
            p.data = copy
        except Exception:  # noqa: BLE001 - an unusual tensor by now: left as it is
            continue
    _AT_FORK.clear()
    for moved in list(_MOVED):
        moved._known.clear()


os.register_at_fork(before=_before_fork, after_in_child=_in_child,
                    after_in_parent=_AT_FORK.clear)


def bump(params: Sequence[torch.Tensor]) -> None:
    """The version counters of parameters whose values changed in place without torch
    knowing (written by the server): as a copy into them would."""
    if params:
        torch.autograd.graph.increment_version(list(params))
