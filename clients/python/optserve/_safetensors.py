"""The safetensors format, in memory, without the ``safetensors`` package.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
padded with spaces to a multiple of 8) and then the raw little-endian tensor bytes.

Why not the ``safetensors`` package: its low-level ``serialize`` changed shape between
releases (0.8 takes raw pointers), and its numpy front end cannot carry bfloat16. Writing the
format directly keeps the SDK independent of the installed version and lets bfloat16 travel
without torch. The unit tests check both directions against the ``safetensors`` package.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._json import json_dumps, json_loads
from ._recent import Recent

# wire dtype name -> (safetensors dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float32": ("F32", 4),
    "float64": ("F64", 8),
    "int8": ("I8", 1),
    "int16": ("I16", 2),
    "int32": ("I32", 4),
    "int64": ("I64", 8),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
_FROM_CODE: dict[str, str] = {code: name for name, (code, _) in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

@dataclass(frozen=True)
class WireTensor:
    """A tensor as it travels: dtype name, shape and C-order little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; one of {sorted(DTYPES)}")
        expected = math.prod(self.shape) * DTYPES[self.dtype][1]
        if self.data.nbytes != expected:
            raise ValueError(
                f"{self.data.nbytes} bytes cannot hold shape {list(self.shape)} of {self.dtype}"
            )

    @classmethod
    def trusted(cls, dtype: str, shape: tuple[int, ...], data: memoryview) -> WireTensor:
        """One whose bytes are known to fit (made from a tensor of that dtype and shape):
        without :meth:`__post_init__`'s checks, which cost more than the rest of a small
        tensor's encoding."""
        made = object.__new__(cls)
        object.__setattr__(made, "dtype", dtype)
        object.__setattr__(made, "shape", shape)
        object.__setattr__(made, "data", data)
        return made

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Body:
    """A safetensors body as its buffers: the framed header, then each tensor's own bytes (the
    views a :class:`WireTensor` holds, no copies). The synchronous client sends a large one
    piece by piece (:meth:`pieces`) instead of joining it: a 1e7-parameter gradient goes out
    without a 40 MB copy first. ``bytes(body)`` joins it."""

    parts: tuple[bytes | memoryview, ...]

    @property
    def size(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def pieces(self, piece: int = 256 * 1024) -> Iterator[bytes | memoryview]:
        """The body in order, as pieces of at most ``piece`` bytes (small enough for the HTTP
        library's own copy of each to stay in the CPU cache): views of the large parts, and
        neighbouring small parts (the framed header, small tensors) joined into one piece, so
        that each is not a send of its own (a send is a system call, and on a connection
        without Nagle's delay a packet the server reads and hands up on its own)."""
        joined: list[memoryview] = []
        size = 0
        for part in self.parts:
            # (a tensor's bytes are such a view already: a new object per tensor here would
            # wake the garbage collector while the body goes out, see optserve._gc)
            view = part if isinstance(part, memoryview) and part.ndim == 1 \
                and part.format == "B" and part.c_contiguous else memoryview(part).cast("B")
            if not view:
                continue
            if size + len(view) <= piece:
                joined.append(view)
                size += len(view)
                continue
            if joined:
                yield _join(joined)
                joined, size = [], 0
            if len(view) <= piece:
                joined, size = [view], len(view)
                continue
            for i in range(0, len(view), piece):
                yield view[i:i + piece]
        if joined:
            yield _join(joined)


def _join(views: list[memoryview]) -> bytes | memoryview:
    return views[0] if len(views) == 1 else b"".join(views)


def dumps(tensors: Mapping[str, WireTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors (and string metadata) to the bytes of a safetensors file."""
    return bytes(body(tensors, metadata))


#: tensor entries :func:`body` wrote lately, by what they describe (the tensors' names,
#: dtypes, shapes and sizes in the mapping's order): the entries' JSON object and the tensors'
#: names in the order their bytes follow the header. A model's gradients make the same
#: entries every step (1,000 tensors' took 2.1 ms to write; their key takes 0.4 ms); the
#: metadata (a step's loss) is written anew each time.
_MADE: Recent[tuple[Any, ...], tuple[bytes, tuple[str, ...]]] = Recent(8, 32 << 20)


def body(tensors: Mapping[str, WireTensor], metadata: Mapping[str, str] | None = None) -> Body:
    """Tensors (and string metadata) as a safetensors :class:`Body`, without copying them.

    Tensors are laid out widest element first, so every tensor's data is aligned to its
    element size when the file is loaded at an aligned address.
    """
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("safetensors metadata must map strings to strings")
    key = tuple([(name, t.dtype, t.shape, t.data.nbytes) for name, t in tensors.items()])
    made = _MADE.get(key)
    if made is None:
        made = _entries(tensors)
        _MADE.put(key, made, len(made[0]))
    entries, order = made
    if metadata:  # (the JSON the whole header as one object would give: metadata first)
        meta = b'{"__metadata__":' + json_dumps(dict(metadata))
        head = meta + b"}" if entries == b"{}" else meta + b"," + entries[1:]
    else:
        head = entries
    head += b" " * (-len(head) % 8)
    return Body((struct.pack("<Q", len(head)) + head, *(tensors[name].data for name in order)))


def _entries(tensors: Mapping[str, WireTensor]) -> tuple[bytes, tuple[str, ...]]:
    """:func:`body`'s tensor entries as a JSON object, and the order of the tensors' bytes."""
    header: dict[str, object] = {}
    order = sorted(tensors.items(), key=lambda kv: -kv[1].itemsize)
    offset = 0
    for name, t in order:
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot name a tensor")
        n = t.data.nbytes
        header[name] = {
            "dtype": DTYPES[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    return json_dumps(header), tuple(name for name, _ in order)


def loads(body: bytes | bytearray | memoryview) -> tuple[dict[str, WireTensor], dict[str, str]]:
    """Parse a safetensors file: (tensors by name, ``__metadata__``). Raises ``ValueError``.

    The returned tensors' ``data`` are writable views into one private copy of ``body``
    (or into a fresh copy where a tensor is not aligned to its element size).
    """
    buf, entries, metadata = parse(body)
    view = memoryview(buf)
    tensors: dict[str, WireTensor] = {}
    for name, dtype, shape, begin, end in entries:
        chunk = view[begin:end]
        if begin % DTYPES[dtype][1]:
            chunk = memoryview(bytearray(chunk))
        tensors[name] = WireTensor.trusted(dtype, shape, chunk)
    return tensors, metadata


#: a tensor's entry in a parsed header: name, wire dtype, shape, and where its bytes begin and
#: end in the buffer (checked: within it, and as many as the dtype and shape need)
Entry = tuple[str, str, tuple[int, ...], int, int]


@dataclass(frozen=True, eq=False)
class Header:
    """A header's tensor entries, parsed and checked (:func:`parsed`), in the header's order,
    where their bytes begin and end counted from the data's start. Kept while headers with
    the same entries come back (a model's step answers differ in their ``__metadata__``
    only), so callers may keep what they work out from the entries in ``derived``."""

    entries: tuple[Entry, ...]
    #: the header's ``__metadata__`` where it is part of the key (not split off: see
    #: :func:`_split`), else None
    metadata: Mapping[str, str] | None
    derived: dict[str, Any] = field(default_factory=dict)


#: headers :func:`parsed` lately, by their bytes less a leading ``__metadata__`` (which is
#: parsed each time; whether there was one is part of the key) and less their padding, the
#: size of the data after them and the data's alignment (what the checks of the entries
#: depend on): 1,000 tensors' entries took 2.1 ms to parse and check
_PARSED: Recent[tuple[bytes, int, int, bool], Header] = Recent(8, 32 << 20)
_META = b'{"__metadata__":'
#: a flat JSON object of strings (``__metadata__`` as writers write it). A string is a run
#: of plain bytes between escapes (``"[^"\\]*(?:\\.[^"\\]*)*"``, the same strings as
#: ``"(?:[^"\\]|\\.)*"``): the matcher takes the runs whole, not one alternation per byte
#: (a step answer's metadata, 300 bytes of escaped JSON: 8.6 us to match, 2.4 us so)
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_FLAT = re.compile(rb"\{\s*(?:%s\s*:\s*%s\s*(?:,\s*%s\s*:\s*%s\s*)*)?\}"
                   % (_STRING, _STRING, _STRING, _STRING), re.DOTALL)


def parse(body: bytes | bytearray | memoryview
          ) -> tuple[bytearray | memoryview, list[Entry], dict[str, str]]:
    """A safetensors file's buffer (``body`` itself when it is a writable memoryview: a
    buffer the client filled for this call alone; else a private copy), its tensors' entries
    in the header's order (where each one's bytes begin and end in the buffer), and its
    ``__metadata__``. Raises ``ValueError``."""
    buf, header, start, metadata = parsed(body)
    return buf, [(n, d, s, start + b, start + e) for n, d, s, b, e in header.entries], metadata


def parsed(body: bytes | bytearray | memoryview
           ) -> tuple[bytearray | memoryview, Header, int, dict[str, str]]:
    """:func:`parse`'s buffer, the :class:`Header` (shared: not to be changed), where the data
    starts in the buffer, and the ``__metadata__``."""
    buf = body if isinstance(body, memoryview) and not body.readonly else bytearray(body)
    if len(buf) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > len(buf) - 8 or n > _MAX_HEADER:
        raise ValueError(f"safetensors header claims {n} bytes but the body has {len(buf) - 8}")
    head = bytes(buf[8 : 8 + n])
    start, size = 8 + n, len(buf) - 8 - n
    meta, rest = _split(head)
    # (trailing whitespace is the writer's padding, which follows the metadata's length;
    # JSON's four whitespace bytes only: a header ending in another is not valid JSON)
    key = (rest.rstrip(b" \t\r\n"), size, start % 8, meta is not None)
    header = _PARSED.get(key)
    if header is not None:
        if header.metadata is not None:
            return buf, header, start, dict(header.metadata)
        assert meta is not None
        return buf, header, start, _metadata(_loaded(meta))
    entries, metadata = _checked(head, size)
    if meta is None:
        header = Header(entries, metadata)
    elif b'"__metadata__"' not in rest and _metadata(_loaded(meta)) == metadata:
        header = Header(entries, None)
    else:  # (another ``__metadata__`` further on, which JSON lets win: not kept)
        return buf, Header(entries, metadata), start, metadata
    _PARSED.put(key, header, n)
    return buf, header, start, dict(metadata)


def _split(head: bytes) -> tuple[bytes | None, bytes]:
    """A header's leading ``__metadata__`` object (a flat one of strings, as writers write
    it: first) and the header without it; (None, the header) where it has none such."""
    if not head.startswith(_META):
        return None, head
    m = _FLAT.match(head, len(_META))
    if m is None:
        return None, head
    after = _skip_space(head, m.end())
    if head[after:after + 1] == b"," and head[_skip_space(head, after + 1):][:1] == b'"':
        return m.group(), b"{" + head[after + 1:]
    if head[after:after + 1] == b"}":
        return m.group(), b"{" + head[after:]
    # (anything else is not JSON, or not a header whose entries follow its metadata: a
    # header that differs from a kept one only there must not find it)
    return None, head


def _skip_space(head: bytes, at: int) -> int:
    """Where the JSON whitespace from ``at`` on ends."""
    while at < len(head) and head[at] in b" \t\r\n":
        at += 1
    return at


def _loaded(raw: bytes) -> Any:
    try:
        return json_loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"safetensors header is not valid JSON: {exc}") from None


def _metadata(metadata: Any) -> dict[str, str]:
    """A header's ``__metadata__`` value, checked."""
    metadata = metadata or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors __metadata__ must map strings to strings")
    return metadata


def _checked(head: bytes, size: int) -> tuple[tuple[Entry, ...], dict[str, str]]:
    """A header's bytes parsed and checked, its data ``size`` bytes long: its entries (where
    each one's bytes begin and end, from the data's start) and its ``__metadata__``."""
    header = _loaded(head)
    if not isinstance(header, dict):
        raise ValueError("safetensors header must be a JSON object")
    metadata = _metadata(header.pop("__metadata__", None))
    entries: list[Entry] = []
    for name, info in header.items():
        if type(info) is not dict:
            raise ValueError(f"safetensors entry {name!r} is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = _FROM_CODE.get(code) if type(code) is str else None
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {code!r}")
        if type(shape) is not list or not _dims(shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1] <= size
        ):
            raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        dims = tuple(shape)
        if offsets[1] - offsets[0] != math.prod(dims) * DTYPES[dtype][1]:
            raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes cannot hold "
                             f"shape {shape} of {dtype}")
        entries.append((name, dtype, dims, offsets[0], offsets[1]))
    return tuple(entries), dict(metadata)


def _dims(shape: list[object]) -> bool:
    """Each a non-negative int (bool is not)."""
    for d in shape:
        if type(d) is not int or d < 0:
            return False
    return True
