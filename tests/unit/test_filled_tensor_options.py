"""``$fill`` in a group's option changes (a step's ``param_groups`` entry, a ``PATCH
.../param_groups/{i}``): the value is filled into the tensor the group holds, as torch's
schedulers fill a tensor lr (``group["lr"].fill_(v)``), so every group and the defaults holding
that tensor follow, and a group added later starts from it; without it a value replaces the
group's own (``group["lr"] = v``). Each sequence is compared bitwise with torch doing the same
(parameters, the exported groups and state, the defaults), live and after a restart (the log
replayed, as after kill -9, or a snapshot restored); a refused fill changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from fastapi.testclient import TestClient

from app.engine import CreateSpec, Front, GroupSpec, chunked
from app.errors import Invalid, OptserveError
from tests.unit.test_tensor_lr_aliasing import PARAMS, SID, Run, assert_same, grads, seeded

GROUPS = [["w", "b"], ["h"]]  # two groups built from the defaults: one lr tensor in torch
FILL = "$fill"


class Twin:
    """The session in process: torch's Adam over the same parameters, a tensor lr default."""

    def __init__(self, dtypes: dict[str, torch.dtype] | None = None) -> None:
        self.dtypes = dtypes or {}
        self.params = {n: self.initial(n) for n in PARAMS}
        self.opt = torch.optim.Adam([{"params": [(n, self.params[n]) for n in g]}
                                     for g in GROUPS], lr=torch.tensor(0.01))

    def initial(self, name: str) -> torch.Tensor:
        return seeded(PARAMS[name], list(PARAMS).index(name)).to(
            self.dtypes.get(name, torch.float32))

    def spec(self) -> CreateSpec:
        return CreateSpec("Adam", [GroupSpec({n: self.initial(n) for n in g}) for g in GROUPS],
                          {"lr": torch.tensor(0.01)}, id=SID)

    def names(self) -> list[str]:
        return [n for g in self.opt.param_groups for n in g["param_names"]]

    def grads(self, k: int) -> dict[str, torch.Tensor]:
        return {n: g.to(self.params[n].dtype) for n, g in grads(k, self.names()).items()}

    def step(self, k: int) -> None:
        for n, g in self.grads(k).items():
            self.params[n].grad = g
        self.opt.step()
        for n in self.names():
            self.params[n].grad = None


def filled(twin: Twin, index: int) -> dict[str, Any]:
    """The change a client sends for group ``index`` after filling its tensor lr."""
    return {"lr": twin.opt.param_groups[index]["lr"].clone(), FILL: ["lr"]}


async def check(eng: Front, twin: Twin, when: str) -> None:
    got = (await eng.pull(SID, None)).params
    assert got is not None
    assert_same(got, {n: twin.params[n] for n in twin.names()}, f"{when}: params")
    sd = (await eng.export_state(SID)).state_dict
    want = twin.opt.state_dict()
    # (a local scheduler's initial_lr stays in the local groups, as the SDK keeps it)
    assert_same(sd["param_groups"], [{k: v for k, v in g.items() if k != "initial_lr"}
                                     for g in want["param_groups"]], f"{when}: groups")
    assert_same(sd["state"], want["state"], f"{when}: state")
    info = await eng.describe(SID)
    for key, where in [("defaults", info.defaults),
                       *((f"param_groups.{i}", g) for i, g in enumerate(info.param_groups))]:
        lr = where["lr"]  # (a JSON tensor whose data is an array)
        got_lr = torch.from_numpy(numpy.asarray(lr["data"])).reshape(lr["shape"])
        want_lr = (twin.opt.defaults if key == "defaults"
                   else twin.opt.param_groups[int(key.rsplit(".", 1)[1])])["lr"]
        assert_same(got_lr, want_lr, f"{when}: {key}.lr")
    # which slots hold one tensor, as the description says it: torch's
    assert (info.to_json().get("shared_tensors") or []) == torch_shared_slots(twin.opt), when


def torch_shared_slots(opt: torch.optim.Optimizer) -> list[list[list[Any]]]:
    """The option slots of ``opt`` holding one tensor object (``["defaults", key]``, ``[group
    index, key]``), one list per tensor held by more than one."""
    found: dict[int, list[list[Any]]] = {}
    for key, value in opt.defaults.items():
        if isinstance(value, torch.Tensor):
            found.setdefault(id(value), []).append(["defaults", key])
    for index, group in enumerate(opt.param_groups):
        for key, value in group.items():
            if key not in ("params", "param_names", "initial_lr") \
                    and isinstance(value, torch.Tensor):
                found.setdefault(id(value), []).append([index, key])
    return [slots for slots in found.values() if len(slots) > 1]


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
def test_a_fill_with_each_step_moves_the_defaults_as_torchs_scheduler_does(
        tmp_path: Path, restart: str) -> None:
    async def go() -> None:
        twin = Twin()
        sched = torch.optim.lr_scheduler.StepLR(twin.opt, step_size=1, gamma=0.5)
        async with Run(tmp_path, restart) as r:
            await r.eng.create(twin.spec())
            for k in range(3):
                changes = {i: filled(twin, i) for i in range(len(GROUPS))} if k else None
                await r.eng.step(SID, twin.grads(k), return_params=False, options=changes)
                twin.step(k)
                await check(r.eng, twin, f"step {k}")
                sched.step()
            # the last fill sent alone, with a step that has no gradients
            await r.eng.step(SID, {}, return_params=False, options={0: filled(twin, 0)})
            await r.maybe_restart()
            await check(r.eng, twin, "restarted")
            await r.eng.add_param_group(SID, GroupSpec({"x": twin.initial("x")}, {}))
            twin.opt.add_param_group({"params": [("x", twin.params["x"])]})
            assert twin.opt.param_groups[2]["lr"] is twin.opt.defaults["lr"]
            await check(r.eng, twin, "added")
            await r.maybe_restart()
            for k in range(3, 5):
                sched.step()
                await r.eng.step(SID, twin.grads(k), return_params=False,
                                 options={i: filled(twin, i) for i in range(3)})
                twin.step(k)
            await r.maybe_restart()
            await check(r.eng, twin, "stepped after the add")
    asyncio.run(go())


@pytest.mark.parametrize("restart", ["none", "log"])
def test_a_patch_replaces_unless_it_fills(tmp_path: Path, restart: str) -> None:
    """``PATCH`` without ``$fill`` keeps replacing (``group["lr"] = v``: the defaults and the
    other group keep the tensor); with it, the tensor the group holds is filled."""
    async def go() -> None:
        twin = Twin()
        async with Run(tmp_path, restart) as r:
            await r.eng.create(twin.spec())
            await r.eng.update_param_group(SID, 1, {"lr": torch.tensor(0.2)})
            twin.opt.param_groups[1]["lr"] = torch.tensor(0.2)
            await check(r.eng, twin, "replaced")
            twin.opt.param_groups[0]["lr"].fill_(0.03)
            await r.eng.update_param_group(SID, 0, filled(twin, 0))
            twin.opt.param_groups[1]["lr"].fill_(0.04)  # (group 1's own tensor now)
            await r.eng.update_param_group(SID, 1, filled(twin, 1))
            await r.maybe_restart()
            await r.eng.step(SID, twin.grads(0), return_params=False)
            twin.step(0)
            await check(r.eng, twin, "filled")
    asyncio.run(go())


def test_fills_and_replacements_apply_in_the_order_given(tmp_path: Path) -> None:
    """One step's changes apply in their order: group 1's lr replaced first leaves the tensor
    group 0 then fills to the defaults alone; two fills of one tensor leave the last one's
    value in every group holding it."""
    async def go() -> None:
        twin = Twin()
        async with Run(tmp_path, "log") as r:
            await r.eng.create(twin.spec())
            await r.eng.step(SID, twin.grads(0), return_params=False, options={
                1: {"lr": torch.tensor(0.5)}, 0: {"lr": torch.tensor(0.002), FILL: ["lr"]}})
            twin.opt.param_groups[1]["lr"] = torch.tensor(0.5)
            twin.opt.param_groups[0]["lr"].fill_(0.002)
            twin.step(0)
            await check(r.eng, twin, "replaced, then filled")
            twin.opt.param_groups[1]["lr"] = torch.tensor(0.002)
            await r.eng.update_param_group(SID, 1, {"lr": torch.tensor(0.002)})
            await r.eng.add_param_group(SID, GroupSpec({"x": twin.initial("x")}, {}))
            twin.opt.add_param_group({"params": [("x", twin.params["x"])]})
            # (group 1 holds its own tensor: its fill is its own)
            await r.eng.step(SID, twin.grads(1), return_params=False, options={
                0: {"lr": 0.004, FILL: ["lr"]}, 2: {"lr": 0.003, FILL: ["lr"]},
                1: {"lr": torch.tensor(0.003), FILL: ["lr"]}})
            twin.opt.param_groups[0]["lr"].fill_(0.003)
            twin.opt.param_groups[1]["lr"].fill_(0.003)
            twin.step(1)
            await r.maybe_restart()
            await check(r.eng, twin, "two fills of one tensor")
    asyncio.run(go())


@pytest.mark.parametrize("how", ["step", "patch"])
def test_a_refused_fill_changes_nothing(tmp_path: Path, how: str) -> None:
    """A fill torch's checks refuse (a negative lr), or one that would leave a group holding
    the same tensor past its parameters' range (float16: 70000), fails the whole step or PATCH:
    parameters, groups, defaults and version as they were, also after a replay of the log."""
    async def go() -> None:
        twin = Twin({"h": torch.float16})
        async with Run(tmp_path, "log") as r:
            await r.eng.create(twin.spec())
            await r.eng.step(SID, twin.grads(0), return_params=False)
            twin.step(0)
            for value, code, field in [(-0.5, "invalid_option", "param_groups.0.lr"),
                                       (70000.0, "option_overflow", "param_groups.1.lr")]:
                change = {"lr": torch.tensor(value), FILL: ["lr"]}
                with pytest.raises(Invalid) as refused:
                    if how == "step":
                        await r.eng.step(SID, twin.grads(1), return_params=False,
                                         options={0: change})
                    else:
                        await r.eng.update_param_group(SID, 0, change)
                assert (refused.value.code, refused.value.field) == (code, field), (
                    refused.value.code, refused.value.field, str(refused.value))
                assert (await r.eng.describe(SID)).version == 1
                await check(r.eng, twin, f"refused {value}")
            await r.maybe_restart()
            await check(r.eng, twin, "refused, restarted")
    asyncio.run(go())


def test_a_step_failing_after_its_fill_leaves_the_session_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer's step raising after the step's fill was made: the session is rebuilt
    from its store without the step (the tensor the defaults and groups hold at its value
    before), and steps on as torch does."""
    async def go() -> None:
        twin = Twin()
        async with Run(tmp_path, "none") as r:
            await r.eng.create(twin.spec())
            await r.eng.step(SID, twin.grads(0), return_params=False)
            twin.step(0)

            real, failed_once = chunked.step, []

            def fails(*args: Any, **kwargs: Any) -> None:  # (once: the rebuild replays steps)
                if not failed_once:
                    failed_once.append(True)
                    raise RuntimeError("injected")
                real(*args, **kwargs)
            monkeypatch.setattr(chunked, "step", fails)
            with pytest.raises(OptserveError) as failed:
                await r.eng.step(SID, twin.grads(1), return_params=False,
                                 options={0: {"lr": torch.tensor(0.005), FILL: ["lr"]}})
            assert failed.value.code == "apply_failed", failed.value
            monkeypatch.undo()
            await check(r.eng, twin, "failed")
            await r.eng.step(SID, twin.grads(2), return_params=False)
            twin.step(2)
            await check(r.eng, twin, "stepped after the failure")
    asyncio.run(go())


@pytest.mark.parametrize(("fill", "field"), [
    ("lr", "param_groups.0.$fill"), (["lr", "lr"], "param_groups.0.$fill"),
    (["eps"], "param_groups.0.$fill"), ([3], "param_groups.0.$fill"),
    (["lr", "betas"], "param_groups.0.lr")])
def test_a_malformed_fill_is_a_422_naming_it(app_client: TestClient, fill: Any,
                                             field: str) -> None:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "Adam", "options": {"lr": {"dtype": "float32", "shape": [], "data": [0.1]}},
        "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    before = app_client.get(f"/v1/sessions/{sid}").json()
    # (a two-element lr fills nothing: torch's fill_ takes one value)
    lr: Any = ({"dtype": "float32", "shape": [2], "data": [0.05, 0.05]}
               if field.endswith(".lr") else 0.05)
    change = {"lr": lr, "betas": [0.8, 0.9], "$fill": fill}
    for method, url, body in [
            ("POST", f"/v1/sessions/{sid}/step", {"grads": {}, "param_groups": {"0": change}}),
            ("PATCH", f"/v1/sessions/{sid}/param_groups/0", change)]:
        r = app_client.request(method, url, json=body)
        assert r.status_code == 422, r.text
        assert (r.json()["code"], r.json()["field"]) == ("invalid_option", field), r.json()
    assert app_client.get(f"/v1/sessions/{sid}").json() == before
