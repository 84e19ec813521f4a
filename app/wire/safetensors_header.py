"""Safetensors headers: checked once, then kept.

A client sends the same tensor entries with every step (often with new ``__metadata__``: a
loss, a scheduler's options). A header is checked against its data section (hostile input
gives :class:`BadRequest`/:class:`Invalid`, never an exception escaping) into its metadata and
a :class:`HeaderLayout` of its entries: the tensors' spans, dtypes and shapes, and the plan by
which their views are made (:data:`Piece`). Whole headers and layouts are kept in small
caches keyed by their bytes; the server forgets the big ones when it is idle.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from app.errors import BadRequest, Invalid
from app.wire.dtypes import SAFETENSORS_NAMES, TORCH_DTYPES
from app.wire.json_tensor import MAX_EXTENT, parse_shape
from app.wire.unique_keys import refuse_duplicate_keys

ST_DTYPE_NAMES = {TORCH_DTYPES[v]: k for k, v in SAFETENSORS_NAMES.items()}
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
Piece = tuple[int, int, torch.dtype, tuple[str, ...], list[int] | None,
               list[tuple[int, ...]] | None]


#: a checked header: its tensor entries and its ``__metadata__`` (nothing in it may be
#: changed: ``_parsed_header`` keeps it)
Parsed = tuple["HeaderLayout", dict[str, str]]


@dataclass(frozen=True)
class HeaderLayout:
    """A header's checked tensor entries (kept by ``_layouts``: nothing in it may be changed).
    """

    #: the entries as JSON (the header without ``__metadata__``, as orjson writes it)
    key: bytes
    #: the tensors' (begin, end, name), in file order
    spans: tuple[tuple[int, int, str], ...]
    #: (dtype, shape, numel) by name, in header order
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]]
    #: how the tensors are made (:data:`Piece`; file order, but for empty tensors)
    plan: tuple[Piece, ...]
    #: whether the plan makes them in header order
    in_order: bool
    #: whether every tensor that has bytes is in a run
    all_in_runs: bool

    @functools.cached_property
    def file_entries(self) -> bytes:
        """The header entries (:func:`header_entries`) of the tensors in file order."""
        return header_entries([(name, *self.entries[name][:2]) for _, _, name in self.spans])


def _parse_header(header: bytes, data_len: int, field: str) -> Parsed:
    """A safetensors header checked against a data section of ``data_len`` bytes: its
    ``__metadata__``, and its tensor entries (:class:`HeaderLayout`, kept by their JSON: a client
    that sends new metadata with every step, a scheduler's options or a loss, sends the same
    entries). Nothing returned may be changed (``_parsed_header`` keeps it)."""
    split = _metadata_first(header)
    if split is not None:  # the entries are not parsed at all when they are kept
        metadata, rest = split
        return _kept_layout(rest, data_len, field, lambda: _json_object(rest, field)), metadata
    parsed = _json_object(header, field)
    metadata_raw = parsed.pop("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise BadRequest("safetensors __metadata__ must map strings to strings",
                         code="invalid_safetensors", field=f"{field}.__metadata__")
    return _kept_layout(dumps_object(parsed), data_len, field, lambda: parsed), metadata_raw


def _json_object(raw: bytes, field: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError, orjson.JSONDecodeError):
        raise BadRequest("safetensors header is not valid JSON", code="invalid_safetensors",
                         field=field) from None
    if not isinstance(parsed, dict):
        raise BadRequest("safetensors header must be a JSON object", code="invalid_safetensors",
                         field=field)
    _unique(raw, parsed, "", field)
    return parsed


def _unique(raw: bytes, parsed: Any, within: str, field: str) -> None:
    """400 ``duplicate_key`` naming the key's path (``__metadata__.param_groups``, a tensor's
    name) when an object of the header text ``raw`` names a key twice: the header is a JSON
    text as a JSON body is, and which of the two a parser takes is its choice."""
    refuse_duplicate_keys(raw, parsed, "safetensors header", within, field)


#: a header that opens with its ``__metadata__`` object of strings, as safetensors' writers
#: put it (matched within its first META_FIRST_WINDOW bytes). Every quantifier is possessive
#: and every token starts with a byte the one before cannot take: a hostile header is matched
#: or refused in one pass, with no backtracking (an optional comma with whitespace on both
#: sides of a pair once made "x":"y" "x":"y" ... take exponential time)
_WS = rb"[ \t\n\r]*+"  # JSON's whitespace, no other
_STR = rb'"(?:[^"\\]++|\\.)*+"'
_PAIR = _STR + _WS + rb":" + _WS + _STR + _WS
_META_FIRST = re.compile(
    rb"\{" + _WS + rb'"__metadata__"' + _WS + rb":" + _WS
    + rb"(\{" + _WS + rb"(?:" + _PAIR + rb"(?:," + _WS + _PAIR + rb")*+)?+\})"
    + _WS + rb",")
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
    _unique(found.group(1), metadata, "__metadata__", "body")
    return metadata, rest


def _kept_layout(key: bytes, data_len: int, field: str,
                 load: Callable[[], dict[str, Any]]) -> HeaderLayout:
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


def _check_entries(key: bytes, parsed: dict[str, Any], data_len: int, field: str) -> HeaderLayout:
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
        if begin > end:
            raise BadRequest(f"data_offsets [{begin}, {end}] end before they begin",
                             code="invalid_safetensors", field=f"{where}.data_offsets")
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
    plan = plan_pieces(spans, entries)
    return HeaderLayout(key, tuple(spans), entries, plan,
                   [name for piece in plan for name in piece[3]] == list(entries),
                   all(numels is not None or begin == end
                       for begin, end, _, _, numels, _ in plan))


def plan_pieces(spans: Sequence[tuple[int, int, str]],
          entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]]) -> tuple[Piece, ...]:
    """The tensors as :data:`Piece` s: tensors of one dtype laid end to end, each at an
    offset its dtype can view, make one run. An empty tensor is made alone (it holds no
    bytes: a run goes on past it, as the non-finite check's runs found by data pointers do)."""
    plan: list[Piece] = []
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


#: the last tensor entries checked (:class:`HeaderLayout`), by (their JSON, data length, field):
#: at most 16, and of those over KEEP_HEADER bytes only the last
_layouts: OrderedDict[tuple[bytes, int, str], HeaderLayout] = OrderedDict()
_layouts_lock = threading.Lock()
_KEEP_LAYOUTS = 16


def checked_header(header: bytes, data_len: int, field: str) -> Parsed:
    """:func:`_parse_header`, kept: the last 16 headers of up to KEEP_HEADER bytes and the last
    one of up to KEEP_BIG_HEADER bytes."""
    n = len(header)
    parse = (_parsed_header if n <= KEEP_HEADER
             else _parsed_big_header if n <= KEEP_BIG_HEADER else _parse_header)
    return parse(header, data_len, field)


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



def header_entries(layout: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> bytes:
    """The header entries (``"name":{...},...``, no braces) of tensors laid out one after
    another in this order, as :func:`safetensors_header` writes them: :data:`DUMPS_PIECE`
    entries at a time (each piece's objects freed before the next is made)."""
    pieces: list[bytes] = []
    header: dict[str, Any] = {}
    pos = 0
    for name, dtype, shape in layout:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + n]}
        pos += n
        if len(header) == DUMPS_PIECE:
            pieces.append(orjson.dumps(header)[1:-1])
            header = {}
    if header or not pieces:
        pieces.append(orjson.dumps(header)[1:-1])
    return pieces[0] if len(pieces) == 1 else b",".join(pieces)


#: the most members one ``orjson.dumps`` writes in :func:`header_entries` and
#: :func:`dumps_members`: the call holds the interpreter lock throughout, every other thread
#: waiting (the event loop among them): a header of 100,000 entries held it ~20 ms, 8,192
#: entries ~1 ms
DUMPS_PIECE = 8192


def dumps_members(obj: dict[str, Any]) -> bytes:
    """The members of ``obj`` as orjson writes them (``orjson.dumps(obj)`` without its braces),
    written :data:`DUMPS_PIECE` members at a time: the same bytes."""
    if len(obj) <= DUMPS_PIECE:
        return orjson.dumps(obj)[1:-1]
    members = iter(obj.items())
    pieces = []
    while piece := dict(itertools.islice(members, DUMPS_PIECE)):
        pieces.append(orjson.dumps(piece)[1:-1])
    return b",".join(pieces)


def dumps_object(obj: dict[str, Any]) -> bytes:
    """``orjson.dumps(obj)``, written in pieces (:func:`dumps_members`): the same bytes."""
    return b"{" + dumps_members(obj) + b"}"

