"""Any answer given before its request's body has ended, while that body is still arriving (a 401
for a wrong key, a 404 for an unknown route: the app never reads the body), closes the
connection (``Connection: close``) and lingers as an early 413 does, where more than
``lingering_close.KEEP_ALIVE_REST`` of the announced body is unread or its length is unknown
(chunked): a client that uploads for longer than the next head's clock plus the short linger and
reads its answer only after its last byte reads the whole problem and then the end of the
stream. (Kept alive, the body was read and dropped until the next head's clock ran out, and the
close then met the client's next bytes with a reset.) A smaller rest is read and dropped, the
connection kept alive for the next request, as is a whole request's; an answer to a request
whose client waits for ``100 Continue`` and sent none of its body keeps the connection too, and
nothing lingers. An answer the server closes after on its own (a body timeout's 408) says
``Connection: close`` under both protocols (h11's did not). Over raw sockets against real
uvicorn servers on 127.0.0.1 with API keys on, with each HTTP protocol ``python -m app`` may
use; the upload server's bounds are shortened (the head clock to 1 s, the upload's linger to
:data:`TOTAL_S` and :data:`QUIET_S`), with margins for a loaded machine."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from app.api import connection_cap, lingering_close
from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol
from tests.integration import test_refused_upload_linger as upload

# waits on real clocks most of its time: run beside the Ray suite (scripts/test)
pytestmark = [pytest.mark.integration, pytest.mark.clock]

KEY = "early-answer-key-0123456789"
HEAD_TIMEOUT_S = 1.0
#: the upload's linger in all, and without bytes (shortened from 30 s and 5 s)
TOTAL_S = 10.0
QUIET_S = 3.0
#: how long the slow upload takes: past the 1 s head clock plus the 1 s short linger that a
#: body kept alive met, well within TOTAL_S
UPLOAD_S = 4.5
BODY = upload.BODY
#: the body timeout (the app reads none of the slow uploads' bodies)
BODY_TIMEOUT_S = 1.0
PIECES = upload.PIECES
#: a body whose rest, as its early answer comes, is within KEEP_ALIVE_REST
SMALL_BODY = 50_000
#: requests answered before their body is read: a wrong key, a route that does not exist
EARLY = {401: ("/v1/sessions", "wrong-key-0123456789abcdef", "unauthorized"),
         404: ("/v1/no-such-route", KEY, "not_found")}


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def live(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    """A server with keys on and short bounds (the slow uploads)."""
    settings = _test_settings(head_timeout_s=HEAD_TIMEOUT_S, api_keys=f"{KEY}:t1",
                              body_timeout_s=BODY_TIMEOUT_S)
    with upload.lingering_server(settings, request.param, TOTAL_S, QUIET_S) as served:
        yield served


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def kept(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    """A server with keys on and the default head clock (10 s: a loaded machine's client
    between two requests is not outlasted)."""
    server = LiveServer(_test_settings(api_keys=f"{KEY}:t1"), http=problem_protocol(request.param))
    with server.serving() as url:
        yield server, url


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def capped(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    """A server that holds one connection at most (``OPTSERVE_MAX_CONNECTIONS``), with the
    default bounds (a connection held idle is closed after 10 s)."""
    server = LiveServer(_test_settings(max_connections=1), http=problem_protocol(request.param))
    with server.serving() as url:
        yield server, url


def lingering_gauge(url: str) -> float:
    """``optserve_connections_lingering`` as ``/metrics`` says it."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=30).text
    line = next(line for line in text.splitlines()
                if line.startswith("optserve_connections_lingering "))
    return float(line.split()[1])


def head(status: int, framing: str, extra: str = "") -> bytes:
    path, key, _ = EARLY[status]
    return (f"POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{extra}{framing}\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer (by its ``Content-Length``), the connection left open."""
    answer = b""
    while True:
        head_part, sep, body = answer.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")[1:]
                          if line.lower().startswith(b"content-length:"))
            if len(body) >= length:
                assert len(body) == length, answer[:300]
                return answer
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed: {answer[:300]!r}"
        answer += chunk


def problem_of(answer: bytes, status: int, closes: bool) -> dict[str, object]:
    """The answer's problem, checked: its status and code, ``Connection: close`` or not, the
    whole body (by its ``Content-Length``) and nothing after it."""
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert (b"\r\nconnection: close\r\n" in head_part.lower() + b"\r\n") is closes, head_part
    length = next(int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    assert len(body) == length, answer[:300]
    problem = json.loads(body)
    assert (problem["status"], problem["code"]) == (status, EARLY[status][2]), problem
    return dict(problem)


@pytest.mark.parametrize("status", sorted(EARLY))
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_slow_upload_answered_early_reads_its_answer_after_its_last_byte(
        live: tuple[LiveServer, str], status: int, chunked: bool) -> None:
    """The client sends its whole body over :data:`UPLOAD_S` without reading (as upload code
    does), then reads: the whole problem, then the end of the stream, no reset; the server
    closes once the client closes its side, and no connection lingers after."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY}"
    with upload.connect(url) as sock:
        sock.sendall(head(status, framing))
        started = time.monotonic()
        for piece in upload.pieces(chunked):
            sock.sendall(piece)  # (a reset here fails the test)
            time.sleep(UPLOAD_S / PIECES)
        assert time.monotonic() - started > 2 * HEAD_TIMEOUT_S + connection_cap.LINGER_S
        problem_of(upload.read_to_end(sock), status, closes=True)  # (a reset here fails the test)
        assert upload.lingering(server) == 1  # (still counted: the client has not closed)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    upload.wait_no_lingering(server, 10)
    assert lingering_gauge(url) == 0


@pytest.mark.parametrize("status", sorted(EARLY))
def test_a_small_rest_answered_early_keeps_the_connection(
        kept: tuple[LiveServer, str], status: int) -> None:
    """A body answered after its first bytes, whose rest is within ``KEEP_ALIVE_REST``: the
    answer keeps the connection, the rest is read and dropped, and the next request on the
    connection, sent right behind the body, is answered as ever; nothing lingers."""
    assert SMALL_BODY <= lingering_close.KEEP_ALIVE_REST
    server, url = kept
    with upload.connect(url) as sock:
        sock.sendall(head(status, f"Content-Length: {SMALL_BODY}") + b"a" * 1000)
        problem_of(read_answer(sock), status, closes=False)  # (before the body's end)
        assert upload.lingering(server) == 0
        sock.sendall(b"a" * (SMALL_BODY - 1000) + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
    upload.wait_no_lingering(server, 10)


@pytest.mark.parametrize("status", sorted(EARLY))
def test_a_whole_request_answered_keeps_the_connection(
        kept: tuple[LiveServer, str], status: int) -> None:
    """A request sent whole (its body ended before its answer) is answered without
    ``Connection: close``, the next request on the connection as ever; nothing lingers."""
    server, url = kept
    with upload.connect(url) as sock:
        sock.sendall(head(status, "Content-Length: 2") + b"{}")
        problem_of(read_answer(sock), status, closes=False)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
        assert upload.lingering(server) == 0
    assert upload.lingering(server) == 0


def test_an_answer_before_100_continue_keeps_the_connection(
        kept: tuple[LiveServer, str]) -> None:
    """A request that waits for ``100 Continue`` before its (large) body, answered 401 at
    once: no ``100``, no ``Connection: close``, the connection left open for the client to
    send its body or close (RFC 9110 10.1.1), nothing lingering; the body sent anyway is read
    and dropped, and the next request answered as ever."""
    server, url = kept
    with upload.connect(url) as sock:
        sock.sendall(head(401, f"Content-Length: {BODY}", "Expect: 100-continue\r\n"))
        answer = read_answer(sock)
        assert not answer.startswith(b"HTTP/1.1 100"), answer[:300]
        problem_of(answer, 401, closes=False)
        assert upload.lingering(server) == 0
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # (open: neither closed nor answered again)
            sock.recv(100)
        sock.settimeout(30)
        sock.sendall(b"a" * BODY + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
    assert upload.lingering(server) == 0


def test_a_slow_upload_with_an_unmet_expectation_reads_its_417(
        live: tuple[LiveServer, str]) -> None:
    """An ``Expect`` the server does not meet is answered 417 at once and closed (the body is
    not read): the close lingers as long as the upload goes on, as a 413's (it lingered a
    second, and the client's next bytes met a reset)."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    with upload.connect(url) as sock:
        sock.sendall(head(404, f"Content-Length: {BODY}", "Expect: something-else\r\n"))
        started = time.monotonic()
        for piece in upload.pieces(False):
            sock.sendall(piece)  # (a reset here fails the test)
            time.sleep(UPLOAD_S / PIECES)
        assert time.monotonic() - started > 2 * connection_cap.LINGER_S
        answer = upload.read_to_end(sock)  # (a reset here fails the test)
        assert answer.startswith(b"HTTP/1.1 417 "), answer[:300]
        assert b"\r\nconnection: close\r\n" in answer.lower(), answer[:300]
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    upload.wait_no_lingering(server, 10)


def test_a_body_timeout_408_says_the_connection_closes(live: tuple[LiveServer, str]) -> None:
    """A body that stalls is answered 408 ``body_timeout`` and the connection closed after
    it: the answer says so (``Connection: close``), under h11 as under httptools, and
    nothing lingers once the client has closed."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    with upload.connect(url) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        answer = upload.read_to_end(sock)  # (after about BODY_TIMEOUT_S)
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"\r\nconnection: close\r\n" in head_part.lower() + b"\r\n", head_part
    problem = json.loads(body)
    assert (problem["code"], problem["field"]) == ("body_timeout", "body"), problem
    upload.wait_no_lingering(server, 10)


def _held(server: LiveServer, url: str) -> socket.socket:
    """The one connection ``capped`` allows, open and idle."""
    held = upload.connect(url)
    deadline = time.monotonic() + 10
    while server.app.state.connections.open < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return held


def the_503(answer: bytes) -> None:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert b"\r\nconnection: close\r\n" in head_part.lower() + b"\r\n", head_part
    problem = json.loads(body)
    assert problem["code"] == "too_many_connections", problem


def test_a_slow_upload_on_a_refused_connection_reads_its_503(
        capped: tuple[LiveServer, str]) -> None:
    """A connection past the bound is answered 503 as it opens; its client sends its request
    and a body over :data:`UPLOAD_S` without reading, then reads the whole 503 and the end of
    the stream, no reset (it lingered a second, and the client's next bytes met a reset)."""
    server, url = capped
    upload.wait_no_lingering(server, 40)
    with _held(server, url), upload.connect(url) as sock:
        sock.sendall(head(401, f"Content-Length: {BODY}"))
        started = time.monotonic()
        for piece in upload.pieces(False):
            sock.sendall(piece)  # (a reset here fails the test)
            time.sleep(UPLOAD_S / PIECES)
        assert time.monotonic() - started > 2 * connection_cap.LINGER_S
        the_503(upload.read_to_end(sock))  # (a reset here fails the test)
        assert upload.lingering(server) == 1
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    upload.wait_no_lingering(server, 10)


def test_a_refused_connection_that_sends_nothing_is_let_go_soon(
        capped: tuple[LiveServer, str]) -> None:
    """A connection past the bound that sends nothing (nor closes) reads its 503 and the end
    of the stream, and is closed about ``connection_cap.LINGER_S`` later, well before an
    upload's quiet bound."""
    server, url = capped
    upload.wait_no_lingering(server, 40)
    with _held(server, url), upload.connect(url) as sock:
        the_503(upload.read_to_end(sock))
        answered = time.monotonic()
        upload.wait_no_lingering(server, 10)
        assert time.monotonic() - answered < connection_cap.UPLOAD_QUIET_S - 1
