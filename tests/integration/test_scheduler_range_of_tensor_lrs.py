"""A tensor ``lr`` past the parameters' dtype, imports a scheduler would take out of range, and
sessions an older server left holding an lr past the range.

- A float64 tensor lr holds values past float32's range; torch converts it to the parameters'
  dtype in the step: most step functions raise "value cannot be converted ... without
  overflow", some (RAdam, ASGD) make the parameters infinite. The range checks saw Python
  floats only: a client's tensor lr of 1e300 was torch's 422 ``invalid_option`` or taken
  (RAdam), and a scheduler's step writing 1e39 into a tensor lr was taken, every later step a
  500 ``apply_failed``, the session's export refused by its own import. Now it is refused as a
  float lr is: 422 ``option_overflow`` where a client gives it, 409 ``scheduler_out_of_range``
  where a scheduler would write it.
- A state import whose next scheduler step would write out of range is a 422
  ``scheduler_out_of_range`` naming the imported key (nothing imported); it was taken, and
  every step after it refused.
- Sessions an older server's records left holding an lr past the range replay as they ran;
  their steps are refused (422 ``option_overflow``) saying how to get going again, their
  export is refused by an import saying what to change, and after a PATCH of the lr the
  export imports into a fresh session and steps on as torch does.

Expected values come from in-process torch, run here.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import _test_settings
from fastapi.testclient import TestClient

from app.engine import CreateSpec, GroupSpec, embedded_engine
from app.engine.ops import ImportState, Step
from app.main import create_app
from tests.torch_reference import assert_tensors_equal, json_tensor, tensor_from_json, to_wire

pytestmark = pytest.mark.integration
P0 = torch.tensor([1.0, -2.0, 3.0, 0.5])
G = torch.tensor([0.1, -0.2, 0.3, 0.05])
P_JSON = json_tensor(P0)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def lr_tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def torch_cannot_step_with(optimizer: str, lr: torch.Tensor) -> str:
    """What in-process torch makes of ``lr`` on float32 parameters: its error, or the
    non-finite parameters its step leaves (never a usable step)."""
    p = P0.clone().requires_grad_(True)
    opt = getattr(torch.optim, optimizer)([p], lr=lr.clone())
    p.grad = G.clone()
    try:
        opt.step()
    except RuntimeError as exc:
        return str(exc)
    assert not bool(torch.isfinite(p).all()), "torch stepped with it"
    return "non-finite parameters"


def whole(c: TestClient | httpx.Client, sid: str) -> dict[str, Any]:
    return {"describe": c.get(f"/v1/sessions/{sid}").json(),
            "params": c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json(),
            "state": c.get(f"/v1/sessions/{sid}/state_dict",
                           params={"encoding": "b64"}).json()}


def params(c: TestClient | httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    got = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()["params"]
    return {n: tensor_from_json(t) for n, t in got.items()}


def refused(r: httpx.Response, status: int, code: str, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    problem: dict[str, Any] = r.json()
    assert (problem["code"], problem["field"]) == (code, field), problem
    return problem


# ----------------------------------------------------------------------- a client's tensor lr

WHERE = ["create-options", "create-group", "patch", "step", "add-group", "import"]


def session_for(c: TestClient, where: str, optimizer: str) -> str:
    """The session an lr is given to (made by that create, for ``create-*``)."""
    sid = f"{where}-{optimizer}-{uuid.uuid4().hex[:6]}"
    if not where.startswith("create"):
        r = c.post("/v1/sessions", json={"id": sid, "optimizer": optimizer,
                                         "options": {"lr": 0.01}, "params": {"w": P_JSON}})
        assert r.status_code == 201, r.text
    return sid


def give_lr(c: TestClient, where: str, optimizer: str, sid: str, lr: torch.Tensor
            ) -> httpx.Response:
    """Give ``lr`` (a tensor) where ``where`` says."""
    if where.startswith("create"):
        group: dict[str, Any] = {"params": {"w": P_JSON}}
        options: dict[str, Any] = {}
        (options if where == "create-options" else group)["lr"] = json_tensor(lr)
        return c.post("/v1/sessions", json={"id": sid, "optimizer": optimizer,
                                            "options": options, "param_groups": [group]})
    if where == "patch":
        return c.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": json_tensor(lr)})
    if where == "step":
        return c.post(f"/v1/sessions/{sid}/step", json={
            "grads": {"w": json_tensor(G)}, "param_groups": {"0": {"lr": json_tensor(lr)}}})
    if where == "add-group":
        return c.post(f"/v1/sessions/{sid}/param_groups",
                      json={"params": {"b": P_JSON}, "lr": json_tensor(lr)})
    state = c.get(f"/v1/sessions/{sid}/state_dict").json()
    state["param_groups"][0]["lr"] = json_tensor(lr)
    return c.put(f"/v1/sessions/{sid}/state_dict", json=state)


def twin_of(where: str, optimizer: str, lr: torch.Tensor) -> tuple[dict[str, torch.Tensor],
                                                                   torch.optim.Optimizer]:
    """The session in-process after ``lr`` was given there and one step taken."""
    w = P0.clone().requires_grad_(True)
    named = {"w": w}
    cls = getattr(torch.optim, optimizer)
    if where == "create-options":
        opt = cls([w], lr=lr.clone())
    elif where == "create-group":
        opt = cls([{"params": [w], "lr": lr.clone()}])
    else:
        opt = cls([w], lr=0.01)
        if where == "add-group":
            named["b"] = b = P0.clone().requires_grad_(True)
            opt.add_param_group({"params": [b], "lr": lr.clone()})
        else:
            opt.param_groups[0]["lr"] = lr.clone()
    for p in named.values():
        p.grad = G.clone()
    opt.step()
    return {n: p.detach() for n, p in named.items()}, opt


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("optimizer", ["SGD", "RAdam"])
def test_a_tensor_lr_past_the_dtype_is_refused_where_a_client_gives_it(
        app_client: TestClient, optimizer: str, where: str) -> None:
    """A float64 tensor lr of 1e300 for float32 parameters: torch's SGD raises mid-step, its
    RAdam makes the parameters infinite. It is a 422 ``option_overflow`` naming it wherever a
    client gives it (it was torch's ``invalid_option`` for SGD, and taken for RAdam), nothing
    changed; a float64 tensor lr in range is taken there and steps as torch does."""
    assert torch_cannot_step_with(optimizer, lr_tensor(1e300))
    c = app_client
    sid = session_for(c, where, optimizer)
    before = whole(c, sid) if not where.startswith("create") else None
    index = 1 if where == "add-group" else 0
    field = {"create-options": "options.lr", "import": "state_dict.param_groups.0.lr"}.get(
        where, f"param_groups.{index}.lr")
    for _ in range(2):
        problem = refused(give_lr(c, where, optimizer, sid, lr_tensor(1e300)), 422,
                          "option_overflow", field)
        assert "1e+300" in problem["detail"] and repr(FLOAT32_MAX) in problem["detail"]
        if before is None:
            assert c.get(f"/v1/sessions/{sid}").status_code == 404
        else:
            assert whole(c, sid) == before
    # in range, the same tensor lr is taken and steps as in torch
    r = give_lr(c, where, optimizer, sid, lr_tensor(0.05))
    assert r.is_success, r.text
    if where != "step":
        names = ("w", "b") if where == "add-group" else ("w",)
        r = c.post(f"/v1/sessions/{sid}/step",
                   json={"grads": {n: json_tensor(G) for n in names}})
        assert r.status_code == 200, r.text
    want, opt = twin_of(where, optimizer, lr_tensor(0.05))
    assert_tensors_equal(params(c, sid), want, where)
    exported = c.get(f"/v1/sessions/{sid}/state_dict").json()
    assert [g["lr"] for g in exported["param_groups"]] == [
        to_wire(g["lr"]) for g in opt.param_groups]


# ----------------------------------------------------------------------- a scheduler's writes

EXP = {"name": "ExponentialLR", "options": {"gamma": 1e20}}


@pytest.mark.parametrize("step_on", ["optimizer", "manual"])
def test_a_scheduler_writing_a_tensor_lr_past_the_dtype_is_refused(
        app_client: TestClient, step_on: str) -> None:
    """SGD with a float64 tensor lr 0.1, ExponentialLR gamma 1e20: the second scheduler step
    would write 1e39 into the tensor, past float32. torch takes that write, then its next step
    raises; the service took it too (every later step a 500). Now that step (or scheduler
    step by hand) is the 409 ``scheduler_out_of_range`` a float lr gets, its value the tensor
    it would have written, nothing changed; a PATCH of the lr gets it going, as torch."""
    c = app_client
    sid = f"tsched-{step_on}"
    r = c.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                     "options": {"lr": json_tensor(lr_tensor(0.1))},
                                     "params": {"w": json_tensor(P0)},
                                     "scheduler": {**EXP, "step_on": step_on}})
    assert r.status_code == 201, r.text
    w = P0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr_tensor(0.1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1e20)

    def step_both() -> None:
        r = c.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(G)}})
        assert r.status_code == 200, r.text
        w.grad = G.clone()
        opt.step()
        if step_on == "optimizer":
            sched.step()

    def scheduler_step() -> httpx.Response:
        if step_on == "optimizer":
            return c.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(G)}})
        return c.post(f"/v1/sessions/{sid}/scheduler/step")

    step_both()
    if step_on == "manual":
        assert scheduler_step().status_code == 200
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()
    assert_tensors_equal(params(c, sid), {"w": w.detach()})
    # torch's next scheduler step writes 1e39 into the tensor lr, and its step after fails
    ahead_opt, ahead_sched = copy.deepcopy((opt, sched))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ahead_sched.step()
    written = ahead_opt.param_groups[0]["lr"]
    assert isinstance(written, torch.Tensor) and float(written) > FLOAT32_MAX
    ahead_opt.param_groups[0]["params"][0].grad = G.clone()
    with pytest.raises(RuntimeError, match="overflow"):
        ahead_opt.step()
    before = whole(c, sid)
    for _ in range(2):
        problem = refused(scheduler_step(), 409, "scheduler_out_of_range", "param_groups.0.lr")
        assert problem["value"] == to_wire(written)
        assert "float64 tensor" in problem["detail"] and "nothing changed" in problem["detail"]
        assert whole(c, sid) == before
    # the way out: the group's lr (a float here), from which ExponentialLR goes on
    assert c.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 1e-3}).is_success
    opt.param_groups[0]["lr"] = 1e-3
    step_both()
    assert_tensors_equal(params(c, sid), {"w": w.detach()})
    assert c.get(f"/v1/sessions/{sid}").json()["lr"] == [opt.param_groups[0]["lr"]]


# ----------------------------------------------------------------------- imports


def test_an_import_whose_next_scheduler_step_is_out_of_range_is_refused(
        app_client: TestClient) -> None:
    """A torch state (``?format=torch`` or JSON alike) whose scheduler's next step would write an
    lr past float32 (ExponentialLR at lr 1e19, gamma 1e20) is refused whole: 422
    ``scheduler_out_of_range`` naming ``state_dict.param_groups.0.lr`` and the value torch's
    next step writes. It was taken, and every step after it refused (409) until a PATCH. The
    same state with an lr the schedule can go on from imports and steps as torch does."""
    c = app_client
    body = {"id": "imp", "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9},
            "params": {"w": json_tensor(P0)}, "scheduler": EXP}
    assert c.post("/v1/sessions", json=body).status_code == 201
    w = P0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1e20)
    w.grad = G.clone()
    opt.step()
    sched.step()
    state = {**opt.state_dict(), "scheduler": sched.state_dict()}
    ahead_opt, ahead_sched = copy.deepcopy((opt, sched))
    ahead_sched.step()
    assert ahead_opt.param_groups[0]["lr"] > FLOAT32_MAX
    before = whole(c, "imp")
    problem = refused(c.put("/v1/sessions/imp/state_dict", json=to_wire(state)), 422,
                      "scheduler_out_of_range", "state_dict.param_groups.0.lr")
    assert problem["value"] == ahead_opt.param_groups[0]["lr"]
    assert problem["scheduler"] == "ExponentialLR"
    assert "Nothing was imported" in problem["detail"]
    assert 'PATCH /v1/sessions/imp with {"scheduler": null}' in problem["detail"], problem
    assert whole(c, "imp") == before
    # with an lr ExponentialLR can go on from, it imports; both step alike
    state["param_groups"][0]["lr"] = 1e-3
    opt.param_groups[0]["lr"] = 1e-3
    r = c.put("/v1/sessions/imp/state_dict", json=to_wire(state))
    assert r.status_code == 200, r.text
    w_server = params(c, "imp")["w"]
    with torch.no_grad():
        w.copy_(w_server)  # (the session kept its own parameters: an import carries none)
    assert c.post("/v1/sessions/imp/step", json={"grads": {"w": json_tensor(G)}}).is_success
    w.grad = G.clone()
    opt.step()
    sched.step()
    assert_tensors_equal(params(c, "imp"), {"w": w.detach()})
    assert c.get("/v1/sessions/imp").json()["lr"] == [opt.param_groups[0]["lr"]]


# ----------------------------------------------------------------------- older records

@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_sessions_older_servers_left_out_of_range_say_how_to_go_on(
        tmp_path: Path, kind: str) -> None:
    """Records logged by older servers replay as they ran: a step whose ExponentialLR step
    wrote lr 1e39 (a float one logged before the 409 check, or a float64 tensor one logged
    before the tensor check), and an import of a state at the edge of that overflow logged
    before imports were checked. The session holding 1e39 then refuses its steps (422
    ``option_overflow``: the tensor one was a 500) saying how to get going (PATCH the group's
    lr); its export is refused by a fresh session's import naming the field and the range;
    after a PATCH of the lr the export imports, and both step as torch does."""
    data = tmp_path / "data"
    lr: Any = 0.1 if kind == "float" else lr_tensor(0.1)
    spec = {"name": "ExponentialLR", "options": {"gamma": 1e20}}
    w = P0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=copy.deepcopy(lr))  # (torch fills a tensor lr in place)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1e20)
    # the state of "old" after its first step: at the edge (its next step writes 1e39)
    edge_opt = torch.optim.SGD([P0.clone().requires_grad_(True)], lr=copy.deepcopy(lr))
    edge_sched = torch.optim.lr_scheduler.ExponentialLR(edge_opt, gamma=1e20)
    with warnings.catch_warnings():  # (a scheduler step before any optimizer step)
        warnings.simplefilter("ignore")
        edge_sched.step()

    async def log_as_older_servers() -> None:
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"w": P0.clone()})],
                                        {"lr": copy.deepcopy(lr)},
                                        scheduler=spec, id="old"))
            await eng.create(CreateSpec("SGD", [GroupSpec({"w": P0.clone()})],
                                        {"lr": copy.deepcopy(lr)},
                                        scheduler=spec, id="edge"))
            host, key = await eng._host("default", "old")
            for _ in range(2):
                # (a float write: logged before the 409 check; a tensor one: before the tensor
                # check, the 409 check's flag with it)
                await host.execute(key, Step({"w": G.clone()},
                                             scheduler_range=kind == "tensor"))
                w.grad = G.clone()
                opt.step()
                sched.step()
            # an import at the edge, logged before imports were checked for it
            host, key = await eng._host("default", "edge")
            await host.execute(key, ImportState({**edge_opt.state_dict(),
                                                 "scheduler": edge_sched.state_dict()},
                                                request=True))
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(log_as_older_servers())
    assert float(opt.param_groups[0]["lr"]) > FLOAT32_MAX
    with TestClient(create_app(_test_settings(data_dir=data))) as c:
        assert c.get("/readyz").json().get("refused") is None
        assert_tensors_equal(params(c, "old"), {"w": w.detach()})
        assert c.get("/v1/sessions/old").json()["lr"] == [float(opt.param_groups[0]["lr"])]
        assert c.get("/v1/sessions/edge").json()["lr"] == [
            float(edge_opt.param_groups[0]["lr"])]
        # the step says how to go on
        before = whole(c, "old")
        problem = refused(c.post("/v1/sessions/old/step", json={"grads": {"w": json_tensor(G)}}),
                          422, "option_overflow", "param_groups.0.lr")
        assert "PATCH .../param_groups/0" in problem["detail"], problem
        assert 'PATCH /v1/sessions/old with {"scheduler": null}' in problem["detail"], problem
        assert whole(c, "old") == before
        # its export is refused by a fresh session made alike, saying what to change
        fresh = {"optimizer": "SGD", "options": {"lr": to_wire(lr)}, "params": {"w": P_JSON},
                 "scheduler": spec}
        assert c.post("/v1/sessions", json={**fresh, "id": "new"}).status_code == 201
        exported = c.get("/v1/sessions/old/state_dict").json()
        new_before = whole(c, "new")
        problem = refused(c.put("/v1/sessions/new/state_dict", json=exported), 422,
                          "option_overflow", "state_dict.param_groups.0.lr")
        assert repr(FLOAT32_MAX) in problem["detail"]
        assert "PATCH that session's group (.../param_groups/0)" in problem["detail"], problem
        assert whole(c, "new") == new_before
        # the way out: PATCH the lr; the export then imports, and both step as torch
        assert c.patch("/v1/sessions/old/param_groups/0", json={"lr": 1e-3}).is_success
        opt.param_groups[0]["lr"] = 1e-3
        r = c.put("/v1/sessions/new/state_dict",
                  json=c.get("/v1/sessions/old/state_dict").json())
        assert r.status_code == 200, r.text
        assert c.put("/v1/sessions/new/params",
                     json={"params": {"w": json_tensor(w.detach())}}).is_success
        for sid in ("old", "new"):
            r = c.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(G)}})
            assert r.status_code == 200, r.text
        w.grad = G.clone()
        opt.step()
        sched.step()
        for sid in ("old", "new"):
            assert_tensors_equal(params(c, sid), {"w": w.detach()}, sid)
            assert c.get(f"/v1/sessions/{sid}").json()["lr"] == [opt.param_groups[0]["lr"]]
