"""The optserve app plus a raw echo route, so the echo baseline runs on the same server stack
(uvicorn + httptools + uvloop, same process, same middleware-free ASGI path)."""

from __future__ import annotations

from typing import Any

from app.main import create_app

_optserve = create_app()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/_bench/echo":
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
        return
    await _optserve(scope, receive, send)
