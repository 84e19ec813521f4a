"""RFC 9457 problem+json for every error, mapped in one place."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from app.api.body_sink import CLOSE_AFTER
from app.errors import OptserveError, Overloaded, PayloadTooLarge, PreconditionFailed
from app.observability import request_id_var

log = logging.getLogger("optserve.api")
PROBLEM = "application/problem+json"
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> Response:
    body: dict[str, Any] = {"type": f"urn:optserve:problem:{code}", "title": title,
                            "status": status, "detail": detail, "code": code}
    body.update({k: v for k, v in extra.items() if v is not None})
    rid = request_id_var.get()
    if rid:
        body["request_id"] = rid
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM)


async def _optserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OptserveError)
    if exc.status >= 500:
        (log.warning if isinstance(exc, Overloaded) else log.error)("%s: %s", exc.code,
                                                                    exc.detail)
    response = problem(exc.status, exc.code, exc.title, exc.detail, field=exc.field, **exc.extra)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    if isinstance(exc, PreconditionFailed):
        response.headers.update(current_version_headers(exc.extra))
    if isinstance(exc, PayloadTooLarge):
        _close_after_refused_upload(request, response)
    return response


def _close_after_refused_upload(request: Request, response: Response) -> None:
    """A 413 refuses a body that may still be arriving (refused at its ``Content-Length``,
    or as it passed the limit), and large: it closes the connection (``Connection: close``),
    and under the server's protocols the close lingers as long as the client goes on
    uploading (:mod:`app.api.lingering_close`), so that a client that reads its answer only
    after its last byte reads it, not a reset. (Kept alive, the rest of the body was read
    and dropped until the next head's clock ran out, ``OPTSERVE_HEAD_TIMEOUT_S``, and an
    upload longer than that met a reset.)"""
    close_after = request.scope.get("extensions", {}).get(CLOSE_AFTER)
    if close_after is not None:
        close_after(upload=True)
        response.headers["Connection"] = "close"


def current_version_headers(extra: dict[str, Any]) -> dict[str, str]:
    """A 412 ``precondition_failed``'s headers: the session's current version as a 200 gives
    it (``ETag``, ``X-Optserve-Version``, ``X-Optserve-Step``; ``X-Optserve-Revision`` where
    the refusal knows it; ``X-Optserve-State-Tag`` on a read of the state dict), so a client
    refreshes its precondition without another read; none where the session is at no version
    (one out of service)."""
    version, revision = extra.get("current_version"), extra.get("current_revision")
    if type(version) is not int:
        return {}
    headers = {"ETag": f'"{version}"', "X-Optserve-Version": str(version)}
    step = extra.get("current_step")
    if type(step) is int:
        headers["X-Optserve-Step"] = str(step)
    if type(revision) is int:
        headers["X-Optserve-Revision"] = str(revision)
    tag = extra.get("current_state_tag")
    if type(tag) is str:
        headers["X-Optserve-State-Tag"] = tag
    return headers


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or None
    detail = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg"))
    return problem(422, "invalid", "Invalid input", detail, field=field)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at this request's path, asked of the routes
    themselves (``route.matches``), included routers too. Starlette's own 405 names only the
    methods of the first route whose path matched."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(not isinstance(route, Mount) and route.matches(scope)[0] == Match.FULL
               for route in request.app.router.routes):
            allowed.append(method)
    if "GET" in allowed and "HEAD" not in allowed:
        allowed.insert(allowed.index("GET") + 1, "HEAD")  # (served as GET: observability.py)
    return allowed


def _route_at(request: Request, path: str) -> bool:
    """Whether some route of the app answers ``path`` (with any method)."""
    scope = {**request.scope, "path": path}
    return any(not isinstance(route, Mount) and route.matches(scope)[0] != Match.NONE
               for route in request.app.router.routes)


def _mounted_at(request: Request) -> bool:
    """Whether the request's path is under a mounted directory of static files (``/ui/assets``,
    ``/ui/uplot``, the docs pages' assets): its 404 is a missing file, not a missing route."""
    # (the router put the mount's app in the scope as the request's endpoint)
    return isinstance(request.scope.get("endpoint"), StaticFiles)


def _no_route(request: Request) -> str:
    """A 404 ``not_found``'s detail: the path, and the one meant when only a trailing ``/``
    (or several) kept it from a route (the app redirects none: main.py); under a mounted
    directory of static files, that no such file exists there."""
    path = request.url.path
    shown = f"{path!r:.200}"
    if _mounted_at(request):
        return f"no such file: {shown} does not exist"
    stripped = path.rstrip("/")
    if stripped != path and stripped and _route_at(request, stripped):
        return (f"no route at {shown}: paths take no trailing '/'; "
                f"did you mean {stripped!r:.200}?")
    return f"no route at {shown}"


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    title = code.replace("_", " ").capitalize()
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    field = None
    if exc.status_code == 405:
        allowed = allowed_methods(request) or headers.get("Allow", "").split(", ")
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        field = "method"
    elif exc.status_code == 404 and detail == "Not Found":  # the router's: no route matched
        detail, field = _no_route(request), "path"
    response = problem(exc.status_code, code, title, detail, field=field)
    for k, v in headers.items():
        response.headers[k] = v
    return response


async def _client_gone(_: Request, exc: Exception) -> Response:
    log.info("client disconnected before its request body arrived; nothing was applied")
    return problem(400, "client_disconnected", "Client disconnected",
                   "the client went away before sending its whole body")


async def _os_error(request: Request, exc: Exception) -> Response:
    """The last resort for a file operation's error that no layer below turned into a
    problem (each that can is meant to, saying what was left as it was): 503
    ``out_of_file_descriptors`` for EMFILE/ENFILE, 507 ``storage_full``, else 503
    ``storage_error``, never a 500. Logged with its traceback: the site is worth a look."""
    assert isinstance(exc, OSError)
    from app.engine.store import storage_failure
    log.error("unhandled file operation error", exc_info=exc)
    return await _optserve_error(request, storage_failure(
        exc, "a file operation failed", outcome="the request could not be completed"))


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "internal_error", "Internal error",
                   "the server failed to handle this request; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(OptserveError, _optserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(Exception, _unexpected)
