"""The hand-written request schemas (the routes read raw bodies, so the OpenAPI document's
schemas are declared in app/api/openapi_docs.py) against the server itself: every body below is
validated against its schema AND sent to the app, and both must agree. Accepted bodies must
validate and get a 2xx; refused ones (an extra property, both or neither of data/b64, no
parameter, an integer out of range, ...) must fail the schema and get a 4xx problem."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import jsonschema_rs
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import _test_settings

DOC = create_app(_test_settings()).openapi()
T = {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}
T1 = {"dtype": "float32", "shape": [1], "data": [3.0]}
B64 = {"dtype": "float32", "shape": [2], "b64": "AACAPwAAAEA="}  # [1.0, 2.0]
_ids = itertools.count()


def validator(schema: str) -> Any:
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{schema}",
                                        "components": DOC["components"]})


def request_schema(method: str, path: str) -> str:
    ref: str = DOC["paths"][path][method]["requestBody"]["content"]["application/json"][
        "schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def new_session(client: TestClient, **extra: Any) -> str:
    sid = f"s{next(_ids)}"
    body = {"id": sid, "optimizer": "SGD", "options": {"lr": 0.1},
            "params": {"w": T, "b": T1}, **extra}
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return sid


# (label, method, path template, body, accepted?, extra create options for the session)
CASES: list[tuple[str, str, str, Any, bool, dict[str, Any]]] = [
    # create
    ("create: params", "post", "/v1/sessions", {"optimizer": "SGD", "params": {"w": T}}, True,
     {}),
    ("create: b64 tensor", "post", "/v1/sessions", {"optimizer": "Adam", "params": {"w": B64}},
     True, {}),
    ("create: param_groups", "post", "/v1/sessions",
     {"optimizer": "SGD", "options": {"lr": 0.1},
      "param_groups": [{"params": {"w": T}}, {"params": {"b": T1}, "lr": 0.5}]}, True, {}),
    ("create: everything", "post", "/v1/sessions",
     {"optimizer": "SGD", "options": {"lr": 0.1}, "params": {"w": T}, "nonfinite": "skip",
      "durability": "memory", "sync": {"workers": 2, "reduce": "sum"}, "max_staleness": 3,
      "staleness_lr": "inverse", "scheduler": {"name": "StepLR", "options": {"step_size": 2}},
      "id": None}, True, {}),
    ("create: nulls", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "scheduler": None, "sync": None,
      "max_staleness": None, "nonfinite": None, "durability": None},
     True, {}),
    # a rule is "none" or "inverse": null was taken as "none" unsaid
    ("create: staleness_lr null", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "staleness_lr": None}, False, {}),
    ("create: extra property", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "colour": "red"}, False, {}),
    ("create: params and param_groups", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "param_groups": [{"params": {"b": T1}}]},
     False, {}),
    ("create: neither params nor param_groups", "post", "/v1/sessions", {"optimizer": "SGD"},
     False, {}),
    ("create: no optimizer", "post", "/v1/sessions", {"params": {"w": T}}, False, {}),
    ("create: no parameter", "post", "/v1/sessions", {"optimizer": "SGD", "params": {}},
     False, {}),
    ("create: no param group", "post", "/v1/sessions",
     {"optimizer": "SGD", "param_groups": []}, False, {}),
    ("create: empty param group", "post", "/v1/sessions",
     {"optimizer": "SGD", "param_groups": [{"params": {}}]}, False, {}),
    ("create: every param group empty", "post", "/v1/sessions",
     {"optimizer": "SGD", "param_groups": [{"params": {}}, {"params": {}, "lr": 0.1}]},
     False, {}),
    ("create: an empty param group beside one with a parameter", "post", "/v1/sessions",
     {"optimizer": "SGD", "param_groups": [{"params": {}, "lr": 0.1}, {"params": {"w": T}}]},
     True, {}),
    ("create: tensor with data and b64", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": {**T, "b64": B64["b64"]}}}, False, {}),
    ("create: tensor without values", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": {"dtype": "float32", "shape": [2]}}}, False, {}),
    ("create: tensor extra key", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": {**T, "device": "cpu"}}}, False, {}),
    ("create: negative dimension", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": {"dtype": "float32", "shape": [-2], "data": []}}},
     False, {}),
    ("create: unknown dtype", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": {"dtype": "float8", "shape": [1], "data": [1]}}},
     False, {}),
    ("create: empty parameter name", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"": T}}, False, {}),
    ("create: max_staleness < 0", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "max_staleness": -1}, False, {}),
    ("create: max_staleness not an integer", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "max_staleness": 1.5}, False, {}),
    ("create: sync without workers", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "sync": {"reduce": "sum"}}, False, {}),
    ("create: sync workers 0", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "sync": {"workers": 0}}, False, {}),
    ("create: sync workers past 10000", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "sync": {"workers": 10001}}, False, {}),
    ("create: sync timeout 0", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "sync": {"workers": 2, "timeout_s": 0}}, False,
     {}),
    ("create: bad id", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "id": "-starts-with-dash"}, False, {}),
    ("create: bad durability", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "durability": "disk"}, False, {}),
    ("create: scheduler extra key", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T},
      "scheduler": {"name": "StepLR", "options": {"step_size": 2}, "every": 3}}, False, {}),
    ("create: scheduler name not a string", "post", "/v1/sessions",
     {"optimizer": "SGD", "params": {"w": T}, "scheduler": {"name": {"x": 1}}}, False, {}),
    # step and grads
    ("step: grads", "post", "/v1/sessions/{id}/step", {"grads": {"w": T}}, True, {}),
    ("step: b64 grads", "post", "/v1/sessions/{id}/step", {"grads": {"w": B64}}, True, {}),
    ("step: no grads (torch skips)", "post", "/v1/sessions/{id}/step", {}, True, {}),
    ("step: extra property", "post", "/v1/sessions/{id}/step",
     {"grads": {"w": T}, "lr": 0.1}, False, {}),
    ("step: tensor with data and b64", "post", "/v1/sessions/{id}/step",
     {"grads": {"w": {**T, "b64": B64["b64"]}}}, False, {}),
    ("step: grads not an object", "post", "/v1/sessions/{id}/step", {"grads": [T]}, False,
     {}),
    # an LBFGS session's step opens with nothing or its first evaluation (docs/protocol.md),
    # which the document refused ("loss" was no property of a step's body)
    ("step: LBFGS opened with its first evaluation", "post", "/v1/sessions/{id}/step",
     {"loss": 0.5, "grads": {"w": T, "b": T1}}, True,
     {"optimizer": "LBFGS", "options": {"lr": 1}}),
    ("step: LBFGS opened with nothing", "post", "/v1/sessions/{id}/step", {}, True,
     {"optimizer": "LBFGS", "options": {"lr": 1}}),
    ("step: LBFGS opened with a loss that is no number", "post", "/v1/sessions/{id}/step",
     {"loss": "one", "grads": {"w": T}}, False, {"optimizer": "LBFGS", "options": {"lr": 1}}),
    ("grads: grads", "post", "/v1/sessions/{id}/grads", {"grads": {"b": T1}}, True, {}),
    ("grads: extra property", "post", "/v1/sessions/{id}/grads",
     {"grads": {"b": T1}, "scale": 2}, False, {}),
    # params
    ("put params", "put", "/v1/sessions/{id}/params", {"params": {"b": T1}}, True, {}),
    ("put params: none", "put", "/v1/sessions/{id}/params", {"params": {}}, False, {}),
    ("put params: missing", "put", "/v1/sessions/{id}/params", {}, False, {}),
    ("put params: extra property", "put", "/v1/sessions/{id}/params",
     {"params": {"b": T1}, "version": 3}, False, {}),
    # param groups
    ("add group", "post", "/v1/sessions/{id}/param_groups", {"params": {"c": T1}, "lr": 0.01},
     True, {}),
    ("add group: no parameter (torch takes an empty group)", "post",
     "/v1/sessions/{id}/param_groups", {"params": {}}, True, {}),
    ("add group: no params", "post", "/v1/sessions/{id}/param_groups", {"lr": 0.01}, False,
     {}),
    ("group options", "patch", "/v1/sessions/{id}/param_groups/{index}", {"lr": 0.05}, True, {}),
    ("group options: params", "patch", "/v1/sessions/{id}/param_groups/{index}",
     {"params": {"w": T}}, False, {}),
    # scheduler step
    ("scheduler step: no body fields", "post", "/v1/sessions/{id}/scheduler/step", {}, True,
     {"scheduler": {"name": "StepLR", "options": {"step_size": 2}, "step_on": "manual"}}),
    ("scheduler step: metric", "post", "/v1/sessions/{id}/scheduler/step", {"metric": 0.5},
     True, {"scheduler": {"name": "ReduceLROnPlateau", "step_on": "manual"}}),
    # NaN and infinities as tags (README, docs/protocol.md), which the document refused
    *[(f"scheduler step: metric {tag}", "post", "/v1/sessions/{id}/scheduler/step",
       {"metric": {"$float": tag}}, True,
       {"scheduler": {"name": "ReduceLROnPlateau", "step_on": "manual"}})
      for tag in ("nan", "inf", "-inf")],
    *[(f"scheduler step: metric tag {tag!r}", "post", "/v1/sessions/{id}/scheduler/step",
       {"metric": tag}, False,
       {"scheduler": {"name": "ReduceLROnPlateau", "step_on": "manual"}})
      for tag in ({"$float": "NaN"}, {"$float": 1}, {"$float": "nan", "x": 1}, {})],
    ("scheduler step: metric not a number", "post", "/v1/sessions/{id}/scheduler/step",
     {"metric": "low"}, False,
     {"scheduler": {"name": "ReduceLROnPlateau", "step_on": "manual"}}),
    ("scheduler step: extra property", "post", "/v1/sessions/{id}/scheduler/step",
     {"metric": 0.5, "epoch": 3}, False,
     {"scheduler": {"name": "ReduceLROnPlateau", "step_on": "manual"}}),
    # row pulls: lists, or int64 JSON tensors (docs/protocol.md), which the document refused
    ("rows: a list", "post", "/v1/sessions/{id}/params/rows", {"rows": {"w": [1, 0, 1]}},
     True, {}),
    ("rows: an int64 tensor", "post", "/v1/sessions/{id}/params/rows",
     {"rows": {"w": {"dtype": "int64", "shape": [2], "data": [1, 0]}}}, True, {}),
    ("rows: a b64 int64 tensor", "post", "/v1/sessions/{id}/params/rows",
     {"rows": {"w": {"dtype": "int64", "shape": [1], "b64": "AQAAAAAAAAA="}}}, True, {}),
    ("rows: a tensor with data and b64", "post", "/v1/sessions/{id}/params/rows",
     {"rows": {"w": {"dtype": "int64", "shape": [1], "data": [1], "b64": "AQAAAAAAAAA="}}},
     False, {}),
    ("rows: not a list", "post", "/v1/sessions/{id}/params/rows", {"rows": {"w": 1}}, False,
     {}),
    # parameter-server options
    ("configure", "patch", "/v1/sessions/{id}", {"max_staleness": 4, "staleness_lr": "inverse"},
     True, {}),
    ("configure: sync", "patch", "/v1/sessions/{id}", {"sync": {"workers": 3}}, True, {}),
    ("configure: staleness_lr null", "patch", "/v1/sessions/{id}", {"staleness_lr": None},
     False, {}),
    ("configure: extra property", "patch", "/v1/sessions/{id}", {"lr": 0.1}, False, {}),
    ("configure: max_staleness < 0", "patch", "/v1/sessions/{id}", {"max_staleness": -1},
     False, {}),
    ("configure: max_staleness past 2**62", "patch", "/v1/sessions/{id}",
     {"max_staleness": 2**62 + 1}, False, {}),
    ("configure: sync extra key", "patch", "/v1/sessions/{id}",
     {"sync": {"workers": 2, "quorum": 1}}, False, {}),
]


# torch warns when a scheduler steps before the optimizer; under pytest's "error" filter that
# would be a 500 that production (warnings printed) never shows
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("label,method,path,body,accepted,extra", CASES,
                         ids=[c[0] for c in CASES])
def test_schema_and_server_agree(app_client: TestClient, label: str, method: str, path: str,
                                 body: Any, accepted: bool, extra: dict[str, Any]) -> None:
    template = path.replace("{id}", "{session_id}")
    schema = request_schema(method, template)
    errors = [e.message for e in validator(schema).iter_errors(body)]
    assert (not errors) == accepted, (label, schema, errors)
    target = path.replace("{index}", "0")
    if "{id}" in path:
        target = target.replace("{id}", new_session(app_client, **extra))
    r = app_client.request(method.upper(), target, json=copy.deepcopy(body))
    if accepted:
        assert 200 <= r.status_code < 300, (label, r.status_code, r.text)
    else:
        assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_request_body_is_required_unless_the_server_takes_an_empty_one(
        app_client: TestClient) -> None:
    sid = new_session(app_client, scheduler={"name": "StepLR", "options": {"step_size": 2},
                                             "step_on": "manual"})
    for path, methods in DOC["paths"].items():
        for method, op in methods.items():
            if "requestBody" not in op:
                continue
            target = path.replace("{session_id}", sid).replace("{index}", "0")
            r = app_client.request(method.upper(), target, content=b"",
                                   headers={"content-type": "application/json"})
            if op["requestBody"]["required"]:
                assert r.status_code == 400, (method, path, r.status_code, r.text)
                assert r.json()["code"] == "invalid_json"
            else:
                assert r.status_code == 200, (method, path, r.status_code, r.text)


def test_schema_examples_validate() -> None:
    for name, schema in DOC["components"]["schemas"].items():
        if "example" in schema:
            errors = [e.message for e in validator(name).iter_errors(schema["example"])]
            assert not errors, (name, errors)


def test_a_nested_scheduler_name_must_be_a_string(app_client: TestClient) -> None:
    """Beyond what the schema can say (scheduler options are free-form): a 422, not a 500."""
    r = app_client.post("/v1/sessions", json={
        "optimizer": "SGD", "params": {"w": T}, "scheduler": {
            "name": "SequentialLR", "options": {"schedulers": [{"name": ["StepLR"]}],
                                                "milestones": []}}})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "scheduler.options.schedulers.0.name"


def response_validator(method: str, path: str) -> Any:
    schema = DOC["paths"][path][method]["responses"]["200"]["content"]["application/json"][
        "schema"]
    return jsonschema_rs.validator_for({**schema, "components": DOC["components"]})


def test_lbfgs_questions_and_ends_match_the_documented_step_answers(
        app_client: TestClient) -> None:
    """An LBFGS step's question (`needs: evaluation`, no `lr`) and its end, as POST .../step
    and POST .../step/{eval_id} answer them, each validate against the 200 schema those routes
    document (the document required `lr` of every step answer, which no question carries), and
    the end is torch's own LBFGS.step."""
    x0 = [1.5, -2.0, 0.5]
    target = torch.tensor([0.3, 0.1, -0.7], dtype=torch.float64)
    weight = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)
    r = app_client.post("/v1/sessions", json={
        "id": "lbfgs-schema", "optimizer": "LBFGS",
        "options": {"lr": 1, "max_iter": 4, "line_search_fn": "strong_wolfe"},
        "params": {"x": {"dtype": "float64", "shape": [3], "data": x0}}})
    assert r.status_code == 201, r.text

    def loss_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (weight * (x - target) ** 2).sum(), 2 * weight * (x - target)

    opening = response_validator("post", "/v1/sessions/{session_id}/step")
    evaluating = response_validator("post", "/v1/sessions/{session_id}/step/{eval_id}")
    r = app_client.post("/v1/sessions/lbfgs-schema/step", json={})
    assert r.status_code == 200, r.text
    questions = 0
    answer = r.json()
    errors = [e.message for e in opening.iter_errors(answer)]
    assert not errors, (answer, errors)
    while answer.get("needs") == "evaluation":
        questions += 1
        assert "lr" not in answer
        x = torch.tensor(answer["params"]["x"]["data"], dtype=torch.float64)
        loss, grad = loss_and_grad(x)
        r = app_client.post(f"/v1/sessions/lbfgs-schema/step/{answer['evaluation']}", json={
            "loss": loss.item(), "grads": {"x": {"dtype": "float64", "shape": [3],
                                                 "data": grad.tolist()}}})
        assert r.status_code == 200, r.text
        answer = r.json()
        errors = [e.message for e in evaluating.iter_errors(answer)]
        assert not errors, (answer, errors)
    assert questions >= 2

    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=4, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, grad = loss_and_grad(x.detach())
        x.grad = grad
        return loss

    loss = opt.step(closure)
    assert answer["params"]["x"]["data"] == x.detach().tolist()
    assert answer["loss"] == loss.item() and answer["lr"] == [1]
    assert answer["evaluations"] == opt.state[x]["func_evals"]


def test_a_412_declares_the_version_headers_it_carries(app_client: TestClient) -> None:
    """A 412 precondition_failed carries the session's current ETag, X-Optserve-Version,
    X-Optserve-Step (and X-Optserve-Revision where known), as docs/protocol.md says and the
    412's own description in the document says: the document's 412 responses declared only
    X-Request-Id. Each refusal below is answered with those headers, at the session's values,
    and each header it carries is one its operation's 412 declares."""
    sid = new_session(app_client)
    r = app_client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": T}})
    assert r.status_code == 200, r.text
    stale = {"If-Match": '"0"'}
    refusals = [
        ("put", "/v1/sessions/{session_id}/params", {"json": {"params": {"w": T}}}),
        ("patch", "/v1/sessions/{session_id}/param_groups/{index}", {"json": {"lr": 0.5}}),
        ("patch", "/v1/sessions/{session_id}", {"json": {"metrics": False}}),
        ("post", "/v1/sessions/{session_id}/param_groups", {"json": {"params": {"v": T1}}}),
        ("get", "/v1/sessions/{session_id}/state_dict", {}),
        ("get", "/v1/sessions/{session_id}/params", {}),
        ("get", "/v1/sessions/{session_id}", {}),
        ("delete", "/v1/sessions/{session_id}", {}),
    ]
    known = {"etag", "x-optserve-version", "x-optserve-step", "x-optserve-revision"}
    for method, path, kw in refusals:
        target = path.replace("{session_id}", sid).replace("{index}", "0")
        r = app_client.request(method.upper(), target, headers=stale, **kw)
        assert r.status_code == 412, (method, path, r.text)
        assert (r.headers["etag"], r.headers["x-optserve-version"],
                r.headers["x-optserve-step"]) == ('"1"', "1", "1"), (method, path)
        declared = {h.lower() for h in DOC["paths"][path][method]["responses"]["412"]["headers"]}
        carried = known & set(r.headers)
        assert carried <= declared, (method, path, carried - declared)


def test_every_operation_lists_the_417_it_answers(app_client: TestClient) -> None:
    """An `Expect` other than 100-continue is a 417 expectation_failed on every route, before
    anything runs (docs/protocol.md lists it); each operation's document lists that 417 (none
    did)."""
    for path, methods in DOC["paths"].items():
        for method, op in methods.items():
            target = path.replace("{session_id}", "nope").replace("{index}", "0").replace(
                "{eval_id}", "e.1").replace("{step_id}", "e")
            r = app_client.request(method.upper(), target, headers={"expect": "tea"})
            assert r.status_code == 417, (method, path, r.status_code, r.text)
            assert (r.json()["code"], r.json()["field"]) == ("expectation_failed", "Expect")
            assert "417" in op["responses"], (method, path)
