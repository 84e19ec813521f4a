"""The embedded engine used directly (no HTTP): sessions created, stepped, exported and imported,
every value compared bit for bit with an in-process ``torch.optim`` run."""

from __future__ import annotations

import asyncio
import copy
import inspect
import math
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine.ops import ImportState
from app.errors import Conflict, Invalid, NotFound

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def engine() -> Iterator[Front]:
    eng = embedded_engine("cpu")
    run(eng.start())
    try:
        yield eng
    finally:
        run(eng.stop())


def seeded(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    want = want.detach()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), (
        what, got, want)


def assert_tree_bitwise(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert_bitwise(got, want, path)
    elif isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            assert_tree_bitwise(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_tree_bitwise(a, b, f"{path}.{i}")
    else:
        assert got == want, (path, got, want)


PARAMS = {"w": (3, 2), "b": (2,), "h": (4,)}


def params0() -> dict[str, torch.Tensor]:
    return {n: seeded(shape, i) for i, (n, shape) in enumerate(PARAMS.items())}


def grads(k: int, names: tuple[str, ...] = tuple(PARAMS)) -> dict[str, torch.Tensor]:
    return {n: seeded(PARAMS[n], 1000 * k + i) for i, n in enumerate(names)}


def base_options(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """lr, and weight decay where the optimizer has it (so that skipping a parameter matters)."""
    takes = inspect.signature(cls.__init__).parameters
    return {"lr": 0.01, **({"weight_decay": 0.01} if "weight_decay" in takes else {})}


def two_group_spec(optimizer: str = "Adam", **extra: Any) -> CreateSpec:
    p = params0()
    cls = getattr(torch.optim, optimizer, torch.optim.SGD)
    return CreateSpec(optimizer=optimizer, options=base_options(cls),
                      groups=[GroupSpec({"w": p["w"], "b": p["b"]}),
                              GroupSpec({"h": p["h"]}, {"lr": 0.03})], **extra)


def local_two_group(cls: type[torch.optim.Optimizer] = torch.optim.Adam
                    ) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    p = {n: t.clone() for n, t in params0().items()}
    opt = cls([{"params": [("w", p["w"]), ("b", p["b"])]},
               {"params": [("h", p["h"])], "lr": 0.03}], **base_options(cls))
    return p, opt


def torch_step(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor],
               g: dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.grad = g[n].clone() if n in g else None
    opt.step()


def test_ready_and_device(engine: Front) -> None:
    assert run(engine.status()).ready and engine.device == "cpu"


def test_create_describe_list_delete(engine: Front) -> None:
    desc = run(engine.create(two_group_spec(id="one")))
    assert desc.id == "one" and desc.optimizer == "Adam" and desc.device == "cpu"
    assert (desc.version, desc.step, desc.lr) == (0, 0, [0.01, 0.03])
    assert [g["params"] for g in desc.param_groups] == [["w", "b"], ["h"]]
    assert desc.param_groups[1]["weight_decay"] == 0.01
    assert desc.params["w"] == {"dtype": "float32", "shape": [3, 2]}
    assert desc.nonfinite == "reject" and desc.scheduler is None
    other = run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(1)})])))
    assert len(other.id) == 32  # a generated id
    assert run(engine.describe("one")) == desc
    assert {d.id for d in run(engine.list_sessions())} == {"one", other.id}
    run(engine.delete("one"))
    with pytest.raises(NotFound):
        run(engine.describe("one"))
    with pytest.raises(NotFound):
        run(engine.delete("one"))
    assert [d.id for d in run(engine.list_sessions())] == [other.id]


def test_create_copies_the_callers_tensors(engine: Front) -> None:
    x = torch.ones(3)
    sid = run(engine.create(CreateSpec("SGD", [GroupSpec({"x": x})], {"lr": 1.0}))).id
    x.fill_(7.0)
    result = run(engine.step(sid, {"x": torch.ones(3)}, return_params=True))
    assert result.params is not None and result.params["x"].tolist() == [0.0, 0.0, 0.0]
    result.params["x"].fill_(5.0)  # a snapshot: changing it changes nothing
    assert run(engine.pull(sid, None)).params["x"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "NAdam",
                                       "RAdam", "Adamax", "ASGD", "Rprop", "Adadelta"])
def test_steps_match_torch(engine: Front, optimizer: str) -> None:
    sid = run(engine.create(two_group_spec(optimizer))).id
    local, opt = local_two_group(getattr(torch.optim, optimizer))
    plan: list[tuple[str, ...]] = [("w", "b", "h"), ("w",), ("b", "h"), ("w", "b", "h")]
    for k, names in enumerate(plan, start=1):
        g = grads(k, names)
        result = run(engine.step(sid, g, return_params=True))
        torch_step(opt, local, g)
        assert (result.version, result.step, result.skipped) == (k, k, False)
        assert result.lr == [0.01, 0.03]
        assert result.params is not None
        for n in PARAMS:
            assert_bitwise(result.params[n], local[n], f"{optimizer} step {k} {n}")
    assert_tree_bitwise(run(engine.export_state(sid)).state_dict, opt.state_dict())


def test_push_accumulates_and_zero_grad_clears(engine: Front) -> None:
    sid = run(engine.create(two_group_spec("SGD"))).id
    local, opt = local_two_group(torch.optim.SGD)
    g1, g2, g3 = grads(1), grads(2, ("w",)), grads(3, ("w", "h"))
    pushed = run(engine.push(sid, g1)).to_json()
    assert pushed == {"version": 0, "step": 0, "accumulated": ["b", "h", "w"]}
    run(engine.push(sid, g2))
    result = run(engine.step(sid, g3, return_params=True))
    torch_step(opt, local, {"w": g1["w"] + g2["w"] + g3["w"], "b": g1["b"],
                            "h": g1["h"] + g3["h"]})
    assert result.params is not None
    for n in PARAMS:
        assert_bitwise(result.params[n], local[n], n)
    run(engine.push(sid, grads(4)))
    assert run(engine.zero_grad(sid)).to_json() == {"version": 1, "step": 1, "accumulated": []}
    result = run(engine.step(sid, {}, return_params=False))
    assert result.params is None and (result.version, result.step) == (2, 2)
    torch_step(opt, local, {})
    pulled = run(engine.pull(sid, None)).params
    for n in PARAMS:
        assert_bitwise(pulled[n], local[n], n)


def test_pushes_apply_in_submission_order(engine: Front) -> None:
    sid = run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(64)})],
                                       {"lr": 1.0}))).id
    parts = [seeded((64,), 500 + i) * 10.0 ** (i % 7) for i in range(24)]

    async def many() -> None:
        await asyncio.gather(*(engine.push(sid, {"x": p}) for p in parts))

    run(many())
    result = run(engine.step(sid, {}, return_params=True))
    total = parts[0].clone()
    for p in parts[1:]:
        total.add_(p)
    assert result.params is not None
    assert_bitwise(result.params["x"], -total)


def test_pull_and_overwrite(engine: Front) -> None:
    sid = run(engine.create(two_group_spec())).id
    pulled = run(engine.pull(sid, ["h", "w"]))
    assert list(pulled.params) == ["h", "w"] and (pulled.version, pulled.step) == (0, 0)
    assert_bitwise(pulled.params["h"], params0()["h"])
    new_b = torch.tensor([9.0, -9.0])
    out = run(engine.overwrite(sid, {"b": new_b}))
    assert list(out.params) == ["b"] and (out.version, out.step) == (1, 0)
    local, opt = local_two_group()
    with torch.no_grad():
        local["b"].copy_(new_b)
    g = grads(1)
    result = run(engine.step(sid, g, return_params=True))
    torch_step(opt, local, g)
    assert result.params is not None and result.version == 2
    for n in PARAMS:
        assert_bitwise(result.params[n], local[n], n)


def test_param_groups_add_and_update(engine: Front) -> None:
    sid = run(engine.create(CreateSpec("SGD", [GroupSpec({"w": params0()["w"]})],
                                       {"lr": 0.1, "momentum": 0.9}))).id
    w, c = params0()["w"].clone(), seeded((5,), 77)
    opt = torch.optim.SGD([("w", w)], lr=0.1, momentum=0.9)
    gw = grads(1, ("w",))["w"]
    run(engine.step(sid, {"w": gw}, return_params=False))
    w.grad = gw
    opt.step()
    desc = run(engine.add_param_group(sid, GroupSpec({"c": c.clone()}, {"lr": 0.02})))
    opt.add_param_group({"params": [("c", c)], "lr": 0.02})
    assert [g["params"] for g in desc.param_groups] == [["w"], ["c"]]
    desc = run(engine.update_param_group(sid, 0, {"lr": 0.05, "momentum": 0.3,
                                                  "nesterov": True}))
    opt.param_groups[0].update(lr=0.05, momentum=0.3, nesterov=True)
    assert desc.lr == [0.05, 0.02] and desc.param_groups[0]["nesterov"] is True
    for k in range(2, 4):
        gw, gc = seeded((3, 2), 10 * k), seeded((5,), 10 * k + 1)
        result = run(engine.step(sid, {"w": gw, "c": gc}, return_params=True))
        w.grad, c.grad = gw, gc
        opt.step()
        assert result.params is not None
        assert_bitwise(result.params["w"], w)
        assert_bitwise(result.params["c"], c)


def test_scheduler_steps_with_the_optimizer(engine: Front) -> None:
    spec = two_group_spec("SGD", scheduler={"name": "StepLR",
                                            "options": {"step_size": 2, "gamma": 0.5}})
    sid = run(engine.create(spec)).id
    local, opt = local_two_group(torch.optim.SGD)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k in range(1, 6):
        g = grads(k)
        result = run(engine.step(sid, g, return_params=True))
        torch_step(opt, local, g)
        sched.step()
        assert result.lr == [group["lr"] for group in opt.param_groups]
        assert result.params is not None
        for n in PARAMS:
            assert_bitwise(result.params[n], local[n], f"{k} {n}")
    exported = run(engine.export_state(sid)).state_dict
    assert exported["scheduler"] == sched.state_dict()


def test_manual_plateau_scheduler(engine: Front) -> None:
    spec = CreateSpec("SGD", [GroupSpec({"x": torch.ones(2)})], {"lr": 1.0},
                      scheduler={"name": "ReduceLROnPlateau",
                                 "options": {"patience": 0, "factor": 0.5}})
    sid = run(engine.create(spec)).id
    opt = torch.optim.SGD([torch.ones(2)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for metric in (3.0, 2.0, 2.5, 2.6, 1.0):
        out = run(engine.scheduler_step(sid, metric))
        sched.step(metric)
        assert out.lr == [opt.param_groups[0]["lr"]]
    with pytest.raises(Invalid) as info:
        run(engine.scheduler_step(sid, None))
    assert info.value.code == "missing_metric"


def test_export_loads_into_torch_and_continues(engine: Front) -> None:
    sid = run(engine.create(two_group_spec("Adam"))).id
    for k in range(1, 4):
        run(engine.step(sid, grads(k, ("w", "h") if k == 2 else tuple(PARAMS)),
                        return_params=False))
    exported = run(engine.export_state(sid))
    assert (exported.version, exported.step) == (3, 3)
    sd = exported.state_dict
    assert sd["param_groups"][0]["param_names"] == ["w", "b"]
    local = {n: t.clone() for n, t in run(engine.pull(sid, None)).params.items()}
    opt = torch.optim.Adam([{"params": [("w", local["w"]), ("b", local["b"])]},
                            {"params": [("h", local["h"])]}], lr=0.5)
    opt.load_state_dict(copy.deepcopy(sd))  # torch keeps references to what it loads
    for k in range(4, 7):
        g = grads(k)
        result = run(engine.step(sid, g, return_params=True))
        torch_step(opt, local, g)
        assert result.params is not None
        for n in PARAMS:
            assert_bitwise(result.params[n], local[n], f"{k} {n}")
    # the export was a copy: later steps did not change it
    assert sd["state"][0]["step"].item() == 3.0


def test_import_from_torch_continues(engine: Front) -> None:
    local, opt = local_two_group(torch.optim.Adam)
    for k in range(1, 4):
        torch_step(opt, local, grads(k))
    sid = run(engine.create(two_group_spec("Adam"))).id
    run(engine.overwrite(sid, {n: t.detach().clone() for n, t in local.items()}))
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["param_names"]  # a plain torch state dict without names loads too
    # torch's load_state_dict keeps references to tensors of the right dtype/device: give the
    # engine its own copy so that the local optimizer and the session do not share state
    desc = run(engine.import_state(sid, copy.deepcopy(sd)))
    assert desc.version == 2 and [g["params"] for g in desc.param_groups] == [
        ["w", "b"], ["h"]]
    assert_tree_bitwise(run(engine.export_state(sid)).state_dict["state"],
                        opt.state_dict()["state"])
    for k in range(4, 6):
        g = grads(k)
        result = run(engine.step(sid, g, return_params=True))
        torch_step(opt, local, g)
        assert result.params is not None
        for n in PARAMS:
            assert_bitwise(result.params[n], local[n], f"{k} {n}")


def test_nonfinite_policies(engine: Front) -> None:
    bad = {"b": torch.tensor([1.0, float("nan")])}
    sid = run(engine.create(two_group_spec())).id
    with pytest.raises(Invalid) as info:
        run(engine.step(sid, bad, return_params=False))
    assert info.value.code == "nonfinite_gradient" and info.value.field == "grads.b"
    with pytest.raises(Invalid):
        run(engine.push(sid, bad))
    assert run(engine.describe(sid)).accumulated == []
    skip = run(engine.create(two_group_spec(nonfinite="skip"))).id
    result = run(engine.step(skip, {**grads(1, ("w",)), **bad}, return_params=True))
    assert (result.skipped, result.nonfinite, result.version, result.step) == (True, ["b"], 0, 0)
    assert result.params is not None
    for n, t in params0().items():
        assert_bitwise(result.params[n], t, n)
    assert run(engine.export_state(skip)).state_dict["state"] == {}
    default_skip = embedded_engine("cpu", default_nonfinite="skip")
    run(default_skip.start())
    try:
        assert run(default_skip.create(two_group_spec())).nonfinite == "skip"
    finally:
        run(default_skip.stop())


def test_refusals_leave_the_session_unchanged(engine: Front) -> None:
    sid = run(engine.create(two_group_spec("Adam", id="keep"))).id
    run(engine.step(sid, grads(1), return_params=False))
    run(engine.push(sid, grads(2, ("w",))))
    before = run(engine.export_state(sid))
    desc = run(engine.describe(sid))
    params = run(engine.pull(sid, None)).params
    refusals: list[tuple[type[Exception], Coroutine[Any, Any, Any]]] = [
        (Conflict, engine.create(two_group_spec("SGD", id="keep"))),
        (Invalid, engine.create(two_group_spec("Nope"))),
        (Invalid, engine.create(two_group_spec(id="bad id"))),
        (NotFound, engine.step("missing", {}, return_params=False)),
        (Invalid, engine.step(sid, {"w": torch.zeros(2, 3)}, return_params=False)),
        (Invalid, engine.step(sid, {"w": torch.zeros(3, 2, dtype=torch.float64)},
                              return_params=False)),
        (Invalid, engine.step(sid, {"zz": torch.zeros(1)}, return_params=False)),
        (Invalid, engine.step(sid, {"b": torch.zeros(2), "h": torch.full((4,), float("inf"))},
                              return_params=False)),
        (Invalid, engine.push(sid, {"b": torch.zeros(3)})),
        (Invalid, engine.pull(sid, ["w", "nope"])),
        (Invalid, engine.overwrite(sid, {})),
        (Invalid, engine.overwrite(sid, {"b": torch.tensor([1.0, float("nan")])})),
        (Invalid, engine.add_param_group(sid, GroupSpec({"w": torch.zeros(1)}))),
        (Invalid, engine.add_param_group(sid, GroupSpec({"c": torch.zeros(1)},
                                                        {"momentum": 0.9}))),
        (Invalid, engine.update_param_group(sid, 5, {"lr": 0.1})),
        (Invalid, engine.update_param_group(sid, 0, {"betas": [0.9, 1.5]})),
        (Invalid, engine.update_param_group(sid, 1, {"lr": -0.1})),
        (Invalid, engine.scheduler_step(sid, None)),
        (Invalid, engine.import_state(sid, {"state": {}, "param_groups": []})),
        (Invalid, engine.import_state(sid, {"state": {"0": {"step": torch.tensor(1.0)}},
                                            "param_groups": before.state_dict[
                                                "param_groups"]})),
    ]
    for error, coro in refusals:
        with pytest.raises(error):
            run(coro)
    assert run(engine.describe(sid)) == desc
    after = run(engine.export_state(sid))
    assert (after.version, after.step) == (before.version, before.step)
    assert_tree_bitwise(after.state_dict, before.state_dict)
    for n, t in run(engine.pull(sid, None)).params.items():
        assert_bitwise(t, params[n], n)
    # and the accumulator still holds grads(2, ("w",)): the next step applies it
    local, opt = local_two_group()
    torch_step(opt, local, grads(1))
    torch_step(opt, local, grads(2, ("w",)))
    result = run(engine.step(sid, {}, return_params=True))
    assert result.params is not None
    for n in PARAMS:
        assert_bitwise(result.params[n], local[n], n)


@pytest.mark.parametrize("n,where", [(100_000, "inline"), (300_000, "worker")])
def test_steps_of_sessions_up_to_a_megabyte_run_inline(engine: Front, n: int, where: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of a session of at most 1 MB of parameters (``INLINE_BYTES``) runs on the event
    loop's thread when the device worker is idle (a 1e5 Adam step: its hop to the worker and
    back cost 12% of the round trip, CHANGELOG); a larger one on the worker. Both equal
    torch."""
    from app.engine.ops import gradients

    threads: list[str] = []
    apply = gradients.Step.apply

    def spy(self: Any, s: Any, plan: Any) -> Any:
        threads.append(threading.current_thread().name)
        return apply(self, s, plan)
    monkeypatch.setattr(gradients.Step, "apply", spy)
    p0, g = seeded((n,), 1), seeded((n,), 2)
    run(engine.create(CreateSpec("Adam", [GroupSpec({"w": p0.clone()}, {})],
                                 options={"lr": 0.01}, id="s")))
    result = run(engine.step("s", {"w": g}, return_params=True))
    local = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([local], lr=0.01)
    local.grad = g
    opt.step()
    assert result.params is not None
    assert_bitwise(result.params["w"], local.detach())
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop here
    assert threads == [loop_thread if where == "inline" else "optserve-cpu"]


@pytest.mark.parametrize("n,where", [(1_000, "inline"), (300_000, "worker")])
def test_a_logged_small_step_checks_and_applies_inline_and_survives_a_restart(
        tmp_path: Any, n: int, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability ``step``: a small session's step is checked and applied on the event loop's
    thread (its record is written and fsynced on I/O threads, as before), a large one's on the
    worker; both are answered only once durable, equal torch, and are what a restart
    restores."""
    from app.engine.ops import gradients

    threads: list[tuple[str, str]] = []
    check, apply = gradients.Step.check, gradients.Step.apply

    def spy_check(self: Any, s: Any) -> Any:
        threads.append(("check", threading.current_thread().name))
        return check(self, s)

    def spy_apply(self: Any, s: Any, plan: Any) -> Any:
        threads.append(("apply", threading.current_thread().name))
        return apply(self, s, plan)
    monkeypatch.setattr(gradients.Step, "check", spy_check)
    monkeypatch.setattr(gradients.Step, "apply", spy_apply)
    p0, g = seeded((n,), 1), seeded((n,), 2)
    local = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([local], lr=0.01)
    local.grad = g
    opt.step()

    async def first_life() -> str:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
        await eng.start()
        try:
            await eng.create(CreateSpec("Adam", [GroupSpec({"w": p0.clone()}, {})],
                                        options={"lr": 0.01}, id="s"))
            result = await eng.step("s", {"w": g}, return_params=True)
            assert result.params is not None
            assert_bitwise(result.params["w"], local.detach())
        finally:
            await eng.stop(snapshot=False)  # what a crash leaves: the log to replay
        return threading.current_thread().name

    loop_thread = run(first_life())
    want = loop_thread if where == "inline" else "optserve-cpu"
    assert threads == [("check", want), ("apply", want)]

    async def second_life() -> Any:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
        await eng.start()
        try:
            return (await eng.pull("s", None)).params
        finally:
            await eng.stop()

    assert_bitwise(run(second_life())["w"], local.detach())


@pytest.mark.parametrize("optimizer", ["NAdam", "ASGD"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_snapshot_restores_the_state_in_its_own_dtypes(
        tmp_path: Any, optimizer: str, dtype: torch.dtype) -> None:
    """NAdam keeps ``mu_product`` (ASGD ``eta`` and ``mu``) in float32 whatever its
    parameters' dtype; torch's ``load_state_dict`` would cast them to the parameters' dtype.
    A session restored from its snapshot keeps them as they were, and goes on bitwise as a
    torch run that never stopped."""
    options = {"lr": 0.01, **({"t0": 2.0} if optimizer == "ASGD" else {})}
    p0 = seeded((5,), 1, dtype)
    local = p0.clone()
    opt = getattr(torch.optim, optimizer)([local], **options)

    def torch_steps(ks: range) -> None:
        for k in ks:
            local.grad = seeded((5,), 10 + k, dtype)
            opt.step()

    async def life(ks: range, create: bool) -> Any:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
        await eng.start()
        try:
            if create:
                await eng.create(CreateSpec(optimizer, [GroupSpec({"w": p0.clone()}, {})],
                                            options=options, id="s"))
            for k in ks:
                await eng.step("s", {"w": seeded((5,), 10 + k, dtype)}, return_params=False)
            return (await eng.pull("s", None)).params, (await eng.export_state("s")).state_dict
        finally:
            await eng.stop()  # a graceful stop: the next life starts from the snapshot

    run(life(range(3), True))
    torch_steps(range(3))
    params, state = run(life(range(3, 6), False))
    torch_steps(range(3, 6))
    assert_bitwise(params["w"], local)
    assert_tree_bitwise(state["state"][0], opt.state_dict()["state"][0])


def test_records_logged_before_the_nonfinite_parameter_checks_still_replay() -> None:
    """A create and an added group with a NaN parameter under ``nonfinite: reject`` are now
    refused on requests; records logged before (their trees: no ``request`` flag, and a
    create's record never checks) still build and apply, so a session the server used to
    restore still restores."""
    from app.engine.ops import AddParamGroup, CreateSession, decode

    nan = torch.tensor([1.0, float("nan")])
    with pytest.raises(Invalid) as caught:
        CreateSession.from_spec(CreateSpec("SGD", [GroupSpec({"w": nan})], {"lr": 0.1}),
                                "s", "reject", "memory")
    assert caught.value.code == "nonfinite_parameter"
    old = CreateSession("s", "SGD", [GroupSpec({"w": torch.ones(2)})], {"lr": 0.1})
    tree = old.to_tree()
    tree["groups"][0]["params"] = {"w": nan.clone()}
    s = decode("create", tree).build(torch.device("cpu"))  # type: ignore[attr-defined]
    assert torch.isnan(s.params["w"]).any()
    logged = decode("add_group", {"params": {"v": nan.clone()}, "options": {}})
    assert isinstance(logged, AddParamGroup) and not logged.request
    logged.apply(s, logged.check(s))
    assert "v" in s.params
    with pytest.raises(Invalid) as caught:
        AddParamGroup({"u": nan.clone()}, {}, request=True).check(s)
    assert caught.value.code == "nonfinite_parameter"
    assert caught.value.field == "param_groups.2.params.u"


def test_records_logged_before_the_nonfinite_option_checks_still_replay() -> None:
    """Non-finite options (and scheduler-kept group keys out of range) are now refused on
    requests: a create's ``from_spec``, and the ``request`` flag of ``add_group``,
    ``update_group``, ``step`` and ``import``. Records logged before (their trees: no flag, and
    a create's record never checks) still build and apply as they ran, so a session the server
    used to restore still restores; the same operations as requests are refused."""
    from app.engine.ops import CreateSession, decode
    from app.engine.state_dicts import jsonable_options

    inf = {"$float": "inf"}
    spec = CreateSpec("SGD", [GroupSpec({"w": torch.ones(2)})], {"lr": inf},
                      scheduler={"name": "StepLR", "options": {"step_size": 1,
                                                               "gamma": {"$float": "nan"}}})
    with pytest.raises(Invalid) as caught:
        CreateSession.from_spec(spec, "s", "reject", "memory")
    assert (caught.value.code, caught.value.field) == ("invalid_option", "options.lr")
    spec.options = {"lr": 0.1}
    with pytest.raises(Invalid) as caught:
        CreateSession.from_spec(spec, "s", "reject", "memory")
    assert (caught.value.code, caught.value.field) == ("invalid_option",
                                                       "scheduler.options.gamma")
    # an old create record: taken as it was
    old = CreateSession("s", "SGD", [GroupSpec({"w": torch.ones(2)})], {"lr": 0.1},
                        {"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}})
    tree = old.to_tree()
    tree["options"] = {"lr": inf, "momentum": inf}
    s = decode("create", tree).build(torch.device("cpu"))  # type: ignore[attr-defined]
    assert s.optimizer.param_groups[0]["lr"] == math.inf
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("update_group", {"index": 0, "options": {"lr": 0.1, "weight_decay": inf}},
         "param_groups.0.weight_decay"),
        ("update_group", {"index": 0, "options": {"initial_lr": -5}},
         "param_groups.0.initial_lr"),
        ("step", {"grads": {"w": torch.ones(2)}, "options": {"0": {"momentum": 0.5,
                                                                  "dampening": inf}}},
         "param_groups.0.dampening"),
        ("add_group", {"params": {"v": torch.ones(3)}, "options": {"lr": inf}},
         "param_groups.1.lr"),
    ]
    for kind, tree, fld in cases:
        logged = decode(kind, copy.deepcopy(tree))
        assert not logged.request  # type: ignore[attr-defined]
        # the flag is in the tree a Ray host receives
        assert decode(kind, {**copy.deepcopy(tree), "request": True}).to_tree()["request"]
        with pytest.raises(Invalid) as caught:
            decode(kind, {**copy.deepcopy(tree), "request": True}).check(s)
        assert (caught.value.code, caught.value.field) == ("invalid_option", fld), kind
        logged.apply(s, logged.check(s))
    group = s.optimizer.param_groups[0]
    assert (group["weight_decay"], group["initial_lr"], group["dampening"]) == (
        math.inf, -5, math.inf)
    assert s.optimizer.param_groups[1]["lr"] == math.inf and s.step_count == 1
    # an import whose scheduler state holds a NaN gamma (no per-parameter state: the step
    # with an infinite lr made its momentum buffer infinite)
    assert s.scheduler is not None
    sd: dict[str, Any] = {"state": {}, "param_groups": [
        {**jsonable_options({k: v for k, v in g.items() if k not in ("params", "param_names")}),
         "params": [i]} for i, g in enumerate(s.optimizer.param_groups)],
        "scheduler": {**s.scheduler.state_dict(), "gamma": math.nan}}
    with pytest.raises(Invalid) as caught:
        decode("import", {"state": copy.deepcopy(sd), "request": True}).check(s)
    assert (caught.value.code, caught.value.field) == ("invalid_state",
                                                       "state_dict.scheduler.gamma")
    logged = decode("import", {"state": sd})
    logged.apply(s, logged.check(s))
    assert math.isnan(s.scheduler.state_dict()["gamma"])


def test_a_touched_steps_table_entry_keeps_a_bounded_number_of_rows() -> None:
    """A ``?return=touched`` step onto accumulated row-sparse gradients keeps, in its
    idempotency table entry, the rows it touched of them (a retry's gradients cannot tell).
    Every step of ``Client.step`` carries a key, and the table holds the last
    ``idempotency_window`` (1,000) entries, in memory and in every snapshot: past
    ``TOUCHED_ROWS_KEPT`` rows in all, a parameter is kept as whole (its retry answers the
    whole parameter, a superset of the first answer), not 50,000 rows (533 KB) an entry."""
    from app.engine import sparse

    def coo(rows: list[int], n: int = 100_000) -> torch.Tensor:
        idx = torch.tensor([rows])
        return torch.sparse_coo_tensor(idx, torch.ones(len(rows), 2), (n, 2),
                                       check_invariants=False)

    budget = sparse.TOUCHED_ROWS_KEPT
    small, big = coo([3, 1, 3]), coo(list(range(budget + 1)))
    kept = sparse.touched_rows({"a": small, "d": torch.ones(4, 2), "e": big, "x": small},
                               ["a", "d", "e"])
    assert set(kept) == {"a", "d", "e"} and kept["d"] is None and kept["e"] is None
    assert kept["a"] is not None and len(kept["a"]) <= 24  # rows 1 and 3
    # the budget is the entry's: a second parameter that fits alone may not fit after the first
    half = coo(list(range(budget // 2 + 1)))
    kept = sparse.touched_rows({"a": half, "b": half}, ["a", "b"])
    assert kept["a"] is not None and kept["b"] is None
    assert sum(len(v or "") for v in kept.values()) < 12 * budget


@pytest.mark.parametrize("names", [("$float", "b"), ("$tensor", "b"), ("$sparse", "b"),
                                   ("$dict", "b"), ("dtype", "shape", "data")])
def test_parameters_named_like_the_files_tags_survive_a_restart(
        tmp_path: Any, names: tuple[str, ...]) -> None:
    """Parameter names are keys of dicts in log records (gradients, accumulators) and
    snapshots (parameters, the touched rows of a step's idempotency entry). A dict whose keys
    are those of a tag of the files' tree form (``{"$float": ...}``, ``{"$tensor": ...}``, a
    JSON tensor's ``dtype``/``shape``/``data``) was read back as that tag: the session was
    refused at the next start, every acknowledged operation of it lost. Here a push of one
    of them, a keyed ``?return=touched`` step onto it and a step of it alone, replayed from
    the log (a crash) and from snapshots: equal to torch, the retry answered."""
    from app.engine.interface import IdemKey

    first = names[0]
    p0 = {n: seeded((5, 2), i) for i, n in enumerate(names)}
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.SGD(list(local.values()), lr=0.1)

    def coo(rows: list[int], seed: int) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.tensor([rows]), seeded((len(rows), 2), seed),
                                       (5, 2), check_invariants=False)
    pushed, rest = coo([3, 1], 10), {n: seeded((5, 2), 20 + i) for i, n in enumerate(names[1:])}
    alone = seeded((5, 2), 30)
    for grads in ({first: pushed, **rest}, {first: alone}):
        for n, p in local.items():
            p.grad = grads.get(n)
        opt.step()
        opt.zero_grad(set_to_none=True)
    key = IdemKey("touched-1", "fp")

    async def life(every: int, first_life: bool) -> None:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path / str(every),
                              durability="step", snapshot_every_steps=every)
        await eng.start()
        try:
            if first_life:
                await eng.create(CreateSpec("SGD", [GroupSpec({n: t.clone()
                                                               for n, t in p0.items()})],
                                            options={"lr": 0.1}, id="s"))
                await eng.push("s", {first: pushed.clone()})
                await eng.step("s", {n: t.clone() for n, t in rest.items()},
                               return_params="touched", idem=key)
                await eng.step("s", {first: alone.clone()}, return_params=False)
                return
            assert await eng.refused() == {}
            got = await eng.pull("s", None)
            assert got.version == 2
            for n in names:
                assert_bitwise(got.params[n], local[n].detach(), n)
            again = await eng.step("s", {n: t.clone() for n, t in rest.items()},
                                   return_params="touched", idem=key)
            assert again.replayed and again.params is not None
            assert sorted(again.params) == sorted(names)
            assert again.params[first]._indices().tolist() == [[1, 3]]
        finally:
            await eng.stop(snapshot=False)  # what a crash leaves

    for every in (1000, 1):  # replayed from the log; restored from a snapshot
        run(life(every, True))
        run(life(every, False))


def test_a_creates_checks_of_every_parameter_run_off_the_event_loop(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create's checks of its parameters' values (finite, ...) and its log record's
    encoding ran on the event loop: a create of 300,000 parameters held it 3.7 s, every other
    request waiting (a ``/healthz`` beside it). They run on the device worker and an I/O
    thread now, and the session made steps as torch does."""
    from app.engine import persist
    from app.engine.ops import lifecycle

    where: dict[str, bool] = {}
    from_spec, encode = lifecycle.CreateSession.from_spec, persist.encode_record_parts

    def on_loop() -> bool:
        return asyncio._get_running_loop() is not None

    def spy_spec(*args: Any, **kwargs: Any) -> Any:
        where["checks"] = on_loop()
        return from_spec(*args, **kwargs)

    def spy_encode(record: Any) -> Any:
        if record.op.kind == "create":
            where["record"] = on_loop()
        return encode(record)
    monkeypatch.setattr(lifecycle.CreateSession, "from_spec", staticmethod(spy_spec))
    monkeypatch.setattr(persist, "encode_record_parts", spy_encode)
    eng = embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)
    params = {f"p{i}": seeded((3,), i) for i in range(50)}
    grads = {n: seeded((3,), 100 + i) for i, n in enumerate(params)}

    async def main() -> Any:
        await eng.start()
        try:
            await eng.create(CreateSpec("Adam", [GroupSpec({n: p.clone()
                                                            for n, p in params.items()}, {})],
                                        options={"lr": 0.01}, id="s"))
            return await eng.step("s", grads, return_params=True)
        finally:
            await eng.stop()
    result = asyncio.run(main())
    assert where == {"checks": False, "record": False}
    local = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.01)
    for n, p in local.items():
        p.grad = grads[n]
    opt.step()
    for n, p in local.items():
        assert_bitwise(result.params[n], p.detach())


def test_a_state_key_in_another_form_is_refused_and_older_records_still_replay(
        tmp_path: Path) -> None:
    """A requested import's state key is taken only as an export writes it: ``"00"`` (taken
    as parameter 0) is a 422 ``state_mismatch`` naming ``state_dict.state.00``, nothing
    imported. An import an older server took with it (straight to the host, logged) replays
    after a crash as it ran: ``"00"`` is parameter 0's state, so the next step is torch's
    Adam from its own state (it would start that state afresh were the key dropped)."""
    async def go() -> None:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)
        await eng.start()
        sid = (await eng.create(two_group_spec())).id
        await eng.step(sid, grads(1), return_params=False)
        exported = (await eng.export_state(sid)).state_dict
        states = exported["state"]
        state = {"state": {("00" if pid == 0 else str(pid)): entry
                           for pid, entry in states.items()},
                 "param_groups": exported["param_groups"]}
        before = await eng.describe(sid)
        with pytest.raises(Invalid) as caught:
            await eng.import_state(sid, copy.deepcopy(state))
        assert (caught.value.code, caught.value.field) == ("state_mismatch",
                                                           "state_dict.state.00")
        assert (await eng.describe(sid)).revision == before.revision
        host, key = await eng._host("default", sid)
        await host.execute(key, ImportState(copy.deepcopy(state), request=True))
        await eng.stop(snapshot=False)  # a crash: the log replays
        again = embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)
        await again.start()
        try:
            got = await again.step(sid, grads(2), return_params=True)
        finally:
            await again.stop()
        p, opt = local_two_group()
        torch_step(opt, p, grads(1))
        torch_step(opt, p, grads(2))
        assert got.params is not None
        for n in p:
            assert_bitwise(got.params[n], p[n], n)
    asyncio.run(go())
