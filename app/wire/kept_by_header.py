"""What a server keeps per safetensors header: a client sends the same header with every step,
so work derived from it (a fingerprint's sampling plan, a log record's layout) is done once.

Kept by memory, not by count: each value is charged its header's length plus what it holds
(``weigh``), and the least recently used are dropped first once the total passes ``max_bytes``
or there are more than ``max_entries`` of them (many clients of small models: many headers
kept; a few of models of 16,000 tensors, 1-2 MB each: as many as fit). The value just put is
kept whatever its size, as with one client of a very large model. Everything is dropped when
the server is idle (:func:`forget_all`, from the host's trim)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from optserve._recent import Recent

V = TypeVar("V")

#: what a kept entry costs beyond its header and value (the dict slot, the bytes object, the
#: value's own object)
ENTRY_OVERHEAD = 200
#: a str in a tuple: the object (about 49 bytes plus its characters) and its pointer
STR_OVERHEAD = 57

_every: list[KeptByHeader[object]] = []


def names_bytes(names: tuple[str, ...]) -> int:
    """About what a tuple of names holds in memory."""
    return 56 + sum(len(n) + STR_OVERHEAD for n in names)


class KeptByHeader(Generic[V]):
    """Values by header bytes, at most ``max_bytes`` charged (header plus ``weigh(value)``)
    and ``max_entries`` of them, least recently used dropped first; safe across threads."""

    def __init__(self, max_bytes: int, weigh: Callable[[V], int],
                 max_entries: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._weigh = weigh
        self._kept: Recent[bytes, V] = Recent(max_entries, max_bytes, oversized=True)
        _every.append(self)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def charged(self) -> int:
        """The bytes the kept values are charged."""
        return self._kept.held

    def get(self, header: bytes) -> V | None:
        return self._kept.get(header)

    def __contains__(self, header: bytes) -> bool:
        return header in self._kept

    def put(self, header: bytes, value: V) -> None:
        self._kept.put(header, value, len(header) + self._weigh(value) + ENTRY_OVERHEAD)

    def clear(self) -> None:
        self._kept.clear()


def forget_all() -> None:
    """Drop everything kept (and the headers it is kept by): the server is idle."""
    for kept in _every:
        kept.clear()
