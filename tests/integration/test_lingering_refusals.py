"""Every answer that closes the connection while its client may still be sending lingers (RFC 9112
9.6, :mod:`app.api.lingering_close`): a request head not complete in time (408), a head the
parser refuses (400) or finds too large (431), an ``Expect`` the server does not meet (417), an
early answer (413) to a request whose client asked to close before its body ended (``Connection:
close``, HTTP/1.0), and a small body answered early (a 404) and still arriving when the next
head's clock runs out. The client goes on sending after the answer; it must read the whole
answer and then the end of the stream, with no reset (``ECONNRESET`` on a read, ``EPIPE`` on a
send) while the server lingers, and the server closes once the client closes its side. A server
that closed at once answered the client's next bytes with a reset. A close where nothing more
can arrive (a whole request whose client asked to close, a connection that sent nothing in the
head timeout) does not linger, nor does the server wait out a linger as it shuts down. Over raw
sockets against real uvicorn servers on 127.0.0.1, with each HTTP protocol ``python -m app`` may
use, on uvloop and on asyncio's loop; the servers linger :data:`LINGER_S` (longer than the
suite's default, so that a loaded machine's client is not outlasted)."""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from app.api import connection_cap
from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol

# waits on real clocks most of its time: run beside the Ray suite (scripts/test)
pytestmark = [pytest.mark.integration, pytest.mark.clock]

HEAD_TIMEOUT_S = 1.0
LINGER_S = 5.0
#: how long the client goes on sending after it has read the answer
SEND_AFTER_S = 0.4


@pytest.fixture(scope="module", params=[("httptools", "auto"), ("h11", "auto"),
                                        ("httptools", "asyncio"), ("h11", "asyncio")],
                ids=lambda param: "-".join(param))
def live(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    """A server with each HTTP protocol, on the server's default event loop (uvloop where it
    is installed) and on asyncio's own."""
    name, loop = request.param
    protocol = problem_protocol(name)
    settings = _test_settings(head_timeout_s=HEAD_TIMEOUT_S)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_cap, "LINGER_S", LINGER_S)
        server = LiveServer(settings, loop=loop, http=protocol)
        with server.serving() as url:
            yield server, url


@pytest.fixture(autouse=True)
def _nothing_logged_as_failed(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No error, and nothing from the event loop (a callback that raised, a transport's fatal
    error), is logged while a connection lingers and ends."""
    yield
    failed = [f"{r.name}: {r.getMessage()}" for r in caplog.get_records("call")
              if r.levelno >= logging.ERROR or (r.name == "asyncio"
                                                and r.levelno >= logging.WARNING)]
    assert not failed


def lingering(server: LiveServer) -> int:
    return int(server.app.state.connections.lingering)


def wait_no_lingering(server: LiveServer) -> None:
    deadline = time.monotonic() + LINGER_S + 5
    while lingering(server):
        assert time.monotonic() < deadline, lingering(server)
        time.sleep(0.02)


def whole(answer: bytes) -> bool:
    head, sep, rest = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return False


def answer_while_sending(url: str, first: bytes, more: bytes) -> bytes:
    """Send ``first``, then ``more`` a few bytes every 0.05 s, reading meanwhile, on through
    the answer and the end of the stream until :data:`SEND_AFTER_S` after both: the whole
    answer, after which the server wrote the end of the stream and went on reading (a reset,
    on a send or a read, fails). Then the client closes its side and the server closes too
    (no reset)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(first)
        sock.setblocking(False)
        answer, sent = b"", 0
        answered_at: float | None = None
        eof, eof_at = False, None
        started = time.monotonic()
        while time.monotonic() - started < 30:
            try:
                chunk = sock.recv(65536)  # (a reset here fails the test)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                eof = True
            elif chunk:
                answer += chunk
                if answered_at is None and whole(answer):
                    answered_at = time.monotonic()
                continue
            if eof_at is None and eof:
                eof_at = time.monotonic()
            if (answered_at is not None and eof_at is not None
                    and time.monotonic() - max(answered_at, eof_at) > SEND_AFTER_S):
                break
            assert sent < len(more), "ran out of bytes to send before the answer"
            sock.send(more[sent:sent + 16])  # (a reset here fails the test too)
            sent += 16
            time.sleep(0.05)
        assert answered_at is not None, answer[:300]
        assert eof, "no end of the stream after the answer"
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    return answer


def status_and_problem(answer: bytes, keep_alive: bool = False
                       ) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert (b"\r\nconnection: close\r\n" in head.lower() + b"\r\n") is not keep_alive, head
    problem = json.loads(body)
    return int(head.split(b" ", 2)[1]), problem


FILLER = b"a" * 100_000


def test_a_head_not_complete_in_time_gets_its_408_though_the_client_sends_on(
        live: tuple[LiveServer, str]) -> None:
    server, url = live
    first = b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nX-Pad: "
    status, problem = status_and_problem(answer_while_sending(url, first, FILLER))
    assert (status, problem["code"], problem["field"]) == (408, "request_timeout", "headers")
    wait_no_lingering(server)


def test_a_malformed_head_gets_its_400_though_the_client_sends_its_body(
        live: tuple[LiveServer, str]) -> None:
    server, url = live
    first = (b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
             b"Content-Length: 12x\r\n\r\n")
    status, problem = status_and_problem(answer_while_sending(url, first, FILLER))
    assert (status, problem["code"], problem["field"]) == (400, "malformed_http",
                                                           "Content-Length")
    wait_no_lingering(server)


def test_a_head_too_large_gets_its_431_though_the_client_sends_on(
        live: tuple[LiveServer, str]) -> None:
    server, url = live
    # past both protocols' bounds (OPTSERVE_MAX_HEAD_KB's 64 KiB, h11's 16 KiB)
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    first = b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\n" + pad
    status, problem = status_and_problem(answer_while_sending(url, first, FILLER))
    assert (status, problem["code"], problem["field"]) == (431, "headers_too_large", "headers")
    wait_no_lingering(server)


def test_an_unmet_expectation_gets_its_417_though_the_client_sends_its_body(
        live: tuple[LiveServer, str]) -> None:
    server, url = live
    first = (b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n"
             b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    status, problem = status_and_problem(answer_while_sending(url, first, FILLER))
    assert (status, problem["code"], problem["field"]) == (417, "expectation_failed", "Expect")
    wait_no_lingering(server)


@pytest.mark.parametrize("version,connection", [("1.1", "Connection: close\r\n"),
                                                ("1.0", "")], ids=["close", "http1.0"])
def test_an_early_413_to_a_client_that_asked_to_close_lingers(
        live: tuple[LiveServer, str], version: str, connection: str) -> None:
    """A body announced past the limit is refused at once; a client that asked to close has
    its connection closed after the answer, its body still being sent."""
    server, url = live
    first = (f"POST /v1/sessions HTTP/{version}\r\nHost: a\r\n{connection}"
             f"Content-Type: application/json\r\nContent-Length: {100 << 20}\r\n\r\n").encode()
    status, problem = status_and_problem(answer_while_sending(url, first, FILLER))
    assert (status, problem["code"], problem["field"]) == (413, "payload_too_large", "body")
    wait_no_lingering(server)


def test_a_body_still_arriving_when_the_head_clock_runs_out_lingers(
        live: tuple[LiveServer, str]) -> None:
    """A 404 at once for a request whose body the app never reads, its rest small enough to
    keep the connection alive (``lingering_close.KEEP_ALIVE_REST``): the server reads on and
    drops the body, so as to read the next request after it, and gives the next head
    :data:`HEAD_TIMEOUT_S` from the answer. A body still arriving then is closed (not an idle
    connection: its client is sending), after a linger. (A larger rest closes the connection
    at once, as a 413 does: ``test_early_answer_upload_linger``,
    ``test_refused_upload_linger``.)"""
    server, url = live
    first = (f"POST /v1/no-such-route HTTP/1.1\r\nHost: a\r\n"
             f"Content-Type: application/json\r\nContent-Length: {60_000}\r\n\r\n").encode()
    answer = answer_while_sending(url, first, FILLER)
    status, problem = status_and_problem(answer, keep_alive=True)
    assert (status, problem["code"]) == (404, "not_found"), problem
    wait_no_lingering(server)


def test_nothing_lingers_where_nothing_more_can_arrive(live: tuple[LiveServer, str]) -> None:
    """A whole request whose client asked to close, and a connection that sent nothing in the
    head timeout, are closed at once: no lingering connection is counted."""
    server, url = live
    wait_no_lingering(server)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 422"), answer[:300]
        assert lingering(server) == 0  # (the socket still open: a lingering one counts)
    with socket.create_connection((host, int(port)), timeout=HEAD_TIMEOUT_S + 10) as sock:
        assert sock.recv(100) == b""  # (the head timeout: closed, no answer)
        assert lingering(server) == 0


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_client_gone_while_its_connection_lingers_is_let_go_at_once(
        live: tuple[LiveServer, str], how: str) -> None:
    """A client that resets its connection, or closes it whole, while the server lingers
    after its 400: the lingering connection is let go then (not :data:`LINGER_S` later), and
    the server goes on serving."""
    server, url = live
    wait_no_lingering(server)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Length: 12x\r\n\r\n")
    answer = b""
    while chunk := sock.recv(65536):  # (the answer, then the end of the stream)
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and whole(answer), answer[:300]
    assert lingering(server) == 1  # (counted before the end of the stream was written)
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone = time.monotonic()
    sock.close()
    while lingering(server):
        assert time.monotonic() - gone < LINGER_S - 1, "still lingering"
        time.sleep(0.02)
    with socket.create_connection((host, int(port)), timeout=10) as again:
        again.sendall(b"GET /v1/sessions HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert again.recv(100).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_a_server_shutting_down_does_not_wait_for_its_lingering_connections(
        protocol: str) -> None:
    """uvicorn's graceful shutdown closes a lingering connection at once (it waits for every
    connection to close): it does not wait out the linger (30 s here)."""
    http = problem_protocol(protocol)
    linger_s = 30.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_cap, "LINGER_S", linger_s)
        server = LiveServer(_test_settings(), http=http)
        url = server.start()
        host, port = url.removeprefix("http://").split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n")
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 400") and lingering(server) == 1, answer
                stopping = time.monotonic()
                server.stop()
                assert not server.thread.is_alive()
                assert time.monotonic() - stopping < linger_s / 2
                assert lingering(server) == 0
        finally:
            server.stop()
