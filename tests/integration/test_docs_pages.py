"""/docs and /redoc work offline: every asset they load comes from this server (app/static,
shipped in the wheel), never from a CDN. (tests/integration/test_browser_cors.py also renders
/docs in a real headless Chromium and checks that no request leaves the server.)"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.api.docs_pages import STATIC_DIR

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# every URL an HTML page or its inline script names: src=, href=, and JS url:/...Url: strings
_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|Url)\s*[:=]\s*["']([^"']+)["']|"""
                  r"""spec-url\s*=\s*["']([^"']+)["']""")
EXPECTED_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
                  ".png": ("image/png",), ".json": ("application/json",)}


def _urls(html: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in _URL.finditer(html)]


@pytest.mark.parametrize("page,needs", [
    ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "openapi.json"}),
    ("/redoc", {"redoc.standalone.js", "favicon-32x32.png", "openapi.json"}),
])
def test_docs_pages_load_only_same_origin_assets(app_client: TestClient, page: str,
                                                 needs: set[str]) -> None:
    r = app_client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # and the browser may load nothing from elsewhere (ReDoc's CDN logo, anything injected)
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert "cdn.jsdelivr.net" not in html and "fonts.googleapis.com" not in html
    urls = _urls(html)
    assert {Path(urlsplit(u).path).name for u in urls} >= needs, urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), url
        if url.startswith("/docs/oauth2-redirect"):
            continue
        asset = app_client.get(url)
        assert asset.status_code == 200, (url, asset.status_code)
        suffix = Path(parts.path).suffix
        ctype = asset.headers["content-type"].split(";")[0]
        assert ctype in EXPECTED_TYPES[suffix], (url, ctype)
        if parts.path.startswith("/static/"):
            assert asset.content == (STATIC_DIR / parts.path.removeprefix("/static/")
                                     ).read_bytes()
    # swagger ui would otherwise send the whole document to validator.swagger.io
    if page == "/docs":
        assert '"validatorUrl": null' in html


def test_swagger_ui_oauth2_redirect_page_is_served(app_client: TestClient) -> None:
    r = app_client.get("/docs/oauth2-redirect")
    assert r.status_code == 200 and "oauth2" in r.text.lower()
    assert "https://" not in r.text


def test_static_assets_ship_in_the_package_with_their_licences() -> None:
    files = {p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*")
             if p.is_file()}
    assert {"static/swagger-ui/swagger-ui-bundle.js", "static/swagger-ui/swagger-ui.css",
            "static/swagger-ui/favicon-32x32.png", "static/swagger-ui/LICENSE",
            "static/redoc/redoc.standalone.js", "static/redoc/LICENSE"} <= files
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["app"]
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") ==
                                             g.count("/") for g in globs)]
    assert not unshipped, f"app/static files not in the wheel's package-data: {unshipped}"
    bundle = (STATIC_DIR / "swagger-ui/swagger-ui-bundle.js").read_bytes()
    assert b"SwaggerUIBundle" in bundle and len(bundle) > 500_000


@pytest.mark.parametrize("path", ["/ui/assets/missing.js", "/ui/uplot/nope.css",
                                  "/static/not-there.js"])
def test_a_missing_asset_is_a_404_saying_the_file_does_not_exist(app_client: TestClient,
                                                                 path: str) -> None:
    """A path under a mounted directory of assets names a route: its 404 says that the file
    does not exist (it said "no route at ...")."""
    r = app_client.get(path)
    assert r.status_code == 404
    problem = r.json()
    assert problem["code"] == "not_found" and problem["field"] == "path", problem
    assert problem["detail"] == f"no such file: {path!r} does not exist", problem
    assert app_client.get("/ui/assets/ui.js").status_code == 200  # (a file that is there)


def test_an_unknown_route_beside_the_assets_is_still_no_route(app_client: TestClient) -> None:
    r = app_client.get("/ui/elsewhere.js")
    assert r.status_code == 404
    assert r.json()["detail"] == "no route at '/ui/elsewhere.js'"
