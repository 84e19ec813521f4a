"""A path segment holding an encoded slash (``%2F``) names no route.

The server routes on the decoded path, where ``/v1/sessions/s%2Fparam_groups%2F0`` reads as
``/v1/sessions/s/param_groups/0``: a ``PATCH`` meant for a session ``s/param_groups/0`` (the
Python SDK quotes an id with ``safe=""``, so a slash in it travels as ``%2F``) changed group 0
of session ``s``. A session id never holds a slash (``invalid_id`` at create), so a request
whose session-id segment encodes one is a 404 ``session_not_found`` naming it, and one whose
other segment does a 404 ``not_found`` (no route has such a segment), before anything runs.
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import problem

_SESSIONS = (b"", b"v1", b"sessions")


class EncodedSlash:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if not raw or b"%2f" not in raw.lower():
            await self.app(scope, receive, send)
            return
        segments = raw.split(b"?", 1)[0].split(b"/")
        if tuple(segments[:3]) == _SESSIONS and len(segments) > 3 \
                and b"%2f" in segments[3].lower():
            session_id = unquote(segments[3].decode("latin-1"))
            response = problem(404, "session_not_found", "Not found",
                               f"no session {session_id!r:.140}", field="session_id")
        else:
            response = problem(404, "not_found", "Not found", "Not Found")
        await response(scope, receive, send)
