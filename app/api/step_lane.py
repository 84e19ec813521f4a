"""The step's own lane: ``POST /v1/sessions/{id}/step`` goes straight to its endpoint.

Starlette's router matches a request against every route in turn, and FastAPI then builds a
request, a dependency solution and an exit stack around the endpoint: at 1,000 parameters that
was more than the step itself. The lane sits inside the app's middleware (request ids, access
log, metrics, authentication all run as for any request) and in front of the router; it
recognises the step's path and calls the same endpoint (``app.api.sessions.step``) with the
same checks the route runs first (``Accept``: 406 before any work, which the endpoint does
itself; the id's length: 422, by leaving a longer id to the router; the headers a step does not
act on: ``strict_requests.refuse_unacted_headers``), and turns errors into
problems with the app's own exception handlers, as the router's exception middleware does.
Anything else, or a path the lane does not take whole (a ``root_path``, an id the route would
refuse), goes through the router unchanged.
"""

from __future__ import annotations

import re
from typing import Any

from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import sessions, strict_requests

STEP_PATH = re.compile(r"/v1/sessions/([^/]+)/step")
STEP_ROUTE = "/v1/sessions/{session_id}/step"  # (its route's path, as the document names it)


def exception_handlers(app: Any) -> tuple[dict[Any, Any], dict[int, Any]]:
    """The handlers the router's exception middleware uses: the app's, less those for 500 and
    ``Exception`` (those answer in the outermost server-error middleware, which also re-raises
    for the server's log), split by exception class and by status code."""
    by_class: dict[Any, Any] = {}
    by_status: dict[int, Any] = {}
    for key, handler in app.exception_handlers.items():
        if key in (500, Exception):
            continue
        if isinstance(key, int):
            by_status[key] = handler
        else:
            by_class[key] = handler
    return by_class, by_status


class StepLane:
    def __init__(self, app: ASGIApp, owner: Any) -> None:
        self.app = app
        self.owner = owner  # the FastAPI app: its exception handlers are read at first use
        self._handlers: tuple[dict[Any, Any], dict[int, Any]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (STEP_PATH.fullmatch(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "POST"
                 and not scope.get("root_path") else None)
        if match is None or len(match[1]) > sessions.SESSION_ID_MAX:
            await self.app(scope, receive, send)
            return
        if self._handlers is None:
            self._handlers = exception_handlers(self.owner)
        scope["starlette.exception_handlers"] = self._handlers
        session_id = match[1]
        scope["path_params"] = {"session_id": session_id}
        request = Request(scope, receive, send)

        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            # (the header check its route runs first: strict_requests.StrictRoute)
            strict_requests.refuse_unacted_headers(request, STEP_ROUTE, "POST")
            response = await sessions.step(session_id, request)
            await response(scope, receive, send)

        await wrap_app_handling_exceptions(endpoint, request)(scope, receive, send)
