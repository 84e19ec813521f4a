"""A session made again under the id of a deleted one continues its versions: it starts at the
deleted session's last version + 1 (``app.engine.last_versions``), so that no version (no
``ETag: "<version>"``) names two sessions' values.

Before, every session counted from 0: a session deleted at version 1 and made again with other
values, stepped once, was at version 1 again, and a client holding the OLD session's values
got ``If-None-Match: "1"`` answered 304 (it
kept the old values), its ``PUT .../params`` with ``If-Match: "1"`` taken (the lost-update guard
passed), its push with ``If-Match``/``?base_version=`` taken at staleness 0, and its long poll
for ``min_version`` held while the new values were there. Each case is checked here over real
HTTP, plain and sharded, on both engines (the Ray engine's: its sessions on a real local
cluster), live and across ``kill -9`` restarts (between the delete and the create, and after
the create), with the values compared with an in-process ``torch.optim.SGD`` run."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import ENGINES
from tests.integration.test_durability import Proc

pytestmark = pytest.mark.integration

Tensors = dict[str, torch.Tensor]
OPTIONS = {"lr": 0.1, "momentum": 0.9}
JSON = {"content-type": "application/json"}


def jt(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.flatten().tolist()}


def values(seed: int, scale: float = 1.0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g) * scale, "b": torch.randn(5, generator=g) * scale,
            "c": torch.randn(2, generator=g) * scale}


class Twin:
    """An in-process ``torch.optim.SGD`` over a session's parameters."""

    def __init__(self, params: Tensors) -> None:
        self.params = {n: v.clone().requires_grad_() for n, v in params.items()}
        self.opt = torch.optim.SGD(self.params.values(), **OPTIONS)  # type: ignore[arg-type]

    def step(self, grads: Tensors) -> None:
        for n, p in self.params.items():
            p.grad = grads[n].clone()
        self.opt.step()

    def assert_params(self, body: dict[str, Any]) -> None:
        got = body["params"]
        assert set(got) == set(self.params)
        for n, p in self.params.items():
            t = torch.tensor(got[n]["data"], dtype=torch.float32).reshape(got[n]["shape"])
            assert torch.equal(t, p.detach()), n


def create(http: httpx.Client, sid: str, params: Tensors, shards: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"id": sid, "optimizer": "SGD", "options": OPTIONS,
                            "params": {n: jt(v) for n, v in params.items()}}
    if shards > 1:
        body["shards"] = shards
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    info: dict[str, Any] = r.json()
    return info


def step(http: httpx.Client, sid: str, twin: Twin, seed: int) -> int:
    grads = values(seed, 0.5)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(g) for n, g in grads.items()}})
    assert r.status_code == 200, r.text
    twin.step(grads)
    twin.assert_params(r.json())
    version: int = r.json()["version"]
    assert r.headers["ETag"] == f'"{version}"'
    return version


def params(http: httpx.Client, sid: str, **headers: str) -> httpx.Response:
    return http.get(f"/v1/sessions/{sid}/params", headers=headers)


def made_again_cases(http: httpx.Client, sid: str, shards: int) -> None:
    """Create (values A), step to v1, read it (ETag "1"), delete; create under the same id with
    values B: at v2; step: v3. The old tag and base version are refused or answered whole."""
    old = Twin(values(1))
    assert create(http, sid, values(1), shards)["version"] == 0
    assert step(http, sid, old, 11) == 1
    r = params(http, sid)
    assert (r.status_code, r.headers["ETag"]) == (200, '"1"')
    old.assert_params(r.json())
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204

    twin = Twin(values(2, 3.0))
    info = create(http, sid, values(2, 3.0), shards)
    assert (info["version"], info["step"]) == (2, 0)  # (the step count is torch's: 0)
    r = params(http, sid)
    assert (r.status_code, r.headers["ETag"], r.json()["version"]) == (200, '"2"', 2)
    twin.assert_params(r.json())
    assert step(http, sid, twin, 12) == 3

    # If-None-Match of the old session's tag: the new values, whole
    r = params(http, sid, **{"If-None-Match": '"1"'})
    assert (r.status_code, r.headers["ETag"]) == (200, '"3"'), r.text
    twin.assert_params(r.json())
    # a long poll for anything newer than the old session's version answers at once
    t0 = time.monotonic()
    r = http.get(f"/v1/sessions/{sid}/params", params={"min_version": 2, "wait_s": 20},
                 headers={"If-None-Match": '"1"'})
    assert (r.status_code, r.json()["version"]) == (200, 3), r.text
    assert time.monotonic() - t0 < 15  # (not held until the wait's end)
    twin.assert_params(r.json())

    # a PUT read from the old session: 412, nothing changed
    r = http.put(f"/v1/sessions/{sid}/params", headers={"If-Match": '"1"', **JSON},
                 json={"params": {"w": jt(torch.full((3, 4), 7.0))}})
    assert (r.status_code, r.json()["current_version"]) == (412, 3), r.text
    # pushes computed on the old session's values: refused, nothing changed
    grads = {n: jt(g) for n, g in values(13, 0.5).items()}
    for how in ({"headers": {"If-Match": '"1"'}}, {"params": {"base_version": 1}},
                {"headers": {"If-Match": '"0"'}}):
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": grads}, **how)
        assert r.status_code == 409, (how, r.text)
        problem = r.json()
        assert (problem["code"], problem["discarded_by"], problem["replaced_version"],
                problem["current_version"]) == ("stale_gradient", "create", 2, 3), how
    r = params(http, sid)
    assert r.json()["version"] == 3
    twin.assert_params(r.json())
    # a push computed on the new session's first values is taken, at its staleness
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": grads},
                  headers={"If-Match": '"2"'})
    assert (r.status_code, r.json()["version"]) == (200, 4), r.text
    twin.step(values(13, 0.5))
    twin.assert_params(r.json())

    # deleted and made again once more: past 4
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert create(http, sid, values(3), shards)["version"] == 5
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("shards", [1, 2])
def test_a_session_made_again_under_its_id_continues_its_versions(
        engine_url: str, shards: int) -> None:
    with httpx.Client(base_url=engine_url, timeout=120) as http:
        made_again_cases(http, f"again-v-{shards}-{uuid.uuid4().hex[:8]}", shards)


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_a_sharded_session_made_again_plain_and_with_other_shards_continues(
        engine_url: str) -> None:
    """Deleted as 2 shards at v1: made again plain at v2; deleted at v2: made again as 3 shards
    at v3, each shard at it (a step answers v4, torch's values). On the Ray engine the shards
    are on several hosts, and the id made again lands on others: the directory keeps the last
    version."""
    sid = f"again-s-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=engine_url, timeout=120) as http:
        create(http, sid, values(1), 2)
        step(http, sid, Twin(values(1)), 21)
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        assert create(http, sid, values(2))["version"] == 2
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        twin = Twin(values(3))
        assert create(http, sid, values(3), 3)["version"] == 3
        assert step(http, sid, twin, 22) == 4
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_versions_continue_across_kill9_between_delete_and_create_and_after(
        tmp_path: Path) -> None:
    """Plain and 2-shard sessions stepped to v2 and deleted; ``kill -9``; a new start: made again
    under their ids they start at v3 (the delete's record was restored from the tombstone log);
    stepped to v4; ``kill -9``; a new start: at v4 with torch's values (the create's record
    restores its first version), the old tags refused."""
    proc = Proc(tmp_path / "data")
    twins: dict[str, Twin] = {}
    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            for shards in (1, 2):
                sid = f"k9-{shards}"
                twin = Twin(values(shards))
                create(http, sid, values(shards), shards)
                step(http, sid, twin, 30 + shards)
                assert step(http, sid, twin, 40 + shards) == 2
                assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            for shards in (1, 2):
                sid = f"k9-{shards}"
                twins[sid] = twin = Twin(values(10 + shards))
                assert create(http, sid, values(10 + shards), shards)["version"] == 3
                assert step(http, sid, twin, 50 + shards) == 4
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            for sid, twin in twins.items():
                r = params(http, sid, **{"If-None-Match": '"2"'})
                assert (r.status_code, r.headers["ETag"]) == (200, '"4"'), (sid, r.text)
                twin.assert_params(r.json())
                r = http.put(f"/v1/sessions/{sid}/params",
                             headers={"If-Match": '"2"', **JSON},
                             json={"params": {"w": jt(torch.zeros(3, 4))}})
                assert r.status_code == 412, (sid, r.text)
                r = http.post(f"/v1/sessions/{sid}/step", params={"base_version": 2},
                              json={"grads": {n: jt(g) for n, g in values(60).items()}})
                assert (r.status_code, r.json()["discarded_by"]) == (409, "create"), r.text
                assert step(http, sid, twin, 70) == 5
                assert http.delete(f"/v1/sessions/{sid}").status_code == 204
                assert create(http, sid, values(5))["version"] == 6
    finally:
        proc.stop()
