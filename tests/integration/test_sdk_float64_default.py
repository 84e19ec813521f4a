"""``RemoteOptimizer`` under ``torch.set_default_dtype(torch.float64)`` (scientific code's
habit: PINNs, Gaussian processes). torch then makes an optimizer's scalar state (``step``,
ASGD's ``eta``/``mu``, NAdam's ``mu_product``) in float64 (``_get_scalar_dtype``); the server,
a process of its own, keeps it in float32. The server here runs in its own process: the
in-process ``live_server`` would share this test's default dtype. Values are compared bitwise
with the local ``torch.optim`` optimizer run under the same default."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator

import pytest
import torch

import optserve
from tests.integration.test_durability import Proc
from tests.integration.test_sdk_torch_integrations import (
    assert_same_params,
    assert_same_state,
    loss_at,
    mlp,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[optserve.Client]:
    server = Proc(tmp_path_factory.mktemp("float64") / "data")
    try:
        server.start()
        with optserve.Client(server.url, max_retries=0, transport="http") as c:
            yield c
    finally:
        server.stop()


@pytest.fixture
def float64_default() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, at: range) -> None:
    for i in at:
        opt.zero_grad()
        loss_at(model, i).backward()
        opt.step()


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("assign", [False, True], ids=["load_state_dict", "state_assigned"])
def test_a_checkpoint_made_under_a_float64_default_loads_and_goes_on_as_torch(
        client: optserve.Client, assign: bool) -> None:
    """A local Adam's checkpoint (its ``step`` counts float64 tensors, as torch makes them
    here) loads into a ``RemoteOptimizer`` (the session's counts are float32: the same
    numbers, which Adam reads as Python numbers) and training goes on bitwise as the local
    optimizer's. It was a 422 "tensor has dtype float64, expected float32" for
    ``state.0.step``."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2, amsgrad=True)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2,
                                      amsgrad=True)
    steps(local_model, local, range(3))
    assert local.state_dict()["state"][0]["step"].dtype == torch.float64  # torch's, here
    remote_model.load_state_dict(local_model.state_dict())
    checkpoint = copy.deepcopy(local.state_dict())
    if assign:
        remote.state = defaultdict(dict, {p: checkpoint["state"][i]
                                          for i, p in enumerate(remote_model.parameters())})
    else:
        remote.load_state_dict(checkpoint)
    steps(local_model, local, range(3, 6))
    steps(remote_model, remote, range(3, 6))
    assert_same_params(local_model, remote_model)
    assert_same_state(local, remote)  # (torch.equal: the same counts, float64 and float32)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("name", ["ASGD", "NAdam"])
def test_optimizers_stepping_with_float64_scalar_state_are_refused(client: optserve.Client,
                                                                    name: str) -> None:
    """ASGD (eta, mu) and NAdam (mu_product) compute with scalar state torch makes in its
    default dtype, float64 here, where the session's is float32: the steps would differ (they
    did, silently, by about 1e-11), so the optimizer is refused before a session is made."""
    local_model = mlp()
    local = getattr(torch.optim, name)(local_model.parameters(), lr=1e-2)
    steps(local_model, local, range(2))
    assert any(key != "step" and value.dim() == 0 and value.dtype == torch.float64
               for key, value in local.state[local_model[0].weight].items())  # the reason
    before = [s.id for s in client.list_sessions()]
    with pytest.raises(ValueError, match="default dtype is float64"):
        optserve.RemoteOptimizer(mlp().parameters(), name, client, lr=1e-2)
    assert [s.id for s in client.list_sessions()] == before


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("where", ["options", "group", "added_group"])
def test_differentiable_adam_is_refused(client: optserve.Client, name: str, where: str) -> None:
    """Adam and AdamW with ``differentiable=True`` compute their bias corrections with the
    ``step`` tensor (``1 - beta1 ** step``), float64 here and float32 in the session: the steps
    differed silently (by about 3e-6 after four steps from torch's own run here on the same
    gradients), so such an optimizer, or group, is refused before the session sees it; a
    refused added group leaves the optimizer stepping as torch's."""
    w, other = torch.tensor([1.0, -2.0, 0.5]), torch.nn.Parameter(torch.zeros(2))
    remote_w = torch.nn.Parameter(w.clone())
    before = [s.id for s in client.list_sessions()]
    if where != "added_group":
        with pytest.raises(ValueError, match="differentiable=True"):
            if where == "options":
                optserve.RemoteOptimizer([remote_w], name, client, lr=0.1, differentiable=True)
            else:
                optserve.RemoteOptimizer([{"params": [remote_w]},
                                          {"params": [other], "differentiable": True}],
                                         name, client, lr=0.1)
        assert [s.id for s in client.list_sessions()] == before
        return
    remote = optserve.RemoteOptimizer([remote_w], name, client, lr=0.1)
    with pytest.raises(ValueError, match="differentiable=True"):
        remote.add_param_group({"params": [other], "differentiable": True})
    assert len(remote.param_groups) == 1
    assert len(client.get_session(remote.session_id).param_groups) == 1
    local_w = w.clone()
    local = getattr(torch.optim, name)([local_w], lr=0.1)
    for i in range(3):
        local_w.grad = torch.tensor([0.3, -0.7, 1.1]) * (i + 1)
        remote_w.grad = local_w.grad.clone()
        local.step()
        remote.step()
    assert torch.equal(remote_w.detach(), local_w)
