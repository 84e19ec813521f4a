"""What a ``RemoteOptimizer`` sends when another client moved its session under an edit of
``opt.state`` (or under a call that sends one): the write-back's refusal is made from the ``GET``
that already shows the session moved (no upload of the whole state only for the server's 412),
``add_param_group`` is all or nothing around it, and ``load_state_dict`` replaces the state as
torch's does, whatever another client did since this one read it. Each run is compared bitwise
with ``torch.optim`` running exactly the steps the session took; the requests each client sent
are recorded by an httpx event hook on its own connections."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest
import torch

import optserve
from tests.integration.test_sdk_dropin_edges import assert_trained_alike, backward, mlp, train
from tests.integration.test_sdk_state_edit_conflicts import started
from tests.integration.test_sdk_state_edits_kept import assert_state_equal

pytestmark = pytest.mark.integration

OPTIMIZERS = [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ("Adam", {"lr": 0.01}, "exp_avg"),
]


class Recorded:
    """A client whose requests are listed as ``"METHOD /path"`` (query left out)."""

    def __init__(self, url: str) -> None:
        self.sent: list[str] = []
        self.http = httpx.Client(event_hooks={"request": [self._record]}, timeout=60)
        self.client = optserve.Client(url, max_retries=0, http_client=self.http)

    def _record(self, request: httpx.Request) -> None:
        self.sent.append(f"{request.method} {request.url.path}")

    def imports(self) -> list[str]:
        return [r for r in self.sent if r.startswith("PUT ") and r.endswith("/state_dict")]


@pytest.fixture
def recorded(live_server: str) -> Iterator[Recorded]:
    r = Recorded(live_server)
    try:
        yield r
    finally:
        r.client.close()
        r.http.close()


@pytest.fixture
def other_client(live_server: str) -> Iterator[optserve.Client]:
    """Client B: another client of the same server (its own connections)."""
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def other_step(local_model: torch.nn.Sequential, local: torch.optim.Optimizer,
               other: optserve.Client, session_id: str) -> int:
    """Client B's step of the session, taken by the local optimizer too; its new version."""
    local.zero_grad()
    backward(local_model, 7)
    names = other.get_session(session_id).param_groups[0].params
    grads = {name: p.grad.clone() for name, p in zip(names, local_model.parameters(),
                                                      strict=True) if p.grad is not None}
    local.step()
    return other.step(session_id, grads, return_params=False).version


def assert_session_is_torchs(other: optserve.Client, session_id: str,
                             local_model: torch.nn.Sequential,
                             local: torch.optim.Optimizer) -> None:
    """The session's state and parameters bitwise the local optimizer's and model's."""
    session = other.export_state(session_id)
    local_sd = local.state_dict()
    assert set(session["state"]) == set(local_sd["state"])
    for index, entry in local_sd["state"].items():
        assert set(session["state"][index]) == set(entry)
        for k, value in entry.items():
            assert torch.equal(torch.as_tensor(session["state"][index][k]),
                               torch.as_tensor(value)), (index, k)
    names = other.get_session(session_id).param_groups[0].params
    params = other.get_params(session_id).params
    for name, p in zip(names, local_model.parameters(), strict=True):
        assert torch.equal(torch.as_tensor(params[name]), p.detach()), name


@pytest.mark.parametrize("pull", [False, True], ids=["no pull", "pull"])
@pytest.mark.parametrize(("optimizer", "options", "key"), OPTIMIZERS)
def test_a_stale_edit_is_refused_without_uploading_the_state(
        recorded: Recorded, other_client: optserve.Client, optimizer: str,
        options: dict[str, float], key: str, pull: bool) -> None:
    """A reads the state, B steps, A halves the tensor it read (after ``pull_params()``, which
    learns B's version, or not) and steps: the ``PreconditionFailedError`` says what it said
    when the server refused the import (the server's own 412 problem for that ``If-Match``, got
    here from B's conditional import), but A sent no ``PUT .../state_dict``: its ``GET`` of the
    session already showed the edit stale. The session holds torch's steps and B's; training
    goes on as torch's."""
    local_model, local, remote_model, remote = started(optimizer, options, recorded.client)
    tensor = remote.state[remote_model[0].weight][key]
    read_at = remote.version
    assert other_step(local_model, local, other_client, remote.session_id) == read_at + 1
    if pull:
        remote.pull_params()
    with torch.no_grad():
        tensor.mul_(0.5)
    remote.zero_grad()
    backward(remote_model, 2)
    recorded.sent.clear()
    with pytest.raises(optserve.PreconditionFailedError) as raised:
        remote.step()
    assert recorded.imports() == []
    assert recorded.sent == [f"GET /v1/sessions/{remote.session_id}"]
    error = raised.value
    message = str(error)
    assert message.startswith("412 opt.state was edited after it was read at session version "
                              f"{read_at}, but another client changed the session since (it "
                              f"is at version {read_at + 1} now): the edit was not applied")
    # the problem is the server's own 412 to that import (B's, from the head: nothing sent
    # after it matters), but for the words of its request id
    with pytest.raises(optserve.PreconditionFailedError) as server:
        other_client.import_state(remote.session_id, other_client.export_state(
            remote.session_id), base_version=read_at)
    assert error.problem == {k: v for k, v in server.value.problem.items()
                             if k not in ("instance", "request_id")}
    assert error.status_code == 412 and error.code == "precondition_failed"
    assert error.field == "If-Match"
    for header in ("ETag", "X-Optserve-Version", "X-Optserve-Step", "X-Optserve-Revision"):
        assert error.response.headers[header] == server.value.response.headers[header]
    assert_session_is_torchs(other_client, remote.session_id, local_model, local)
    # the edit was dropped: opt.state reads the session's state as it now is
    remote.pull_params()
    assert_state_equal(local, remote, local_model, remote_model)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 5))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def first_layer_pair(optimizer: str, client: optserve.Client
                     ) -> tuple[torch.nn.Sequential, torch.optim.Optimizer,
                                torch.optim.lr_scheduler.StepLR, torch.nn.Sequential,
                                optserve.RemoteOptimizer, torch.optim.lr_scheduler.StepLR]:
    """A local and a remote optimizer of the first layer only, with a tensor lr (shared by the
    defaults and the group, as torch keeps it) and a local StepLR each (not stepped yet),
    trained alike for two steps."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    options = {"lr": torch.tensor(0.01), **({"momentum": 0.9} if optimizer == "SGD" else {})}
    local = getattr(torch.optim, optimizer)(local_model[0].parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model[0].parameters(), optimizer, client,
                                      **copy.deepcopy(options))
    local_sched = torch.optim.lr_scheduler.StepLR(local, step_size=1, gamma=0.5)
    remote_sched = torch.optim.lr_scheduler.StepLR(remote, step_size=1, gamma=0.5)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    return local_model, local, local_sched, remote_model, remote, remote_sched


def train_scheduled(model: torch.nn.Sequential, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.StepLR, steps: range) -> None:
    for i in steps:
        opt.zero_grad()
        backward(model, i)
        opt.step()
        sched.step()


@pytest.mark.parametrize(("optimizer", "key"), [("SGD", "momentum_buffer"), ("Adam", "exp_avg")])
def test_add_param_group_refused_by_a_stale_edit_applies_nothing(
        recorded: Recorded, other_client: optserve.Client, optimizer: str, key: str) -> None:
    """A reads the state, B steps, A edits the state, A's scheduler fills the tensor lr in
    place (the defaults' too) and A adds a group: ``PreconditionFailedError``, and nothing of
    the addition happened, on the server (its revision, its group's lr: not the fill, which
    is A's to send with its next step) or here (one group, the lr as the scheduler left it).
    Pulled, added again, then trained: bitwise torch's, which added the group once."""
    local_model, local, local_sched, remote_model, remote, remote_sched = first_layer_pair(
        optimizer, recorded.client)
    session_id = remote.session_id
    tensor = remote.state[remote_model[0].weight][key]
    # B's step, taken by the local optimizer too
    local.zero_grad()
    backward(local_model, 7)
    names = other_client.get_session(session_id).param_groups[0].params
    other_client.step(session_id, {name: p.grad.clone() for name, p in zip(
        names, local_model[0].parameters(), strict=True)}, return_params=False)
    local.step()
    with torch.no_grad():
        tensor.mul_(0.5)
    for sched in (local_sched, remote_sched):
        sched.step()  # (fills the tensor lr in place: the group's and the defaults')
    before = other_client.get_session(session_id)
    recorded.sent.clear()
    with pytest.raises(optserve.PreconditionFailedError, match="the edit was not applied"):
        remote.add_param_group({"params": list(remote_model[2].parameters())})
    assert [r for r in recorded.sent if not r.startswith("GET ")] == []
    after = other_client.get_session(session_id)
    assert (after.version, after.revision) == (before.version, before.revision)
    assert len(after.param_groups) == 1
    assert float(after.param_groups[0].options["lr"]) == float(before.param_groups[0]
                                                                .options["lr"])
    assert float(after.param_groups[0].options["lr"]) != float(local.param_groups[0]["lr"])
    assert len(remote.param_groups) == 1
    assert torch.equal(remote.param_groups[0]["lr"], local.param_groups[0]["lr"])
    assert_session_is_torchs_layer(other_client, session_id, local_model, local)
    # B's step into A's model; added again (the edit dropped: nothing pending), as torch
    # adds it once
    remote.pull_params()
    local.add_param_group({"params": list(local_model[2].parameters())})
    remote.add_param_group({"params": list(remote_model[2].parameters())})
    for model, opt, sched in ((local_model, local, local_sched),
                              (remote_model, remote, remote_sched)):
        train_scheduled(model, opt, sched, range(3, 6))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


@pytest.mark.parametrize(("optimizer", "key"), [("SGD", "momentum_buffer"), ("Adam", "exp_avg")])
def test_add_param_group_after_an_edit_and_a_fill_is_torchs(
        recorded: Recorded, optimizer: str, key: str) -> None:
    """No other client: A edits the state, its scheduler fills the tensor lr in place and A
    adds a group (the edit sent first, then the fill, then the group, which starts from the
    filled default): trained on, bitwise torch's doing the same."""
    local_model, local, local_sched, remote_model, remote, remote_sched = first_layer_pair(
        optimizer, recorded.client)
    with torch.no_grad():
        for model, opt in ((local_model, local), (remote_model, remote)):
            opt.state[model[0].weight][key].mul_(0.5)
    for model, opt, sched in ((local_model, local, local_sched),
                              (remote_model, remote, remote_sched)):
        sched.step()
        opt.add_param_group({"params": list(model[2].parameters())})
    assert recorded.imports() != []  # (the edit was sent)
    for model, opt, sched in ((local_model, local, local_sched),
                              (remote_model, remote, remote_sched)):
        train_scheduled(model, opt, sched, range(3, 6))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def assert_session_is_torchs_layer(other: optserve.Client, session_id: str,
                                   local_model: torch.nn.Sequential,
                                   local: torch.optim.Optimizer) -> None:
    """The session (of the first layer) bitwise the local optimizer's state and layer."""
    session = other.export_state(session_id)
    local_sd = local.state_dict()
    assert set(session["state"]) == set(local_sd["state"])
    for index, entry in local_sd["state"].items():
        for k, value in entry.items():
            assert torch.equal(torch.as_tensor(session["state"][index][k]),
                               torch.as_tensor(value)), (index, k)
    names = other.get_session(session_id).param_groups[0].params
    params = other.get_params(session_id).params
    for name, p in zip(names, local_model[0].parameters(), strict=True):
        assert torch.equal(torch.as_tensor(params[name]), p.detach()), name


@pytest.mark.parametrize("other_stepped", [False, True], ids=["alone", "other stepped"])
@pytest.mark.parametrize(("optimizer", "options", "key"), OPTIMIZERS)
def test_load_state_dict_replaces_an_unsent_edit_as_torchs(
        recorded: Recorded, other_client: optserve.Client, optimizer: str,
        options: dict[str, float], key: str, other_stepped: bool) -> None:
    """A resumes from a checkpoint (``model.load_state_dict``, then ``opt.load_state_dict``)
    with an edit of ``opt.state`` not sent yet, read before B stepped (or with no other
    client): torch's load replaces the state whole, edit and all, so the load is one import
    (the edit is not sent first, nor refused as stale: a load is no edit of what was read),
    and training goes on bitwise as torch's resumed from the same checkpoint."""
    local_model, local, remote_model, remote = started(optimizer, options, recorded.client)
    model_ckpt = copy.deepcopy(local_model.state_dict())
    opt_ckpt = copy.deepcopy(local.state_dict())
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 3))
    tensor = remote.state[remote_model[0].weight][key]
    if other_stepped:
        other_step(local_model, local, other_client, remote.session_id)
    with torch.no_grad():
        tensor.mul_(0.5)
        local.state[local_model[0].weight][key].mul_(0.5)
    recorded.sent.clear()
    for model, opt in ((local_model, local), (remote_model, remote)):
        model.load_state_dict(copy.deepcopy(model_ckpt))
        opt.load_state_dict(copy.deepcopy(opt_ckpt))
    assert len(recorded.imports()) == 1
    assert_session_is_torchs(other_client, remote.session_id, local_model, local)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 6))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)
