"""Bearer-key authentication and tenancy, as ASGI middleware.

With keys configured, every request except ``GET /healthz`` needs ``Authorization: Bearer
<key>``; the key names the tenant whose sessions the request sees. Keys are compared in
constant time against every configured key and never logged. With no keys, every request is
the ``default`` tenant.
"""

from __future__ import annotations

import hmac
import re
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import problem
from app.engine.front import DEFAULT_TENANT

OPEN_PATHS = frozenset({"/healthz"})
# Not starting with '.' or '-': a session's directory is "<tenant>~<id>", and the store skips
# names starting with '.' (its own temporary and deleted directories).
_TENANT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def parse_keys(spec: str, file: Path | None) -> dict[str, str]:
    """``key:tenant`` pairs separated by commas or newlines (a bare key is the default
    tenant), from the variable and/or a file. Lines starting with # are ignored."""
    text = spec
    if file is not None:
        text += "\n" + file.read_text()
    keys: dict[str, str] = {}
    for raw in re.split(r"[,\n]", text):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        key, _, tenant = item.partition(":")
        key, tenant = key.strip(), (tenant.strip() or DEFAULT_TENANT)
        if len(key) < 16:
            raise ValueError("API keys must be at least 16 characters")
        if not _TENANT_RE.match(tenant):
            raise ValueError(f"tenant names are 1-64 of [A-Za-z0-9_.-], not starting with '.' "
                             f"or '-', got {tenant!r}")
        if keys.get(key, tenant) != tenant:
            raise ValueError("one API key is given for two tenants")
        keys[key] = tenant
    return keys


def tenant_of(scope: Scope) -> str:
    tenant: str = scope.get("state", {}).get("tenant", DEFAULT_TENANT)
    return tenant


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: dict[str, str]) -> None:
        self.app = app
        self.keys = [(k.encode(), t) for k, t in keys.items()]

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
        if not self.keys or scope["path"] in OPEN_PATHS:
            state["tenant"] = DEFAULT_TENANT
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        tenant = self._lookup(token.strip()) if scheme.lower() == b"bearer" else None
        if tenant is None:
            detail = ("missing Authorization: Bearer <key>" if not header
                      else "the API key is not valid")
            response = problem(401, "unauthorized", "Unauthorized", detail,
                               field="authorization")
            response.headers["WWW-Authenticate"] = 'Bearer realm="optserve"'
            await response(scope, receive, send)
            return
        state["tenant"] = tenant
        await self.app(scope, receive, send)
