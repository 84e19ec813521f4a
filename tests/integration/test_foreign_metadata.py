"""What other safetensors writers put in ``__metadata__`` (Hugging Face's ``"format": "pt"``) is
ignored in every body of tensors, as docs/protocol.md says: a create and an added group too,
which took it for a create field (422 ``unknown_field``) or a group option (422
``unknown_option``). A key that is neither theirs nor ours is still refused. Values are
compared with in-process torch."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from tests.torch_reference import tensors_from_json

pytestmark = pytest.mark.integration
BIN_CT = {"content-type": "application/octet-stream"}
W0 = torch.tensor([1.0, -2.0, 0.5])
V0 = torch.tensor([[0.25, 4.0]])
GW, GV = torch.tensor([0.5, 0.25, -1.0]), torch.tensor([[2.0, -0.5]])


def test_format_in_a_create_and_an_added_group_is_ignored(app_client: TestClient) -> None:
    body = save({"w": W0}, metadata={"format": "pt", "optimizer": "SGD", "id": "hf",
                                    "options": '{"lr": 0.1, "momentum": 0.9}'})
    r = app_client.post("/v1/sessions", content=body, headers=BIN_CT)
    assert r.status_code == 201, r.text
    r = app_client.post("/v1/sessions/hf/param_groups", headers=BIN_CT,
                        content=save({"v": V0}, metadata={"format": "pt", "lr": "0.5"}))
    assert r.status_code == 201, r.text
    first, added = r.json()["param_groups"]
    assert set(added) == set(first) and "format" not in added  # SGD's options, nothing more

    r = app_client.post("/v1/sessions/hf/step", json={"grads": {
        "w": {"dtype": "float32", "shape": [3], "data": GW.tolist()},
        "v": {"dtype": "float32", "shape": [1, 2], "data": GV.flatten().tolist()}}})
    assert r.status_code == 200, r.text
    w, v = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(V0.clone())
    local = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    local.add_param_group({"params": [v], "lr": 0.5})
    w.grad, v.grad = GW.clone(), GV.clone()
    local.step()
    got = tensors_from_json(r.json()["params"])
    assert torch.equal(got["w"], w.detach()) and torch.equal(got["v"], v.detach())
    assert r.json()["lr"] == [0.1, 0.5]


@pytest.mark.parametrize("path,metadata,field", [
    ("/v1/sessions", {"format": "pt", "optimizer": "SGD", "colour": "red"}, "colour"),
    ("/v1/sessions/other/param_groups", {"format": "pt", "colour": "red"},
     "param_groups.1.colour"),
])
def test_other_unknown_metadata_is_still_refused(app_client: TestClient, path: str,
                                                 metadata: dict[str, str], field: str) -> None:
    r = app_client.post("/v1/sessions", json={
        "id": "other", "optimizer": "SGD", "options": {"lr": 0.1},
        "params": {"w": {"dtype": "float32", "shape": [3], "data": W0.tolist()}}})
    assert r.status_code == 201, r.text
    before = app_client.get("/v1/sessions/other").json()
    r = app_client.post(path, content=save({"v": V0}, metadata=metadata), headers=BIN_CT)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert r.json()["code"] in ("unknown_field", "unknown_option")
    assert app_client.get("/v1/sessions/other").json() == before
    assert [s["id"] for s in app_client.get("/v1/sessions").json()["sessions"]] == ["other"]
