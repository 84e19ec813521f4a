"""A refused option names where the client gave it: the group it is in (when several groups
change at once, in a create's ``param_groups`` or a step's option changes), and the option the
client sent rather than one the group already held that torch's message also mentions."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def two_groups(app_client: TestClient) -> str:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1},
        "param_groups": [{"params": {"w": vector([1.0, 2.0])}},
                         {"params": {"b": vector([3.0])}}]})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def refused_field(r: Any) -> str:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return str(r.json()["field"])


@pytest.mark.parametrize("changes", [
    [{"lr": -1.0}, {"lr": 0.2}],
    {"0": {"lr": -1.0}, "1": {"lr": 0.2}},
    {"1": {"lr": 0.2}, "0": {"lr": -1.0}},
])
def test_a_step_names_the_group_whose_option_is_refused(app_client: TestClient,
                                                       changes: Any) -> None:
    sid = two_groups(app_client)
    r = app_client.post(f"/v1/sessions/{sid}/step", json={
        "grads": {"w": vector([0.1, 0.1]), "b": vector([0.1])}, "param_groups": changes})
    assert refused_field(r) == "param_groups.0.lr"
    assert app_client.get(f"/v1/sessions/{sid}").json()["version"] == 0


def test_a_create_names_the_group_whose_option_is_refused(app_client: TestClient) -> None:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1},
        "param_groups": [{"params": {"w": vector([1.0])}, "lr": -1.0},
                         {"params": {"b": vector([3.0])}, "lr": 0.2}]})
    assert refused_field(r) == "param_groups.0.lr"


@pytest.mark.parametrize("how", ["patch", "step"])
def test_the_option_sent_is_named_not_one_the_group_held(app_client: TestClient,
                                                         how: str) -> None:
    """SGD's "Nesterov momentum requires a momentum and zero dampening", for a ``nesterov``
    sent to a group without momentum, is about ``nesterov``."""
    sid = two_groups(app_client)
    if how == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/1", json={"nesterov": True})
    else:
        r = app_client.post(f"/v1/sessions/{sid}/step", json={
            "grads": {"b": vector([0.1])}, "param_groups": {"1": {"nesterov": True}}})
    assert refused_field(r) == "param_groups.1.nesterov"


@pytest.mark.parametrize("entry", [0, False, "", []])
def test_a_step_refuses_a_group_change_that_is_not_an_object(app_client: TestClient,
                                                             entry: Any) -> None:
    """In the list form only ``null`` and ``{}`` leave a group alone: any other entry that is
    not an object is refused (as in the keyed form), not taken for "no change"."""
    sid = two_groups(app_client)
    r = app_client.post(f"/v1/sessions/{sid}/step", json={
        "grads": {"w": vector([0.1, 0.1])}, "param_groups": [entry, {"lr": 0.2}]})
    assert refused_field(r) == "param_groups.0"
    assert app_client.get(f"/v1/sessions/{sid}").json()["version"] == 0


def _muon(app_client: TestClient) -> str:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "Muon", "options": {"lr": 0.02},
        "params": {"w": {"dtype": "float32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize(("option", "value"), [("ns_steps", 100),
                                               ("adjust_lr_fn", "bogus")])
@pytest.mark.parametrize("how", ["create", "patch", "step"])
def test_muons_refusals_name_the_option_not_one_its_words_contain(
        app_client: TestClient, how: str, option: str, value: Any) -> None:
    """Muon's "Number of steps must be less than 100" named ``eps`` (the hint "eps" was read
    in "steps") and "Adjust learning rate function ... is not supported" named ``lr``; they
    name ``ns_steps`` and ``adjust_lr_fn``, and the session is unchanged."""
    import torch

    grads = {"w": {"dtype": "float32", "shape": [2, 2], "data": [0.5, -0.25, 0.125, 1.0]}}
    if how == "create":
        r = app_client.post("/v1/sessions", json={
            "optimizer": "Muon", "options": {"lr": 0.02, option: value},
            "params": {"w": {"dtype": "float32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}}})
        assert refused_field(r) == f"options.{option}"
        return
    sid = _muon(app_client)
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    if how == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0", json={option: value})
    else:
        r = app_client.post(f"/v1/sessions/{sid}/step",
                            json={"grads": grads, "param_groups": {"0": {option: value}}})
    assert refused_field(r) == f"param_groups.0.{option}"
    assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
    # the session steps on as torch's Muon does
    r = app_client.post(f"/v1/sessions/{sid}/step", json={"grads": grads})
    assert r.status_code == 200, r.text
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    opt = torch.optim.Muon([w], lr=0.02)
    w.grad = torch.tensor([[0.5, -0.25], [0.125, 1.0]])
    opt.step()
    got = app_client.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]["data"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32).reshape(2, 2), w.detach())
