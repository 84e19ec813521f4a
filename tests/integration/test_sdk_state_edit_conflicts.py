"""Two clients on one session: an edit of ``RemoteOptimizer.state`` made on a view read before
the other client stepped is refused (``PreconditionFailedError``, the edit dropped), never
imported over that client's step (a lost update); with no step in between it is imported and
applies as on a local ``torch.optim`` optimizer. The view is read either as ``opt.state`` or as
a tensor of ``opt.state_dict()`` (an edit of the state too). Each run is compared bitwise with
``torch.optim`` running exactly the steps the session took."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

import optserve
from tests.integration.test_sdk_dropin_edges import assert_trained_alike, backward, mlp, train
from tests.integration.test_sdk_state_edits_kept import assert_state_equal

pytestmark = pytest.mark.integration

OPTIMIZERS = [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ("Adam", {"lr": 0.01}, "exp_avg"),
]


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


@pytest.fixture
def other_client(live_server: str) -> Iterator[optserve.Client]:
    """Client B: another client of the same server (its own connections)."""
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def read_state_tensor(remote: optserve.RemoteOptimizer, model: torch.nn.Sequential, key: str,
                      how: str) -> torch.Tensor:
    """``opt.state[w][key]`` of the first layer's weight as client A reads it: through
    ``opt.state`` or ``opt.state_dict()`` (whose tensors are the state's)."""
    if how == "state":
        return remote.state[model[0].weight][key]
    tensor: torch.Tensor = remote.state_dict()["state"][0][key]
    return tensor


def started(optimizer: str, options: dict[str, float], client: optserve.Client
            ) -> tuple[torch.nn.Sequential, torch.optim.Optimizer,
                       torch.nn.Sequential, optserve.RemoteOptimizer]:
    """A local model and optimizer and client A's remote pair, trained alike for two steps."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    local = getattr(torch.optim, optimizer)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, client, **options)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    return local_model, local, remote_model, remote


@pytest.mark.parametrize("pull", [False, True], ids=["no pull", "pull"])
@pytest.mark.parametrize("how", ["state", "state_dict"])
@pytest.mark.parametrize(("optimizer", "options", "key"), OPTIMIZERS)
def test_an_edit_of_a_state_read_before_another_clients_step_is_refused(
        client: optserve.Client, other_client: optserve.Client, optimizer: str,
        options: dict[str, float], key: str, how: str, pull: bool) -> None:
    """A reads the state, B steps the session, A halves the tensor it read and steps (after
    ``pull_params()``, which learns B's version, or not): A's step raises
    ``PreconditionFailedError`` saying another client changed the session and the edit was
    not applied; the session holds exactly torch's two steps and B's (not A's edit, not A's
    step). ``opt.state`` then reads the session's state, and training goes on as torch's."""
    local_model, local, remote_model, remote = started(optimizer, options, client)
    tensor = read_state_tensor(remote, remote_model, key, how)
    read_at = remote.version
    # B's step, taken by the local optimizer too
    local.zero_grad()
    backward(local_model, 7)
    names = other_client.get_session(remote.session_id).param_groups[0].params
    grads = {name: p.grad.clone() for name, p in zip(names, local_model.parameters(),
                                                      strict=True) if p.grad is not None}
    assert len(grads) == len(names)
    local.step()
    stepped = other_client.step(remote.session_id, grads, return_params=False)
    assert stepped.version == read_at + 1
    if pull:
        remote.pull_params()
    with torch.no_grad():
        tensor.mul_(0.5)
    remote.zero_grad()
    backward(remote_model, 2)
    with pytest.raises(optserve.PreconditionFailedError) as raised:
        remote.step()
    message = str(raised.value)
    assert raised.value.status_code == 412
    assert f"read at session version {read_at}" in message
    assert "another client changed the session" in message
    assert "the edit was not applied" in message
    assert other_client.get_session(remote.session_id).version == read_at + 1
    # the session: torch's two steps and B's, bitwise (A's edit and step not in it)
    session = other_client.export_state(remote.session_id)
    local_sd = local.state_dict()
    assert set(session["state"]) == set(local_sd["state"])
    for index, entry in local_sd["state"].items():
        assert set(session["state"][index]) == set(entry)
        for k, value in entry.items():
            assert torch.equal(torch.as_tensor(session["state"][index][k]),
                               torch.as_tensor(value)), (index, k)
    params = other_client.get_params(remote.session_id).params
    for name, p in zip(names, local_model.parameters(), strict=True):
        assert torch.equal(torch.as_tensor(params[name]), p.detach()), name
    # the edit was dropped: opt.state reads the session's state as it now is
    remote.pull_params()
    assert_state_equal(local, remote, local_model, remote_model)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 5))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


@pytest.mark.parametrize("how", ["state", "state_dict"])
@pytest.mark.parametrize(("optimizer", "options", "key"), OPTIMIZERS)
def test_an_edit_with_no_step_in_between_applies_as_torchs(
        client: optserve.Client, other_client: optserve.Client, optimizer: str,
        options: dict[str, float], key: str, how: str) -> None:
    """A reads the state, B only reads the session (its state dict and parameters: no new
    version), A halves the tensor it read and trains on: the edit is imported, and every
    step after goes as torch's with the same edit."""
    local_model, local, remote_model, remote = started(optimizer, options, client)
    tensor = read_state_tensor(remote, remote_model, key, how)
    other_client.export_state(remote.session_id)
    other_client.get_params(remote.session_id)
    with torch.no_grad():
        tensor.mul_(0.5)
        local.state[local_model[0].weight][key].mul_(0.5)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 4))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)
