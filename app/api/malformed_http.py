"""uvicorn's HTTP/1.1 protocols, answering a request their parser refuses with problem+json.

A request line, header section or chunked body that is not HTTP/1.1 (``Content-Length: -5``,
two different ``Content-Length`` lines, a chunk size that is not hex, a header name with a
space, ...) never reaches the app: uvicorn answers it itself, ``400`` in ``text/plain``
("Invalid HTTP request received."). These subclasses answer it as every other bad input is
answered: a 400 ``malformed_http`` problem naming the part the parser refused (``field``:
``Content-Length``, ``Transfer-Encoding``, ``request-line``, ``request-target`` (an
absolute-form target with userinfo, :func:`~app.api.request_head_checks.target_problem`),
``headers``, ``Host`` or ``body``)
and its reason, then close the connection, as uvicorn does. Both also refuse what one of them
took: a request line's HTTP version other than HTTP/1 (a 505 ``http_version_not_supported``,
HTTP/0.9 a 400; ``HTTP/1.2`` is served as 1.1), and a bare LF line end or an obsolete line
folding in a head (:mod:`app.api.request_head_checks`), and a client that closes its sending
side inside a request's body reads a 400 naming ``Content-Length`` (``body`` when chunked)
before the close (:func:`_answer_cut_body`). A refused request pipelined behind ones
still being answered is refused after their answers (uvicorn's answer took the first one's
place). ``python -m app`` serves with :func:`http_protocol`.

They also bound the request head, which uvicorn does not (its keep-alive timeout runs only
between an answer and the next request's first byte): a request line and headers not complete
within ``OPTSERVE_HEAD_TIMEOUT_S`` (10 s) of the connection's start or of its previous answer's
end get a 408 ``request_timeout`` problem (``field``: ``headers``) and the connection is
closed; a connection that sent no byte of a request in that time is closed without an answer
(there is no request to answer, and a 408 written as a client sends one would read as its
answer). Each answer here closes the connection while its client may still be sending (the
rest of its head, a body after it), and so does the head clock running out on the body of a
request answered early that is still arriving (its rest small, the connection kept alive:
``lingering_close.guard_early_answers``): the close lingers (:mod:`app.api.lingering_close`),
so that the answer is not lost to a reset. A head past ``OPTSERVE_MAX_HEAD_KB`` (64 KiB) or
with more than ``OPTSERVE_MAX_HEADERS`` (200) header lines gets a 431 ``headers_too_large``
(httptools has no bound; h11 has its own 16 KiB one for a head it holds unparsed, and none for
one that arrives whole).
The clock stops once a head is read: a body's own bound is
``OPTSERVE_BODY_TIMEOUT_S`` (app.api.bodies), and a long poll or an LBFGS step waits as long
as its request says. The bounds are the served app's settings (``app.state.settings``; the
defaults here where it has none). An answer the client takes none of for
``OPTSERVE_BODY_TIMEOUT_S`` drops the connection (:mod:`app.api.send_clock`).

They override uvicorn's ``send_400_response``, which it calls inside the ``except`` of the
parser's error (that error is read from there), and read the state of the request being
answered where uvicorn keeps it (its ``cycle``), each with a default where it is missing. Where
the installed uvicorn has no such method :func:`http_protocol` gives ``"auto"`` (uvicorn's own
plain-text answer), and an answer that cannot be built falls back to uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import re
import sys
import uuid
from typing import Any

import orjson

from app.api import connection_cap, lingering_close
from app.api.body_sink import CLOSE_AFTER, SinkingProtocol
from app.api.held_head import hold_head
from app.api.problems import PROBLEM
from app.api.request_head_checks import (
    connect_detail,
    empty_lines,
    head_line_problem,
    origin_form,
    target_problem,
    version_problem,
)
from app.api.send_clock import SendClock

log = logging.getLogger("optserve.api")

#: what the client must fix, by the part of the request the parser refused
_HINTS = {
    "Content-Length": "Content-Length is the body's length in bytes, digits only, given once",
    "Transfer-Encoding": "the only transfer coding taken is chunked, never with Content-Length",
    "body": "a chunked body is chunks of a hex size, CRLF, the data, CRLF, ending with a "
            "zero-size chunk",
    "request-line": "the first line is METHOD /path HTTP/1.1",
    "headers": "each header line is name: value, the name letters, digits and !#$%&'*+-.^_`|~ "
               "only",
    "Host": "an HTTP/1.1 request names its Host once",
}
#: the parsers' words for each part: the first that a reason contains names its ``field``
_PARTS = (("transfer-encoding", "Transfer-Encoding"), ("content-length", "Content-Length"),
          ("chunk", "body"), ("host:", "Host"), ("header", "headers"),
          ("request line", "request-line"), ("method", "request-line"),
          ("url", "request-line"), ("version", "request-line"), ("http/", "request-line"))
#: llhttp's reasons for a bare LF line end or an obsolete line folding in a request head
_LINE_END_ERRORS = re.compile(r"(?i)whitespace|expected cr|expected crlf|expected lf|"
                              r"invalid header field char|unexpected space")
#: the longest reason shown: h11's quote the refused line
_REASON_CHARS = 200
#: the request head's bounds where the served app has no settings (``OPTSERVE_HEAD_TIMEOUT_S``,
#: ``OPTSERVE_MAX_HEAD_KB``, ``OPTSERVE_MAX_HEADERS``)
HEAD_TIMEOUT_S = 10.0
MAX_HEAD_KB = 64
MAX_HEADERS = 200


class UnsupportedVersion(Exception):
    """A request's HTTP version this server does not serve
    (:func:`~app.api.request_head_checks.version_problem`: 505, or 400 for HTTP/0.9); raised in
    a parser callback (or as the cause of h11's error), it stops the parser."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class MalformedHead(Exception):
    """A request head with a bare LF line end or an obsolete line folding, which h11 takes
    (:func:`~app.api.request_head_checks.head_line_problem`); the cause of h11's error."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


class HeadTooLarge(Exception):
    """A request head past its bounds; raised in a parser callback, it stops the parser."""


class MalformedTarget(Exception):
    """A request target the parser took and this server refuses
    (:func:`~app.api.request_head_checks.target_problem`); raised in a parser callback (or
    as the cause of h11's error), it stops the parser."""


def head_bounds(config: Any) -> tuple[float, int, int]:
    """The served app's head timeout (s), largest head (bytes) and most header lines."""
    settings = getattr(getattr(getattr(config, "app", None), "state", None), "settings", None)
    return (float(getattr(settings, "head_timeout_s", HEAD_TIMEOUT_S)),
            int(getattr(settings, "max_head_kb", MAX_HEAD_KB)) * 1024,
            int(getattr(settings, "max_headers", MAX_HEADERS)))


def head_timeout_body(timeout: float) -> bytes:
    """The 408 answering a request whose head was not complete within ``timeout`` s."""
    return _encode(408, "Request timeout", code="request_timeout", field="headers",
                   detail=f"the request line and headers were not complete within {timeout:g} s "
                          "(OPTSERVE_HEAD_TIMEOUT_S); the connection is closed")


def connect_refusal_body() -> bytes:
    """The 405 answering a CONNECT to an authority (``example.com:443``), which names no
    route (uvicorn cannot make a path of it): as :mod:`app.api.request_head_checks` answers
    one whose target is a path."""
    return _encode(405, "Method not allowed", code="method_not_allowed", field="method",
                   detail=connect_detail(""))


def raw_answer(status: int, body: bytes, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole problem+json answer with ``Connection: close``, as bytes. It carries a request
    id of its own, in ``X-Request-Id`` and the body's ``request_id``, as every answer does
    (the request was not read: no client id to echo)."""
    body, headers = answer_parts(body, default_headers)
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
    for name, value in headers:
        head += [name, b": ", value, b"\r\n"]
    return b"".join([*head, b"\r\n", body])


def answer_parts(body: bytes, default_headers: list[tuple[bytes, bytes]]
                 ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A refusal's body with a request id of its own (the body's ``request_id``) and its
    headers: the server's defaults, ``X-Request-Id`` with that id, ``Content-Type``,
    ``Content-Length``, ``Connection: close``. Both protocols answer with them (h11's
    answers had no ``X-Request-Id``)."""
    rid = uuid.uuid4().hex.encode()
    if body.endswith(b"}"):  # a problem object (orjson's, compact)
        body = body[:-1] + b',"request_id":"' + rid + b'"}'
    return body, [*default_headers, (b"x-request-id", rid),
                  (b"content-type", PROBLEM.encode()),
                  (b"content-length", str(len(body)).encode()), (b"connection", b"close")]


def problem_body(exc: BaseException | None) -> tuple[int, bytes]:
    """The status and problem+json body answering a request the parser refused with ``exc``
    (None: the reason is unknown). 431 for a head past its bounds (:class:`HeadTooLarge`, under
    httptools the context of its callback error) and where the parser says so (h11: a request
    line and headers past its buffer); every other refusal is a 400."""
    if exc is not None:  # (httptools' wrapper of a callback's error; h11's, of ours)
        exc = next((e for e in (exc.__context__, exc.__cause__)
                    if isinstance(e, (HeadTooLarge, MalformedTarget, UnsupportedVersion,
                                      MalformedHead))), exc)
    if isinstance(exc, UnsupportedVersion) and exc.status == 505:
        return 505, _encode(505, "HTTP version not supported",
                            code="http_version_not_supported", field="request-line",
                            detail=str(exc))
    if isinstance(exc, (UnsupportedVersion, MalformedHead)):
        return 400, _encode(400, "Malformed HTTP request", code="malformed_http",
                            field=getattr(exc, "field", "request-line"), detail=str(exc))
    if isinstance(exc, MalformedTarget):
        return 400, _encode(400, "Malformed HTTP request", code="malformed_http",
                            field="request-target",
                            detail=f"{exc}; the request was not read, the connection is closed")
    if isinstance(exc, HeadTooLarge):
        return 431, _encode(431, "Request header fields too large", code="headers_too_large",
                            field="headers", detail=f"{exc}; the connection is closed")
    reason = (str(exc) or type(exc).__name__) if exc is not None else "unreadable request"
    reason = reason[:_REASON_CHARS]
    if getattr(exc, "error_status_hint", 400) == 431:
        detail = (f"{reason}: the request line and headers take at most 16 KiB; the connection "
                  "is closed")
        return 431, _encode(431, "Request header fields too large", code="headers_too_large",
                            field="headers", detail=detail)
    lowered = reason.lower()
    field = next((part for words, part in _PARTS if words in lowered), None)
    if field is None:  # httptools' own classes for the request line's errors
        name = type(exc).__name__
        field = "request-line" if "Method" in name or "URL" in name else "headers"
    detail = f"{reason}: {_HINTS[field]}; the request was not read, the connection is closed"
    return 400, _encode(400, "Malformed HTTP request", code="malformed_http", field=field,
                        detail=detail)


#: request headers that only ask for another protocol (and its settings): left out of a
#: request served as plain HTTP instead
_UPGRADE_ONLY = frozenset({b"upgrade", b"http2-settings"})


def plain_head(parser: Any, url: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head as read (``headers`` lower-cased, as uvicorn keeps them), less what asks
    for another protocol: the ``Upgrade`` and ``HTTP2-Settings`` headers and those tokens of
    ``Connection`` (a ``Connection`` left empty goes)."""
    lines = [b"%s %s HTTP/%s\r\n" % (parser.get_method(), url,
                                      parser.get_http_version().encode())]
    for name, value in headers:
        if name in _UPGRADE_ONLY:
            continue
        if name == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            value = b", ".join(t for t in tokens if t and t.lower() not in _UPGRADE_ONLY)
            if not value:
                continue
        lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines) + b"\r\n"


def _encode(status: int, title: str, *, code: str, field: str, detail: str) -> bytes:
    return orjson.dumps({"type": f"urn:optserve:problem:{code}", "title": title, "status": status,
                         "detail": detail, "code": code, "field": field})


def _mid_response(protocol: Any) -> bool:
    """Whether the connection's current response has begun and not ended: an answer written
    now would land inside it, so the connection is only closed."""
    cycle = getattr(protocol, "cycle", None)
    return bool(getattr(cycle, "response_started", False)
                and not getattr(cycle, "response_complete", True))


def _answer_owed(protocol: Any) -> bool:
    """The client closed its side of the connection (``shutdown(SHUT_WR)``, as ``nc -N`` does
    at the end of its input) after a whole request whose answer is not written yet: the answer
    still goes out, and then the connection closes (keep-alive off). uvicorn closed the
    transport at once, so the request ran and its answer was lost (a step applied and never
    acknowledged); one half-closed inside its request (its head or body unfinished) is gone
    as before."""
    cycle: Any = getattr(protocol, "cycle", None)
    if (cycle is None or getattr(cycle, "more_body", True)
            or getattr(cycle, "response_complete", True) or getattr(cycle, "disconnected", True)
            or protocol.transport.is_closing()):
        return False
    cycle.keep_alive = False
    return True


def _answer_cut_body(protocol: Any) -> bool:
    """The client closed its side of the connection (``shutdown(SHUT_WR)``) inside a request's
    body, before its ``Content-Length`` (or last chunk) arrived, its answer not begun: a 400
    ``malformed_http`` naming ``Content-Length`` (``body`` for a chunked one), then the close.
    The request's app is told its client is gone, as for a connection lost: nothing of it is
    applied, and its own answer is dropped. uvicorn closed the transport with no answer: a
    client that half-closed can still read, and was left to guess."""
    cycle: Any = getattr(protocol, "cycle", None)
    if (cycle is None or not getattr(cycle, "more_body", False)
            or getattr(cycle, "response_started", True) or getattr(cycle, "disconnected", True)
            or protocol.transport.is_closing()):
        return False
    chunked = any(name == b"transfer-encoding" for name, _ in cycle.scope.get("headers", ()))
    field = "body" if chunked else "Content-Length"
    ended = "before its last chunk" if chunked else "before its Content-Length"
    body = _encode(400, "Malformed HTTP request", code="malformed_http", field=field,
                   detail=f"the request body ended {ended} (the client closed its sending "
                          "side): nothing was applied, the connection is closed")
    protocol.transport.write(raw_answer(400, body, protocol.server_state.default_headers))
    _close(protocol)
    return True


def _close(protocol: Any, linger: bool = False) -> None:
    """Close the connection, and tell the request being read that its client is gone at once,
    as uvicorn does once the loop reports the connection lost: its app, run meanwhile, would
    write an answer after the refusal (h11 refuses that, an error logged per request). With
    ``linger`` (after an answer, or with a body still arriving) the close lingers
    (:mod:`app.api.lingering_close`): its client may still be sending the rest of its
    request, which would turn the close into a reset that loses the answer."""
    cycle: Any = getattr(protocol, "cycle", None)
    if not getattr(cycle, "response_complete", True) and hasattr(cycle, "message_event"):
        cycle.disconnected = True
        cycle.message_event.set()
    if linger:
        lingering_close.arm(protocol)
    protocol.transport.close()
    watch_unsent = getattr(protocol, "watch_unsent", None)
    if watch_unsent is not None:  # (an answer left unsent holds the closing connection)
        watch_unsent()


def _start_head_clock(protocol: Any) -> None:
    """Give the connection's next request head ``protocol._head_timeout`` s from now."""
    _stop_head_clock(protocol)
    if not protocol.transport.is_closing():
        protocol._head_timer = protocol.loop.call_later(protocol._head_timeout,
                                                        protocol._head_timed_out)


def _stop_head_clock(protocol: Any) -> None:
    if protocol._head_timer is not None:
        protocol._head_timer.cancel()
        protocol._head_timer = None


def _answer_head_timeout(protocol: Any, begun: bool, arriving: bool = False) -> None:
    """The head clock ran out: a 408 where a request had begun (``begun``), then close. The
    close lingers after the 408, and where the body of a request answered early is still
    ``arriving`` (read on and dropped, the connection kept alive: a rest of at most
    ``lingering_close.KEEP_ALIVE_REST`` arriving slowly, or a body sent after an answer that
    came before ``100 Continue``): its client is sending, the connection is not idle, and the
    close lingers as an early answer's to an upload does (while the client sends, until it
    closes), not a moment: the rest still on its way met a reset."""
    protocol._head_timer = None
    if protocol.transport.is_closing():
        return
    if arriving:
        lingering_close.arm(protocol, getattr(protocol, "cycle", None), upload=True)
    answered = begun and not _mid_response(protocol)
    if answered:
        log.debug("request head not complete within %g s: 408", protocol._head_timeout)
        protocol.transport.write(raw_answer(408, head_timeout_body(protocol._head_timeout),
                                            protocol.server_state.default_headers))
    # (none begun and no body arriving: an idle connection, nothing to answer or wait for)
    _close(protocol, answered or arriving)


class _HeadClock:
    """The head clock's start as a connection opens and its stop as it is lost, before the
    uvicorn protocol it is mixed into (which starts and stops it at each request head too)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        _start_head_clock(self)

    def connection_lost(self, exc: Exception | None) -> None:
        _stop_head_clock(self)
        super().connection_lost(exc)  # type: ignore[misc]


class _Capped:
    """The bound on open connections (:mod:`app.api.connection_cap`), before the head clock
    and the uvicorn protocol it is mixed into: a connection past it is answered at once with
    a 503 ``too_many_connections`` problem and closed, the close lingering
    (:mod:`app.api.lingering_close`: what it sends dropped a moment, so a request in flight
    does not turn the close into a reset that loses the answer)."""

    _slots: connection_cap.ConnectionSlots | None = None
    #: past the bound: never served (what arrives before the close is dropped)
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        slots = connection_cap.slots_of(getattr(self.config, "app", None))  # type: ignore[attr-defined]
        if slots is None:
            return
        if slots.take():
            self._slots = slots
            return
        self._refuse_connection(slots)

    def _refuse_connection(self, slots: connection_cap.ConnectionSlots) -> None:
        protocol: Any = self
        _stop_head_clock(protocol)
        slots.refused("HTTP")
        self._refused = True
        headers = [*protocol.server_state.default_headers,
                   (b"retry-after", str(connection_cap.RETRY_AFTER_S).encode())]
        protocol.transport.write(raw_answer(503, connection_cap.refusal_body(slots.limit),
                                            headers))
        # (as long as its client sends: a request with a long body may be on its way)
        lingering_close.arm(protocol, upload=True)
        protocol.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)  # type: ignore[misc]

    def eof_received(self) -> bool | None:
        if self._refused:  # (nothing, and the transport closes)
            return None
        if _answer_owed(self):
            return True  # (the transport stays open for the answer)
        if _answer_cut_body(self):
            return None  # (closed, after its answer)
        super().eof_received()  # type: ignore[misc]
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slots is not None:
            self._slots.give()
            self._slots = None
        super().connection_lost(exc)  # type: ignore[misc]


def _protocols() -> tuple[type[asyncio.Protocol] | None, type[asyncio.Protocol] | None]:
    """The httptools and h11 protocols answering in problem+json, or None for one that cannot
    be made (its library missing, or a uvicorn without ``send_400_response``)."""
    httptools_protocol: type[asyncio.Protocol] | None = None
    h11_protocol: type[asyncio.Protocol] | None = None
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        pass
    else:
        if callable(getattr(HttpToolsProtocol, "send_400_response", None)):

            # (misc: eof_received may keep the transport open, as asyncio's protocols may,
            # where uvicorn's says None)
            class ProblemHttpToolsProtocol(_Capped, _HeadClock, SendClock,  # type: ignore[misc]
                                           SinkingProtocol, HttpToolsProtocol):
                """uvicorn's httptools protocol; a refused request gets problem+json. A
                refusal of a request pipelined after one still being answered waits for that
                answer (uvicorn's own answer took its place, closing the connection). Its
                request heads are bounded in time, bytes and lines (the module's docstring).
                A large body can be written straight into the app's buffer
                (:mod:`app.api.body_sink`)."""

                _refusal: bytes | None = None
                #: the bytes being parsed, and the head of a request whose Upgrade is not
                #: taken, without it (read again by a new parser)
                _fed: bytes | None = None
                _plain_head: bytes | None = None
                #: a CONNECT's head was read, its request not yet told it has no content
                _connect = False
                #: a request's first byte is read and not yet all its headers; and not yet
                #: the end of its body (one answered early is read on after its answer)
                _in_head = False
                _in_message = False
                _heads_begun = 0
                #: the head's URL and whole header lines, in bytes, and its header lines
                _head_size = 0
                _header_lines = 0
                #: the bytes of the chunks read wholly inside the head (a header line that
                #: never ends is in none of the above: httptools holds it until its end)
                _head_chunks = 0
                _head_raw = b""
                #: the empty lines read before the next request line, and whether the last
                #: read ended in a CR of one (:func:`_empty_lines_refused`)
                _empty_lines = 0
                _empty_cr = False

                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    super().__init__(*args, **kwargs)
                    self._head_timeout, self._max_head, self._max_headers = head_bounds(
                        self.config)

                def _head_timed_out(self) -> None:
                    _answer_head_timeout(self, self._in_head,
                                         self._in_message and not self._in_head)

                @property
                def parser(self) -> Any:
                    return self._parser

                @parser.setter
                def parser(self, parser: Any) -> None:
                    # every parser of the connection (uvicorn's, and those made after a
                    # direct body or an Upgrade not taken) takes any one-digit version, which
                    # on_headers_complete checks: llhttp took 0.9, 1.0, 1.1 and 2.0 (an
                    # HTTP/2.0 request was served) and refused 1.2 or 3.0 as unparsable
                    with contextlib.suppress(AttributeError):
                        parser.set_dangerous_leniencies(lenient_version=True)
                    self._parser = parser

                def data_received(self, data: bytes) -> None:
                    if not self._in_message and self._empty_lines_refused(data):
                        return
                    before = (self._in_head, self._heads_begun)
                    # (what has arrived of the head being read, where it may start: to name
                    # the header of a bare LF or a folded line the parser refuses)
                    if not self._in_head:
                        self._head_raw = data  # (no copy: a body's reads stay as fast)
                    elif len(self._head_raw) <= self._max_head:  # (past it: a 431)
                        self._head_raw += data[:self._max_head + 2]
                    self._fed = data
                    try:
                        super().data_received(data)
                    finally:
                        self._fed = None
                    if (self._in_head and before == (True, self._heads_begun)
                            and not self.transport.is_closing()):
                        self._head_chunks += len(data)
                        if self._head_chunks > self._max_head:
                            self._refuse(raw_answer(*problem_body(HeadTooLarge(
                                self._too_large())), self.server_state.default_headers))

                def _empty_lines_refused(self, data: bytes) -> bool:
                    """Count the empty lines a read between requests starts with (llhttp
                    skips any CRs and LFs there, without a bound), refusing a bare LF or CR
                    and more than ``MAX_EMPTY_LINES``, as under h11. (Those that follow a
                    body in the read that ends it are llhttp's alone to skip.)"""
                    if data[:1] not in (b"\r", b"\n") and not self._empty_cr:
                        return False
                    _, self._empty_lines, self._empty_cr, wrong = empty_lines(
                        data, self._empty_lines, self._empty_cr)
                    if wrong is None:
                        return False
                    self._refuse(raw_answer(*problem_body(MalformedHead("request-line", wrong)),
                                            self.server_state.default_headers))
                    return True

                def on_message_begin(self) -> None:
                    super().on_message_begin()
                    self._empty_lines, self._empty_cr = 0, False
                    self._in_head = self._in_message = True
                    self._heads_begun += 1
                    self._head_size = self._header_lines = self._head_chunks = 0

                def on_url(self, url: bytes) -> None:
                    super().on_url(url)
                    self._grow_head(len(url), 0)

                def on_header(self, name: bytes, value: bytes) -> None:
                    # a field value without the whitespace after it (RFC 9110 5.5: no part of
                    # it; llhttp leaves it in, h11 strips it): "Host: a " was a 400, and
                    # "If-None-Match: * " on a create, "Idempotency-Key: k " 422s
                    super().on_header(name, value.rstrip(b" \t"))
                    self._grow_head(len(name) + len(value) + 4, 1)  # name: value CRLF

                def _grow_head(self, size: int, lines: int) -> None:
                    """Count a part of the head; past a bound, stop the parser (uvicorn then
                    calls ``send_400_response``, inside the parser's error)."""
                    self._head_size += size
                    self._header_lines += lines
                    if self._head_size > self._max_head or self._header_lines > self._max_headers:
                        raise HeadTooLarge(self._too_large())

                def _too_large(self) -> str:
                    if self._header_lines > self._max_headers:
                        return (f"more than {self._max_headers} header lines "
                                "(OPTSERVE_MAX_HEADERS)")
                    return (f"the request line and headers take more than "
                            f"{self._max_head // 1024} KiB (OPTSERVE_MAX_HEAD_KB)")

                def on_headers_complete(self) -> None:
                    self._in_head = False
                    _stop_head_clock(self)
                    refused = version_problem(self.parser.get_http_version())
                    if refused is not None:  # (the parser stops: send_400_response answers)
                        raise UnsupportedVersion(*refused)
                    wrong = target_problem(self.url)
                    if wrong is not None:  # (the parser stops: send_400_response answers)
                        raise MalformedTarget(wrong)
                    if self.parser.get_method() == b"CONNECT":
                        # llhttp takes every CONNECT as an upgrade and stops at its head, the
                        # bytes after it a tunnel's: served as a request without content, the
                        # connection closed after its answer (a 405, app.api.
                        # request_head_checks). Read again as a plain head, it stopped again
                        # (a CONNECT is an upgrade whatever its headers): a recursion that
                        # closed the connection with no answer.
                        if not self.url.startswith(b"/"):  # (example.com:443: no path)
                            headers = [*self.server_state.default_headers, (b"allow", b"")]
                            self._refuse(raw_answer(405, connect_refusal_body(), headers))
                            return
                        self._connect = True
                        super().on_headers_complete()
                        self.cycle.keep_alive = False
                        hold_head(self.cycle, self.loop)
                        return
                    if self.parser.should_upgrade() and not self._should_upgrade():
                        # an Upgrade this server does not take (curl --http2's h2c, a
                        # WebSocket handshake): served as plain HTTP (RFC 9110 7.8). httptools
                        # stops at the head, the body unread: read again, head and all, by a
                        # parser that sees no Upgrade (_unsupported_upgrade_warning)
                        self._plain_head = plain_head(self.parser, self.url, self.headers)
                        return
                    super().on_headers_complete()
                    hold_head(self.cycle, self.loop)  # (the head written with the body)
                    # an answer before a long body's end closes and lingers
                    lingering_close.guard_early_answers(self, self.cycle,
                                                        lambda: self._body_read)
                    if not self.cycle.keep_alive:
                        # its client asked to close (Connection: close, HTTP/1.0): an answer
                        # before its body ends closes the connection while it sends
                        lingering_close.arm(self, self.cycle)

                def on_body(self, body: bytes) -> None:
                    if self._plain_head is None:
                        super().on_body(body)

                def on_message_complete(self) -> None:
                    self._in_message = False
                    if self._plain_head is None:
                        super().on_message_complete()

                def _unsupported_upgrade_warning(self) -> None:
                    """Called by ``data_received`` as the parser stops at an Upgrade (its
                    exception, which holds where the unread bytes start, being handled): the
                    head without the Upgrade and the unread bytes go to a new parser."""
                    if self._connect:  # its head read: the request has no content
                        self._connect = self._in_message = False
                        super().on_message_complete()
                        return
                    if self._plain_head is None and self.parser.get_method() == b"CONNECT":
                        return  # (bytes after a CONNECT's head: not read)
                    head, self._plain_head = self._plain_head, None
                    stopped, fed = sys.exception(), self._fed
                    if head is None or fed is None or not isinstance(
                            stopped, httptools.HttpParserUpgrade):
                        super()._unsupported_upgrade_warning()
                        return
                    self.parser = httptools.HttpRequestParser(self)
                    with contextlib.suppress(AttributeError):  # (as uvicorn makes its parser)
                        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                    self.data_received(head + fed[stopped.args[0]:])

                def send_400_response(self, msg: str) -> None:
                    try:
                        exc = sys.exception()
                        if isinstance(exc, httptools.HttpParserError) and _LINE_END_ERRORS.search(
                                str(exc)):
                            wrong = head_line_problem(self._head_raw)
                            if wrong is not None:  # (named as under h11)
                                exc = MalformedHead(*wrong)
                        status, body = problem_body(exc)
                        answer = raw_answer(status, body, self.server_state.default_headers)
                    except Exception:  # never worse than uvicorn's own answer
                        log.exception("could not build the problem for a refused request")
                        super().send_400_response(msg)
                        return
                    self._refuse(answer)

                def _refuse(self, answer: bytes) -> None:
                    """Answer the request being read with ``answer`` and close, after the
                    answer of one before it still being written."""
                    cycle = getattr(self, "cycle", None)  # the last one whose headers were read
                    if (not getattr(cycle, "response_complete", True)
                            and getattr(cycle, "more_body", True) is False
                            and hasattr(self, "flow")):
                        # read whole, so refused is one after it: answered once it is
                        self._refusal = answer
                        self.flow.pause_reading()
                        return
                    answered = not _mid_response(self)
                    if answered:
                        self.transport.write(answer)
                    _close(self, answered)

                def on_response_complete(self) -> None:
                    super().on_response_complete()
                    if (self._refusal is not None and self.cycle.response_complete
                            and not self.transport.is_closing()):
                        self.transport.write(self._refusal)
                        lingering_close.arm(self)
                        self.transport.close()
                    if self.cycle.response_complete:  # none in flight: the next head's clock
                        _start_head_clock(self)

            httptools_protocol = ProblemHttpToolsProtocol
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        pass
    else:
        if callable(getattr(H11Protocol, "send_400_response", None)):

            from h11._readers import maybe_read_from_IDLE_client as _read_request_head
            from h11._receivebuffer import blank_line_regex

            def _checked_request_head(buf: Any, conn: Any = None) -> Any:
                """h11's reader of a request head, refusing one with a bare LF line end or an
                obsolete line folding (:func:`~app.api.request_head_checks.head_line_problem`),
                which h11 takes (RFC 9112 2.2, 5.2), as httptools does. Empty lines (CRLF)
                before the request line are taken out first, up to ``MAX_EMPTY_LINES`` for
                one request (counted on ``conn``), as llhttp skips them: h11 refused the
                first ("no request line received"), which RFC 9112 2.2 says a server SHOULD
                ignore."""
                data = getattr(buf, "_data", None)
                if data is None:
                    data = bytes(buf)
                if data[:1] in (b"\r", b"\n"):
                    skip, lines, cr, refusal = empty_lines(data, getattr(conn, "empty_lines", 0))
                    if refusal is not None:
                        raise h11.RemoteProtocolError(refusal) from MalformedHead(
                            "request-line", refusal)
                    if conn is not None:
                        conn.empty_lines = lines
                    if skip:
                        buf.maybe_extract_at_most(skip)
                        data = getattr(buf, "_data", None)
                        if data is None:
                            data = bytes(buf)
                    if cr:  # (its LF still to come)
                        return None
                if data[:1] not in (b"\r", b"\n"):
                    end = blank_line_regex.search(data)
                    head = bytes(data[:end.end()] if end is not None else data)
                    wrong = head_line_problem(head if end is not None
                                              else head[:head.rfind(b"\n") + 1])
                    if wrong is not None:
                        raise h11.RemoteProtocolError(wrong[1]) from MalformedHead(*wrong)
                return _read_request_head(buf)

            class TargetCheckedConnection(h11.Connection):
                """h11's connection, whose request with a target this server refuses
                (:func:`~app.api.request_head_checks.target_problem`) is a protocol error, as
                h11's own refusals are (uvicorn answers it with ``send_400_response``; the
                request is read, so the answer can still be sent)."""

                #: OPTSERVE_MAX_HEAD_KB (bytes) and OPTSERVE_MAX_HEADERS (the protocol's)
                max_head = MAX_HEAD_KB * 1024
                max_headers = MAX_HEADERS
                #: the bytes of the body of the request being read so far
                body_read = 0
                #: the empty lines taken out before the next request line
                empty_lines = 0

                def _get_io_object(self, role: Any, event: Any, io_dict: Any) -> Any:
                    io = super()._get_io_object(role, event, io_dict)
                    if io is _read_request_head:  # (the reader of a request's head)
                        return self.read_request_head
                    return io

                def read_request_head(self, buf: Any) -> Any:
                    return _checked_request_head(buf, self)

                def next_event(self) -> Any:
                    event = super().next_event()
                    if isinstance(event, h11.Data):
                        self.body_read += len(event.data)
                    elif isinstance(event, h11.Request):
                        self.body_read = self.empty_lines = 0
                        refused = version_problem(event.http_version.decode("ascii"))
                        if refused is not None:
                            raise h11.RemoteProtocolError(
                                refused[1], error_status_hint=refused[0]
                            ) from UnsupportedVersion(*refused)
                        too_large = self._too_large(event)
                        if too_large is not None:  # (a 431, as httptools' heads)
                            raise h11.RemoteProtocolError(
                                too_large, error_status_hint=431) from HeadTooLarge(too_large)
                        wrong = target_problem(event.target)
                        if wrong is not None:
                            raise h11.RemoteProtocolError(wrong) from MalformedTarget(wrong)
                        origin = origin_form(event.target)
                        if origin is not None:  # (RFC 9112 3.2.2; httptools parses it so)
                            event = h11.Request(method=event.method, headers=event.headers,
                                                target=origin, http_version=event.http_version)
                    return event

                def _too_large(self, event: Any) -> str | None:
                    """Why a request head h11 parsed whole is past the server's bounds, or
                    None: h11 bounds only a head it holds unparsed (16 KiB), so one that
                    arrived in one read passed whatever its size or lines (a 70 KB header
                    line, 300 header lines: served)."""
                    lines = len(event.headers)
                    if lines > self.max_headers:
                        return f"more than {self.max_headers} header lines (OPTSERVE_MAX_HEADERS)"
                    size = len(event.target) + sum(len(name) + len(value) + 4
                                                   for name, value in event.headers)
                    if size > self.max_head:
                        return (f"the request line and headers take more than "
                                f"{self.max_head // 1024} KiB (OPTSERVE_MAX_HEAD_KB)")
                    return None

            class ProblemH11Protocol(_Capped, _HeadClock, SendClock,  # type: ignore[misc]
                                     H11Protocol):
                """uvicorn's h11 protocol; a refused request gets problem+json. Its request
                heads are bounded in time (the module's docstring); h11 bounds their size."""

                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    super().__init__(*args, **kwargs)
                    self._head_timeout, max_head, max_headers = head_bounds(self.config)
                    self.conn.__class__ = TargetCheckedConnection  # (uvicorn made it)
                    conn: Any = self.conn
                    conn.max_head, conn.max_headers = max_head, max_headers
                    if conn._reader is _read_request_head:  # (made before its class was set)
                        conn._reader = conn.read_request_head

                def _head_timed_out(self) -> None:
                    # a request begun: h11 holds the bytes of a head it has not parsed yet
                    _answer_head_timeout(self, self.conn.their_state is h11.IDLE
                                         and bool(self.conn.trailing_data[0]),
                                         self.conn.their_state is h11.SEND_BODY)

                def data_received(self, data: bytes) -> None:
                    cycle = self.cycle
                    super().data_received(data)
                    if self.cycle is not cycle:  # a head read: its request is in flight
                        _stop_head_clock(self)

                def on_response_complete(self) -> None:
                    cycle = self.cycle
                    super().on_response_complete()
                    if self.cycle is cycle:  # no request pipelined behind it started
                        _start_head_clock(self)

                def handle_events(self) -> None:
                    cycle = self.cycle
                    super().handle_events()
                    new = self.cycle
                    if new is not cycle and new is not None:
                        # a body the app stopped reading (a body timeout): its answer closes
                        # the connection, as under httptools (before the app's task runs)
                        def close_after(upload: bool = False) -> None:
                            new.keep_alive = False
                            lingering_close.arm(self, new, upload)
                        extensions: dict[str, Any] = new.scope.setdefault("extensions", {})
                        extensions[CLOSE_AFTER] = close_after
                        if lingering_close.client_closes(new.scope):
                            # h11 closes after the answer, before the body ends or not
                            lingering_close.arm(self, new)
                        # an answer before a long body's end closes and lingers
                        conn = self.conn
                        lingering_close.guard_early_answers(
                            self, new, lambda: int(getattr(conn, "body_read", 0)))

                def send_400_response(self, msg: str) -> None:
                    if _mid_response(self):
                        _close(self)
                        return
                    try:
                        status, body = problem_body(sys.exception())
                        body, headers = answer_parts(body, self.server_state.default_headers)
                        answer = b"".join([
                            self.conn.send(h11.Response(
                                status_code=status, headers=headers,
                                reason=http.HTTPStatus(status).phrase.encode())) or b"",
                            self.conn.send(h11.Data(data=body)) or b"",
                            self.conn.send(h11.EndOfMessage()) or b""])
                    except Exception:  # uvicorn's answer, where h11 can still send it
                        log.exception("could not build the problem for a refused request")
                        try:
                            super().send_400_response(msg)
                        except Exception:
                            self.transport.close()
                        return
                    self.transport.write(answer)
                    _close(self, linger=True)

            h11_protocol = ProblemH11Protocol
    return httptools_protocol, h11_protocol


PROBLEM_HTTPTOOLS, PROBLEM_H11 = _protocols()


def http_protocol() -> type[asyncio.Protocol] | str:
    """What ``uvicorn.Config(http=...)`` takes: the protocol uvicorn's ``"auto"`` would pick
    (httptools where it is installed, else h11), answering refused requests in problem+json;
    ``"auto"`` itself where that cannot be made."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return PROBLEM_H11 or "auto"
    return PROBLEM_HTTPTOOLS or "auto"
