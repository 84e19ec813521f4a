"""RFC 9112 6.1 over raw sockets, on real uvicorn servers serving with both HTTP protocols
``python -m app`` may use (httptools, and h11 where httptools is missing): a request framed
both by ``Content-Length`` and by ``Transfer-Encoding`` (the way requests are smuggled past a
proxy that reads the other framing) gets a 400 ``malformed_http`` problem naming
``Transfer-Encoding``, and the connection is closed after it (a server MUST close it): a
request pipelined after it is not served, and nothing the smuggled bytes ask is done (no
session made, no step taken: the session then steps once as torch.optim does). httptools
refused it in its parser; under h11 the request was framed by its chunks and served, the
connection kept, and the request after it served too."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.integration import test_http_versions_and_line_ends as lines
from tests.integration.test_host_header_and_connect import (
    GRAD,
    LR,
    P0,
    _steps_once_as_torch,
)

pytestmark = pytest.mark.integration

def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def both_framings(method: bytes, path: str, body: bytes, length: int) -> bytes:
    return (b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (method, path.encode(), length) + chunked(body))


def assert_refused_and_closed(url: str, raw: bytes) -> None:
    """One answer, the 400 naming ``Transfer-Encoding``; the connection closed after it
    (the request pipelined after it not served)."""
    detail = lines.refused(url, raw, 400, "malformed_http", "Transfer-Encoding")
    assert detail.startswith("Transfer-Encoding can't be present with Content-Length"), detail


@pytest.mark.parametrize("length", [0, 2, 1000])
def test_a_create_framed_both_ways_is_refused_and_nothing_made(server: str,
                                                               length: int) -> None:
    sid = f"framing-{uuid.uuid4().hex[:12]}"
    create = json.dumps({"optimizer": "SGD", "options": {"lr": LR}, "id": sid,
                         "params": {"w": {"dtype": "float32", "shape": [3],
                                          "data": P0.tolist()}}}).encode()
    assert_refused_and_closed(server, both_framings(b"POST", "/v1/sessions", create, length))
    with httpx.Client(base_url=server) as http:
        assert http.get(f"/v1/sessions/{sid}").status_code == 404  # no session was made


def test_a_step_framed_both_ways_is_refused_and_nothing_applied(server: str) -> None:
    sid = f"framing-{uuid.uuid4().hex[:12]}"
    create = {"optimizer": "SGD", "options": {"lr": LR}, "id": sid,
              "params": {"w": {"dtype": "float32", "shape": [3], "data": P0.tolist()}}}
    step = {"grads": {"w": {"dtype": "float32", "shape": [3], "data": GRAD.tolist()}}}
    with httpx.Client(base_url=server) as http:
        assert http.post("/v1/sessions", json=create).status_code == 201
        assert_refused_and_closed(server, both_framings(
            b"POST", f"/v1/sessions/{sid}/step", json.dumps(step).encode(), 5))
        _steps_once_as_torch(http, sid, step)


def test_a_get_framed_both_ways_is_refused(server: str) -> None:
    assert_refused_and_closed(server, both_framings(b"GET", "/healthz", b"", 0))
