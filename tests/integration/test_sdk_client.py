"""The SDK's clients against a real server (uvicorn on 127.0.0.1, CPU): values, not statuses.

Every parameter coming back is compared bit for bit with an in-process ``torch.optim`` run.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import optserve
from optserve import _tensors

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def new_id() -> str:
    return f"sdk-{uuid.uuid4().hex[:12]}"


def assert_bits_equal(a: Any, b: Any) -> None:
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# --------------------------------------------------------------------------- the seed example
@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_seed_example(client: optserve.Client, binary: bool) -> None:
    """f(x) = 4x², x0 = 2, SGD lr = 1: x1 = 2 - 1*16 = -14, x2 = -14 - 1*(-112) = 98."""
    info = client.create_session("SGD", {"x": torch.tensor([2.0])}, options={"lr": 1},
                                 binary=binary)
    assert (info.optimizer, info.version, info.step, info.device) == ("SGD", 0, 0, "cpu")
    assert info.param_groups[0].params == ["x"] and info.params["x"].shape == (1,)
    x = torch.tensor([2.0])
    r1 = client.step(info.id, {"x": 8 * x}, binary=binary)
    assert r1.params is not None
    assert r1.params["x"].tolist() == [-14.0]
    assert (r1.version, r1.step, r1.lr, r1.skipped) == (1, 1, [1.0], False)
    r2 = client.step(info.id, {"x": 8 * r1.params["x"]}, binary=binary)
    assert r2.params is not None
    assert r2.params["x"].tolist() == [98.0]
    assert (r2.version, r2.step) == (2, 2)
    pulled = client.get_params(info.id, binary=binary)
    assert pulled.params["x"].tolist() == [98.0] and (pulled.version, pulled.step) == (2, 2)
    client.delete_session(info.id)


def test_seed_example_async(live_server: str) -> None:
    async def main() -> list[float]:
        async with optserve.AsyncClient(live_server) as c:
            assert (await c.health())["status"] == "ok"
            info = await c.create_session("SGD", {"x": torch.tensor([2.0])}, options={"lr": 1})
            xs = [2.0]
            for _ in range(2):
                r = await c.step(info.id, {"x": torch.tensor([8 * xs[-1]])})
                assert r.params is not None
                xs.append(r.params["x"].item())
            assert (await c.get_session(info.id)).version == 2
            await c.delete_session(info.id)
            with pytest.raises(optserve.NotFoundError):
                await c.get_session(info.id)
            return xs

    assert asyncio.run(main()) == [2.0, -14.0, 98.0]


def test_seed_example_with_numpy_and_no_torch_results(
    client: optserve.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_tensors, "USE_TORCH", False)
    info = client.create_session("SGD", {"x": np.array([2.0], dtype=np.float32)},
                                 options={"lr": 1})
    x = np.array([2.0], dtype=np.float32)
    for expected in (-14.0, 98.0):
        r = client.step(info.id, {"x": 8 * x})
        assert r.params is not None
        x = r.params["x"]
        assert isinstance(x, np.ndarray) and x.dtype == np.float32
        assert x.tolist() == [expected]


# --------------------------------------------------------------------------- service
def test_health_ready_and_catalogues(client: optserve.Client) -> None:
    assert client.health() == {"status": "ok"}
    assert client.ready()["status"] == "ready"
    optimizers = {o.name: o for o in client.list_optimizers()}
    assert {"SGD", "Adam", "AdamW"} <= optimizers.keys()
    assert optimizers["Adam"].defaults["betas"] == (0.9, 0.999)
    schedulers = {s.name: s for s in client.list_schedulers()}
    assert schedulers["StepLR"].required == ["step_size"]
    assert schedulers["ReduceLROnPlateau"].default_step_on == "manual"


# --------------------------------------------------------------------------- typed errors
def test_typed_errors(client: optserve.Client) -> None:
    with pytest.raises(optserve.NotFoundError) as nf:
        client.step("no-such-session", {"x": torch.zeros(1)})
    assert nf.value.status_code == 404 and nf.value.code == "session_not_found"

    sid = new_id()
    client.create_session("SGD", {"w": torch.zeros(2, 3)}, options={"lr": 0.1}, id=sid)
    with pytest.raises(optserve.ValidationError) as shape:
        client.step(sid, {"w": torch.zeros(3, 2)})
    err = shape.value
    assert err.status_code == 422 and err.field == "grads.w" and err.code == "shape_mismatch"
    assert "[2, 3]" in (err.detail or "")
    assert err.problem["type"] == "urn:optserve:problem:shape_mismatch"

    with pytest.raises(optserve.ValidationError) as dtype:
        client.step(sid, {"w": torch.zeros(2, 3, dtype=torch.float64)}, binary=False)
    assert dtype.value.field == "grads.w" and dtype.value.code == "dtype_mismatch"

    with pytest.raises(optserve.ValidationError) as unknown:
        client.step(sid, {"nope": torch.zeros(1)})
    assert unknown.value.field == "grads.nope"

    with pytest.raises(optserve.ConflictError) as conflict:
        client.create_session("SGD", {"w": torch.zeros(1)}, id=sid)
    assert conflict.value.status_code == 409 and conflict.value.field == "id"

    with pytest.raises(optserve.ValidationError) as bad_lr:
        client.create_session("SGD", {"w": torch.zeros(1)}, options={"lr": -1.0})
    assert bad_lr.value.field == "options.lr"
    assert "Invalid learning rate: -1.0" in (bad_lr.value.detail or "")

    with pytest.raises(optserve.ValidationError) as unknown_opt:
        client.create_session("NoSuchOpt", {"w": torch.zeros(1)})
    assert unknown_opt.value.field == "optimizer"

    # no such option: a TypeError too, as torch's constructor raises; other 422s are not
    with pytest.raises(TypeError) as local_kind:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, lrr=0.1)
    for call in (lambda: client.create_session("SGD", {"w": torch.zeros(1)},
                                               options={"lr": 0.1, "lrr": 0.1}),
                 lambda: client.update_param_group(sid, 0, lrr=0.1),
                 lambda: optserve.RemoteOptimizer([torch.zeros(1, requires_grad=True)], "SGD",
                                                  client, lr=0.1, lrr=0.1)):
        with pytest.raises(optserve.UnknownOptionError) as no_option:
            call()
        assert isinstance(no_option.value, TypeError) and isinstance(no_option.value,
                                                                     optserve.ValidationError)
        assert no_option.value.code == "unknown_option" and "lrr" in str(no_option.value)
        assert "lrr" in str(local_kind.value)
    assert not isinstance(bad_lr.value, TypeError) and not isinstance(shape.value, TypeError)

    # the refused requests changed nothing
    info = client.get_session(sid)
    assert (info.version, info.step) == (0, 0)
    assert client.get_params(sid).params["w"].abs().sum().item() == 0.0


# --------------------------------------------------------------------------- JSON == binary
def mixed_params(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"w32": torch.randn(5, 4, generator=g), "b32": torch.randn(4, generator=g)},
        {"w64": torch.randn(3, 3, generator=g, dtype=torch.float64)},
        {"w16": torch.randn(6, generator=g).to(torch.float16)},
        {"wbf": torch.randn(2, 5, generator=g).to(torch.bfloat16)},
    ]


def test_json_and_binary_give_identical_params(client: optserve.Client) -> None:
    groups = mixed_params()
    sessions = {
        binary: client.create_session(
            "Adam", param_groups=[{"params": g, "lr": 0.01 * (i + 1)}
                                  for i, g in enumerate(groups)],
            options={"betas": (0.8, 0.95), "weight_decay": 0.01}, binary=binary,
        ).id
        for binary in (True, False)
    }
    local_params = [{k: v.clone().requires_grad_() for k, v in g.items()} for g in groups]
    local = torch.optim.Adam([{"params": list(g.values()), "lr": 0.01 * (i + 1)}
                              for i, g in enumerate(local_params)],
                             betas=(0.8, 0.95), weight_decay=0.01)
    flat = {k: v for g in local_params for k, v in g.items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in flat.items()}
        results = {binary: client.step(sessions[binary], grads, binary=binary)
                   for binary in (True, False)}
        for k, v in flat.items():
            v.grad = grads[k].clone()
        local.step()
        for name, p in flat.items():
            got_bin, got_json = results[True].params, results[False].params
            assert got_bin is not None and got_json is not None
            assert_bits_equal(got_bin[name], got_json[name])
            assert_bits_equal(got_bin[name], p.detach())
    for binary in (True, False):
        pulled = client.get_params(sessions[binary], binary=not binary)
        for name, p in flat.items():
            assert_bits_equal(pulled.params[name], p.detach())


# --------------------------------------------------------------------------- accumulation
def test_push_grads_accumulate_and_zero_grad(client: optserve.Client) -> None:
    sid = client.create_session("SGD", {"w": torch.zeros(3)}, options={"lr": 0.5}).id
    v = client.push_grads(sid, {"w": torch.tensor([1.0, 2.0, 3.0])})
    assert (v.version, v.step) == (0, 0)
    client.push_grads(sid, {"w": torch.tensor([1.0, 1.0, 1.0])}, binary=False)
    assert client.get_session(sid).accumulated == ["w"]
    r = client.step(sid)  # no grads sent: the accumulated sum
    assert r.params is not None
    assert r.params["w"].tolist() == [-1.0, -1.5, -2.0]
    assert client.get_session(sid).accumulated == []
    client.push_grads(sid, {"w": torch.ones(3)})
    assert client.zero_grad(sid) == optserve.VersionInfo(1, 1)
    r = client.step(sid, {"w": torch.tensor([2.0, 0.0, 0.0])}, return_params=False)
    assert r.params is None and (r.version, r.step) == (2, 2)
    assert client.get_params(sid, names=["w"]).params["w"].tolist() == [-2.0, -1.5, -2.0]


def test_missing_grad_skips_the_parameter_like_torch(client: optserve.Client) -> None:
    sid = client.create_session("SGD", {"a": torch.ones(2), "b": torch.ones(2)},
                                options={"lr": 0.1, "momentum": 0.9}).id
    client.step(sid, {"a": torch.ones(2), "b": torch.ones(2)})
    r = client.step(sid, {"a": torch.ones(2)})
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    local = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    local.step()
    a.grad, b.grad = torch.ones(2), None
    local.step()
    assert r.params is not None
    assert_bits_equal(r.params["a"], a.detach())
    assert_bits_equal(r.params["b"], b.detach())


def test_nonfinite_policies(client: optserve.Client) -> None:
    bad = {"w": torch.tensor([math.nan, 1.0])}
    sid = client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 1.0}).id
    with pytest.raises(optserve.ValidationError) as info:
        client.step(sid, bad)
    assert info.value.code == "nonfinite_gradient" and info.value.field == "grads.w"
    skip = client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 1.0},
                                 nonfinite="skip").id
    r = client.step(skip, bad)
    assert r.skipped and r.nonfinite == ["w"] and r.step == 0
    assert r.params is not None and r.params["w"].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- params
def test_put_and_get_params(client: optserve.Client) -> None:
    sid = client.create_session("SGD", {"a": torch.zeros(2), "b": torch.zeros(3, 1)},
                                options={"lr": 0.1}).id
    put = client.put_params(sid, {"b": torch.tensor([[1.0], [2.0], [3.0]])})
    assert put.version == 1
    assert put.params["b"].tolist() == [[1.0], [2.0], [3.0]]
    only_b = client.get_params(sid, names=["b"], binary=False)
    assert list(only_b.params) == ["b"]
    assert only_b.params["b"].tolist() == [[1.0], [2.0], [3.0]]
    assert client.get_params(sid).params["a"].tolist() == [0.0, 0.0]
    with pytest.raises(optserve.ValidationError):
        client.put_params(sid, {"a": torch.zeros(2, dtype=torch.float64)})
    # names naming nothing pulled every parameter (an empty list) or sent ?names= (""), which
    # the server refuses: the client refuses both, before any request
    for empty in ([], iter(()), [""], ["a", ""]):
        with pytest.raises(ValueError, match="names|by name"):
            client.get_params(sid, names=empty)


# --------------------------------------------------------------------------- param groups
def test_add_and_update_param_groups_match_torch(client: optserve.Client) -> None:
    w = torch.tensor([1.0, -1.0])
    sid = client.create_session("SGD", [w], options={"lr": 0.1, "momentum": 0.5}).id
    info = client.add_param_group(sid, [torch.tensor([3.0])], lr=0.01)
    assert [g.params for g in info.param_groups] == [["0"], ["1"]]
    assert info.param_groups[1].options["momentum"] == 0.5
    info = client.update_param_group(sid, 0, lr=0.2, nesterov=True)
    assert info.param_groups[0].options["lr"] == 0.2
    assert info.param_groups[0].options["nesterov"] is True
    with pytest.raises(optserve.ValidationError):
        client.update_param_group(sid, 5, lr=0.1)

    p0, p1 = w.clone().requires_grad_(), torch.tensor([3.0], requires_grad=True)
    local = torch.optim.SGD([p0], lr=0.1, momentum=0.5)
    local.add_param_group({"params": [p1], "lr": 0.01})
    local.param_groups[0].update(lr=0.2, nesterov=True)
    for _ in range(3):
        r = client.step(sid, {"0": torch.tensor([0.5, 0.25]), "1": torch.tensor([1.0])})
        p0.grad, p1.grad = torch.tensor([0.5, 0.25]), torch.tensor([1.0])
        local.step()
    assert r.params is not None
    assert_bits_equal(r.params["0"], p0.detach())
    assert_bits_equal(r.params["1"], p1.detach())


# --------------------------------------------------------------------------- schedulers
def test_server_scheduler_lrs_match_torch(client: optserve.Client) -> None:
    sid = client.create_session(
        "SGD", {"w": torch.ones(2)}, options={"lr": 1.0},
        scheduler={"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}},
    ).id
    w = torch.ones(2, requires_grad=True)
    local = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(local, step_size=2, gamma=0.5)
    for _ in range(5):
        r = client.step(sid, {"w": torch.ones(2)})
        w.grad = torch.ones(2)
        local.step()
        sched.step()
        assert r.lr == [local.param_groups[0]["lr"]]
        assert r.params is not None
        assert_bits_equal(r.params["w"], w.detach())


def test_manual_scheduler_step(client: optserve.Client) -> None:
    sid = client.create_session(
        "SGD", {"w": torch.ones(1)}, options={"lr": 1.0},
        scheduler={"name": "ReduceLROnPlateau", "options": {"patience": 0, "factor": 0.5}},
    ).id
    assert client.scheduler_step(sid, metric=1.0).lr == [1.0]
    assert client.scheduler_step(sid, metric=2.0).lr == [0.5]
    # a loss gone NaN steps it as torch's own ReduceLROnPlateau does (a bad epoch)
    local = torch.optim.SGD([torch.ones(1)], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(local, patience=0, factor=0.5)
    for metric in (1.0, 2.0, float("nan"), float("-inf"), float("inf")):
        ref.step(metric)
        if not math.isfinite(metric):
            assert client.scheduler_step(sid, metric=metric).lr == ref.get_last_lr()
    with pytest.raises(optserve.ValidationError) as info:
        client.scheduler_step(sid)
    assert info.value.field == "metric"


# --------------------------------------------------------------------------- state dicts
def adam_session(client: optserve.Client, **kwargs: Any) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    sid = client.create_session("Adam", params, options={"lr": 0.05, "betas": (0.8, 0.9)},
                                **kwargs).id
    return sid, params


def grads_for(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


def test_export_formats_agree_and_load_into_local_torch(client: optserve.Client) -> None:
    sid, params = adam_session(client)
    for i in range(3):
        last = client.step(sid, grads_for(params, i))
    exported = {fmt: client.export_state(sid, format=fmt)  # type: ignore[arg-type]
                for fmt in ("safetensors", "json", "torch")}
    ref = exported["safetensors"]
    assert list(ref["state"]) == [0, 1]
    assert ref["param_groups"][0]["params"] == [0, 1]
    assert ref["param_groups"][0]["param_names"] == ["w", "b"]
    assert ref["param_groups"][0]["betas"] == (0.8, 0.9)
    for fmt in ("json", "torch"):
        other = exported[fmt]
        assert other["param_groups"] == ref["param_groups"], fmt
        for pid, entry in ref["state"].items():
            for key, value in entry.items():
                assert_bits_equal(other["state"][pid][key], value)
    # continue locally from the exported state: identical to continuing on the server
    assert last.params is not None
    local_params = [last.params["w"].clone().requires_grad_(),
                    last.params["b"].clone().requires_grad_()]
    local = torch.optim.Adam(local_params)
    local.load_state_dict(ref)
    for i in range(3, 6):
        g = grads_for(params, i)
        r = client.step(sid, g)
        local_params[0].grad, local_params[1].grad = g["w"], g["b"]
        local.step()
        assert r.params is not None
        assert_bits_equal(r.params["w"], local_params[0].detach())
        assert_bits_equal(r.params["b"], local_params[1].detach())


@pytest.mark.parametrize("fmt", ["safetensors", "json", "torch"])
def test_local_state_imports_and_continues(client: optserve.Client, fmt: str) -> None:
    g = torch.Generator().manual_seed(9)
    start = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
    local_params = {k: v.clone().requires_grad_() for k, v in start.items()}
    local = torch.optim.Adam(list(local_params.values()), lr=0.02, amsgrad=True)
    for i in range(2):
        for k, p in local_params.items():
            p.grad = grads_for(start, i)[k]
        local.step()
    sid = client.create_session(
        "Adam", {k: p.detach() for k, p in local_params.items()},
        options={"lr": 0.5, "amsgrad": True},
    ).id
    info = client.import_state(sid, local.state_dict(), format=fmt)  # type: ignore[arg-type]
    assert info.param_groups[0].options["lr"] == 0.02
    for i in range(2, 5):
        grads = grads_for(start, i)
        r = client.step(sid, grads)
        for k, p in local_params.items():
            p.grad = grads[k]
        local.step()
        assert r.params is not None
        for k, p in local_params.items():
            assert_bits_equal(r.params[k], p.detach())


def test_import_rejects_mismatched_state(client: optserve.Client) -> None:
    sid, _ = adam_session(client)
    p = torch.zeros(5, requires_grad=True)
    local = torch.optim.Adam([p, torch.zeros(3, requires_grad=True)])
    for q in local.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    local.step()
    with pytest.raises(optserve.ValidationError) as info:
        client.import_state(sid, local.state_dict())
    assert (info.value.field or "").startswith("state_dict.state.0")


def test_list_and_delete_sessions(client: optserve.Client) -> None:
    sid = client.create_session("SGD", {"w": torch.zeros(1)}, id=new_id()).id
    assert sid in {s.id for s in client.list_sessions()}
    client.delete_session(sid)
    assert sid not in {s.id for s in client.list_sessions()}
    with pytest.raises(optserve.NotFoundError):
        client.delete_session(sid)


def test_narrow_gradients_are_widened_on_request_and_params_narrowed(live_server: str) -> None:
    """bfloat16 gradients for float32 parameters: refused without ``upcast`` (no silent
    casts), with it the session equals a local run on the widened gradients, and
    ``params_dtype`` narrows only the answer."""
    import optserve

    p0 = torch.randn(64, generator=torch.Generator().manual_seed(3))
    grads = [torch.randn(64, generator=torch.Generator().manual_seed(k)).bfloat16()
             for k in range(3)]
    local = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([local], lr=1e-2)
    with optserve.Client(live_server, transport="http") as c:
        sid = c.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"p": p0}).id
        with pytest.raises(optserve.ValidationError) as info:
            c.step(sid, {"p": grads[0]})
        assert info.value.code == "dtype_mismatch" and "upcast" in (info.value.detail or "")
        for binary in (True, False):
            for g in grads:
                out = c.step(sid, {"p": g}, upcast=True, params_dtype="bfloat16",
                             binary=binary)
                local.grad = g.float()
                opt.step()
                assert out.params is not None and out.params["p"].dtype == torch.bfloat16
                assert torch.equal(out.params["p"], local.detach().bfloat16())
        master = c.get_params(sid).params["p"]
        assert master.dtype == torch.float32 and torch.equal(master, local.detach())
        # pushed narrow gradients are widened on request too, then stepped with the next one
        with pytest.raises(optserve.ValidationError) as info:
            c.push_grads(sid, {"p": grads[0]})
        assert info.value.code == "dtype_mismatch"
        for binary in (True, False):
            c.push_grads(sid, {"p": grads[1]}, upcast=True, binary=binary)
            out = c.step(sid, {"p": grads[2]}, upcast=True, binary=binary)
            local.grad = grads[1].float() + grads[2].float()
            opt.step()
            assert out.params is not None and torch.equal(out.params["p"], local.detach())
        c.delete_session(sid)


def test_large_binary_bodies_equal_torch_sync_and_async(live_server: str) -> None:
    """Bodies above 256 KB leave the synchronous client in pieces read from the tensors' own
    memory (the asynchronous one joins them when the call is made); over HTTP, both step a
    session of a float32 and a bfloat16 parameter exactly as torch does, by steps and by
    pushes then a step."""
    gen = torch.Generator().manual_seed(11)
    init = {"w": torch.randn(300_001, generator=gen),
            "b": torch.randn(70_000, generator=gen).to(torch.bfloat16)}
    grads = [{k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in init.items()}
             for _ in range(3)]
    local = {k: v.clone() for k, v in init.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.01)
    for g in grads:
        for k, p in local.items():
            p.grad = g[k].clone()
        opt.step()
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        sid = c.create_session("Adam", init, options={"lr": 0.01}).id
        for g in grads[:2]:
            got = c.step(sid, g).params
        c.push_grads(sid, grads[2])
        got = c.step(sid).params
        assert got is not None
        for k in init:
            assert_bits_equal(got[k], local[k])

    async def main() -> dict[str, torch.Tensor]:
        async with optserve.AsyncClient(live_server, max_retries=0) as ac:
            sid = (await ac.create_session("Adam", init, options={"lr": 0.01})).id
            for g in grads:
                out = (await ac.step(sid, g)).params
            assert out is not None
            return out

    got = asyncio.run(main())
    for k in init:
        assert_bits_equal(got[k], local[k])


def test_answers_read_into_one_kept_buffer_equal_torch(live_server: str) -> None:
    """``step(into=ReceiveBuffer())``: every large answer is read into the same memory, grown
    once for a larger one; each answer's values equal torch's, and (as documented) the
    previous result's parameters, which view the buffer, are overwritten by the next answers.
    Async too."""
    gen = torch.Generator().manual_seed(12)
    init = {"w": torch.randn(200_000, generator=gen)}
    grads = [{"w": torch.randn(200_000, generator=gen)} for _ in range(3)]
    expected = []
    local = init["w"].clone()
    opt = torch.optim.Adam([local], lr=0.01)
    for g in grads:
        local.grad = g["w"].clone()
        opt.step()
        expected.append(local.clone())
    small = optserve.ReceiveBuffer()
    small(1000)  # smaller than an answer: grown at the first one
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        sid = c.create_session("Adam", init, options={"lr": 0.01}).id
        firsts, buffers = [], set()
        for g, want in zip(grads, expected, strict=True):
            params = c.step(sid, g, into=small).params
            assert params is not None
            assert_bits_equal(params["w"], want)
            firsts.append(params["w"])
            buffers.add(_within(params["w"], small))
        assert len(buffers) == 1  # one buffer, kept
        # the first result views the buffer the later answers overwrote
        assert not torch.equal(firsts[0], expected[0])

    async def main() -> torch.Tensor:
        kept = optserve.ReceiveBuffer()
        async with optserve.AsyncClient(live_server, max_retries=0) as ac:
            sid = (await ac.create_session("Adam", init, options={"lr": 0.01})).id
            buffers = set()
            for g in grads:
                out = (await ac.step(sid, g, into=kept)).params
                assert out is not None
                buffers.add(_within(out["w"], kept))
            assert len(buffers) == 1
            return out["w"]

    assert_bits_equal(asyncio.run(main()), expected[-1])


def _within(t: torch.Tensor, kept: optserve.ReceiveBuffer) -> int:
    """The address of ``kept``'s buffer, after checking that ``t``'s bytes lie inside it."""
    buffer = kept._buffer
    assert buffer is not None
    start = buffer.ctypes.data
    assert start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + len(buffer)
    return int(start)
