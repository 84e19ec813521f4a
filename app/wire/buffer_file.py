"""A read-only, seekable binary file over a buffer (a request body's ``bytearray``), without
copying it: ``io.BytesIO`` shares a ``bytes`` object but copies any other buffer whole, so a
``torch.save`` import made a ``bytes`` copy of its body first (twice its size in memory before
any check)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class BufferFile(io.RawIOBase):
    """``buf``'s bytes as a file (read, readinto, seek, tell), as ``io.BytesIO(bytes(buf))``
    reads them; ``buf`` must not change while the file is open (closing it releases the
    buffer: a ``bytearray`` cannot be resized while a view of it is held)."""

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            if offset < 0:
                raise ValueError(f"negative seek value {offset}")
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = len(self._view) + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        self._pos = max(pos, 0)  # (before the start: the start, as io.BytesIO has it)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        start = min(self._pos, len(self._view))
        end = len(self._view) if size is None or size < 0 else min(start + size,
                                                                    len(self._view))
        self._pos += end - start  # (past the end: it stays there, as io.BytesIO has it)
        return bytes(self._view[start:end])

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: WriteableBuffer) -> int:
        self._check_open()
        into = memoryview(b).cast("B")
        start = min(self._pos, len(self._view))
        n = min(len(into), len(self._view) - start)
        into[:n] = self._view[start:start + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
