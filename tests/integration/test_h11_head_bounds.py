"""A request head past ``OPTSERVE_MAX_HEAD_KB`` or with more than ``OPTSERVE_MAX_HEADERS``
lines gets a 431 ``headers_too_large`` under h11 too (the HTTP protocol ``python -m app``
serves with where httptools is missing), as under httptools (``test_request_heads.py``), and
the connection is closed; one at its bounds is served. h11 bounds only a head it holds
unparsed (16 KiB): a head that arrived in one read was served whatever its size or lines
(300 header lines, a 70 KB header line)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import LiveServer, _test_settings, problem_protocol
from tests.integration import test_request_heads as heads
from tests.integration.test_malformed_http import assert_serves, connect

pytestmark = pytest.mark.integration

HEADS = {
    "300 header lines": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n",
    "201 header lines": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "a 70 KB header line": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000
                           + b"\r\n\r\n",
    "a 70 KB URL": b"GET /healthz?q=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with LiveServer(_test_settings(), http=problem_protocol("h11")).serving() as url:
        yield url


@pytest.mark.parametrize("case", list(HEADS))
def test_a_head_past_its_bounds_gets_a_431(server: str, case: str) -> None:
    problem = heads.refused_head(server, HEADS[case])
    if case.endswith("lines"):
        assert problem["detail"] == ("more than 200 header lines (OPTSERVE_MAX_HEADERS); the "
                                     "connection is closed")
    else:  # (h11's own 16 KiB bound where the head came in more than one read)
        assert problem["detail"] in (
            "the request line and headers take more than 64 KiB (OPTSERVE_MAX_HEAD_KB); the "
            "connection is closed",
            "Receive buffer too long: the request line and headers take at most 16 KiB; the "
            "connection is closed")
    assert_serves(server)


def test_a_head_at_its_bounds_is_served(server: str) -> None:
    """200 header lines (Host one of them), and then a request after it on the connection."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: 1\r\n" % i for i in range(199)) + b"\r\n"
    with connect(server) as sock:
        sock.sendall(head + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b'{"status":"ok"}') < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2
