"""The bound on the connections the server holds open (``OPTSERVE_MAX_CONNECTIONS``).

Every open connection holds a file descriptor, and so does every file the engine opens (a
session's log, a snapshot being written, a directory entry being read, the folder fsynced
after a rename). Without a bound a client that opens connections and sends nothing takes every
descriptor the process may have (``RLIMIT_NOFILE``): the server's file operations then fail
with EMFILE, and a new connection cannot even be accepted. So the HTTP connections (both of
uvicorn's HTTP/1.1 protocols, :mod:`app.api.malformed_http`) and the same-host transport's
(:mod:`app.transport.local`) share one count, :class:`ConnectionSlots`, on ``app.state``: a
connection past it is answered at once with a 503 ``too_many_connections`` problem (with
``Retry-After``) and closed, the same-host one closed; it never reaches the app.

The default leaves a reserve of descriptors for the server's own files: the soft
``RLIMIT_NOFILE`` less a quarter of it, and at least 64 (1024 -> 768, 65536 -> 49152), never
fewer than 8. A refused HTTP connection is kept after its answer while its client sends (its
reading side drained and dropped, so that the answer is not lost to a reset as a request, and
a body that may be long, still arrives: :data:`UPLOAD_LINGER_S` at most, closed after
:data:`LINGER_S` without a byte), at most :data:`MAX_LINGERING` of them at once (past that
they are closed at once): with
the idle head timeout (``OPTSERVE_HEAD_TIMEOUT_S``), that bounds the descriptors held for
connections at ``limit + MAX_LINGERING``.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from typing import Any

import orjson

#: the descriptors kept for the server's files at least, and as a share of the soft limit
RESERVE_MIN = 64
RESERVE_SHARE = 4
#: the fewest connections a default allows, whatever the descriptor limit
FLOOR = 8
#: an unlimited ``RLIMIT_NOFILE`` is taken as this
UNLIMITED = 1 << 20
#: connections kept open at once to drain after an answer that closes them (refused ones,
#: and those of :mod:`app.api.lingering_close`), each for :data:`LINGER_S` at most (one
#: answered early while its client uploads, or refused while its client sends:
#: :data:`UPLOAD_LINGER_S`)
MAX_LINGERING = 32
LINGER_S = 1.0
#: the linger of a connection closed after an early answer (a 413, a 401, ...) while its
#: client uploads the body (:mod:`app.api.lingering_close`), as nginx's lingering close: what
#: arrives is dropped until the client closes, for :data:`UPLOAD_LINGER_S` in all at most, and
#: for :data:`UPLOAD_QUIET_S` at most after the last bytes arrived
UPLOAD_LINGER_S = 30.0
UPLOAD_QUIET_S = 5.0
#: the ``Retry-After`` of a refused connection, in seconds
RETRY_AFTER_S = 1
#: refusals are logged at most once in this many seconds (with how many there were)
WARN_EVERY_S = 10.0

log = logging.getLogger("optserve.api")


def default_limit(soft: int | None = None) -> int:
    """The connections allowed by default, for the soft descriptor limit ``soft`` (this
    process's when None)."""
    soft = min(soft_limit() if soft is None else soft, UNLIMITED)
    return max(FLOOR, soft - max(RESERVE_MIN, soft // RESERVE_SHARE))


def soft_limit() -> int:
    """This process's soft descriptor limit (an unlimited one as :data:`UNLIMITED`)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED if soft == resource.RLIM_INFINITY or soft < 0 else soft


def reserve_warning(setting: int, soft: int | None = None) -> str | None:
    """What to warn about a set ``OPTSERVE_MAX_CONNECTIONS`` (``setting``; 0: the default)
    that leaves fewer descriptors for the server's files than the default would, or None."""
    soft = soft_limit() if soft is None else soft
    if not setting or setting <= default_limit(soft):
        return None
    return (f"OPTSERVE_MAX_CONNECTIONS={setting} leaves {max(soft - setting, 0)} of this "
            f"process's {soft} file descriptors (ulimit -n) for its files: with that many "
            "connections open, operations may fail (503 out_of_file_descriptors); raise the "
            f"limit or leave the setting at 0 ({default_limit(soft)} here)")


class Bounded:
    """A count of things held at once against ``limit`` (thread-safe: the same-host transport
    counts from its connections' threads): connections, refused ones kept to drain, same-host
    bindings, the bytes of their memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int = 1) -> bool:
        """Count ``n`` more: False (not counted) when they would pass ``limit``."""
        with self._lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            return True

    def give(self, n: int = 1) -> None:
        """``n`` counted by :meth:`take` let go."""
        with self._lock:
            self.held -= n


class ConnectionSlots(Bounded):
    """How many connections are open, HTTP and same-host together, against ``limit``
    (:meth:`take` as one opens, :meth:`give` as it closes), and the refused ones kept to
    drain (:meth:`linger`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._lingering = Bounded(MAX_LINGERING)
        #: connections refused since the last warning, and when that was (monotonic)
        self._unwarned = 0
        self._warned_at = -WARN_EVERY_S

    @property
    def open(self) -> int:
        """The connections open now."""
        return self.held

    @property
    def lingering(self) -> int:
        """The connections kept to drain after their answer now."""
        return self._lingering.held

    def refused(self, kind: str) -> None:
        """Log a refused connection (``kind``: HTTP or same-host), at most once in
        :data:`WARN_EVERY_S` with how many there were since (a flood of connections is not
        a flood of log lines)."""
        with self._lock:
            self._unwarned += 1
            now = time.monotonic()
            if now - self._warned_at < WARN_EVERY_S:
                return
            count, self._unwarned, self._warned_at = self._unwarned, 0, now
        log.warning("%d %s connection(s) refused: %d open, the most allowed "
                    "(OPTSERVE_MAX_CONNECTIONS)", count, kind, self.limit)

    def linger(self) -> bool:
        """Count a connection kept to drain after its answer: False when
        :data:`MAX_LINGERING` are."""
        return self._lingering.take()

    def done_lingering(self) -> None:
        self._lingering.give()


def slots_of(app: Any) -> ConnectionSlots | None:
    """The connection count of the served app (``app.state.connections``), None without one."""
    slots = getattr(getattr(app, "state", None), "connections", None)
    return slots if isinstance(slots, ConnectionSlots) else None


def refusal_body(limit: int) -> bytes:
    """The 503 problem answering a connection past the limit."""
    return orjson.dumps({
        "type": "urn:optserve:problem:too_many_connections", "title": "Too many connections",
        "status": 503, "code": "too_many_connections",
        "detail": f"the server holds its most connections ({limit}, OPTSERVE_MAX_CONNECTIONS); "
                  f"retry after {RETRY_AFTER_S} s; the connection is closed"})
