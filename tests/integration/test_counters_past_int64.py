"""Steps that would count an integer of a session's state past int64.

A state's integers travel as int64 (a JSON export, a record): an import of a scheduler's
``last_epoch`` of 2**63 - 1 was taken, and the next step counted it to 2**63, which the session's
own export then held and every import refused (422 ``invalid_state``). Now the step (with its
scheduler step, or a scheduler step by hand) that would count any integer of the scheduler's
state past int64 (``last_epoch``, ``_step_count``, a nested scheduler's) is refused whole: 422
``counter_overflow`` naming it, the session exactly as it was, live and after a restart; so the
largest count an import takes, 2**63 - 1, is one a step can reach and its export imports back.

Expected values come from in-process torch (``torch.optim`` + ``lr_scheduler``) run here.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer, _test_settings

from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    build_scheduler,
    from_wire,
    json_tensor,
    tensor_from_json,
)

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"
TOP = 2**63 - 1
P0 = torch.tensor([1.0, -0.5])

#: name: (scheduler spec, where the count sits in its state, the field a refusal names)
CASES: dict[str, tuple[dict[str, Any], list[str | int], str]] = {
    "steplr-last-epoch": ({"name": "StepLR", "options": {"step_size": 3}}, ["last_epoch"],
                          "state_dict.scheduler.last_epoch"),
    "steplr-step-count": ({"name": "StepLR", "options": {"step_size": 3}}, ["_step_count"],
                          "state_dict.scheduler._step_count"),
    "plateau-by-hand": ({"name": "ReduceLROnPlateau", "options": {}, "step_on": "manual"},
                        ["last_epoch"], "state_dict.scheduler.last_epoch"),
    "sequential-nested": ({"name": "SequentialLR", "options": {
        "schedulers": [{"name": "ConstantLR", "options": {"factor": 0.5, "total_iters": 2}},
                       {"name": "ExponentialLR", "options": {"gamma": 0.9}}],
        "milestones": [100]}}, ["_schedulers", 0, "last_epoch"],
        "state_dict.scheduler._schedulers.0.last_epoch"),
}


def put(tree: Any, path: list[str | int], value: int) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def get(tree: Any, path: list[str | int]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


class Twin:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.p = P0.clone()
        self.opt = torch.optim.SGD([self.p], lr=0.1, momentum=0.9)
        self.sched = build_scheduler(spec, self.opt)
        self.manual = spec.get("step_on") == "manual"
        self.plateau = spec["name"] == "ReduceLROnPlateau"

    def step(self, k: int) -> None:
        if self.manual:
            self.sched.step(*([1.0] if self.plateau else []))
            return
        self.p.grad = grad(k)
        self.opt.step()
        self.p.grad = None
        self.sched.step()


@pytest.fixture
def data() -> Path:
    return Path(tempfile.mkdtemp(prefix="optserve-i64-"))


@pytest.fixture
def server(data: Path) -> Iterator[httpx.Client]:
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            yield c
    finally:
        live.stop()


def grad(k: int) -> torch.Tensor:
    return torch.randn(2, generator=torch.Generator().manual_seed(k))


def step(c: httpx.Client, sid: str, twin: Twin, k: int, **kw: Any) -> httpx.Response:
    if twin.manual:
        return c.post(f"/v1/sessions/{sid}/scheduler/step",
                      json={"metric": 1.0} if twin.plateau else {}, **kw)
    return c.post(f"/v1/sessions/{sid}/step", json={"grads": {"p": json_tensor(grad(k))}},
                  **kw)


def whole(c: httpx.Client, sid: str) -> dict[str, Any]:
    d = c.get(f"/v1/sessions/{sid}").json()
    d.pop("revision", None)
    return {"describe": d,
            "params": c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json(),
            "state": c.get(f"/v1/sessions/{sid}/state_dict",
                           params={"encoding": "b64"}).json()}


def same_as_twin(c: httpx.Client, sid: str, twin: Twin) -> None:
    got = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()["params"]
    assert_tensors_equal({"p": tensor_from_json(got["p"])}, {"p": twin.p.detach()}, sid)
    exported = from_wire(c.get(f"/v1/sessions/{sid}/state_dict").json())
    assert_trees_equal({int(k): v for k, v in exported["state"].items()},
                       twin.opt.state_dict()["state"], sid)
    assert_trees_equal(exported["scheduler"], twin.sched.state_dict(), sid)


def create(c: httpx.Client, sid: str, spec: dict[str, Any]) -> None:
    r = c.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                     "options": {"lr": 0.1, "momentum": 0.9},
                                     "params": {"p": json_tensor(P0)}, "scheduler": spec})
    assert r.status_code == 201, r.text


def refused(r: httpx.Response, field: str) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["code"] == "counter_overflow", problem
    assert problem["field"] == field, problem
    assert "nothing was changed" in problem["detail"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_that_counts_past_int64_is_refused_whole(data: Path, case: str) -> None:
    """Imported at 2**63 - 2, one step reaches 2**63 - 1 (as torch's does); that export
    imports into a new session made alike; the next step is refused whole, keyed or not, and
    after a restart too."""
    spec, path, field = CASES[case]
    sid = f"i64-{case}"
    twin = Twin(spec)
    twin.step(0)
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            create(c, sid, spec)
            assert step(c, sid, twin, 0).status_code == 200
            sd = c.get(f"/v1/sessions/{sid}/state_dict").json()
            put(sd["scheduler"], path, TOP - 1)
            r = c.put(f"/v1/sessions/{sid}/state_dict", json=sd)
            assert r.status_code == 200, r.text
            state = twin.sched.state_dict()
            put(state, path, TOP - 1)
            twin.sched.load_state_dict(copy.deepcopy(state))
            assert step(c, sid, twin, 1).status_code == 200
            twin.step(1)
            same_as_twin(c, sid, twin)
            exported = c.get(f"/v1/sessions/{sid}/state_dict").json()
            # the export (a count of 2**63 - 1) imports into a new session made alike
            create(c, f"{sid}-copy", spec)
            r = c.put(f"/v1/sessions/{sid}-copy/state_dict", json=exported)
            assert r.status_code == 200, r.text
            before = whole(c, sid)
            for key in (None, "k-1", "k-1"):
                refused(step(c, sid, twin, 2, headers={"Idempotency-Key": key} if key else {}),
                        field)
                assert whole(c, sid) == before
            refused(step(c, f"{sid}-copy", twin, 2), field)
            probe = copy.deepcopy(twin)  # torch's own step counts it to 2**63
            probe.step(2)
            assert get(probe.sched.state_dict(), path) == TOP + 1
    finally:
        live.stop()
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            assert whole(c, sid) == before
            same_as_twin(c, sid, twin)
            refused(step(c, sid, twin, 2), field)
            assert whole(c, sid) == before
            # the way on: a smaller count imported, and it steps as torch does
            sd = c.get(f"/v1/sessions/{sid}/state_dict").json()
            put(sd["scheduler"], path, 5)
            assert c.put(f"/v1/sessions/{sid}/state_dict", json=sd).status_code == 200
            state = twin.sched.state_dict()
            put(state, path, 5)
            twin.sched.load_state_dict(copy.deepcopy(state))
            assert step(c, sid, twin, 3).status_code == 200
            twin.step(3)
            same_as_twin(c, sid, twin)
    finally:
        live.stop()


def test_a_sharded_sessions_step_is_refused_alike(server: httpx.Client) -> None:
    c = server
    spec = CASES["steplr-last-epoch"][0]
    r = c.post("/v1/sessions", json={"id": "i64-shards", "optimizer": "SGD",
                                     "options": {"lr": 0.1},
                                     "params": {"p": json_tensor(P0), "q": json_tensor(-P0)},
                                     "scheduler": spec, "shards": 2})
    assert r.status_code == 201, r.text
    sd = c.get("/v1/sessions/i64-shards/state_dict").json()
    sd["scheduler"]["last_epoch"] = TOP
    assert c.put("/v1/sessions/i64-shards/state_dict", json=sd).status_code == 200
    before = whole(c, "i64-shards")
    r = c.post("/v1/sessions/i64-shards/step",
               json={"grads": {"p": json_tensor(grad(0)), "q": json_tensor(grad(1))}})
    refused(r, "state_dict.scheduler.last_epoch")
    assert whole(c, "i64-shards") == before


def test_an_lbfgs_step_that_counts_past_int64_is_refused_whole(server: httpx.Client) -> None:
    """LBFGS keeps ``n_iter`` and ``func_evals`` as integers in its state: imported at 2**63 - 1,
    the step that would count past it is refused (422 naming the count) after its last
    evaluation, nothing changed; a smaller count imported, it steps as torch does."""
    c = server
    start = torch.tensor([1.0, -2.0])

    def loss_of(p: torch.Tensor) -> torch.Tensor:
        return ((p - torch.tensor([0.5, 0.25])) ** 4).sum()  # (not met in a step)

    r = c.post("/v1/sessions", json={"id": "i64-lbfgs", "optimizer": "LBFGS",
                                     "options": {"max_iter": 2},
                                     "params": {"p": json_tensor(start)}})
    assert r.status_code == 201, r.text
    local = start.clone().requires_grad_()
    opt = torch.optim.LBFGS([local], max_iter=2)

    def local_step() -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(local)
            loss.backward()
            return loss
        opt.step(closure)  # type: ignore[no-untyped-call]

    def remote_step() -> httpx.Response:
        r = c.post("/v1/sessions/i64-lbfgs/step")
        while r.status_code == 200 and r.json().get("needs") == "evaluation":
            at = tensor_from_json(r.json()["params"]["p"]).requires_grad_()
            loss = loss_of(at)
            loss.backward()
            assert at.grad is not None
            r = c.post(f"/v1/sessions/i64-lbfgs/step/{r.json()['evaluation']}",
                       json={"loss": float(loss.detach()), "grads": {"p": json_tensor(at.grad)}})
        return r

    def same() -> None:
        got = c.get("/v1/sessions/i64-lbfgs/params", params={"encoding": "b64"}).json()
        assert_tensors_equal({"p": tensor_from_json(got["params"]["p"])},
                             {"p": local.detach()})
        exported = from_wire(c.get("/v1/sessions/i64-lbfgs/state_dict").json())
        assert_trees_equal({int(k): v for k, v in exported["state"].items()},
                           opt.state_dict()["state"])

    assert remote_step().status_code == 200
    local_step()
    same()
    for key in ("n_iter", "func_evals"):
        sd = c.get("/v1/sessions/i64-lbfgs/state_dict").json()
        sd["state"]["0"][key] = TOP
        assert c.put("/v1/sessions/i64-lbfgs/state_dict", json=sd).status_code == 200
        before = whole(c, "i64-lbfgs")
        refused(remote_step(), f"state_dict.state.0.{key}")
        assert whole(c, "i64-lbfgs") == before
        sd["state"]["0"][key] = 7
        assert c.put("/v1/sessions/i64-lbfgs/state_dict", json=sd).status_code == 200
        opt.state[local][key] = 7
        assert remote_step().status_code == 200
        local_step()
        same()
