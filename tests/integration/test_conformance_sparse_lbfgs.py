"""Conformance for the two optimizers that take no plain dense step: every LBFGS and SparseAdam
config in torch's own ``optim_db`` runs over HTTP (LBFGS through evaluations, SparseAdam with
row-sparse gradients) and gives bitwise the parameters of in-process ``torch.optim``; the
state travels both ways in JSON, safetensors and torch.save formats; the construction errors
``optim_db`` lists that have a wire form are 422s carrying torch's message."""

from __future__ import annotations

import copy
import re
from typing import Any

import httpx
import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from tests.integration.test_conformance import STATE_FORMATS, export, import_state, without_names
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    json_tensor,
    tensors_from_json,
    to_wire,
)

pytestmark = pytest.mark.integration

CLASSES = ("LBFGS", "SparseAdam")
STEPS, MORE = 3, 2


def _configs() -> tuple[list[Any], list[Any]]:
    configs, errors = [], []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in CLASSES:
            continue
        for i, oi in enumerate(info.optim_inputs_func("cpu", torch.float32)):
            configs.append(pytest.param(info.optim_cls, oi.kwargs, id=f"{name}-{i}-{oi.desc}"))
        for i, err in enumerate(info.optim_error_inputs_func("cpu", torch.float32)):
            oi = err.optimizer_error_input
            # only option errors have a wire form (the others are about the params argument
            # itself, which always travels as named dense tensors)
            if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR and oi.params is None \
                    and oi.kwargs and issubclass(err.error_type, Exception) \
                    and not issubclass(err.error_type, Warning):
                errors.append(pytest.param(info.optim_cls, err, id=f"{name}-err{i}-{oi.desc}"))
    return configs, errors


CONFIGS, ERRORS = _configs()


def test_inventory() -> None:
    assert {c.values[0].__name__ for c in CONFIGS} == set(CLASSES)
    assert len(CONFIGS) >= 9 and len(ERRORS) >= 3


def start(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(6, 3, generator=g), "bias": torch.randn(6, generator=g)}


def create(http: httpx.Client, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any],
           params: dict[str, torch.Tensor]) -> str:
    r = http.post("/v1/sessions", json={"optimizer": cls.__name__, "options": to_wire(kwargs),
                                        "params": {n: json_tensor(t) for n, t in
                                                   params.items()}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# ----------------------------------------------------------------------------- SparseAdam
def sparse_grads(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = torch.randint(0, 6, (5,), generator=g)  # duplicates
        out.append({name: torch.sparse_coo_tensor(
            rows.reshape(1, -1) if name == "weight" else rows[:2].reshape(1, -1),
            torch.randn(5, 3, generator=g) if name == "weight" else torch.randn(2, generator=g),
            shape, check_invariants=False) for name, shape in (("weight", (6, 3)),
                                                                ("bias", (6,)))})
    return out


def sparse_step(http: httpx.Client, sid: str, grads: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    body = {n: {"indices": g._indices()[0].tolist(), "values": json_tensor(g._values()),
                "shape": list(g.shape)} for n, g in grads.items()}
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": body})
    assert r.status_code == 200, r.text
    return tensors_from_json(r.json()["params"])


def local_step(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor],
               grads: dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.grad = grads[n]
    opt.step()
    for p in params.values():
        p.grad = None


# ----------------------------------------------------------------------------- LBFGS
X = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))
Y = torch.randn(16, 6, generator=torch.Generator().manual_seed(6))


def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((X @ p["weight"].T + p["bias"] - Y) ** 2).mean()


def lbfgs_step(http: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    r = http.post(f"/v1/sessions/{sid}/step")
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("needs") != "evaluation":
            return tensors_from_json(body["params"])
        leaves = {n: t.requires_grad_() for n, t in tensors_from_json(body["params"]).items()}
        loss = loss_of(leaves)
        loss.backward()
        r = http.post(f"/v1/sessions/{sid}/step/{body['evaluation']}", json={
            "loss": float(loss.detach()),
            "grads": {n: json_tensor(t.grad) for n, t in leaves.items() if t.grad is not None}})


def local_lbfgs(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> None:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(params)
        loss.backward()
        return loss
    opt.step(closure)  # type: ignore[no-untyped-call]


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_config(http: httpx.Client, cls: type[torch.optim.Optimizer],
                kwargs: dict[str, Any]) -> None:
    seed = sum(map(ord, f"{cls.__name__}{sorted(kwargs)}"))
    lbfgs = cls is torch.optim.LBFGS
    params0 = start(seed)

    def local_run(params: dict[str, torch.Tensor]) -> tuple[torch.optim.Optimizer,
                                                            dict[str, torch.Tensor]]:
        live = {n: t.clone().requires_grad_(lbfgs) for n, t in params.items()}
        return cls(list(live.values()), **copy.deepcopy(kwargs)), live

    ref_opt, ref = local_run(params0)
    grads = sparse_grads(seed, STEPS + MORE)

    def both_step(k: int, sid: str) -> dict[str, torch.Tensor]:
        return lbfgs_step(http, sid) if lbfgs else sparse_step(http, sid, grads[k])

    def ref_step(opt: torch.optim.Optimizer, live: dict[str, torch.Tensor], k: int) -> None:
        if lbfgs:
            local_lbfgs(opt, live)
        else:
            local_step(opt, live, grads[k])

    sid = create(http, cls, kwargs, params0)
    sessions = [sid]
    try:
        for k in range(STEPS):
            got = both_step(k, sid)
            ref_step(ref_opt, ref, k)
            assert_tensors_equal(got, {n: p.detach() for n, p in ref.items()}, f"step {k}")
        local_sd = copy.deepcopy(ref_opt.state_dict())
        snapshot = {n: p.detach().clone() for n, p in ref.items()}
        exports = {fmt: export(http, sid, fmt) for fmt in STATE_FORMATS}
        loaded = []
        for fmt, sd in exports.items():
            assert_trees_equal(without_names(sd), local_sd, f"export {fmt}")
            opt, live = local_run(snapshot)
            opt.load_state_dict(sd)
            loaded.append((fmt, opt, live))
        imported = []
        for fmt in STATE_FORMATS:
            new = create(http, cls, kwargs, snapshot)
            sessions.append(new)
            r = import_state(http, new, copy.deepcopy(local_sd), fmt)
            assert r.status_code == 200, f"{fmt}: {r.text}"
            imported.append((fmt, new))
        for k in range(STEPS, STEPS + MORE):
            got = both_step(k, sid)
            ref_step(ref_opt, ref, k)
            want = {n: p.detach() for n, p in ref.items()}
            assert_tensors_equal(got, want, f"step {k}")
            for fmt, opt, live in loaded:
                ref_step(opt, live, k)
                assert_tensors_equal({n: p.detach() for n, p in live.items()}, want,
                                     f"exported via {fmt}, step {k}")
            for fmt, new in imported:
                assert_tensors_equal(both_step(k, new), want, f"imported via {fmt}, step {k}")
    finally:
        for s in sessions:
            http.delete(f"/v1/sessions/{s}")


@pytest.mark.parametrize(("cls", "err"), ERRORS)
def test_construction_error(http: httpx.Client, cls: type[torch.optim.Optimizer],
                            err: Any) -> None:
    oi = err.optimizer_error_input
    with pytest.raises(err.error_type, match=err.error_regex):
        cls(list(start(0).values()), **oi.kwargs)
    r = http.post("/v1/sessions", json={"optimizer": cls.__name__, "options": to_wire(oi.kwargs),
                                        "params": {n: json_tensor(t) for n, t in
                                                   start(0).items()}})
    assert r.status_code == 422, r.text
    assert re.search(err.error_regex, r.json()["detail"]), r.json()
    assert r.json()["field"].startswith("options."), r.json()
