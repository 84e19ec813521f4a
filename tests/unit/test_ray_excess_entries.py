"""A step's, a push's or an overwrite's body (over OFFLOAD_BYTES) naming more tensors than its
session holds is refused on the Ray engine from its entries, before the tensors after the
refused name are made, as on the embedded engine (``test_excess_step_entries``,
``test_excess_json_step_entries``, ``test_excess_push_overwrite_entries``): the session's host
says its parameters (``EmbeddedHost.held_entries``, asked only for a body naming more tensors
than it last said the session held) and the front runs the session's own check over them; a
sharded session's body is refused from its layout. On the Ray engine every such body was
decoded whole first.
The answer is the one the operation gives once every tensor is decoded (the early refusal
switched off), and nothing changes: the parameters and the optimizer's state are as they were,
and the next operation is torch's. Where the host declines (a retry under a key the session
holds, a push with scalars) or does not answer, the body is decoded whole and answered as
before. The app runs in this process over the fake cluster of ``test_ray_deletes`` (host
actors running their real code here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.errors import Unavailable
from app.main import create_app
from tests.integration.test_excess_json_step_entries import decoded  # noqa: F401 - fixture
from tests.integration.test_excess_push_overwrite_entries import (
    _next_is_torch,
    _problem,
    _same,
    _send,
    _snapshot,
    _whole_way,
    refused_before_their_values,
    sharded_session,
)
from tests.integration.test_excess_step_entries import (  # noqa: F401 - the fixture
    BIN_CT,
    GRADS,
    PARAMS,
    _excess,
    _session,
    _step_both,
    made,
)
from tests.torch_reference import json_tensor, tensors_from_json

ray_host = pytest.importorskip("app.engine.ray_host")
ray = pytest.importorskip("ray")

from tests.unit.test_ray_deletes import Cluster  # noqa: E402

#: route -> (method, path's end, the body's key)
ROUTES = {"step": ("POST", "step", "grads"), "grads": ("POST", "grads", "grads"),
          "params": ("PUT", "params", "params")}


@pytest.fixture
def ray_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app over the Ray engine, its hosts the fake cluster's (in this process)."""
    cluster = Cluster(tmp_path / "data", monkeypatch)
    monkeypatch.setattr(ray_host, "_actor_class", lambda: cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    settings = Settings(engine="ray", data_dir=tmp_path / "data", device="cpu", warm_up=False,
                        max_body_mb=64.0)
    with TestClient(create_app(settings)) as client:
        yield client
        client.portal.call(cluster.kill)


def _next(client: TestClient, sid: str, route: str, local: dict[str, torch.nn.Parameter],
          opt: torch.optim.Optimizer) -> None:
    if route == "step":
        _step_both(client, sid, local, opt, {n: -2 * g for n, g in GRADS.items()})
    else:
        _next_is_torch(client, sid, route, local, opt)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("fmt", ["json", "safetensors"])
@pytest.mark.parametrize("first,code,name,count", [
    # the session's names first, then 27 it lacks: the first of those is named, and only
    # the tensors up to it are made
    (dict(GRADS), "unknown_parameter", "extra000", 4),
    # an earlier entry's mismatch is the answer, as the session's check found it first
    ({"a": GRADS["a"].double()}, "dtype_mismatch", "a", 1),
    ({"c": GRADS["c"], "b": torch.zeros(2, 1)}, "shape_mismatch", "b", 2),
])
def test_excess_entries_are_refused_on_the_ray_engine_before_their_values(
        ray_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        made: list[int], monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
        route: str, fmt: str, first: dict[str, torch.Tensor], code: str, name: str,
        count: int) -> None:
    local, opt = _session(ray_client, "s")
    refused_before_their_values(ray_client, route, fmt, _excess(first), (code, name, count),
                                decoded, made, monkeypatch)
    _next(ray_client, "s", route, local, opt)


def test_where_the_host_declines_or_does_not_answer_the_body_goes_the_whole_way(
        ray_client: TestClient, made: list[int],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A push with scalars (the host checks their names first), a step retried under an
    Idempotency-Key the session holds (answered from its record), and a body whose host does
    not say its parameters (restarting) are decoded whole, with the answers they had."""
    local, opt = _session(ray_client, "d")
    tensors = _excess(dict(GRADS))
    # a push with scalars: decoded whole, refused for its first unknown name as before
    made.clear()
    got = _problem(_send(ray_client, "d", "grads", "safetensors", tensors,
                         scalars={"loss": 0.5}))
    assert (got["code"], got["field"]) == ("unknown_parameter", "grads.extra000"), got
    assert made == [len(tensors)]
    # a retry of a step the session answered under its key: the same answer again
    keyed = {"Idempotency-Key": "step-1"}
    r = _send(ray_client, "d", "step", "safetensors", GRADS, keyed)
    assert r.status_code == 200, r.text
    for n, p in local.items():
        p.grad = GRADS[n].clone()
    opt.step()
    held = _snapshot(ray_client, "d")
    made.clear()
    again = _problem(_send(ray_client, "d", "step", "safetensors", tensors, keyed))
    assert made == [len(tensors)]  # (decoded whole: its record answers)
    _same(again, _whole_way(monkeypatch, lambda: _send(ray_client, "d", "step",
                                                       "safetensors", tensors, keyed)))
    # the host does not answer: decoded whole, the operation's answer
    async def restarting(*args: Any, **kw: Any) -> Any:
        raise Unavailable("restarting", code="host_restarting")
    monkeypatch.setattr(ray_host.RayHost, "held_entries", restarting)
    made.clear()
    got = _problem(_send(ray_client, "d", "params", "safetensors", tensors))
    assert (got["code"], got["field"]) == ("unknown_parameter", "params.extra000"), got
    assert made == [len(tensors)]
    assert _snapshot(ray_client, "d") == held
    _next(ray_client, "d", "step", local, opt)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("fmt", ["json", "safetensors"])
def test_a_sharded_sessions_excess_entries_are_refused_on_the_ray_engine(
        ray_client: TestClient, decoded: list[str],  # noqa: F811 - the fixture
        made: list[int], monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
        route: str, fmt: str) -> None:
    """A sharded session checks a body's names against its layout first (its coordinator,
    in its first shard's host): the front refuses it at its first unknown name from its
    directory entry's layout, as the embedded engine's sharded session does, before the
    values after it are decoded."""
    local, opt = sharded_session(ray_client)
    held = _snapshot(ray_client, "sh")
    tensors = _excess({"a": GRADS["a"].double(), "b": GRADS["b"]})
    key = ROUTES[route][2]
    decoded.clear()
    made.clear()
    got = _problem(_send(ray_client, "sh", route, fmt, tensors))
    assert (got["code"], got["field"]) == ("unknown_parameter", f"{key}.extra000"), got
    if fmt == "json":
        assert decoded == [f"{key}.a", f"{key}.b", f"{key}.extra000"]
    else:
        assert made == []
    decoded.clear()
    made.clear()
    _same(got, _whole_way(monkeypatch, lambda: _send(ray_client, "sh", route, fmt, tensors)))
    assert len(decoded) == len(tensors) if fmt == "json" else made == [len(tensors)]
    assert _snapshot(ray_client, "sh") == held
    _next(ray_client, "sh", route, local, opt)


def test_a_ray_front_asks_the_host_only_for_a_body_naming_more_tensors_than_it_knew(
        ray_client: TestClient, made: list[int],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step costs no round trip more: the front asks a session's host for the early refusal
    only for a body naming more tensors than the host said the session held when last asked
    (a first large body; a session given another param group; a body naming one it lacks).
    A body naming a parameter added since that count (a group added) is stepped as torch's."""
    asks: list[str] = []
    ask = ray_host.RayHost.held_entries

    async def counted(self: Any, key: str, *args: Any) -> Any:
        asks.append(key)
        return await ask(self, key, *args)
    monkeypatch.setattr(ray_host.RayHost, "held_entries", counted)
    params = {"a": torch.tensor([1.0, -2.0, 0.5]), "w": torch.linspace(-1.0, 1.0, 100_000)}
    r = ray_client.post("/v1/sessions", json={
        "id": "big", "optimizer": "Adam", "options": {"lr": 0.1},
        "params": {n: json_tensor(t) for n, t in params.items()}})
    assert r.status_code == 201, r.text
    local = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.1)

    def step(grads: dict[str, torch.Tensor], fmt: str = "safetensors") -> None:
        r = _send(ray_client, "big", "step", fmt, grads)
        assert r.status_code == 200, r.text
        for n, p in local.items():
            p.grad = grads[n].clone() if n in grads else None
        opt.step()
        got = tensors_from_json(r.json()["params"])
        for n, p in local.items():
            assert torch.equal(got[n], p.detach()), n

    grads = {"a": torch.tensor([0.5, 0.25, -1.0]), "w": torch.linspace(0.5, -0.5, 100_000)}
    step(grads)
    assert asks == ["default~big"]  # (the first large body: the count was not known)
    step({n: -g for n, g in grads.items()})
    step(grads, "json")
    assert len(asks) == 1  # (no more than the count: nothing asked)
    r = ray_client.post("/v1/sessions/big/param_groups",
                        json={"params": {"d": json_tensor(torch.tensor([3.0, -3.0]))}})
    assert r.status_code == 201, r.text
    local["d"] = torch.nn.Parameter(torch.tensor([3.0, -3.0]))
    opt.add_param_group({"params": [local["d"]]})
    with_d = {**grads, "d": torch.tensor([1.0, 0.5])}
    step(with_d)  # (more than the count it knew: asked, and the host holds them all)
    assert len(asks) == 2
    step(with_d, "json")
    assert len(asks) == 2
    made.clear()
    got = _problem(_send(ray_client, "big", "step", "safetensors",
                         {**with_d, "extra": torch.ones(2)}))
    assert (got["code"], got["field"]) == ("unknown_parameter", "grads.extra"), got
    assert made == [] and len(asks) == 3
    step(with_d)
    assert len(asks) == 3


def test_a_front_whose_session_was_made_again_through_another_front_refuses_early_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        made: list[int]) -> None:  # noqa: F811 - the fixture
    """Front A learns that session "re" holds 3 parameters (its host said so for a first large
    body); front B deletes it and makes it again with 1 parameter, on the same host (pack).
    A still holds the old creation's entry (nothing tells it: the host holds the id), so its
    next body naming the 3 old names is not asked about (no more than the count it knew): it is
    decoded whole and refused by the host, as before. Before, A kept that count, and every such
    body after it was decoded whole too; now the host's refusal of an unknown name makes A
    forget it, and the next such body is refused from its entries, no tensor made. Then A
    steps the new session as torch."""
    cluster = Cluster(tmp_path / "data", monkeypatch)
    monkeypatch.setattr(ray_host, "_actor_class", lambda: cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    settings = Settings(engine="ray", data_dir=tmp_path / "data", device="cpu", warm_up=False,
                        ray_placement="pack")
    old = {"a": torch.tensor([1.0, -2.0, 0.5]), "w": torch.linspace(-1.0, 1.0, 100_000),
           "v": torch.linspace(2.0, 1.0, 100_000)}
    new = {"a": torch.tensor([0.5, 0.25, 4.0])}
    grads = {n: torch.full_like(t, 0.5) for n, t in old.items()}
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        def create(client: TestClient, params: dict[str, torch.Tensor]) -> None:
            r = client.post("/v1/sessions", json={
                "id": "re", "optimizer": "SGD", "options": {"lr": 0.1},
                "params": {n: json_tensor(t) for n, t in params.items()}})
            assert r.status_code == 201, r.text
        create(a, old)
        assert _send(a, "re", "step", "safetensors", grads).status_code == 200
        assert b.delete("/v1/sessions/re").status_code == 204
        create(b, new)
        assert a.get("/v1/sessions/re").json()["placement"]["host"] == \
            b.get("/v1/sessions/re").json()["placement"]["host"]  # (the same host)
        for whole in (True, False):
            made.clear()
            got = _problem(_send(a, "re", "step", "safetensors", grads))
            # (the body's first name the session lacks: safetensors sorts them)
            assert (got["code"], got["field"]) == ("unknown_parameter", "grads.v"), got
            assert made == ([len(grads)] if whole else []), (whole, made)
        local = {n: torch.nn.Parameter(t.clone()) for n, t in new.items()}
        opt = torch.optim.SGD(list(local.values()), lr=0.1)
        r = _send(a, "re", "step", "safetensors", {"a": grads["a"]})
        assert r.status_code == 200, r.text
        local["a"].grad = grads["a"].clone()
        opt.step()
        assert torch.equal(tensors_from_json(r.json()["params"])["a"], local["a"].detach())
        a.portal.call(cluster.kill)
