"""A step's base version refused names where the client gave it: ``If-Match`` when it came in
that header (it named ``base_version``, a field the request did not have; a conditional import
named ``If-Match`` already), ``base_version`` when it came in the query. Nothing is applied; a
step whose ``If-Match`` is within the bound steps as torch does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def session(c: TestClient, sid: str, **extra: Any) -> None:
    r = c.post("/v1/sessions", json={"id": sid, "optimizer": "SGD", "options": {"lr": 0.5},
                                     "params": {"w": vector([1.0, 2.0])}, **extra})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("given", ["header", "query"])
def test_a_refused_base_version_names_the_header_or_query_it_came_in(
        app_client: TestClient, given: str) -> None:
    c = app_client
    sid = f"if-match-{given}"
    session(c, sid, max_staleness=0)
    body = {"grads": {"w": vector([0.25, -0.5])}}
    assert c.post(f"/v1/sessions/{sid}/step", json=body).status_code == 200
    field = "If-Match" if given == "header" else "base_version"

    def send(version: int) -> Any:
        if given == "header":
            return c.post(f"/v1/sessions/{sid}/step", json=body,
                          headers={"If-Match": f'"{version}"'})
        return c.post(f"/v1/sessions/{sid}/step?base_version={version}", json=body)

    before = c.get(f"/v1/sessions/{sid}/params").json()
    for version, status, code in ((9, 422, "invalid_base_version"),
                                  (0, 409, "stale_gradient")):
        r = send(version)
        assert r.status_code == status, r.text
        assert (r.json()["code"], r.json()["field"]) == (code, field)
        assert c.get(f"/v1/sessions/{sid}/params").json() == before
    r = send(1)
    assert r.status_code == 200, r.text
    got = c.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]["data"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32), two_sgd_steps())


def two_sgd_steps() -> torch.Tensor:
    """``[1, 2]`` after two of torch's SGD steps (lr 0.5) on the gradient ``[0.25, -0.5]``:
    what a session of this module holds after its two steps."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(2):
        w.grad = torch.tensor([0.25, -0.5])
        opt.step()
    return w.detach()


def test_an_lbfgs_steps_refused_if_match_names_it(app_client: TestClient) -> None:
    c = app_client
    r = c.post("/v1/sessions", json={"id": "if-match-lbfgs", "optimizer": "LBFGS",
                                     "params": {"w": vector([1.0, 2.0])}})
    assert r.status_code == 201, r.text
    r = c.post("/v1/sessions/if-match-lbfgs/step", headers={"If-Match": '"9"'})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_base_version", "If-Match")


def test_a_steps_if_match_names_one_version(app_client: TestClient) -> None:
    """A step's ``If-Match`` is its base version, not a precondition (docs/protocol.md,
    "Request headers"): ``*`` or a list names no one version, a 422 ``invalid_base_version``
    naming ``If-Match``, and the header on two lines a 400 ``bad_request`` naming it, nothing
    applied, where the strict preconditions take all three; ``W/"1"`` is version 1 there and
    steps as torch does."""
    c = app_client
    sid = "if-match-one-version"
    session(c, sid)
    body = {"grads": {"w": vector([0.25, -0.5])}}
    assert c.post(f"/v1/sessions/{sid}/step", json=body).status_code == 200
    before = c.get(f"/v1/sessions/{sid}/params").json()
    for headers, status, code in (([("If-Match", "*")], 422, "invalid_base_version"),
                                  ([("If-Match", '"1", "0"')], 422, "invalid_base_version"),
                                  ([("If-Match", '"1"'), ("If-Match", '"0"')], 400,
                                   "bad_request")):
        r = c.post(f"/v1/sessions/{sid}/step", json=body, headers=headers)
        assert r.status_code == status, (headers, r.text)
        assert (r.json()["code"], r.json()["field"]) == (code, "If-Match")
        assert c.get(f"/v1/sessions/{sid}/params").json() == before
    r = c.post(f"/v1/sessions/{sid}/step", json=body, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert torch.equal(torch.tensor(r.json()["params"]["w"]["data"], dtype=torch.float32),
                       two_sgd_steps())
