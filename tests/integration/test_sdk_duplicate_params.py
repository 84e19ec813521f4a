"""A parameter listed twice in one param group (``[w, b, w]``, ``list(model.parameters()) +
list(model.head.parameters())``). torch takes it with a deprecation warning ("in future, this
will cause an error", pytorch/pytorch#40967) and steps that tensor once for each time it is
listed. A session holds each listed entry as a parameter of its own and steps each once, and
the SDK copied both answers into the one tensor: training went on silently unlike torch's.
``RemoteOptimizer`` now refuses such a group (``ValueError`` naming the parameter's index, at
construction and in ``add_param_group``) before anything is sent; the optimizer is left as it
was. What torch does is checked here in-process, at test time."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve
from tests.integration import test_sdk_torch_integrations as integrations

pytestmark = pytest.mark.integration


client = integrations.client  # (the fixture and the model the SDK's integration tests use)
mlp = integrations.mlp


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for i in range(steps):
        x, y = integrations.data(i)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_torch_steps_a_parameter_listed_twice_twice() -> None:
    """Why it cannot be taken: torch's step is not one step of each tensor."""
    once, twice = mlp(), mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dup = torch.optim.SGD([*twice.parameters(), twice[2].weight], lr=0.1)
    assert any("duplicate parameters" in str(w.message) for w in caught)
    train(once, torch.optim.SGD(once.parameters(), lr=0.1), 1)
    train(twice, dup, 1)
    assert torch.equal(once[0].weight, twice[0].weight)
    assert not torch.equal(once[2].weight, twice[2].weight)


@pytest.mark.parametrize("named", [False, True])
def test_a_parameter_listed_twice_in_a_group_is_refused_before_a_session_is_made(
        client: optserve.Client, named: bool) -> None:
    model = mlp()
    params: list[object] = list(model.parameters())
    if named:
        params = [*model.named_parameters(), ("again", model[0].weight)]
    else:
        params.append(model[0].weight)
    before = {s.id for s in client.list_sessions()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own deprecation warning)
        with pytest.raises(ValueError, match=r"param_groups\[0\].*index 4 .*index 0"):
            optserve.RemoteOptimizer(params, "SGD", client, lr=0.1)  # type: ignore[arg-type]
    assert {s.id for s in client.list_sessions()} == before


def test_a_group_added_with_a_parameter_twice_is_refused_and_nothing_changes(
        client: optserve.Client) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model[0].parameters(), lr=0.01)
    remote = optserve.RemoteOptimizer(remote_model[0].parameters(), "Adam", client, lr=0.01)
    train(local_model, local, 2)
    train(remote_model, remote, 2)
    version = client.get_session(remote.session_id).version
    head = remote_model[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"param_groups\[1\].*index 2 .*index 0"):
            remote.add_param_group({"params": [head.weight, head.bias, head.weight]})
    assert len(remote.param_groups) == 1
    info = client.get_session(remote.session_id)
    assert info.version == version and len(info.param_groups) == 1
    # the optimizer goes on as torch's, and takes the group listed once
    local.add_param_group({"params": list(local_model[2].parameters())})
    remote.add_param_group({"params": list(head.parameters())})
    train(local_model, local, 2)
    train(remote_model, remote, 2)
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(p, q)
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert local_sd["param_groups"] == remote_sd["param_groups"]
    for pid, entry in local_sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(remote_sd["state"][pid][key], value), (pid, key)
