"""Bearer-key authentication and tenancy, as ASGI middleware.

With keys configured, every request except ``GET /healthz`` needs ``Authorization: Bearer
<key>``; the key names the tenant whose sessions the request sees. Keys are compared in
constant time against every configured key and never logged. With no keys, every request is
the ``default`` tenant. ``GET /metrics`` holds server-wide totals (sessions, steps of every
tenant): with ``OPTSERVE_METRICS_TENANTS`` set, only those tenants' keys read it (403 for the
others).
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import problem
from app.config import parse_keys
from app.engine.front import DEFAULT_TENANT

OPEN_PATHS = frozenset({"/healthz", "/ui"})
#: the page at /ui and its static assets (they hold no data; the page's calls carry a key)
OPEN_PREFIXES = ("/ui/",)
METRICS_PATH = "/metrics"
__all__ = ["AuthMiddleware", "parse_keys", "tenant_of"]  # parse_keys lives in app.config


def tenant_of(scope: Scope) -> str:
    tenant: str = scope.get("state", {}).get("tenant", DEFAULT_TENANT)
    return tenant


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: dict[str, str],
                 metrics_tenants: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.keys = [(k.encode(), t) for k, t in keys.items()]
        self.metrics_tenants = metrics_tenants

    def _lookup(self, presented: bytes) -> str | None:
        found = None
        for key, tenant in self.keys:  # no early exit: constant time in the key compared
            if hmac.compare_digest(key, presented):
                found = tenant
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        path = scope["path"]
        if not self.keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            state["tenant"] = DEFAULT_TENANT
            await self.app(scope, receive, send)
            return
        headers = [value for name, value in scope["headers"] if name == b"authorization"]
        header = headers[0] if headers else b""
        scheme, _, token = header.partition(b" ")
        tenant = self._lookup(token.strip()) if scheme.lower() == b"bearer" else None
        if len(headers) > 1:  # which one counts would be ours to guess, and a proxy's too
            tenant = None
        if tenant is None:
            detail = ("missing Authorization: Bearer <key>" if not header
                      else "send one Authorization header" if len(headers) > 1
                      else "the API key is not valid")
            response = problem(401, "unauthorized", "Unauthorized", detail,
                               field="authorization")
            response.headers["WWW-Authenticate"] = 'Bearer realm="optserve"'
            await response(scope, receive, send)
            return
        if path == METRICS_PATH and self.metrics_tenants and tenant not in self.metrics_tenants:
            response = problem(403, "forbidden", "Forbidden",
                               "this key's tenant may not read /metrics: its totals are "
                               "server-wide (OPTSERVE_METRICS_TENANTS names who may)",
                               field="authorization")
            await response(scope, receive, send)
            return
        state["tenant"] = tenant
        await self.app(scope, receive, send)
