"""A connection whose client takes none of its answer for ``OPTSERVE_BODY_TIMEOUT_S`` is dropped.

A request's body that stalls is a 408 (``app.api.bodies``), and a head that stalls is a 408
too (``app.api.malformed_http``); nothing bounded the other way. An answer is handed to the
connection whole (a 40 MB step answer, a state_dict export, a history) and waits in its
buffer, and in the server's memory, until the client reads it. So a client that asked and
never read held its answer for as long as it kept the connection open: 20 connections that
each asked for a 1e7-parameter session's parameters and read nothing took the server's memory
up by 725 MB and kept it there; a few hundred would have run it out.

:class:`SendClock`, mixed into the server's HTTP protocols before uvicorn's, watches the
connection's unsent bytes while its write buffer is past its high-water mark (from
``pause_writing`` to ``resume_writing``): every ``OPTSERVE_BODY_TIMEOUT_S`` they must be fewer
(those in the buffer and those the kernel holds unacknowledged), or the client has taken
nothing in that time and the connection is dropped (``abort``: what is buffered for it
is let go at once; the app's remaining writes to it are dropped, as for a client gone). A
slow client that keeps reading keeps its connection, however long its answer takes.

The clock runs too while any of an answer is left in the connection's buffer after its end
(:meth:`SendClock.watch_unsent`: at each response's end, at a refusal's close, and as the
buffer falls to its low-water mark, 16 bytes under uvloop), until the buffer is empty. The
buffer passes its high-water mark (64 KiB) only when a write leaves more than that in it: an
answer a few KB to 64 KiB past what the kernel's socket buffers took (a 3 MB one, on
loopback, to a client with a small ``SO_RCVBUF`` that reads nothing) never started the clock,
and neither did the last bytes left after the buffer fell back to its low-water mark; the
connection, closing after its answer (``Connection: close``, or uvicorn's keep-alive timeout,
which waits for the buffer to be written), then held its descriptor, its connection slot and
its buffer for as long as the client kept it open.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
from typing import Any

log = logging.getLogger("optserve.api")

#: the timeout where the served app has no settings (``OPTSERVE_BODY_TIMEOUT_S``)
SEND_TIMEOUT_S = 30.0


def send_timeout(config: Any) -> float:
    """The served app's ``OPTSERVE_BODY_TIMEOUT_S``."""
    settings = getattr(getattr(getattr(config, "app", None), "state", None), "settings", None)
    return float(getattr(settings, "body_timeout_s", SEND_TIMEOUT_S))


class SendClock:
    """Drops the connection when its write buffer, past the high-water mark, has not shrunk
    for :func:`send_timeout` seconds."""

    _send_timer: asyncio.TimerHandle | None = None
    #: the buffered bytes at the last look
    _send_left = 0

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._send_timer is None:
            protocol: Any = self
            self._send_left = _unsent(protocol.transport)
            self._send_timer = protocol.loop.call_later(send_timeout(protocol.config),
                                                        self._look)

    def resume_writing(self) -> None:
        self._stop_send_clock()
        super().resume_writing()  # type: ignore[misc]
        self.watch_unsent()  # (bytes left at the low-water mark)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self.watch_unsent()

    def watch_unsent(self) -> None:
        """Start the clock where the connection's buffer holds bytes and none runs: they
        must go out, or the client is dropped (what holds the connection open while it
        closes after its answer, or while it is kept alive and its next request waits)."""
        protocol: Any = self
        transport = getattr(protocol, "transport", None)
        if (self._send_timer is not None or transport is None
                or not transport.get_write_buffer_size()):
            return
        self._send_left = _unsent(transport)
        self._send_timer = protocol.loop.call_later(send_timeout(protocol.config), self._look)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_send_clock()
        super().connection_lost(exc)  # type: ignore[misc]

    def _stop_send_clock(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _look(self) -> None:
        self._send_timer = None
        protocol: Any = self
        # (a closing transport too: uvicorn closes a kept-alive connection after
        # timeout_keep_alive, which waits for its buffer to be written first)
        transport = protocol.transport
        if not transport.get_write_buffer_size():  # (all of it with the kernel: nothing held)
            return
        left = _unsent(transport)
        if left and left >= self._send_left:
            timeout = send_timeout(protocol.config)
            log.warning("dropped a connection from %s whose client took none of its answer "
                        "for %g s (OPTSERVE_BODY_TIMEOUT_S); %d bytes were unsent",
                        _peer(transport), timeout, left)
            transport.abort()
            return
        self._send_left = left
        self._send_timer = protocol.loop.call_later(send_timeout(protocol.config), self._look)


def _unsent(transport: Any) -> int:
    """The bytes written to the connection that its client has not taken: those buffered in
    the transport, and those the kernel holds that the client has not acknowledged (on
    Linux, ``SIOCOUTQ``: the transport's buffer alone shrinks only once the kernel's, a few
    MB, has room for a good part of it)."""
    left: int = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        except (OSError, ValueError, AttributeError):
            return left
        left += struct.unpack("i", out)[0]
    return left


def _peer(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, (tuple, list)) and len(peer) >= 2 else "?"
