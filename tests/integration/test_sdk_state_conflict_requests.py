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
