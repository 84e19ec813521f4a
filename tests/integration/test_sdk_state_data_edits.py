"""Edits of a ``RemoteOptimizer``'s state through ``.data`` (which moves no version counter):
``opt.state_dict()["state"][0][key].data.mul_(...)``, ``opt.state[p][key].data.zero_()``,
``opt.state[p][key].data = t``. A local ``torch.optim`` optimizer's state holds such an edit (its
``state_dict()`` holds the state's tensors themselves), so the next steps use it; with
``detect_state_data_edits=True`` the session's does too: each state tensor handed out is
compared with a copy taken when it was read, and an edit is sent before the next step or
``state_dict()`` (it was neither sent nor seen: the next ``state_dict()`` was a 304 handing the
edited tensors out again as the session's, and the session stepped from its own; without the
option it still is, as the SDK's README says). Every run is
compared with the same run on the local optimizer, bit for bit; the session's own export (by
another client) too. Unedited, a second ``state_dict()`` is still a 304 and nothing is sent."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import optserve
from tests.integration.test_sdk_dropin_edges import assert_trained_alike, mlp, train
from tests.integration.test_sdk_state_edits_kept import assert_state_equal
from tests.integration.test_state_dict_not_modified import (  # noqa: F401 - fixture
    Recorded,
    recorded,
)

pytestmark = pytest.mark.integration


def _scaled(opt: torch.optim.Optimizer, model: torch.nn.Module, key: str) -> None:
    opt.state_dict()["state"][0][key].data.mul_(0.25)


def _zeroed(opt: torch.optim.Optimizer, model: torch.nn.Module, key: str) -> None:
    opt.state[model[2].bias][key].data.zero_()


def _assigned(opt: torch.optim.Optimizer, model: torch.nn.Module, key: str) -> None:
    t = opt.state[model[0].bias][key]
    t.data = torch.full_like(t, 0.125)


EDITS: dict[str, Callable[[torch.optim.Optimizer, torch.nn.Module, str], None]] = {
    "state_dict tensor .data.mul_": _scaled,
    "opt.state tensor .data.zero_": _zeroed,
    "opt.state tensor .data = t": _assigned,
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize(("optimizer", "options", "key"), [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ("Adam", {"lr": 0.01}, "exp_avg_sq"),
])
def test_a_state_tensor_edited_through_data_is_an_edit_of_the_state(
        recorded: Recorded,  # noqa: F811 - the fixture
        optimizer: str, options: dict[str, float], key: str,
        edit: str) -> None:
    """Two steps, the state read (``state_dict()``), the edit through ``.data``, the state
    read again: it shows the edit, sent to the session first (an import, then a whole read:
    no 304 for a state the session no longer holds); the session's own export is torch's
    edited state, and two more steps train as torch does."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    local = getattr(torch.optim, optimizer)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, recorded.client,
                                      detect_state_data_edits=True, **options)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
        opt.state_dict()
    recorded.answers.clear()
    for model, opt in ((local_model, local), (remote_model, remote)):
        EDITS[edit](opt, model, key)
    remote.state_dict()
    sent = [(method, path.rsplit("/", 1)[-1], status) for method, path, status in
            recorded.answers]
    assert ("PUT", "state_dict", 200) in sent, sent  # (the edit, sent)
    assert recorded.state_reads()[-1] == 200, sent  # (then read whole)
    assert_state_equal(local, remote, local_model, remote_model)
    with optserve.Client(str(recorded.client.base_url), max_retries=0) as other:
        theirs = other.export_state(remote.session_id)
    for index, entry in local.state_dict()["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(theirs["state"][index][k]), v), (index, k)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 4))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def test_an_unedited_state_is_not_sent_nor_read_again(
        recorded: Recorded) -> None:  # noqa: F811 - the fixture
    """Read twice with nothing between (the values compared, equal): the second read is a
    304, nothing imported; the state is torch's."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", recorded.client,
                                      detect_state_data_edits=True, lr=0.01)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    remote.state_dict()
    _ = remote.state[remote_model[0].weight]["exp_avg"]
    recorded.answers.clear()
    remote.state_dict()
    assert [method for method, _, _ in recorded.answers] == ["GET"]
    assert recorded.state_reads() == [304]
    assert_state_equal(local, remote, local_model, remote_model)
    remote.close(delete_session=True)


def test_a_workers_edit_through_data_stays_local_and_is_read_over(
        recorded: Recorded) -> None:  # noqa: F811 - the fixture
    """A parameter-server worker's edits of the state are never sent (they would put its state
    over the other workers' steps): edited through ``.data``, the next ``state_dict()`` is read
    whole (no 304 handing the edited tensors out as the session's), as after an edit in
    place, and holds the session's state: torch's after the same steps, unedited."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    sid = recorded.client.create_session(
        "Adam", {n: p.detach().clone() for n, p in local_model.named_parameters()},
        options={"lr": 0.01}).id
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = optserve.RemoteOptimizer(remote_model.named_parameters(), client=recorded.client,
                                      session_id=sid, worker="w0",
                                      detect_state_data_edits=True)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    for edit in (lambda t: t.data.mul_(0.25), lambda t: t.mul_(0.25)):
        edited = remote.state_dict()["state"][0]["exp_avg"]
        edit(edited)
        recorded.answers.clear()
        sd = remote.state_dict()
        assert recorded.state_reads() == [200]
        assert all(method == "GET" for method, _, _ in recorded.answers)  # (nothing sent)
        assert sd["state"][0]["exp_avg"] is not edited
        for index, entry in local.state_dict()["state"].items():
            for k, v in entry.items():
                assert torch.equal(torch.as_tensor(sd["state"][index][k]), v), (index, k)
    recorded.client.delete_session(sid)
