"""A tensor ``lr`` (a one-element JSON tensor) in a session with a scheduler that steps per
optimizer step. Torch's schedulers fill a tensor lr in place; the service's checks step a
scheduler on throwaway copies (a create's probe, add_param_group's and a step's dry run), and
none of them may fill the tensor the session then keeps: the create, the added group and the
step with an lr change all equal torch's, bitwise."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

SCHED = {"name": "ExponentialLR", "options": {"gamma": 0.5}}
P0 = [1.0, -2.0, 3.0, 0.5]
G = [0.1, -0.2, 0.3, 0.05]


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def scalar(value: float, dtype: str = "float32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": [], "data": [value]}


def group_lrs(app_client: TestClient, sid: str) -> list[torch.Tensor | float]:
    """Each group's lr as the exported state dict holds it (a tensor stays a tensor)."""
    r = app_client.get(f"/v1/sessions/{sid}/state_dict")
    assert r.status_code == 200, r.text
    out: list[torch.Tensor | float] = []
    for g in r.json()["param_groups"]:
        lr = g["lr"]
        out.append(torch.tensor(lr["data"], dtype=getattr(torch, lr["dtype"])).reshape(
            lr["shape"]) if isinstance(lr, dict) else lr)
    return out


def create(app_client: TestClient, **body: Any) -> str:
    r = app_client.post("/v1/sessions", json={"optimizer": "Adam", "scheduler": SCHED, **body})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize("where", ["options", "param_groups"])
def test_a_create_with_a_tensor_lr_starts_at_that_lr(app_client: TestClient, where: str) -> None:
    lr = {"lr": scalar(0.1)}
    if where == "options":
        sid = create(app_client, options=lr, params={"w": vector(P0)})
    else:
        sid = create(app_client, param_groups=[{"params": {"w": vector(P0)}, **lr}])
    opt = torch.optim.Adam([torch.tensor(P0)], lr=torch.tensor(0.1))
    torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    assert torch.equal(torch.as_tensor(group_lrs(app_client, sid)[0]),
                       opt.param_groups[0]["lr"])


def test_an_added_group_keeps_its_tensor_lr(app_client: TestClient) -> None:
    sid = create(app_client, params={"w": vector(P0)})
    r = app_client.post(f"/v1/sessions/{sid}/param_groups",
                        json={"params": {"b": vector(P0)}, "lr": scalar(0.1)})
    assert r.status_code == 201, r.text
    assert torch.equal(torch.as_tensor(group_lrs(app_client, sid)[1]), torch.tensor(0.1))


def test_a_tensor_lr_with_a_step_is_the_lr_the_step_uses(app_client: TestClient) -> None:
    sid = create(app_client, options={"lr": 0.01}, params={"w": vector(P0)})
    r = app_client.post(f"/v1/sessions/{sid}/step", json={
        "grads": {"w": vector(G)}, "param_groups": {"0": {"lr": scalar(0.05, "float64")}}})
    assert r.status_code == 200, r.text
    p = torch.tensor(P0)
    opt = torch.optim.Adam([p], lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    opt.param_groups[0]["lr"] = torch.tensor(0.05, dtype=torch.float64)
    p.grad = torch.tensor(G)
    opt.step()
    sched.step()
    assert torch.equal(torch.tensor(r.json()["params"]["w"]["data"]), p)
    assert r.json()["lr"] == [opt.param_groups[0]["lr"].item()]
    assert torch.equal(torch.as_tensor(group_lrs(app_client, sid)[0]),
                       opt.param_groups[0]["lr"])


@pytest.mark.parametrize("binary", [False, True])
def test_a_session_with_a_tensor_lr_takes_its_own_state_dict_back(app_client: TestClient,
                                                                  binary: bool) -> None:
    """torch's scheduler keeps a clone of a tensor lr as the group's ``initial_lr``: the
    exported state holds a tensor there, and importing it back is taken, as torch's
    ``load_state_dict`` takes it."""
    sid = create(app_client, options={"lr": scalar(0.1)}, params={"w": vector(P0)})
    assert app_client.post(f"/v1/sessions/{sid}/step",
                           json={"grads": {"w": vector(G)}}).status_code == 200
    accept = "application/octet-stream" if binary else "application/json"
    exported = app_client.get(f"/v1/sessions/{sid}/state_dict", headers={"accept": accept})
    assert exported.status_code == 200, exported.text
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    r = app_client.put(f"/v1/sessions/{sid}/state_dict", content=exported.content,
                       headers={"content-type": accept})
    assert r.status_code == 200, r.text
    assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
