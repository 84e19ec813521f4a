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
