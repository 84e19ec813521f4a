"""Schedulers that take a group value out of range some steps after create.

ExponentialLR with ``gamma: 1e30``, or CyclicLR's ``exp_range`` with a growing ``gamma``, is
taken at create; some steps later its step writes an lr past float32's range (or infinite), or
a momentum / beta1 torch refuses. Such a step used to be taken: every later step was then a 422
``option_overflow``, and the session's export was refused by its own import (the lr), or by
another session's (the momentum): stuck for good. Now that step is refused whole (409
``scheduler_out_of_range`` naming the group key, the session exactly as it was, nothing
logged), the client gets out with a PATCH of the lr or ``{"scheduler": null}``, and whatever a
session exports imports into a new session and steps on identically, but for a state whose
next scheduler step is refused: its import is refused alike (422, nothing imported) until the
exporting session takes a way out. Records logged by older servers (the step taken) still
replay. (Tensor lrs, and older sessions holding an lr past the range:
test_scheduler_range_of_tensor_lrs.py.)

Expected values come from in-process torch (``torch.optim`` + ``lr_scheduler``) run here.
"""

from __future__ import annotations

import asyncio
import copy
import math
import random
import signal
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import ENGINES, LiveServer, _test_settings

from app.engine import CreateSpec, GroupSpec, embedded_engine
from app.engine.ops import Step
from app.errors import OptserveError
from tests.integration.test_durability import Proc
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    build_scheduler,
    from_wire,
    json_tensor,
    tensor_from_json,
    to_wire,
)

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"
P0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def grad(k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 2, generator=torch.Generator().manual_seed(k)).to(dtype)


def grads(k: int, names: list[str], dtype: torch.dtype = torch.float32
          ) -> dict[str, torch.Tensor]:
    return {n: grad(1000 * k + i, dtype) for i, n in enumerate(names)}


class Twin:
    """The session as in-process torch: the optimizer and scheduler over copies of its
    parameters."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.params = {n: tensor_from_json(t).clone() for n, t in body["params"].items()}
        self.opt: torch.optim.Optimizer = getattr(torch.optim, body["optimizer"])(
            list(self.params.values()), **body["options"])
        spec = body.get("scheduler")
        self.sched: Any = build_scheduler(spec, self.opt) if spec else None
        self.per_step = spec is not None and spec.get("step_on", "optimizer") == "optimizer"

    def step(self, k: int) -> None:
        dtype = next(iter(self.params.values())).dtype
        for n, g in grads(k, list(self.params), dtype).items():
            self.params[n].grad = g
        self.opt.step()
        for p in self.params.values():
            p.grad = None
        if self.per_step:
            self.sched.step()

    def scheduler_step(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.sched.step()

    def next_writes(self) -> dict[str, Any]:
        """The group as the scheduler's next step leaves it (on a copy)."""
        opt, sched = copy.deepcopy((self.opt, self.sched))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()
        return {k: v for k, v in opt.param_groups[0].items() if k != "params"}

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])


def refused_key(group: dict[str, Any]) -> str | None:
    """The group key a session may not hold (the rule under test, stated on torch's values)."""
    lr = group["lr"]
    if not math.isfinite(lr) or abs(lr) > FLOAT32_MAX:
        return "lr"
    if "momentum" in group and group["momentum"] < 0:
        return "momentum"
    if "betas" in group and not 0 <= group["betas"][0] < 1:
        return "betas"
    return None


@pytest.fixture
def server() -> Iterator[tuple[httpx.Client, Path]]:
    data = Path(tempfile.mkdtemp(prefix="optserve-sor-"))
    live = LiveServer(_test_settings(data_dir=data))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c, data
    finally:
        live.stop()


def body_of(sid: str, optimizer: str, options: dict[str, Any], scheduler: dict[str, Any],
            param: torch.Tensor = P0, names: tuple[str, ...] = ("p",), **extra: Any
            ) -> dict[str, Any]:
    return {"id": sid, "optimizer": optimizer, "options": options,
            "params": {n: json_tensor(param + i) for i, n in enumerate(names)},
            "scheduler": scheduler, **extra}


def create(c: httpx.Client, body: dict[str, Any]) -> None:
    r = c.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text


def step(c: httpx.Client, sid: str, k: int, names: tuple[str, ...] = ("p",),
         dtype: torch.dtype = torch.float32, **kw: Any) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"},
                  json={"grads": {n: json_tensor(g)
                                  for n, g in grads(k, list(names), dtype).items()}}, **kw)


def params(c: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    got = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()["params"]
    return {n: tensor_from_json(t) for n, t in got.items()}


def whole(c: httpx.Client, sid: str) -> dict[str, Any]:
    """Everything a client can read of a session (its history where the engine keeps one)."""
    history = c.get(f"/v1/sessions/{sid}/history")
    return {"describe": c.get(f"/v1/sessions/{sid}").json(),
            "params": c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json(),
            "state": c.get(f"/v1/sessions/{sid}/state_dict",
                           params={"encoding": "b64"}).json(),
            "history": history.json() if history.status_code == 200 else None}


def new_like(c: httpx.Client, sid: str, body: dict[str, Any]) -> str:
    """A new session made with ``body``, given ``sid``'s parameters."""
    new = f"{sid}-2"
    create(c, {**body, "id": new})
    got = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()["params"]
    assert c.put(f"/v1/sessions/{new}/params", json={"params": got}).status_code == 200
    return new


def import_export(c: httpx.Client, sid: str, new: str) -> httpx.Response:
    """``sid``'s exported state put into ``new``."""
    return c.put(f"/v1/sessions/{new}/state_dict",
                 json=c.get(f"/v1/sessions/{sid}/state_dict").json())


def copy_into_new(c: httpx.Client, sid: str, body: dict[str, Any]) -> str:
    """A new session made with ``body``, given ``sid``'s parameters and exported state (the
    export must import)."""
    new = new_like(c, sid, body)
    r = import_export(c, sid, new)
    assert r.status_code == 200, r.text
    return new


def same_as_twin(c: httpx.Client, sid: str, twin: Twin) -> None:
    assert_tensors_equal(params(c, sid), {n: p.detach() for n, p in twin.params.items()}, sid)
    d = c.get(f"/v1/sessions/{sid}").json()
    assert d["lr"] == [to_wire(twin.lr())], sid
    exported = from_wire(c.get(f"/v1/sessions/{sid}/state_dict").json())
    want = twin.opt.state_dict()
    assert_trees_equal({int(k): v for k, v in exported["state"].items()}, want["state"], sid)
    got_groups = [{k: v for k, v in g.items() if k != "param_names"}
                  for g in exported["param_groups"]]
    assert_trees_equal(got_groups, want["param_groups"], sid)
    if twin.sched is not None and exported.get("scheduler") is not None:
        assert_trees_equal(exported["scheduler"], twin.sched.state_dict(), sid)


def out_of_range(r: httpx.Response, key: str, value: Any) -> dict[str, Any]:
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = r.json()
    assert problem["code"] == "scheduler_out_of_range"
    assert problem["type"] == "urn:optserve:problem:scheduler_out_of_range"
    assert problem["field"] == f"param_groups.0.{key}"
    assert problem["value"] == to_wire(value)
    assert f"param_groups.0.{key}" in problem["detail"] and "nothing changed" in \
        problem["detail"]
    names_its_way_out(r, problem)
    return problem


def names_its_way_out(r: httpx.Response, problem: dict[str, Any]) -> None:
    """The detail's way out names the session by its id (it said ``/v1/sessions/{id}``)."""
    sid = r.request.url.path.split("/")[3]
    assert f'PATCH /v1/sessions/{sid} with {{"scheduler": null}}' in problem["detail"], problem
    assert "{id}" not in problem["detail"]


def import_refused(r: httpx.Response, key: str, value: Any) -> dict[str, Any]:
    """An import refused because the session's next scheduler step would write ``value``
    under ``key``: 422 ``scheduler_out_of_range`` naming the imported group key."""
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = r.json()
    assert problem["code"] == "scheduler_out_of_range"
    assert problem["field"] == f"state_dict.param_groups.0.{key}"
    assert problem["value"] == to_wire(value)
    assert "Nothing was imported" in problem["detail"]
    names_its_way_out(r, problem)
    return problem


# --------------------------------------------------------------------------- the lr overflows

EXP_OVERFLOW = {"name": "ExponentialLR", "options": {"gamma": 1e20}}


@pytest.mark.parametrize("mode", ["plain", "sync", "shards"])
def test_a_step_whose_scheduler_step_overflows_is_refused_whole(
        server: tuple[httpx.Client, Path], mode: str) -> None:
    """lr 0.1, gamma 1e20 on float32: the first step leaves lr 1e19, the second's scheduler step
    would write 1e39 (past float32). That step is refused whole, keyed or not, also from a
    sync round and a sharded session; the session reads exactly as before. A PATCH of the lr
    gets it going again, in step with torch."""
    c, _ = server
    extra: dict[str, Any] = {"sync": {"workers": 1}} if mode == "sync" else (
        {"shards": 2} if mode == "shards" else {})
    names = ("p", "q") if mode == "shards" else ("p",)
    body = body_of(f"over-{mode}", "SGD", {"lr": 0.1, "momentum": 0.9}, EXP_OVERFLOW,
                   names=names, **extra)
    create(c, body)
    headers = {"X-Optserve-Worker": "w0"} if mode == "sync" else {}
    twin = Twin(body)
    assert step(c, body["id"], 0, names, headers=headers).status_code == 200
    twin.step(0)
    same_as_twin(c, body["id"], twin)
    before = whole(c, body["id"])
    want = twin.next_writes()
    assert refused_key(want) == "lr"
    for key in (None, "k-1", "k-1"):  # a refused keyed step is not recorded: retried, refused
        h = {**headers, **({"Idempotency-Key": key} if key else {})}
        out_of_range(step(c, body["id"], 1, names, headers=h), "lr", want["lr"])
        assert whole(c, body["id"]) == before
    # the way out: the group's lr (ExponentialLR takes it from there)
    r = c.patch(f"/v1/sessions/{body['id']}/param_groups/0", json={"lr": 1e-3})
    assert r.status_code == 200, r.text
    twin.opt.param_groups[0]["lr"] = 1e-3
    assert step(c, body["id"], 1, names, headers=headers).status_code == 200
    twin.step(1)
    same_as_twin(c, body["id"], twin)


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_the_refusal_and_the_way_out_on_every_engine(http: httpx.Client) -> None:
    """The same refusal, and ``{"scheduler": null}``, on the embedded engine and on a Ray host
    (operations travel there as their records: the check's flag with them)."""
    body = body_of(f"eng-{uuid.uuid4().hex[:8]}", "SGD", {"lr": 0.1, "momentum": 0.9},
                   EXP_OVERFLOW)
    sid = body["id"]
    create(http, body)
    twin = Twin(body)
    assert step(http, sid, 0).status_code == 200
    twin.step(0)
    before = whole(http, sid)
    out_of_range(step(http, sid, 1), "lr", twin.next_writes()["lr"])
    assert whole(http, sid) == before
    r = http.patch(f"/v1/sessions/{sid}", json={"scheduler": None})
    assert r.status_code == 200 and r.json()["scheduler"] is None, r.text
    twin.per_step = False
    r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 1e-3})
    assert r.status_code == 200, r.text
    twin.opt.param_groups[0]["lr"] = 1e-3
    assert step(http, sid, 1).status_code == 200
    twin.step(1)
    same_as_twin(http, sid, twin)
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_an_infinite_lr_is_refused_naming_it(server: tuple[httpx.Client, Path]) -> None:
    """float64 parameters, lr 1e200, gamma 1e200: the first step's scheduler step would write
    inf (in float64, as torch computes it). Refused, the value given as {"$float": "inf"}."""
    c, _ = server
    body = body_of("inf", "SGD", {"lr": 1e200}, {"name": "ExponentialLR",
                                                   "options": {"gamma": 1e200}},
                   param=P0.double())
    create(c, body)
    twin = Twin(body)
    before = whole(c, "inf")
    want = twin.next_writes()
    assert want["lr"] == math.inf
    problem = out_of_range(step(c, "inf", 0, dtype=torch.float64), "lr", math.inf)
    assert problem["value"] == {"$float": "inf"}
    assert whole(c, "inf") == before


def test_a_scheduler_step_by_hand_that_overflows_is_refused(
        server: tuple[httpx.Client, Path]) -> None:
    """The same by ``POST .../scheduler/step`` (``step_on: manual``)."""
    c, _ = server
    body = body_of("manual", "SGD", {"lr": 0.1},
                   {**EXP_OVERFLOW, "step_on": "manual"})
    create(c, body)
    twin = Twin(body)
    r = c.post("/v1/sessions/manual/scheduler/step")
    assert r.status_code == 200, r.text
    twin.scheduler_step()
    assert r.json()["lr"] == [twin.lr()]
    before = whole(c, "manual")
    want = twin.next_writes()
    problem = out_of_range(c.post("/v1/sessions/manual/scheduler/step"), "lr", want["lr"])
    assert problem["detail"].startswith("this ExponentialLR step")
    assert whole(c, "manual") == before
    assert step(c, "manual", 0).status_code == 200
    twin.step(0)
    same_as_twin(c, "manual", twin)


def test_an_lbfgs_step_whose_scheduler_step_overflows_is_refused(
        server: tuple[httpx.Client, Path]) -> None:
    """LBFGS steps through evaluations: refused when the step opens, before any evaluation."""
    c, _ = server
    body = body_of("lbfgs", "LBFGS", {"lr": 0.1, "max_iter": 1}, EXP_OVERFLOW)
    create(c, body)
    g = json_tensor(grads(0, ["p"])["p"])
    r = c.post("/v1/sessions/lbfgs/step", json={"loss": 1.0, "grads": {"p": g}})
    assert r.status_code == 200 and "needs" not in r.json(), r.text
    before = whole(c, "lbfgs")
    r = c.post("/v1/sessions/lbfgs/step", json={"loss": 1.0, "grads": {"p": g}})
    assert r.status_code == 409 and r.json()["code"] == "scheduler_out_of_range", r.text
    assert r.json()["field"] == "param_groups.0.lr"
    assert whole(c, "lbfgs") == before


# --------------------------------------------------------------------------- momentum, betas

CYCLIC = {"name": "CyclicLR", "options": {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4,
                                          "mode": "exp_range", "gamma": 1.5}}


@pytest.mark.parametrize("optimizer,options,key", [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum"),
    ("Adam", {"lr": 0.1}, "betas"),
], ids=["SGD-momentum", "Adam-betas"])
def test_cyclic_momentum_out_of_range_is_refused_and_the_scheduler_can_be_removed(
        server: tuple[httpx.Client, Path], optimizer: str, options: dict[str, Any],
        key: str) -> None:
    """CyclicLR ``exp_range`` with gamma 1.5 cycles the momentum (Adam's beta1) below 0 in its
    third cycle, where torch's constructor refuses it: the session's export then did not import
    into another session. That step is refused naming the key; the export at that point is
    refused by a new session's import alike (422: its next step would write the same value),
    nothing changed there; ``{"scheduler": null}`` removes the scheduler (PATCH of the lr would
    not help: CyclicLR writes its own), the export then imports into the new session without
    its scheduler, and both sessions step on as torch does without it."""
    c, _ = server
    body = body_of(f"cyc-{key}", optimizer, options, CYCLIC)
    sid = body["id"]
    create(c, body)
    twin = Twin(body)
    k = 0
    while refused_key(twin.next_writes()) is None:
        assert step(c, sid, k).status_code == 200
        twin.step(k)
        k += 1
        assert k < 50, "the schedule never left the range"
    same_as_twin(c, sid, twin)
    before = whole(c, sid)
    want = twin.next_writes()
    assert refused_key(want) == key
    out_of_range(step(c, sid, k), key, want[key])
    assert whole(c, sid) == before
    # a new session made with the same body refuses the export, naming the same key and value
    new = new_like(c, sid, body)
    fresh = whole(c, new)
    problem = import_refused(import_export(c, sid, new), key, want[key])
    assert problem["scheduler"] == "CyclicLR"
    assert whole(c, new) == fresh
    # the way out: remove the scheduler (torch: stop stepping it); the export then imports
    for s in (sid, new):
        r = c.patch(f"/v1/sessions/{s}", json={"scheduler": None})
        assert r.status_code == 200 and r.json()["scheduler"] is None, r.text
    r = import_export(c, sid, new)
    assert r.status_code == 200, r.text
    for s in (sid, new):
        assert step(c, s, k).status_code == 200
    twin.per_step = False
    twin.step(k)
    for s in (sid, f"{sid}-2"):
        same_as_twin(c, s, twin)
        assert c.get(f"/v1/sessions/{s}/state_dict").json().get("scheduler") is None


# --------------------------------------------------------------------------- exports import

def _linear_below_zero() -> dict[str, Any]:
    """A LinearLR to end_factor 0 that torch leaves a hair below zero (found here, by torch)."""
    for i in range(1, 98):
        for total in range(2, 8):
            p = torch.zeros(1, requires_grad=True)
            opt = torch.optim.SGD([p], lr=0.1)
            sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=i / 97,
                                                      end_factor=0.0, total_iters=total)
            for _ in range(total):
                opt.step()
                sched.step()
            if opt.param_groups[0]["lr"] < 0:
                return {"name": "LinearLR", "options": {"start_factor": i / 97,
                                                        "end_factor": 0.0,
                                                        "total_iters": total}}
    raise AssertionError("no LinearLR ends below zero here")


@pytest.mark.parametrize("case", ["linear-below-zero", "exponential-negative", "overflow-edge"])
def test_every_export_imports_into_a_new_session_and_steps_identically(
        server: tuple[httpx.Client, Path], case: str) -> None:
    """A session's export, whatever state its scheduler drove it to, imports into a new session
    made with the same body, and both step on as torch does. LinearLR's end a hair below zero
    and ExponentialLR with a negative gamma leave an lr torch's constructor refuses (and an
    import used to). The session one step short of an overflow holds lr 1e19: its next step is
    refused (409), and so is its export by a new session's import (422, nothing changed there,
    the value the next step would write named) until its lr is changed; then it imports."""
    c, _ = server
    scheduler = {"linear-below-zero": _linear_below_zero(),
                 "exponential-negative": {"name": "ExponentialLR", "options": {"gamma": -1.0}},
                 "overflow-edge": EXP_OVERFLOW}[case]
    body = body_of(f"exp-{case}", "SGD", {"lr": 0.1, "momentum": 0.9}, scheduler)
    sid = body["id"]
    create(c, body)
    twin = Twin(body)
    n = scheduler["options"].get("total_iters", 3) if case != "overflow-edge" else 1
    for k in range(n):
        assert step(c, sid, k).status_code == 200
        twin.step(k)
    if case != "overflow-edge":
        assert twin.lr() < 0
    same_as_twin(c, sid, twin)
    exported = c.get(f"/v1/sessions/{sid}/state_dict").json()
    if case == "overflow-edge":  # refused alike by the step and by an import, until a PATCH
        assert step(c, sid, n).json()["code"] == "scheduler_out_of_range"
        new = new_like(c, sid, body)
        fresh = whole(c, new)
        import_refused(import_export(c, sid, new), "lr", twin.next_writes()["lr"])
        assert whole(c, new) == fresh
        assert c.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 1e-3}).is_success
        twin.opt.param_groups[0]["lr"] = 1e-3
        exported = c.get(f"/v1/sessions/{sid}/state_dict").json()
        assert import_export(c, sid, new).status_code == 200
    else:
        new = copy_into_new(c, sid, body)
    same_as_twin(c, new, twin)
    for s in (sid, f"{sid}-2"):
        assert step(c, s, n).status_code == 200
    twin.step(n)
    for s in (sid, f"{sid}-2"):
        same_as_twin(c, s, twin)
    # a negative lr a client gives is still refused
    bad = copy.deepcopy(exported)
    bad["param_groups"][0]["lr"] = -0.5
    r = c.put(f"/v1/sessions/{sid}-2/state_dict", json=bad)
    assert r.status_code == 422 and r.json()["field"] == "state_dict.param_groups.0.lr", r.text


# --------------------------------------------------------------------------- kill -9

@pytest.mark.slow
def test_removing_the_scheduler_survives_kill_9(tmp_path: Path) -> None:
    """What the way out logs (a refused step: nothing; ``{"scheduler": null}``: a configure
    record) is what a restart after SIGKILL restores, and a graceful restart's snapshot too;
    keyed retries are answered, and the session steps on in step with torch."""
    proc = Proc(tmp_path / "data", port=random.randint(20000, 40000))
    body = body_of("out", "SGD", {"lr": 0.1, "momentum": 0.9}, EXP_OVERFLOW)
    twin = Twin(body)
    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            create(c, body)
            assert step(c, "out", 0).status_code == 200
            twin.step(0)
            assert step(c, "out", 1).status_code == 409
            r = c.patch("/v1/sessions/out", json={"scheduler": None},
                        headers={"Idempotency-Key": "drop"})
            assert r.status_code == 200 and r.json()["scheduler"] is None, r.text
            twin.per_step = False
            r = c.patch("/v1/sessions/out/param_groups/0", json={"lr": 0.05})
            assert r.status_code == 200, r.text
            twin.opt.param_groups[0]["lr"] = 0.05
            r = step(c, "out", 1, headers={"Idempotency-Key": "s1"})
            assert r.status_code == 200, r.text
            twin.step(1)
            no = c.post("/v1/sessions/out/scheduler/step")
            assert no.status_code == 422 and no.json()["code"] == "no_scheduler"
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert c.get("/readyz").json().get("refused") is None
            assert c.get("/v1/sessions/out").json()["scheduler"] is None
            same_as_twin(c, "out", twin)
            r = c.patch("/v1/sessions/out", json={"scheduler": None},
                        headers={"Idempotency-Key": "drop"})
            assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true"
            r = step(c, "out", 1, headers={"Idempotency-Key": "s1"})
            assert r.status_code == 200 and r.json()["replayed"] is True
            assert step(c, "out", 2).status_code == 200
            twin.step(2)
            same_as_twin(c, "out", twin)
            r = c.patch("/v1/sessions/out", json={"scheduler": {"name": "StepLR"}})
            assert r.status_code == 422 and r.json()["field"] == "scheduler", r.text
        assert proc.proc is not None  # a graceful stop (a snapshot), then the snapshot alone
        proc.proc.send_signal(signal.SIGTERM)
        proc.proc.wait(60)
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert c.get("/readyz").json().get("refused") is None
            assert c.get("/v1/sessions/out").json()["scheduler"] is None
            same_as_twin(c, "out", twin)
            assert step(c, "out", 3).status_code == 200
            twin.step(3)
            same_as_twin(c, "out", twin)
    finally:
        proc.stop()


# --------------------------------------------------------------------------- older records

def test_steps_older_servers_took_still_replay(tmp_path: Path) -> None:
    """A step record logged by a server before this check (no ``scheduler_range``) whose
    scheduler step wrote an lr past float32 (or inf) replays as it ran, after a crash: the
    session comes back at that lr, reported faithfully ({"$float": "inf"}), refuses steps as
    before (422 ``option_overflow``), and the way out (PATCH of the lr) works."""
    data = tmp_path / "data"
    cases = {"f32": (P0, {"lr": 0.1}, 1e20, 2), "f64": (P0.double(), {"lr": 1e200}, 1e200, 1)}
    twins: dict[str, Twin] = {}

    async def log_as_older_servers() -> None:
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        try:
            for sid, (p, options, gamma, n) in cases.items():
                spec = {"name": "ExponentialLR", "options": {"gamma": gamma}}
                await eng.create(CreateSpec("SGD", [GroupSpec({"p": p.clone()})], options,
                                            scheduler=spec, id=sid))
                twins[sid] = twin = Twin(body_of(sid, "SGD", options, spec, param=p))
                host, key = await eng._host("default", sid)
                for k in range(n):
                    await host.execute(key, Step(grads(k, ["p"], p.dtype)))
                    twin.step(k)
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(log_as_older_servers())
    assert refused_key({"lr": twins["f32"].lr()}) == "lr" and twins["f64"].lr() == math.inf

    async def replayed() -> None:
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        try:
            assert await eng.refused() == {}
            with pytest.raises(OptserveError) as info:
                await eng.step("f32", grads(5, ["p"]), return_params=False)
            assert info.value.code == "option_overflow"
            assert info.value.field == "param_groups.0.lr"
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(replayed())
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            for sid, twin in twins.items():
                same_as_twin(c, sid, twin)
            assert c.get("/v1/sessions/f64").json()["lr"] == [{"$float": "inf"}]
            assert c.get("/v1/sessions/f64/params").json()["lr"] == [{"$float": "inf"}]
            r = c.patch("/v1/sessions/f32/param_groups/0", json={"lr": 1e-3})
            assert r.status_code == 200, r.text
            twins["f32"].opt.param_groups[0]["lr"] = 1e-3
            assert step(c, "f32", 5).status_code == 200
            twins["f32"].step(5)
            same_as_twin(c, "f32", twins["f32"])
    finally:
        live.stop()
