"""How the HTTP systems move their bytes with a plain ``httpx.Client``, the way a client that
cares about large bodies would: a request body goes out as 256 KB views of the caller's own
buffers with its ``Content-Length`` (no joined copy of the body in the caller; and httpcore
sends a ``bytes`` body with ``sock.send(buffer); buffer = buffer[n:]``, copying what is left of
it after every partial send: tens of copies of a 40 MB body's tail, against those of a 256 KB
piece), and an answer is read into one buffer of its announced length, which the tensors
decoded from it then view.

The echo and optserve's binary systems share this code, so what differs between their columns
is the server (and, for optserve, building the safetensors header and reading it back).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any, cast

import httpx
import torch

#: bytes per piece of a request body: small enough to stay in cache while h11 and httpcore
#: copy it
PIECE = 256 * 1024

_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.float64: "F64"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def pieces(buffers: Iterable[bytes | memoryview]) -> tuple[list[memoryview], int]:
    """``buffers`` cut into views of at most ``PIECE`` bytes, and their total length."""
    out: list[memoryview] = []
    for buf in buffers:
        view = memoryview(buf).cast("B")
        out.extend(view[i:i + PIECE] for i in range(0, len(view), PIECE))
    return out, sum(len(v) for v in out)


def safetensors_buffers(tensors: Mapping[str, torch.Tensor]) -> list[bytes | memoryview]:
    """A safetensors body as its framed header and views of the (contiguous, CPU) tensors'
    own memory, in the order the header lays them out: nothing is copied."""
    header: dict[str, Any] = {}
    views: list[bytes | memoryview] = []
    offset = 0
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous")
        # numpy has no bfloat16: every dtype's bytes are viewed as uint8
        view = t.reshape(-1).view(torch.uint8).numpy().data
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(view)]}
        offset += len(view)
        views.append(view)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)) + head, *views]


def read_safetensors(body: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors body, as views of ``body`` (no copy)."""
    (size,) = struct.unpack_from("<Q", body, 0)
    header = json.loads(bytes(body[8:8 + size]))
    header.pop("__metadata__", None)
    start = 8 + size
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(body, dtype=dtype, count=count, offset=start + begin) \
            if count else torch.empty(0, dtype=dtype)
        out[name] = flat.view(info["shape"])
    return out


def post(client: httpx.Client, path: str, buffers: Iterable[bytes | memoryview],
         headers: Mapping[str, str]) -> tuple[int, bytearray]:
    """POST ``buffers`` as one body (in pieces, with its Content-Length); (status, the answer's
    bytes read into one buffer of its Content-Length)."""
    views, length = pieces(buffers)
    # httpx sends any iterable of buffers; its annotation says bytes
    request = client.build_request("POST", path, content=cast(Iterable[bytes], iter(views)),
                                   headers={**headers, "Content-Length": str(length)})
    response = client.send(request, stream=True)
    try:
        announced = response.headers.get("content-length")
        if announced is None or response.headers.get("content-encoding"):
            return response.status_code, bytearray(response.read())
        body = bytearray(int(announced))
        pos = 0
        for chunk in response.iter_raw(PIECE):
            if pos + len(chunk) > len(body):
                raise httpx.RemoteProtocolError(f"answer longer than announced ({len(body)})")
            body[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if pos != len(body):
            raise httpx.RemoteProtocolError(f"answer of {pos} bytes, announced {len(body)}")
        return response.status_code, body
    finally:
        response.close()
