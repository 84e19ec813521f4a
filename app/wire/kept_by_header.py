"""What a server keeps per safetensors header: a client sends the same header with every step,
so work derived from it (a fingerprint's sampling plan, a log record's layout) is done once.
A few are kept, the least recently used dropped first, and all of them when the server is idle
(:func:`forget_all`, from the host's trim)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")

_every: list[KeptByHeader[object]] = []


class KeptByHeader(Generic[V]):
    """At most ``keep`` values by header bytes; safe across threads."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._values: OrderedDict[bytes, V] = OrderedDict()
        self._lock = threading.Lock()
        _every.append(self)  # type: ignore[arg-type]

    def get(self, header: bytes) -> V | None:
        with self._lock:
            value = self._values.get(header)
            if value is not None:
                self._values.move_to_end(header)
            return value

    def __contains__(self, header: bytes) -> bool:
        with self._lock:
            return header in self._values

    def put(self, header: bytes, value: V) -> None:
        with self._lock:
            self._values[header] = value
            self._values.move_to_end(header)
            while len(self._values) > self.keep:
                self._values.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def forget_all() -> None:
    """Drop everything kept (and the headers it is kept by): the server is idle."""
    for kept in _every:
        kept.clear()
