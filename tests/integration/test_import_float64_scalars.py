"""A NAdam or ASGD checkpoint whose scalar state is float64 (``mu_product``; ``eta``, ``mu``;
and here ``ax`` too), as a local optimizer saves it under
``torch.set_default_dtype(torch.float64)`` with float32 parameters, imported into a session of
a server at the float32 default. torch's ``load_state_dict`` casts every state tensor but
``step`` to its parameter's dtype (float32) and keeps ``step`` as it is; the import was a 422
"tensor has dtype float64, expected float32 (no silent casts)". It now loads as torch loads
it, and the steps after it are bitwise those of a local torch optimizer (at the float32
default) that loaded the same state dict: through the raw ``PUT .../state_dict`` (JSON,
safetensors and a ``torch.save`` file) and the SDK's ``RemoteOptimizer.load_state_dict``."""

from __future__ import annotations

import copy
import io
from typing import Any

import httpx
import pytest
import torch

import optserve
from tests.integration import test_durability as durability
from tests.integration.test_cli import new_id

pytestmark = pytest.mark.integration

SHAPES = {"w": (4, 3), "b": (3,)}
OPTIONS: dict[str, dict[str, Any]] = {"NAdam": {"lr": 0.01},
                                      "ASGD": {"lr": 0.01, "t0": 1.0}}
BEFORE, AFTER = 3, 4


def grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def checkpoint(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The parameters and state dict of a local optimizer stepped :data:`BEFORE` times under
    the float64 default, with float32 parameters (its scalar state float64, as torch makes
    it there)."""
    g = torch.Generator().manual_seed(7)
    params = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    given = [grads(k) for k in range(BEFORE)]  # (float32, made before the default changes)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = getattr(torch.optim, name)(list(params.values()), **OPTIONS[name])
        for k in range(BEFORE):
            for n, p in params.items():
                p.grad = given[k][n]
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
    finally:
        torch.set_default_dtype(before)
    scalars = {"NAdam": ("mu_product",), "ASGD": ("eta", "mu")}[name]
    for entry in sd["state"].values():
        assert all(entry[k].dtype == torch.float64 for k in scalars)  # the case
        if name == "ASGD":  # (hand-made: torch keeps ax in the parameter's dtype)
            entry["ax"] = entry["ax"].double()
    return {n: p.detach().clone() for n, p in params.items()}, sd


class Local:
    """torch's own optimizer at the float32 default, loading the same state dict."""

    def __init__(self, name: str, params: dict[str, torch.Tensor], sd: dict[str, Any]) -> None:
        assert torch.get_default_dtype() == torch.float32
        self.params = {n: p.clone() for n, p in params.items()}
        self.opt = getattr(torch.optim, name)(list(self.params.values()), **OPTIONS[name])
        self.opt.load_state_dict(copy.deepcopy(sd))

    def step(self, g: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = g[n].clone()
        self.opt.step()


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (a.view(-1).view(torch.uint8) == b.view(-1).view(torch.uint8)).all())


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
@pytest.mark.parametrize("fmt", ["json", "safetensors", "torch"])
def test_the_raw_import_loads_as_torch_and_steps_as_torch(live_server: str, name: str,
                                                          fmt: str) -> None:
    params, sd = checkpoint(name)
    local = Local(name, params, sd)
    sid = new_id("f64imp")
    with optserve.Client(live_server, max_retries=0) as client:
        client.create_session(name, params, options=OPTIONS[name], id=sid)
        if fmt == "torch":  # (a torch.save file as a client sends it, by hand)
            f = io.BytesIO()
            torch.save(sd, f)
            r = httpx.put(f"{live_server}/v1/sessions/{sid}/state_dict?format=torch",
                          content=f.getvalue(),
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
            assert r.status_code == 200, r.text
        else:
            client.import_state(sid, sd, format=fmt)
        # the state as torch's load_state_dict left it: dtypes and values
        got = client.export_state(sid, format="torch")["state"]
        want = local.opt.state_dict()["state"]
        for i, entry in want.items():
            for key, value in entry.items():
                assert bitwise(got[i][key], value), (i, key, got[i][key], value)
        for k in range(BEFORE, BEFORE + AFTER):
            g = grads(k)
            r = client.step(sid, g)
            local.step(g)
            for n, p in local.params.items():
                assert bitwise(r.params[n], p.detach()), (k, n)
        got = client.export_state(sid, format="torch")["state"]
        for i, entry in local.opt.state_dict()["state"].items():
            for key, value in entry.items():
                assert bitwise(got[i][key], value), (i, key)
        client.delete_session(sid)


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_remote_optimizer_load_state_dict_steps_as_torch(live_server: str, name: str) -> None:
    params, sd = checkpoint(name)
    local = Local(name, params, sd)
    remote_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    with optserve.Client(live_server, max_retries=0) as client, \
            optserve.RemoteOptimizer(remote_params, name, client, **OPTIONS[name]) as remote:
        remote.load_state_dict(copy.deepcopy(sd))
        for k in range(BEFORE, BEFORE + AFTER):
            g = grads(k)
            for p, n in zip(remote_params, SHAPES, strict=True):
                p.grad = g[n].clone()
            remote.step()
            local.step(g)
            for p, n in zip(remote_params, SHAPES, strict=True):
                assert bitwise(p.detach(), local.params[n].detach()), (k, n)
        state = remote.state_dict()["state"]
        for i, entry in local.opt.state_dict()["state"].items():
            for key, value in entry.items():
                if key == "step":  # (the SDK sends a float64 count as float32: same count)
                    assert float(state[i][key]) == float(value)
                else:
                    assert bitwise(state[i][key], value), (i, key)


def test_a_value_the_cast_makes_infinite_is_refused_and_nothing_imported(
        live_server: str) -> None:
    """A float64 ``mu_product`` past float32's range is infinite in the parameter's dtype, as
    torch would load it: a session that rejects non-finite values refuses the import (422
    ``nonfinite_state`` naming it), and its state is as it was."""
    params, sd = checkpoint("NAdam")
    sd["state"][1]["mu_product"] = torch.tensor(1e300, dtype=torch.float64)
    assert torch.isinf(sd["state"][1]["mu_product"].float())
    sid = new_id("f64inf")
    with optserve.Client(live_server, max_retries=0) as client:
        client.create_session("NAdam", params, options=OPTIONS["NAdam"], id=sid)
        before = client.export_state(sid, format="torch")
        with pytest.raises(optserve.ValidationError) as refused:
            client.import_state(sid, sd, format="safetensors")
        assert (refused.value.code, refused.value.field) == (
            "nonfinite_state", "state_dict.state.1.mu_product"), refused.value
        assert client.export_state(sid, format="torch") == before
        client.delete_session(sid)


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_an_imported_float64_state_is_restored_after_kill9(tmp_path: Any, name: str) -> None:
    """The float64 ``step`` counts an import keeps (as torch's ``load_state_dict`` does) and the
    cast scalars are logged and restored as they were: after one step, a ``kill -9`` and a
    restart (``durability: step``), the state exports with the same dtypes and bits as torch's,
    and the next steps stay bitwise torch's."""
    params, sd = checkpoint(name)
    local = Local(name, params, sd)
    server = durability.Proc(tmp_path / "data").start()
    sid = new_id("f64kill")
    try:
        with optserve.Client(server.url, max_retries=0) as client:
            client.create_session(name, params, options=OPTIONS[name], id=sid)
            client.import_state(sid, sd, format="safetensors")
            g = grads(BEFORE)
            client.step(sid, g)
            local.step(g)
        server.kill9()
        server.start()
        with optserve.Client(server.url, max_retries=0) as client:
            got = client.export_state(sid, format="torch")["state"]
            for i, entry in local.opt.state_dict()["state"].items():
                assert set(got[i]) == set(entry), i
                for key, value in entry.items():
                    assert bitwise(got[i][key], value), (i, key, got[i][key], value)
            for k in range(BEFORE + 1, BEFORE + AFTER):
                g = grads(k)
                r = client.step(sid, g)
                local.step(g)
                for n, p in local.params.items():
                    assert bitwise(r.params[n], p.detach()), (k, n)
    finally:
        server.stop()
