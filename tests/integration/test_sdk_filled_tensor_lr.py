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
