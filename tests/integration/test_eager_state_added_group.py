"""Adagrad makes its state at construction, for the parameters it is built with; a group added
later (``add_param_group``) gets its state at its first step, in torch as in a session. A
session's own export, taken before the added group stepped, is taken back, and the next step
equals torch's."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def test_adagrad_takes_its_own_state_back_before_an_added_group_stepped(
        app_client: TestClient) -> None:
    r = app_client.post("/v1/sessions", json={"optimizer": "Adagrad", "options": {"lr": 0.1},
                                              "params": {"w": vector([1.0, 2.0])}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = app_client.post(f"/v1/sessions/{sid}/param_groups", json={"params": {"v": vector([3.0])}})
    assert r.status_code == 201, r.text
    exported = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    assert list(exported["state"]) == ["0"]
    r = app_client.put(f"/v1/sessions/{sid}/state_dict", json=exported)
    assert r.status_code == 200, r.text
    r = app_client.post(f"/v1/sessions/{sid}/step",
                        json={"grads": {"w": vector([0.5, -0.5]), "v": vector([0.25])}})
    assert r.status_code == 200, r.text
    w, v = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    opt = torch.optim.Adagrad([w], lr=0.1)
    opt.add_param_group({"params": [v]})
    w.grad, v.grad = torch.tensor([0.5, -0.5]), torch.tensor([0.25])
    opt.step()
    assert torch.equal(torch.tensor(r.json()["params"]["w"]["data"]), w)
    assert torch.equal(torch.tensor(r.json()["params"]["v"]["data"]), v)


def test_adagrad_still_refuses_a_state_missing_a_parameter_it_made_state_for(
        app_client: TestClient) -> None:
    r = app_client.post("/v1/sessions", json={"optimizer": "Adagrad", "options": {"lr": 0.1},
                                              "params": {"w": vector([1.0]), "u": vector([2.0])}})
    sid = r.json()["id"]
    exported = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    del exported["state"]["1"]
    r = app_client.put(f"/v1/sessions/{sid}/state_dict", json=exported)
    assert r.status_code == 422 and r.json()["field"] == "state_dict.state.1", r.text
