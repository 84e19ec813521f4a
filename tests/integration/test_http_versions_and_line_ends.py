"""A request line's HTTP version and a request head's line ends, over raw sockets, on real
uvicorn servers serving with both HTTP protocols ``python -m app`` may use (httptools, and
h11 where httptools is missing): the same answer on both.

- ``HTTP/2.0``, ``HTTP/3.0`` (another major version): 505 ``http_version_not_supported``
  (RFC 9110 15.6.6), the connection closed. Both protocols served ``HTTP/2.0`` (200); h11
  served ``HTTP/3.0`` too, httptools refused it as a 400.
- ``HTTP/1.2`` (a higher minor version of HTTP/1): served as HTTP/1.1 (RFC 9110 2.5: a
  recipient SHOULD), a ``Host`` needed as for 1.1. httptools refused it (400); h11 served it,
  without needing a ``Host``.
- HTTP/0.9 (no version, or ``HTTP/0.9``): 400 ``malformed_http`` naming ``request-line``,
  closed. httptools served both (200), h11 served ``HTTP/0.9``.
- A bare LF line end, an obsolete line folding: 400 ``malformed_http`` naming ``headers``
  (``request-line`` for the first line's end) and the header, closed (RFC 9112 2.2, 5.2);
  h11 took them and served the request.
- Empty lines (CRLF) before a request line (RFC 9112 2.2: a server SHOULD ignore at least one;
  some clients send one after a request's body): ignored, up to 8 before one request, as
  llhttp skips them; h11 refused the first (400 "no request line received"). More than 8, or
  a bare LF or CR there: 400 ``malformed_http`` naming ``request-line``, closed (httptools
  took any number of CRs and LFs).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from app.api.request_head_checks import MAX_EMPTY_LINES
from tests.integration.test_host_header_and_connect import exchange

pytestmark = pytest.mark.integration

PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


def refused(url: str, raw: bytes, status: int, code: str, field: str) -> str:
    """``raw`` (a request pipelined after it) gets one answer, the problem, and the
    connection closes; the problem's detail."""
    answers, closed = exchange(url, raw + PIPELINED)
    assert [answer[0] for answer in answers] == [status], answers
    _, headers, body = answers[0]
    assert (headers["content-type"], headers["connection"]) == (
        "application/problem+json", "close"), headers
    problem = json.loads(body)
    assert (problem["status"], problem["code"], problem["field"],
            problem["type"]) == (status, code, field, f"urn:optserve:problem:{code}"), problem
    assert problem["request_id"] == headers["x-request-id"], problem
    assert problem["detail"].endswith("the connection is closed"), problem
    assert closed
    detail: str = problem["detail"]
    return detail


@pytest.mark.parametrize("version", ["2.0", "3.0", "0.5", "9.9"])
def test_another_major_version_is_a_505(server: str, version: str) -> None:
    detail = refused(server, b"GET /healthz HTTP/%s\r\nHost: t\r\n\r\n" % version.encode(),
                     505, "http_version_not_supported", "request-line")
    assert detail.startswith(f"HTTP/{version} is not served: this server speaks HTTP/1.1")


def test_a_505_answers_a_post_and_nothing_is_made(server: str) -> None:
    body = json.dumps({"optimizer": "SGD", "options": {"lr": 0.1}, "id": "v2-made",
                       "params": {"w": {"dtype": "float32", "shape": [1],
                                        "data": [1.0]}}}).encode()
    refused(server, b"POST /v1/sessions HTTP/2.0\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), 505,
            "http_version_not_supported", "request-line")
    answers, _ = exchange(server, b"GET /v1/sessions/v2-made HTTP/1.1\r\nHost: t\r\n"
                                  b"Connection: close\r\n\r\n")
    assert [answer[0] for answer in answers] == [404]


def test_http_1_2_is_served_as_http_1_1(server: str) -> None:
    """Kept alive (the request after it served), and a ``Host`` needed as for 1.1."""
    answers, closed = exchange(server, b"GET /healthz HTTP/1.2\r\nHost: t\r\n\r\n" + PIPELINED,
                               timeout=2)
    assert [(status, json.loads(body)) for status, _, body in answers] == [
        (200, {"status": "ok"})] * 2
    assert not closed
    refused(server, b"GET /healthz HTTP/1.2\r\n\r\n", 400, "malformed_http", "Host")


@pytest.mark.parametrize("line", [b"GET /healthz HTTP/0.9", b"GET /healthz"],
                         ids=["HTTP/0.9", "no version"])
def test_http_0_9_is_a_400(server: str, line: bytes) -> None:
    detail = refused(server, line + b"\r\nHost: t\r\n\r\n", 400, "malformed_http",
                     "request-line")
    assert "the first line is METHOD /path HTTP/1.1" in detail


HEADS = {
    "obs-fold (space)": (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
                         "headers", "the header 'X-A' is folded onto the next line (obs-fold)"),
    "obs-fold (tab)": (b"GET /healthz HTTP/1.1\r\nX-B: a\r\n\tb\r\nHost: t\r\n\r\n",
                       "headers", "the header 'X-B' is folded onto the next line (obs-fold)"),
    "bare LF everywhere": (b"GET /healthz HTTP/1.1\nHost: t\n\n", "request-line",
                           "the request line ends in a bare LF, not CRLF"),
    "bare LF after a header": (b"GET /healthz HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", "headers",
                               "the header 'Host' ends in a bare LF, not CRLF"),
    "bare LF ending the head": (b"GET /healthz HTTP/1.1\r\nHost: t\r\n\n", "headers",
                                "the header section ends in a bare LF, not CRLF"),
}


@pytest.mark.parametrize("case", list(HEADS))
def test_a_bare_lf_or_a_folded_line_is_a_400(server: str, case: str) -> None:
    raw, field, start = HEADS[case]
    detail = refused(server, raw, 400, "malformed_http", field)
    assert detail.startswith(start + ": each line of the request head ends in CRLF"), detail


def test_a_bare_lf_in_a_head_sent_in_pieces_is_a_400(server: str) -> None:
    """The head's lines arrive one read at a time (h11 holds them until the blank line)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"X-A: a\r\n", b" b\r\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data
    assert json.loads(body)["detail"].startswith(
        "the header 'X-A' is folded onto the next line (obs-fold)")


CLOSING = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
EMPTY_LINES_SERVED = {
    "one first": b"\r\n" + CLOSING,
    "as many as taken": b"\r\n" * MAX_EMPTY_LINES + CLOSING,
    "after a request": PIPELINED + b"\r\n" + CLOSING,
    "after a body": (b"PUT /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab"
                     b"\r\n\r\n" + CLOSING),
}


@pytest.mark.parametrize("case", list(EMPTY_LINES_SERVED))
def test_empty_lines_before_a_request_line_are_ignored(server: str, case: str) -> None:
    answers, closed = exchange(server, EMPTY_LINES_SERVED[case])
    statuses = [status for status, _, _ in answers]
    assert statuses == {"after a request": [200, 200], "after a body": [405, 200]}.get(
        case, [200]), answers
    assert json.loads(answers[-1][2]) == {"status": "ok"}
    assert closed  # (by the last request's Connection: close, not a refusal)
    assert answers[-1][1]["connection"] == "close"


def test_empty_lines_in_pieces_are_ignored_and_counted_across_reads(server: str) -> None:
    """A CRLF split over two reads is one empty line; the bound counts the lines of all the
    reads before one request line."""
    host, port = server.removeprefix("http://").split(":")
    for pieces, status in (([b"\r", b"\n\r", b"\n", CLOSING], 200),
                           ([b"\r\n" * 5, b"\r", b"\n\r\n" * (MAX_EMPTY_LINES - 5), CLOSING],
                            400)):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.05)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 %d " % status), data


@pytest.mark.parametrize(("raw", "start"), [
    (b"\r\n" * (MAX_EMPTY_LINES + 1) + CLOSING,
     f"more than {MAX_EMPTY_LINES} empty lines before the request line"),
    (b"\n" + CLOSING, "an empty line before the request line is a bare LF, not CRLF"),
    (b"\r\n\r" + CLOSING, "an empty line before the request line ends in a bare CR, not CRLF"),
], ids=["too many", "bare LF", "bare CR"])
def test_too_many_or_malformed_empty_lines_are_a_400(server: str, raw: bytes, start: str
                                                      ) -> None:
    detail = refused(server, raw, 400, "malformed_http", "request-line")
    assert detail.startswith(f"{start}: a request line may follow at most {MAX_EMPTY_LINES} "
                             "empty lines, each a CRLF (RFC 9112 2.2)"), detail
