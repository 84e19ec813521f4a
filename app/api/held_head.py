"""A response's head and its first body bytes in one write.

uvicorn's httptools protocol writes an answer's status line and headers (``http.response.start``)
and then its body (``http.response.body``) with two ``transport.write`` calls: two ``send``
system calls, two TCP segments, and on loopback the kernel delivers each to the client in the
server's own system call. For a small answer (a 1,000-parameter step's 4 KB) that second write
was about a third of the time the event loop spent sending it. Here the head is held back and
written with the first body bytes in one ``writelines`` (one ``writev``); a head with no body
right behind it (a streamed answer whose first piece is not ready, a 1xx, a HEAD answer) goes
out on the loop's next turn, and before a close.
"""

from __future__ import annotations

import asyncio
from typing import Any


class HeldHead:
    """A response cycle's transport: the first write (the head) waits for the next one or the
    loop's next turn; everything else is the connection's transport."""

    __slots__ = ("_transport", "_loop", "_held", "_first")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._first:
            self._first = False
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
            return
        held, self._held = self._held, None
        if held is None:
            self._transport.write(data)
        elif data:
            self._transport.writelines((held, data))
        else:
            self._transport.write(held)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def hold_head(cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Make a fresh uvicorn ``RequestResponseCycle`` (nothing written yet) write its head with
    its first body bytes."""
    cycle.transport = HeldHead(cycle.transport, loop)
