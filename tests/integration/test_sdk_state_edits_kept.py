"""Edits of a ``RemoteOptimizer``'s state that a local ``torch.optim`` optimizer keeps, kept by
the session too: a tensor of ``opt.state_dict()`` edited in place (torch's ``state_dict()``
holds its state's tensors themselves, so the edit is one of its state; the session's was left
as it was). Each run is compared with the same run on the local ``torch.optim`` optimizer. (An
edit not sent yet when ``pull_params()`` learns of another client's step is refused rather than
imported over that step: ``test_sdk_state_edit_conflicts.py``.)"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

import optserve
from tests.integration.test_sdk_dropin_edges import (
    assert_trained_alike,
    mlp,
    train,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def assert_state_equal(local: torch.optim.Optimizer, remote: optserve.RemoteOptimizer,
                       local_model: torch.nn.Module, remote_model: torch.nn.Module) -> None:
    """``opt.state`` of each parameter: the same keys, the tensors bitwise equal."""
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        a, b = local.state[p], remote.state[q]
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


@pytest.mark.parametrize(("optimizer", "options", "key"), [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ("Adam", {"lr": 0.01}, "exp_avg_sq"),
])
def test_a_state_dict_tensor_edited_in_place_is_an_edit_of_the_state(
        client: optserve.Client, optimizer: str, options: dict[str, float], key: str) -> None:
    """``opt.state_dict()["state"][0][key]`` scaled in place: a local optimizer's state holds
    the edit (its state dict holds the state's tensors), so ``opt.state`` shows it and the
    next steps use it; the session's does and steps as torch's."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    local = getattr(torch.optim, optimizer)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, client, **options)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
        sd = opt.state_dict()
        sd["state"][0][key].mul_(0.25)
        assert torch.equal(opt.state[model[0].weight][key], sd["state"][0][key])
    assert_state_equal(local, remote, local_model, remote_model)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 4))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)
