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
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ._json import json_dumps, json_loads

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


def body(tensors: Mapping[str, WireTensor], metadata: Mapping[str, str] | None = None) -> Body:
    """Tensors (and string metadata) as a safetensors :class:`Body`, without copying them.

    Tensors are laid out widest element first, so every tensor's data is aligned to its
    element size when the file is loaded at an aligned address.
    """
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
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
    head = json_dumps(header)
    head += b" " * (-len(head) % 8)
    return Body((struct.pack("<Q", len(head)) + head, *(t.data for _, t in order)))


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


def parse(body: bytes | bytearray | memoryview
          ) -> tuple[bytearray | memoryview, list[Entry], dict[str, str]]:
    """A safetensors file's buffer (``body`` itself when it is a writable memoryview: a
    buffer the client filled for this call alone; else a private copy), its tensors' entries
    in the header's order, and its ``__metadata__``. Raises ``ValueError``."""
    buf = body if isinstance(body, memoryview) and not body.readonly else bytearray(body)
    if len(buf) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > len(buf) - 8 or n > _MAX_HEADER:
        raise ValueError(f"safetensors header claims {n} bytes but the body has {len(buf) - 8}")
    try:
        header = json_loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors __metadata__ must map strings to strings")
    start = 8 + n
    size = len(buf) - start
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
        entries.append((name, dtype, dims, start + offsets[0], start + offsets[1]))
    return buf, entries, dict(metadata)


def _dims(shape: list[object]) -> bool:
    """Each a non-negative int (bool is not)."""
    for d in shape:
        if type(d) is not int or d < 0:
            return False
    return True
