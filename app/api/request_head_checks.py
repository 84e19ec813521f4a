"""Requests refused for their head alone, before anything runs (auth, routing, a body read).

- ``Host`` (RFC 9112 3.2): an HTTP/1.1 request without a ``Host`` header, and any request with
  more than one ``Host`` line or a ``Host`` that is not ``uri-host [":" port]`` (RFC 3986),
  gets a 400 ``malformed_http`` problem with ``field`` ``Host``, and the connection is closed,
  as for the other requests the HTTP parser refuses (:mod:`app.api.malformed_http`). An
  HTTP/1.0 request may leave ``Host`` out; an empty ``Host`` is valid (a target without an
  authority; the spaces or tabs around it are no part of it, RFC 9110 5.5). uvicorn's
  httptools parser checks none of this; h11 refuses a missing or repeated
  ``Host`` itself (answered by :mod:`app.api.malformed_http` the same way).
- ``CONNECT`` (RFC 9110 9.3.6): this server is no proxy and opens no tunnel: every CONNECT
  gets a 405 ``method_not_allowed`` (``field``: ``method``) with ``Allow`` naming the methods
  of the target's route (empty for an authority-form target such as ``example.com:443``, which
  names no route), and the connection is closed (bytes after a CONNECT's head would be a
  tunnel's, not a request). Under httptools the protocol hands such a request over as one
  without content (:mod:`app.api.malformed_http`): its parser takes every CONNECT as an
  upgrade and stops at its head.
- The request target (RFC 9110 4.2.4): an absolute-form target with userinfo
  (``GET http://user@host/path``) is refused by :mod:`app.api.malformed_http`'s protocols
  (:func:`target_problem`), a 400 ``malformed_http`` with ``field`` ``request-target`` and the
  connection closed: uvicorn keeps no authority of the target in the request's scope. One
  without userinfo (``GET http://host/healthz``, RFC 9112 3.2.2: a server MUST accept it) is
  served as its origin form (``/healthz``): httptools parses it so; under h11 the protocol
  rewrites it (:func:`origin_form`), which took the whole target for the path (a 404).
- ``OPTIONS *`` (RFC 9110 9.3.7: the server as a whole) is answered here, before auth and
  routing: 200 with ``Allow`` naming every method the server serves and ``Content-Length:
  0`` (it was a 404 "no route at '/*'"). It needs no key: it says nothing a route's 405 does
  not, and ``/healthz`` needs none either.
- Framing (RFC 9112 6.1): a request with both ``Content-Length`` and ``Transfer-Encoding``
  gets a 400 ``malformed_http`` problem naming ``Transfer-Encoding`` and the connection is
  closed (a server MUST close it after answering such a request: the two framings are how
  requests are smuggled past a proxy), nothing run. httptools refuses it itself
  (:mod:`app.api.malformed_http`, the same answer); h11 framed it by its chunks, the app
  answered it, and a request pipelined after it on the connection was served.
- The HTTP version (RFC 9112 2.3, RFC 9110 2.5): HTTP/1.0 and HTTP/1.1 are served; a higher
  minor version of HTTP/1 (``HTTP/1.2``) is served as HTTP/1.1 (RFC 9110 2.5: a recipient
  SHOULD process it as the highest minor version it conforms to; the request's scope says
  ``1.1``, so it needs a ``Host`` as HTTP/1.1 does); another major version (``HTTP/2.0``,
  ``HTTP/3.0``, ``HTTP/0.5``) is a 505 ``http_version_not_supported`` (RFC 9110 15.6.6;
  ``field``: ``request-line``), the connection closed, and HTTP/0.9 (a request line without a
  version, or naming ``HTTP/0.9``: httptools reads both the same) a 400 ``malformed_http``
  naming ``request-line``: :func:`version_problem`, checked by :mod:`app.api.malformed_http`'s
  protocols (both served all of them but 1.2 and 3.0, which httptools refused with a 400:
  an ``HTTP/2.0`` request line was answered 200).
- Line endings and folding (RFC 9112 2.2, 5.2): a request head with a bare LF line ending
  or an obsolete line folding (a header line starting with a space or tab) is a 400
  ``malformed_http`` naming ``headers`` (``request-line`` for the first line's end) and the
  folded or LF-ended header, the connection closed (:func:`head_line_problem`). RFC 9112 lets a
  server reject both (obs-fold: reject with 400 or replace with a space; a bare LF: MAY be
  accepted). Rejected rather than accepted: httptools (llhttp) rejects both, a proxy in front
  may read such a head differently (a folded line as a header of its own, a bare LF as no line
  end: request smuggling), and no HTTP/1.1 client sends them. h11 unfolded them and took bare
  LFs, and served the request.
- ``Expect`` (RFC 9110 10.1.1): an expectation other than ``100-continue`` (which uvicorn
  answers) gets a 417 ``expectation_failed`` problem naming ``Expect``, the connection closed,
  nothing run (it was ignored and the request served, which a client that asked for an
  expectation it needs met must not take for success).
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.body_sink import CLOSE_AFTER
from app.api.problems import allowed_methods, problem

#: uri-host [":" port]: an IP-literal (IPv6 or IPvFuture in brackets), or a reg-name (which
#: covers an IPv4 address): unreserved, sub-delims and percent-encoded octets
_HOST = re.compile(rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
                   rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")


def connect_detail(allowed: str) -> str:
    """The 405's detail for a CONNECT whose target's route takes ``allowed``."""
    return ("CONNECT is not served: this server is no proxy and opens no tunnel; allowed here: "
            f"{allowed or 'none'}")


_HOST_HINT = ("an HTTP/1.1 request names its Host once: Host: host[:port]; the request was not "
              "read, the connection is closed")


def host_problem(scope: Scope) -> str | None:
    """What is wrong with the request's ``Host`` header (RFC 9112 3.2), or None."""
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if len(hosts) > 1:
        return f"{len(hosts)} Host header lines"
    if not hosts:
        # (HTTP/1.0 may leave it out; an ASGI server of HTTP/2 or 3 makes it of :authority)
        return "no Host header" if scope.get("http_version", "1.1") == "1.1" else None
    # (a field value's surrounding whitespace is no part of it, RFC 9110 5.5: h11 strips it,
    # httptools leaves the trailing one in, so "Host: example.com " was a 400)
    if _HOST.fullmatch(hosts[0].strip(b" \t")) is None:
        return f"the Host header {hosts[0].decode('latin-1')!r:.120} is not host[:port]"
    if len(_GOOD_HOSTS) >= GOOD_HOSTS_KEPT:
        _GOOD_HOSTS.clear()
    _GOOD_HOSTS.add(bytes(hosts[0]))
    return None


#: ``Host`` values :func:`host_problem` found well-formed (a client names the same one on every
#: request), at most this many (then forgotten, all at once)
GOOD_HOSTS_KEPT = 256
_GOOD_HOSTS: set[bytes] = set()


def plain_head(scope: Scope) -> bool:
    """Whether a request's headers need none of :func:`host_problem`'s,
    :func:`framing_problem`'s and :func:`expect_problem`'s checks (each answers None, False,
    None for them): one ``Host`` line, whose value :func:`host_problem` found well-formed
    before; no ``Expect``; not both ``Content-Length`` and ``Transfer-Encoding``. One walk of
    the headers (the checks took three, and a regular expression). False says nothing: the
    checks then run."""
    host = None
    length = coding = False
    for name, value in scope["headers"]:
        if name == b"host":
            if host is not None:
                return False
            host = value
        elif name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            coding = True
        elif name == b"expect":
            return False
    return type(host) is bytes and not (length and coding) and host in _GOOD_HOSTS


#: an absolute-form request target's scheme and authority (RFC 3986 3: scheme "://"
#: authority, the authority up to the first "/", "?" or "#")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")


def origin_form(target: bytes) -> bytes | None:
    """An absolute-form target's origin form (``http://host/p?q`` -> ``/p?q``; an empty path
    is ``/``), or None for a target that is not absolute-form."""
    found = _ABSOLUTE_FORM.match(target)
    if found is None:
        return None
    rest = target[found.end():].partition(b"#")[0]
    return rest if rest.startswith(b"/") else b"/" + rest


def framing_problem(scope: Scope) -> bool:
    """Whether the request's body is framed both by ``Content-Length`` and by
    ``Transfer-Encoding`` (RFC 9112 6.1: a possible request smuggling; the server MUST close the
    connection after answering it)."""
    names = {name for name, _ in scope["headers"]}
    return b"content-length" in names and b"transfer-encoding" in names


def expect_problem(scope: Scope) -> str | None:
    """The ``Expect`` expectation this server cannot meet (anything but ``100-continue``),
    or None."""
    for name, value in scope["headers"]:
        if name != b"expect":
            continue
        for item in bytes(value).split(b","):
            item = item.strip(b" \t")
            if item and item.lower() != b"100-continue":
                return str(item.decode("latin-1"))
    return None


#: what ``OPTIONS *`` names in ``Allow``: every method some route serves (openapi.json's, HEAD
#: as GET), and OPTIONS itself
SERVER_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


#: a line end that is a bare LF (not after a CR), and a line that starts with a space or tab
#: after another (obs-fold), in a request head
_BARE_LF = re.compile(rb"(?<!\r)\n")
_FOLD = re.compile(rb"\n[ \t]")
_HEAD_LINE_HINT = ("each line of the request head ends in CRLF and no header line starts with a "
                   "space or tab (RFC 9112 2.2, 5.2: obsolete line folding is not taken); the "
                   "request was not read, the connection is closed")


#: the empty lines (CRLF) a request line may follow: RFC 9112 2.2 says a server SHOULD ignore
#: at least one received before it (some clients send a CRLF after a request's body); more
#: before one request are refused
MAX_EMPTY_LINES = 8
_EMPTY_LINES_HINT = (f"a request line may follow at most {MAX_EMPTY_LINES} empty lines, each "
                     "a CRLF (RFC 9112 2.2); the request was not read, the connection is "
                     "closed")


def empty_lines(data: bytes | bytearray, lines: int = 0, cr: bool = False
                ) -> tuple[int, int, bool, str | None]:
    """The empty lines at the start of ``data``, where a request line is expected, after
    ``lines`` whole ones that came before it for the same request (``cr``: and a CR that ended
    the bytes before). (the bytes of the whole ones in ``data``, the count of whole ones in
    all, whether ``data`` ends in a CR whose LF is still to come, why the request is refused
    or None). A bare LF or a bare CR there is refused, as a bare LF line end in a head is, and
    more than :data:`MAX_EMPTY_LINES`."""
    i, end = 0, len(data)
    while i < end:
        byte = data[i]
        if cr:
            if byte != 0x0A:
                return i, lines, False, (
                    f"an empty line before the request line ends in a bare CR, not CRLF: "
                    f"{_EMPTY_LINES_HINT}")
            cr, lines, i = False, lines + 1, i + 1
            if lines > MAX_EMPTY_LINES:
                return i, lines, False, (
                    f"more than {MAX_EMPTY_LINES} empty lines before the request line: "
                    f"{_EMPTY_LINES_HINT}")
        elif byte == 0x0D:
            cr, i = True, i + 1
        elif byte == 0x0A:
            return i, lines, False, (
                f"an empty line before the request line is a bare LF, not CRLF: "
                f"{_EMPTY_LINES_HINT}")
        else:
            break
    return i - 1 if cr else i, lines, cr, None


def version_problem(version: str) -> tuple[int, str] | None:
    """A request's HTTP version (``"1.1"``, as the parser gives it) this server does not
    serve: (status, reason), or None. A higher minor version of HTTP/1 is served as 1.1."""
    major, _, minor = version.partition(".")
    if major == "1" and minor.isdigit():
        return None
    if version == "0.9":
        return 400, ("HTTP/0.9 (a request line with no HTTP version) is not served: the first "
                     "line is METHOD /path HTTP/1.1; the request was not read, the connection "
                     "is closed")
    return 505, (f"HTTP/{version:.8} is not served: this server speaks HTTP/1.1 (and 1.0); "
                 "send the request as HTTP/1.1; the request was not read, the connection is "
                 "closed")


def head_line_problem(head: bytes) -> tuple[str, str] | None:
    """The first bare LF line end or obsolete line folding in a request head's bytes (up to its
    blank line, or what has arrived of it): (field, reason), or None. The reason names the
    header whose line it is (the one folded, or ended by the bare LF)."""
    found = [m for m in (_BARE_LF.search(head), _FOLD.search(head)) if m is not None]
    if not found:
        return None
    first = min(found, key=lambda m: m.start())
    start = head.rfind(b"\n", 0, first.start()) + 1  # (the line it ends, or before the fold)
    line = head[start:first.start()].rstrip(b"\r")
    if first.re is _BARE_LF and start == 0:
        return "request-line", f"the request line ends in a bare LF, not CRLF: {_HEAD_LINE_HINT}"
    if first.re is _FOLD and start == 0:
        return "headers", f"the first header line starts with a space or tab: {_HEAD_LINE_HINT}"
    if first.re is _BARE_LF and not line:
        return "headers", f"the header section ends in a bare LF, not CRLF: {_HEAD_LINE_HINT}"
    name = line.partition(b":")[0].decode("latin-1")
    if first.re is _BARE_LF:
        return "headers", f"the header {name!r:.80} ends in a bare LF, not CRLF: {_HEAD_LINE_HINT}"
    return "headers", (f"the header {name!r:.80} is folded onto the next line (obs-fold): "
                       f"{_HEAD_LINE_HINT}")


def target_problem(target: bytes) -> str | None:
    """What is wrong with a request target (the request line's second word), or None: an
    absolute-form target whose authority has userinfo (``http://user@host/path``, RFC 9110
    4.2.4: a sender MUST NOT generate it, a recipient treats it as an error). The detail does
    not repeat the target: its userinfo may be a password."""
    found = _ABSOLUTE_FORM.match(target)
    if found is None or b"@" not in found.group(1):
        return None
    return ("the request target's authority has userinfo (user@host): RFC 9110 4.2.4 forbids "
            "it in an http(s) URI; send the target as /path with the host in Host")


class RequestHeadChecks:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        version = str(scope.get("http_version", "1.1"))
        if version.startswith("1.") and version not in ("1.0", "1.1"):
            scope = {**scope, "http_version": "1.1"}  # (RFC 9110 2.5: HTTP/1.2 as HTTP/1.1)
        if (plain_head(scope) and scope.get("raw_path") != b"*"
                and scope["method"] != "CONNECT"):  # (none of the refusals below applies)
            await self.app(scope, receive, send)
            return
        wrong = host_problem(scope)
        if wrong is not None:
            response = problem(400, "malformed_http", "Malformed HTTP request",
                               f"{wrong}: {_HOST_HINT}", field="Host")
        elif scope["method"] == "OPTIONS" and scope.get("raw_path") == b"*":
            allowed = ", ".join(SERVER_METHODS)
            response = Response(status_code=200, headers={"Allow": allowed,
                                                          "Content-Length": "0"})
            await response(scope, receive, send)
            return
        elif scope.get("raw_path") == b"*":
            response = problem(400, "malformed_http", "Malformed HTTP request",
                               f"the asterisk-form target (*) is only for OPTIONS (RFC 9112 "
                               f"3.2.4), not {scope['method']!r:.20}: send a path",
                               field="request-target")
        elif framing_problem(scope):
            response = problem(400, "malformed_http", "Malformed HTTP request",
                               "Transfer-Encoding can't be present with Content-Length: the "
                               "only transfer coding taken is chunked, never with "
                               "Content-Length; the request was not read, the connection is "
                               "closed", field="Transfer-Encoding")
        elif (unmet := expect_problem(scope)) is not None:
            response = problem(417, "expectation_failed", "Expectation failed",
                               f"Expect: {unmet!r:.80} is not an expectation this server "
                               "meets (only 100-continue); nothing was done, the connection "
                               "is closed", field="Expect")
        elif scope["method"] == "CONNECT":
            allowed = ", ".join(m for m in allowed_methods(Request(scope)))
            response = problem(405, "method_not_allowed", "Method not allowed",
                               connect_detail(allowed), field="method")
            response.headers["Allow"] = allowed
        else:
            await self.app(scope, receive, send)
            return
        response.headers["Connection"] = "close"
        # (the server's protocols: the close lingers as long as the request's body goes on
        # arriving, as an early 413's, so that a client still sending it reads this answer,
        # not a reset)
        close_after = scope.get("extensions", {}).get(CLOSE_AFTER)
        if close_after is not None:
            close_after(upload=True)
        await response(scope, receive, send)
