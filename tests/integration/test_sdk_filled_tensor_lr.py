"""A local scheduler fills a remote optimizer's tensor lr in place, as torch's schedulers do
(``group["lr"].fill_(v)``): where that tensor is the defaults' (a tensor lr given as the
optimizer's default is ``defaults["lr"]`` and every group's built from it), torch's defaults
follow the schedule and a group added later starts at the scheduled value. The session's own
defaults and groups (what ``GET /v1/sessions/{id}`` shows, what a joining worker reads) follow
the same way, over JSON, safetensors and the same-host transport, compared bitwise with torch
run beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optserve
from tests.integration.test_sdk_optimizer import batch, mlp
from tests.unit.test_filled_tensor_options import torch_shared_slots as shared_slots

pytestmark = pytest.mark.integration

#: (id, Client transport, RemoteOptimizer binary)
TRANSPORTS = [pytest.param("http", False, id="json"),
              pytest.param("http", True, id="safetensors"),
              pytest.param("local", True, id="same-host")]


@pytest.fixture
def client(live_server: str, request: pytest.FixtureRequest) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0, transport=request.param) as c:
        yield c


def as_tensor(value: Any) -> torch.Tensor:
    assert isinstance(value, torch.Tensor), f"{value!r} is not a tensor"
    return value


def assert_bitwise(got: Any, want: Any, what: str) -> None:
    if not isinstance(want, torch.Tensor):  # (a float lr)
        assert not isinstance(got, torch.Tensor) and got == want, (what, got, want)
        return
    got = as_tensor(got)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got, want)
    assert torch.equal(got.view(-1).view(torch.uint8),
                       want.detach().view(-1).view(torch.uint8)), (what, got, want)


def assert_session_is(client: optserve.Client, remote: optserve.RemoteOptimizer,
                      local: torch.optim.Optimizer, when: str) -> None:
    """The session's defaults and every group's lr, as the server describes them, are
    torch's."""
    info = client.get_session(remote.session_id)
    assert_bitwise(info.defaults["lr"], local.defaults["lr"], f"{when}: defaults.lr")
    assert len(info.param_groups) == len(local.param_groups), when
    for i, (got, want) in enumerate(zip(info.param_groups, local.param_groups, strict=True)):
        assert_bitwise(got.options["lr"], want["lr"], f"{when}: param_groups.{i}.lr")


def side_by_side(client: optserve.Client, binary: bool,
                 scheduler: Callable[[torch.optim.Optimizer], Any]
                 ) -> tuple[dict[str, nn.Sequential], dict[str, torch.optim.Optimizer],
                            dict[str, Any]]:
    models: dict[str, nn.Sequential] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    scheds: dict[str, Any] = {}
    for kind in ("local", "remote"):
        model = models[kind] = mlp()
        groups = [{"params": list(model[0].parameters())}, {"params": [model[2].weight]}]
        opts[kind] = (torch.optim.Adam(groups, lr=torch.tensor(0.01)) if kind == "local" else
                      optserve.RemoteOptimizer(groups, "Adam", client, binary=binary,
                                               lr=torch.tensor(0.01)))
        scheds[kind] = scheduler(opts[kind])
    return models, opts, scheds


def one_step(model: nn.Sequential, opt: torch.optim.Optimizer) -> None:
    x, y = batch()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize(("client", "binary"), TRANSPORTS, indirect=["client"])
def test_the_sessions_defaults_follow_a_local_steplr(client: optserve.Client,
                                                     binary: bool) -> None:
    models, opts, scheds = side_by_side(
        client, binary, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    remote, local = opts["remote"], opts["local"]
    assert isinstance(remote, optserve.RemoteOptimizer)
    for k in range(5):
        if k == 3:  # a group added after three fills: at the scheduled value, in torch too
            for kind in ("local", "remote"):
                opts[kind].add_param_group({"params": [models[kind][2].bias]})
            assert_session_is(client, remote, local, "right after add_param_group")
            # a worker joining now reads the scheduled default
            worker = optserve.RemoteOptimizer(
                [{"params": list(mlp()[0].parameters())}, {"params": [mlp()[2].weight]},
                 {"params": [mlp()[2].bias]}], "Adam", client, session_id=remote.session_id,
                worker="w1")
            assert_bitwise(worker.defaults["lr"], local.defaults["lr"], "a worker's defaults")
        for kind in ("local", "remote"):
            one_step(models[kind], opts[kind])
        assert_session_is(client, remote, local, f"after step {k}")
        for kind in ("local", "remote"):
            scheds[kind].step()
    for (name, p), q in zip(models["local"].named_parameters(),
                            models["remote"].parameters(), strict=True):
        assert torch.equal(p, q), name
    assert remote.param_groups[2]["lr"] is remote.defaults["lr"]


@pytest.mark.parametrize(("client", "binary"), [TRANSPORTS[0]], indirect=["client"])
def test_the_sessions_defaults_follow_a_local_onecyclelr(client: optserve.Client,
                                                         binary: bool) -> None:
    models, opts, scheds = side_by_side(
        client, binary, lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=[0.05, 0.02], total_steps=6))
    remote, local = opts["remote"], opts["local"]
    assert isinstance(remote, optserve.RemoteOptimizer)
    for k in range(4):
        for kind in ("local", "remote"):
            one_step(models[kind], opts[kind])
        assert_session_is(client, remote, local, f"after step {k}")
        for kind in ("local", "remote"):
            scheds[kind].step()
    # a state_dict() sends what the last scheduler step filled (PATCH: filled, not replaced)
    remote.state_dict()
    assert_session_is(client, remote, local, "after state_dict()")


@pytest.mark.parametrize(("client", "binary"), [TRANSPORTS[0]], indirect=["client"])
def test_a_replaced_lr_leaves_the_defaults(client: optserve.Client, binary: bool) -> None:
    """``group["lr"] = v`` replaces the group's value only, in torch and in the session."""
    models, opts, _ = side_by_side(client, binary, lambda o: None)
    remote, local = opts["remote"], opts["local"]
    assert isinstance(remote, optserve.RemoteOptimizer)
    for kind in ("local", "remote"):
        opts[kind].param_groups[0]["lr"] = torch.tensor(0.003)
        opts[kind].param_groups[1]["lr"] = 0.002
        one_step(models[kind], opts[kind])
    assert_session_is(client, remote, local, "after a replaced lr")
    for kind in ("local", "remote"):  # the replaced tensor, filled, is group 0's own
        opts[kind].param_groups[0]["lr"].fill_(0.004)
        one_step(models[kind], opts[kind])
    assert_session_is(client, remote, local, "after filling the replaced lr")


# ------------------------------------------------------------------ which options are one tensor
def exported_group_sharing(client: optserve.Client, session_id: str) -> list[list[int]]:
    """Which groups' lr are one tensor in the session's ``torch.save`` export (``?format=
    torch``, which keeps tensor identity, as torch's own ``state_dict()`` does)."""
    return group_sharing(client.export_state(session_id, format="torch")["param_groups"])


def group_sharing(groups: list[dict[str, Any]]) -> list[list[int]]:
    found: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        if isinstance(group["lr"], torch.Tensor):
            found.setdefault(id(group["lr"]), []).append(index)
    return [g for g in found.values() if len(g) > 1]


def plateau(opt: torch.optim.Optimizer) -> Any:
    """Lowers every group's lr at each step of a metric that never improves, reading each
    group's lr in turn: a tensor two groups share is lowered twice per step, as in torch."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)


@pytest.mark.parametrize(("client", "binary"), TRANSPORTS, indirect=["client"])
def test_a_joining_worker_shares_the_sessions_tensor_lr_as_torch(client: optserve.Client,
                                                                 binary: bool) -> None:
    """A worker joining a session whose tensor lr default is the defaults' and two groups'
    (a third has its own) holds one tensor there too, as an optimizer built in process does:
    a local ReduceLROnPlateau on the worker lowers the shared tensor once per group holding
    it, and the parameters, lrs and the session's groups stay bitwise torch's."""
    def groups(model: nn.Sequential, own_lr: bool) -> list[dict[str, Any]]:
        third: dict[str, Any] = {"params": [model[2].bias]}
        if own_lr:
            third["lr"] = torch.tensor(0.02)
        return [{"params": list(model[0].parameters())}, {"params": [model[2].weight]}, third]

    local_model, creator_model, worker_model = mlp(), mlp(), mlp()
    local = torch.optim.Adam(groups(local_model, True), lr=torch.tensor(0.01))
    creator = optserve.RemoteOptimizer(groups(creator_model, True), "Adam", client,
                                       binary=binary, lr=torch.tensor(0.01))
    worker = optserve.RemoteOptimizer(groups(worker_model, False), "Adam", client,
                                      binary=binary, session_id=creator.session_id,
                                      worker="w1")
    want = shared_slots(local)
    assert want == [[["defaults", "lr"], [0, "lr"], [1, "lr"]]]
    assert shared_slots(worker) == want
    assert client.get_session(worker.session_id).raw["shared_tensors"] == want
    scheds = {"local": plateau(local), "worker": plateau(worker)}
    for k in range(4):
        for kind, model, opt in (("local", local_model, local), ("worker", worker_model, worker)):
            one_step(model, opt)
            scheds[kind].step(1.0)
        for (name, p), q in zip(local_model.named_parameters(), worker_model.parameters(),
                                strict=True):
            assert torch.equal(p, q), (k, name)
        assert_bitwise(worker.defaults["lr"], local.defaults["lr"], f"step {k}: defaults.lr")
        for i, (got, ref) in enumerate(zip(worker.param_groups, local.param_groups,
                                           strict=True)):
            assert_bitwise(got["lr"], ref["lr"], f"step {k}: param_groups.{i}.lr")
    assert shared_slots(worker) == want
    # the session took the worker's fills (sent with its next step: one more step shows them)
    one_step(local_model, local)
    one_step(worker_model, worker)
    assert_session_is(client, worker, local, "after the worker's steps")
    worker_sd, local_sd = worker.state_dict(), local.state_dict()
    _same_state(worker_sd, local_sd)
    assert group_sharing(worker_sd["param_groups"]) == group_sharing(
        local_sd["param_groups"]) == [[0, 1]]


def _same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["state"].keys() == want["state"].keys()
    for pid, entry in want["state"].items():
        assert got["state"][pid].keys() == entry.keys(), pid
        for key, value in entry.items():
            assert_bitwise(got["state"][pid][key], value, f"state.{pid}.{key}")
    assert len(got["param_groups"]) == len(want["param_groups"])
    for i, (g, w) in enumerate(zip(got["param_groups"], want["param_groups"], strict=True)):
        assert g.keys() == w.keys(), i
        for key, value in w.items():
            if isinstance(value, torch.Tensor):
                assert_bitwise(g[key], value, f"param_groups.{i}.{key}")
            else:
                assert g[key] == value, (i, key, g[key], value)


@pytest.mark.parametrize(("client", "binary"), TRANSPORTS[:2], indirect=["client"])
def test_a_group_lr_given_as_the_defaults_tensor_is_one_tensor_in_the_session(
        client: optserve.Client, binary: bool) -> None:
    """``lr = torch.tensor(0.01)`` given as the default and as a group's own lr is one object
    in torch's defaults and both groups; the session's groups hold one tensor there too (its
    description's ``shared_tensors``, its ``torch.save`` export), and a local LambdaLR's fills
    step the parameters, ``state_dict()`` and the session's lrs bitwise as torch."""
    def build(model: nn.Sequential, remote: bool) -> torch.optim.Optimizer:
        lr = torch.tensor(0.01)
        groups = [{"params": list(model[0].parameters()), "lr": lr},
                  {"params": [model[2].weight]},
                  {"params": [model[2].bias], "lr": torch.tensor(0.01)}]
        if remote:
            return optserve.RemoteOptimizer(groups, "Adam", client, binary=binary, lr=lr)
        return torch.optim.Adam(groups, lr=lr)

    local_model, remote_model = mlp(), mlp()
    local, remote = build(local_model, False), build(remote_model, True)
    assert isinstance(remote, optserve.RemoteOptimizer)
    want = shared_slots(local)
    assert want == [[["defaults", "lr"], [0, "lr"], [1, "lr"]]]
    assert shared_slots(remote) == want
    assert exported_group_sharing(client, remote.session_id) == [[0, 1]]
    assert client.get_session(remote.session_id).raw["shared_tensors"] == want
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda n: 0.7 ** n) for o in (local, remote)]
    for k in range(4):
        for model, opt, sched in zip((local_model, remote_model), (local, remote), scheds,
                                     strict=True):
            one_step(model, opt)
            sched.step()
        for (name, p), q in zip(local_model.named_parameters(), remote_model.parameters(),
                                strict=True):
            assert torch.equal(p, q), (k, name)
    remote_sd, local_sd = remote.state_dict(), local.state_dict()
    _same_state(remote_sd, local_sd)
    # (one tensor in the state dict's groups, as torch's: a torch.save of it keeps it one)
    assert group_sharing(remote_sd["param_groups"]) == group_sharing(
        local_sd["param_groups"]) == [[0, 1]]
    assert_session_is(client, remote, local, "after the LambdaLR's steps")
    assert client.get_session(remote.session_id).raw["shared_tensors"] == want
    assert exported_group_sharing(client, remote.session_id) == group_sharing(
        local.state_dict()["param_groups"]) == [[0, 1]]
    # a group added with the defaults' tensor as its lr holds it there too
    extra = [nn.Linear(2, 2) for _ in range(2)]
    extra[1].load_state_dict(extra[0].state_dict())
    for opt, layer in zip((local, remote), extra, strict=True):
        opt.add_param_group({"params": list(layer.parameters()), "lr": opt.defaults["lr"]})
    want = shared_slots(local)
    assert want == [[["defaults", "lr"], [0, "lr"], [1, "lr"], [3, "lr"]]]
    assert client.get_session(remote.session_id).raw["shared_tensors"] == want


@pytest.mark.parametrize(("client", "binary"), TRANSPORTS[:2], indirect=["client"])
def test_a_loaded_state_dicts_shared_group_lr_stays_one_tensor(client: optserve.Client,
                                                                binary: bool) -> None:
    """A state dict whose groups hold one tensor lr (torch's, of a tensor lr default) loads
    as torch's ``load_state_dict`` takes it: the groups one tensor (a copy: not the defaults'
    any more), locally and in the session, so a local ReduceLROnPlateau lowers it once per
    group and the parameters stay bitwise torch's."""
    source_model = mlp()
    source = torch.optim.Adam([{"params": list(source_model[0].parameters())},
                               {"params": list(source_model[2].parameters())}],
                              lr=torch.tensor(0.01))
    one_step(source_model, source)
    saved = source.state_dict()
    models = {"local": mlp(), "remote": mlp()}
    opts: dict[str, torch.optim.Optimizer] = {}
    for kind, model in models.items():
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
        opts[kind] = (torch.optim.Adam(groups, lr=torch.tensor(0.03)) if kind == "local" else
                      optserve.RemoteOptimizer(groups, "Adam", client, binary=binary,
                                               lr=torch.tensor(0.03)))
        opts[kind].load_state_dict(saved)
    local, remote = opts["local"], opts["remote"]
    assert isinstance(remote, optserve.RemoteOptimizer)
    want = shared_slots(local)
    assert want == [[[0, "lr"], [1, "lr"]]]
    assert shared_slots(remote) == want
    assert exported_group_sharing(client, remote.session_id) == [[0, 1]]
    assert client.get_session(remote.session_id).raw["shared_tensors"] == want
    scheds = {kind: plateau(opt) for kind, opt in opts.items()}
    for k in range(3):
        for kind, opt in opts.items():
            one_step(models[kind], opt)
            scheds[kind].step(1.0)
        for (name, p), q in zip(models["local"].named_parameters(),
                                models["remote"].parameters(), strict=True):
            assert torch.equal(p, q), (k, name)
    one_step(models["local"], local)
    one_step(models["remote"], remote)
    assert_session_is(client, remote, local, "after the plateau's steps")
    remote_sd, local_sd = remote.state_dict(), local.state_dict()
    _same_state(remote_sd, local_sd)
    assert group_sharing(remote_sd["param_groups"]) == group_sharing(
        local_sd["param_groups"]) == [[0, 1]]
    assert client.get_session(remote.session_id).raw["shared_tensors"] == want
