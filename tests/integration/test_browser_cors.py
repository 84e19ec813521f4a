"""CORS for real: clients/js/optserve.js in a headless Chromium, on a page served from ANOTHER
origin than the API, creates a session, steps it with a JSON body and a safetensors body (both
preflighted, with the Authorization header) and reads the exposed headers; the values must
equal in-process torch. With CORS off, or from an origin not allowed, the browser's call fails.
The same browser renders /docs and /redoc with nothing loaded from anywhere but the server.

Needs Debian's chromium and playwright-core (tests/browser): scripts/bootstrap-browser installs
them when missing (scripts/test runs it); this test never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import CORS_EXPOSED_HEADERS, create_app
from app.transport import stale_dirs
from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BROWSER = ROOT / "tests" / "browser"
KEY = "browser-test-key-0123456789"
X0 = [0.5, -1.25, 2.0, 3.0]
G1 = [0.1, 0.2, -0.3, 0.4]
G2 = [-1.0, 0.5, 0.25, 2.0]


class PageHandler(SimpleHTTPRequestHandler):
    """Serves tests/browser/page and, at /optserve.js, the JS client itself."""

    def translate_path(self, path: str) -> str:
        if urlsplit(path).path == "/optserve.js":
            return str(ROOT / "clients" / "js" / "optserve.js")
        return super().translate_path(path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


PageHandler.extensions_map = {**PageHandler.extensions_map, ".mjs": "text/javascript",
                              ".js": "text/javascript"}


@pytest.fixture(scope="module")
def page_port() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                partial(PageHandler, directory=str(BROWSER / "page")))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser_ready() -> None:
    """Chromium and playwright-core, installed by scripts/bootstrap-browser when missing."""
    p = subprocess.run([str(ROOT / "scripts" / "bootstrap-browser")], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, f"scripts/bootstrap-browser failed:\n{p.stdout}\n{p.stderr}"


def expected_sgd() -> tuple[list[float], list[float]]:
    """The same two steps in torch.optim.SGD here, on float32."""
    x = torch.tensor(X0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1, momentum=0.9, weight_decay=0.01)
    out = []
    for g in (G1, G2):
        x.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        out.append(x.detach().clone().tolist())
    return out[0], out[1]


def browser_env() -> dict[str, str]:
    """The environment node and Chromium run in: this one, with ``TMPDIR=/tmp`` where the
    temporary directory is too deep for the Unix sockets Chromium makes in it (it died:
    "Socket path too long", a CI runner's deep TMPDIR)."""
    env = dict(os.environ)
    if not stale_dirs.fits(Path(tempfile.gettempdir())):
        env["TMPDIR"] = "/tmp"
    return env


def drive(visits: list[dict[str, str]]) -> list[dict[str, Any]]:
    p = subprocess.run(["node", str(BROWSER / "drive.mjs"), json.dumps(visits)],
                       capture_output=True, text=True, timeout=240, cwd=BROWSER,
                       env=browser_env())
    assert p.returncode == 0, f"drive.mjs failed:\n{p.stdout}\n{p.stderr}"
    results: list[dict[str, Any]] = json.loads(p.stdout.strip().splitlines()[-1])
    return results


def page_url(origin: str, api: str, key: str | None, retries: int | None = None) -> str:
    """The page's URL; ``retries``: its client's ``maxRetries`` (a call the browser refuses
    looks like a network error, which a default client retries for its 60 s budget)."""
    query = {"api": api, "x0": json.dumps(X0), "g1": json.dumps(G1), "g2": json.dumps(G2)}
    if key:
        query["key"] = key
    if retries is not None:
        query["retries"] = str(retries)
    return f"{origin}/?{urlencode(query)}"


def test_js_client_in_a_browser_on_another_origin(browser_ready: None, page_port: int) -> None:
    page_origin = f"http://127.0.0.1:{page_port}"
    with_cors = LiveServer(_test_settings(api_keys=f"{KEY}:browser",
                                          cors_origins=f"{page_origin},https://other.example"))
    without = LiveServer(_test_settings())
    api_cors, api_plain = with_cors.start(), without.start()
    started = time.monotonic()
    try:
        results = drive([
            {"kind": "result", "url": page_url(page_origin, api_cors, KEY)},
            {"kind": "result", "url": page_url(page_origin, api_plain, None, retries=0)},
            # same page, other origin (localhost is not 127.0.0.1): not in the allowed list
            {"kind": "result", "url": page_url(f"http://localhost:{page_port}", api_cors, KEY,
                                               retries=0)},
            {"kind": "docs", "url": f"{api_plain}/docs"},
            {"kind": "redoc", "url": f"{api_plain}/redoc"},
        ])
    finally:
        with_cors.stop()
        without.stop()
    print(f"\nbrowser test: chromium ran 5 pages in {time.monotonic() - started:.1f} s")
    allowed, off, other_origin, docs, redoc = results

    # 1. allowed origin: every value equals in-process torch, headers readable
    value = allowed["value"]
    assert value.get("ok"), allowed
    after_json, after_binary = expected_sgd()
    assert value["afterJson"] == after_json
    assert value["afterBinary"] == after_binary
    assert value["versions"] == [1, 2]
    assert value["location"] == f"/v1/sessions/{value['id']}"
    headers = value["headers"]
    assert headers["version"] == "2" and headers["step"] == "2" and headers["etag"] == '"2"'
    assert headers["requestId"] and headers["contentType"] == "application/octet-stream"
    preflights = [r for r in allowed["requests"] if r["method"] == "OPTIONS"]
    assert not preflights  # Chromium does not show preflights as page requests...
    methods = [r["method"] for r in allowed["requests"] if r["url"].startswith(api_cors)]
    assert methods == ["POST", "POST", "POST", "GET", "DELETE"], methods  # ...only the calls

    # 2. CORS off: the browser refuses to hand over the answer
    assert off["value"]["ok"] is False and off["value"]["name"] == "ConnectionError", off
    assert "Failed to fetch" in off["value"]["message"]
    assert any("CORS" in e for e in off["errors"]), off["errors"]

    # 3. CORS on, but not for this origin
    assert other_origin["value"]["ok"] is False, other_origin
    assert "Failed to fetch" in other_origin["value"]["message"]

    # 4. the docs pages render, with every request to the server itself (no CDN)
    assert docs["value"].get("title", "").startswith("optserve"), docs
    assert docs["value"]["operations"] >= 20, docs
    assert redoc["value"].get("title", "").startswith("optserve"), redoc
    for visit, api in ((docs, api_plain), (redoc, api_plain)):
        outside = [r for r in visit["requests"]
                   if not r["url"].startswith((api, "data:", "blob:"))]
        # ReDoc always asks for a "by Redocly" logo from its CDN: the page's CSP blocks it
        # inside the browser (nothing else may go out at all)
        # (Chromium reports it as "csp" or "net::ERR_BLOCKED_BY_CSP")
        assert all("csp" in r.get("failure", "").lower() for r in outside), outside
        assert [r["url"] for r in outside] in ([], ["https://cdn.redoc.ly/redoc/logo-mini.svg"])
        assert not [e for e in visit["errors"] if "Failed to load" in e], visit["errors"]


# ---- the headers themselves, in-process (no browser): what the browser relied on above

ORIGIN = "https://app.example"


@pytest.fixture
def cors_client() -> Iterator[TestClient]:
    with TestClient(create_app(_test_settings(cors_origins=f"{ORIGIN}/",
                                              api_keys=f"{KEY}:t"))) as client:
        yield client


def test_preflight_allows_binary_bodies_the_auth_header_and_every_method(
        cors_client: TestClient) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = cors_client.options("/v1/sessions/s/step", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, "
                                              "if-match, if-none-match, x-optserve-worker, "
                                              "x-request-id"})
        assert r.status_code == 200, r.text  # no key needed for a preflight
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert method in r.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "idempotency-key", "if-match", "if-none-match",
                "x-optserve-worker", "x-request-id"} <= allowed
    r = cors_client.options("/v1/sessions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("headers,field,refused", [
    ({"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
     "Origin", ["origin"]),
    ({"Origin": ORIGIN, "Access-Control-Request-Method": "TRACE"},
     "Access-Control-Request-Method", ["method"]),
    ({"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
      "Access-Control-Request-Headers": "content-type, x-evil"},
     "Access-Control-Request-Headers", ["headers"]),
    ({"Origin": "https://evil.example", "Access-Control-Request-Method": "TRACE"},
     "Origin", ["origin", "method"]),
], ids=["origin", "method", "header", "origin-and-method"])
def test_a_refused_preflight_is_problem_json_naming_the_header(
        cors_client: TestClient, headers: dict[str, str], field: str,
        refused: list[str]) -> None:
    """Starlette's refusal was plain text; it is problem+json like every client mistake, with
    the CORS headers Starlette sets (and no allowed origin for another one)."""
    r = cors_client.options("/v1/sessions", headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "bad_request" and body["status"] == 400
    assert body["field"] == field and body["refused"] == refused
    assert headers["Origin"] in body["detail"] if "origin" in refused else True
    assert "access-control-allow-methods" in r.headers  # (Starlette's preflight headers)
    assert ("access-control-allow-origin" in r.headers) == ("origin" not in refused)


def test_answers_expose_the_version_headers_even_401s(cors_client: TestClient) -> None:
    r = cors_client.get("/v1/sessions", headers={"Origin": ORIGIN})
    assert r.status_code == 401  # the browser can read why
    assert r.headers["access-control-allow-origin"] == ORIGIN
    ok = cors_client.get("/v1/sessions", headers={"Origin": ORIGIN,
                                                  "Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip() for h in ok.headers["access-control-expose-headers"].split(",")}
    assert exposed == set(CORS_EXPOSED_HEADERS) >= {"ETag", "X-Optserve-Version",
                                                    "X-Optserve-Step", "X-Request-Id",
                                                    "Location", "Retry-After"}
    other = cors_client.get("/v1/sessions", headers={"Origin": "https://evil.example",
                                                     "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_by_default(app_client: TestClient) -> None:
    r = app_client.get("/healthz", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in r.headers
    r = app_client.options("/v1/sessions", headers={"Origin": ORIGIN,
                                                    "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
