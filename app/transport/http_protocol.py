"""uvicorn's httptools protocol, with a response's head and body leaving in one write.

uvicorn writes a response's status line and headers the moment the app sends
``http.response.start``, then the body as its own write: two segments on the wire, and the
client's read returns the head alone, then waits again for the body. On loopback each write
costs the server a trip through the kernel's TCP stack and the client an extra wakeup: about a
tenth of a 1,000-parameter step's round trip here. The transport below holds a small write
(the head) until the next one, or until the event loop's current turn ends, and sends both
with one ``writelines`` (one ``writev``). Nothing is reordered, and nothing is held past the
turn in which it was written: a streamed response that awaits between its head and its body
gets its head out at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: writes at most this large are held for the next one (a response's head is a few hundred
#: bytes; a body this small is cheaper to join than to send alone)
HOLD_MAX = 16 * 1024


class CoalescingTransport:
    """A transport that holds one small write until the next write or the end of the loop's
    current turn (``call_soon``), then sends what it holds with that next write in one
    ``writelines``. Everything else goes to the real transport, after what is held."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines([held, data])
        elif len(data) <= HOLD_MAX and not self._transport.is_closing():
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def writelines(self, data: Any) -> None:
        self.flush()
        self._transport.writelines(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()  # a response written just before closing still goes out
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        real = cast(asyncio.Transport, transport)
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(real, self.loop)))
