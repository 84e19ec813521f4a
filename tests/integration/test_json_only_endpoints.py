"""The endpoints that take only a JSON body (``PATCH`` of a session and of a param group,
``POST .../zero_grad``, ``POST .../scheduler/step``) refuse another ``Content-Type`` with a 415
whose detail asks for JSON only: the other endpoints' "send application/json or
application/octet-stream" would send a client on to a second 415."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration
SESSION = {"id": "json-only", "optimizer": "SGD", "options": {"lr": 0.5},
           "params": {"x": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}},
           "scheduler": {"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}}}
CALLS = [("PATCH", "/v1/sessions/json-only", b'{"metrics": false}'),
         ("PATCH", "/v1/sessions/json-only/param_groups/0", b'{"lr": 0.1}'),
         ("POST", "/v1/sessions/json-only/zero_grad", b"{}"),
         ("POST", "/v1/sessions/json-only/scheduler/step", b"{}")]


@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream"])
@pytest.mark.parametrize("method,path,body", CALLS, ids=[f"{m} {p}" for m, p, _ in CALLS])
def test_another_content_type_is_told_to_send_json(app_client: TestClient, ctype: str,
                                                   method: str, path: str,
                                                   body: bytes) -> None:
    assert app_client.post("/v1/sessions", json=SESSION).status_code == 201
    assert app_client.post("/v1/sessions/json-only/grads", json={"grads": {"x": {
        "dtype": "float32", "shape": [2], "data": [1.0, 1.0]}}}).status_code == 200
    before = app_client.get("/v1/sessions/json-only").json()
    r = app_client.request(method, path, content=body, headers={"content-type": ctype})
    assert r.status_code == 415, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("unsupported_media_type", "content-type")
    assert repr(ctype) in problem["detail"] and "takes an application/json body" in (
        problem["detail"]), problem
    assert "octet-stream (safetensors)" not in problem["detail"], problem
    assert app_client.get("/v1/sessions/json-only").json() == before
    # the same call as JSON is taken
    r = app_client.request(method, path, content=body,
                           headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
