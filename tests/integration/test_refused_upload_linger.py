"""A 413 answered early while its client uploads the body (a ``Content-Length`` past
``OPTSERVE_MAX_BODY_MB``, or a chunked body as it passes it) closes the connection
(``Connection: close``) and lingers as nginx's lingering close does
(:mod:`app.api.lingering_close`): what arrives is dropped until the client closes its side,
for ``connection_cap.UPLOAD_LINGER_S`` in all at most, and closed once nothing arrived for
``connection_cap.UPLOAD_QUIET_S``. A client that reads its answer only after its last byte,
uploading for longer than the next head's clock plus the short linger (kept alive, the body
was read and dropped until then, and the close met the client's next bytes with a reset),
reads its whole 413 problem and then the end of the stream. Over raw sockets against real
uvicorn servers on 127.0.0.1, with each HTTP protocol ``python -m app`` may use; the bounds
are shortened here (the head clock to 1 s, the upload's linger to :data:`TOTAL_S` and
:data:`QUIET_S`), with margins for a loaded machine."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from app.api import connection_cap
from app.config import Settings
from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol

# waits on real clocks most of its time: run beside the Ray suite (scripts/test)
pytestmark = [pytest.mark.integration, pytest.mark.clock]

HEAD_TIMEOUT_S = 1.0
#: the upload's linger in all, and without bytes (shortened from 30 s and 5 s)
TOTAL_S = 10.0
QUIET_S = 3.0
#: how long the slow upload takes: past the 1 s head clock plus the 1 s short linger that a
#: body kept alive met, well within TOTAL_S
UPLOAD_S = 4.5
MAX_BODY_MB = 0.05  # 52,428 bytes
BODY = 200_000
PIECES = 100


@contextmanager
def lingering_server(settings: Settings, protocol: str, total_s: float, quiet_s: float
                     ) -> Iterator[tuple[LiveServer, str]]:
    """A server of ``protocol`` (a name of ``HTTP_PROTOCOLS``) whose uploads' lingers are
    shortened to ``total_s`` in all and ``quiet_s`` without bytes; it and its URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_cap, "UPLOAD_LINGER_S", total_s)
        patch.setattr(connection_cap, "UPLOAD_QUIET_S", quiet_s)
        server = LiveServer(settings, http=problem_protocol(protocol))
        with server.serving() as url:
            yield server, url


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def live(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    settings = _test_settings(head_timeout_s=HEAD_TIMEOUT_S, max_body_mb=MAX_BODY_MB)
    with lingering_server(settings, request.param, TOTAL_S, QUIET_S) as served:
        yield served


def lingering(server: LiveServer) -> int:
    return int(server.app.state.connections.lingering)


def wait_no_lingering(server: LiveServer, within: float) -> float:
    """Until no connection lingers: when that was (monotonic)."""
    deadline = time.monotonic() + within
    while lingering(server):
        assert time.monotonic() < deadline, lingering(server)
        time.sleep(0.02)
    return time.monotonic()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def head(chunked: bool) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY}"
    return (f"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n").encode()


def pieces(chunked: bool) -> list[bytes]:
    """The body in :data:`PIECES` pieces (chunks of a chunked body, its end in the last)."""
    size = BODY // PIECES
    if not chunked:
        return [b"a" * size] * PIECES
    chunk = b"%x\r\n%s\r\n" % (size, b"a" * size)
    return [chunk] * (PIECES - 1) + [chunk + b"0\r\n\r\n"]


def read_to_end(sock: socket.socket) -> bytes:
    """What the server sent, to the end of its stream (a reset raises)."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def the_413(answer: bytes) -> dict[str, object]:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"\r\nconnection: close\r\n" in head_part.lower() + b"\r\n", head_part
    length = next(int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    assert len(body) == length, answer[:300]
    problem = json.loads(body)
    assert (problem["status"], problem["code"], problem["field"]) == (
        413, "payload_too_large", "body"), problem
    return dict(problem)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_slow_upload_past_the_limit_reads_its_413_after_its_last_byte(
        live: tuple[LiveServer, str], chunked: bool) -> None:
    """The client sends its whole body over :data:`UPLOAD_S` without reading (as upload code
    does), then reads: the whole 413 problem, then the end of the stream, no reset; and the
    server closes once the client closes its side."""
    server, url = live
    wait_no_lingering(server, TOTAL_S + 10)
    with connect(url) as sock:
        sock.sendall(head(chunked))
        started = time.monotonic()
        for piece in pieces(chunked):
            sock.sendall(piece)  # (a reset here fails the test)
            time.sleep(UPLOAD_S / PIECES)
        assert time.monotonic() - started > 2 * HEAD_TIMEOUT_S + connection_cap.LINGER_S
        the_413(read_to_end(sock))  # (a reset here fails the test)
        assert lingering(server) == 1  # (still counted: the client has not closed)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    wait_no_lingering(server, 10)


def test_a_client_that_stops_sending_is_closed_after_the_quiet_period(
        live: tuple[LiveServer, str]) -> None:
    """The client sends a part of its body and then nothing, without closing: the server
    closes about :data:`QUIET_S` after the last bytes (well before :data:`TOTAL_S`)."""
    server, url = live
    wait_no_lingering(server, TOTAL_S + 10)
    with connect(url) as sock:
        sock.sendall(head(False))
        body = pieces(False)
        for piece in body[:5]:
            sock.sendall(piece)
            time.sleep(0.05)
        last_sent = time.monotonic()
        # (the answer and the end of the stream come as the linger begins)
        the_413(read_to_end(sock))
        assert lingering(server) == 1
        closed_at = wait_no_lingering(server, QUIET_S + 10)
        # (the server's quiet clock runs from the last bytes it read, after they were sent)
        assert closed_at - last_sent >= QUIET_S - 0.1, closed_at - last_sent
        assert closed_at - last_sent < TOTAL_S - 2, closed_at - last_sent


def test_a_sender_that_never_ends_is_closed_after_the_total_bound(
        live: tuple[LiveServer, str]) -> None:
    """The client sends on and on after its answer (never its last byte, never closing):
    the server closes for good about :data:`TOTAL_S` after the answer, its bytes meeting a
    reset from then on."""
    server, url = live
    wait_no_lingering(server, TOTAL_S + 10)
    with connect(url) as sock:
        sock.sendall(head(True))
        chunk = b"%x\r\n%s\r\n" % (1000, b"a" * 1000)
        started = time.monotonic()
        answer, eof, reset_at = b"", False, None
        sock.setblocking(False)
        while time.monotonic() - started < TOTAL_S + 20:
            try:
                sock.send(chunk)
                if not eof:
                    data = sock.recv(65536)
                    answer += data
                    eof = not data
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                reset_at = time.monotonic()
                break
            time.sleep(0.05)
        assert reset_at is not None, "the connection was never closed"
        assert eof, answer[:300]
        the_413(answer)
        # (the answer came at once, as the linger began)
        assert TOTAL_S - 1 < reset_at - started < TOTAL_S + 8, reset_at - started
    wait_no_lingering(server, 10)


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_a_server_shutting_down_does_not_wait_for_a_refused_upload(protocol: str) -> None:
    """uvicorn's graceful shutdown closes a connection lingering after its 413 at once: it
    does not wait out the upload's linger (30 s, its client sending on)."""
    http = problem_protocol(protocol)
    server = LiveServer(_test_settings(max_body_mb=MAX_BODY_MB), http=http)
    url = server.start()
    try:
        with connect(url) as sock:
            sock.sendall(head(False))
            for piece in pieces(False)[:5]:
                sock.sendall(piece)
            the_413(read_to_end(sock))
            assert lingering(server) == 1
            sock.sendall(pieces(False)[5])  # (still sending as the server stops)
            stopping = time.monotonic()
            server.stop()
            assert not server.thread.is_alive()
            assert time.monotonic() - stopping < connection_cap.UPLOAD_LINGER_S / 2
            assert lingering(server) == 0
    finally:
        server.stop()
