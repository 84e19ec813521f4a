"""Refusals of a request's body or its framing name the offending input in ``field``, as the
README promises of every error ("a machine-readable code and the offending field"): a state
dict import that is JSON but not an object (``body``, as every other body's ``invalid_json``),
a ``Content-Length`` that is not a number where the app reads it (under another ASGI server
than ``python -m app``, whose parser answers it first). The body over ``OPTSERVE_MAX_BODY_MB``
(``body``) is checked with the rest of the 413's in test_bad_inputs.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration
JSON_CT = {"content-type": "application/json"}
SESSION = {"id": "fields", "optimizer": "SGD", "options": {"lr": 0.5},
           "params": {"x": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}}


@pytest.mark.parametrize("body", [b"[1]", b"1", b'"state"', b"null"])
def test_a_state_dict_that_is_not_an_object_names_the_body(app_client: TestClient,
                                                           body: bytes) -> None:
    assert app_client.post("/v1/sessions", json=SESSION).status_code == 201
    before = app_client.get("/v1/sessions/fields/state_dict").json()
    r = app_client.put("/v1/sessions/fields/state_dict", content=body, headers=JSON_CT)
    assert r.status_code == 400, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("invalid_json", "body"), problem
    assert app_client.get("/v1/sessions/fields/state_dict").json() == before


def test_a_content_length_that_is_not_a_number_is_named(app_client: TestClient) -> None:
    assert app_client.post("/v1/sessions", json=SESSION).status_code == 201
    r = app_client.post("/v1/sessions/fields/grads", content=b'{"grads": {}}',
                        headers={**JSON_CT, "content-length": "abc"})
    assert r.status_code == 400, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("bad_request", "Content-Length"), problem
    assert app_client.get("/v1/sessions/fields").json()["accumulated"] == []
