"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) from assets shipped in the package
(``app/static``), as FastAPI's "self-hosting JavaScript and CSS for docs" recipe does: the
pages work without internet access and load nothing from another origin."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PREFIX = "/static"
#: the vendored releases (app/static/README.md); part of the asset URLs, so a browser never
#: keeps an old copy after an upgrade
ASSET_VERSIONS = {"swagger-ui": "5.35.0", "redoc": "2.5.4"}


#: the docs pages may load only from this server: their assets, the OpenAPI document, inline
#: script/style (FastAPI's page template; both UIs inject styles) and ReDoc's blob: worker.
#: It also keeps ReDoc's "API docs by Redocly" logo (an <img> from cdn.redoc.ly that no option
#: turns off) from going out.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
       "'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
       "worker-src 'self' blob:; frame-ancestors 'self'; base-uri 'self'; form-action 'self'")


def _page(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    return response


def _asset(name: str) -> str:
    package = name.split("/", 1)[0]
    return f"{STATIC_PREFIX}/{name}?v={ASSET_VERSIONS[package]}"


def install(app: FastAPI) -> None:
    """Needs ``FastAPI(docs_url=None, redoc_url=None)``: these routes replace FastAPI's."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - API docs",
            oauth2_redirect_url=root + oauth2_redirect,
            swagger_js_url=root + _asset("swagger-ui/swagger-ui-bundle.js"),
            swagger_css_url=root + _asset("swagger-ui/swagger-ui.css"),
            swagger_favicon_url=root + _asset("swagger-ui/favicon-32x32.png"),
            # no spec upload to validator.swagger.io (the default) and no badge
            swagger_ui_parameters={"validatorUrl": None},
        ))

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _page(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - API reference",
            redoc_js_url=root + _asset("redoc/redoc.standalone.js"),
            redoc_favicon_url=root + _asset("swagger-ui/favicon-32x32.png"),
            with_google_fonts=False,
        ))
