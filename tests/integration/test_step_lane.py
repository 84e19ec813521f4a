"""The step's own lane (``app.api.step_lane``) answers exactly what the router answers: the same
requests, good and bad, sent to the app as built and to the same app without the lane give the
same status, media type, problem body and parameters; and the lane, not the router, takes the
step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.api.step_lane import StepLane
from app.main import create_app
from tests.conftest import _test_settings

pytestmark = pytest.mark.integration
BINARY = "application/octet-stream"


def client(lane: bool) -> Iterator[TestClient]:
    app = create_app(_test_settings())
    if not lane:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not StepLane]
    with TestClient(app) as c:
        yield c


@pytest.fixture
def with_lane() -> Iterator[TestClient]:
    yield from client(True)


@pytest.fixture
def without_lane() -> Iterator[TestClient]:
    yield from client(False)


def x(value: float) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [2], "data": [value, -value]}


#: (method, path, headers, JSON body or safetensors tensors, query)
REQUESTS: list[tuple[str, str, dict[str, str], Any, str]] = [
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(0.5)}}, ""),
    ("POST", "/v1/sessions/s/step", {"accept": BINARY, "content-type": BINARY},
     {"x": torch.tensor([0.25, 1.0])}, ""),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)},
                                         "param_groups": {"0": {"lr": 0.05}}}, ""),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)}}, "?return=none"),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)}}, "?encoding=b64"),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)}}, "?return=all"),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)}}, "?base_version=-1"),
    ("POST", "/v1/sessions/s/step", {"if-match": '"1"'}, {"grads": {"x": x(1.0)}}, ""),
    ("POST", "/v1/sessions/s/step", {"accept": "text/html"}, {"grads": {"x": x(1.0)}}, ""),
    ("POST", "/v1/sessions/s/step", {"content-type": "text/plain"}, b"1,2", ""),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"y": x(1.0)}}, ""),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)}, "extra": 1}, ""),
    ("POST", "/v1/sessions/s/step", {}, {"grads": {"x": x(1.0)},
                                         "param_groups": {"0": {"lr": -1}}}, ""),
    ("POST", "/v1/sessions/s/step", {"content-type": BINARY}, b"\x05\x00\x00\x00", ""),
    ("POST", "/v1/sessions/nope/step", {}, {"grads": {"x": x(1.0)}}, ""),
    ("POST", "/v1/sessions/" + "a" * 201 + "/step", {}, {"grads": {"x": x(1.0)}}, ""),
    ("POST", "/v1/sessions/s/step/", {}, {"grads": {"x": x(1.0)}}, ""),
    ("GET", "/v1/sessions/s/step", {}, None, ""),
    ("POST", "/v1/sessions/s/step", {"idempotency-key": "k1"}, {"grads": {"x": x(2.0)}}, ""),
    ("POST", "/v1/sessions/s/step", {"idempotency-key": "k1"}, {"grads": {"x": x(2.0)}}, ""),
    ("POST", "/v1/sessions/s/step", {"idempotency-key": "k1"}, {"grads": {"x": x(3.0)}}, ""),
    ("POST", "/v1/sessions/s/step", {"x-optserve-worker": ""}, {"grads": {"x": x(1.0)}}, ""),
]


def send(c: TestClient, method: str, path: str, headers: dict[str, str], body: Any,
         query: str) -> tuple[Any, ...]:
    if isinstance(body, dict) and body and all(isinstance(v, torch.Tensor)
                                               for v in body.values()):
        r = c.request(method, path + query, headers=headers, content=st_save(body))
    elif isinstance(body, bytes):
        r = c.request(method, path + query, headers=headers, content=body)
    else:
        r = c.request(method, path + query, headers=headers, json=body)
    media = r.headers.get("content-type", "")
    if media.startswith(BINARY):
        content: Any = {k: v.tolist() for k, v in st_load(r.content).items()}
    elif r.content:
        content = r.json()
        if isinstance(content, dict):
            content.pop("request_id", None)
            content.get("metrics", {}).pop("time", None)  # when the step ran
    else:
        content = None
    kept = {h: r.headers.get(h) for h in ("etag", "x-optserve-version", "allow",
                                          "idempotent-replayed", "location")}
    return r.status_code, media, content, kept


def test_the_lane_answers_what_the_router_answers(with_lane: TestClient,
                                                  without_lane: TestClient) -> None:
    create = {"id": "s", "optimizer": "Adam", "options": {"lr": 0.1},
              "params": {"x": x(2.0)}}
    for c in (with_lane, without_lane):
        assert c.post("/v1/sessions", json=create).status_code == 201
    statuses = set()
    p = torch.tensor([2.0, -2.0], requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1)
    for request in REQUESTS:
        got, want = send(with_lane, *request), send(without_lane, *request)
        assert got == want, (request[:2], request[4], got, want)
        statuses.add(got[0])
        if got[0] == 200 and got[3]["idempotent-replayed"] is None:  # a step: replay it here
            body = request[3]
            if "grads" in body:
                p.grad = torch.tensor(body["grads"]["x"]["data"])
                opt.param_groups[0].update(body.get("param_groups", {}).get("0", {}))
            else:
                p.grad = body["x"].clone()
            opt.step()
    # the list covers answers and refusals of every kind
    assert {200, 404, 405, 406, 415, 422} <= statuses, statuses
    # and both sessions ended where an in-process Adam over the same accepted steps ends
    for c in (with_lane, without_lane):
        r = c.get("/v1/sessions/s/params", headers={"accept": BINARY})
        got_p = st_load(r.content)["x"]
        assert torch.equal(got_p.view(torch.int32), p.detach().view(torch.int32)), (
            got_p, p)


def test_the_lane_takes_the_step_and_leaves_the_rest_to_the_router(
        with_lane: TestClient) -> None:
    app = with_lane.app
    seen: list[str] = []
    router = app.router  # type: ignore[attr-defined]
    inner = router.middleware_stack

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        seen.append(f"{scope['method']} {scope['path']}")
        await inner(scope, receive, send)
    router.middleware_stack = spy
    assert with_lane.post("/v1/sessions", json={"id": "t", "optimizer": "SGD",
                                                "options": {"lr": 1.0},
                                                "params": {"x": x(1.0)}}).status_code == 201
    r = with_lane.post("/v1/sessions/t/step", json={"grads": {"x": x(0.5)}})
    assert r.status_code == 200 and r.json()["params"]["x"]["data"] == [0.5, -0.5]
    r = with_lane.post("/v1/sessions/t/step/", json={}, follow_redirects=False)
    assert r.status_code == 404  # the router's: no route (a trailing '/' is redirected to none)
    assert seen == ["POST /v1/sessions", "POST /v1/sessions/t/step/"]
