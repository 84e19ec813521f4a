"""A ``torch.save`` state dict keeps which tensors are one: torch's ``load_state_dict`` keeps a
tensor ``lr`` held by several groups one tensor (a scheduler's in-place fill then moves every
group holding it: ReduceLROnPlateau, reading each group's lr in turn, lowers a shared one once
per group), and a session importing such a file does the same, live and after a restart (the
log replayed, or a snapshot restored), compared bitwise with torch doing the same. Per-parameter
state tensors sharing memory are nothing torch saves (each update would write into the other):
the import is refused with a 422 naming the tensor, and the session is left as it was; what
torch itself shares (LBFGS's ``t`` is its group's tensor ``lr``) imports."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.api.requests import state_from_torch
from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.errors import Invalid
from tests.unit.test_tensor_lr_aliasing import assert_same, seeded

PARAMS = {"w": (3, 2), "b": (2,), "h": (4,)}
GROUPS = [["w", "b"], ["h"]]
SID = "s"
SCHEDULERS: dict[str, dict[str, Any]] = {
    # (a metric that never improves: every scheduler step lowers the lr)
    "ReduceLROnPlateau": {"factor": 0.5, "patience": 0},
    "ExponentialLR": {"gamma": 0.8},
}
LIMIT = 1 << 24


def grads(k: int) -> dict[str, torch.Tensor]:
    return {n: seeded(PARAMS[n], 1000 * k + i) for i, n in enumerate(PARAMS)}


def shared_lr_groups(groups: list[dict[str, Any]]) -> list[list[int]]:
    """Which groups hold one lr tensor (by object), as lists of group indexes."""
    found: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if isinstance(g["lr"], torch.Tensor):
            found.setdefault(id(g["lr"]), []).append(i)
    return sorted(v for v in found.values() if len(v) > 1)


class Twin:
    """A session's run in process: Adam over two groups built from a tensor lr default (one
    tensor in torch), and a scheduler."""

    def __init__(self, sched: str, seed: int = 0) -> None:
        self.sched_name = sched
        self.params = {n: seeded(PARAMS[n], seed + i) for i, n in enumerate(PARAMS)}
        self.opt = torch.optim.Adam([{"params": [(n, self.params[n]) for n in g]}
                                     for g in GROUPS], lr=torch.tensor(0.01))
        self.sched = getattr(torch.optim.lr_scheduler, sched)(self.opt, **SCHEDULERS[sched])
        self.metric = 1.0

    def spec(self) -> CreateSpec:
        return CreateSpec("Adam", [GroupSpec({n: self.params[n].clone() for n in g})
                                   for g in GROUPS], {"lr": torch.tensor(0.01)},
                          scheduler={"name": self.sched_name,
                                     "options": SCHEDULERS[self.sched_name]}, id=SID)

    def step(self, k: int) -> None:
        for n, g in grads(k).items():
            self.params[n].grad = g
        self.opt.step()
        for n in PARAMS:
            self.params[n].grad = None
        if self.sched_name == "ReduceLROnPlateau":
            self.metric += 1.0
            self.sched.step(self.metric)
        else:
            self.sched.step()

    def saved(self) -> bytes:
        """``torch.save`` of the optimizer's state dict with the scheduler's."""
        buf = io.BytesIO()
        torch.save({**self.opt.state_dict(), "scheduler": self.sched.state_dict()}, buf)
        return buf.getvalue()

    def load(self, data: bytes) -> None:
        sd = torch.load(io.BytesIO(data), weights_only=True)
        sched = sd.pop("scheduler")
        self.opt.load_state_dict(sd)
        self.sched.load_state_dict(sched)


async def step(eng: Front, twin: Twin, k: int) -> None:
    await eng.step(SID, grads(k), return_params=False)
    if twin.sched_name == "ReduceLROnPlateau":
        await eng.scheduler_step(SID, twin.metric + 1.0)
    twin.step(k)


async def check(eng: Front, twin: Twin, when: str) -> None:
    got = (await eng.pull(SID, None)).params
    assert got is not None
    assert_same(got, twin.params, f"{when}: params")
    sd = (await eng.export_state(SID)).state_dict
    want = twin.opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("param_names")
    for g in want["param_groups"]:
        g.pop("param_names")
    assert_same(sd["param_groups"], want["param_groups"], f"{when}: groups")
    assert_same(sd["state"], want["state"], f"{when}: state")
    assert_same(sd["scheduler"], twin.sched.state_dict(), f"{when}: scheduler")
    # the export holds one tensor where torch's state_dict() does (a torch.save of it too)
    assert shared_lr_groups(sd["param_groups"]) == shared_lr_groups(want["param_groups"]), when
    kept = torch.load(io.BytesIO(_saved(sd)), weights_only=True)
    assert shared_lr_groups(kept["param_groups"]) == shared_lr_groups(want["param_groups"]), when


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def engine(data: Path, restart: str) -> Front:
    every = 1 if restart == "snapshot" else 1000
    return embedded_engine("cpu", data_dir=data, durability="step", snapshot_every_steps=every)


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_groups_sharing_one_lr_tensor_stay_one_through_import_and_restart(
        tmp_path: Path, sched: str, restart: str) -> None:
    """A torch-made file whose two groups hold one lr tensor: imported, they stay one (a
    scheduler's fill moves both, as torch's); the session equals torch after the import, after
    scheduled steps, and after a restart (kill -9: the log replayed; or a snapshot restored)."""
    source = Twin(sched, seed=10)
    for k in range(2):
        source.step(100 + k)
    data = source.saved()
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert shared_lr_groups(loaded["param_groups"]) == [[0, 1]]  # (torch.save kept it one)

    async def go() -> None:
        twin = Twin(sched)
        eng = engine(tmp_path, restart)
        await eng.start()
        try:
            await eng.create(twin.spec())
            await step(eng, twin, 0)
            await eng.import_state(SID, state_from_torch(bytearray(data), LIMIT))
            twin.load(data)
            # torch keeps the groups' lr one tensor (apart from the defaults')
            assert shared_lr_groups(twin.opt.param_groups) == [[0, 1]]
            await check(eng, twin, "imported")
            for k in range(1, 4):
                await step(eng, twin, k)
                await check(eng, twin, f"step {k}")
            if restart != "none":
                await eng.stop(snapshot=False)
                eng = engine(tmp_path, restart)
                await eng.start()
                await check(eng, twin, "restarted")
            for k in range(4, 6):
                await step(eng, twin, k)
            await check(eng, twin, "stepped after the restart")
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(go())


TWINS = {"a": (3,), "b": (3,), "c": (2, 2)}


def _adam_state() -> dict[str, Any]:
    """A torch-made Adam state dict over ``TWINS`` in one group (two steps)."""
    params = [seeded(shape, i).requires_grad_() for i, shape in enumerate(TWINS.values())]
    opt = torch.optim.Adam(params, lr=0.01)
    for k in range(2):
        for i, p in enumerate(params):
            p.grad = seeded(tuple(p.shape), 100 * k + i)
        opt.step()
    sd: dict[str, Any] = opt.state_dict()
    return sd


def _aliased(how: str) -> tuple[dict[str, Any], str]:
    """A torch-made Adam state dict, made to share memory ``how``, and the field the refusal
    names."""
    sd = _adam_state()
    state = sd["state"]
    if how == "two parameters' exp_avg one tensor":
        state[1]["exp_avg"] = state[0]["exp_avg"]
        return sd, "state_dict.state.1.exp_avg"
    if how == "exp_avg and exp_avg_sq overlapping views":
        buf = torch.zeros(6)
        state[2]["exp_avg"] = buf[0:4].view(2, 2)
        state[2]["exp_avg_sq"] = buf[2:6].view(2, 2)
        return sd, "state_dict.state.2.exp_avg_sq"
    if how == "two parameters' step one tensor":
        state[2]["step"] = state[0]["step"]
        return sd, "state_dict.state.2.step"
    if how == "a step inside another parameter's exp_avg_sq":
        state[1]["exp_avg_sq"][1] = 2.0  # (a whole number of steps: each its own, it imports)
        state[0]["step"] = state[1]["exp_avg_sq"][1]
        return sd, "state_dict.state.0.step"
    raise AssertionError(how)


def _whole(c: TestClient, sid: str) -> Any:
    return (c.get(f"/v1/sessions/{sid}").json(), c.get(f"/v1/sessions/{sid}/state_dict").json(),
            c.get(f"/v1/sessions/{sid}/params").json())


def _put_torch(c: TestClient, sid: str, obj: Any) -> Any:
    return c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=_saved(obj),
                 headers={"content-type": "application/octet-stream"})


@pytest.mark.parametrize("how", ["two parameters' exp_avg one tensor",
                                 "exp_avg and exp_avg_sq overlapping views",
                                 "two parameters' step one tensor",
                                 "a step inside another parameter's exp_avg_sq"])
def test_state_tensors_sharing_memory_are_refused_naming_one(app_client: TestClient,
                                                             how: str) -> None:
    c = app_client
    sid = f"aliased-{abs(hash(how)) % 10**8}"
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": 0.01}, "params": {
        n: {"dtype": "float32", "shape": list(shape),
            "data": seeded(shape, i).reshape(-1).tolist()}
        for i, (n, shape) in enumerate(TWINS.items())}}
    assert c.post("/v1/sessions", json=body).status_code == 201
    before = _whole(c, sid)
    sd, field = _aliased(how)
    # (torch.save keeps the sharing, as torch's load_state_dict would)
    r = _put_torch(c, sid, sd)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("invalid_state", field), problem
    assert "shares memory" in problem["detail"], problem
    assert _whole(c, sid) == before
    # the same state, each tensor its own, is taken, and equals torch's load of it
    own = torch.load(io.BytesIO(_saved(sd)), weights_only=True)
    own["state"] = {k: {n: t.clone() for n, t in e.items()} for k, e in own["state"].items()}
    r = _put_torch(c, sid, own)
    assert r.status_code == 200, r.text
    local = [seeded(shape, i).requires_grad_() for i, shape in enumerate(TWINS.values())]
    opt = torch.optim.Adam(local, lr=0.01)
    opt.load_state_dict(own)
    got = c.get(f"/v1/sessions/{sid}/state_dict").json()["state"]
    for k, entry in opt.state_dict()["state"].items():
        for n, t in entry.items():
            want = got[str(k)][n]
            assert torch.equal(torch.tensor(want["data"], dtype=t.dtype).reshape(want["shape"]),
                               t), (k, n)


def test_lbfgs_state_whose_t_is_the_groups_lr_tensor_imports(tmp_path: Path) -> None:
    """torch's LBFGS keeps its group's tensor lr as its state's ``t`` after a line search:
    sharing torch makes, taken (the groups are copied apart from the state, as in torch)."""
    p = seeded((5,), 0).requires_grad_()
    opt = torch.optim.LBFGS([p], lr=torch.tensor(1.0), history_size=3,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((p - 1.0) ** 4).sum()
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
    assert opt.state_dict()["state"][0]["t"] is opt.param_groups[0]["lr"]
    data = _saved(opt.state_dict())

    async def go() -> None:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="step")
        await eng.start()
        try:
            await eng.create(CreateSpec("LBFGS", [GroupSpec({"p": seeded((5,), 0)})],
                                        {"lr": torch.tensor(1.0), "history_size": 3,
                                         "line_search_fn": "strong_wolfe"}, id=SID))
            await eng.import_state(SID, state_from_torch(bytearray(data), LIMIT))
            twin_p = seeded((5,), 0).requires_grad_()
            twin = torch.optim.LBFGS([twin_p], lr=torch.tensor(1.0), history_size=3,
                                     line_search_fn="strong_wolfe")
            twin.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
            sd = (await eng.export_state(SID)).state_dict
            want = twin.state_dict()
            for g in sd["param_groups"]:
                g.pop("param_names")
            assert_same(sd["state"], want["state"], "state")
            assert_same(sd["param_groups"], want["param_groups"], "groups")
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(go())


def test_the_refusal_holds_at_the_engine_too() -> None:
    """The engine's own check (what every import passes, whatever its format)."""
    from app.engine.state_aliases import refuse_aliased_state
    sd, field = _aliased("two parameters' exp_avg one tensor")
    with pytest.raises(Invalid) as caught:
        refuse_aliased_state(sd)
    assert caught.value.field == field
    refuse_aliased_state(_adam_state())  # (each its own: nothing to say)
