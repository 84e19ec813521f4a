"""A minimal ASGI app that answers ``POST /_bench/echo`` with the request body (the HTTP
floor: the same server stack as optserve, uvicorn + httptools + uvloop, and nothing else)
and ``GET /readyz`` with 200. Run it with ``uvicorn benchmarks.echo_app:app``."""

from __future__ import annotations

from typing import Any

ECHO_PATH = "/_bench/echo"


async def echo(receive: Any, send: Any) -> None:
    chunks = []
    more = True
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
        await echo(receive, send)
        return
    status = 200 if scope["path"] == "/readyz" else 404
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
