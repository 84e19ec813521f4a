"""uvicorn's HTTP/1.1 protocols, answering a request their parser refuses with problem+json.

A request line, header section or chunked body that is not HTTP/1.1 (``Content-Length: -5``,
two different ``Content-Length`` lines, a chunk size that is not hex, a header name with a
space, ...) never reaches the app: uvicorn answers it itself, ``400`` in ``text/plain``
("Invalid HTTP request received."). These subclasses answer it as every other bad input is
answered: a 400 ``malformed_http`` problem naming the part the parser refused (``field``:
``Content-Length``, ``Transfer-Encoding``, ``request-line``, ``headers``, ``Host`` or ``body``)
and its reason, then close the connection, as uvicorn does. A refused request pipelined behind ones
still being answered is refused after their answers (uvicorn's answer took the first one's
place). ``python -m app`` serves with :func:`http_protocol`.

They override uvicorn's ``send_400_response``, which it calls inside the ``except`` of the
parser's error (that error is read from there), and read the state of the request being
answered where uvicorn keeps it (its ``cycle``), each with a default where it is missing. Where
the installed uvicorn has no such method :func:`http_protocol` gives ``"auto"`` (uvicorn's own
plain-text answer), and an answer that cannot be built falls back to uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import orjson

from app.api.problems import PROBLEM

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
#: the longest reason shown: h11's quote the refused line
_REASON_CHARS = 200


def problem_body(exc: BaseException | None) -> tuple[int, bytes]:
    """The status and problem+json body answering a request the parser refused with ``exc``
    (None: the reason is unknown). 431 only where the parser says so (h11: a request line and
    headers past its buffer); every other refusal is a 400."""
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


def _encode(status: int, title: str, *, code: str, field: str, detail: str) -> bytes:
    return orjson.dumps({"type": f"urn:optserve:problem:{code}", "title": title, "status": status,
                         "detail": detail, "code": code, "field": field})


def _mid_response(protocol: Any) -> bool:
    """Whether the connection's current response has begun and not ended: an answer written
    now would land inside it, so the connection is only closed."""
    cycle = getattr(protocol, "cycle", None)
    return bool(getattr(cycle, "response_started", False)
                and not getattr(cycle, "response_complete", True))


def _close(protocol: Any) -> None:
    """Close the connection, and tell the request being read that its client is gone at once,
    as uvicorn does once the loop reports the connection lost: its app, run meanwhile, would
    write an answer after the refusal (h11 refuses that, an error logged per request)."""
    cycle: Any = getattr(protocol, "cycle", None)
    if not getattr(cycle, "response_complete", True) and hasattr(cycle, "message_event"):
        cycle.disconnected = True
        cycle.message_event.set()
    protocol.transport.close()


def _protocols() -> tuple[type[asyncio.Protocol] | None, type[asyncio.Protocol] | None]:
    """The httptools and h11 protocols answering in problem+json, or None for one that cannot
    be made (its library missing, or a uvicorn without ``send_400_response``)."""
    httptools_protocol: type[asyncio.Protocol] | None = None
    h11_protocol: type[asyncio.Protocol] | None = None
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:
        pass
    else:
        if callable(getattr(HttpToolsProtocol, "send_400_response", None)):

            class ProblemHttpToolsProtocol(HttpToolsProtocol):
                """uvicorn's httptools protocol; a refused request gets problem+json. A
                refusal of a request pipelined after one still being answered waits for that
                answer (uvicorn's own answer took its place, closing the connection)."""

                _refusal: bytes | None = None

                def send_400_response(self, msg: str) -> None:
                    try:
                        status, body = problem_body(sys.exception())
                        head = [STATUS_LINE[status]]
                        for name, value in self.server_state.default_headers:
                            head += [name, b": ", value, b"\r\n"]
                        head += [b"content-type: ", PROBLEM.encode(), b"\r\ncontent-length: ",
                                 str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n"]
                        answer = b"".join(head) + body
                    except Exception:  # never worse than uvicorn's own answer
                        log.exception("could not build the problem for a refused request")
                        super().send_400_response(msg)
                        return
                    cycle = getattr(self, "cycle", None)  # the last one whose headers were read
                    if (not getattr(cycle, "response_complete", True)
                            and getattr(cycle, "more_body", True) is False
                            and hasattr(self, "flow")):
                        # read whole, so refused is one after it: answered once it is
                        self._refusal = answer
                        self.flow.pause_reading()
                        return
                    if not _mid_response(self):
                        self.transport.write(answer)
                    _close(self)

                def on_response_complete(self) -> None:
                    super().on_response_complete()
                    if (self._refusal is not None and self.cycle.response_complete
                            and not self.transport.is_closing()):
                        self.transport.write(self._refusal)
                        self.transport.close()

            httptools_protocol = ProblemHttpToolsProtocol
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        pass
    else:
        if callable(getattr(H11Protocol, "send_400_response", None)):

            class ProblemH11Protocol(H11Protocol):
                """uvicorn's h11 protocol; a refused request gets problem+json."""

                def send_400_response(self, msg: str) -> None:
                    if _mid_response(self):
                        _close(self)
                        return
                    try:
                        status, body = problem_body(sys.exception())
                        headers = [(b"content-type", PROBLEM.encode()),
                                   (b"content-length", str(len(body)).encode()),
                                   (b"connection", b"close")]
                        answer = b"".join([
                            self.conn.send(h11.Response(status_code=status, headers=headers))
                            or b"",
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
                    _close(self)

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
