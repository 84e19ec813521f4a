"""Route-side metrics: outcomes per session and the decode/encode phases of a step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request

from app.errors import OptserveError


def metrics_of(request: Request) -> Any:
    return request.app.state.metrics


@contextmanager
def outcome(metrics: Any, counter: Any, session_id: str) -> Iterator[dict[str, str]]:
    """Count one request under its outcome: ``ok``, a problem ``code``, or whatever the
    route sets in the yielded dict's ``outcome`` (e.g. ``skipped``)."""
    result = {"outcome": "ok"}
    try:
        yield result
    except OptserveError as exc:
        result["outcome"] = exc.code
        raise
    except BaseException:
        result["outcome"] = "error"
        raise
    finally:
        # Unknown ids get no series of their own: a client must not be able to grow the
        # metrics without bound by inventing session ids.
        known = result["outcome"] != "session_not_found"
        label = session_id if known and metrics.per_session else ""
        metrics.count(counter, label, result["outcome"])


@contextmanager
def phase(request: Request, name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics = metrics_of(request)
        metrics.series(metrics.step_phase, name).observe(time.perf_counter() - started)
