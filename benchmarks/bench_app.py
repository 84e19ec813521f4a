"""The optserve app plus a raw echo route, so the echo baseline runs on the same server stack
(uvicorn + httptools + uvloop, same process, same middleware-free ASGI path)."""

from __future__ import annotations

from typing import Any

from app.main import create_app
from benchmarks.echo_app import ECHO_PATH, echo

_optserve = create_app()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == ECHO_PATH:
        await echo(scope, receive, send)
        return
    await _optserve(scope, receive, send)
