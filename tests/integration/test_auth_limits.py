"""Authentication, tenancy and limits against a real server (uvicorn on 127.0.0.1).

- every route the app has (enumerated from ``app.routes``, so a new one cannot slip through)
  answers 401 problem+json without a valid bearer key, except ``/healthz``;
- a tenant cannot see, read, change or delete another tenant's session: the answer is the
  same 404 as for an id that does not exist (no oracle), and the same id in two tenants names
  two independent sessions;
- the server refuses to start on a non-loopback address without keys (exit 2, a message);
- limits: sessions per tenant (429), elements per session (422), body size (413), a stalled
  body (408), and a client that goes away mid-upload leaves nothing behind (no 500 logged).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from fastapi import FastAPI

from app.__main__ import check_exposure, main
from app.api.auth import parse_keys
from app.config import Settings
from app.engine.front import MAX_PARAM_GROUPS
from tests.conftest import LiveServer, _test_settings, kill_hosts, ray_settings

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "keyA-0123456789abcdef", "keyB-0123456789abcdef"
KEYS = f"{KEY_A}:alice,{KEY_B}:bob"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
PROBLEM = "application/problem+json"


def jt(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def create_body(sid: str, n: int = 4, seed: int = 0, **extra: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9}, "id": sid,
            "params": {"w": jt(torch.randn(n, generator=g))},
            "scheduler": {"name": "StepLR", "options": {"step_size": 2}}, **extra}


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, FastAPI]]:
    """A fresh server with keys; ``@server_settings(...)`` overrides go to its Settings."""
    overrides: dict[str, Any] = {"api_keys": KEYS, **getattr(request, "param", {})}
    live = LiveServer(_test_settings(**overrides))
    url = live.start()
    try:
        yield url, live.app
    finally:
        live.stop()


def server_settings(**overrides: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("server", [overrides], indirect=True, ids=[""])


@pytest.fixture
def client(server: tuple[str, FastAPI]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c


# --------------------------------------------------------------------------- routes

def every_route(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) for every route the app serves, included routers too."""
    found: set[tuple[str, str]] = set()

    def visit(route: Any) -> None:
        if hasattr(route, "effective_route_contexts"):  # an included router (FastAPI >= 0.16x)
            for ctx in route.effective_route_contexts():
                visit(ctx)
            return
        original = getattr(route, "original_route", route)
        methods = getattr(route, "methods", None) or getattr(original, "methods", None)
        path = getattr(route, "path", None)
        if hasattr(original, "routes") and not methods:  # a mounted app or plain router
            for sub in original.routes:
                visit(sub)
            return
        assert path is not None and methods, f"cannot enumerate {route!r}"
        for m in methods:
            found.add((m, path))
    for r in app.routes:
        visit(r)
    return sorted(found)


def concrete(path: str) -> str:
    return re.sub(r"\{index\}", "0", re.sub(r"\{[^}]+\}", "some-session", path))


def assert_401(r: httpx.Response, where: str) -> None:
    assert r.status_code == 401, (where, r.status_code, r.text)
    if r.request.method != "HEAD":
        assert r.headers["content-type"].startswith(PROBLEM), where
        body = r.json()
        assert body["code"] == "unauthorized" and body["status"] == 401, where
    assert r.headers["www-authenticate"].startswith("Bearer"), where


def test_every_route_but_healthz_needs_a_valid_key(server: tuple[str, FastAPI],
                                                   client: httpx.Client) -> None:
    url, app = server
    routes = every_route(app)
    paths = {p for _, p in routes}
    # the enumeration sees the whole API, docs included
    assert {"/healthz", "/readyz", "/openapi.json", "/docs", "/v1/sessions",
            "/v1/sessions/{session_id}/step", "/v1/sessions/{session_id}/state_dict"} <= paths
    assert len(routes) >= 20
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer  x"},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Bearer {KEY_A[:-1]}"}, {"Authorization": f"Bearer {KEY_A}x"},
        {"Authorization": f"Basic {KEY_A}"}, {"Authorization": KEY_A},
        {"X-Api-Key": KEY_A},
    ]
    checked = 0
    for method, path in routes:
        target = concrete(path)
        if path == "/healthz":
            assert client.request(method, target).status_code == 200
            continue
        if path in ("/ui", "/ui/"):
            # the page itself is public (it holds no data: every call it makes carries the key
            # typed into it, checked like any other); its assets are mounted, not routes
            assert client.request(method, target).status_code in (200, 308)
            continue
        for h in bad_headers:
            r = client.request(method, target, headers=h, json={"optimizer": "SGD"})
            assert_401(r, f"{method} {path} {h}")
            checked += 1
        # a valid key gets past the gate (whatever the route then says)
        assert client.request(method, target, headers=A).status_code != 401, (method, path)
    assert checked >= 9 * 19
    # routes that do not exist do not reveal that they do not exist
    for method, target in [("GET", "/nope"), ("POST", "/v1/sessions/x/nope"), ("PUT", "/"),
                           ("DELETE", "/v1/sessions"), ("GET", "/healthz/../readyz")]:
        assert_401(client.request(method, target), f"{method} {target}")
    assert client.get("/readyz", headers=B).status_code == 200


def test_several_authorization_headers_are_refused(client: httpx.Client) -> None:
    """Two keys in one request (two tenants, or a valid key beside a wrong one) were read as
    the first: a proxy that checks the last would authorize one tenant and the server serve
    another. Any number but one is a 401."""
    assert client.post("/v1/sessions", json=create_body("s"), headers=A).status_code == 201
    for pair in ((KEY_B, KEY_A), (KEY_A, KEY_B), (KEY_A, KEY_A), (KEY_A, "wrong")):
        r = client.get("/v1/sessions", headers=[("Authorization", f"Bearer {k}") for k in pair])
        assert_401(r, str(pair))
        assert r.json()["detail"] == "send one Authorization header"
    assert [d["id"] for d in client.get("/v1/sessions", headers=A).json()["sessions"]] == ["s"]


def test_keys_never_reach_the_logs(client: httpx.Client,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.post("/v1/sessions", json=create_body("s"), headers=A)
    client.get("/v1/sessions/s", headers={"Authorization": "Bearer wrong-key-but-long-enough"})
    client.get("/v1/sessions/nope", headers=B)
    client.get("/readyz", headers={"Authorization": f"Bearer {KEY_B}-suffix"})
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')} {r.args}"
                     for r in caplog.records)
    assert "optserve.access" in {r.name for r in caplog.records}  # the access log was seen
    for secret in (KEY_A, KEY_B, "wrong-key-but-long-enough", "0123456789abcdef"):
        assert secret not in text


# --------------------------------------------------------------------------- tenancy

def state_of(client: httpx.Client, sid: str, headers: dict[str, str]) -> tuple[Any, ...]:
    d = client.get(f"/v1/sessions/{sid}", headers=headers)
    assert d.status_code == 200, d.text
    p = client.get(f"/v1/sessions/{sid}/params", headers=headers).json()
    s = client.get(f"/v1/sessions/{sid}/state_dict", headers=headers).json()
    desc = d.json()
    return desc["version"], desc["step"], desc["lr"], desc["accumulated"], p["params"], s


def test_tenants_cannot_touch_each_others_sessions(server: tuple[str, FastAPI],
                                                   client: httpx.Client) -> None:
    for sid, seed in (("same", 1), ("a-only", 2)):
        assert client.post("/v1/sessions", json=create_body(sid, seed=seed),
                           headers=A).status_code == 201
    for sid, seed in (("same", 3), ("b-only", 4)):
        assert client.post("/v1/sessions", json=create_body(sid, seed=seed),
                           headers=B).status_code == 201
    g = {"grads": {"w": jt(torch.ones(4))}}
    assert client.post("/v1/sessions/b-only/step", json=g, headers=B).status_code == 200
    bob_before = state_of(client, "b-only", B)
    bob_same = state_of(client, "same", B)

    listed = {d["id"] for d in client.get("/v1/sessions", headers=A).json()["sessions"]}
    assert listed == {"same", "a-only"}
    listed = {d["id"] for d in client.get("/v1/sessions", headers=B).json()["sessions"]}
    assert listed == {"same", "b-only"}

    exported = client.get("/v1/sessions/a-only/state_dict", headers=A).json()
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "", {}), ("DELETE", "", {}),
        ("POST", "/step", {"json": g}), ("POST", "/grads", {"json": g}),
        ("POST", "/zero_grad", {}), ("GET", "/params", {}),
        ("PUT", "/params", {"json": {"params": {"w": jt(torch.zeros(4))}}}),
        ("GET", "/state_dict", {}), ("PUT", "/state_dict", {"json": exported}),
        ("POST", "/param_groups", {"json": {"params": {"v": jt(torch.zeros(2))}}}),
        ("PATCH", "/param_groups/0", {"json": {"lr": 5.0}}),
        ("POST", "/scheduler/step", {}),
    ]
    for method, suffix, kw in attempts:
        r = client.request(method, f"/v1/sessions/b-only{suffix}", headers=A, **kw)
        assert r.status_code == 404, (method, suffix, r.text)
        assert r.json()["code"] == "session_not_found", (method, suffix)
        # the very same answer as for an id nobody has
        r2 = client.request(method, f"/v1/sessions/nobody-has-this{suffix}", headers=A, **kw)
        assert (r2.status_code, r2.json()["code"]) == (404, "session_not_found")
        assert r.json()["detail"].replace("b-only", "X") == \
            r2.json()["detail"].replace("nobody-has-this", "X")
    assert state_of(client, "b-only", B) == bob_before

    # every other session route (including ones added later) answers alice on bob's session
    # exactly as on a session that does not exist
    for method, path in every_route(server[1]):
        if "{session_id}" not in path:
            continue
        for body in (None, g):
            kw: dict[str, Any] = {"json": body} if body is not None else {}
            r = client.request(method, path.replace("{session_id}", "b-only")
                               .replace("{index}", "0"), headers=A, **kw)
            r2 = client.request(method, path.replace("{session_id}", "zz-nobody")
                                .replace("{index}", "0"), headers=A, **kw)
            assert r.status_code == r2.status_code and r.status_code not in (200, 201, 204, 403)
            assert r.json().get("code") == r2.json().get("code"), (method, path)
    assert state_of(client, "b-only", B) == bob_before

    # the same id in two tenants: two sessions
    r = client.post("/v1/sessions/same/step", json=g, headers=A)
    assert r.status_code == 200 and r.json()["version"] == 1
    assert state_of(client, "same", B) == bob_same
    assert client.delete("/v1/sessions/same", headers=A).status_code == 204
    assert state_of(client, "same", B) == bob_same
    assert client.get("/v1/sessions/same", headers=A).status_code == 404
    # and bob can delete his own
    assert client.delete("/v1/sessions/b-only", headers=B).status_code == 204


def test_metrics_do_not_reveal_other_tenants_sessions(client: httpx.Client) -> None:
    assert client.post("/v1/sessions", json=create_body("bobs-secret-run"),
                       headers=B).status_code == 201
    g = {"grads": {"w": jt(torch.ones(4))}}
    assert client.post("/v1/sessions/bobs-secret-run/step", json=g, headers=B).status_code == 200
    metrics = client.get("/metrics", headers=A)
    assert metrics.status_code == 200
    assert "bobs-secret-run" not in metrics.text


KEY_M = "keyM-0123456789abcdef"


@server_settings(api_keys=f"{KEYS},{KEY_M}:monitoring", metrics_tenants="monitoring")
def test_only_the_named_tenants_read_the_server_wide_metrics(client: httpx.Client) -> None:
    """``/metrics`` counts every tenant's sessions and steps. With
    ``OPTSERVE_METRICS_TENANTS`` only those tenants' keys read it: any other key gets a 403
    problem naming the header, and its own routes still work."""
    assert client.post("/v1/sessions", json=create_body("bobs-run"), headers=B).status_code == 201
    g = {"grads": {"w": jt(torch.ones(4))}}
    assert client.post("/v1/sessions/bobs-run/step", json=g, headers=B).status_code == 200
    for headers in (A, B):
        refused = client.get("/metrics", headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"].startswith(PROBLEM)
        body = refused.json()
        assert (body["code"], body["field"], body["status"]) == ("forbidden", "authorization", 403)
        assert "optserve_sessions" not in refused.text
    assert_401(client.get("/metrics"), "/metrics without a key")
    read = client.get("/metrics", headers={"Authorization": f"Bearer {KEY_M}"})
    assert read.status_code == 200
    sessions = re.search(r"^optserve_sessions(?:\{[^}]*\})? (\S+)$", read.text, re.M)
    assert sessions is not None and float(sessions[1]) == 1.0, read.text[:2000]
    assert client.get("/v1/sessions/bobs-run", headers=B).status_code == 200


def test_metrics_tenants_must_be_tenant_names() -> None:
    with pytest.raises(ValueError, match="tenant names"):
        Settings(metrics_tenants="monitoring,.hidden")
    assert Settings(metrics_tenants=" a , b ").metrics_tenant_set() == {"a", "b"}


# --------------------------------------------------------------------------- open binding

def test_refuses_open_bind_without_keys() -> None:
    env = {**os.environ, "OPTSERVE_HOST": "0.0.0.0", "OPTSERVE_PORT": "1",
           "OPTSERVE_API_KEYS": "", "OPTSERVE_ALLOW_OPEN": "0", "OPTSERVE_DEVICE": "cpu"}
    env.pop("OPTSERVE_API_KEYS_FILE", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve on 0.0.0.0 without API keys" in proc.stderr
    assert "OPTSERVE_ALLOW_OPEN=1" in proc.stderr and "OPTSERVE_API_KEYS" in proc.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("host,keys,allow,refused", [
    ("0.0.0.0", "", False, True), ("::", "", False, True), ("192.168.1.7", "", False, True),
    ("example.com", "", False, True),
    ("0.0.0.0", "", True, False), ("0.0.0.0", KEYS, False, False),
    ("127.0.0.1", "", False, False), ("127.0.0.2", "", False, False), ("::1", "", False, False),
    ("localhost", "", False, False),
])
def test_exposure_rules(host: str, keys: str, allow: bool, refused: bool) -> None:
    settings = Settings(host=host, api_keys=keys, allow_open=allow)
    assert (check_exposure(settings) is not None) == refused


@pytest.mark.parametrize("env,message", [
    ({"OPTSERVE_API_KEYS": "short:alice"}, "at least 16 characters"),
    ({"OPTSERVE_API_KEYS": f"{KEY_A}:.hidden"}, "not starting with '.'"),
    ({"OPTSERVE_API_KEYS": f"{KEY_A}:alice,{KEY_A}:bob"}, "two tenants"),
    ({"OPTSERVE_API_KEYS_FILE": "/nonexistent/keys"}, "No such file"),
    ({"OPTSERVE_PORT": "not-a-port"}, "OPTSERVE_PORT"),
])
def test_bad_configuration_exits_2_with_a_message(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        env: dict[str, str], message: str) -> None:
    for k in [k for k in os.environ if k.startswith("OPTSERVE_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith("optserve: invalid configuration") and message in err


def test_keys_from_a_file(tmp_path: Any) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# comment\n{KEY_A}:alice\n\n{KEY_B}\n")
    assert parse_keys("", f) == {KEY_A: "alice", KEY_B: "default"}


# --------------------------------------------------------------------------- limits

@server_settings(max_sessions=2, max_session_elements=100)
def test_sessions_per_tenant_and_elements_per_session(client: httpx.Client) -> None:
    for i in range(2):
        assert client.post("/v1/sessions", json=create_body(f"a{i}"), headers=A).status_code \
            == 201
    r = client.post("/v1/sessions", json=create_body("a2"), headers=A)
    assert r.status_code == 429 and r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["code"] == "too_many_sessions" and body["limit"] == 2
    assert "OPTSERVE_MAX_SESSIONS" in body["detail"]
    # per tenant: bob is not affected; deleting frees a slot
    assert client.post("/v1/sessions", json=create_body("b0"), headers=B).status_code == 201
    assert client.delete("/v1/sessions/a0", headers=A).status_code == 204
    assert client.post("/v1/sessions", json=create_body("a2"), headers=A).status_code == 201

    r = client.post("/v1/sessions", json=create_body("big", n=101), headers=B)
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "session_too_large" and body["limit"] == 100
    assert "OPTSERVE_MAX_SESSION_ELEMENTS" in body["detail"]
    assert client.post("/v1/sessions", json=create_body("edge", n=100), headers=B).status_code \
        == 201
    assert {d["id"] for d in client.get("/v1/sessions", headers=B).json()["sessions"]} == \
        {"b0", "edge"}


@server_settings(max_session_elements=100)
def test_add_param_group_respects_the_element_limit(client: httpx.Client) -> None:
    assert client.post("/v1/sessions", json=create_body("s", n=60), headers=A).status_code == 201
    r = client.post("/v1/sessions/s/param_groups",
                    json={"params": {"v": jt(torch.zeros(41))}}, headers=A)
    assert r.status_code == 422, r.text


def concurrently(n: int, call: Any) -> list[httpx.Response]:
    """``call(i)`` for i < n, all at once from threads of their own (their own connections)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


@server_settings(max_sessions=3)
def test_concurrent_creates_never_pass_the_sessions_limit(server: tuple[str, FastAPI]) -> None:
    """The count was checked before each create and the session counted once made: 30
    creates at once all passed the check, and the tenant had 30 sessions past a limit of 3.
    Exactly 3 are made, the others are 429 ``too_many_sessions``; another tenant is not
    affected."""
    def create(i: int) -> httpx.Response:
        return httpx.post(f"{server[0]}/v1/sessions", json=create_body(f"c{i}"), headers=A,
                          timeout=120)
    answers = concurrently(30, create)
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [429] * 27, [r.text for r in answers if r.status_code != 201]
    assert all(r.json()["code"] == "too_many_sessions" for r in answers
               if r.status_code == 429)
    made = {r.json()["id"] for r in answers if r.status_code == 201}
    listed = httpx.get(f"{server[0]}/v1/sessions", headers=A, timeout=30).json()["sessions"]
    assert {d["id"] for d in listed} == made
    r = httpx.post(f"{server[0]}/v1/sessions", json=create_body("b"), headers=B, timeout=30)
    assert r.status_code == 201, r.text


@server_settings(max_session_elements=100)
def test_concurrent_param_groups_never_pass_the_element_limit(server: tuple[str, FastAPI]
                                                              ) -> None:
    """The session's elements were counted before the group was added, outside its lock:
    groups added at once each fit the session as it was, and together passed the limit
    (10 + 4 x 40 = 170 of 100). Two fit (10 + 2 x 40); every other is a 422
    ``session_too_large``, and the session holds exactly the groups acknowledged."""
    url = server[0]
    assert httpx.post(f"{url}/v1/sessions", json=create_body("s", n=10), headers=A,
                      timeout=30).status_code == 201
    two_of_ten_groups_fit(url, 40, "session_too_large", {"w"})


def two_of_ten_groups_fit(url: str, size: int, code: str, before: set[str]) -> None:
    """Ten one-parameter groups of ``size`` elements added at once to session ``s`` (holding
    parameters ``before``): two are made, the others are 422 ``code``, and the session holds
    exactly the groups acknowledged, with their values."""
    def add(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/sessions/s/param_groups",
                          json={"params": {f"v{i}": jt(torch.full((size,), float(i)))}},
                          headers=A, timeout=120)
    answers = concurrently(10, add)
    assert sorted(r.status_code for r in answers) == [201] * 2 + [422] * 8, \
        [r.text for r in answers]
    assert all(r.json()["code"] == code for r in answers if r.status_code == 422)
    params = httpx.get(f"{url}/v1/sessions/s/params", headers=A, timeout=30).json()["params"]
    added = {f"v{i}" for i, r in enumerate(answers) if r.status_code == 201}
    assert set(params) == before | added
    for name in added:
        assert params[name]["data"] == [float(name[1:])] * size


def many_params_body(sid: str, n: int) -> dict[str, Any]:
    """A JSON create of ``n`` one-element parameters (the value of each its index)."""
    return {"optimizer": "Adam", "options": {"lr": 0.1}, "id": sid,
            "params": {f"p{i}": jt(torch.tensor([float(i)])) for i in range(n)}}


def test_parameters_per_session_are_bounded_by_default(client: httpx.Client) -> None:
    """Each parameter costs the server kilobytes and microseconds a step whatever its size: a
    60 MB JSON create of a million one-element parameters took a server 3 GB and a minute, its
    first step 5 GB. ``OPTSERVE_MAX_SESSION_PARAMS`` is 100,000 by default; one past it is a
    422 ``too_many_params``, refused before any tensor is decoded."""
    assert Settings().max_session_params == 100_000
    body = {"optimizer": "SGD", "options": {"lr": 0.1}, "id": "many",
            "params": {f"p{i}": {"dtype": "float32", "shape": [1], "data": [0.0]}
                       for i in range(100_001)}}
    r = client.post("/v1/sessions", json=body, headers=A, timeout=120)
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
    problem = r.json()
    assert problem["code"] == "too_many_params" and problem["field"] == "params"
    assert problem["limit"] == 100_000 and "OPTSERVE_MAX_SESSION_PARAMS" in problem["detail"]
    assert "100001 parameters" in problem["detail"]
    assert client.get("/v1/sessions/many", headers=A).status_code == 404


@server_settings(max_session_params=3)
def test_parameters_per_session_in_every_create_form_and_added_groups(
        client: httpx.Client) -> None:
    """The bound counts a create's parameters over all its groups, in JSON and safetensors
    bodies, and a group added later; the session refused is not made, the one refused a group
    is left as it was (its state_dict equal), and what fits steps as torch does."""
    def refused(r: httpx.Response) -> None:
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "too_many_params" and r.json()["limit"] == 3

    refused(client.post("/v1/sessions", json=many_params_body("a", 4), headers=A))
    grouped = {"optimizer": "SGD", "options": {"lr": 0.1}, "id": "b", "param_groups": [
        {"params": {"x": jt(torch.ones(1)), "y": jt(torch.ones(1))}},
        {"params": {"z": jt(torch.ones(1)), "u": jt(torch.ones(1))}, "lr": 0.5}]}
    refused(client.post("/v1/sessions", json=grouped, headers=A))
    binary = safetensors.torch.save({f"p{i}": torch.ones(2) for i in range(4)},
                                    metadata={"optimizer": "SGD", "id": "c",
                                              "options": '{"lr": 0.1}'})
    refused(client.post("/v1/sessions", content=binary,
                        headers={**A, "Content-Type": "application/octet-stream"}))
    assert {d["id"] for d in client.get("/v1/sessions", headers=A).json()["sessions"]} == set()

    assert client.post("/v1/sessions", json=many_params_body("s", 3), headers=A).status_code \
        == 201
    before = client.get("/v1/sessions/s/state_dict", headers=A).json()
    refused(client.post("/v1/sessions/s/param_groups",
                        json={"params": {"v": jt(torch.ones(1))}}, headers=A))
    assert client.get("/v1/sessions/s/state_dict", headers=A).json() == before
    params = [torch.tensor([float(i)]) for i in range(3)]
    opt = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.full((1,), 0.25)
    opt.step()
    r = client.post("/v1/sessions/s/step", headers=A, json={"grads": {
        f"p{i}": jt(torch.full((1,), 0.25)) for i in range(3)}})
    assert r.status_code == 200, r.text
    got = r.json()["params"]
    for i, p in enumerate(params):
        assert torch.equal(torch.tensor(got[f"p{i}"]["data"]), p.detach()), i


@server_settings(max_session_params=3)
def test_concurrent_param_groups_never_pass_the_parameter_limit(server: tuple[str, FastAPI]
                                                                ) -> None:
    """Checked with the operation, under the session's lock, as the element limit is: of ten
    one-parameter groups added at once to a one-parameter session, two fit."""
    url = server[0]
    assert httpx.post(f"{url}/v1/sessions", json=many_params_body("s", 1), headers=A,
                      timeout=30).status_code == 201
    two_of_ten_groups_fit(url, 2, "too_many_params", {"p0"})


def test_param_groups_per_session_are_bounded(server: tuple[str, FastAPI],
                                              client: httpx.Client) -> None:
    """torch's add_param_group costs grow with the square of the groups: a small body of
    thousands of empty groups held the device worker for every tenant (a 422 now, before any
    torch work), and so did adding one more group to such a session."""
    assert server[1].state.engine.limits.max_param_groups == MAX_PARAM_GROUPS == 1024
    server[1].state.engine.limits.max_param_groups = 3  # (the bound, made cheap to reach)
    empty: list[dict[str, Any]] = [{"params": {}}]
    body = {"id": "g", "optimizer": "SGD", "options": {"lr": 0.1},
            "param_groups": [{"params": {"w": jt(torch.ones(2))}}, *empty * 3]}
    r = client.post("/v1/sessions", json=body, headers=A)
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
    problem = r.json()
    assert problem["code"] == "too_many_param_groups" and problem["field"] == "param_groups"
    assert problem["limit"] == 3 and "4 param groups" in problem["detail"]
    assert client.get("/v1/sessions/g", headers=A).status_code == 404

    body["param_groups"] = body["param_groups"][:3]
    assert client.post("/v1/sessions", json=body, headers=A).status_code == 201
    before = client.get("/v1/sessions/g/state_dict", headers=A).json()
    r = client.post("/v1/sessions/g/param_groups", json={"params": {"v": jt(torch.ones(1))}},
                    headers=A)
    assert r.status_code == 422 and r.json()["code"] == "too_many_param_groups", r.text
    assert client.get("/v1/sessions/g/state_dict", headers=A).json() == before


def raw_request(url: str, head: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ")[1]), rest


def step_head(sid: str, length: int | None, key: str = KEY_A) -> str:
    size = f"Content-Length: {length}\r\n" if length is not None else \
        "Transfer-Encoding: chunked\r\n"
    return (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n{size}")


@server_settings(body_timeout_s=0.5, body_min_kib_s=0)
def test_a_slow_steady_upload_is_not_cut(server: tuple[str, FastAPI],
                                         client: httpx.Client) -> None:
    """The body timeout bounds the wait for the next bytes, not the whole upload: a body
    trickling in over 1.5 s, never 0.5 s without bytes, steps (equal to torch). (Without the
    whole-body deadline, ``body_min_kib_s=0``: with it, this tiny body would get the timeout,
    0.5 s, in all: test_body_whole_deadline.)"""
    assert client.post("/v1/sessions", json=create_body("t"), headers=A).status_code == 201
    init = torch.tensor(create_body("t")["params"]["w"]["data"])
    grad = torch.linspace(-1, 1, 4)
    body = json.dumps({"grads": {"w": jt(grad)}}).encode()
    pieces = [body[i:i + 8] for i in range(0, len(body), 8)][:5]
    pieces.append(body[8 * 5:])
    sock = raw_request(server[0], step_head("t", len(body)), b"")
    started = time.monotonic()
    try:
        for piece in pieces:
            time.sleep(0.3)
            sock.sendall(piece)
        status, answer = read_response(sock, 10)
    finally:
        sock.close()
    assert time.monotonic() - started > 1.5
    assert status == 200, answer
    w = init.clone()
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = grad
    opt.step()
    got = client.get("/v1/sessions/t/params", headers=A).json()["params"]["w"]["data"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32), w)


@server_settings(max_body_mb=0.01, body_timeout_s=0.5)
def test_body_limit_timeout_and_disconnect(server: tuple[str, FastAPI], client: httpx.Client,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    url = server[0]
    assert client.post("/v1/sessions", json=create_body("s"), headers=A).status_code == 201
    before = state_of(client, "s", A)
    limit = int(0.01 * 1024 * 1024)

    # 413: declared too large (refused before reading), and streamed past the limit
    big = b'{"grads": {"w": ' + b" " * limit + b"}}"
    r = client.post("/v1/sessions/s/step", content=big, headers={**A, **{
        "Content-Type": "application/json"}})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert r.json()["limit"] == limit

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 1024
    r = client.post("/v1/sessions/s/step", content=chunks(), headers={
        **A, "Content-Type": "application/json"})
    assert r.status_code == 413

    # 408: the body stalls (a slow-loris upload does not hold the request forever)
    for length in (5000, None):
        started = time.monotonic()
        sock = raw_request(url, step_head("s", length), b'{"grads": ' if length else
                           b"a\r\n{\"grads\": \r\n")
        try:
            status, body = read_response(sock, 10)
            assert sock.recv(1) == b""  # and the connection closed, midway through a body
        finally:
            sock.close()
        assert status == 408, body
        assert b'"body_timeout"' in body and b"OPTSERVE_BODY_TIMEOUT_S" in body
        assert 0.4 < time.monotonic() - started < 5

    # the client goes away in the middle of its upload
    for length in (5000, None):
        sock = raw_request(url, step_head("s", length), b'{"grads": {"w": ' if length else
                           b"5\r\n{\"gra\r\n")
        time.sleep(0.05)
        sock.close()
    time.sleep(0.3)

    assert state_of(client, "s", A) == before  # nothing applied by any of it
    assert client.get("/readyz", headers=A).status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    statuses = [getattr(r, "fields", {}).get("status") for r in caplog.records
                if r.name == "optserve.access"]
    assert 500 not in statuses and statuses.count(408) == 2


@pytest.mark.ray
def test_parameters_per_session_on_the_ray_engine(tmp_path: Path, ray_cluster: Any) -> None:
    """``OPTSERVE_MAX_SESSION_PARAMS`` on the Ray engine: a create past it (plain, over its
    groups, sharded) is the same 422 ``too_many_params`` naming ``params`` and the ``limit``,
    and nothing is made (no directory entry, no session on any host); a group added past it
    is refused with the session left as it was (its state_dict equal), and the session then
    steps as torch does; of ten groups added at once, as many as fit are made."""
    data = tmp_path / "data"
    live = LiveServer(ray_settings(ray_cluster, data_dir=data, api_keys=KEYS,
                                   max_session_params=3, ray_resources='{"num_cpus": 0}'))
    try:
        url = live.start()
        with httpx.Client(base_url=url, timeout=120) as client:
            def refused(r: httpx.Response, n: int) -> None:
                assert r.status_code == 422, r.text
                assert r.headers["content-type"].startswith(PROBLEM)
                problem = r.json()
                assert problem["code"] == "too_many_params" and problem["field"] == "params"
                assert problem["limit"] == 3 and f"{n} parameters" in problem["detail"]
                assert "OPTSERVE_MAX_SESSION_PARAMS" in problem["detail"]

            refused(client.post("/v1/sessions", json=many_params_body("a", 4), headers=A), 4)
            refused(client.post("/v1/sessions", json={**many_params_body("b", 4), "shards": 2},
                                headers=A), 4)
            grouped = {"optimizer": "SGD", "options": {"lr": 0.1}, "id": "c", "param_groups": [
                {"params": {"x": jt(torch.ones(1)), "y": jt(torch.ones(1))}},
                {"params": {"z": jt(torch.ones(1)), "u": jt(torch.ones(1))}, "lr": 0.5}]}
            refused(client.post("/v1/sessions", json=grouped, headers=A), 4)
            assert client.get("/v1/sessions", headers=A).json()["sessions"] == []
            for sid in "abc":
                assert client.get(f"/v1/sessions/{sid}", headers=A).status_code == 404
            assert not [p for p in (data / "directory").glob("*") if "~" in p.name]
            assert not list(data.glob("hosts/*/sessions/*"))

            r = client.post("/v1/sessions", json=many_params_body("t", 3), headers=A)
            assert r.status_code == 201, r.text
            assert r.json()["placement"]["host"].startswith("h-")  # (on a Ray host)
            params = [torch.tensor([float(i)]) for i in range(3)]
            opt = torch.optim.Adam(params, lr=0.1)

            def step(g: float) -> None:
                for p in params:
                    p.grad = torch.full((1,), g)
                opt.step()
                r = client.post("/v1/sessions/t/step", headers=A, json={"grads": {
                    f"p{i}": jt(torch.full((1,), g)) for i in range(3)}})
                assert r.status_code == 200, r.text
                got = r.json()["params"]
                for i, p in enumerate(params):
                    assert torch.equal(torch.tensor(got[f"p{i}"]["data"]), p.detach()), i

            step(0.25)
            before = client.get("/v1/sessions/t/state_dict", headers=A).json()
            refused(client.post("/v1/sessions/t/param_groups",
                                json={"params": {"v": jt(torch.ones(1))}}, headers=A), 4)
            assert client.get("/v1/sessions/t/state_dict", headers=A).json() == before
            step(-0.5)

            assert client.post("/v1/sessions", json=many_params_body("s", 1),
                               headers=A).status_code == 201
        two_of_ten_groups_fit(url, 2, "too_many_params", {"p0"})
    finally:
        live.stop()
        kill_hosts(data)
