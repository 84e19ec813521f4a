"""Safetensors bodies: a strict reader (hostile input gives :class:`Invalid`/:class:`BadRequest`,
never an exception escaping) and a writer.

The reader returns tensors that are views into the given buffer where alignment allows
(no copy), so pass a ``bytearray`` that nothing else will write to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import orjson
import torch

from app.errors import BadRequest
from app.runtime import gc_paused
from app.wire.safetensors_header import (
    HeaderLayout,
    checked_header,
    header_entries,
)
from app.wire.tensor_maps import BodyTensors, PackedTensors, cut_views, packed_from_plan, view_plan

__all__ = ["BodyTensors", "PackedTensors", "framed_header", "header_entries", "packed_from_plan",
           "framed_parts", "pack", "packed_header", "packed_header_parts", "read_safetensors",
           "safetensors_header", "safetensors_parts", "view_plan", "write_safetensors"]

MAX_HEADER = 100 * 1024 * 1024


#: a header this large (about 1,000 tensors) is parsed, and its tensors made, with the cyclic
#: garbage collector paused (app.runtime.gc_paused)
PAUSE_GC_HEADER = 64 * 1024


def header_end(buf: bytes | bytearray | memoryview) -> int:
    """Where a safetensors body's header ends (its 8-byte length prefix and the header it
    announces), at most the body's length: what decoding the body costs, in bytes (its
    tensors are views of the rest)."""
    if len(buf) < 8:
        return len(buf)
    return min(len(buf), 8 + int.from_bytes(buf[:8], "little"))


def read_safetensors(
    buf: bytes | bytearray | memoryview, field: str = "body",
    before_tensors: Callable[[HeaderLayout, dict[str, str]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors file held in memory: (tensors by name, ``__metadata__``).
    ``before_tensors`` sees the checked header (its entries, its metadata) before any tensor
    is made, and may refuse the body."""
    if len(buf) < 8:
        raise BadRequest("body is not a safetensors file: shorter than its 8-byte header length",
                         code="invalid_safetensors", field=field)
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8 or n > MAX_HEADER:
        raise BadRequest(f"safetensors header claims {n} bytes but the body has {len(buf) - 8}",
                         code="invalid_safetensors", field=field)
    data_start = 8 + n
    data_len = len(buf) - data_start
    header = bytes(buf[8:data_start])
    with gc_paused() if n >= PAUSE_GC_HEADER else contextlib.nullcontext():
        layout, metadata = checked_header(header, data_len, field)
        if before_tensors is not None:
            before_tensors(layout, metadata)
        writable = isinstance(buf, bytearray) or (isinstance(buf, memoryview)
                                                  and not buf.readonly)
        view = memoryview(buf)[data_start:]
        # one tensor over the whole data section; each tensor a view of a slice of it (no copy)
        base = torch.frombuffer(view, dtype=torch.uint8) if writable and data_len else None
        runs: list[tuple[torch.Tensor, tuple[str, ...]]] = []
        made = _make_tensors(layout, base, view, runs)
        out = (BodyTensors(made) if layout.in_order
               else BodyTensors((name, made[name]) for name in layout.entries))
        out.header, out.layout = layout.key, layout
        if base is not None and layout.all_in_runs:
            out.runs = tuple(runs)
        return out, dict(metadata)


def _make_tensors(parsed: HeaderLayout, base: torch.Tensor | None, view: memoryview,
                  runs: list[tuple[torch.Tensor, tuple[str, ...]]]) -> dict[str, torch.Tensor]:
    """The checked entries' tensors, in file order: views into ``base`` where alignment allows,
    each run of adjacent tensors of one dtype cut by one ``torch.split`` (one torch call per
    run, not three per tensor: 1,000 small tensors decode in a fraction of the time), each
    run's flat view and names appended to ``runs``; a copy of its bytes where not (a tensor
    whose offset its dtype cannot view; every tensor when there is no ``base``)."""
    tensors: dict[str, torch.Tensor] = {}
    if base is None:
        for begin, end, name in parsed.spans:
            dtype, shape, _ = parsed.entries[name]
            tensors[name] = _copied(view, begin, end, dtype, shape)
        return tensors
    for begin, end, dtype, names, numels, shapes in parsed.plan:
        if numels is None:
            assert shapes is not None
            tensors[names[0]] = _copied(view, begin, end, dtype, shapes[0])
            continue
        flat = base[begin:end].view(dtype)
        cut_views(flat, names, numels, shapes, tensors)
        runs.append((flat, names))
    return tensors


def _copied(view: memoryview, begin: int, end: int, dtype: torch.dtype,
            shape: Sequence[int]) -> torch.Tensor:
    """A tensor of its own holding ``view[begin:end]``."""
    if begin == end:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(view[begin:end]), dtype=dtype).reshape(tuple(shape))


def safetensors_header(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None
) -> bytes:
    """The safetensors header (length prefix included) for ``tensors`` laid out one after
    another in this mapping's order."""
    with gc_paused() if len(tensors) >= 1000 else contextlib.nullcontext():
        entries = header_entries([(name, t.dtype, t.shape) for name, t in tensors.items()])
    return _framed(entries, metadata)


def _framed(entries: bytes, metadata: dict[str, str] | None) -> bytes:
    """A header from its tensor entries (:func:`header_entries`) and ``__metadata__``: the
    bytes orjson writes for the whole object, padded to 8, after its length."""
    return framed_header(entries, orjson.dumps(metadata) if metadata else b"")


def framed_header(entries: bytes, metadata_json: bytes) -> bytes:
    """:func:`_framed` with the ``__metadata__`` object given as the JSON orjson writes for it
    (``b""``: none)."""
    return b"".join(framed_parts(entries, metadata_json))


def framed_parts(entries: bytes, metadata_json: bytes) -> list[bytes]:
    """:func:`framed_header` as three pieces, ``entries`` the middle one as it is (not copied:
    a header of 100,000 entries is 6.7 MB, and joining it to its frame copied it four times
    over on the event loop): the length and what comes before the entries, the entries, and
    what comes after them."""
    meta = b'"__metadata__":' + metadata_json if metadata_json else b""
    head = b"{" + meta + (b"," if meta and entries else b"")
    size = len(head) + len(entries) + 1
    size += -size % 8
    tail = b"}" + b" " * (size - len(head) - len(entries) - 1)
    return [size.to_bytes(8, "little") + head, entries, tail]


def safetensors_parts(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None
) -> list[bytes | memoryview]:
    """A safetensors file as pieces: the header, then each CPU tensor's own bytes (no copy of
    contiguous ones), widest dtypes first so that every tensor is naturally aligned."""
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    ready = {n: tensors[n].detach().contiguous() for n in order}
    parts: list[bytes | memoryview] = [safetensors_header(ready, metadata)]
    parts += [t.reshape(-1).view(torch.uint8).numpy().data for t in ready.values() if t.numel()]
    return parts


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """Serialize CPU tensors (any layout) and string metadata to safetensors bytes."""
    return b"".join(safetensors_parts(tensors, metadata))




def narrowed_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` is sent as when answers are narrowed to ``dtype``: floating tensors
    wider than it are narrowed; others (narrower ones, integers, complex) go as they are."""
    if dtype is not None and t.is_floating_point() and t.element_size() > dtype.itemsize:
        return dtype
    return t.dtype


def pack(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
         ) -> PackedTensors:
    """Copy tensors (any device) into one CPU buffer, widest dtypes first so every view is
    naturally aligned; with ``dtype``, floating tensors wider than it narrowed on the way
    (:func:`narrowed_dtype`: the cast is the copy, no narrowed temporary). One copy, and the
    result can be sent without another."""
    wire = {n: narrowed_dtype(t, dtype) for n, t in tensors.items()}
    order = sorted(tensors, key=lambda n: -wire[n].itemsize)
    total = sum(tensors[n].numel() * wire[n].itemsize for n in order)
    # From a GPU: into pinned (page-locked) host memory, one asynchronous device-to-host copy
    # per tensor, then one wait (torch caches pinned blocks: no allocation cost per step).
    cuda = any(tensors[n].is_cuda for n in order)
    # torch.empty, not bytearray(total): no zero-filling (and faulting in) pages that the
    # copies below overwrite anyway (about half the cost of a 40 MB pack)
    base = torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    plan = view_plan([(n, wire[n], tensors[n].shape) for n in order])
    out = packed_from_plan(base, plan)
    with torch.no_grad():
        if cuda:
            for name in order:
                out[name].copy_(tensors[name].detach(), non_blocking=True)
            torch.cuda.current_stream().synchronize()
        else:  # one torch call per run of one dtype, not one copy per tensor
            for begin, end, run_dtype, names, _, _ in plan:
                if all(tensors[n].dtype == run_dtype for n in names):
                    torch.cat([tensors[n].detach().reshape(-1) for n in names],
                              out=base[begin:end].view(run_dtype))
                else:  # narrowed as they are copied
                    torch._foreach_copy_([out[n] for n in names],
                                         [tensors[n].detach() for n in names])
    return out


def packed_header(packed: PackedTensors, metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (length prefix included) for ``packed``'s buffer: the same bytes
    as :func:`safetensors_header`, from its kept ``entries`` where it has them."""
    return b"".join(packed_header_parts(packed, metadata))


def packed_header_parts(packed: PackedTensors, metadata: dict[str, str] | None
                        ) -> list[bytes]:
    """:func:`packed_header` in pieces, kept ``entries`` not copied (:func:`framed_parts`)."""
    if packed.entries is None:
        return [safetensors_header(packed, metadata)]
    return framed_parts(packed.entries, orjson.dumps(metadata) if metadata else b"")
