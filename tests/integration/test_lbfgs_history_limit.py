"""An LBFGS session's history counts against ``OPTSERVE_MAX_SESSION_ELEMENTS``.

LBFGS keeps ``2 * history_size`` vectors of every parameter's elements between steps, so a
session of 5 elements with ``history_size`` 10**9 passed a limit of 100 and grew by 10 elements
a step without bound (as a session keeps every step's pair once a PATCH makes ``history_size``
shorter than the history it holds; a negative or fractional ``history_size``, whose second step
fails in torch, is refused as ``invalid_option`` whatever the limit). With a limit, the create,
a PATCH and an import that would take the session past it are 422 ``session_too_large``
naming ``history_size``, and change nothing; a session within it steps bitwise as torch.
Against a real server (uvicorn on 127.0.0.1).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import LiveServer, _test_settings
from tests.integration.test_lbfgs import (
    START,
    Local,
    assert_same_state,
    bitwise,
    create,
    remote_step,
    state_of,
)
from tests.torch_reference import json_tensor

pytestmark = pytest.mark.integration

LIMIT = 100  # START holds 5 elements: history_size 9 takes 5 * (1 + 18) = 95, 10 takes 105
OPTIONS = {"lr": 1, "max_iter": 5, "history_size": 9}


@pytest.fixture(scope="module")
def limited() -> Iterator[httpx.Client]:
    live = LiveServer(_test_settings(max_session_elements=LIMIT))
    with live.serving() as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def refused(r: httpx.Response, field: str) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = r.json()
    assert problem["code"] == "session_too_large" and problem["field"] == field, problem
    assert problem["limit"] == LIMIT and "OPTSERVE_MAX_SESSION_ELEMENTS" in problem["detail"]
    return problem


def post_create(http: httpx.Client, sid: str, options: dict[str, Any], **extra: Any
                ) -> httpx.Response:
    return http.post("/v1/sessions", json={
        "id": sid, "optimizer": "LBFGS", "options": options,
        "params": {n: json_tensor(t) for n, t in START.items()}, **extra})


@pytest.mark.parametrize("size", [None, 10, 10**9])
def test_a_create_whose_history_passes_the_limit_is_refused(limited: httpx.Client,
                                                            size: float | None) -> None:
    """torch's default ``history_size`` (100), one past what fits and a huge one; nothing is
    made."""
    options: dict[str, Any] = {"lr": 1} if size is None else {"lr": 1, "history_size": size}
    problem = refused(post_create(limited, "too-long", options), "options.history_size")
    if size in (None, 10):
        assert f"{5 * (1 + 2 * (size or 100))} elements" in problem["detail"]
    assert limited.get("/v1/sessions/too-long").status_code == 404
    grouped = limited.post("/v1/sessions", json={
        "id": "too-long", "optimizer": "LBFGS", "options": {"lr": 1},
        "param_groups": [{"params": {n: json_tensor(t) for n, t in START.items()},
                          **({} if size is None else {"history_size": size})}]})
    refused(grouped, "options.history_size" if size is None
            else "param_groups.0.history_size")
    assert limited.get("/v1/sessions/too-long").status_code == 404


@pytest.mark.parametrize("size", [0, -1, 2.5, 3.0, 1e300])
def test_a_history_size_torch_fails_with_is_invalid_with_a_limit_too(limited: httpx.Client,
                                                                    size: float) -> None:
    """Sizes torch's second step fails with are a 422 ``invalid_option`` at create, as a PATCH
    of them is, whether or not the elements' limit is set (not ``session_too_large``, which
    they were at create with a limit); nothing is made."""
    for body in ({"options": {"lr": 1, "history_size": size}},
                 {"options": {"lr": 1}, "param_groups": [
                     {"params": {n: json_tensor(t) for n, t in START.items()},
                      "history_size": size}]}):
        where = "options" if "param_groups" not in body else "param_groups.0"
        r = limited.post("/v1/sessions", json={
            "id": "bad-size", "optimizer": "LBFGS",
            **({} if "param_groups" in body else
               {"params": {n: json_tensor(t) for n, t in START.items()}}), **body})
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "invalid_option", problem
        assert problem["field"] == f"{where}.history_size", problem
        assert limited.get("/v1/sessions/bad-size").status_code == 404


def test_within_the_limit_steps_as_torch_and_refusals_change_nothing(limited: httpx.Client
                                                                      ) -> None:
    sid = create(limited, OPTIONS)
    # a PATCH past the limit before any step (after one, a size above the history's scratch
    # list is refused whatever the limit: tests/unit/test_lbfgs_history_size.py)
    refused(limited.patch(f"/v1/sessions/{sid}/param_groups/0", json={"history_size": 10}),
            "param_groups.0.history_size")
    assert limited.get(f"/v1/sessions/{sid}").json()["param_groups"][0]["history_size"] == 9
    local = Local(OPTIONS)
    for _ in range(3):
        answer, _ = remote_step(limited, sid)
        local.step()
    want = local.opt.state_dict()
    assert_same_state(state_of(limited, sid)["state"], want["state"])
    for n, t in local.params.items():
        assert bitwise(answer["params"][n], t.detach()), n

    # an import of a local state whose history_size is past the limit
    before = state_of(limited, sid)
    # (-1: a history size torch's step fails with, refused whatever the limit:
    # tests/unit/test_lbfgs_history_size.py)
    r = limited.patch(f"/v1/sessions/{sid}/param_groups/0", json={"history_size": -1})
    assert r.status_code == 422 and r.json()["code"] == "invalid_option", r.text
    assert r.json()["field"] == "param_groups.0.history_size", r.text
    longer = Local({**OPTIONS, "history_size": 50})
    longer.step()
    buf = io.BytesIO()
    torch.save(longer.opt.state_dict(), buf)
    refused(limited.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=buf.getvalue(),
                        headers={"content-type": "application/octet-stream"}),
            "state_dict.param_groups.0.history_size")  # (as the import's other refusals)
    after = state_of(limited, sid)
    assert_same_state(after["state"], before["state"])
    assert after["param_groups"] == before["param_groups"]

    # below the pairs the history holds: torch's later steps would fail (refused whatever
    # the limit: tests/unit/test_lbfgs_history_size.py)
    held = len(want["state"][0]["old_dirs"])
    assert held >= 2
    r = limited.patch(f"/v1/sessions/{sid}/param_groups/0", json={"history_size": held - 1})
    assert r.status_code == 422 and r.json()["code"] == "invalid_option", r.text
    assert r.json()["field"] == "param_groups.0.history_size", r.text
    assert_same_state(state_of(limited, sid)["state"], before["state"])

    # within it: a PATCH to the history it holds steps as torch's own group change
    r = limited.patch(f"/v1/sessions/{sid}/param_groups/0", json={"history_size": held})
    assert r.status_code == 200, r.text
    local.opt.param_groups[0]["history_size"] = held
    for _ in range(2):
        answer, _ = remote_step(limited, sid)
        local.step()
    assert_same_state(state_of(limited, sid)["state"], local.opt.state_dict()["state"])
    assert len(local.opt.state_dict()["state"][0]["old_dirs"]) == held
    for n, t in local.params.items():
        assert bitwise(answer["params"][n], t.detach()), n
    assert limited.delete(f"/v1/sessions/{sid}").status_code == 204
