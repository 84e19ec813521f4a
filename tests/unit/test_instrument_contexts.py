"""``app.api.instrument``'s contexts: a step's outcome counted under what ended it, and its
phases timed whether they end or raise."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from starlette.requests import Request

from app.api.instrument import outcome, phase
from app.errors import Invalid, NotFound
from app.observability import Metrics


def _count(m: Metrics, session: str, outcome_: str) -> float:
    value = m.registry.get_sample_value("optserve_steps_total",
                                        {"session": session, "outcome": outcome_})
    return value or 0.0


def test_outcome_counts_ok_a_set_outcome_a_problem_and_any_other_error() -> None:
    m = Metrics()
    with outcome(m, m.steps, "s"):
        pass
    with outcome(m, m.steps, "s") as counted:
        counted["outcome"] = "skipped"
    with pytest.raises(Invalid), outcome(m, m.steps, "s"):
        raise Invalid("no", code="invalid_body")
    with pytest.raises(KeyError), outcome(m, m.steps, "s"):
        raise KeyError("boom")
    with pytest.raises(NotFound), outcome(m, m.steps, "other"):
        raise NotFound("gone", code="session_not_found")
    assert [_count(m, "s", o) for o in ("ok", "skipped", "invalid_body", "error")] == [1, 1, 1, 1]
    # (an unknown id gets no series of its own)
    assert _count(m, "", "session_not_found") == 1
    assert _count(m, "other", "session_not_found") == 0


def test_a_phase_is_timed_when_it_raises_too() -> None:
    app = FastAPI()
    app.state.metrics = m = Metrics()
    request = Request({"type": "http", "app": app, "headers": [], "method": "POST", "path": "/"})
    with phase(request, "decode"):
        pass
    with pytest.raises(ValueError), phase(request, "decode"):
        raise ValueError("bad body")
    assert m.registry.get_sample_value("optserve_step_phase_seconds_count",
                                       {"phase": "decode"}) == 2
