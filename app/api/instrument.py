"""Route-side metrics: outcomes per session and the decode/encode phases of a step."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from fastapi import Request

from app.after_answer import later
from app.errors import OptserveError


def metrics_of(request: Request) -> Any:
    return request.app.state.metrics


class _Outcome:
    """:func:`outcome`'s context (a class: a generator's context manager cost as much again
    per request)."""

    __slots__ = ("_metrics", "_counter", "_session_id", "_result")

    def __init__(self, metrics: Any, counter: Any, session_id: str) -> None:
        self._metrics, self._counter, self._session_id = metrics, counter, session_id
        self._result = {"outcome": "ok"}

    def __enter__(self) -> dict[str, str]:
        return self._result

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        result = self._result
        if exc is not None:
            result["outcome"] = outcome_of(exc)
        elif result["outcome"] == SENT_LATER:
            return  # (the answer counts itself once it is sent: :func:`counter_for`)
        count(self._metrics, self._counter, self._session_id, result["outcome"])


#: the ``outcome`` a route sets for an answer that counts its request itself once it has been
#: sent whole or cut short (a streamed step's: :func:`counter_for`)
SENT_LATER = "sent_later"


def outcome_of(exc: BaseException) -> str:
    """The outcome a request that raised ``exc`` is counted under: its problem code, or
    ``error``."""
    return exc.code if isinstance(exc, OptserveError) else "error"


def count(metrics: Any, counter: Any, session_id: str, result: str) -> None:
    """Count one request of ``session_id`` under ``result`` (after the answer)."""
    # Unknown ids get no series of their own: a client must not be able to grow the
    # metrics without bound by inventing session ids.
    known = result != "session_not_found"
    label = session_id if known and metrics.per_session else ""
    later(metrics.count, counter, label, result)


def counter_for(metrics: Any, counter: Any, session_id: str) -> Callable[[str], None]:
    """What an answer whose outcome is known only once it is sent calls with that outcome
    (the route's ``outcome`` set to :data:`SENT_LATER`)."""
    return lambda result: count(metrics, counter, session_id, result)


def outcome(metrics: Any, counter: Any, session_id: str) -> _Outcome:
    """Count one request under its outcome: ``ok``, a problem ``code``, or whatever the
    route sets in the yielded dict's ``outcome`` (e.g. ``skipped``; :data:`SENT_LATER`: the
    answer counts it)."""
    return _Outcome(metrics, counter, session_id)


class _Phase:
    """:func:`phase`'s context."""

    __slots__ = ("_request", "_name", "_started")

    def __init__(self, request: Request, name: str) -> None:
        self._request, self._name = request, name
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        elapsed = time.perf_counter() - self._started
        metrics = metrics_of(self._request)
        later(metrics.observe_phase, self._name, elapsed)


def phase(request: Request, name: str) -> _Phase:
    """Time a phase of a step (``decode``, ``encode``) into ``optserve_step_phase_seconds``,
    whether it ends or raises."""
    return _Phase(request, name)
