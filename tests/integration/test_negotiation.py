"""Content negotiation and methods: 406 on every route whose answer's media type the client's
Accept excludes (checked before any work, so nothing is applied), and a 405 that names every
method of the path in Allow."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.openapi_docs import OPERATIONS

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"
X = {"dtype": "float32", "shape": [1], "data": [2.0]}


def create(client: TestClient, sid: str) -> None:
    r = client.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                          "options": {"lr": 1.0}, "params": {"x": X}})
    assert r.status_code == 201, r.text


def assert_406(r: object, accept: str) -> None:
    from httpx import Response

    assert isinstance(r, Response)
    assert r.status_code == 406, (accept, r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM)  # the error goes out anyway
    body = r.json()
    assert body["code"] == "not_acceptable" and body["field"] == "accept"
    assert accept[:20] in body["detail"]


@pytest.mark.parametrize("accept", ["text/html", "text/csv, image/*",
                                    "application/json;q=0, text/plain",
                                    "application/xml"])
def test_json_routes_answer_406_when_accept_excludes_json(app_client: TestClient,
                                                          accept: str) -> None:
    create(app_client, "n1")
    h = {"accept": accept}
    for method, path in [("GET", "/v1/sessions"), ("GET", "/v1/sessions/n1"),
                         ("GET", "/v1/optimizers"), ("GET", "/v1/schedulers"),
                         ("GET", "/readyz"), ("GET", "/healthz"),
                         ("POST", "/v1/sessions/n1/zero_grad")]:
        assert_406(app_client.request(method, path, headers=h), accept)
    # nothing was applied: the 406 comes before any work
    r = app_client.post("/v1/sessions", headers=h, json={"id": "n2", "optimizer": "SGD",
                                                          "params": {"x": X}})
    assert_406(r, accept)
    assert app_client.get("/v1/sessions/n2").status_code == 404
    r = app_client.post("/v1/sessions/n1/grads", headers=h, json={"grads": {"x": X}})
    assert_406(r, accept)
    r = app_client.patch("/v1/sessions/n1/param_groups/0", headers=h, json={"lr": 0.5})
    assert_406(r, accept)
    r = app_client.patch("/v1/sessions/n1", headers=h, json={"max_staleness": 2})
    assert_406(r, accept)
    described = app_client.get("/v1/sessions/n1").json()
    assert described["param_groups"][0]["lr"] == 1.0 and described["version"] == 0
    assert described["max_staleness"] is None
    # tensor routes: neither JSON nor safetensors
    assert_406(app_client.post("/v1/sessions/n1/step", headers=h, json={"grads": {"x": X}}),
               accept)
    assert app_client.get("/v1/sessions/n1").json()["version"] == 0


@pytest.mark.parametrize("accept", ["application/json", "application/*", "*/*",
                                    "text/html, application/json;q=0.1",
                                    "application/problem+json", ""])
def test_json_routes_take_accept_that_includes_json(app_client: TestClient,
                                                    accept: str) -> None:
    create(app_client, "ok")
    h = {"accept": accept} if accept else {}
    for path in ("/v1/sessions", "/v1/sessions/ok", "/v1/optimizers", "/readyz", "/healthz"):
        r = app_client.get(path, headers=h)
        assert r.status_code == 200, (path, accept, r.text)
        assert r.headers["content-type"].startswith("application/json")


def test_tensor_routes_pick_the_format_from_accept(app_client: TestClient) -> None:
    create(app_client, "t")
    r = app_client.get("/v1/sessions/t/params",
                       headers={"accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    r = app_client.get("/v1/sessions/t/params", headers={"accept": "text/html, */*;q=0.1"})
    assert r.status_code == 200 and r.json()["params"]["x"]["data"] == [2.0]
    r = app_client.get("/v1/sessions/t/state_dict", headers={"accept": "text/html"})
    assert_406(r, "text/html")


@pytest.mark.parametrize("fmt,accept", [("torch", "application/json"),
                                        ("safetensors", "application/json"),
                                        ("json", "application/octet-stream"),
                                        ("torch", "application/octet-stream;q=0, */*")])
def test_a_state_format_the_accept_header_excludes_is_406(app_client: TestClient, fmt: str,
                                                          accept: str) -> None:
    """``GET .../state_dict?format=torch`` with ``Accept: application/json`` answered a
    ``torch.save`` file: the query picks the format, and an ``Accept`` that excludes its media
    type is a 406, as without the query; one that takes it answers."""
    create(app_client, "f")
    r = app_client.get("/v1/sessions/f/state_dict", params={"format": fmt},
                       headers={"accept": accept})
    assert_406(r, accept)
    media = "application/json" if fmt == "json" else "application/octet-stream"
    r = app_client.get("/v1/sessions/f/state_dict", params={"format": fmt},
                       headers={"accept": f"{media}, text/html;q=0.5"})
    assert r.status_code == 200 and r.headers["content-type"].startswith(media), r.text


@pytest.mark.parametrize("accept,path,expected", [
    # q=0 says "not this one" (RFC 9110, 12.5.1), also beside a wildcard that would take it
    ("application/json;q=0, */*", "params", "application/octet-stream"),
    ("*/*, application/json;q=0", "params", "application/octet-stream"),
    ("application/octet-stream;q=0, */*", "params", "application/json"),
    ("application/json;q=0, application/*", "state_dict", "application/octet-stream"),
    ("application/json;q=0, */*", "session", None),
    ("text/csv;q=0, text/*", "history", None),
    ("text/csv;q=0, */*", "history", "application/json"),
    # the most specific range sets a type's weight: */* at 1 does not lift JSON's 0.1
    ("application/json;q=0.1, */*", "params", "application/octet-stream"),
    ("application/json;q=0.1, */*;q=0.5", "history", "text/csv"),
    # equal weights: the order of the header, then the route's own order (JSON first)
    ("application/octet-stream, application/json", "params", "application/octet-stream"),
    ("text/html, */*;q=0.1", "params", "application/json"),
    ("application/*", "state_dict", "application/json"),
])
def test_accept_weights_follow_the_most_specific_range(app_client: TestClient, accept: str,
                                                       path: str, expected: str | None) -> None:
    create(app_client, "q")
    url = {"params": "/v1/sessions/q/params", "state_dict": "/v1/sessions/q/state_dict",
           "session": "/v1/sessions/q", "history": "/v1/sessions/q/history"}[path]
    r = app_client.get(url, headers={"accept": accept})
    if expected is None:
        assert_406(r, accept)
        return
    assert r.status_code == 200, (accept, r.text)
    assert r.headers["content-type"].split(";")[0] == expected, (accept, path)


@pytest.mark.parametrize("accept", [
    "application/octet-stream;q=2, application/json",  # would outweigh q=1: binary answered
    "application/json;q=0.5, application/octet-stream;q=inf",
    "application/octet-stream;q=nan, */*",
    "application/json;q=-1, */*",
    "application/json;q=0.0001, */*",  # four decimals
    "application/json;q=1.5",
    "application/json;q=high",
    "application/json;q=",
    "application/json;q=.5",
    'application/json;q="0.5"',
])
def test_a_weight_that_is_not_a_qvalue_is_a_400(app_client: TestClient, accept: str) -> None:
    """RFC 9110 12.4.2: a qvalue is 0 to 1 with at most three decimals. Others were taken as
    weights (q=2 over q=1, q=inf first; NaN, negatives and words as 0): a 400 naming Accept
    now, before any work, on every route that negotiates (a step too: not applied)."""
    create(app_client, "bq")
    for r in (app_client.get("/v1/sessions/bq/params", headers={"accept": accept}),
              app_client.get("/v1/sessions/bq", headers={"accept": accept}),
              app_client.post("/v1/sessions/bq/step", json={"grads": {"x": X}},
                              headers={"accept": accept})):
        assert r.status_code == 400, (accept, r.status_code, r.text)
        assert r.headers["content-type"].startswith(PROBLEM)
        body = r.json()
        assert (body["code"], body["field"]) == ("bad_request", "accept"), body
        assert body["title"] == "Malformed request header"
        assert "q is 0 to 1 with at most three decimals" in body["detail"]
    got = app_client.get("/v1/sessions/bq/params").json()
    assert (got["version"], got["params"]["x"]["data"]) == (0, [2.0])


@pytest.mark.parametrize(("accept", "expected"), [
    ("application/octet-stream;q=1.000, application/json;q=0.999", "application/octet-stream"),
    ("application/json;Q=0.5, application/octet-stream;q=0.", "application/json"),
    ("application/json;q=0.001, application/octet-stream;q=0", "application/json"),
])
def test_every_qvalue_form_is_taken(app_client: TestClient, accept: str, expected: str) -> None:
    create(app_client, "gq")
    r = app_client.get("/v1/sessions/gq/params", headers={"accept": accept})
    assert r.status_code == 200, (accept, r.text)
    assert r.headers["content-type"] == expected


def test_accept_on_two_lines_is_one_list(app_client: TestClient) -> None:
    """Two ``Accept`` lines weigh together (RFC 9110 5.3); only the first counted."""
    create(app_client, "two")
    r = app_client.get("/v1/sessions/two/params", headers=[
        ("accept", "application/json;q=0.5"), ("accept", "application/octet-stream")])
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    r = app_client.get("/v1/sessions/two/params", headers=[
        ("accept", "application/json;q=0"), ("accept", "*/*;q=0.1")])
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"


def test_a_step_whose_answer_accept_refuses_is_not_applied(app_client: TestClient) -> None:
    create(app_client, "q0")
    accept = "application/json;q=0, application/octet-stream;q=0, */*"
    step = app_client.post("/v1/sessions/q0/step", json={"grads": {"x": X}},
                           headers={"accept": accept})
    assert_406(step, accept)
    assert app_client.get("/v1/sessions/q0").json()["version"] == 0


def test_metrics_answer_prometheus_text_or_406(app_client: TestClient) -> None:
    prometheus = ("application/openmetrics-text;version=1.0.0;q=0.5,"
                  "text/plain;version=0.0.4;q=0.4,*/*;q=0.1")
    r = app_client.get("/metrics", headers={"accept": prometheus})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert_406(app_client.get("/metrics", headers={"accept": "application/json"}),
               "application/json")


def test_a_delete_has_no_body_to_negotiate(app_client: TestClient) -> None:
    create(app_client, "d")
    r = app_client.delete("/v1/sessions/d", headers={"accept": "text/html"})
    assert r.status_code == 204


def test_every_operation_with_an_answer_checks_accept() -> None:
    """The Accept check is data-driven: every operation that answers a body lists its media
    types in OPERATIONS, and only those without a body (DELETE's 204) list none."""
    without = sorted(k for k, op in OPERATIONS.items() if not op.produces)
    assert without == [("delete", "/v1/sessions/{session_id}")]


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/v1/sessions", "GET, HEAD, POST"),
    ("PUT", "/v1/sessions/x", "GET, HEAD, PATCH, DELETE"),
    ("POST", "/v1/sessions/x/params", "GET, HEAD, PUT"),
    ("GET", "/v1/sessions/x/state_dict/extra", None),
    ("PATCH", "/v1/sessions/x/state_dict", "GET, HEAD, PUT"),
    ("GET", "/v1/sessions/x/step", "POST"),
    ("POST", "/healthz", "GET, HEAD"),
])
def test_405_lists_every_method_of_the_path(app_client: TestClient, method: str, path: str,
                                            allowed: str | None) -> None:
    r = app_client.request(method, path)
    if allowed is None:
        assert r.status_code == 404
        return
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allowed
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["code"] == "method_not_allowed" and allowed in r.json()["detail"]
    for m in allowed.split(", "):  # and each of those really is routed
        assert app_client.request(m, path).status_code != 405
