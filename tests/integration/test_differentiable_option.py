"""``differentiable`` in a session: torch's optimizers take it (the step then runs with autograd
on, which a server-side step has no use for, but computes the same update), and so does the
service, the same way wherever options are given: at create (the defaults or a group), with
``PATCH .../param_groups/{i}``, with a step's ``param_groups`` and with ``POST
.../param_groups``; each session steps as in-process torch does with the same options. Where
torch refuses it (with ``foreach: true``: "_foreach ops don't support autograd"; with ``fused``)
every one of those refuses it alike, a 422 ``invalid_option`` naming the option given (it named
``options`` or ``param_groups.0``), and the session is unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

P0 = [1.0, -2.0, 0.5]
GRADS = [[0.1, -0.2, 0.3], [0.5, 0.25, -1.0], [-0.3, 0.4, 0.2]]


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def create(c: TestClient, options: dict[str, Any], group: dict[str, Any] | None = None) -> Any:
    return c.post("/v1/sessions", json={
        "optimizer": "Adam", "options": {"lr": 0.1, **options},
        "param_groups": [{"params": {"w": vector(P0)}, **(group or {})}]})


def step(c: TestClient, sid: str, k: int, changes: dict[str, Any] | None = None) -> Any:
    body: dict[str, Any] = {"grads": {"w": vector(GRADS[k])}}
    if changes:
        body["param_groups"] = {"0": changes}
    return c.post(f"/v1/sessions/{sid}/step", json=body)


def params(c: TestClient, sid: str) -> torch.Tensor:
    return torch.tensor(c.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]["data"])


def torch_run(options: dict[str, Any], group: dict[str, Any], changes_at_1: dict[str, Any]
              ) -> torch.Tensor:
    p = torch.tensor(P0)  # (as the session's: differentiable steps it with autograd on)
    opt = torch.optim.Adam([{"params": [p], **group}], lr=0.1, **options)
    for k, g in enumerate(GRADS):
        if k == 1:
            opt.param_groups[0].update(changes_at_1)
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach()


@pytest.mark.parametrize("how", ["defaults", "group", "patch", "step"])
def test_differentiable_is_taken_alike_everywhere_and_steps_as_torch(app_client: TestClient,
                                                                      how: str) -> None:
    on = {"differentiable": True}
    r = create(app_client, on if how == "defaults" else {}, on if how == "group" else None)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert step(app_client, sid, 0).status_code == 200
    if how == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0", json=on)
        assert r.status_code == 200, r.text
    assert step(app_client, sid, 1, on if how == "step" else None).status_code == 200
    assert step(app_client, sid, 2).status_code == 200
    group = app_client.get(f"/v1/sessions/{sid}").json()["param_groups"][0]
    assert group["differentiable"] is True
    want = torch_run(on if how == "defaults" else {}, on if how == "group" else {},
                     on if how in ("patch", "step") else {})
    assert torch.equal(params(app_client, sid), want)


def test_an_added_group_takes_differentiable_as_a_create_does(app_client: TestClient) -> None:
    sid = create(app_client, {}).json()["id"]
    r = app_client.post(f"/v1/sessions/{sid}/param_groups",
                        json={"params": {"v": vector([0.5, 0.5])}, "differentiable": True})
    assert r.status_code == 201, r.text
    assert r.json()["param_groups"][1]["differentiable"] is True
    out = app_client.post(f"/v1/sessions/{sid}/step", json={
        "grads": {"w": vector(GRADS[0]), "v": vector([1.0, -1.0])}}).json()["params"]
    p, v = torch.tensor(P0), torch.tensor([0.5, 0.5])
    opt = torch.optim.Adam([p], lr=0.1)
    opt.add_param_group({"params": [v], "differentiable": True})
    p.grad, v.grad = torch.tensor(GRADS[0]), torch.tensor([1.0, -1.0])
    opt.step()
    assert torch.equal(torch.tensor(out["w"]["data"]), p.detach())
    assert torch.equal(torch.tensor(out["v"]["data"]), v.detach())


def snapshot(c: TestClient, sid: str) -> tuple[Any, Any, Any]:
    return (c.get(f"/v1/sessions/{sid}").json(), c.get(f"/v1/sessions/{sid}/params").json(),
            c.get(f"/v1/sessions/{sid}/state_dict").json())


@pytest.mark.parametrize(("held", "given", "where", "field"), [
    ({}, {"foreach": True, "differentiable": True}, "create", "options.differentiable"),
    ({}, {"foreach": True, "differentiable": True}, "create-group",
     "param_groups.0.differentiable"),
    ({"foreach": True}, {"differentiable": True}, "patch", "param_groups.0.differentiable"),
    ({"foreach": True}, {"differentiable": True}, "step", "param_groups.0.differentiable"),
    ({"foreach": True}, {"differentiable": True}, "add", "param_groups.1.differentiable"),
    ({"differentiable": True}, {"foreach": True}, "patch", "param_groups.0.foreach"),
    ({"differentiable": True}, {"foreach": True}, "step", "param_groups.0.foreach"),
    ({"fused": True}, {"differentiable": True}, "patch", "param_groups.0.differentiable"),
])
def test_where_torch_refuses_differentiable_every_route_names_it(
        app_client: TestClient, held: dict[str, Any], given: dict[str, Any], where: str,
        field: str) -> None:
    if where.startswith("create"):
        r = create(app_client, given if where == "create" else {},
                   given if where == "create-group" else None)
        assert r.status_code == 422, r.text
        assert (r.json()["code"], r.json()["field"]) == ("invalid_option", field)
        assert app_client.get("/v1/sessions").json() == {"sessions": []}
        return
    made = create(app_client, held)
    if made.status_code != 201:  # (fused Adam on this build's CPU: torch refuses it itself)
        pytest.skip(made.json()["detail"])
    sid = made.json()["id"]
    assert step(app_client, sid, 0).status_code == 200
    before = snapshot(app_client, sid)
    if where == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0", json=given)
    elif where == "step":
        r = step(app_client, sid, 1, given)
    else:
        r = app_client.post(f"/v1/sessions/{sid}/param_groups",
                            json={"params": {"v": vector([0.5])}, **given})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_option", field)
    assert snapshot(app_client, sid) == before
    assert step(app_client, sid, 1).status_code == 200
    assert torch.equal(params(app_client, sid), params_after_two(held))


def params_after_two(options: dict[str, Any]) -> torch.Tensor:
    p = torch.tensor(P0)
    opt = torch.optim.Adam([p], lr=0.1, **options)
    for g in GRADS[:2]:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach()
