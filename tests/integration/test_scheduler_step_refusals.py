"""Every refusal of ``POST .../scheduler/step``, as the live server answers it and as
docs/protocol.md's "Errors" section lists it (``missing_metric`` and ``invalid_metric`` were
not listed): each case is sent to a real server, and the code it answered must be listed under
the status it answered with (the table's row or the list's item). Nothing is changed by a
refusal."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.torch_reference import json_tensor

pytestmark = pytest.mark.integration
PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
PROBLEM = "application/problem+json"


def error_rows() -> dict[int, str]:
    """What protocol.md's "Errors" section says under each status: its table's row and its
    list's item ("- 409: ...") together."""
    text = PROTOCOL.read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows: dict[int, str] = {}
    for m in re.finditer(r"^\| (\d{3}) \|(.*)$", section, re.MULTILINE):
        rows[int(m.group(1))] = m.group(2)
    for m in re.finditer(r"^- (\d{3}): (.*?)(?=^- |\Z)", section, re.MULTILINE | re.DOTALL):
        rows[int(m.group(1))] = rows.get(int(m.group(1)), "") + " " + m.group(2)
    return rows


def session(http: httpx.Client, scheduler: dict[str, Any] | None) -> str:
    body: dict[str, Any] = {"optimizer": "SGD", "options": {"lr": 0.1},
                            "params": {"p": json_tensor(torch.ones(3))}}
    if scheduler is not None:
        body["scheduler"] = scheduler
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


PLATEAU = {"name": "ReduceLROnPlateau", "options": {"patience": 0}}
MANUAL_STEP = {"name": "StepLR", "options": {"step_size": 1}, "step_on": "manual"}
#: (scheduler, steps taken first, body of the refused step, code, field)
CASES: dict[str, tuple[dict[str, Any] | None, int, Any, str, str]] = {
    "plateau-without-metric": (PLATEAU, 0, {}, "missing_metric", "metric"),
    "plateau-metric-null": (PLATEAU, 0, {"metric": None}, "missing_metric", "metric"),
    "metric-for-steplr": (MANUAL_STEP, 0, {"metric": 1.0}, "invalid_metric", "metric"),
    "metric-a-string": (PLATEAU, 0, {"metric": "low"}, "invalid_metric", "metric"),
    "metric-a-bool": (PLATEAU, 0, {"metric": True}, "invalid_metric", "metric"),
    "metric-bad-tag": (PLATEAU, 0, {"metric": {"$float": "huge"}}, "invalid_metric", "metric"),
    "no-scheduler": (None, 0, {}, "no_scheduler", "scheduler"),
    "scheduler-raises": ({"name": "PolynomialLR", "options": {"total_iters": 2, "power": -1.0},
                          "step_on": "manual"}, 1, {}, "scheduler_failed", "scheduler"),
    "one-cycle-exhausted": ({"name": "OneCycleLR", "options": {"max_lr": 0.1, "total_steps": 1},
                             "step_on": "manual"}, 1, {}, "scheduler_exhausted", "scheduler"),
    "lr-out-of-range": ({"name": "ExponentialLR", "options": {"gamma": 1e30},
                         "step_on": "manual"}, 1, {}, "scheduler_out_of_range",
                        "param_groups.0.lr"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scheduler_step_refusals_are_answered_and_documented(http: httpx.Client,
                                                             case: str) -> None:
    scheduler, first, body, code, field = CASES[case]
    sid = session(http, scheduler)
    for _ in range(first):
        r = http.post(f"/v1/sessions/{sid}/scheduler/step")
        assert r.status_code == 200, r.text
    before = (http.get(f"/v1/sessions/{sid}").json(),
              http.get(f"/v1/sessions/{sid}/state_dict").json())
    r = http.post(f"/v1/sessions/{sid}/scheduler/step", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert (problem["code"], problem["field"]) == (code, field), problem
    assert problem["detail"]
    assert (http.get(f"/v1/sessions/{sid}").json(),
            http.get(f"/v1/sessions/{sid}/state_dict").json()) == before
    row = error_rows().get(r.status_code, "")
    assert f"`{code}`" in row, f"docs/protocol.md lists no {code} under {r.status_code}"


def test_a_non_finite_metric_sent_as_a_tag_is_taken(http: httpx.Client) -> None:
    """What the table says ``invalid_metric`` is not: NaN and ±inf as ``$float`` tags."""
    sid = session(http, PLATEAU)
    for tag in ("nan", "inf", "-inf"):
        r = http.post(f"/v1/sessions/{sid}/scheduler/step", json={"metric": {"$float": tag}})
        assert r.status_code == 200, r.text
