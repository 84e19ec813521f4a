"""A minimal ASGI app that answers ``POST /_bench/echo`` with the request body (the HTTP
floor: the same server stack as optserve, uvicorn + httptools + uvloop with glibc's heap tuned
as optserve's server tunes it, and nothing else) and ``GET /readyz`` with 200. Run it with
``uvicorn benchmarks.echo_app:app``."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.runtime import tune_allocator

# As ``python -m app`` does at start: large blocks reused from the heap, not mmapped afresh
# (without it, the 40 MB buffer of a 1e7 echo faults its pages in on every request).
tune_allocator()

ECHO_PATH = "/_bench/echo"


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the body as optserve reads a large one (into one uninitialized buffer of its
    Content-Length) and send that buffer back without a copy, as optserve sends its answers."""
    length = dict(scope["headers"]).get(b"content-length")
    body: memoryview | bytes
    if length is not None:
        body = np.empty(int(length), dtype=np.uint8).data
        pos, more = 0, True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            body[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
            more = message.get("more_body", False)
    else:
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == ECHO_PATH:
        await echo(scope, receive, send)
        return
    status = 200 if scope["path"] == "/readyz" else 404
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
