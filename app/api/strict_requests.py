"""Every ``/v1`` operation refuses what it would otherwise ignore and run anyway: a query
parameter it does not take, and on a change, a header it does not act on (a precondition, a
worker).

A misspelt query parameter that is ignored changes what a request does without a word:
``PUT .../state_dict?base_verison=3`` would import unconditionally, ``GET .../params?
min_verison=9&wait_s=30`` would answer at once. So each operation takes exactly the query
parameters its OpenAPI document lists (those FastAPI sees in the endpoint's signature and those
``app.api.openapi_docs.OPERATIONS`` adds for the ones it reads itself); any other name is a 422
``invalid_query`` naming it, before the body is read or anything is done.

On a change (``POST``, ``PUT``, ``PATCH``, ``DELETE``), likewise:
- ``If-Match`` / ``If-None-Match`` where not evaluated: RFC 9110 has a server not perform a
  method whose precondition is false. The step (its base version) and the changes whose
  operation lists it (``openapi_docs.CONDITIONAL``: the state import, an overwrite, PATCHes,
  ...) evaluate ``If-Match``, and row pulls ``If-None-Match``; anywhere else (a ``DELETE`` of a
  session, a push) the change would happen whatever the session's version, so it is a 422
  ``unsupported_precondition`` naming the header, with nothing done.
  ``If-None-Match: *`` on a create asks what a create always does (it never replaces a
  session: 409 ``session_exists``);
- ``X-Optserve-Worker`` where not taken (only a step takes it): on ``POST .../grads`` a
  worker's gradients would go to the accumulator every worker shares, not into its push to a
  round. A 422 ``unsupported_header``.

The step's lane, which does not pass through the router, runs the same header check
(:func:`refuse_unacted_headers`); the step checks its own query (``requests.StepQuery``).
``/healthz``, ``/readyz`` and ``/metrics`` take and ignore any query (probes and scrapers add
their own)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from app.errors import Invalid

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

#: the preconditions an operation either evaluates or refuses on a change (RFC 9110 13.1;
#: If-Modified-Since and If-Unmodified-Since: no resource here has a modification date, and a
#: recipient ignores them then)
PRECONDITIONS = {"if-match": "If-Match", "if-none-match": "If-None-Match"}
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def documented(app: Any, path: str, method: str, where: str) -> frozenset[str]:
    """The parameters ``method path`` takes in ``where`` (query, header), as the app's OpenAPI
    document lists them (header names lowercase); read once per app, operation and place."""
    cache: dict[tuple[str, str, str], frozenset[str]] | None = getattr(
        app.state, "documented_parameters", None)
    if cache is None:
        cache = app.state.documented_parameters = {}
    out = cache.get((path, method, where))
    if out is None:
        op = app.openapi().get("paths", {}).get(path, {}).get(method.lower(), {})
        names = [p["name"] for p in op.get("parameters", ()) if p.get("in") == where]
        out = cache[path, method, where] = frozenset(
            n.lower() for n in names) if where == "header" else frozenset(names)
    return out


WORKER = "x-optserve-worker"


def refuse_unacted_headers(request: Request, path: str, method: str) -> None:
    """On a change, the preconditions and the worker ``method path`` does not act on
    (``documented``: the headers its operation lists): 422 ``unsupported_precondition`` /
    ``unsupported_header``, with nothing done. The route's check, and the step's lane's
    (``step_lane``: it calls the step's endpoint without the router)."""
    headers = request.headers
    what = f"{method} {path}"
    for key, name in PRECONDITIONS.items():
        if key not in headers or key in documented(request.app, path, method, "header"):
            continue
        if (key == "if-none-match" and method == "POST" and path == "/v1/sessions"
                and headers.getlist(key) == ["*"]):
            continue  # (a create never replaces a session)
        raise Invalid(f"{what} does not evaluate {name}: it would run whatever the session's "
                      f"version; nothing was done (If-Match is a precondition of the changes "
                      f"that list it in /openapi.json, and the base version of POST .../step)",
                      code="unsupported_precondition", field=name)
    if WORKER in headers and WORKER not in documented(request.app, path, method, "header"):
        # (a worker's gradients named on POST .../grads would go to the session's
        # accumulator, which every worker shares, not into that worker's push to a round)
        raise Invalid(f"{what} does not take X-Optserve-Worker: a worker pushes its gradients "
                      "in a step (POST .../step); nothing was done",
                      code="unsupported_header", field="X-Optserve-Worker")


class StrictRoute(APIRoute):
    """A route whose handler first refuses the query parameters its operation does not
    document, and on a change the preconditions and the worker it does not act on (on ``/v1``
    paths)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        if not self.path_format.startswith("/v1/"):
            return handler
        path = self.path_format

        async def checked(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            if request.scope.get("query_string"):
                query = documented(request.app, path, method, "query")
                for name in request.query_params:
                    if name not in query:
                        raise Invalid(
                            f"{name!r:.60} is not a query parameter of {method} {path} (it "
                            f"takes {', '.join(sorted(query)) if query else 'none'})",
                            code="invalid_query", field=name[:60])
            if method in CHANGES:
                refuse_unacted_headers(request, path, method)
            return await handler(request)

        return checked
