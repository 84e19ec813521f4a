"""A few values kept by key, the least recently used let go first: what a header seen again
(every step of one model sends and gets back the same one) is worked out once. The SDK keeps
the headers it made and parsed in these; the server keeps work derived from a client's
header (``app.wire.kept_by_header``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Values by key, at most ``entries`` of them and ``limit`` bytes charged (each value's
    charge is the caller's to say), the least recently used dropped first. A value charged
    more than ``limit`` is kept alone with ``oversized`` (one very large model), else not
    kept. Safe across threads."""

    def __init__(self, entries: int, limit: int, *, oversized: bool = False) -> None:
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._entries = entries
        self._limit = limit
        self._oversized = oversized
        self._held = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._items

    @property
    def held(self) -> int:
        """The bytes the kept values are charged."""
        with self._lock:
            return self._held

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V, size: int) -> None:
        if size > self._limit and not self._oversized:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._held -= old[1]
            self._items[key] = (value, size)
            self._held += size
            while len(self._items) > 1 and (len(self._items) > self._entries
                                            or self._held > self._limit):
                _, (_, dropped) = self._items.popitem(last=False)
                self._held -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._held = 0
