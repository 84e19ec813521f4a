"""``GET /ui``: a small page listing the caller's sessions and plotting one session's per-step
metrics live (app/static/ui, charts by uPlot vendored in app/static/uplot; no build step, nothing
from a CDN). The page and its assets are public (they hold no data); every call the page makes
carries the key the user typed into it, so with API keys it sees one tenant's sessions only."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: the page loads only from this server: its module, uPlot, its styles, and the API
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def install(app: FastAPI) -> None:
    app.mount("/ui/assets", StaticFiles(directory=STATIC_DIR / "ui"), name="ui-assets")
    app.mount("/ui/uplot", StaticFiles(directory=STATIC_DIR / "uplot"), name="ui-uplot")

    @app.get("/ui", include_in_schema=False)
    async def ui_page() -> Response:
        return FileResponse(STATIC_DIR / "ui" / "index.html", media_type="text/html",
                            headers=HEADERS)

    @app.get("/ui/", include_in_schema=False)
    async def ui_slash() -> Response:
        return RedirectResponse("/ui", status_code=308)
