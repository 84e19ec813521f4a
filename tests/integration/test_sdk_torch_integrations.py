"""``RemoteOptimizer`` under the torch code real training loops wrap around an optimizer:
``GradScaler``, ``swa_utils``, every common ``lr_scheduler`` (with its checkpoints), hooks,
``zero_grad(set_to_none=False)``, options and state read or written through ``param_groups``
and ``state``, and a checkpoint resumed in another process. Each run is compared, bitwise,
with the same run on the local ``torch.optim`` optimizer (CPU, same torch build)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs

import optserve

pytestmark = pytest.mark.integration

Make = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def loss_at(model: nn.Module, i: int) -> torch.Tensor:
    x, y = data(i)
    return F.mse_loss(model(x), y)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def assert_same_state(local: torch.optim.Optimizer, remote: torch.optim.Optimizer) -> None:
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert [{k: v for k, v in g.items()} for g in local_sd["param_groups"]] == \
        remote_sd["param_groups"]
    assert local_sd["state"].keys() == remote_sd["state"].keys()
    for pid, entry in local_sd["state"].items():
        assert entry.keys() == remote_sd["state"][pid].keys(), pid
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(remote_sd["state"][pid][key]),
                               torch.as_tensor(value)), (pid, key)


def pair(client: optserve.Client, name: str, **options: Any
         ) -> tuple[nn.Sequential, torch.optim.Optimizer, nn.Sequential, optserve.RemoteOptimizer]:
    local_model, remote_model = mlp(), mlp()
    local = getattr(torch.optim, name)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), name, client, **options)
    return local_model, local, remote_model, remote


# --------------------------------------------------------------------------- GradScaler
def test_grad_scaler_with_a_skipped_inf_step(client: optserve.Client) -> None:
    """``torch.amp.GradScaler("cpu")``: scaled backward, ``unscale_`` then clipping, ``step``
    (skipped at the step whose gradients hold an infinity) and ``update``."""
    local_model, local, remote_model, remote = pair(client, "Adam", lr=1e-2)
    steps: dict[str, int] = {}
    for tag, model, opt in (("local", local_model, local), ("remote", remote_model, remote)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        count = 0

        def counted(*_: Any) -> None:
            nonlocal count
            count += 1
        opt.register_step_post_hook(counted)
        for i in range(8):
            opt.zero_grad()
            scaler.scale(loss_at(model, i)).backward()
            if i == 3:
                model[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        steps[tag] = count
        if tag == "local":
            local_scale = scaler.get_scale()
        else:
            assert scaler.get_scale() == local_scale
    assert steps == {"local": 7, "remote": 7}
    assert client.get_session(remote.session_id).step == 7
    assert_same_params(local_model, remote_model)
    assert_same_state(local, remote)


# --------------------------------------------------------------------------- swa_utils
def test_swa_averaged_model_and_swalr(client: optserve.Client) -> None:
    from torch.optim.swa_utils import SWALR, AveragedModel
    local_model, local, remote_model, remote = pair(client, "SGD", lr=0.05, momentum=0.9)
    averaged = []
    for model, opt in ((local_model, local), (remote_model, remote)):
        swa_model = AveragedModel(model)
        swa_sched = SWALR(opt, swa_lr=0.01, anneal_epochs=3, anneal_strategy="cos")
        for i in range(8):
            opt.zero_grad()
            loss_at(model, i).backward()
            opt.step()
            if i >= 3:
                swa_model.update_parameters(model)
                swa_sched.step()
        averaged.append(swa_model)
    assert_same_params(local_model, remote_model)
    assert_same_params(averaged[0], averaged[1])
    assert_same_state(local, remote)


# --------------------------------------------------------------------------- schedulers
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.95),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.02, total_steps=12),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3,
                                                                              T_mult=2),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=3),
            lrs.ExponentialLR(o, gamma=0.9)], milestones=[3]),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=4), lrs.ExponentialLR(o, gamma=0.9)]),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=8, power=2.0),
}


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
              steps: range) -> None:
    for i in steps:
        opt.zero_grad()
        loss = loss_at(model, i)
        loss.backward()
        opt.step()
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(float(i % 3))  # a metric that plateaus now and then
        else:
            sched.step()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_local_scheduler_and_checkpoint_resume(client: optserve.Client, name: str) -> None:
    """Every common scheduler, run locally over the remote optimizer, checkpointed (model,
    optimizer and scheduler state dicts through ``torch.save``) halfway and resumed into a
    new model, a new ``RemoteOptimizer`` and a new scheduler: equals one uninterrupted local
    run."""
    make = SCHEDULERS[name]
    options: dict[str, Any] = {"lr": 1e-2}
    optimizer = "SGD" if name == "CyclicLR" else "AdamW"
    if optimizer == "SGD":
        options["momentum"] = 0.9
    local_model, local, remote_model, remote = pair(client, optimizer, **options)
    local_sched = make(local)
    run_steps(local_model, local, local_sched, range(10))

    remote_sched = make(remote)
    run_steps(remote_model, remote, remote_sched, range(5))
    buf = io.BytesIO()
    torch.save({"model": remote_model.state_dict(), "opt": remote.state_dict(),
                "sched": remote_sched.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=False)
    resumed_model = mlp()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = optserve.RemoteOptimizer(resumed_model.parameters(), optimizer, client,
                                       **options)
    resumed_sched = make(resumed)
    resumed.load_state_dict(checkpoint["opt"])
    resumed_sched.load_state_dict(checkpoint["sched"])
    run_steps(resumed_model, resumed, resumed_sched, range(5, 10))
    assert_same_params(local_model, resumed_model)
    assert resumed_sched.state_dict() == local_sched.state_dict() or name in (
        "LambdaLR", "MultiplicativeLR")
    assert_same_state(local, resumed)


# --------------------------------------------------------------------------- the loop's edits
def test_zero_grad_set_to_none_false_and_true(client: optserve.Client) -> None:
    """Zeroed (not ``None``) gradients are stepped with as torch does (Adam moves a parameter
    whose gradient is zero); ``None`` ones are skipped."""
    local_model, local, remote_model, remote = pair(client, "Adam", lr=1e-2, weight_decay=0.1)
    for model, opt in ((local_model, local), (remote_model, remote)):
        for i in range(6):
            opt.zero_grad(set_to_none=i % 2 == 0)
            frozen = i in (2, 3)
            model[2].bias.requires_grad_(not frozen)  # type: ignore[union-attr]
            loss_at(model, i).backward()
            opt.step()
        model[2].bias.requires_grad_(True)  # type: ignore[union-attr]
    assert_same_params(local_model, remote_model)
    assert_same_state(local, remote)


def test_options_set_through_param_groups(client: optserve.Client) -> None:
    """``group["lr"] = ...`` and other options set by hand between steps (warm-up code,
    weight-decay schedules) take effect at the next step, as in torch."""
    local_model, local, remote_model, remote = pair(client, "AdamW", lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        for i in range(6):
            opt.zero_grad()
            loss_at(model, i).backward()
            opt.param_groups[0]["lr"] = 1e-3 * (i + 1)
            opt.param_groups[0]["weight_decay"] = 0.01 * i
            if i == 4:
                opt.param_groups[0]["betas"] = (0.8, 0.95)
            opt.step()
    assert_same_params(local_model, remote_model)
    assert_same_state(local, remote)


def test_state_is_readable_per_parameter(live_server: str) -> None:
    """``opt.state[p]["exp_avg"]`` (logging, debugging code; Lightning moving the state to a
    device) reads the session's state as it stands after the last step, fetched only when
    read (one request per step at most); after ``load_state_dict`` it is the loaded state.
    Copies of it stay local; an edit goes to the session only with the next step,
    ``state_dict()`` or ``add_param_group()`` (test_sdk_dropin_edges)."""
    log: list[str] = []
    hook = lambda r: log.append(f"{r.method} {r.url.path.rsplit('/', 1)[-1]}")  # noqa: E731
    with httpx.Client(event_hooks={"request": [hook]}) as http, \
            optserve.Client(live_server, http_client=http, transport="http") as client:
        local_model, local, remote_model, remote = pair(client, "Adam", lr=1e-2)
        assert len(remote.state) == 0 and not remote.state
        pairs = list(zip(local_model.parameters(), remote_model.parameters(), strict=True))
        for i in range(3):
            for model, opt in ((local_model, local), (remote_model, remote)):
                opt.zero_grad()
                loss_at(model, i).backward()
                opt.step()
            for p, q in pairs:
                assert q in remote.state
                assert remote.state[q].keys() == local.state[p].keys()
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(remote.state[q][key], local.state[p][key]), key
        assert log.count("GET state_dict") == 4  # the first read, then once after each step
        for _ in range(2):  # steps nobody reads the state of fetch nothing
            remote.zero_grad()
            loss_at(remote_model, 0).backward()
            remote.step()
        assert log.count("GET state_dict") == 4
        assert dict.__len__(remote.state) == 0  # the last fetched copy went with the step
        assert len(remote.state) == 4 and set(remote.state) == set(remote_model.parameters())
        assert [int(v["step"]) for v in remote.state.values()] == [5] * 4
        kept = copy.deepcopy(remote.state)
        assert type(kept) is defaultdict and len(kept) == 4
        for a, b in zip(kept.values(), remote.state.values(), strict=True):
            assert torch.equal(a["exp_avg"], b["exp_avg"])
        remote.state[pairs[0][1]]["exp_avg"] = torch.zeros(1)  # not sent: no step follows
        assert int(client.get_session(remote.session_id).step) == 5

        fresh = optserve.RemoteOptimizer(mlp().parameters(), "Adam", client, lr=1e-2)
        assert len(fresh.state) == 0
        fresh.load_state_dict(local.state_dict())
        for (p, _), q in zip(pairs, fresh.param_groups[0]["params"], strict=True):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(fresh.state[q][key], local.state[p][key]), key


def test_step_hooks_see_and_change_the_gradients(client: optserve.Client) -> None:
    """Pre-hooks run before the gradients are sent (a pre-hook that scales them changes the
    step), post-hooks after the new values are in the parameters; state-dict hooks too."""
    local_model, local, remote_model, remote = pair(client, "SGD", lr=0.1, momentum=0.9)
    seen: dict[str, list[Any]] = {"local": [], "remote": []}
    for tag, model, opt in (("local", local_model, local), ("remote", remote_model, remote)):
        def pre(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group in o.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)

        def post(o: torch.optim.Optimizer, args: Any, kwargs: Any, _tag: str = tag,
                 _model: nn.Module = model) -> None:
            seen[_tag].append(_model[0].weight.detach().clone())  # type: ignore[index]
        handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
        opt.register_state_dict_post_hook(
            lambda o, sd, _tag=tag: seen[_tag].append(len(sd["state"])))
        for i in range(4):
            opt.zero_grad()
            loss_at(model, i).backward()
            opt.step()
            if i == 2:
                for handle in handles:
                    handle.remove()
        opt.state_dict()
    assert len(seen["remote"]) == len(seen["local"]) == 4
    for a, b in zip(seen["local"], seen["remote"], strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert_same_params(local_model, remote_model)


def test_group_keys_and_state_dict_keys_torch_keeps_but_the_optimizer_has_no_option_for(
        client: optserve.Client) -> None:
    """Keys torch keeps in a param group that are no option of the optimizer (a group's
    ``"name"``, timm's layer-decay ``"lr_scale"`` read by a hand-written schedule, SWALR's
    ``swa_lr``), at construction, in ``add_param_group`` and in a loaded state dict, and a
    top-level key a state-dict post-hook adds to a checkpoint: the remote run equals torch's
    bit for bit, its state dict holds what torch's holds, and the checkpoint loads into a
    fresh optimizer that trains on as torch's does. Each was a 422 ``unknown_option`` (the
    server takes only the optimizer's options) or ``state_mismatch`` (a state dict holds
    state, param_groups and scheduler)."""
    def groups(model: nn.Sequential) -> list[dict[str, Any]]:
        return [{"params": model[0].parameters(), "name": "body", "lr_scale": 0.5}]

    def extra(model: nn.Sequential) -> dict[str, Any]:
        return {"params": model[2].parameters(), "name": "head", "lr_scale": 2.0,
                "weight_decay": 0.1}

    local_model, remote_model = mlp(), mlp()
    local = torch.optim.AdamW(groups(local_model), lr=1e-2)
    remote = optserve.RemoteOptimizer(groups(remote_model), "AdamW", client, lr=1e-2)
    pairs = ((local_model, local), (remote_model, remote))
    for model, opt in pairs:
        opt.add_param_group(extra(model))
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "saved_by": "my-trainer"})
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8)
        swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2)
        for i in range(3):
            opt.zero_grad()
            loss_at(model, i).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            for group in opt.param_groups:  # layer decay, as timm's schedulers apply it
                group["lr"] = group["lr"] * group["lr_scale"]
            opt.step()
            for group in opt.param_groups:
                group["lr"] = group["lr"] / group["lr_scale"]
            sched.step()
        swa.step()
    assert_same_params(local_model, remote_model)
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert local_sd["saved_by"] == remote_sd["saved_by"] == "my-trainer"
    assert remote_sd["param_groups"] == local_sd["param_groups"]
    assert [g["name"] for g in remote.param_groups] == ["body", "head"]
    assert "swa_lr" in remote_sd["param_groups"][0]
    assert_same_state(local, remote)

    buffer = io.BytesIO()
    torch.save(remote_sd, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh_local = torch.optim.AdamW([{"params": local_model[0].parameters()},
                                     {"params": local_model[2].parameters()}], lr=1.0)
    fresh_remote = optserve.RemoteOptimizer([{"params": remote_model[0].parameters()},
                                             {"params": remote_model[2].parameters()}],
                                            "AdamW", client, lr=1.0)
    fresh_local.load_state_dict(copy.deepcopy(local_sd))
    fresh_remote.load_state_dict(checkpoint)
    assert fresh_remote.param_groups[1]["name"] == "head"
    for model, opt in ((local_model, fresh_local), (remote_model, fresh_remote)):
        for i in range(3, 5):
            opt.zero_grad()
            loss_at(model, i).backward()
            opt.step()
    assert_same_params(local_model, remote_model)
    assert_same_state(fresh_local, fresh_remote)
    for opt in (remote, fresh_remote):
        opt.close(delete_session=True)


# --------------------------------------------------------------------------- another process
RESUME = """
import sys, torch, optserve
from torch import nn
from torch.nn import functional as F
url, path, out = sys.argv[1:]
ck = torch.load(path, weights_only=True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
model.load_state_dict(ck["model"])
with optserve.Client(url) as client:
    opt = optserve.RemoteOptimizer(model.parameters(), "Adam", client, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    for i in range(ck["next"], 8):
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out)
"""


def test_checkpoint_resumed_in_a_new_process(client: optserve.Client, live_server: str,
                                             tmp_path: Path) -> None:
    local_model, local, remote_model, remote = pair(client, "Adam", lr=1e-2, amsgrad=True)
    local_sched = lrs.StepLR(local, step_size=2, gamma=0.5)
    run_steps(local_model, local, local_sched, range(8))
    remote_sched = lrs.StepLR(remote, step_size=2, gamma=0.5)
    run_steps(remote_model, remote, remote_sched, range(3))
    torch.save({"model": remote_model.state_dict(), "opt": remote.state_dict(),
                "sched": remote_sched.state_dict(), "next": 3}, tmp_path / "ck.pt")
    remote.close(delete_session=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", RESUME, live_server, str(tmp_path / "ck.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, timeout=240)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, value in local_model.state_dict().items():
        assert torch.equal(out["model"][name], value), name
    local_sd = local.state_dict()
    assert out["opt"]["param_groups"] == local_sd["param_groups"]
    for pid, entry in local_sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(out["opt"]["state"][pid][key], value), (pid, key)
