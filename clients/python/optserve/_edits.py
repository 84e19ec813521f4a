"""Edits through ``p.data`` (``RemoteOptimizer(..., detect_data_edits=True)``, the default).

``RemoteOptimizer`` sends a parameter edited locally before the next step. An edit in place on
the parameter (``with torch.no_grad(): p.mul_(...)``, ``module.load_state_dict``) bumps its
version counter, which costs nothing to read. An edit through ``p.data`` does not: ``p.data``
is a new tensor with a version counter of its own, so ``p.data.clamp_(-c, c)`` (WGAN weight
clipping), ``p.data.copy_(...)`` and ``p.data = tensor`` (``vector_to_parameters``) leave
``p._version`` as it was, and the server would step from its own copy of the old values.

So each parameter's values are kept as they were when last in step with the session (the
values the optimizer wrote into it, or sent), and a parameter whose version counter did not
move is compared with them bit for bit before each step (their bytes, by the C library's
``memcmp`` where both are contiguous CPU tensors, else as integers: a NaN equals the same NaN,
``-0.0`` differs from ``0.0``). What is kept is, where it can be, the answer the values
were copied from, which nothing else writes until the next step's answer, so that no copy is
made for it:

- over HTTP, the step's answer tensors (the ``ReceiveBuffer`` a large answer is read into,
  the bytes of a small one, a JSON answer's tensors), a pull's, an LBFGS evaluation's;
- over the same-host transport without ``zero_copy`` (or for a parameter that was not moved),
  the parameter's slot in the shared segment, which the server writes only at the next step.

Elsewhere it is a copy of the parameter's own (made once, then copied into): a parameter that
lives in its slot (``zero_copy``: the slot is the parameter), one on another device than the
answer (a CUDA model), one answered narrowed (``wire_dtype``), one stepped by rows
(``?return=touched``), one pushed, every parameter before its first answer, and every small
one (:data:`SMALL` values or fewer): those are copied into with one ``torch._foreach_copy_``
and compared joined end to end, one comparison for all of a dtype (1,000 parameters of 4
values: checking each answer's tensor cost more than the copy).

A step's answer overwrites the previous one: the parameters it leaves out (an answer of the
touched rows only, of the parameters with a gradient) whose reference was there get copies of
their own values, which that answer did not change. A step that fails after something may have
been written there (the buffer, the slots) takes copies of the parameters as they are then,
which the session holds (the failed step's retry with its key brings the new values). An
answer of touched rows only is copied into the references of its own, not kept: the next one
would leave the others out.

A limit: the same-host slots are one per client thread and session, so two optimizers of one
session stepping through one ``Client`` in one thread share them (as ``zero_copy`` would share
the parameters' memory): the other's step rewrites the slot a large parameter of this one is
compared with, and this one then sends its own values as an edit. Give each its own client
(each thread has its own slots anyway).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable, Mapping, Set

import torch
from torch._C._nn import flatten_dense_tensors

#: an integer dtype of each element size: values compared as their bits
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: parameters of at most this many values are compared together, those of one dtype and
#: device joined into one buffer each side (1,000 parameters of 4 values: one comparison, not
#: 1,000; a difference found there is looked for one by one)
SMALL = 1 << 14


def _libc_memcmp() -> Callable[[int, int, int], int] | None:
    """The C library's ``memcmp`` (ctypes lets go of the GIL while it runs), or None where
    there is none to load."""
    try:
        # (the process's own symbols hold the C library's on POSIX: no ``find_library``,
        # which runs ``ldconfig`` in a subprocess, 13 ms at import here)
        libc = ctypes.CDLL(None) if os.name == "posix" else ctypes.cdll.msvcrt
        fn = libc.memcmp
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


#: ``memcmp``: compares two CPU tensors' bytes about 2.7x faster than ``torch.equal`` does
#: their integer views (1e7 float32 values on one core of the development machine: 2.9 ms
#: against 7.7 ms; ``benchmarks.data_edits --in-process``)
_MEMCMP = _libc_memcmp()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Whether ``a`` and ``b`` (of one dtype and shape) hold the same bytes, by ``memcmp``,
    or None where that does not answer it: not both plain contiguous CPU tensors (a view
    with a conjugate or negative bit holds other bytes than its values)."""
    if (_MEMCMP is None or a.device.type != "cpu" or b.device.type != "cpu"
            or not a.is_contiguous() or not b.is_contiguous() or a.is_quantized
            or a.is_conj() or b.is_conj() or a.is_neg() or b.is_neg()):
        return None
    size = a.numel() * a.element_size()
    if size == 0:
        return True
    return _MEMCMP(a.data_ptr(), b.data_ptr(), size) == 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_conj() or t.is_neg():  # (a view whose values are not its bytes: no integer view)
        t = t.resolve_conj().resolve_neg()
    if t.is_floating_point() or t.is_complex():
        width = _BITS.get(t.element_size())
        if width is not None:
            return t.view(width)
    return t


def bitwise_equal(p: torch.Tensor, ref: torch.Tensor) -> bool:
    """``p`` holds exactly ``ref``'s bits (same dtype, shape and device)."""
    a = p.detach()
    if (a.layout != torch.strided or a.dtype != ref.dtype or a.shape != ref.shape
            or a.device != ref.device):
        return False
    return _equal_bits(a, ref)


def _joined_equal(ps: list[torch.Tensor], refs: list[torch.Tensor]) -> bool:
    """Each of ``ps`` holds its reference's bits (of the same dtype and number of values each,
    the caller checked): both lists joined end to end, compared as integers. False also
    where they cannot be joined (on several devices): each is then compared on its own."""
    try:
        a, b = flatten_dense_tensors(ps), flatten_dense_tensors(refs)
    except RuntimeError:
        return False
    if a.dtype != b.dtype or a.device != b.device or a.shape != b.shape:
        return False
    return _equal_bits(a, b)


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` (of one dtype, shape and device) hold the same bits: by ``memcmp``
    where it answers, else as integers."""
    same = _same_bytes(a, b)
    return bool(torch.equal(_bits(a), _bits(b))) if same is None else same


class _Joined:
    """The small parameters of one dtype and device (:data:`SMALL`): their names, the
    parameters, their references and their sizes, in one order (kept while no reference
    among them changes)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.refs: list[torch.Tensor] = []
        self.numels: list[int] = []

    def add(self, name: str, p: torch.Tensor, ref: torch.Tensor) -> None:
        self.names.append(name)
        self.params.append(p)
        self.refs.append(ref)
        self.numels.append(ref.numel())

    def edited(self) -> list[str]:
        """The names of those that differ: nothing when the joined buffers are equal and no
        parameter changed its size, else each compared on its own."""
        if len(self.params) > 1 and [p.numel() for p in self.params] == self.numels \
                and _joined_equal(self.params, self.refs):
            return []
        return [n for n, p, r in zip(self.names, self.params, self.refs, strict=True)
                if not bitwise_equal(p, r)]


class References:
    """Each parameter's values as last in step with the session (see the module's docs)."""

    def __init__(self) -> None:
        self._refs: dict[str, torch.Tensor] = {}
        #: names whose reference is a tensor of this object's own (copied into, never an
        #: answer's memory)
        self._owned: set[str] = set()
        #: bumped whenever a small parameter's reference becomes another tensor
        self._generation = 0
        #: (generation, how many parameters, the large ones' names, the small ones by dtype)
        self._plan: tuple[int, int, list[str], list[_Joined]] | None = None

    def _set(self, name: str, ref: torch.Tensor) -> None:
        if ref.numel() <= SMALL or name not in self._refs \
                or self._refs[name].numel() <= SMALL:
            self._generation += 1
        self._refs[name] = ref

    def edited_among(self, params: Mapping[str, torch.Tensor], skip: Set[str]) -> set[str]:
        """The names of the ``params`` not in ``skip`` that differ from their references: large
        ones compared one by one, small ones together (:data:`SMALL`): those of one dtype and
        device joined into one buffer each side, compared at once, and one by one only where
        that buffer differs. Which is which is worked out once while no small one's
        reference changes (they are copies, copied into: see :meth:`usable`) and nothing is
        skipped, not at every step."""
        with torch.no_grad():
            plan = self._plan
            if skip or plan is None or plan[0] != self._generation or plan[1] != len(params):
                out, large, joined = self._sort(params, skip)
                if not skip:
                    self._plan = (self._generation, len(params), large, joined)
            else:
                out, large, joined = set(), plan[2], plan[3]
            for name in large:
                ref = self._refs.get(name)
                if ref is None or not bitwise_equal(params[name], ref):
                    out.add(name)
            for group in joined:
                out.update(group.edited())
        return out

    def _sort(self, params: Mapping[str, torch.Tensor], skip: Set[str]
              ) -> tuple[set[str], list[str], list[_Joined]]:
        """The ``params`` (less ``skip``) without a reference, the large ones' names and the
        small ones by dtype and device."""
        out: set[str] = set()
        large: list[str] = []
        joined: dict[tuple[torch.dtype, torch.device], _Joined] = {}
        for name, p in params.items():
            if name in skip:
                continue
            ref = self._refs.get(name)
            if ref is None:
                out.add(name)
            elif ref.numel() > SMALL:
                large.append(name)
            else:
                group = joined.get((ref.dtype, ref.device))
                if group is None:
                    group = joined[ref.dtype, ref.device] = _Joined()
                group.add(name, p, ref)
        return out, large, list(joined.values())

    def usable(self, p: torch.Tensor, value: object) -> bool:
        """``value`` (an answer's tensor just copied into ``p``) holds ``p``'s bits and may serve
        as its reference. Not a small one's (:data:`SMALL`): one ``torch._foreach_copy_`` of
        all of those costs less than these checks of each, and their references then stay
        the same tensors from step to step."""
        return (type(value) is torch.Tensor and value.numel() > SMALL
                and value.layout == torch.strided and value.dtype == p.dtype
                and value.shape == p.shape and value.device == p.device
                and value.data_ptr() != p.data_ptr())

    def adopt(self, name: str, value: torch.Tensor) -> None:
        """An answer's tensor (see :meth:`usable`) is ``name``'s reference now."""
        self._set(name, value)
        self._owned.discard(name)

    def snapshot(self, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies of the parameters' current values become their references: copied into the
        copies kept already (one ``torch._foreach_copy_``), else new ones."""
        into: list[torch.Tensor] = []
        froms: list[tuple[str, torch.Tensor]] = []
        new: list[tuple[str, torch.Tensor]] = []
        with torch.no_grad():
            for name, p in params:
                ref = self._refs.get(name) if name in self._owned else None
                if ref is None:
                    new.append((name, p))
                else:
                    into.append(ref)
                    froms.append((name, p))
            if into:
                try:
                    torch._foreach_copy_(into, [p for _, p in froms])
                except RuntimeError:  # (a parameter now on another device, or sparse)
                    new += froms
                else:
                    # (a parameter given another dtype or size: a copy of its own)
                    new += [(n, p) for (n, p), r in zip(froms, into, strict=True)
                            if p.dtype != r.dtype or p.shape != r.shape]
            for name, p in new:
                value = p.detach()
                self._set(name, value.clone(memory_format=torch.contiguous_format)
                          if value.layout == torch.strided else value.clone())
                self._owned.add(name)

    def rows(self, name: str, p: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
             ) -> None:
        """``p``'s ``rows`` were set to ``values`` (a touched-rows answer): the same rows of its
        own reference, else a copy of ``p``."""
        ref = self._refs.get(name) if name in self._owned else None
        if ref is None or ref.dtype != p.dtype or ref.shape != p.shape \
                or ref.device != p.device:
            self.snapshot([(name, p)])
            return
        with torch.no_grad():
            ref.index_copy_(0, rows.to(ref.device), values.to(device=ref.device,
                                                              dtype=ref.dtype))

    def settle(self, params: Iterable[tuple[str, torch.Tensor]], answered: Iterable[str]
               ) -> None:
        """After a step's answer was read (into the kept buffer, or the slots written): the
        parameters whose reference was an answer's memory and that this answer did not give
        a new one (it left them out) get copies of their current values, which the answer
        did not change (what that memory held before the answer overwrote it)."""
        owned = self._owned
        if len(owned) == len(self._refs):
            return
        done = set(answered)
        self.snapshot([(n, p) for n, p in params if n not in owned and n not in done])
