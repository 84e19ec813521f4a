"""A push (``POST .../grads``) or an overwrite (``PUT .../params``) whose body (over
OFFLOAD_BYTES) names more tensors than its session holds is refused from its entries before
the tensors after the refused name are made, through the step's own refusal
(``sessions._refuse_entries``, ``test_excess_step_entries`` / ``test_excess_json_step_entries``):
both decoded every tensor first (100,000 unknown JSON names, 6.1 MB: 1.1-1.6 s of server CPU
each, against 0.24 s for the step; safetensors 0.11-0.13 s against 0.02 s;
``benchmarks/unknown_names.py``). The answer is the one the operation gave once every tensor was
decoded (``sessions._refuse_entries`` switched off), with the same order: a malformed tensor up
to the refused name before a malformed ``Idempotency-Key`` or ``scalars``; a push whose scalars
the session refuses (past its distinct scalar names, checked before the gradients) and an
overwrite whose precondition no longer holds are decoded whole and answered as before.
Nothing changes: the parameters, the optimizer's state and the accumulator are as they were,
and the next push or overwrite, then a step, is torch's."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.api import sessions
from app.engine.metrics import MAX_SCALAR_NAMES, MAX_SCALARS
from tests.integration.test_excess_entries_stale_session import asked  # noqa: F401 - fixture
from tests.integration.test_excess_json_step_entries import (  # noqa: F401 - the fixture
    BAD_DATA,
    decoded,
)
from tests.integration.test_excess_step_entries import (  # noqa: F401 - the fixture
    BIN_CT,
    GRADS,
    PARAMS,
    _excess,
    _session,
    made,
)
from tests.torch_reference import json_tensor, tensors_from_json

pytestmark = pytest.mark.integration
#: route -> (method, the body's key)
ROUTES = {"grads": ("POST", "grads"), "params": ("PUT", "params")}
#: every route whose body's entries are refused early (the step's too: ``test_ray_excess_entries``
#: sends all three through :func:`_send`)
ALL_ROUTES = {"step": ("POST", "grads"), **ROUTES}
NEW = {n: t * 0.5 - 1.0 for n, t in PARAMS.items()}  # (an overwrite's values)


def _send(client: TestClient | httpx.Client, sid: str, route: str, fmt: str,
          tensors: dict[str, Any], headers: dict[str, str] | None = None,
          **fields: Any) -> httpx.Response:
    method, key = ALL_ROUTES[route]
    if fmt == "json":
        body = {key: {n: json_tensor(t) if isinstance(t, torch.Tensor) else t
                      for n, t in tensors.items()}, **fields}
        return client.request(method, f"/v1/sessions/{sid}/{route}", json=body,
                              headers=headers)
    meta = {k: json.dumps(v) for k, v in fields.items()} or None
    return client.request(method, f"/v1/sessions/{sid}/{route}",
                          content=save(tensors, metadata=meta), headers={**BIN_CT,
                                                                          **(headers or {})})


def _problem(r: httpx.Response) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    out: dict[str, Any] = r.json()
    return out


def _whole_way(monkeypatch: pytest.MonkeyPatch, send: Any) -> dict[str, Any]:
    """The answer of the same request with its body decoded whole first, as before."""
    with monkeypatch.context() as patched:
        patched.setattr(sessions, "_refuse_entries", lambda *args: None)
        return _problem(send())


def _same(got: dict[str, Any], before: dict[str, Any]) -> None:
    for k in ("status", "code", "field", "detail"):
        assert got[k] == before[k], (k, got, before)


def _snapshot(client: TestClient | httpx.Client, sid: str) -> tuple[bytes, bytes, Any]:
    """The session bit for bit: its parameters and exported state (safetensors bytes), and
    its description."""
    binary = {"Accept": "application/octet-stream"}
    params = client.get(f"/v1/sessions/{sid}/params", headers=binary)
    state = client.get(f"/v1/sessions/{sid}/state_dict", headers=binary)
    info = client.get(f"/v1/sessions/{sid}")
    assert params.status_code == state.status_code == info.status_code == 200
    return params.content, state.content, info.json()


def _next_is_torch(client: TestClient | httpx.Client, sid: str, route: str,
                   local: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
    """The next push (then a step) or overwrite (then a step) of the session, and the same in
    torch: equal bit for bit (a refused push that left gradients in the accumulator, or an
    overwrite that changed a parameter, shows here)."""
    pushed = {n: -2 * g for n, g in GRADS.items()}
    if route == "grads":
        r = client.post(f"/v1/sessions/{sid}/grads", content=save(pushed), headers=BIN_CT)
        assert r.status_code == 200, r.text
        assert r.json()["accumulated"] == sorted(GRADS)
    else:
        r = client.put(f"/v1/sessions/{sid}/params", content=save(NEW), headers=BIN_CT)
        assert r.status_code == 200, r.text
        got = tensors_from_json(r.json()["params"])
        with torch.no_grad():
            for n, p in local.items():
                p.copy_(NEW[n])
                assert torch.equal(got[n], p.detach()), n
    r = client.post(f"/v1/sessions/{sid}/step", content=save(GRADS), headers=BIN_CT)
    assert r.status_code == 200, r.text
    for n, p in local.items():
        p.grad = (pushed[n] + GRADS[n]) if route == "grads" else GRADS[n].clone()
    opt.step()
    got = tensors_from_json(r.json()["params"])
    for n, p in local.items():
        assert torch.equal(got[n], p.detach()), n


@pytest.mark.parametrize("route", ["grads", "params"])
@pytest.mark.parametrize("fmt", ["json", "safetensors"])
@pytest.mark.parametrize("first,code,name,count", [
    # the session's names first, then 27 it lacks: the first of those is named, and only
    # the tensors up to it are made
    (dict(GRADS), "unknown_parameter", "extra000", 4),
    # an earlier entry's mismatch is the answer, as the session's check found it first
    ({"a": GRADS["a"].double()}, "dtype_mismatch", "a", 1),
])
def test_excess_entries_refused_before_their_values(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        made: list[int], monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
        route: str, fmt: str, first: dict[str, torch.Tensor], code: str, name: str,
        count: int) -> None:
    local, opt = _session(app_client, "s")
    refused_before_their_values(app_client, route, fmt, _excess(first), (code, name, count),
                                decoded, made, monkeypatch)
    _next_is_torch(app_client, "s", route, local, opt)


def refused_before_their_values(client: TestClient, route: str, fmt: str,
                                tensors: dict[str, torch.Tensor], want: tuple[str, str, int],
                                decoded_names: list[str], made_counts: list[int],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Session ``s``'s body of ``tensors`` on ``route`` is refused with ``want`` (the code, the
    tensor named, how many tensors a JSON body had decoded by then; a safetensors body: none
    made), the answer a whole decode gives, and the session is as it was (shared with
    ``test_ray_excess_entries``)."""
    code, name, count = want
    held = _snapshot(client, "s")
    decoded_names.clear()
    made_counts.clear()
    got = _problem(_send(client, "s", route, fmt, tensors))
    key = ALL_ROUTES[route][1]
    assert (got["code"], got["field"]) == (code, f"{key}.{name}"), got
    if fmt == "json":  # (was: every tensor of the body)
        assert decoded_names == [f"{key}.{n}" for n in list(tensors)[:count]], decoded_names
    else:
        assert made_counts == []  # (was: every tensor made)
    decoded_names.clear()
    made_counts.clear()
    before = _whole_way(monkeypatch, lambda: _send(client, "s", route, fmt, tensors))
    assert len(decoded_names) == len(tensors) if fmt == "json" else made_counts == [len(tensors)]
    _same(got, before)
    assert _snapshot(client, "s") == held


@pytest.mark.parametrize("route,fields,headers", [
    ("grads", {"scalars": 5}, {}),  # (not an object: checked before the gradients)
    ("grads", {}, {"Idempotency-Key": "a b"}),  # (a space)
    ("params", {}, {"Idempotency-Key": "a b"}),
])
def test_a_malformed_tensor_before_the_refused_one_comes_first(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch, route: str, fields: dict[str, Any],
        headers: dict[str, str]) -> None:
    """As a step's: the tensors up to the refused name are decoded before the request's other
    refusals (a malformed ``scalars`` or ``Idempotency-Key``), so a malformed one among them
    is the answer, as when every tensor was decoded first; without one, the other refusal."""
    local, opt = _session(app_client, "o")
    held = _snapshot(app_client, "o")
    key = ROUTES[route][1]
    for tensors, code, field in (
            ({"a": BAD_DATA, **_excess({})}, "invalid_tensor", f"{key}.a.data"),
            (_excess(dict(GRADS)), "invalid_scalars" if fields else "invalid_idempotency_key",
             "scalars" if fields else "Idempotency-Key")):
        def send(tensors: dict[str, Any] = tensors) -> httpx.Response:
            return _send(app_client, "o", route, "json", tensors, headers, **fields)
        decoded.clear()
        got = _problem(send())
        assert (got["code"], got["field"]) == (code, field), got
        # (the malformed one, or every tensor up to the refused name)
        assert len(decoded) == (1 if code == "invalid_tensor" else 4), decoded
        _same(got, _whole_way(monkeypatch, send))
    assert _snapshot(app_client, "o") == held
    _next_is_torch(app_client, "o", route, local, opt)


def test_a_push_whose_scalars_the_session_refuses_goes_the_whole_way(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A push's scalars are checked against the session's distinct scalar names before its
    gradients: a push bringing it past them is refused for them, as when every tensor was
    decoded first (not for its first unknown name)."""
    local, opt = _session(app_client, "n")
    r = app_client.post("/v1/sessions/n/zero_grad")
    assert r.status_code == 200, r.text
    for i in range(MAX_SCALAR_NAMES // MAX_SCALARS):  # (the session's room, filled)
        r = app_client.post("/v1/sessions/n/grads", json={
            "grads": {}, "scalars": {f"s{i}_{j}": 1.0 for j in range(MAX_SCALARS)}})
        assert r.status_code == 200, r.text
    held = _snapshot(app_client, "n")
    tensors = _excess(dict(GRADS))

    def send() -> httpx.Response:
        return _send(app_client, "n", "grads", "json", tensors, scalars={"fresh": 0.5})
    decoded.clear()
    got = _problem(send())
    assert (got["code"], got["field"]) == ("invalid_scalars", "scalars.fresh"), got
    assert len(decoded) == len(tensors)
    _same(got, _whole_way(monkeypatch, send))
    # names the session has: refused from the entries
    decoded.clear()
    known = _problem(_send(app_client, "n", "grads", "json", tensors, scalars={"s0_0": 0.5}))
    assert (known["code"], known["field"]) == ("unknown_parameter", "grads.extra000"), known
    assert len(decoded) == 4
    assert _snapshot(app_client, "n") == held
    r = app_client.post("/v1/sessions/n/zero_grad")  # (the scalars pushed, cleared)
    assert r.status_code == 200, r.text
    _next_is_torch(app_client, "n", "grads", local, opt)


def sharded_session(client: TestClient) -> tuple[dict[str, torch.nn.Parameter],
                                                torch.optim.Adam]:
    """Session ``sh`` of PARAMS in 2 shards (Adam), and torch's twin of it (shared with
    ``test_ray_excess_entries``)."""
    r = client.post("/v1/sessions", json={
        "id": "sh", "optimizer": "Adam", "options": {"lr": 0.1}, "shards": 2,
        "params": {n: json_tensor(t) for n, t in PARAMS.items()}})
    assert r.status_code == 201, r.text
    local = {n: torch.nn.Parameter(t.clone()) for n, t in PARAMS.items()}
    return local, torch.optim.Adam(list(local.values()), lr=0.1)


@pytest.mark.parametrize("route", ["grads", "params"])
def test_a_sharded_sessions_excess_entries_are_refused_before_their_values(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """A sharded session checks a push's or an overwrite's names against its layout first:
    refused at its first unknown name before the values after it are decoded."""
    local, opt = sharded_session(app_client)
    held = _snapshot(app_client, "sh")
    tensors = _excess({"a": GRADS["a"].double(), "b": GRADS["b"]})
    key = ROUTES[route][1]
    decoded.clear()
    got = _problem(_send(app_client, "sh", route, "json", tensors))
    assert (got["code"], got["field"]) == ("unknown_parameter", f"{key}.extra000"), got
    assert decoded == [f"{key}.a", f"{key}.b", f"{key}.extra000"]
    decoded.clear()
    _same(got, _whole_way(monkeypatch, lambda: _send(app_client, "sh", route, "json", tensors)))
    assert len(decoded) == len(tensors)
    assert _snapshot(app_client, "sh") == held
    _next_is_torch(app_client, "sh", route, local, opt)


def test_an_overwrite_whose_precondition_fails_meanwhile_is_a_412(
        live_server: str, asked: threading.Event) -> None:  # noqa: F811 - the fixture
    """An overwrite with ``If-Match`` checks it before the tensors: a session stepped while
    the body arrives (past the version named, after the check from the request's head) gets
    the 412 the overwrite gives, not the first unknown name, and nothing changes."""
    tensors = _excess(dict(GRADS))
    body = save(tensors)
    with httpx.Client(base_url=live_server, timeout=60) as client:
        local, opt = _session(client, "pre")  # (an httpx client as the TestClient)
        version = client.get("/v1/sessions/pre").json()["version"]
        where = urlsplit(live_server)
        assert where.hostname is not None and where.port is not None
        with socket.create_connection((where.hostname, where.port), timeout=60) as s:
            s.sendall(f"PUT /v1/sessions/pre/params HTTP/1.1\r\nHost: x\r\n"
                      "Content-Type: application/octet-stream\r\nAccept: application/json\r\n"
                      f"If-Match: \"{version}\"\r\nContent-Length: {len(body)}\r\n"
                      "Connection: close\r\n\r\n".encode() + body[:1000])
            assert asked.wait(60)
            r = client.post("/v1/sessions/pre/step", content=save(GRADS), headers=BIN_CT)
            assert r.status_code == 200, r.text
            for n, p in local.items():
                p.grad = GRADS[n].clone()
            opt.step()
            held = _snapshot(client, "pre")
            s.sendall(body[1000:])
            answer = b""
            while chunk := s.recv(1 << 20):
                answer += chunk
        head, _, content = answer.partition(b"\r\n\r\n")
        assert int(head.split()[1]) == 412, answer[:500]
        assert json.loads(content)["code"] == "precondition_failed", content
        assert _snapshot(client, "pre") == held
        _next_is_torch(client, "pre", "params", local, opt)


@pytest.mark.parametrize("route", ["grads", "params"])
@pytest.mark.parametrize("fmt", ["json", "safetensors"])
def test_a_push_or_overwrite_during_an_open_lbfgs_step_goes_the_whole_way(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        made: list[int], monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
        route: str, fmt: str) -> None:
    """While an LBFGS step waits for an evaluation, a push or an overwrite is a 409
    ``step_in_progress``, answered once its body is decoded: the early refusal declines (its
    422 for the first unknown name would not be the operation's answer), and the session,
    its open step abandoned, is as it was."""
    r = app_client.post("/v1/sessions", json={
        "id": "l", "optimizer": "LBFGS", "options": {"lr": 1, "max_iter": 5},
        "params": {n: json_tensor(t) for n, t in PARAMS.items()}})
    assert r.status_code == 201, r.text
    held = _snapshot(app_client, "l")
    opened = app_client.post("/v1/sessions/l/step")
    assert opened.status_code == 200 and "evaluation" in opened.json(), opened.text
    tensors = _excess(dict(GRADS))
    decoded.clear()
    made.clear()
    got = _problem(_send(app_client, "l", route, fmt, tensors))
    assert (got["status"], got["code"]) == (409, "step_in_progress"), got
    # (every tensor decoded, as the operation decodes them before it finds the step open)
    assert len(decoded) == len(tensors) if fmt == "json" else made == [len(tensors)]
    _same(got, _whole_way(monkeypatch, lambda: _send(app_client, "l", route, fmt, tensors)))
    r = app_client.delete(f"/v1/sessions/l/step/{opened.json()['step_id']}")
    assert r.status_code in (200, 204), r.text
    assert _snapshot(app_client, "l")[:2] == held[:2]  # (parameters and state, bit for bit)
