"""Safetensors bodies: a strict reader (hostile input gives :class:`Invalid`/:class:`BadRequest`,
never an exception escaping) and a writer.

The reader returns tensors that are views into the given buffer where alignment allows
(no copy), so pass a ``bytearray`` that nothing else will write to.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from app.errors import BadRequest, Invalid
from app.runtime import gc_paused
from app.wire.dtypes import SAFETENSORS_NAMES, TORCH_DTYPES
from app.wire.json_tensor import MAX_EXTENT, parse_shape

MAX_HEADER = 100 * 1024 * 1024


#: a header this large (about 1,000 tensors) is parsed, and its tensors made, with the cyclic
#: garbage collector paused (app.runtime.gc_paused)
PAUSE_GC_HEADER = 64 * 1024


def read_safetensors(
    buf: bytes | bytearray | memoryview, field: str = "body"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors file held in memory: (tensors by name, ``__metadata__``)."""
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
        parse = (_parsed_header if n <= KEEP_HEADER
                 else _parsed_big_header if n <= KEEP_BIG_HEADER else _parse_header)
        parsed = parse(header, data_len, field)
        layout = parsed.layout
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
        return out, dict(parsed.metadata)


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
    layout: _Layout | None = None

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


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_ST_DTYPES = {name: TORCH_DTYPES[json_name] for name, json_name in SAFETENSORS_NAMES.items()}
#: headers up to this size are kept, parsed (``_parsed_header``): a client sends the same
#: header with every step, and checking 1,000 entries cost more than the rest of the decoding
KEEP_HEADER = 256 * 1024
#: and the last one up to this size (100,000 tensors: a 6.8 MB header, ~0.2 s a step to check
#: and plan, ~50 MB kept parsed, given back when the server is idle: forget_big_header)
KEEP_BIG_HEADER = 8 * 1024 * 1024
#: how a body's tensors are made: per run of tensors laid end to end in one dtype, at offsets
#: it can view, (begin, end, dtype, names, numels, shapes: None when all are 1-D); an empty
#: tensor, or one at an offset its dtype cannot view, alone with numels None
_Piece = tuple[int, int, torch.dtype, tuple[str, ...], list[int] | None,
               list[tuple[int, ...]] | None]


@dataclass(frozen=True)
class _Parsed:
    """A checked header (nothing in it may be changed: ``_parsed_header`` keeps it)."""

    layout: _Layout
    metadata: dict[str, str]


@dataclass(frozen=True)
class _Layout:
    """A header's checked tensor entries (kept by ``_layouts``: nothing in it may be changed).
    """

    #: the entries as JSON (the header without ``__metadata__``, as orjson writes it)
    key: bytes
    #: the tensors' (begin, end, name), in file order
    spans: tuple[tuple[int, int, str], ...]
    #: (dtype, shape, numel) by name, in header order
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]]
    #: how the tensors are made (:data:`_Piece`; file order, but for empty tensors)
    plan: tuple[_Piece, ...]
    #: whether the plan makes them in header order
    in_order: bool
    #: whether every tensor that has bytes is in a run
    all_in_runs: bool

    @functools.cached_property
    def file_entries(self) -> bytes:
        """The header entries (:func:`header_entries`) of the tensors in file order."""
        return header_entries([(name, *self.entries[name][:2]) for _, _, name in self.spans])


def _parse_header(header: bytes, data_len: int, field: str) -> _Parsed:
    """A safetensors header checked against a data section of ``data_len`` bytes: its
    ``__metadata__``, and its tensor entries (:class:`_Layout`, kept by their JSON: a client
    that sends new metadata with every step, a scheduler's options or a loss, sends the same
    entries). Nothing returned may be changed (``_parsed_header`` keeps it)."""
    split = _metadata_first(header)
    if split is not None:  # the entries are not parsed at all when they are kept
        metadata, rest = split
        return _Parsed(_kept_layout(rest, data_len, field, lambda: _json_object(rest, field)),
                       metadata)
    parsed = _json_object(header, field)
    metadata_raw = parsed.pop("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise BadRequest("safetensors __metadata__ must map strings to strings",
                         code="invalid_safetensors", field=f"{field}.__metadata__")
    return _Parsed(_kept_layout(orjson.dumps(parsed), data_len, field, lambda: parsed),
                   metadata_raw)


def _json_object(raw: bytes, field: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError, orjson.JSONDecodeError):
        raise BadRequest("safetensors header is not valid JSON", code="invalid_safetensors",
                         field=field) from None
    if not isinstance(parsed, dict):
        raise BadRequest("safetensors header must be a JSON object", code="invalid_safetensors",
                         field=field)
    return parsed


#: a header that opens with its ``__metadata__`` object of strings, as safetensors' writers
#: put it (matched within its first META_FIRST_WINDOW bytes)
_META_FIRST = re.compile(
    rb'\{_*"__metadata__"_*:_*(\{(?:_*"(?:[^"\\]|\\.)*"_*:_*"(?:[^"\\]|\\.)*"_*,?)*_*\})_*,'
    .replace(b"_*", b"[ \t\n\r]*"), re.S)  # (JSON's whitespace, no other)
META_FIRST_WINDOW = 64 * 1024


def _metadata_first(header: bytes) -> tuple[dict[str, str], bytes] | None:
    """A header that opens with its ``__metadata__``, split without parsing the entries: the
    metadata, and the header without it (``{`` and the entries: the same JSON object but for
    that key). None when it is not laid out so, or when anything is unusual (the metadata not
    valid JSON, a second ``__metadata__`` further on, which would win): such a header is parsed
    whole, with the same errors as ever."""
    found = _META_FIRST.match(header, 0, META_FIRST_WINDOW)
    if found is None:
        return None
    rest = b"{" + header[found.end():].rstrip(b" \t\n\r")  # (writers pad it to 8 bytes)
    if b'"__metadata__"' in rest or not rest[1:].lstrip(b" \t\n\r").startswith(b'"'):
        return None  # (a member must follow the comma)
    try:
        metadata = orjson.loads(found.group(1))
    except (UnicodeDecodeError, ValueError, RecursionError, orjson.JSONDecodeError):
        return None
    return metadata, rest


def _kept_layout(key: bytes, data_len: int, field: str,
                 load: Callable[[], dict[str, Any]]) -> _Layout:
    """The checked entries whose JSON is ``key`` (``load``: the entries as parsed): kept, or
    checked now and kept (the last 16, and of those over KEEP_HEADER bytes only the last)."""
    where = (key, data_len, field)
    with _layouts_lock:
        kept = _layouts.get(where)
        if kept is not None:
            _layouts.move_to_end(where)
            return kept
    kept = _check_entries(key, load(), data_len, field)
    if len(key) <= KEEP_BIG_HEADER:
        with _layouts_lock:
            if len(key) > KEEP_HEADER:
                for k in [k for k in _layouts if len(k[0]) > KEEP_HEADER]:
                    del _layouts[k]
            _layouts[where] = kept
            while len(_layouts) > _KEEP_LAYOUTS:
                _layouts.popitem(last=False)
    return kept


def _check_entries(key: bytes, parsed: dict[str, Any], data_len: int, field: str) -> _Layout:
    """The tensor entries of a header (``parsed``, its ``__metadata__`` taken out) checked
    against a data section of ``data_len`` bytes."""
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    for name, info in parsed.items():
        # the common entry (a known dtype, a 1-D shape, two int offsets that fit) in a few
        # operations; anything else goes through every check below, with its error
        if type(info) is dict and info.keys() == _ENTRY_KEYS:
            dtype = _ST_DTYPES.get(info["dtype"]) if type(info["dtype"]) is str else None
            shape, offsets = info["shape"], info["data_offsets"]
            if (dtype is not None and type(shape) is list and len(shape) == 1
                    and type(shape[0]) is int and 0 <= shape[0] <= MAX_EXTENT
                    and type(offsets) is list and len(offsets) == 2
                    and type(offsets[0]) is int and type(offsets[1]) is int
                    and 0 <= offsets[0] <= offsets[1] <= data_len
                    and offsets[1] - offsets[0] == shape[0] * dtype.itemsize):
                spans.append((offsets[0], offsets[1], name))
                entries[name] = (dtype, (shape[0],), shape[0])
                continue
        where = f"{field}.{name}"
        if not isinstance(info, dict) or info.keys() != _ENTRY_KEYS:
            raise BadRequest(f"safetensors entry {name!r:.60} must have dtype, shape and "
                             "data_offsets", code="invalid_safetensors", field=where)
        st_dtype = info["dtype"]
        if not isinstance(st_dtype, str) or st_dtype not in SAFETENSORS_NAMES:
            raise Invalid(f"unsupported dtype {st_dtype!r:.20}; one of {sorted(SAFETENSORS_NAMES)}",
                          code="invalid_tensor", field=f"{where}.dtype")
        shape = parse_shape(info["shape"], where)
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise BadRequest("data_offsets must be [begin, end]", code="invalid_safetensors",
                             field=f"{where}.data_offsets")
        begin, end = offsets
        dtype = TORCH_DTYPES[SAFETENSORS_NAMES[st_dtype]]
        itemsize = dtype.itemsize
        numel = math.prod(shape)
        if not 0 <= begin <= end <= data_len:
            raise BadRequest(f"data_offsets [{begin}, {end}] fall outside the {data_len} data "
                             "bytes (truncated file?)", code="invalid_safetensors",
                             field=f"{where}.data_offsets")
        if end - begin != numel * itemsize:
            raise BadRequest(f"{end - begin} bytes do not hold shape {list(shape)} of "
                             f"{SAFETENSORS_NAMES[st_dtype]}", code="invalid_safetensors",
                             field=f"{where}.data_offsets")
        spans.append((begin, end, name))
        entries[name] = (dtype, tuple(shape), numel)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise BadRequest(f"tensor {name!r:.60} overlaps another or leaves a gap",
                             code="invalid_safetensors", field=f"{field}.{name}")
        pos = end
    if pos != data_len:
        raise BadRequest(f"{data_len - pos} bytes after the last tensor",
                         code="invalid_safetensors", field=field)
    plan = _plan(spans, entries)
    return _Layout(key, tuple(spans), entries, plan,
                   [name for piece in plan for name in piece[3]] == list(entries),
                   all(numels is not None or begin == end
                       for begin, end, _, _, numels, _ in plan))


def _plan(spans: list[tuple[int, int, str]],
          entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]]) -> tuple[_Piece, ...]:
    """The tensors as :data:`_Piece` s: tensors of one dtype laid end to end, each at an
    offset its dtype can view, make one run. An empty tensor is made alone (it holds no
    bytes: a run goes on past it, as the non-finite check's runs found by data pointers do)."""
    plan: list[_Piece] = []
    run: list[tuple[int, int, str]] = []

    def flush() -> None:
        if run:
            names = tuple(name for _, _, name in run)
            shapes = [entries[n][1] for n in names]
            plan.append((run[0][0], run[-1][1], entries[names[0]][0], names,
                         [entries[n][2] for n in names],
                         None if all(len(shape) == 1 for shape in shapes) else shapes))
            run.clear()

    for begin, end, name in spans:
        dtype, shape, numel = entries[name]
        if not numel:
            plan.append((begin, end, dtype, (name,), None, [shape]))
        elif begin % dtype.itemsize == 0:
            if run and (entries[run[-1][2]][0] != dtype or run[-1][1] != begin):
                flush()
            run.append((begin, end, name))
        else:
            flush()
            plan.append((begin, end, dtype, (name,), None, [shape]))
    flush()
    return tuple(plan)


#: the last headers parsed, by (header bytes, data length, field): at most 16 of up to
#: KEEP_HEADER bytes each (a refused header raises, and is not kept)
_parsed_header = functools.lru_cache(maxsize=16)(_parse_header)
#: the last header of up to KEEP_BIG_HEADER bytes parsed (a session of many tensors sends it
#: with every step)
_parsed_big_header = functools.lru_cache(maxsize=1)(_parse_header)


#: the last tensor entries checked (:class:`_Layout`), by (their JSON, data length, field):
#: at most 16, and of those over KEEP_HEADER bytes only the last
_layouts: OrderedDict[tuple[bytes, int, str], _Layout] = OrderedDict()
_layouts_lock = threading.Lock()
_KEEP_LAYOUTS = 16


def forget_headers() -> None:
    """Drop every kept header and tensor entries (tests: the next read checks in full)."""
    _parsed_header.cache_clear()
    _parsed_big_header.cache_clear()
    with _layouts_lock:
        _layouts.clear()


def forget_big_header() -> None:
    """Drop the kept big header and its entries (the server calls this when it has been
    idle)."""
    _parsed_big_header.cache_clear()
    with _layouts_lock:
        for k in [k for k in _layouts if len(k[0]) > KEEP_HEADER]:
            del _layouts[k]


def _make_tensors(parsed: _Layout, base: torch.Tensor | None, view: memoryview,
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
        _cut(flat, names, numels, shapes, tensors)
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
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    with gc_paused() if len(tensors) >= 1000 else contextlib.nullcontext():
        for name, t in tensors.items():
            n = t.nbytes
            header[name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                            "data_offsets": [pos, pos + n]}
            pos += n
    raw = orjson.dumps(header)
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


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


_ST_DTYPE = {TORCH_DTYPES[v]: k for k, v in SAFETENSORS_NAMES.items()}


class PackedTensors(_Derived):
    """Tensors that are views into one buffer laid out as a safetensors data section (in this
    dict's order), so a safetensors body is just a header plus ``buffer``: no further copy.
    ``entries``: their header entries as JSON (``"name":{...},...``, no braces) when the
    packer kept them (a session packs the same layout every step); forgotten on any change to
    the mapping."""

    buffer: memoryview
    entries: bytes | None = None
    #: views not made yet (:meth:`deferred`): the bytes and their view plan
    _pending: tuple[torch.Tensor, tuple[_Piece, ...]] | None = None

    @classmethod
    def deferred(cls, base: torch.Tensor, plan: tuple[_Piece, ...], entries: bytes
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


def pack(tensors: dict[str, torch.Tensor]) -> PackedTensors:
    """Copy tensors (any device) into one CPU buffer, widest dtypes first so every view is
    naturally aligned. One copy, and the result can be sent without another."""
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in order)
    # From a GPU: into pinned (page-locked) host memory, one asynchronous device-to-host copy
    # per tensor, then one wait (torch caches pinned blocks: no allocation cost per step).
    cuda = any(tensors[n].is_cuda for n in order)
    # torch.empty, not bytearray(total): no zero-filling (and faulting in) pages that the
    # copies below overwrite anyway (about half the cost of a 40 MB pack)
    base = torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    plan = view_plan([(n, tensors[n].dtype, tensors[n].shape) for n in order])
    out = packed_from_plan(base, plan)
    with torch.no_grad():
        if cuda:
            for name in order:
                out[name].copy_(tensors[name].detach(), non_blocking=True)
            torch.cuda.current_stream().synchronize()
        else:  # one torch call per run of one dtype, not one copy per tensor
            for begin, end, dtype, names, _, _ in plan:
                torch.cat([tensors[n].detach().reshape(-1) for n in names],
                          out=base[begin:end].view(dtype))
    return out


def _cut(flat: torch.Tensor, names: Sequence[str], numels: list[int],
         shapes: Sequence[Sequence[int]] | None, into: dict[str, torch.Tensor]) -> None:
    """Views of tensors of one dtype laid out back to back in ``flat``, into ``into``: one
    ``split_with_sizes`` for the run (one tensor: none; torch.split's Python wrapper alone
    costs ~20 us), a ``view`` only where the shape is not 1-D (``shapes`` None: all are)."""
    pieces = (flat,) if len(names) == 1 else flat.split_with_sizes(numels)
    if shapes is None:
        into.update(zip(names, pieces, strict=True))
        return
    for name, piece, shape in zip(names, pieces, shapes, strict=True):
        into[name] = piece if len(shape) == 1 else piece.view(shape)


def view_plan(layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
              numels: list[int] | None = None) -> tuple[_Piece, ...]:
    """Tensors laid out one after another in this order, from the start of a byte buffer:
    each run of one dtype as one :data:`_Piece` (cut by one ``torch.split``: 1,000 small
    tensors take a fraction of the three torch calls per tensor that slicing and viewing each
    would). ``numels``: the tensors' element counts, when the caller has them."""
    counts = numels if numels is not None else [math.prod(shape) for _, _, shape in layout]
    plan: list[_Piece] = []
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


def _views(base: torch.Tensor, plan: Sequence[_Piece]) -> dict[str, torch.Tensor]:
    """Views of ``base`` (bytes) as :func:`view_plan` lays them out."""
    views: dict[str, torch.Tensor] = {}
    for begin, end, dtype, names, numels, shapes in plan:
        assert numels is not None
        _cut(base[begin:end].view(dtype), names, numels, shapes, views)
    return views


def packed_from_plan(base: torch.Tensor, plan: Sequence[_Piece]) -> PackedTensors:
    """:func:`_views` of ``base`` as :class:`PackedTensors`."""
    out = PackedTensors(_views(base, plan))
    out.buffer = base.numpy().data
    return out


def packed_views(base: torch.Tensor, layout: list[tuple[str, torch.dtype, torch.Size]],
                 numels: list[int] | None = None) -> PackedTensors:
    """Views of ``base`` (bytes) for tensors laid out one after another in this order."""
    return packed_from_plan(base, view_plan(layout, numels))


def packed_header(packed: PackedTensors, metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (length prefix included) for ``packed``'s buffer: the same bytes
    as :func:`safetensors_header`, from its kept ``entries`` where it has them."""
    if not packed.entries:
        return safetensors_header(packed, metadata)
    meta = b'"__metadata__":' + orjson.dumps(metadata) + b"," if metadata else b""
    raw = b"{" + meta + packed.entries + b"}"
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def header_entries(layout: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> bytes:
    """The header entries (``"name":{...},...``, no braces) of tensors laid out one after
    another in this order, as :func:`safetensors_header` writes them."""
    header: dict[str, Any] = {}
    pos = 0
    for name, dtype, shape in layout:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + n]}
        pos += n
    return orjson.dumps(header)[1:-1]
