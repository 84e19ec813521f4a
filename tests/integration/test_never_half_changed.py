"""Regression tests for what an independent check found (the issue "Never half-changed, never
lost"): each case once left a session half-changed, refused after a restart, or broken, and
each must now be refused cleanly (4xx, problem+json, nothing changed) or accepted and
restorable. Values are compared with in-process torch computed here.

A server restart is a real one: a live uvicorn server on the same data directory, stopped
gracefully (snapshot on the way out) or, for the engine-level cases, dropped without a snapshot
(what a crash leaves with ``durability: step``).
"""

from __future__ import annotations

import asyncio
import copy
import io
import math
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer, _test_settings

from app.engine import CreateSpec, GroupSpec, embedded_engine
from app.errors import OptserveError

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"


def jt(t: torch.Tensor) -> dict[str, Any]:
    names = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64"}
    return {"dtype": names[t.dtype], "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def tensor(obj: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(obj["data"], dtype=getattr(torch, obj["dtype"])).reshape(obj["shape"])


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


P0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])


def grad(k: int) -> torch.Tensor:
    return torch.randn(2, 2, generator=torch.Generator().manual_seed(k))


@pytest.fixture
def server() -> Iterator[tuple[httpx.Client, Path]]:
    data = Path(tempfile.mkdtemp(prefix="optserve-nhc-"))
    live = LiveServer(_test_settings(data_dir=data))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c, data
    finally:
        live.stop()


def restarted(data: Path) -> tuple[LiveServer, httpx.Client]:
    live = LiveServer(_test_settings(data_dir=data))
    return live, httpx.Client(base_url=live.start(), timeout=60)


def create(c: httpx.Client, sid: str, scheduler: dict[str, Any] | None = None,
           optimizer: str = "SGD", options: dict[str, Any] | None = None,
           param: torch.Tensor = P0, **extra: Any) -> dict[str, Any]:
    body = {"id": sid, "optimizer": optimizer, "options": options or {"lr": 0.1,
                                                                      "momentum": 0.9},
            "params": {"p": jt(param)}, **extra}
    if scheduler is not None:
        body["scheduler"] = scheduler
    r = c.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def step(c: httpx.Client, sid: str, k: int) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/step", json={"grads": {"p": jt(grad(k))}})


def state(c: httpx.Client, sid: str) -> tuple[Any, ...]:
    """Everything a client can see of a session (to assert that nothing changed)."""
    info = c.get(f"/v1/sessions/{sid}").json()
    params = c.get(f"/v1/sessions/{sid}/params").json()["params"]
    sd = c.get(f"/v1/sessions/{sid}/state_dict").json()
    return info, params, sd


def refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = dict(r.json())
    assert body["code"] == code, body
    assert {"type", "title", "status", "detail"} <= body.keys()
    return body


class Mirror:
    """SGD(lr 0.1, momentum 0.9) on P0 with an optional scheduler, in-process."""

    def __init__(self, make_sched: Any = None) -> None:
        self.p = P0.clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.p], lr=0.1, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.sched = make_sched(self.opt) if make_sched else None

    def step(self, k: int) -> None:
        self.p.grad = grad(k)
        self.opt.step()
        if self.sched is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.sched.step()


def same_as(c: httpx.Client, sid: str, mirror: Mirror) -> None:
    got = tensor(c.get(f"/v1/sessions/{sid}/params").json()["params"]["p"])
    assert bitwise(got, mirror.p.detach()), (got, mirror.p)
    lr = c.get(f"/v1/sessions/{sid}").json()["lr"]
    assert lr == [g["lr"] for g in mirror.opt.param_groups]


# --------------------------------------------------------------------------- schedulers

WARMUP_COSINE = {"name": "SequentialLR", "options": {"milestones": [2], "schedulers": [
    {"name": "LinearLR", "options": {"start_factor": 0.25, "total_iters": 2}},
    {"name": "CosineAnnealingLR", "options": {"T_max": 5}}]}}
CHAINED = {"name": "ChainedScheduler", "options": {"schedulers": [
    {"name": "ExponentialLR", "options": {"gamma": 0.9}},
    {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}}]}}


def _warmup_cosine(o: torch.optim.Optimizer) -> Any:
    L = torch.optim.lr_scheduler
    return L.SequentialLR(o, [L.LinearLR(o, start_factor=0.25, total_iters=2),
                              L.CosineAnnealingLR(o, T_max=5)], milestones=[2])


def _chained(o: torch.optim.Optimizer) -> Any:
    L = torch.optim.lr_scheduler
    return L.ChainedScheduler([L.ExponentialLR(o, gamma=0.9), L.StepLR(o, 2, 0.5)], o)


@pytest.mark.parametrize("spec,make", [(WARMUP_COSINE, _warmup_cosine), (CHAINED, _chained)],
                         ids=["SequentialLR", "ChainedScheduler"])
def test_nested_schedulers_survive_restarts(spec: dict[str, Any], make: Any) -> None:
    """Used to be refused after any restart: the stored spec put step_on on the children."""
    data = Path(tempfile.mkdtemp(prefix="optserve-nested-"))
    mirror = Mirror(make)
    live, c = restarted(data)
    try:
        create(c, "nested", copy.deepcopy(spec))
        for k in range(3):
            assert step(c, "nested", k).status_code == 200
            mirror.step(k)
    finally:
        c.close()
        live.stop()  # graceful: a snapshot
    live, c = restarted(data)
    try:
        assert "refused" not in c.get("/readyz").json()
        same_as(c, "nested", mirror)
        assert step(c, "nested", 3).status_code == 200
        mirror.step(3)
        same_as(c, "nested", mirror)
    finally:
        c.close()
        live.stop()

    async def crash_and_restore() -> None:  # a restart without a snapshot: the log replays
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        await eng.step("nested", {"p": grad(4)}, return_params=False)
        mirror.step(4)
        await eng.stop(snapshot=False)
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        try:
            assert await eng.refused() == {}
            got = await eng.pull("nested", None)
            assert bitwise(got.params["p"], mirror.p.detach())
            assert got.lr == [g["lr"] for g in mirror.opt.param_groups]
        finally:
            await eng.stop()
    asyncio.run(crash_and_restore())


@pytest.mark.parametrize("scheduler,make,fails_at", [
    ({"name": "OneCycleLR", "options": {"max_lr": 0.1, "total_steps": 3, "pct_start": 1.0}},
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=3,
                                                   pct_start=1.0), 2),
    ({"name": "PolynomialLR", "options": {"total_iters": 3, "power": -1.0}},
     lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=3, power=-1.0), 2),
], ids=["OneCycleLR-pct_start-1", "PolynomialLR-negative-power"])
def test_a_scheduler_that_raises_refuses_the_step_whole(
        server: tuple[httpx.Client, Path], scheduler: dict[str, Any], make: Any,
        fails_at: int) -> None:
    """torch steps the scheduler after the optimizer; when the scheduler raises there, the
    step used to answer 500 with the params changed and the next restart refused the session.
    Now the scheduler is stepped on a copy first: 422, nothing changed, nothing logged."""
    c, data = server
    sid = scheduler["name"].lower()
    create(c, sid, scheduler)
    mirror = Mirror(make)
    for k in range(fails_at):
        assert step(c, sid, k).status_code == 200
        mirror.step(k)
    before = state(c, sid)
    body = refused(step(c, sid, fails_at), 422, "scheduler_failed")
    assert "ZeroDivisionError" in body["detail"]
    assert state(c, sid) == before
    same_as(c, sid, mirror)
    # torch itself raises at this step (after changing the params: that is what we avoid)
    mirror.p.grad = grad(fails_at)
    mirror.opt.step()
    with pytest.raises(ZeroDivisionError):
        mirror.sched.step()


@pytest.mark.parametrize("scheduler", [
    {"name": "CyclicLR", "options": {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2}},
    {"name": "OneCycleLR", "options": {"max_lr": 0.1, "total_steps": 10}},
    WARMUP_COSINE,
], ids=["CyclicLR", "OneCycleLR", "SequentialLR"])
def test_add_param_group_that_the_scheduler_cannot_take_is_refused(
        server: tuple[httpx.Client, Path], scheduler: dict[str, Any]) -> None:
    """These schedulers keep per-group lists sized at construction: after add_param_group
    torch raises at the next step. The add is refused instead, and the session keeps
    stepping and survives a restart."""
    c, data = server
    sid = "add-" + scheduler["name"].lower()
    create(c, sid, copy.deepcopy(scheduler))
    assert step(c, sid, 0).status_code == 200
    before = state(c, sid)
    r = c.post(f"/v1/sessions/{sid}/param_groups",
               json={"params": {"q": jt(torch.ones(2, 2))}, "lr": 0.05})
    refused(r, 422, "scheduler_incompatible")
    assert state(c, sid) == before
    assert step(c, sid, 1).status_code == 200


def test_imported_scheduler_state_that_cannot_step_is_refused(
        server: tuple[httpx.Client, Path]) -> None:
    c, _ = server
    create(c, "steplr", {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}})
    assert step(c, "steplr", 0).status_code == 200
    sd = c.get("/v1/sessions/steplr/state_dict").json()
    sd["scheduler"]["step_size"] = 0
    before = state(c, "steplr")
    body = refused(c.put("/v1/sessions/steplr/state_dict", json=sd), 422, "scheduler_failed")
    assert body["field"] == "state_dict.scheduler"
    assert state(c, "steplr") == before
    assert step(c, "steplr", 1).status_code == 200


# --------------------------------------------------------------------------- imports

def torch_file(obj: Any) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def local_adam(steps: int = 2) -> tuple[torch.Tensor, torch.optim.Adam]:
    p = P0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.01)
    for k in range(steps):
        p.grad = grad(k)
        opt.step()
    return p, opt


def put_torch(c: httpx.Client, sid: str, content: bytes) -> httpx.Response:
    return c.put(f"/v1/sessions/{sid}/state_dict", params={"format": "torch"}, content=content,
                 headers={"content-type": "application/octet-stream"})


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_or_meta_tensors_in_a_torch_import_are_422(
        server: tuple[httpx.Client, Path], kind: str) -> None:
    """A sparse tensor used to be a 500 that stayed in memory, broke GET state_dict and the
    snapshot of every session at shutdown; a meta tensor was a 500."""
    c, _ = server
    create(c, kind, optimizer="Adam", options={"lr": 0.01})
    _, opt = local_adam()
    sd = copy.deepcopy(opt.state_dict())
    exp_avg = sd["state"][0]["exp_avg"]
    sd["state"][0]["exp_avg"] = (exp_avg.to_sparse() if kind == "sparse"
                                 else torch.empty(exp_avg.shape, device="meta"))
    before = state(c, kind)
    body = refused(put_torch(c, kind, torch_file(sd)), 422, "state_mismatch")
    assert body["field"] == "state_dict.state.0.exp_avg"
    assert state(c, kind) == before
    assert c.get(f"/v1/sessions/{kind}/state_dict").status_code == 200


def test_expanded_and_shared_state_tensors_are_imported_as_copies() -> None:
    """A stride-0 (expanded) state tensor used to be accepted as it was and diverge after a
    restart. It is now imported into memory of its own: the session continues exactly as torch
    does with a copy, also after a restart. (The old ``exp_avg_sq`` given as ``exp_avg`` here is
    no longer shared once ``exp_avg_sq`` is replaced; state tensors that do share memory are a
    422 ``invalid_state``: ``tests/unit/test_shared_tensors_in_torch_imports.py``.)"""
    data = Path(tempfile.mkdtemp(prefix="optserve-alias-"))
    p, opt = local_adam()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg_sq"]  # (no longer shared below)
    shape = sd["state"][0]["exp_avg_sq"].shape
    sd["state"][0]["exp_avg_sq"] = torch.tensor(0.01).expand(shape)  # stride 0
    live, c = restarted(data)
    try:
        create(c, "alias", optimizer="Adam", options={"lr": 0.01}, param=p.detach().clone())
        r = put_torch(c, "alias", torch_file(sd))
        assert r.status_code == 200, r.text
        assert step(c, "alias", 5).status_code == 200
    finally:
        c.close()
        live.stop()
    local = p.detach().clone().requires_grad_(True)
    ref = torch.optim.Adam([local], lr=0.01)
    owned = copy.deepcopy(sd)
    owned["state"][0] = {k: v.clone() for k, v in owned["state"][0].items()}
    ref.load_state_dict(owned)
    local.grad = grad(5)
    ref.step()
    live, c = restarted(data)
    try:
        got = tensor(c.get("/v1/sessions/alias/params").json()["params"]["p"])
        assert bitwise(got, local.detach())
        assert step(c, "alias", 6).status_code == 200
        local.grad = grad(6)
        ref.step()
        got = tensor(c.get("/v1/sessions/alias/params").json()["params"]["p"])
        assert bitwise(got, local.detach())
    finally:
        c.close()
        live.stop()


@pytest.mark.parametrize("damage,code", [
    (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(-3.0)), "state_mismatch"),
    (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(1.5)), "state_mismatch"),
    (lambda sd: sd["state"][0]["exp_avg"].view(-1).__setitem__(0, math.nan), "nonfinite_state"),
    # (a float64 one is cast to the parameter's dtype, as torch's load_state_dict casts it:
    # test_import_float64_scalars.py; an integer one is no optimizer state)
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].to(torch.int32)),
     "state_mismatch"),
], ids=["negative-step", "fractional-step", "nan-state", "integer-dtype"])
def test_imports_that_would_break_the_session_are_422(
        server: tuple[httpx.Client, Path], damage: Any, code: str) -> None:
    c, _ = server
    sid = f"imp-{code}-{id(damage) % 997}"
    create(c, sid, optimizer="Adam", options={"lr": 0.01}, nonfinite="reject")
    _, opt = local_adam()
    sd = copy.deepcopy(opt.state_dict())
    damage(sd)
    before = state(c, sid)
    refused(put_torch(c, sid, torch_file(sd)), 422, code)
    assert state(c, sid) == before
    assert step(c, sid, 0).status_code == 200


def test_a_deflated_torch_file_is_bounded_before_it_is_read(
        server: tuple[httpx.Client, Path]) -> None:
    """A 256 KiB deflated file used to inflate to 257 MiB in the server before it was refused:
    the zip entries' sizes are checked against the session first."""
    c, _ = server
    create(c, "bomb", optimizer="Adam", options={"lr": 0.01})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * (256 << 20))
    assert len(buf.getvalue()) < 512 << 10
    body = refused(put_torch(c, "bomb", buf.getvalue()), 422, "torch_file_too_large")
    assert body["limit"] < 64 << 20


# --------------------------------------------------------------------------- group options

def test_patch_is_checked_on_the_whole_group_and_against_the_dtype(
        server: tuple[httpx.Client, Path]) -> None:
    c, _ = server
    create(c, "half", param=P0.half(), options={"lr": 0.1})
    before = state(c, "half")
    # 1e5 overflows float16: every later step used to be a 422
    body = refused(c.patch("/v1/sessions/half/param_groups/0", json={"lr": 1e5}), 422,
                   "option_overflow")
    assert body["field"] == "param_groups.0.lr"
    refused(c.patch("/v1/sessions/half/param_groups/0", json={"lr": -0.5}), 422,
            "invalid_option")
    assert state(c, "half") == before


def test_an_infinite_lr_is_reported_faithfully(server: tuple[httpx.Client, Path]) -> None:
    """JSON has no inf: the service's own {"$float": "inf"} encoding, not null. A client can no
    longer set an infinite lr (a 422 naming it), nor can a scheduler drive one there any more
    (ExponentialLR from 1e200 by 1e200, in float64 as torch computes it): the step is refused,
    the lr it would have written given as {"$float": "inf"}. (An infinite lr a session holds
    from an older server's log is reported the same way:
    test_scheduler_out_of_range.py::test_steps_older_servers_took_still_replay.)"""
    c, _ = server
    create(c, "inf")
    before = state(c, "inf")
    body = refused(c.patch("/v1/sessions/inf/param_groups/0", json={"lr": {"$float": "inf"}}),
                   422, "invalid_option")
    assert body["field"] == "param_groups.0.lr"
    assert state(c, "inf") == before
    create(c, "inf2", optimizer="SGD", options={"lr": 1e200}, param=P0.double(),
           scheduler={"name": "ExponentialLR", "options": {"gamma": 1e200}})
    before = state(c, "inf2")
    body = refused(c.post("/v1/sessions/inf2/step",
                          json={"grads": {"p": jt(grad(0).double())}}), 409,
                   "scheduler_out_of_range")
    assert body["field"] == "param_groups.0.lr" and body["value"] == {"$float": "inf"}
    assert state(c, "inf2") == before


# --------------------------------------------------------------------------- names and ids

def test_an_id_with_a_trailing_newline_is_refused(server: tuple[httpx.Client, Path]) -> None:
    c, data = server
    r = c.post("/v1/sessions", json={"id": "abc\n", "optimizer": "SGD", "options": {"lr": 0.1},
                                     "params": {"p": jt(P0)}})
    refused(r, 422, "invalid_id")
    assert not any("abc" in p.name for p in (data / "sessions").iterdir())


def test_reserved_parameter_names_are_refused(server: tuple[httpx.Client, Path]) -> None:
    """A parameter named __metadata__ made every binary answer of its session unreadable."""
    c, _ = server
    r = c.post("/v1/sessions", json={"optimizer": "SGD", "options": {"lr": 0.1},
                                     "params": {"__metadata__": jt(P0)}})
    assert refused(r, 422, "invalid_name")["field"] == "param_groups.0.params"
    create(c, "named")
    r = c.post("/v1/sessions/named/param_groups", json={"params": {"__metadata__": jt(P0)}})
    refused(r, 422, "invalid_name")


def test_metrics_of_a_deleted_session_are_removed(server: tuple[httpx.Client, Path]) -> None:
    c, _ = server
    create(c, "gone")
    assert step(c, "gone", 0).status_code == 200
    assert 'session="gone"' in c.get("/metrics").text
    assert c.delete("/v1/sessions/gone").status_code == 204
    assert 'session="gone"' not in c.get("/metrics").text


# --------------------------------------------------------------------------- apply failures

def test_an_apply_that_fails_half_way_is_rolled_back_from_the_store(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimizer that raises after changing the parameters (torch refusing something no
    check foresaw, or running out of memory): the session is rebuilt from its store without
    the step, answers a 5xx with a stable code, and goes on; a session that keeps nothing on
    disk is taken out of service instead of serving half-changed values."""
    data = Path(tempfile.mkdtemp(prefix="optserve-apply-"))

    async def go() -> None:
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        try:
            for sid, durability in (("disk", "step"), ("mem", "memory")):
                await eng.create(CreateSpec("SGD", [GroupSpec({"p": P0.clone()})],
                                            {"lr": 0.1, "momentum": 0.9}, id=sid,
                                            durability=durability))
                await eng.step(sid, {"p": grad(0)}, return_params=False)
            before = await eng.pull("disk", None)
            real = torch.optim.SGD.step
            poison = grad(1)  # steps with this gradient fail (the recovery's replays do not)

            def broken(self: torch.optim.Optimizer, closure: Any = None) -> Any:
                g = self.param_groups[0]["params"][0].grad
                real(self, closure)  # the parameters change...
                if g is not None and torch.equal(g, poison):
                    raise RuntimeError("simulated: out of memory")  # ...then it fails
            monkeypatch.setattr(torch.optim.SGD, "step", broken)
            with pytest.raises(OptserveError) as info:
                await eng.step("disk", {"p": grad(1)}, return_params=False)
            assert info.value.code == "apply_failed" and info.value.status == 500
            with pytest.raises(OptserveError) as info:
                await eng.step("mem", {"p": grad(1)}, return_params=False)
            assert info.value.code == "session_damaged" and info.value.status == 503
            monkeypatch.undo()
            after = await eng.pull("disk", None)
            assert after.version == before.version == 1
            assert bitwise(after.params["p"], before.params["p"])
            mirror = Mirror()
            mirror.step(0)
            mirror.step(2)
            await eng.step("disk", {"p": grad(2)}, return_params=False)
            got = await eng.pull("disk", None)
            assert bitwise(got.params["p"], mirror.p.detach())
            with pytest.raises(OptserveError) as info:
                await eng.pull("mem", None)
            assert info.value.code == "session_damaged"
            await eng.delete("mem")  # an operator can remove it
        finally:
            await eng.stop()
    asyncio.run(go())


def test_multisteplr_keeps_its_milestones_through_json_and_restarts() -> None:
    """MultiStepLR keeps its milestones in a Counter of ints; through JSON (an export/import,
    a snapshot) they became string keys and the schedule never decayed again."""
    data = Path(tempfile.mkdtemp(prefix="optserve-multistep-"))
    spec = {"name": "MultiStepLR", "options": {"milestones": [2, 4], "gamma": 0.5}}
    mirror = Mirror(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 4], 0.5))
    live, c = restarted(data)
    try:
        create(c, "ms", spec)
        assert step(c, "ms", 0).status_code == 200
        mirror.step(0)
        exported = c.get("/v1/sessions/ms/state_dict").json()
        assert c.put("/v1/sessions/ms/state_dict", json=exported).status_code == 200
        assert step(c, "ms", 1).status_code == 200  # the milestone at 2: lr halves
        mirror.step(1)
        same_as(c, "ms", mirror)
    finally:
        c.close()
        live.stop()
    live, c = restarted(data)
    try:
        for k in (2, 3):  # and at 4 after the restart
            assert step(c, "ms", k).status_code == 200
            mirror.step(k)
        same_as(c, "ms", mirror)
        assert c.get("/v1/sessions/ms").json()["lr"] == [0.025]
    finally:
        c.close()
        live.stop()
