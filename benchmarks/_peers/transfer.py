"""How the HTTP systems move their bytes with a plain ``httpx.Client``, the way a client that
cares about large bodies would: a request body goes out as 256 KB views of the caller's own
buffers with its ``Content-Length`` (no joined copy of the body in the caller; and httpcore
sends a ``bytes`` body with ``sock.send(buffer); buffer = buffer[n:]``, copying what is left of
it after every partial send: tens of copies of a 40 MB body's tail, against those of a 256 KB
piece), and an answer is read into one buffer of its announced length, which the tensors
decoded from it then view.

The echo and optserve's binary systems share this code, so what differs between their columns
is the server (and, for optserve, building the safetensors header and reading it back). The
framing is the Python SDK's own (``optserve._safetensors``: no ``safetensors`` package, no
copies); only HTTP is left to plain httpx.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import httpx
import torch

from optserve import _safetensors, _tensors
from optserve._base_client import _fill

#: bytes per piece of a request body: small enough to stay in cache while h11 and httpcore
#: copy it
PIECE = 256 * 1024


def pieces(buffers: Iterable[bytes | memoryview]) -> tuple[list[bytes | memoryview], int]:
    """``buffers`` as the SDK sends a large body: views of at most ``PIECE`` bytes, small
    neighbours joined (``Body.pieces``); and their total length."""
    out = list(_safetensors.Body(tuple(buffers)).pieces(PIECE))
    return out, sum(len(v) for v in out)


def safetensors_buffers(tensors: Mapping[str, torch.Tensor]) -> list[bytes | memoryview]:
    """A safetensors body as its framed header and views of the (contiguous, CPU) tensors'
    own memory, in the order the header lays them out: nothing is copied."""
    return list(_safetensors.body({n: _tensors.to_wire(t, n) for n, t in tensors.items()}).parts)


def read_safetensors(body: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors body, as views of ``body`` (no copy)."""
    wires, _ = _safetensors.loads(memoryview(body))
    out: dict[str, torch.Tensor] = {n: _tensors.from_wire(w) for n, w in wires.items()}
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
        _fill(memoryview(body), response.iter_raw(PIECE))
        return response.status_code, body
    finally:
        response.close()
