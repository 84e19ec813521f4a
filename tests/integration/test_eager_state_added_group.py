"""Adagrad makes its state at construction, for the parameters it is built with; a group added
later (``add_param_group``) gets its state at its first step, in torch as in a session. A
session's own export, taken before the added group stepped, is taken back, and the next step
equals torch's. A state that lacks a parameter's entry (``opt.state = defaultdict(dict)``)
loads as torch's ``load_state_dict`` loads it: that parameter's state is made afresh at its next
step; one whose first entry is empty, which torch refuses (``KeyError: 'step'``), is a 422."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.wire.tree import tree_from_json, tree_to_json

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


def _adagrad(params: list[torch.Tensor]) -> torch.optim.Adagrad:
    """Two groups, the second with its own ``initial_accumulator_value`` (a state made afresh
    at a step takes the optimizer's default, in torch: so must the session's)."""
    return torch.optim.Adagrad([{"params": params[:2]},
                                {"params": params[2:], "initial_accumulator_value": 0.5}],
                               lr=0.1, lr_decay=0.01, initial_accumulator_value=0.2)


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(n, generator=g) for n in (3, 2, 4)]


#: what each case does to the state dict torch exports after two steps
EDITS: dict[str, Callable[[dict[int, Any]], dict[int, Any]]] = {
    "empty": lambda state: {},
    "one_left_out": lambda state: {k: v for k, v in state.items() if k != 1},
    "an_empty_entry_after_a_full_one": lambda state: {0: state[0], 2: {}, 1: state[1]},
    "the_first_entry_empty": lambda state: {1: {}, 0: state[0], 2: state[2]},
}


@pytest.mark.parametrize("case", list(EDITS))
def test_adagrad_loads_a_state_lacking_parameters_as_torch_does(
        app_client: TestClient, case: str) -> None:
    """After two steps, import the session's state with an edit (every entry left out, one left
    out, an empty entry after a full one, an empty first entry): torch's own ``Adagrad`` given
    the same state dict decides. Where torch loads it, the session's exported state and its
    next two steps equal torch's bit for bit; where torch raises, the import is a 422 naming
    the entry, and the session's state and next steps are those of a torch optimizer that
    never loaded it."""
    params = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (3, 2, 4)]
    names = ["w", "b", "v"]
    local = [p.clone() for p in params]
    opt = _adagrad(local)
    body = {"optimizer": "Adagrad", "options": {"lr": 0.1, "lr_decay": 0.01,
                                                "initial_accumulator_value": 0.2},
            "param_groups": [
                {"params": {n: tree_to_json(p, b64=True) for n, p in zip(names[:2], params[:2],
                                                              strict=True)}},
                {"params": {"v": tree_to_json(params[2], b64=True)},
                 "initial_accumulator_value": 0.5}]}
    r = app_client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def step_both(step: int) -> dict[str, Any]:
        grads = _grads(step)
        for p, g in zip(local, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        r = app_client.post(f"/v1/sessions/{sid}/step", json={
            "grads": {n: tree_to_json(g, b64=True) for n, g in zip(names, grads, strict=True)}})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    for step in range(2):
        step_both(step)
    edited = copy.deepcopy(opt.state_dict())
    edited["state"] = EDITS[case](edited["state"])
    kept = copy.deepcopy(opt.state_dict())
    try:
        opt.load_state_dict(copy.deepcopy(edited))
        torch_error = None
    except KeyError as exc:  # (torch has half-loaded it: the reference is as it was)
        torch_error = exc
        opt.load_state_dict(kept)
    wire = tree_to_json(edited, b64=True)
    wire["state"] = {str(k): v for k, v in wire["state"].items()}  # (key order kept)
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    r = app_client.put(f"/v1/sessions/{sid}/state_dict", json=wire)
    if torch_error is not None:
        assert case == "the_first_entry_empty"  # (the case is what the test says it is)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "state_mismatch" and problem["field"] == "state_dict.state.1"
        assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
    else:
        assert r.status_code == 200, r.text
    exported = tree_from_json(app_client.get(f"/v1/sessions/{sid}/state_dict").json(), "sd")
    mine = opt.state_dict()
    assert [int(k) for k in exported["state"]] == list(mine["state"])
    for pid, entry in mine["state"].items():
        theirs = exported["state"][str(pid)]
        assert theirs.keys() == entry.keys(), pid
        for key, value in entry.items():
            assert torch.equal(theirs[key], value), (pid, key)
    for step in range(2, 4):
        answer = step_both(step)
        for n, p in zip(names, local, strict=True):
            assert torch.equal(tree_from_json(answer["params"][n], n), p), (step, n)
    exported = tree_from_json(app_client.get(f"/v1/sessions/{sid}/state_dict").json(), "sd")
    for pid, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(exported["state"][str(pid)][key], value), (pid, key)
