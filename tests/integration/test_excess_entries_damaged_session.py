"""The early refusal of a body naming more tensors than its session holds (a step's, a push's or
an overwrite's, JSON or safetensors: ``sessions._refuse_entries``) declines for a session out of
service (``EmbeddedHost.entries_refusal``: a step failed half-way and its rebuild failed, or it
keeps nothing on disk to rebuild from): the body is decoded whole and the operation answers, as
it did with the early refusal switched off. Out of service, that is its 503 ``session_damaged``
(not the 422 ``unknown_parameter`` the entries would give: that is no answer the session gives
now); once its backoff has run out, the request that restores it gets the 422 of the restored
session. Nothing changes: the session restored holds the acknowledged steps only, bit for bit an
in-process ``torch.optim`` run of them, and goes on as torch does; one that keeps nothing on disk
keeps the tensors it was left with."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.engine.host import EmbeddedHost
from app.engine.host_restore import SessionRestorer
from tests.integration.test_excess_json_step_entries import decoded  # noqa: F401 - the fixture
from tests.integration.test_excess_push_overwrite_entries import (
    _next_is_torch,
    _problem,
    _same,
    _send,
    _whole_way,
)
from tests.integration.test_excess_step_entries import (  # noqa: F401 - the fixture
    BIN_CT,
    GRADS,
    PARAMS,
    _excess,
    _step_both,
    made,
)
from tests.torch_reference import json_tensor, tensors_from_json

pytestmark = pytest.mark.integration
#: what the refused requests are: (route, format)
REQUESTS = [(route, fmt) for route in ("step", "grads", "params")
            for fmt in ("json", "safetensors")]
#: a step with this gradient for ``a`` fails half-way (the parameters changed, then it raised)
POISON = torch.full((3,), 7.0)


def _send_any(client: TestClient, sid: str, route: str, fmt: str,
              tensors: dict[str, torch.Tensor]) -> Any:
    if route != "step":
        return _send(client, sid, route, fmt, tensors)
    if fmt == "json":
        return client.post(f"/v1/sessions/{sid}/step", json={
            "grads": {n: json_tensor(t) for n, t in tensors.items()}})
    return client.post(f"/v1/sessions/{sid}/step", content=save(tensors), headers=BIN_CT)


def _key(route: str, name: str) -> str:
    return f"{'params' if route == 'params' else 'grads'}.{name}"


@pytest.fixture
def half_way(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Adam's step fails half-way for the poison gradient (as torch running out of memory
    after it changed the parameters)."""
    real = torch.optim.Adam.step

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        grad = self.param_groups[0]["params"][0].grad
        out = real(self, closure)
        if grad is not None and torch.equal(grad, POISON):
            raise RuntimeError("simulated: out of memory")
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    yield


def _host(client: TestClient) -> EmbeddedHost:
    host: EmbeddedHost = client.app.state.engine.router.local.embedded  # type: ignore[attr-defined]
    return host


def _damage(client: TestClient, sid: str, durability: str
            ) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Adam]:
    """An Adam session stepped once (and torch's run of it), then out of service: its second
    step fails half-way and (with a store) its rebuild fails too."""
    r = client.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.1}, "durability": durability,
        "params": {n: json_tensor(t) for n, t in PARAMS.items()}})
    assert r.status_code == 201, r.text
    local = {n: torch.nn.Parameter(t.clone()) for n, t in PARAMS.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.1)
    _step_both(client, sid, local, opt, GRADS)
    host = _host(client)
    host.config.damaged_retry_s = 3600.0  # (no try to restore it while the test runs)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "simulated: the log cannot be read")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(SessionRestorer, "restore", failing)
        r = client.post(f"/v1/sessions/{sid}/step", content=save({**GRADS, "a": POISON}),
                        headers=BIN_CT)
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "session_damaged"
    return local, opt


def _out_of_service(problem: dict[str, Any]) -> None:
    assert (problem["status"], problem["code"]) == (503, "session_damaged"), problem


def _same_503(got: dict[str, Any], whole: dict[str, Any]) -> None:
    """The same problem, but for the seconds its detail counts down to the next try."""
    def now(problem: dict[str, Any]) -> tuple[Any, ...]:
        return (problem["type"], problem["status"], problem["code"], problem.get("field"),
                re.sub(r"after [0-9]+ s", "after N s", problem["detail"]))
    assert now(got) == now(whole), (got, whole)


@pytest.mark.parametrize("durability", ["step", "memory"])
def test_a_damaged_session_gets_the_answer_a_whole_decode_gives(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        made: list[int], monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
        half_way: None, durability: str) -> None:
    """Out of service: each excess body (a step, a push, an overwrite; JSON and safetensors)
    is decoded whole and answered 503 ``session_damaged``, the same problem as with the early
    refusal switched off, and the tensors the session holds are not touched."""
    _damage(app_client, "d", durability)
    held = {n: t.clone() for n, t in _host(app_client)._sessions["default~d"].params.items()}
    tensors = _excess(dict(GRADS))
    for route, fmt in REQUESTS:
        decoded.clear()
        made.clear()
        r = _send_any(app_client, "d", route, fmt, tensors)
        assert r.status_code == 503, r.text
        got = r.json()
        _out_of_service(got)
        assert ("retry-after" in r.headers) == (durability == "step"), r.headers
        # (declined: every tensor decoded, as the operation decodes them before its session)
        assert len(decoded) == len(tensors) if fmt == "json" else made == [len(tensors)]
        with monkeypatch.context() as patched:
            patched.setattr("app.api.sessions._refuse_entries", lambda *args: None)
            whole = _send_any(app_client, "d", route, fmt, tensors)
        assert whole.status_code == 503, whole.text
        _same_503(got, whole.json())
    session = _host(app_client)._sessions["default~d"]
    for n, t in held.items():
        assert torch.equal(session.params[n], t), n


def test_the_request_that_restores_it_gets_the_restored_sessions_answer(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        made: list[int], monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
        half_way: None) -> None:
    """Its backoff run out, an excess body is still decoded whole (the session was out of
    service when its entries were looked at), the operation restores the session from its
    store and refuses the body for its first unknown name: the 422 a whole decode gives. The
    session holds the acknowledged step only, as torch's, and goes on as torch does."""
    local, opt = _damage(app_client, "h", "step")
    damage = _host(app_client)._damaged["default~h"]
    tensors = _excess(dict(GRADS))
    for route, fmt in REQUESTS:
        damage.retry_at = time.monotonic()  # (the backoff has run out)
        _host(app_client)._damaged["default~h"] = damage
        decoded.clear()
        made.clear()
        got = _problem(_send_any(app_client, "h", route, fmt, tensors))
        assert (got["code"], got["field"]) == ("unknown_parameter", _key(route, "extra000")), got
        # (the body's tensors, then the restore's own reads of the session's records)
        assert len(decoded) == len(tensors) if fmt == "json" else made[0] == len(tensors)
        assert "default~h" not in _host(app_client)._damaged  # (restored by it)
        _same(got, _whole_way(monkeypatch, lambda r=route, f=fmt: _send_any(
            app_client, "h", r, f, tensors)))
    info = app_client.get("/v1/sessions/h").json()
    assert (info["version"], info["step"]) == (1, 1)  # (the acknowledged step only)
    for n, p in _params(app_client, "h").items():
        assert torch.equal(p, local[n].detach()), n
    _next_is_torch(app_client, "h", "grads", local, opt)


def _params(client: TestClient, sid: str) -> dict[str, torch.Tensor]:
    r = client.get(f"/v1/sessions/{sid}/params")
    assert r.status_code == 200, r.text
    return tensors_from_json(r.json()["params"])


@pytest.mark.parametrize("route", ["step", "grads", "params"])
def test_a_sharded_session_with_a_damaged_shard_refuses_names_as_a_whole_decode_does(
        app_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch, half_way: None, route: str) -> None:
    """A sharded session checks a body's names against its layout before any shard looks at
    it, out of service or not: with the shard holding ``a`` out of service (its step failed
    half-way, and it keeps nothing on disk), an excess body is refused at its first unknown
    name from its entries (``ShardedSession.entries_refusal``), the 422 a whole decode gives,
    and the shards' tensors are not touched."""
    r = app_client.post("/v1/sessions", json={
        "id": "sd", "optimizer": "Adam", "options": {"lr": 0.1}, "shards": 2,
        "durability": "memory", "params": {n: json_tensor(t) for n, t in PARAMS.items()}})
    assert r.status_code == 201, r.text
    r = app_client.post("/v1/sessions/sd/step", content=save({**GRADS, "a": POISON}),
                        headers=BIN_CT)
    assert r.status_code == 503, r.text
    host = _host(app_client)
    shards = [k for k in host._sessions if k.startswith("default#sd~shard")]
    assert len(shards) == 2 and any(k in host._damaged for k in shards), shards
    held = {k: {n: t.clone() for n, t in host._sessions[k].params.items()} for k in shards}
    tensors = _excess(dict(GRADS))
    decoded.clear()
    got = _problem(_send_any(app_client, "sd", route, "json", tensors))
    assert (got["code"], got["field"]) == ("unknown_parameter", _key(route, "extra000")), got
    assert len(decoded) == 4, decoded  # (a, b, c, then the refused name)
    decoded.clear()
    _same(got, _whole_way(monkeypatch, lambda: _send_any(app_client, "sd", route, "json",
                                                         tensors)))
    assert len(decoded) == len(tensors)
    for k, params in held.items():
        for n, t in params.items():
            assert torch.equal(host._sessions[k].params[n], t), (k, n)
