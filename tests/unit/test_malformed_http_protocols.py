"""app.api.malformed_http without a server: ``python -m app`` gives uvicorn the problem+json
protocol; its h11 fallback (uvicorn's choice where httptools is not installed) answers a
refused request in problem+json too, 431 for a header section past h11's buffer; and where
the override cannot work, uvicorn's own ``text/plain`` answer is what is sent. The protocols
are uvicorn's own, fed bytes through a transport that records what they write (the httptools
one against a real server: tests/integration/test_malformed_http.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

import app.api.malformed_http as malformed_http
from app.__main__ import server_config
from app.api import connection_cap
from app.api.connection_cap import ConnectionSlots
from app.config import Settings


class Transport(asyncio.Transport):
    """Records what the protocol writes and whether it closed the connection; closed, it
    tells the protocol the connection is lost on the loop's next turn, as asyncio's do."""

    def __init__(self, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.protocol = protocol
        self.loop = loop
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name,
                                                                                      default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += bytes(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0  # (every write taken at once)

    # (a lingering close half-closes and hands the connection to a drain, as on a socket)
    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
def loop(caplog: pytest.LogCaptureFixture) -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    # the app's task of a request refused in its body (its headers were read): it ends on
    # the disconnect the closed transport gives it
    tasks = asyncio.all_tasks(loop)
    if tasks:
        _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=10))
        assert not pending
    loop.close()
    failures = [r.getMessage() for when in ("call", "teardown") for r in caplog.get_records(when)
                if r.name.startswith("uvicorn") and r.levelno >= logging.ERROR]
    assert not failures  # an app's task that failed (a write after close, ...)


def feed(protocol_class: Any, data: bytes, loop: asyncio.AbstractEventLoop,
         app: FastAPI | None = None) -> Transport:
    # log_config=None: uvicorn leaves this process's logging as it is
    config = uvicorn.Config(app or FastAPI(), http=protocol_class, log_config=None)
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={},
                              _loop=loop)
    transport = Transport(protocol, loop)
    protocol.connection_made(transport)
    if data:  # (asyncio never passes b"": to h11 it is the end of the connection)
        protocol.data_received(data)
    return transport


def answer(transport: Transport) -> tuple[int, dict[str, str], bytes]:
    head, _, body = transport.written.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def test_python_m_app_serves_with_the_problem_protocol() -> None:
    settings = Settings(device="cpu", data_dir=Path(tempfile.mkdtemp(prefix="optserve-test-")))
    config = server_config(FastAPI(), settings)
    config.load()
    assert config.http_protocol_class is malformed_http.PROBLEM_HTTPTOOLS
    assert issubclass(config.http_protocol_class, HttpToolsProtocol)



def request_id_checked(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The problem without its ``request_id``, which must be the ``X-Request-Id`` header's (an
    answer written before the request was read has an id of its own, as every answer does)."""
    problem: dict[str, Any] = json.loads(body)
    rid = problem.pop("request_id")
    assert rid == headers["x-request-id"] and len(rid) == 32, (rid, headers)
    return problem

@pytest.mark.parametrize(("raw", "field", "reason"), [
    (b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
     "Content-Length", "bad Content-Length"),
    (b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
     "Content-Length", "conflicting Content-Length headers"),
    (b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "body", "illegal chunk header: bytearray(b'zz\\r\\n')"),
    (b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Name: 1\r\n\r\n",
     "headers", "illegal header line: bytearray(b'Bad Name: 1')"),
    (b"GET /healthz HTTP/1.1\r\n\r\n", "Host", "Missing mandatory Host: header"),
    (b"NOT HTTP\r\n\r\n", "request-line", "illegal request line: bytearray(b'NOT HTTP')"),
])
def test_h11_refusals_are_problems(loop: asyncio.AbstractEventLoop, raw: bytes, field: str,
                                   reason: str) -> None:
    assert malformed_http.PROBLEM_H11 is not None
    transport = feed(malformed_http.PROBLEM_H11, raw, loop)
    status, headers, body = answer(transport)
    assert transport.closed
    assert (status, headers["content-type"], headers["connection"]) == (
        400, "application/problem+json", "close")
    assert int(headers["content-length"]) == len(body)
    problem = json.loads(body)
    assert (problem["type"], problem["code"], problem["status"], problem["field"]) == (
        "urn:optserve:problem:malformed_http", "malformed_http", 400, field)
    assert problem["detail"].startswith(f"{reason}: {malformed_http._HINTS[field]}; ")


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_the_app_answering_a_request_refused_in_its_body_writes_nothing_after(
        loop: asyncio.AbstractEventLoop, protocol: str) -> None:
    """The app had the request's headers (a route that does not read the body: 404 at once);
    its answer is not written after the refusal, nor fails on the closed connection (the
    loop fixture fails on an error uvicorn logs)."""
    cls = malformed_http.PROBLEM_HTTPTOOLS if protocol == "httptools" else \
        malformed_http.PROBLEM_H11
    transport = feed(cls, b"POST /nowhere HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                          b"\r\n\r\nzz\r\n", loop)
    written = transport.written
    loop.run_until_complete(asyncio.wait(asyncio.all_tasks(loop), timeout=10))
    assert transport.closed and transport.written == written
    status, headers, body = answer(transport)
    assert (status, headers["content-type"], json.loads(body)["field"]) == (
        400, "application/problem+json", "body")


def test_h11_headers_past_its_buffer_are_a_431(loop: asyncio.AbstractEventLoop) -> None:
    raw = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000
    transport = feed(malformed_http.PROBLEM_H11, raw, loop)
    status, headers, body = answer(transport)
    assert transport.closed
    assert (status, headers["content-type"]) == (431, "application/problem+json")
    problem = json.loads(body)
    assert (problem["code"], problem["status"], problem["field"]) == (
        "headers_too_large", 431, "headers")
    assert problem["detail"] == ("Receive buffer too long: the request line and headers take "
                                 "at most 16 KiB; the connection is closed")
    assert len(body) == int(headers["content-length"]) < 400  # the 20,000 bytes not echoed


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_a_refusal_pipelined_after_a_request_comes_after_its_answer(
        loop: asyncio.AbstractEventLoop, protocol: str) -> None:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        await asyncio.sleep(0.01)  # answered after the garbage behind it was read
        return {"hello": "world"}

    cls = malformed_http.PROBLEM_HTTPTOOLS if protocol == "httptools" else \
        malformed_http.PROBLEM_H11
    transport = feed(cls, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nNOT HTTP\r\n\r\n", loop,
                     app)
    assert transport.written == b"" and not transport.closed
    loop.run_until_complete(asyncio.wait(asyncio.all_tasks(loop), timeout=10))
    assert transport.closed
    first, _, rest = transport.written.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b'{"hello":"world"}HTTP/1.1 400')
    transport.written = rest.removeprefix(b'{"hello":"world"}')
    status, headers, body = answer(transport)
    assert (status, headers["content-type"], json.loads(body)["field"]) == (
        400, "application/problem+json", "request-line")


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_an_answer_that_cannot_be_built_is_uvicorns(loop: asyncio.AbstractEventLoop,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    protocol: str) -> None:
    def broken(exc: BaseException | None) -> tuple[int, bytes]:
        raise RuntimeError("broken")

    monkeypatch.setattr(malformed_http, "problem_body", broken)
    cls = malformed_http.PROBLEM_HTTPTOOLS if protocol == "httptools" else \
        malformed_http.PROBLEM_H11
    transport = feed(cls, b"NOT HTTP\r\n\r\n", loop)
    status, headers, body = answer(transport)
    assert (status, headers["content-type"], body) == (
        400, "text/plain; charset=utf-8", b"Invalid HTTP request received.")
    assert transport.closed


def test_a_uvicorn_without_send_400_response_keeps_its_own(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "send_400_response")
    monkeypatch.delattr(H11Protocol, "send_400_response")
    monkeypatch.setattr(malformed_http, "PROBLEM_HTTPTOOLS", malformed_http._protocols()[0])
    monkeypatch.setattr(malformed_http, "PROBLEM_H11", malformed_http._protocols()[1])
    assert malformed_http.http_protocol() == "auto"


def bounded_app(**bounds: float) -> FastAPI:
    """An app whose settings bound request heads (``head_timeout_s``, ``max_head_kb``,
    ``max_headers``), with a route answering after 0.2 s."""
    app = FastAPI()
    app.state.settings = Settings(**bounds)  # type: ignore[arg-type]

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(0.2)
        return {"hello": "world"}

    return app


PROTOCOLS = ["httptools", "h11"]


def protocol_class(name: str) -> Any:
    return malformed_http.PROBLEM_HTTPTOOLS if name == "httptools" else malformed_http.PROBLEM_H11


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_head_not_complete_in_time_gets_a_408(loop: asyncio.AbstractEventLoop,
                                                protocol: str) -> None:
    transport = feed(protocol_class(protocol), b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\n",
                     loop, bounded_app(head_timeout_s=0.05))
    loop.run_until_complete(asyncio.sleep(0.02))
    assert transport.written == b"" and not transport.closed
    loop.run_until_complete(asyncio.sleep(0.1))
    assert transport.closed
    status, headers, body = answer(transport)
    assert (status, headers["content-type"], headers["connection"]) == (
        408, "application/problem+json", "close")
    assert int(headers["content-length"]) == len(body)
    assert request_id_checked(headers, body) == {
        "type": "urn:optserve:problem:request_timeout", "title": "Request timeout",
        "status": 408, "code": "request_timeout", "field": "headers",
        "detail": "the request line and headers were not complete within 0.05 s "
                  "(OPTSERVE_HEAD_TIMEOUT_S); the connection is closed"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_connection_that_sends_nothing_is_closed_unanswered(
        loop: asyncio.AbstractEventLoop, protocol: str) -> None:
    transport = feed(protocol_class(protocol), b"", loop, bounded_app(head_timeout_s=0.05))
    loop.run_until_complete(asyncio.sleep(0.1))
    assert transport.closed and transport.written == b""


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_head_clock_stops_at_a_read_head_and_restarts_after_its_answer(
        loop: asyncio.AbstractEventLoop, protocol: str) -> None:
    """A request answered 0.2 s after its head (4 head timeouts) is answered; the clock of the
    next head on the connection runs from that answer's end."""
    cls = protocol_class(protocol)
    transport = feed(cls, b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n", loop,
                     bounded_app(head_timeout_s=0.05))
    started = loop.time()
    while not transport.written.endswith(b"}") and loop.time() < started + 5:
        loop.run_until_complete(asyncio.sleep(0.005))
    assert loop.time() - started >= 0.2 and not transport.closed
    status, _, body = answer(transport)
    assert (status, json.loads(body)) == (200, {"hello": "world"})
    transport.written = b""
    protocol_object = transport.protocol
    protocol_object.data_received(b"GET /slow HTTP/1.1\r\n")
    loop.run_until_complete(asyncio.sleep(0.1))
    assert transport.closed
    assert answer(transport)[0] == 408


@pytest.mark.parametrize(("raw", "detail"), [
    (b"GET /slow HTTP/1.1\r\nHost: t\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
     "more than 3 header lines (OPTSERVE_MAX_HEADERS)"),
    (b"GET /slow HTTP/1.1\r\nHost: t\r\nA: " + b"a" * 1024 + b"\r\n\r\n",
     "the request line and headers take more than 1 KiB (OPTSERVE_MAX_HEAD_KB)"),
    (b"GET /slow?" + b"a" * 1024 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
     "the request line and headers take more than 1 KiB (OPTSERVE_MAX_HEAD_KB)"),
], ids=["header-lines", "header-bytes", "url-bytes"])
def test_httptools_heads_past_their_bounds_are_a_431(loop: asyncio.AbstractEventLoop,
                                                     raw: bytes, detail: str) -> None:
    transport = feed(malformed_http.PROBLEM_HTTPTOOLS, raw, loop,
                     bounded_app(max_head_kb=1, max_headers=3))
    assert transport.closed
    status, headers, body = answer(transport)
    assert (status, headers["content-type"]) == (431, "application/problem+json")
    assert request_id_checked(headers, body) == {
        "type": "urn:optserve:problem:headers_too_large",
        "title": "Request header fields too large", "status": 431,
        "code": "headers_too_large", "field": "headers",
        "detail": f"{detail}; the connection is closed"}


def test_httptools_a_header_line_read_in_pieces_past_the_bound_is_a_431(
        loop: asyncio.AbstractEventLoop) -> None:
    """httptools keeps a header line until it ends: the bytes read inside a head count."""
    transport = feed(malformed_http.PROBLEM_HTTPTOOLS, b"GET /slow HTTP/1.1\r\nHost: t\r\nA: ",
                     loop, bounded_app(max_head_kb=1))
    for _ in range(3):
        transport.protocol.data_received(b"a" * 300)
    assert not transport.closed  # 900 bytes read in pieces wholly inside the head
    transport.protocol.data_received(b"a" * 300)
    assert transport.closed
    assert answer(transport)[0] == 431


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_connection_past_the_bound_is_answered_503_and_closed(
        loop: asyncio.AbstractEventLoop, protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both protocols count their connections in the app's ``ConnectionSlots`` (shared with
    the same-host transport): past the bound a connection gets a 503 ``too_many_connections``
    problem at once, what it sends is dropped (never parsed, never answered again), and it
    is closed after the linger; a connection closing gives its slot back."""
    monkeypatch.setattr(connection_cap, "LINGER_S", 0.05)
    app = FastAPI()
    app.state.connections = slots = ConnectionSlots(1)
    first = feed(protocol_class(protocol), b"", loop, app)
    assert (slots.open, first.written, first.closed) == (1, b"", False)
    refused = feed(protocol_class(protocol), b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
                   loop, app)
    status, headers, body = answer(refused)
    assert (status, headers["content-type"], headers["connection"], headers["retry-after"]) == (
        503, "application/problem+json", "close", "1")
    assert int(headers["content-length"]) == len(body)
    assert request_id_checked(headers, body) == {
        "type": "urn:optserve:problem:too_many_connections", "title": "Too many connections",
        "status": 503, "code": "too_many_connections",
        "detail": "the server holds its most connections (1, OPTSERVE_MAX_CONNECTIONS); retry "
                  "after 1 s; the connection is closed"}
    assert (slots.open, slots.lingering) == (1, 1)
    written = refused.written
    refused.protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    loop.run_until_complete(asyncio.sleep(0.1))
    assert refused.closed and refused.written == written
    assert (slots.open, slots.lingering) == (1, 0)
    first.close()
    loop.run_until_complete(asyncio.sleep(0))
    assert slots.open == 0
    third = feed(protocol_class(protocol), b"", loop, app)
    assert (slots.open, third.written, third.closed) == (1, b"", False)
    third.close()
    loop.run_until_complete(asyncio.sleep(0))


def test_plain_head_leaves_out_what_asks_for_another_protocol() -> None:
    """The head a request asking to upgrade is read again with: the request line as read, every
    header but ``Upgrade`` and ``HTTP2-Settings``, ``Connection`` less those tokens (gone when
    nothing else is left in it)."""
    import httptools

    from app.api.malformed_http import plain_head

    class Heads:
        url = b""

        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

    for connection, kept in [(b"keep-alive, Upgrade, HTTP2-Settings", b"connection: keep-alive"),
                             (b"Upgrade", None)]:
        heads = Heads()
        parser = httptools.HttpRequestParser(heads)
        with pytest.raises(httptools.HttpParserUpgrade):
            parser.feed_data(b"POST /v1/sessions?x=1 HTTP/1.1\r\nHost: t\r\nConnection: "
                             + connection + b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
        head = plain_head(parser, heads.url, heads.headers)
        expected = [b"POST /v1/sessions?x=1 HTTP/1.1", b"host: t"]
        expected += [kept] if kept else []
        assert head == b"\r\n".join([*expected, b"content-length: 2", b"", b""])


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_a_client_that_half_closes_after_its_request_reads_its_answer(
        loop: asyncio.AbstractEventLoop, protocol: str) -> None:
    """``shutdown(SHUT_WR)`` after a whole request (``nc -N`` does it at the end of its input):
    the transport stays open for the answer, which is written whole, and then closes. uvicorn
    closed it at once: the request ran and its answer was lost. One half-closed inside its
    body is a 400 naming ``Content-Length`` (it was closed with no answer)."""
    cls = malformed_http.PROBLEM_HTTPTOOLS if protocol == "httptools" else \
        malformed_http.PROBLEM_H11
    app = FastAPI()
    ran: list[bytes] = []

    @app.post("/slow")
    async def slow(request: Request) -> dict[str, int]:
        try:
            body = await request.body()
        except ClientDisconnect:
            ran.append(b"gone")
            return {"got": -1}
        await asyncio.sleep(0.05)  # (the answer is owed when the end of the input arrives)
        ran.append(body)
        return {"got": len(body)}

    transport = feed(cls, b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
                     loop, app)
    assert transport.protocol.eof_received() is True  # (kept open for the answer)
    assert not transport.closed
    loop.run_until_complete(asyncio.wait(asyncio.all_tasks(loop), timeout=10))
    status, headers, body = answer(transport)
    assert (status, json.loads(body), ran) == (200, {"got": 3}, [b"abc"])
    assert transport.closed  # (then closed: nothing more can come)
    # the end of the input inside a body: a 400 naming Content-Length, the request gone (its
    # app told its client is gone, its own answer not written), the connection closed
    transport = feed(cls, b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\nabc",
                     loop, app)
    assert not transport.protocol.eof_received()
    assert transport.closed
    loop.run_until_complete(asyncio.wait(asyncio.all_tasks(loop), timeout=10))
    status, headers, body = answer(transport)
    assert (status, headers["connection"], ran) == (400, "close", [b"abc", b"gone"])
    assert (json.loads(body)["code"], json.loads(body)["field"]) == (
        "malformed_http", "Content-Length")
    assert transport.written.count(b"HTTP/1.1 ") == 1  # (nothing after it)
