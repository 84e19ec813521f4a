"""An answer given while its client may still be sending is not lost to a reset.

A request whose body stalls or trickles is answered 408 while its client is still sending
(``app.api.bodies``), and the answer closes the connection; so do a request head that is
refused (400, 431; a 408 for one not complete in time, ``app.api.malformed_http``), an
``Expect`` the server does not meet (417, ``app.api.request_head_checks``), and any early
answer (a 413 for a ``Content-Length`` past the limit, a 404) to a request whose client asked
to close (``Connection: close``, HTTP/1.0) before its body ended. Closing a socket that has
unread bytes, or that receives bytes after it is closed, makes the kernel send a reset: the
client's next read or write fails with ``ECONNRESET`` (or ``EPIPE``), and a client that reads
its answer only after its upload gives up never sees the answer at all, only a reset. RFC 9112
9.6 names the remedy: close the writing side first, and go on reading (and dropping) what the
client sends until it closes too or a moment has passed.

:func:`arm` is called for a connection whose next close may come while its client is still
sending: with the request's cycle (the ``close_after`` hook the HTTP protocols offer, a sink's
abandoned body, a request whose client asked to close), the close lingers if that request's
body has not ended by then (otherwise nothing more can arrive: closed at once, as an idle
keep-alive connection is); without one (a refused request head), it lingers whatever. It puts
a :class:`_ClosingTransport` in front of the connection's transport, for the protocol and the
request's cycle; when the connection is closed after the answer, that writes the end of the
stream after the answer (FIN), hands the transport to a :class:`_Drain` that drops whatever
arrives, and closes for good when the client closes its side or after
:data:`connection_cap.LINGER_S` (a close that then still waits for an earlier answer the
client reads slowly lingers no more: nothing is read from it, and it is not counted). A
connection refused with an early 413 while its client uploads the body (``upload``: the client
goes on sending what may be a long body, and most upload code reads the answer only after its
last byte) lingers as nginx's lingering close does: until the client closes its side, for
:data:`connection_cap.UPLOAD_LINGER_S` in all at most, and closed once nothing arrived for
:data:`connection_cap.UPLOAD_QUIET_S` (a client that stopped sending). Lingering connections
are counted with the refused ones (``ConnectionSlots.linger``, at most
:data:`connection_cap.MAX_LINGERING`); past that, and where the transport cannot half-close,
the connection is closed at once as before. A close
while the server shuts down (uvicorn's ``shutdown`` of a lingering connection) is immediate.

Any other answer given before its request's body has ended (a 401 for a missing key, a 404
route, a 415, a 429 or 503 while overloaded, a 500) did not close: the rest of the body was
read and dropped to keep the connection alive, but only until the next head's clock ran out
(``OPTSERVE_HEAD_TIMEOUT_S``), then the close lingered a second, so an upload longer than
that met a reset and its client never read why. :func:`guard_early_answers`, which the HTTP
protocols call for each request they read, looks at every answer as it begins
(:func:`_early_answer`): where the body is still arriving and more than
:data:`KEEP_ALIVE_REST` of its announced length is unread, or its length is unknown (chunked),
the answer carries ``Connection: close`` and the close lingers as a refused upload's does
(the same bounds, the same count). A smaller rest is still read and dropped, and the
connection kept alive. Left as it was: an answer to a request whose client waits for
``100 Continue`` and has sent none of its body (the client was never asked to send it, RFC
9110 10.1.1: uvicorn answers without a ``100``, keeps the connection, and reads and drops a
body only if one comes). Where the next head's clock runs out while such a rest or body is
still arriving (a small rest sent slowly, a body sent after an answer before ``100
Continue``), the close it makes lingers as an upload's too (``malformed_http.
_answer_head_timeout``; it lingered a second, and the rest's next bytes met a reset). Left
as it was also: an answer whose close the server chose already (a body timeout's 408
and an abandoned sink: the client was too slow, the short linger; a 417 and the 413 above,
which arm an upload's), which now says ``Connection: close`` under h11 too.
A connection refused as it opened (past ``OPTSERVE_MAX_CONNECTIONS``, its 503 written before
its request is read) lingers as long as its client sends (a request that may carry a long
body), for :data:`connection_cap.UPLOAD_LINGER_S` in all at most, and is closed once nothing
arrived for :data:`connection_cap.LINGER_S` (one that sends nothing is held no longer than
before).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from app.api import connection_cap
from app.api.held_head import HeldHead

log = logging.getLogger("optserve.api")

#: a bound this close is reached (a loop may run a timer a hair before it is due)
_DUE_SLACK_S = 0.001
#: the most of a body's announced length, not yet read as an answer to it begins, that is
#: read and dropped to keep the connection alive (:func:`guard_early_answers`): what uvicorn
#: reads before it pauses a request's reading, and about what a socket's buffers on the way
#: hold, so a client has most likely sent it by the time it reads the answer; reading it
#: costs a moment, and a larger rest may be a long upload that outlasts the next head's clock
KEEP_ALIVE_REST = 64 * 1024


def guard_early_answers(protocol: Any, cycle: Any, body_read: Callable[[], int]) -> None:
    """Make each answer ``cycle``'s request gets while its body is still arriving close the
    connection with a lingering close where the rest of that body is large or of unknown
    length (the module's docstring). ``body_read``: the bytes of its body read from the
    connection so far (called only while that body has not ended). A request without a body,
    or whose body has ended already, is left as it is (nothing can be still arriving)."""
    if not getattr(cycle, "more_body", False) or not _may_have_body(cycle.scope):
        return
    send: Callable[[Any], Awaitable[None]] = cycle.send

    async def send_guarded(message: Any) -> None:
        if message.get("type") == "http.response.start" and not cycle.response_started:
            message = _early_answer(protocol, cycle, message, body_read)
        await send(message)
    cycle.send = send_guarded  # (uvicorn's run_asgi hands the app cycle.send as it starts)


def _early_answer(protocol: Any, cycle: Any, message: Any, body_read: Callable[[], int]
                  ) -> Any:
    """``message`` (an answer's start), with ``Connection: close`` where it comes before the
    end of its request's large or chunked body, the connection's close then lingering as an
    upload's."""
    scope = getattr(cycle, "scope", {})
    if not cycle.keep_alive and not client_closes(scope):
        # the server chose to close after it, and how (a body timeout's 408, a 413, a 417,
        # a shutdown): the answer says so (uvicorn's h11 cycle did not)
        return _saying_close(message)
    if not _still_sending(cycle):
        return message
    read = body_read()
    if getattr(cycle, "waiting_for_100_continue", False) and read == 0:
        return message  # (no 100 Continue sent, none of the body: never asked to send it)
    declared = _declared_length(scope)
    if declared is not None and declared - read <= KEEP_ALIVE_REST:
        return message  # (read and dropped, the connection kept alive)
    cycle.keep_alive = False
    arm(protocol, cycle, upload=True)
    return _saying_close(message)


def _saying_close(message: Any) -> Any:
    """``message`` (an answer's start) with ``Connection: close`` (h11 then closes after it
    too; uvicorn's httptools cycle adds none more)."""
    headers = list(message.get("headers", ()))
    if any(name.lower() == b"connection" and _has_close(value) for name, value in headers):
        return message
    return {**message, "headers": [*headers, (b"connection", b"close")]}


def client_closes(scope: Mapping[str, Any]) -> bool:
    """Whether the request's client asked for the connection to close after it (as h11 reads
    it: an HTTP/1.0 request, or a ``Connection`` header with the ``close`` token)."""
    if scope.get("http_version") == "1.0":
        return True
    return any(name == b"connection" and _has_close(value)
               for name, value in scope.get("headers", ()))


def _has_close(value: bytes) -> bool:
    return any(token.strip().lower() == b"close" for token in value.split(b","))


def _may_have_body(scope: Mapping[str, Any]) -> bool:
    """Whether the request's head announces a body (a ``Content-Length`` other than 0, or a
    transfer coding)."""
    return any((name == b"content-length" and value != b"0") or name == b"transfer-encoding"
               for name, value in scope.get("headers", ()))


def _declared_length(scope: Mapping[str, Any]) -> int | None:
    """The request body's ``Content-Length`` (the parsers took it: one, digits), None without
    one (a chunked body)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def arm(protocol: Any, cycle: Any = None, upload: bool = False) -> None:
    """Make the next close of ``protocol``'s connection a lingering one: where ``cycle``'s
    request body has not ended by then, or whatever (``cycle`` None: a refused request head,
    whose client may be sending a body after it). ``upload``: the request was answered early
    (a 413, :func:`guard_early_answers`) while its client uploads its body: it lingers as long
    as the upload goes on (the module's docstring); with ``cycle`` None (a connection refused
    as it opened, past ``OPTSERVE_MAX_CONNECTIONS``), as long as its client goes on sending
    with no pause of :data:`connection_cap.LINGER_S`. Idempotent."""
    transport = getattr(protocol, "transport", None)
    if transport is None:
        return
    if isinstance(transport, _ClosingTransport):
        closing, transport = transport, transport._transport
    else:
        closing = _ClosingTransport(protocol, transport)
        protocol.transport = closing
    closing.upload = closing.upload or upload
    if cycle is None:
        closing.always = True
        return
    closing.cycle = cycle
    # the cycle writes through the connection's transport, or through a HeldHead around it
    cycle_transport = getattr(cycle, "transport", None)
    if cycle_transport is transport:
        cycle.transport = closing
    elif isinstance(cycle_transport, HeldHead) and cycle_transport._transport is transport:
        cycle_transport._transport = closing  # type: ignore[assignment]


class _ClosingTransport:
    """The connection's transport, but for :meth:`close`, which lingers (the module's
    docstring)."""

    def __init__(self, protocol: Any, transport: Any) -> None:
        self._protocol = protocol
        self._transport = transport
        self._closing = False
        #: the request whose unfinished body makes the close linger, and whether it lingers
        #: whatever (:func:`arm`)
        self.cycle: Any = None
        self.always = False
        #: a request refused while its client uploads the body (:func:`arm`)
        self.upload = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: Any) -> None:
        self._transport.write(data)

    def writelines(self, data: Any) -> None:
        self._transport.writelines(data)

    def is_closing(self) -> bool:
        return self._closing or bool(self._transport.is_closing())

    def close(self) -> None:
        transport = self._transport
        if self._closing or transport.is_closing():
            self._closing = True
            transport.close()
            return
        self._closing = True
        sending = _still_sending(self.cycle)
        if not (self.always or sending):
            transport.close()
            return
        slots = connection_cap.slots_of(getattr(getattr(self._protocol, "config", None),
                                                "app", None))
        if slots is None or not _can_half_close(transport):
            transport.close()
            return
        if not slots.linger():
            transport.close()
            return
        # (the protocol's loop: uvicorn's protocols keep theirs, the connection's)
        loop = getattr(self._protocol, "loop", None) or asyncio.get_running_loop()
        if self.upload and sending:
            drain = _Drain(self._protocol, transport, slots, loop,
                           connection_cap.UPLOAD_LINGER_S, connection_cap.UPLOAD_QUIET_S)
        elif self.upload and self.cycle is None:  # (a connection refused as it opened)
            drain = _Drain(self._protocol, transport, slots, loop,
                           connection_cap.UPLOAD_LINGER_S, connection_cap.LINGER_S)
        else:
            drain = _Drain(self._protocol, transport, slots, loop, connection_cap.LINGER_S)
        try:
            transport.set_protocol(drain)
        except Exception as exc:  # (a transport that cannot: closed as before; its loss goes
            # to the HTTP protocol, never to the drain, which lets go of its count now)
            log.debug("could not hand a closed connection to a drain: %r", exc)
            drain.let_go()
            transport.close()
            return
        drain.start()
        try:
            transport.write_eof()  # (after what is buffered: the answer, then FIN)
            transport.resume_reading()
        except Exception as exc:  # (the client gone meanwhile: closed as before)
            log.debug("could not half-close a connection: %r", exc)
            drain.end()


def _still_sending(cycle: Any) -> bool:
    """Whether ``cycle``'s request body has not ended (its client may still be sending it)."""
    return (cycle is not None and bool(getattr(cycle, "more_body", False))
            and not getattr(cycle, "disconnected", True))


def _can_half_close(transport: Any) -> bool:
    try:
        return bool(transport.can_write_eof()) and callable(
            getattr(transport, "set_protocol", None))
    except NotImplementedError:
        return False


class _Drain(asyncio.Protocol):
    """The transport's protocol while a closed connection lingers: what arrives is dropped;
    the client's end of the stream, or the timer, closes it: ``total_s`` after :meth:`start`,
    or (``quiet_s``) once nothing arrived for that long. Its loss goes on to the HTTP
    protocol (``owner``), as it would have without lingering."""

    def __init__(self, owner: Any, transport: Any, slots: connection_cap.ConnectionSlots,
                 loop: asyncio.AbstractEventLoop, total_s: float, quiet_s: float | None = None
                 ) -> None:
        self.owner = owner
        self.transport = transport
        self.slots: connection_cap.ConnectionSlots | None = slots
        self.timer: asyncio.TimerHandle | None = None
        self._loop = loop
        self._total_s = total_s
        self._quiet_s = quiet_s
        self._ends_at = self._last = 0.0

    def start(self) -> None:
        """Start the clocks (the timer is due at the sooner of the two bounds)."""
        self._last = now = self._loop.time()
        self._ends_at = now + self._total_s
        self.timer = self._loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        if self._quiet_s is None:
            return self._ends_at
        return min(self._ends_at, self._last + self._quiet_s)

    def _check(self) -> None:
        """The timer: closed where a bound is reached, else due again (bytes came since)."""
        self.timer = None
        due = self._due()
        if self._loop.time() >= due - _DUE_SLACK_S:
            self.end()
        else:
            self.timer = self._loop.call_at(due, self._check)

    def data_received(self, data: bytes) -> None:
        if self._quiet_s is not None:
            self._last = self._loop.time()

    def eof_received(self) -> bool | None:
        return None  # (the transport closes)

    def end(self) -> None:
        """The linger is over (its time passed, or too much arrived): closed for good. Nothing
        more is read from then on, so the connection lingers no more and its count is let go
        of now, not at its loss: a close waits for what is still unsent to the client (an
        earlier answer it reads slowly), which took as long as the client liked, and 32 such
        clients held every lingering place (every other answer then closed at once, lost to
        a reset)."""
        self.let_go()
        self.transport.close()

    def let_go(self) -> None:
        """No longer lingering: the timer stopped and the count let go of (once)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.slots is not None:
            self.slots.done_lingering()
            self.slots = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.let_go()
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()
