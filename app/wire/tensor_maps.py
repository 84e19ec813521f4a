"""Mappings of tensors that carry what was found out about them once.

:class:`BodyTensors`: a request's gradients as decoded (their layout's key and their runs of
tensors laid end to end), so that the checks after decoding need not look at each tensor
again. :class:`PackedTensors`: tensors that are views into one buffer laid out as a
safetensors data section, their views made only when something looks inside. Any change to
either mapping forgets what it carried.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from app.wire.safetensors_header import HeaderLayout, Piece


T = TypeVar("T")


def _dict_method(name: str, first: str) -> Any:
    """``dict``'s method ``name``, calling ``self.<first>()`` before it."""
    method = getattr(dict, name)

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        getattr(self, first)()
        return method(self, *args, **kwargs)

    wrapped.__name__ = wrapped.__qualname__ = name
    wrapped.__doc__ = method.__doc__
    return wrapped


#: every method that changes a dict (in place)
_CHANGES = ("__setitem__", "__delitem__", "pop", "popitem", "setdefault", "update", "clear",
            "__ior__")


class _Derived(dict[str, torch.Tensor]):
    """A mapping of tensors that carries facts about them worked out once (see the
    subclasses); any change to the mapping forgets them (``_forget``)."""

    def _forget(self) -> None:
        raise NotImplementedError


for _name in _CHANGES:
    setattr(_Derived, _name, _dict_method(_name, "_forget"))


class BodyTensors(_Derived):
    """Dense CPU tensors decoded from one safetensors body, with what decoding them found out,
    so that later checks need not find it again tensor by tensor:

    - ``header``: the tensor entries of the header they follow (its JSON without
      ``__metadata__``, which may change with every step). Bodies with equal entries hold
      tensors of the same names, dtypes and shapes, so a session that checked one body against
      its parameters knows the next one passes (:meth:`app.engine.session.Session.known_body`);
    - ``runs``: each run of tensors laid end to end in one dtype, as (one flat view over the
      run, its names); given only when the runs hold every tensor that has bytes.

    Any change to the mapping forgets both (it no longer is the body's tensors)."""

    header: bytes | None = None
    runs: tuple[tuple[torch.Tensor, tuple[str, ...]], ...] = ()
    #: the checked tensor entries
    layout: HeaderLayout | None = None

    def _forget(self) -> None:
        self.header, self.runs, self.layout = None, (), None

    def tiling(self) -> tuple[list[str], bytes] | None:
        """When every tensor is a view in one of the runs (so that together they tile the
        body's data section): their names in file order, and the header entries of tensors so
        laid out (:func:`header_entries`; kept with the parsed header). Else None."""
        layout = self.layout
        if layout is None or not self.runs or sum(len(n) for _, n in self.runs) != len(self):
            return None
        return [name for _, _, name in layout.spans], layout.file_entries


def dense_body(tensors: object) -> bool:
    """Whether ``tensors`` are a body's as decoding (or a same-host binding) made them, and
    unchanged since: dense tensors, every one (no row-sparse gradient can be among them)."""
    return isinstance(tensors, BodyTensors) and tensors.header is not None


class PackedTensors(_Derived):
    """Tensors that are views into one buffer laid out as a safetensors data section (in this
    dict's order), so a safetensors body is just a header plus ``buffer``: no further copy.
    ``entries``: their header entries as JSON (``"name":{...},...``, no braces) when the
    packer kept them (a session packs the same layout every step); forgotten on any change to
    the mapping."""

    buffer: memoryview
    entries: bytes | None = None
    #: views not made yet (:meth:`deferred`): the bytes and their view plan
    _pending: tuple[torch.Tensor, tuple[Piece, ...]] | None = None
    #: encodings kept for several answers (:meth:`share`, :meth:`encoded`)
    _encodings: dict[object, Any] | None = None
    _encoding_lock: threading.Lock | None = None

    def share(self) -> None:
        """Mark these tensors as sent in several answers (a sync round's parameters go to
        each of its workers): :meth:`encoded` keeps their encodings."""
        self._encoding_lock = threading.Lock()
        self._encodings = {}

    @property
    def shared(self) -> bool:
        return self._encoding_lock is not None

    def encoded(self, what: object, make: Callable[[], T]) -> T:
        """``make()`` (an encoding of these :meth:`share` d tensors: ``what`` names it), made
        once and kept while the mapping lives and stays as it is; the first answer to ask
        makes it, the others wait for it and take it."""
        assert self._encoding_lock is not None, "encoded() of tensors not shared"
        with self._encoding_lock:
            kept = self._encodings
            if kept is None:  # (the mapping changed since: nothing kept holds)
                kept = self._encodings = {}
            if what not in kept:
                kept[what] = make()
            out: T = kept[what]
            return out

    @classmethod
    def deferred(cls, base: torch.Tensor, plan: tuple[Piece, ...], entries: bytes
                 ) -> PackedTensors:
        """``base`` (bytes) as :func:`view_plan` lays it out, its views made only on the first
        look inside the mapping: a binary answer sends ``buffer`` under a header from
        ``entries`` and never makes them (1,000 tensors: ~0.8 ms less per step, making and
        freeing 1,000 tensor objects)."""
        out = cls()
        out.buffer, out.entries, out._pending = base.numpy().data, entries, (base, plan)
        return out

    def _made(self) -> None:
        pending = self._pending
        if pending is not None:
            dict.update(self, _views(*pending))
            self._pending = None

    def _forget(self) -> None:
        self._made()
        self.entries = None
        self._encodings = None

    def __eq__(self, other: object) -> bool:
        self._made()
        if isinstance(other, PackedTensors):
            other._made()
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]


# every other look inside makes the views first
for _name in ("__getitem__", "__iter__", "__reversed__", "__len__", "__contains__",
              "__repr__", "__or__", "__ror__", "keys", "values", "items", "get", "copy"):
    setattr(PackedTensors, _name, _dict_method(_name, "_made"))


#: the most views one ``split_with_sizes`` cuts: the call holds the interpreter lock while it
#: makes its views' Python objects, every other thread waiting (the event loop among them):
#: 100,000 in one call held it 30-70 ms, 8,192 hold it ~1-3 ms
SPLIT_PIECE = 8192


def cut_views(flat: torch.Tensor, names: Sequence[str], numels: list[int],
         shapes: Sequence[Sequence[int]] | None, into: dict[str, torch.Tensor]) -> None:
    """Views of tensors of one dtype laid out back to back in ``flat``, into ``into``: one
    ``split_with_sizes`` per :data:`SPLIT_PIECE` tensors of the run (one tensor: none;
    torch.split's Python wrapper alone costs ~20 us), a ``view`` only where the shape is not
    1-D (``shapes`` None: all are)."""
    if len(names) > SPLIT_PIECE:
        pos = 0
        for at in range(0, len(names), SPLIT_PIECE):
            sizes = numels[at:at + SPLIT_PIECE]
            size = sum(sizes)
            cut_views(flat[pos:pos + size], names[at:at + SPLIT_PIECE], sizes,
                      None if shapes is None else shapes[at:at + SPLIT_PIECE], into)
            pos += size
        return
    pieces = (flat,) if len(names) == 1 else flat.split_with_sizes(numels)
    if shapes is None:
        into.update(zip(names, pieces, strict=True))
        return
    for name, piece, shape in zip(names, pieces, shapes, strict=True):
        into[name] = piece if len(shape) == 1 else piece.view(shape)


def view_plan(layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
              numels: list[int] | None = None) -> tuple[Piece, ...]:
    """Tensors laid out one after another in this order, from the start of a byte buffer:
    each run of one dtype as one :data:`Piece` (cut by one ``torch.split``: 1,000 small
    tensors take a fraction of the three torch calls per tensor that slicing and viewing each
    would). ``numels``: the tensors' element counts, when the caller has them."""
    counts = numels if numels is not None else [math.prod(shape) for _, _, shape in layout]
    plan: list[Piece] = []
    pos = i = 0
    while i < len(layout):
        dtype = layout[i][1]
        j = i + 1
        while j < len(layout) and layout[j][1] == dtype:
            j += 1
        nbytes = sum(counts[i:j]) * dtype.itemsize
        shapes = [tuple(shape) for _, _, shape in layout[i:j]]
        plan.append((pos, pos + nbytes, dtype, tuple(name for name, _, _ in layout[i:j]),
                     counts[i:j], None if all(len(shape) == 1 for shape in shapes) else shapes))
        pos += nbytes
        i = j
    return tuple(plan)


def _views(base: torch.Tensor, plan: Sequence[Piece]) -> dict[str, torch.Tensor]:
    """Views of ``base`` (bytes) as :func:`view_plan` lays them out."""
    views: dict[str, torch.Tensor] = {}
    for begin, end, dtype, names, numels, shapes in plan:
        assert numels is not None
        cut_views(base[begin:end].view(dtype), names, numels, shapes, views)
    return views


def packed_from_plan(base: torch.Tensor, plan: Sequence[Piece]) -> PackedTensors:
    """:func:`_views` of ``base`` as :class:`PackedTensors`."""
    out = PackedTensors(_views(base, plan))
    out.buffer = base.numpy().data
    return out


