"""Starlette's CORS middleware, with its refused preflights as problem+json.

Starlette answers a preflight it refuses (an origin, method, request header or private-network
access not allowed) with a plain-text 400 ("Disallowed CORS origin, method"); every other
client mistake here is RFC 9457 problem+json naming the field, so this one is too: 400
``bad_request`` naming the first refused preflight header, the refused parts in ``refused``.
The CORS headers Starlette sets on it are kept (the browser, not the body, enforces CORS)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from app.api.problems import problem

#: Starlette's names for the refused parts, and the request header each comes from
_FIELDS = {"origin": "Origin", "method": "Access-Control-Request-Method",
           "headers": "Access-Control-Request-Headers",
           "private-network": "Access-Control-Request-Private-Network"}
_REFUSED = "Disallowed CORS "


class ProblemCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        text = bytes(response.body).decode("utf-8", "replace")
        if response.status_code != 400 or not text.startswith(_REFUSED):
            return response
        refused = [part.strip() for part in text[len(_REFUSED):].split(",") if part.strip()]
        shown = {"origin": request_headers.get("origin"),
                 "method": request_headers.get("access-control-request-method"),
                 "headers": request_headers.get("access-control-request-headers"),
                 "private-network": "access to a private network"}
        detail = "; ".join(f"{_FIELDS.get(part, part)}: {str(shown.get(part))[:200]!r} is not "
                           "allowed" for part in refused)
        out = problem(400, "bad_request", "CORS preflight refused",
                      f"this server's CORS policy refuses the preflight ({detail}; "
                      "OPTSERVE_CORS_ORIGINS lists the origins it allows)",
                      field=_FIELDS.get(refused[0], refused[0]) if refused else None,
                      refused=refused)
        for name, value in response.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                out.headers[name] = value
        return out
