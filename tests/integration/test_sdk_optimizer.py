"""``optserve.RemoteOptimizer`` as a drop-in for ``torch.optim`` against a real server: the
same training loop with a local optimizer and with the remote one gives bitwise the same
losses and parameters (CPU, same torch build), schedulers and checkpoints included."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve

pytestmark = pytest.mark.integration

Sched = Callable[[torch.optim.Optimizer], Any]


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    make_sched: Sched | None = None,
    clip: float | None = None,
) -> list[torch.Tensor]:
    x, y = batch()
    sched = make_sched(opt) if make_sched is not None else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach().clone())
    return losses


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)


def cosine(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=1e-4)


# --------------------------------------------------------------------------- the drop-in
@pytest.fixture
def sent(live_server: str) -> Iterator[tuple[optserve.Client, list[str]]]:
    """A client and the list of requests it sends ("METHOD last-path-segment")."""
    log: list[str] = []
    hook = lambda r: log.append(f"{r.method} {r.url.path.rsplit('/', 1)[-1]}")  # noqa: E731
    with httpx.Client(event_hooks={"request": [hook]}) as http, \
            optserve.Client(live_server, http_client=http, transport="http") as client:
        yield client, log


def test_drop_in_adam_with_local_steplr(sent: tuple[optserve.Client, list[str]]) -> None:
    client, requests = sent
    local_model, remote_model = mlp(), mlp()
    assert_same_params(local_model, remote_model)
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer="Adam",
                                      client=client, lr=1e-2)
    assert isinstance(remote, torch.optim.Optimizer)
    assert remote.defaults == local.defaults
    local_losses = train(local_model, local, 20, step_lr)
    remote_losses = train(remote_model, remote, 20, step_lr)
    assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
    assert_same_params(local_model, remote_model)
    assert remote.param_groups[0]["lr"] == local.param_groups[0]["lr"] == 1e-2 * 0.5**4
    # one request per step: StepLR's 3 lr changes ride with the steps after them
    assert requests[0] == "POST sessions"
    assert requests.count("POST step") == 20 and requests.count("PATCH 0") == 0
    assert len(requests) == 21
    # the lr the local StepLR set after the last step travels lazily: before the next step
    # (or state_dict); the server still holds the lr that step 20 used
    info = client.get_session(remote.session_id)
    assert info.step == 20 and info.lr == [1e-2 * 0.5**3]
    assert remote.state_dict()["param_groups"][0]["lr"] == 1e-2 * 0.5**4
    assert client.get_session(remote.session_id).lr == [1e-2 * 0.5**4]


def test_local_one_cycle_over_two_groups_is_one_request_per_step(
        sent: tuple[optserve.Client, list[str]]) -> None:
    """OneCycleLR changes lr and betas of every group at every step: the changes travel
    inside the step request, applied atomically with it, and the run equals local torch."""
    client, requests = sent

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        first, second = model[0], model[2]  # type: ignore[index]
        return [{"params": list(first.parameters())},
                {"params": list(second.parameters()), "lr": 3e-3}]

    def one_cycle(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 5e-3], total_steps=12)
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(groups(local_model), lr=1e-3)
    remote = optserve.RemoteOptimizer(groups(remote_model), optimizer="Adam", client=client,
                                      lr=1e-3)
    local_losses = train(local_model, local, 12, one_cycle)
    remote_losses = train(remote_model, remote, 12, one_cycle)
    assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
    assert_same_params(local_model, remote_model)
    assert requests.count("POST step") == 12 and len(requests) == 13  # create + 12 steps
    # a refused option fails the whole step and changes nothing
    before = client.get_session(remote.session_id)
    with pytest.raises(optserve.ValidationError) as info:
        client.step(remote.session_id, {}, param_groups={0: {"lr": 0.5},
                                                         1: {"betas": (0.9, 1.5)}})
    assert info.value.field == "param_groups.1.betas"
    assert client.get_session(remote.session_id) == before


def test_drop_in_sgd_with_cosine_annealing_and_clipping(client: optserve.Client) -> None:
    local_model, remote_model = mlp(), mlp()
    opts = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    local = torch.optim.SGD(local_model.parameters(), **opts)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "SGD", client, binary=False,
                                      **opts)
    local_losses = train(local_model, local, 15, cosine, clip=0.5)
    remote_losses = train(remote_model, remote, 15, cosine, clip=0.5)
    assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
    assert_same_params(local_model, remote_model)
    assert remote.param_groups[0]["lr"] == local.param_groups[0]["lr"]


def test_param_groups_named_params_and_closure(client: optserve.Client) -> None:
    local_model, remote_model = mlp(), mlp()

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        named = list(model.named_parameters())
        return [{"params": named[:2], "lr": 0.05}, {"params": named[2:], "weight_decay": 0.1}]

    local = torch.optim.AdamW(groups(local_model), lr=0.01, betas=(0.85, 0.99))
    remote = optserve.RemoteOptimizer(groups(remote_model), "AdamW", client,
                                      lr=0.01, betas=(0.85, 0.99))
    assert [g["param_names"] for g in remote.param_groups] == [
        ["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert client.get_session(remote.session_id).param_names == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    for key in ("lr", "weight_decay", "betas", "eps", "amsgrad"):
        assert [g[key] for g in remote.param_groups] == [g[key] for g in local.param_groups]
    x, y = batch()
    for model, opt in ((local_model, local), (remote_model, remote)):
        def closure(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> float:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return float(loss.detach())

        with torch.no_grad():  # torch's step re-enables grad for the closure
            first = opt.step(closure)
        assert isinstance(first, float)
        for _ in range(4):
            opt.step(closure)
    assert_same_params(local_model, remote_model)
    sd = remote.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [
        g["param_names"] for g in local.state_dict()["param_groups"]]


def test_frozen_param_and_add_param_group(client: optserve.Client) -> None:
    local_model, remote_model = mlp(), mlp()
    local_first, local_rest = list(local_model.parameters())[:2], list(
        local_model.parameters())[2:]
    remote_first, remote_rest = list(remote_model.parameters())[:2], list(
        remote_model.parameters())[2:]
    local = torch.optim.Adam(local_first, lr=0.01)
    remote = optserve.RemoteOptimizer(remote_first, "Adam", client, lr=0.01)
    for model, opt, rest in ((local_model, local, local_rest), (remote_model, remote,
                                                                 remote_rest)):
        train(model, opt, 3)
        opt.add_param_group({"params": rest, "lr": 0.02, "amsgrad": True})
        # the bias of the first layer gets no gradient for a while: torch skips it
        model[0].bias.requires_grad_(False)
        train(model, opt, 3)
        model[0].bias.requires_grad_(True)
        train(model, opt, 2)
    assert_same_params(local_model, remote_model)
    assert [len(g["params"]) for g in remote.param_groups] == [2, 2]
    assert remote.param_groups[1]["amsgrad"] is True
    info = client.get_session(remote.session_id)
    assert [g.params for g in info.param_groups] == [["0", "1"], ["2", "3"]]
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert local_sd["param_groups"] == remote_sd["param_groups"]
    assert local_sd["state"].keys() == remote_sd["state"].keys()


def _same_tree(got: Any, want: Any, path: str = "") -> None:
    """Equal trees, tensors bitwise with their dtypes and shapes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, (path, got, want)
        assert got.shape == want.shape and torch.equal(got, want), (path, got, want)
    elif isinstance(want, dict):
        assert {str(k) for k in got} == {str(k) for k in want}, (path, got, want)
        by_str = {str(k): v for k, v in got.items()}
        for k, v in want.items():
            _same_tree(by_str[str(k)], v, f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), (path, got, want)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _same_tree(a, b, f"{path}.{i}")
    else:
        assert got == want, (path, got, want)


def test_a_local_scheduler_filling_a_tensor_lr_default_steps_as_torch(
        client: optserve.Client) -> None:
    """A tensor lr given as the default is one tensor in torch (the defaults' and every
    group's built from them); a local scheduler fills it in place, and a group added later
    without an lr starts from the scheduled value. The remote optimizer's groups and defaults
    share it locally as torch's do, and every value it steps with and reports (parameters,
    ``state_dict()``, the session's groups) equals torch's, the added group's included."""
    opts: dict[str, torch.optim.Optimizer] = {}
    models: dict[str, nn.Module] = {}
    x, y = batch()
    for kind in ("local", "remote"):
        model = models[kind] = mlp()
        groups = [{"params": list(model[0].parameters())}, {"params": [model[2].weight]}]
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(groups, lr=torch.tensor(0.01)) if kind == "local" else
            optserve.RemoteOptimizer(groups, "Adam", client, lr=torch.tensor(0.01)))
        opts[kind] = opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for k in range(5):
            if k == 3:  # (its lr: the defaults' tensor, filled twice by now)
                opt.add_param_group({"params": [model[2].bias]})
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        assert opt.param_groups[2]["lr"] is opt.defaults["lr"], kind
        assert opt.param_groups[0]["lr"] is opt.defaults["lr"], kind
    local, remote = opts["local"], opts["remote"]
    assert isinstance(remote, optserve.RemoteOptimizer)
    assert_same_params(models["local"], models["remote"])
    assert torch.equal(remote.defaults["lr"], local.defaults["lr"])
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    _same_tree(remote_sd["param_groups"], local_sd["param_groups"], "param_groups")
    _same_tree(remote_sd["state"], local_sd["state"], "state")
    info = client.get_session(remote.session_id)
    assert [float(g.options["lr"]) for g in info.param_groups] == [
        float(g["lr"]) for g in local.param_groups]


def test_groups_of_submodules_named_parameters_with_the_same_names(
        client: optserve.Client) -> None:
    """torch takes ``param_names`` as labels only: groups made of each submodule's
    ``named_parameters()`` (both ``weight`` and ``bias``), a group that names a parameter twice
    and ``add_param_group`` with the same names again all work there. The session gets unique
    names; the optimizer's groups and state dict keep the user's, as torch's do."""
    def groups(model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": model[0].named_parameters()},  # type: ignore[index]
                {"params": list(model[2].named_parameters())[:1]  # type: ignore[index]
                 + [("weight", model[2].bias)], "lr": 3e-3}]  # type: ignore[index]

    local_model, remote_model = mlp(), mlp()
    local = torch.optim.AdamW(groups(local_model), lr=1e-2)
    remote = optserve.RemoteOptimizer(groups(remote_model), "AdamW", client, lr=1e-2)
    train(local_model, local, 3)
    train(remote_model, remote, 3)
    more = [nn.Linear(4, 4) for _ in range(2)]
    for model, opt, extra in ((local_model, local, more[0]), (remote_model, remote, more[1])):
        extra.load_state_dict(more[0].state_dict())
        model.append(extra)  # type: ignore[operator]
        opt.add_param_group({"params": list(extra.named_parameters())})
    train(local_model, local, 3)
    train(remote_model, remote, 3)
    assert_same_params(local_model, remote_model)
    assert [g["param_names"] for g in remote.param_groups] == [
        ["weight", "bias"], ["weight", "weight"], ["weight", "bias"]]
    names = client.get_session(remote.session_id).param_names
    assert len(set(names)) == 6
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert local_sd["param_groups"] == remote_sd["param_groups"]
    for pid, entry in local_sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(remote_sd["state"][pid][key], value), (pid, key)


@pytest.mark.parametrize("transport", ["http", "local"])
def test_an_empty_param_group_as_torch_takes_it(live_server: str, transport: str) -> None:
    """A weight-decay split of a model without biases leaves the no-decay group empty; torch
    takes it, and ``add_param_group`` of no parameters too. The session keeps the empty
    groups (their options, their place in the group indexes) through steps, a checkpoint's
    state dict (saved, then loaded into a fresh optimizer that trains on) and an added group."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(),
                             nn.Linear(16, 4, bias=False))

    def groups(m: nn.Module) -> list[dict[str, Any]]:
        decay = [p for n, p in m.named_parameters() if p.dim() > 1]
        rest = [p for n, p in m.named_parameters() if p.dim() <= 1]
        return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]

    with optserve.Client(live_server, max_retries=0, transport=transport) as client:
        local_model, remote_model = model(), model()
        local = torch.optim.AdamW(groups(local_model), lr=1e-2)
        remote = optserve.RemoteOptimizer(groups(remote_model), "AdamW", client, lr=1e-2)
        assert [len(g["params"]) for g in remote.param_groups] == [2, 0]
        local_losses = train(local_model, local, 3, step_lr)
        remote_losses = train(remote_model, remote, 3, step_lr)
        assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
        for opt in (local, remote):
            opt.add_param_group({"params": [], "lr": 0.5, "amsgrad": True})
        train(local_model, local, 2)
        train(remote_model, remote, 2)
        assert_same_params(local_model, remote_model)
        info = client.get_session(remote.session_id)
        assert [g.params for g in info.param_groups] == [["0", "1"], [], []]
        assert [g.options["weight_decay"] for g in info.param_groups] == [0.1, 0.0, 0.01]
        assert info.param_groups[2].options["lr"] == 0.5
        local_sd, remote_sd = local.state_dict(), remote.state_dict()
        assert local_sd["param_groups"] == remote_sd["param_groups"]
        for pid, entry in local_sd["state"].items():
            for key, value in entry.items():
                assert torch.equal(remote_sd["state"][pid][key], value), (pid, key)
        # a checkpoint of the remote one loads into a fresh remote optimizer, empty groups too
        buf = io.BytesIO()
        torch.save(remote_sd, buf)
        buf.seek(0)
        again = optserve.RemoteOptimizer(groups(remote_model), "AdamW", client, lr=1.0)
        again.add_param_group({"params": []})
        again.load_state_dict(torch.load(buf, weights_only=True))
        train(local_model, local, 2)
        train(remote_model, again, 2)
        assert_same_params(local_model, remote_model)
        assert local.state_dict()["param_groups"] == again.state_dict()["param_groups"]


def test_server_side_scheduler_lr_is_mirrored(client: optserve.Client) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.SGD(local_model.parameters(), lr=0.2)
    remote = optserve.RemoteOptimizer(
        remote_model.parameters(), "SGD", client, lr=0.2,
        scheduler={"name": "StepLR", "options": {"step_size": 3, "gamma": 0.1}},
    )
    sched = step_lr_3 = torch.optim.lr_scheduler.StepLR(local, step_size=3, gamma=0.1)
    assert sched is step_lr_3
    x, y = batch()
    for _ in range(7):
        for model, opt in ((local_model, local), (remote_model, remote)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        sched.step()
        assert remote.param_groups[0]["lr"] == local.param_groups[0]["lr"]
    assert_same_params(local_model, remote_model)
    assert "scheduler" in remote.state_dict()


def test_local_parameter_edits_are_sent_before_the_step(client: optserve.Client) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=0.01)
    train(local_model, local, 2)
    train(remote_model, remote, 2)
    # a checkpoint restored into the model after the optimizer was made, and an in-place edit
    torch.manual_seed(3)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).state_dict()
    for model in (local_model, remote_model):
        model.load_state_dict(fresh)
        with torch.no_grad():
            model[2].weight.mul_(0.5)
    train(local_model, local, 3)
    train(remote_model, remote, 3)
    assert_same_params(local_model, remote_model)
    pulled = client.get_params(remote.session_id).params
    for name, p in zip(["0", "1", "2", "3"], remote_model.parameters(), strict=True):
        assert torch.equal(pulled[name], p.detach())


def test_pull_and_push_params_for_shared_sessions(client: optserve.Client) -> None:
    model = mlp()
    remote = optserve.RemoteOptimizer(model.parameters(), "SGD", client, lr=0.5)
    # another worker steps the same session
    grads = {name: torch.ones_like(p) for name, p in zip("0123", model.parameters(),
                                                           strict=True)}
    stepped = client.step(remote.session_id, grads).params
    assert stepped is not None
    remote.pull_params()
    for name, p in zip("0123", model.parameters(), strict=True):
        assert torch.equal(p.detach(), stepped[name])
    # push_params() sends the local values at once (an edit through .data, which the next
    # step would send by itself: test_sdk_data_edits)
    model[0].bias.data.fill_(7.0)
    remote.push_params()
    assert client.get_params(remote.session_id, names=["1"]).params["1"].eq(7.0).all()


# --------------------------------------------------------------------------- checkpoints
def test_torch_save_of_remote_state_continues_in_local_adam(client: optserve.Client) -> None:
    remote_model = mlp()
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2,
                                      betas=(0.8, 0.99))
    train(remote_model, remote, 6, step_lr)
    buf = io.BytesIO()
    torch.save(remote.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert list(loaded["state"]) == [0, 1, 2, 3]
    assert loaded["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert loaded["param_groups"][0]["initial_lr"] == 1e-2  # the local StepLR's key
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.99)

    local_model = mlp()
    local_model.load_state_dict(remote_model.state_dict())
    local = torch.optim.Adam(local_model.parameters())
    local.load_state_dict(loaded)
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
        assert local.param_groups[0][key] == remote.param_groups[0][key]
    local_losses = train(local_model, local, 5)
    remote_losses = train(remote_model, remote, 5)
    assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
    assert_same_params(local_model, remote_model)


@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_local_adam_state_loads_into_remote_and_continues(
    client: optserve.Client, binary: bool
) -> None:
    local_model = mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=3e-3, amsgrad=True)
    train(local_model, local, 4, step_lr)
    buf = io.BytesIO()
    torch.save(local.state_dict(), buf)
    buf.seek(0)

    remote_model = mlp()
    remote_model.load_state_dict(local_model.state_dict())
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1.0,
                                      amsgrad=True, binary=binary)
    remote.load_state_dict(torch.load(buf, weights_only=True))
    assert remote.param_groups[0]["lr"] == local.param_groups[0]["lr"]
    assert remote.param_groups[0]["initial_lr"] == 3e-3
    assert client.get_session(remote.session_id).param_groups[0].options["lr"] == \
        local.param_groups[0]["lr"]
    local_losses = train(local_model, local, 5)
    remote_losses = train(remote_model, remote, 5)
    assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
    assert_same_params(local_model, remote_model)
    # and round trip: the remote's state equals the local one, tensor for tensor
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert local_sd["param_groups"] == remote_sd["param_groups"]
    for pid, entry in local_sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(remote_sd["state"][pid][key], value), (pid, key)


def test_load_state_dict_checks_group_sizes_like_torch(client: optserve.Client) -> None:
    model = mlp()
    remote = optserve.RemoteOptimizer(model.parameters(), "Adam", client)
    local = torch.optim.Adam(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="doesn't match the size"):
        remote.load_state_dict(local.state_dict())


def test_scheduler_state_dicts_work_with_remote(client: optserve.Client) -> None:
    """Resuming a local scheduler together with a remote optimizer, the torch way."""
    model = mlp()
    remote = optserve.RemoteOptimizer(model.parameters(), "SGD", client, lr=0.1)
    sched = cosine(remote)
    train(model, remote, 3, lambda _opt: None)
    for _ in range(3):
        sched.step()
    opt_sd, sched_sd = remote.state_dict(), sched.state_dict()

    model2 = mlp()
    remote2 = optserve.RemoteOptimizer(model2.parameters(), "SGD", client, lr=0.1)
    sched2 = cosine(remote2)
    sched2.load_state_dict(sched_sd)
    remote2.load_state_dict(opt_sd)
    assert remote2.param_groups[0]["lr"] == remote.param_groups[0]["lr"]
    assert client.get_session(remote2.session_id).lr == [remote.param_groups[0]["lr"]]


@pytest.mark.parametrize("name, options", [
    ("Adam", {"lr": -1.0}), ("Adam", {"betas": (0.9, 1.5)}), ("Adam", {"eps": -1.0}),
    ("AdamW", {"weight_decay": -1.0}), ("SGD", {"lr": 0.1, "nesterov": True}),
    ("RMSprop", {"alpha": -1.0}), ("Rprop", {"etas": (1.5, 1.2)}),
])
def test_constructor_refusals_are_torchs_exception_type(client: optserve.Client, name: str,
                                                        options: dict[str, Any]) -> None:
    """What torch's constructor refuses, ``RemoteOptimizer`` refuses with an exception of the
    same built-in type (the server's 422 ``ValidationError`` is a ``ValueError``): code that
    catches torch's ``ValueError`` catches ours."""
    with pytest.raises(Exception) as local:
        getattr(torch.optim, name)(mlp().parameters(), **options)
    with pytest.raises(Exception) as remote:
        optserve.RemoteOptimizer(mlp().parameters(), name, client, **options)
    assert type(local.value) is ValueError
    assert isinstance(remote.value, ValueError)
    assert isinstance(remote.value, optserve.ValidationError)
    assert remote.value.field is not None and remote.value.field.startswith("options.")


def assert_same_form(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal and of the same types all the way down (a list is not a tuple;
    tensors bitwise)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_form(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_form(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name, options, group", [
    ("Adam", {"betas": [0.9, 0.99]}, {"betas": [0.8, 0.9]}),  # torch: the default a tuple
    ("AdamW", {"betas": [0.85, 0.95]}, {}),
    ("NAdam", {"betas": [0.9, 0.99]}, {"betas": (0.8, 0.9)}),  # torch: kept as given
    ("RAdam", {"betas": [0.9, 0.99]}, {}),
    ("Adamax", {"betas": (0.9, 0.99)}, {"betas": [0.8, 0.9]}),
    ("Rprop", {"etas": [0.4, 1.3], "step_sizes": [1e-6, 40]}, {"etas": (0.3, 1.1)}),
])
def test_pair_options_keep_torchs_form(client: optserve.Client, name: str,
                                       options: dict[str, Any], group: dict[str, Any]) -> None:
    """Pairs given as lists or tuples, in the defaults or a group, are held as torch's own
    optimizer holds them (Adam makes its default ``betas`` a tuple; the others keep what was
    given), in ``param_groups``, ``defaults`` and ``state_dict()`` (a list never equals a
    tuple: code comparing the two state dicts saw them differ)."""
    def groups(model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [model[0].weight, model[0].bias]},
                {"params": list(model[2].parameters()), **group}]
    local_model, remote_model = mlp(), mlp()
    local = getattr(torch.optim, name)(groups(local_model), **options)
    remote = optserve.RemoteOptimizer(groups(remote_model), name, client, **options)
    train(local_model, local, 2)
    train(remote_model, remote, 2)
    for lg, rg in zip(local.param_groups, remote.param_groups, strict=True):
        assert_same_form({k: v for k, v in lg.items() if k != "params"},
                         {k: rg[k] for k in lg if k != "params"}, "param_groups")
    for k in options:
        assert_same_form(local.defaults[k], remote.defaults[k], f"defaults.{k}")
    assert_same_form(local.state_dict(), remote.state_dict(), "state_dict")


def test_constructor_errors(client: optserve.Client) -> None:
    with pytest.raises(TypeError, match="iterable of Tensors"):
        optserve.RemoteOptimizer(torch.zeros(2, requires_grad=True), client=client)
    with pytest.raises(ValueError, match="empty parameter list"):
        optserve.RemoteOptimizer([], client=client)
    with pytest.raises(optserve.ValidationError) as info:
        optserve.RemoteOptimizer(mlp().parameters(), "Adam", client, lr=-1.0)
    assert info.value.field == "options.lr"
    with pytest.raises(optserve.ValidationError):  # torch: LBFGS takes one param group
        optserve.RemoteOptimizer([{"params": [torch.zeros(2)]}, {"params": [torch.zeros(2)]}],
                                 "LBFGS", client)
    model = mlp()
    remote = optserve.RemoteOptimizer(model.parameters(), "SGD", client, session_id="sdk-dup")
    with pytest.raises(optserve.ConflictError):
        optserve.RemoteOptimizer(model.parameters(), "SGD", client, session_id="sdk-dup")
    remote.close(delete_session=True)
    with pytest.raises(optserve.NotFoundError):
        client.get_session("sdk-dup")


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
def test_tensor_betas_are_refused_saying_only_lr_travels_as_a_tensor(
        client: optserve.Client, optimizer: str) -> None:
    """torch takes Adam's betas as one-element tensors (and steps with them in float32
    arithmetic, so their float values would not step alike): a clear refusal naming the
    element, as for any other tensor option; it said "betas[0] must be a number, got
    {'data': [0.8999999761581421], 'dtype': ...", the JSON tensor the SDK sent. The detail
    names the element as its field does (it said ``betas[0]``)."""
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    local_model = mlp()
    getattr(torch.optim, optimizer)(local_model.parameters(), lr=0.01, betas=betas)  # torch: fine
    before = {s.id for s in client.list_sessions()}
    with pytest.raises(optserve.ValidationError) as info:
        optserve.RemoteOptimizer(mlp().parameters(), optimizer, client, lr=0.01, betas=betas)
    assert info.value.field == "options.betas.0"
    assert "options.betas.0 is a tensor: only lr may be given as a tensor" in str(info.value)
    assert {s.id for s in client.list_sessions()} == before  # no session was made


def test_parameters_on_the_meta_device_are_refused_before_a_session_is_made(
        client: optserve.Client) -> None:
    """A model built on the meta device (deferred initialization) has no values to make a
    session of: a ValueError that says to materialize it first, not torch's
    ``NotImplementedError`` from deep in the encoding. torch's optimizer takes such
    parameters (in-process, at test time); nothing is made on the server."""
    with torch.device("meta"):
        model = mlp()
    torch.optim.Adam(model.parameters())
    before = {s.id for s in client.list_sessions()}
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        optserve.RemoteOptimizer(model.parameters(), "Adam", client)
    with pytest.raises(ValueError, match=r"meta device"):
        optserve.RemoteOptimizer([{"params": list(mlp().parameters())},
                                  {"params": list(model.parameters())}], "Adam", client)
    assert {s.id for s in client.list_sessions()} == before


def test_with_block_deletes_the_session_it_created(live_server: str) -> None:
    """``with RemoteOptimizer(...)``: the session lives for the block (README quickstart)."""
    w = torch.nn.Parameter(torch.tensor([2.0]))
    client = optserve.Client(live_server)
    with optserve.RemoteOptimizer([w], "SGD", client, lr=1.0) as opt:
        sid = opt.session_id
        w.grad = torch.tensor([16.0])
        opt.step()
        assert client.get_session(sid).version == 1
    assert w.detach().item() == -14.0
    with pytest.raises(optserve.NotFoundError):
        client.get_session(sid)
    assert not client.is_closed  # a client passed in stays open for its owner
    # an error inside the block propagates, and the session is still deleted
    with pytest.raises(ZeroDivisionError), optserve.RemoteOptimizer([w], "SGD", client,
                                                                    lr=1.0) as opt:
        sid = opt.session_id
        1 / 0  # noqa: B018
    with pytest.raises(optserve.NotFoundError):
        client.get_session(sid)
    # a worker that joined a session leaves it be
    client.create_session("SGD", {"0": torch.tensor([1.0])}, id="with-kept", options={"lr": 1})
    with optserve.RemoteOptimizer([torch.nn.Parameter(torch.tensor([1.0]))], client=client,
                                  session_id="with-kept", worker="w0"):
        pass
    assert client.get_session("with-kept").id == "with-kept"
    client.delete_session("with-kept")
    client.close()


@pytest.mark.parametrize("durability", ["memory", "step"])
def test_session_policies_from_the_optimizer(client: optserve.Client, durability: str) -> None:
    """``durability``, ``metrics`` and ``nonfinite`` reach the session the optimizer creates;
    without metrics a step answers no norms, and the training still equals local torch."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", client,
                                      durability=durability, metrics=False, nonfinite="skip",
                                      lr=1e-2)
    try:
        info = client.get_session(remote.session_id)
        assert (info.durability, info.metrics, info.nonfinite) == (durability, False, "skip")
        assert train(local_model, local, 3) == train(remote_model, remote, 3)
        for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
            assert torch.equal(a, b)
        rows = client.history(remote.session_id)
        assert rows.columns["lr.0"] == [1e-2] * 3
        assert "grad_norm.0" not in rows.columns
    finally:
        remote.close(delete_session=True)
    with pytest.raises(ValueError, match="policies"):
        optserve.RemoteOptimizer(mlp().parameters(), client=client, session_id="x",
                                 worker="w", metrics=False)


def test_a_half_million_parameter_model_over_http_equals_torch(live_server: str) -> None:
    """RemoteOptimizer over HTTP with bodies of ~2 MB (sent in pieces from the gradients'
    memory, every answer read into one kept buffer) and a OneCycleLR changing lr and betas
    every step (riding in each step's metadata): after 12 steps every parameter equals a local
    AdamW run bit for bit."""
    torch.manual_seed(0)
    remote_model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.LayerNorm(1024),
                                 nn.Linear(1024, 256))
    local_model = copy.deepcopy(remote_model)
    assert sum(p.numel() for p in remote_model.parameters()) > 500_000
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "AdamW", c, lr=1e-3,
                                          weight_decay=0.01)
        local = torch.optim.AdamW(local_model.parameters(), lr=1e-3, weight_decay=0.01)
        pairs = [(remote_model, remote, torch.optim.lr_scheduler.OneCycleLR(
                     remote, max_lr=1e-2, total_steps=20)),
                 (local_model, local, torch.optim.lr_scheduler.OneCycleLR(
                     local, max_lr=1e-2, total_steps=20))]
        buffers = set()
        for step in range(12):
            x = torch.randn(64, 256, generator=torch.Generator().manual_seed(step))
            for model, opt, sched in pairs:
                opt.zero_grad()
                (model(x) ** 2).mean().backward()
                opt.step()
                sched.step()
            kept = remote._answers._buffer
            assert kept is not None and len(kept) > 2_000_000
            buffers.add(kept.ctypes.data)
        assert len(buffers) == 1  # every answer was read into one kept buffer
        for (name, a), b in zip(remote_model.named_parameters(), local_model.parameters(),
                                strict=True):
            assert torch.equal(a, b), name
        remote.close(delete_session=True)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_narrow_wire_gradients_step_like_torch_on_the_upcast_gradients(
        live_server: str, wire: str) -> None:
    """``RemoteOptimizer(..., wire_dtype=...)``: each gradient travels narrowed, the server
    widens it and steps its float32 master weights,
    and the new values come back narrowed. After five steps the server's parameters equal
    torch stepping the same gradients narrowed and widened again, bit for bit, and the
    model's parameters equal those values narrowed and widened."""
    narrow = getattr(torch, wire)
    gen = torch.Generator().manual_seed(21)
    init = [torch.randn(300, 70, generator=gen), torch.randn(70, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(5)]
    master = [p.clone() for p in init]
    local = torch.optim.Adam(master, lr=1e-2)
    for step in grads:
        for p, g in zip(master, step, strict=True):
            p.grad = g.to(narrow).to(torch.float32)
        local.step()
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        params = [p.clone() for p in init]
        remote = optserve.RemoteOptimizer([("w", params[0]), ("b", params[1])], "Adam", c,
                                          lr=1e-2, wire_dtype=wire)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            remote.step()
        server = c.get_params(remote.session_id).params
        for name, p, want in zip(["w", "b"], params, master, strict=True):
            assert torch.equal(server[name], want), name
            assert torch.equal(p, want.to(narrow).to(torch.float32)), name
        remote.close(delete_session=True)


def test_narrow_wire_gradients_are_narrowed_into_kept_buffers(
        live_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``wire_dtype="bfloat16"``: each step narrows every dense gradient into one buffer kept
    for it (the same memory sent at every step, not a fresh block); the values sent are the
    gradient's own, rounded as
    ``Tensor.to`` rounds them, so the server's parameters equal torch stepping the rounded
    gradients bit for bit, step after step, whatever the buffer held before."""
    sent: list[dict[str, tuple[int, torch.Tensor]]] = []
    real_api_step = optserve._api.step

    def api_step(session_id: str, grads: Any, **kwargs: Any) -> Any:
        sent.append({n: (g.data_ptr(), g.clone()) for n, g in grads.items()})
        return real_api_step(session_id, grads, **kwargs)
    monkeypatch.setattr(optserve._api, "step", api_step)
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(400, 300, generator=gen), torch.randn(300, generator=gen)]
    # very different magnitudes from step to step: stale values would show
    grads = [[torch.randn(p.shape, generator=gen) * 10.0 ** (3 * k - 4) for p in init]
             for k in range(4)]
    master = [p.clone() for p in init]
    local = torch.optim.Adam(master, lr=1e-2)
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        params = [p.clone() for p in init]
        remote = optserve.RemoteOptimizer([("w", params[0]), ("b", params[1])], "Adam", c,
                                          lr=1e-2, wire_dtype="bfloat16")
        for k, step in enumerate(grads):
            for p, g in zip(master, step, strict=True):
                p.grad = g.to(torch.bfloat16).to(torch.float32)
            local.step()
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            remote.step()
            for name, g in zip(["w", "b"], step, strict=True):
                ptr, value = sent[k][name]
                assert ptr == remote._narrow[name].data_ptr() == sent[0][name][0], name
                assert torch.equal(value, g.to(torch.bfloat16)), name
        server = c.get_params(remote.session_id).params
        for name, p, want in zip(["w", "b"], params, master, strict=True):
            assert torch.equal(server[name], want), name
            assert torch.equal(p, want.to(torch.bfloat16).to(torch.float32)), name
        remote.close(delete_session=True)


def test_values_past_float16s_range_neither_travel_nor_come_back_infinite(
        live_server: str) -> None:
    """``wire_dtype="float16"``: a finite gradient past float16's range (65504) would travel as
    an infinity (the server then refuses it as the user's own non-finite gradient, or steps
    with it): a ``ValueError`` naming it, nothing sent. A parameter past that range comes back
    as an infinity in the narrowed answer: it is pulled again at its own width, so the local
    parameter holds the server's value, torch's, not inf."""
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        big = torch.tensor([70000.0, 1.0])
        small = torch.tensor([0.25, -0.5])
        remote = optserve.RemoteOptimizer([("big", big), ("small", small)], "SGD", c, lr=1.0,
                                          wire_dtype="float16")
        big.grad, small.grad = torch.tensor([1e5, 0.0]), torch.tensor([0.5, 0.5])
        with pytest.raises(ValueError, match="'big'.*float16's range"):
            remote.step()
        assert c.get_session(remote.session_id).version == 0
        master = [torch.tensor([70000.0, 1.0]), torch.tensor([0.25, -0.5])]
        local = torch.optim.SGD(master, lr=1.0)
        for p, g in zip(master, ([0.5, 0.25], [0.5, 0.5]), strict=True):
            p.grad = torch.tensor(g)  # (exact in float16)
        local.step()
        big.grad, small.grad = torch.tensor([0.5, 0.25]), torch.tensor([0.5, 0.5])
        remote.step()
        assert torch.equal(big, master[0])  # [69999.5, 0.75]: not [inf, 0.75]
        assert torch.equal(small, master[1].to(torch.float16).to(torch.float32))
        remote.close(delete_session=True)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_narrow_wire_checkpoint_resumes_from_the_master_weights(live_server: str,
                                                                 wire: str) -> None:
    """With ``wire_dtype`` the model's parameters hold the session's values narrowed: a
    checkpoint of ``model.state_dict()`` and ``opt.state_dict()`` resumed into a new model and
    a new ``RemoteOptimizer`` made a session of the narrowed values, so the run went on from
    other weights than the uninterrupted one (every parameter off after three more steps).
    ``state_dict()`` now carries the master weights (``"master_params"``, torch's ids, at
    their own width) and ``load_state_dict`` puts them into the new session: the resumed run
    equals torch stepping float32 master weights on the narrowed gradients, bit for bit, the
    local parameters those narrowed. A local torch optimizer loads the same state dict
    (ignoring the key), and a master tensor of the wrong shape is a ``ValueError`` before
    anything is sent."""
    narrow = getattr(torch, wire)
    x, y = batch()

    def grads_at(model: nn.Module) -> list[torch.Tensor]:
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    # torch: float32 master weights stepped on the narrowed gradients, which are taken at
    # the master weights narrowed
    work = mlp()
    master = [p.detach().clone() for p in work.parameters()]
    local = torch.optim.Adam(master, lr=1e-2)
    for _ in range(6):
        for p, g in zip(master, grads_at(work), strict=True):
            p.grad = g.to(narrow).to(torch.float32)
        local.step()
        with torch.no_grad():
            for w, p in zip(work.parameters(), master, strict=True):
                w.copy_(p.to(narrow).to(torch.float32))
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        model = mlp()
        opt = optserve.RemoteOptimizer(model.parameters(), "Adam", c, lr=1e-2, wire_dtype=wire)
        for _ in range(3):
            grads_at(model)
            opt.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        opt.close(delete_session=True)
        buf.seek(0)
        checkpoint = torch.load(buf, weights_only=True)
        resumed = mlp()
        resumed.load_state_dict(checkpoint["model"])
        opt = optserve.RemoteOptimizer(resumed.parameters(), "Adam", c, lr=1e-2,
                                       wire_dtype=wire)
        opt.load_state_dict(checkpoint["opt"])
        for _ in range(3):
            grads_at(resumed)
            opt.step()
        server = c.get_params(opt.session_id).params
        for i, (p, want) in enumerate(zip(resumed.parameters(), master, strict=True)):
            assert torch.equal(server[str(i)], want), i
            assert torch.equal(p, want.to(narrow).to(torch.float32)), i
        mine, torchs = opt.state_dict(), local.state_dict()
        for pid, entry in torchs["state"].items():
            for key, value in entry.items():
                assert torch.equal(mine["state"][pid][key], value), (pid, key)
            assert torch.equal(mine["master_params"][pid], master[pid]), pid
        opt.close(delete_session=True)

        assert set(checkpoint["opt"]["master_params"]) == {0, 1, 2, 3}
        torch.optim.Adam(mlp().parameters(), lr=1e-2).load_state_dict(checkpoint["opt"])
        opt = optserve.RemoteOptimizer(mlp().parameters(), "Adam", c, lr=1e-2, wire_dtype=wire)
        bad = {**checkpoint["opt"], "master_params": {0: torch.zeros(3)}}
        with pytest.raises(ValueError, match="master_params.*param 0"):
            opt.load_state_dict(bad)
        assert c.get_session(opt.session_id).version == 0
        opt.close(delete_session=True)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_narrow_wire_is_refused_for_lbfgs_not_left_unused(live_server: str, wire: str) -> None:
    """``RemoteOptimizer(..., "LBFGS", wire_dtype=...)``: LBFGS steps go as evaluations, which
    travel at the parameters' own width, so the step would be torch's on the full gradients
    and the parameters would come back unnarrowed, not what ``wire_dtype`` promises. It is a
    ``ValueError`` at construction, no session made (before, the option was silently unused);
    without it the same optimizer steps as torch's LBFGS."""
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    x, y = torch.randn(16, 3), torch.randn(16, 4)
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        before = {s.id for s in c.list_sessions()}
        with pytest.raises(ValueError, match="wire_dtype is not offered for LBFGS"):
            optserve.RemoteOptimizer([w.clone().requires_grad_()], "LBFGS", c, lr=0.5,
                                     max_iter=3, wire_dtype=wire)
        assert {s.id for s in c.list_sessions()} == before
        local_w, remote_w = w.clone().requires_grad_(), w.clone().requires_grad_()
        local = torch.optim.LBFGS([local_w], lr=0.5, max_iter=3)
        remote = optserve.RemoteOptimizer([remote_w], "LBFGS", c, lr=0.5, max_iter=3)
        for opt, p in ((local, local_w), (remote, remote_w)):
            def closure(opt: torch.optim.Optimizer = opt, p: torch.Tensor = p) -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(x @ p.t(), y)
                loss.backward()
                return loss
            opt.step(closure)
        assert torch.equal(remote_w, local_w)
        remote.close(delete_session=True)


@pytest.mark.parametrize("transport", ["http", "auto"], ids=["http", "shared memory"])
def test_remote_optimizer_leaves_the_norms_to_the_history(
        live_server: str, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``RemoteOptimizer.step`` asks for ``metrics=history`` over either transport (it returns
    no norms; over HTTP a large session's answer then streams); the session's history gets
    every step's norms, torch's (a 1.3 MB model: its steps run on the device worker, which
    takes them after answering); the parameters equal a local run bit for bit."""
    asked: list[str] = []
    real_api_step, real_local_step = optserve._api.step, optserve._local.LocalChannel.step

    def api_step(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("metrics", "answer"))
        return real_api_step(*args, **kwargs)

    def local_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append("history" if kwargs.get("history_only") else "answer")
        return real_local_step(self, *args, **kwargs)
    monkeypatch.setattr(optserve._api, "step", api_step)
    monkeypatch.setattr(optserve._local.LocalChannel, "step", local_step)
    torch.manual_seed(0)
    remote_model = nn.Sequential(nn.Linear(64, 5000), nn.Tanh(), nn.Linear(5000, 2))
    local_model = copy.deepcopy(remote_model)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    with optserve.Client(live_server, transport=transport, max_retries=0) as c:
        remote = optserve.RemoteOptimizer(remote_model.parameters(), "SGD", c, lr=0.1,
                                          momentum=0.9)
        local = torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)
        for k in range(3):
            before = [p.detach().clone() for p in local_model.parameters()]
            for model, opt in ((remote_model, remote), (local_model, local)):
                opt.zero_grad()
                (model(x) ** 2).mean().backward()
                opt.step()
            assert (c._local is not None) == (transport == "auto")
            row = c.history(remote.session_id, since=k).columns
            assert row["n"] == [k + 1]
            params = [p.detach() for p in local_model.parameters()]
            want = {"update_norm.0": sum(float((p - b).double().pow(2).sum())
                                         for p, b in zip(params, before, strict=True)) ** 0.5,
                    "param_norm.0": sum(float(p.double().pow(2).sum()) for p in params) ** 0.5}
            for key, value in want.items():  # (float32 norms of 330,000 values: 1e-3)
                assert row[key][0] is not None and abs(row[key][0] - value) <= 1e-3 * value, key
        assert asked == ["history"] * 3
        assert_same_params(remote_model, local_model)
        remote.close(delete_session=True)


@pytest.mark.parametrize(("transport", "binary", "named"), [
    ("http", True, True), ("http", False, False), ("local", True, False)])
def test_five_thousand_tiny_parameters_step_like_torch_without_collections(
        live_server: str, transport: str, binary: bool, named: bool) -> None:
    """A session of 5,000 tiny parameters (shapes [1] and [4], one group) through
    ``RemoteOptimizer`` (safetensors or JSON bodies, named or by position, over HTTP or the
    same-host transport): 3 Adam steps equal a local Adam's bit for bit, and no cyclic
    collection runs in the training thread while a step or the create is under way (the SDK
    pauses the collector for 1,000 tensors or more while it encodes and decodes, and that
    thread only waits in between: collections walking the whole process were half of such a
    step's CPU time). The server runs in this process; its threads' collections, while the
    SDK waits for the answer with the collector running, are not counted."""
    import gc
    import threading

    gen = torch.Generator().manual_seed(5)
    values = [torch.randn(1 + 3 * (i % 2), generator=gen) for i in range(5000)]
    remote_params = [nn.Parameter(v.clone()) for v in values]
    local_params = [nn.Parameter(v.clone()) for v in values]
    collections: list[int] = []
    trainer = threading.get_ident()

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and threading.get_ident() == trainer:  # (run by this thread)
            collections.append(info["generation"])

    given: Any = ([(f"layer{i}.w", p) for i, p in enumerate(remote_params)] if named
                  else remote_params)
    with optserve.Client(live_server, max_retries=0, transport=transport) as client:
        gc.callbacks.append(count)
        try:
            remote = optserve.RemoteOptimizer(given, "Adam", client, binary=binary, lr=1e-2)
            during_create = len(collections)
            during_steps = 0
            local = torch.optim.Adam(local_params, lr=1e-2)
            for step in range(3):
                g = torch.Generator().manual_seed(100 + step)
                grads = [torch.randn(v.shape, generator=g) for v in values]
                for p, q, grad in zip(remote_params, local_params, grads, strict=True):
                    p.grad, q.grad = grad.clone(), grad.clone()
                collections.clear()
                remote.step()
                during_steps += len(collections)
                local.step()
        finally:
            gc.callbacks.remove(count)
        for i, (a, b) in enumerate(zip(remote_params, local_params, strict=True)):
            assert torch.equal(a, b), i
        # at most the one the resumed collector may run at once as each paused part of a step
        # ends (the gradients gathered, the request encoded, the answer decoded, the values
        # copied in): 4 per step (over HTTP about 120 per step in this thread without the
        # pause); torch's own Optimizer.__init__ runs unpaused before the create
        assert during_steps <= 3 * 4, during_steps
        assert during_create <= 5, during_create
        remote.close(delete_session=True)


def _typed(value: Any) -> Any:
    """A tree with each list and tuple tagged by its type (``==`` ignores the difference)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items() if k != "params"}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    return value


def test_adafactor_eps_pair_with_none_stays_a_tuple_as_in_torch(client: optserve.Client) -> None:
    """Adafactor's default ``eps`` is ``(None, 1e-3)``: the remote optimizer's defaults, groups
    and ``state_dict()`` hold it as the tuple torch holds (JSON made it a list), and the run is
    bitwise torch's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    local = torch.optim.Adafactor(twin.parameters(), lr=0.01)
    remote = optserve.RemoteOptimizer(model.parameters(), "Adafactor", client, lr=0.01)
    for i in range(3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
        for m, opt in ((twin, local), (model, remote)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    assert_same_params(model, twin)
    assert remote.defaults["eps"] == (None, 1e-3)
    assert _typed(remote.defaults) == _typed(local.defaults)
    assert _typed(remote.param_groups) == _typed(local.param_groups)
    remote_sd, local_sd = remote.state_dict(), local.state_dict()
    assert _typed(remote_sd["param_groups"]) == _typed(local_sd["param_groups"])
    _same_tree(remote_sd["state"], local_sd["state"])
