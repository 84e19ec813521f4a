"""A large request body written straight into the buffer it is read into.

uvicorn's httptools protocol hands an app each part of a body through ``receive()``: the part
is appended to the request's ``bytearray`` (a copy), which past 64 KiB pauses reading until
the app's task wakes; ``receive()`` then copies it into a ``bytes`` message, and the app copies
that into its own buffer. For a 40 MB step that is two copies more than needed and one wake of
the app's task per 256 KiB read from the socket (about 150), all on the event loop's thread,
between the client's send and the server's step.

A sink skips them. The protocol (:class:`SinkingProtocol`, mixed into the server's httptools
protocol) offers each request whose head it has read an ``attach`` under
``scope["extensions"][EXTENSION]``. The app (``bodies._read_body``, for a body with a
``Content-Length`` too large to read in one part) calls it with the function that copies a
part into its buffer, and the buffer itself. What has arrived is handed to that function at
once; the rest is read from the socket straight into the buffer, after it: for that stretch
the transport's protocol is a :class:`DirectBody` (an ``asyncio.BufferedProtocol``, which
uvloop and asyncio both read into a buffer it gives), which hands the transport back when the
body is whole, with a fresh httptools parser for the next request (its old one was left
expecting the body's bytes). Where that cannot be done (a ``Transfer-Encoding``, a
``Content-Length`` not the buffer's), each part httptools parses goes to the function,
reading on without pausing. The app's task is woken once: when the body is whole, when the
connection is lost, or when the function raises. An ``Expect: 100-continue`` is answered at
``attach``, as ``receive()`` would. :meth:`Sink.wait` keeps the body timeout's meaning (no
bytes for ``OPTSERVE_BODY_TIMEOUT_S``) and raises what ``receive()`` would have led to; a body
the app stops reading (a timeout) is abandoned (:meth:`Sink.abandon`): its answer closes the
connection, so its buffer is not held for a client that never sends the rest. The
bytes a sink took are counted into the access log's ``bytes_in``
(``app.observability.SUNK_BYTES``).
Without the extension (another protocol, an in-process test client, a body of unknown
length) the app reads through ``receive()`` as ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect

from app.api import lingering_close

#: the scope extension a protocol offers ``attach`` under
EXTENSION = "optserve.body_sink"
#: the scope extension a protocol offers ``close_after`` under: the request's answer closes
#: the connection (a body the app stopped reading midway, read through ``receive()``);
#: ``close_after(upload=True)``: the request was refused early (a 413) while its client
#: uploads its body, whose close lingers as long as the upload goes on
#: (:mod:`app.api.lingering_close`)
CLOSE_AFTER = "optserve.close_after"


class SinkTimeout(Exception):
    """No body bytes for the timeout (the caller turns it into its 408)."""


class Sink:
    """One request's body, handed part by part to ``take`` by the protocol."""

    def __init__(self, take: Callable[[bytes], None]) -> None:
        self.take = take
        self.received = 0
        self.error: BaseException | None = None
        #: the body arrived to its end (not cut off by a lost connection)
        self.whole = False
        self._done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._last = self.started_at = self._loop.time()
        #: the whole-body deadline, not the gap between bytes, ran out (:meth:`wait`)
        self.too_slow = False
        #: the protocol's: stop feeding this sink (:meth:`abandon`)
        self.on_abandon: Callable[[], None] | None = None

    def part(self, body: bytes) -> None:
        """A part of the body (the protocol calls it; never raises)."""
        if self._done.is_set():
            return  # (after an error or a disconnect: dropped)
        try:
            self.take(body)
        except BaseException as exc:  # noqa: BLE001 - raised in the app's task, by wait()
            self.error = exc
            self._done.set()
            return
        self.received += len(body)
        self._last = self._loop.time()

    def read(self, n: int) -> None:
        """``n`` bytes read into the buffer directly (:class:`DirectBody`)."""
        self.received += n
        self._last = self._loop.time()

    def finish(self, whole: bool = True) -> None:
        self.whole = whole
        self._done.set()

    def abandon(self) -> None:
        """The app reads no more of this body (it timed out, or ``take`` refused a part): the
        rest is left to the protocol, which closes the connection after the answer (its
        parser is in the middle of the body, and its buffer need not be kept)."""
        callback, self.on_abandon = self.on_abandon, None
        if callback is not None:
            callback()

    async def wait(self, timeout: float | None, min_rate: float | None = None) -> int:
        """Until the body is whole: its size. Raises what ``take`` raised,
        ``ClientDisconnect`` when the connection was lost first, and :class:`SinkTimeout`
        when no part arrived for ``timeout`` seconds, or (``min_rate``, bytes a second) when
        the body is not whole ``timeout`` seconds plus its bytes at ``min_rate`` after the
        sink was made (its ``too_slow`` then True)."""
        while not self._done.is_set():
            if timeout is None:
                await self._done.wait()
                break
            now = self._loop.time()
            left = self._last + timeout - now
            if min_rate:
                whole = self.started_at + timeout + self.received / min_rate - now
                if whole < left:
                    left, self.too_slow = whole, True
                else:
                    self.too_slow = False
            if left <= 0:
                raise SinkTimeout()
            try:
                async with asyncio.timeout(left):
                    await self._done.wait()
            except TimeoutError:
                continue  # (a part may have come since: the loop looks again)
        if self.error is not None:
            raise self.error
        if not self.whole:
            raise ClientDisconnect()
        return self.received


class SinkingProtocol:
    """Mixed into uvicorn's ``HttpToolsProtocol`` (before it): offers each request's ``attach``
    and hands an attached request's body parts to its :class:`Sink`."""

    _sink: tuple[Any, Sink] | None = None
    #: the bytes of the body of the request being read so far (parsed, or read into a sink's
    #: buffer)
    _body_read = 0

    def on_headers_complete(self) -> None:
        self._body_read = 0
        super().on_headers_complete()  # type: ignore[misc]
        protocol: Any = self
        cycle = getattr(protocol, "cycle", None)
        scope = getattr(protocol, "scope", None)
        if cycle is None or not isinstance(scope, dict) or scope.get("type") != "http":
            return

        def attach(take: Callable[[bytes], None], target: memoryview | None = None
                   ) -> Sink | None:
            return self._attach(cycle, take, target)
        def close_after(upload: bool = False) -> None:
            cycle.keep_alive = False
            lingering_close.arm(self, cycle, upload)
        extensions = scope.setdefault("extensions", {})
        extensions[EXTENSION] = attach
        extensions[CLOSE_AFTER] = close_after

    def _attach(self, cycle: Any, take: Callable[[bytes], None],
                target: memoryview | None) -> Sink | None:
        protocol: Any = self
        if (protocol.cycle is not cycle or cycle.response_complete or cycle.disconnected
                or self._sink is not None):
            return None
        sink = Sink(take)
        if getattr(cycle, "waiting_for_100_continue", False) and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if cycle.body:  # (received before: handed over now)
            body, cycle.body = bytes(cycle.body), bytearray()
            sink.part(body)
        if not cycle.more_body:
            sink.finish()
            return sink
        self._sink = (cycle, sink)
        sink.on_abandon = lambda: self._abandon(cycle)
        if (target is not None and sink.error is None and sink.received < len(target)
                and _direct_fits(cycle.scope, len(target))
                and callable(getattr(protocol.transport, "set_protocol", None))):
            protocol.transport.set_protocol(DirectBody(self, sink, target, sink.received))
        protocol.flow.resume_reading()
        return sink

    def _abandon(self, cycle: Any) -> None:
        protocol: Any = self
        entry = self._sink
        if entry is None or entry[0] is not cycle:
            return  # (the body ended first)
        self._sink = None
        cycle.keep_alive = False  # ("connection: close" on the answer, and closed after it)
        lingering_close.arm(self, cycle)
        direct = protocol.transport.get_protocol()
        if isinstance(direct, DirectBody):
            direct.release()
            protocol.transport.set_protocol(protocol)

    def _direct_done(self) -> None:
        """The body read whole by :class:`DirectBody`: the transport back, a fresh parser (the
        old one still waits for the body), and the message complete."""
        protocol: Any = self
        protocol.transport.set_protocol(protocol)
        protocol.parser = type(protocol.parser)(protocol)
        with contextlib.suppress(AttributeError):  # (as uvicorn makes its parser)
            protocol.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        protocol.on_message_complete()  # (the sink's end: on_message_complete below)

    def on_body(self, body: bytes) -> None:
        self._body_read += len(body)
        entry = self._sink
        protocol: Any = self
        if entry is not None and entry[0] is protocol.cycle:
            if not entry[0].response_complete:
                entry[1].part(body)
            return
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        entry = self._sink
        protocol: Any = self
        if entry is not None and entry[0] is protocol.cycle:
            self._sink = None
            entry[1].finish()
        super().on_message_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        entry, self._sink = self._sink, None
        if entry is not None:
            entry[1].finish(whole=False)
        super().connection_lost(exc)  # type: ignore[misc]


def _direct_fits(scope: dict[str, Any], size: int) -> bool:
    """The request's body is exactly its one ``Content-Length``, ``size``, and no transfer
    coding frames it (so the next ``size`` bytes on the connection are the body)."""
    lengths = []
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            lengths.append(value)
    return lengths == [str(size).encode()]


_EMPTY = memoryview(bytearray())


class DirectBody(asyncio.BufferedProtocol):
    """The transport's protocol while the rest of a body is read into its buffer: the
    connection's events go on to the HTTP protocol (``owner``)."""

    def __init__(self, owner: SinkingProtocol, sink: Sink, target: memoryview, start: int
                 ) -> None:
        self.owner: Any = owner
        self.sink: Sink | None = sink
        self.target = target.cast("B") if target.format != "B" else target
        self.pos = start

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        self.owner._body_read += nbytes
        if self.sink is not None:
            self.sink.read(nbytes)
        if self.pos >= len(self.target):
            self.release()
            self.owner._direct_done()

    def release(self) -> None:
        """Let go of the buffer: uvloop keeps the bound methods of a transport's last buffered
        protocol (and so this object) after it is handed another, until the connection closes
        or the next body, and a buffer kept here would be as large as that body."""
        self.target = _EMPTY
        self.sink = None

    def eof_received(self) -> bool | None:
        return self.owner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()  # (the body is abandoned: nothing is read into its buffer any more)
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()
