"""Assigning to ``RemoteOptimizer.state`` (``opt.state = defaultdict(dict)``, as some training
code resets an optimizer): the session's state becomes the assigned one, in one import, and
training goes on bit for bit as a local ``torch.optim`` optimizer whose ``state`` was replaced
the same way; what cannot be loaded is refused before or by the server, the session as it was."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture
def requests(live_server: str) -> Iterator[tuple[optserve.Client, list[str]]]:
    """A client over HTTP and the log of its requests (``"GET state_dict"``, ...)."""
    log: list[str] = []
    hook = lambda r: log.append(f"{r.method} {r.url.path.rsplit('/', 1)[-1]}")  # noqa: E731
    with httpx.Client(event_hooks={"request": [hook]}) as http, \
            optserve.Client(live_server, http_client=http, transport="http",
                            max_retries=0) as client:
        yield client, log


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range,
          sched: Any = None) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(10 + i)
        x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_same(local_model: nn.Module, local: torch.optim.Optimizer, remote_model: nn.Module,
                remote: optserve.RemoteOptimizer) -> None:
    """Parameters and per-parameter state equal bit for bit (the state through opt.state)."""
    pairs = list(zip(local_model.parameters(), remote_model.parameters(), strict=True))
    for p, q in pairs:
        assert torch.equal(p, q)
    assert len(remote.state) == len(local.state)
    for p, q in pairs:
        assert remote.state[q].keys() == local.state[p].keys()
        for key, value in local.state[p].items():
            assert torch.equal(torch.as_tensor(remote.state[q][key]), torch.as_tensor(value)), key


@pytest.mark.parametrize(("name", "options"), [
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("RMSprop", {"lr": 1e-2, "centered": True}),
    ("Adagrad", {"lr": 1e-2, "lr_decay": 0.01, "initial_accumulator_value": 0.1})])
def test_an_empty_state_resets_the_session_as_a_local_optimizer(
        requests: tuple[optserve.Client, list[str]], name: str, options: dict[str, Any]
) -> None:
    """``opt.state = defaultdict(dict)`` after 3 steps, with an lr changed locally and not yet
    sent: the next 3 steps equal a local optimizer's that did the same (its state made afresh
    at the next step, the new lr used); one GET of the session and one import, and the state
    read right after it is empty without a fetch."""
    client, log = requests
    local_model, remote_model = mlp(), mlp()
    local = getattr(torch.optim, name)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), name, client, **options)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3))
        opt.param_groups[0]["lr"] = options["lr"] / 2
    assert len(remote.state) == 4  # (the session holds a state to reset)
    version = client.get_session(remote.session_id).version
    log.clear()
    local.state = defaultdict(dict)
    remote.state = defaultdict(dict)
    assert log == ["GET " + remote.session_id, "PUT state_dict"]
    assert len(remote.state) == 0 and dict(remote.state) == {}
    assert log == ["GET " + remote.session_id, "PUT state_dict"]  # (known empty: no fetch)
    assert client.export_state(remote.session_id)["state"] == {}
    info = client.get_session(remote.session_id)
    assert info.version == version + 1 and info.param_groups[0].lr == options["lr"]
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 6))
    assert_same(local_model, local, remote_model, remote)
    assert client.get_session(remote.session_id).param_groups[0].lr == options["lr"] / 2
    remote.close(delete_session=True)


def test_a_reset_keeps_the_server_scheduler_and_group_options(
        requests: tuple[optserve.Client, list[str]]) -> None:
    """A session running StepLR on the server, two param groups: resetting the state leaves
    the scheduler's count and every group's options (``initial_lr`` too) as they were, and
    training goes on as a local Adam with a local StepLR whose state was reset."""
    client, _ = requests
    local_model, remote_model = mlp(), mlp()

    def groups(model: nn.Sequential) -> list[dict[str, Any]]:
        return [{"params": list(model[0].parameters())},
                {"params": list(model[2].parameters()), "lr": 3e-2, "betas": (0.8, 0.9)}]
    local = torch.optim.Adam(groups(local_model), lr=1e-2)
    sched = lrs.StepLR(local, step_size=2, gamma=0.5)
    remote = optserve.RemoteOptimizer(groups(remote_model), "Adam", client, lr=1e-2,
                                      scheduler={"name": "StepLR",
                                                 "options": {"step_size": 2, "gamma": 0.5}})
    train(local_model, local, range(3), sched)
    train(remote_model, remote, range(3))
    before = client.get_session(remote.session_id)
    local.state = defaultdict(dict)
    remote.state = defaultdict(dict)
    after = client.get_session(remote.session_id)
    assert [g.options for g in after.param_groups] == [g.options for g in before.param_groups]
    assert after.scheduler == before.scheduler and after.step == before.step == 3
    train(local_model, local, range(3, 7), sched)
    train(remote_model, remote, range(3, 7))
    assert_same(local_model, local, remote_model, remote)
    assert [g["lr"] for g in remote.param_groups] == sched.get_last_lr()
    remote.close(delete_session=True)


def test_a_mapping_of_states_loads_as_torch_uses_it(
        requests: tuple[optserve.Client, list[str]]) -> None:
    """``opt.state = {p: {...}, ...}`` with the state another run made, for two of the four
    parameters (the others' made afresh at their next step): the session holds it, the view
    reads it back, and training goes on as a local Adam given the same mapping."""
    client, log = requests
    donor_model = mlp()
    donor = torch.optim.Adam(donor_model.parameters(), lr=5e-2)
    train(donor_model, donor, range(20, 24))
    donated = [donor.state[p] for p in donor_model.parameters()][:2]
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
        opt.state = defaultdict(dict, {p: copy.deepcopy(s) for p, s in
                                       zip(model.parameters(), donated, strict=False)})
    log.clear()
    assert_same(local_model, local, remote_model, remote)  # read back: one fetch
    assert log.count("GET state_dict") == 1
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 5))
    assert_same(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def test_what_cannot_be_loaded_is_refused_and_changes_nothing(
        requests: tuple[optserve.Client, list[str]]) -> None:
    """Not a mapping, a key that is not one of this optimizer's parameters (a copy of one), an
    entry that is not a dict: ``TypeError``/``ValueError`` before anything is sent; a state the
    server cannot load (a wrong shape): its ``ValidationError``. Each time the session and the
    view are as they were, and training goes on as a local optimizer's that never assigned;
    assigning the view to itself sends nothing."""
    client, log = requests
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    first = next(remote_model.parameters())
    kept = {p: copy.deepcopy(s) for p, s in remote.state.items()}
    version = client.get_session(remote.session_id).version
    log.clear()
    with pytest.raises(TypeError, match="mapping of this optimizer's parameters"):
        remote.state = [{}]  # type: ignore[assignment]
    with pytest.raises(ValueError, match="not one of them"):
        remote.state = {first.detach().clone(): {}}
    with pytest.raises(ValueError, match="not one of them"):
        remote.state = {0: {}}  # type: ignore[assignment]
    with pytest.raises(TypeError, match="must be a dict"):
        remote.state = {first: 1.0}
    remote.state = remote.state
    assert log == []
    bad = {**kept[first], "exp_avg": torch.zeros(99)}
    with pytest.raises(optserve.ValidationError) as refused:
        remote.state = {first: bad}
    assert refused.value.code == "state_mismatch"
    assert client.get_session(remote.session_id).version == version
    assert len(remote.state) == 4
    for p, state in kept.items():
        for key, value in state.items():
            assert torch.equal(remote.state[p][key], value), key
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 4))
    assert_same(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def test_a_worker_that_resets_the_state_pushes_on(
        requests: tuple[optserve.Client, list[str]]) -> None:
    """A parameter-server worker resetting the state: the import changes no parameter, so its
    parameters are those of the import's version and its next push (naming that version) is
    taken, not refused as computed before the import; it steps as a local Adam reset the same
    way, and so does a ``load_state_dict`` of the state it had before."""
    client, _ = requests
    local_model, remote_model = mlp(), mlp()
    named = dict(remote_model.named_parameters())
    sid = client.create_session("Adam", {n: p.detach().clone() for n, p in named.items()},
                                options={"lr": 1e-2}).id
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.named_parameters(), client=client,
                                      session_id=sid, worker="w0")
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    saved = remote.state_dict()
    for model, opt in ((local_model, local), (remote_model, remote)):
        opt.state = defaultdict(dict)
        assert opt.state == {}
        train(model, opt, range(2, 4))
    assert remote.version == client.get_session(sid).version
    assert_same(local_model, local, remote_model, remote)
    local.load_state_dict(copy.deepcopy(saved))
    remote.load_state_dict(saved)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(4, 6))
    assert_same(local_model, local, remote_model, remote)
    client.delete_session(sid)


def test_a_reset_racing_a_patch_from_another_client_does_not_revert_it(
        requests: tuple[optserve.Client, list[str]], live_server: str) -> None:
    """Another client PATCHes the lr between the reset's ``GET`` of the session and its import
    (a hook on the ``GET``, once): the import, conditional on what the ``GET`` saw, is refused
    (412) and made again after a new ``GET``; the session keeps the PATCHed lr with its state
    reset (one import applied), and its next step equals a local Adam's given the same lr and
    reset. (Before, the import wrote back the lr the first ``GET`` had read.)"""
    client, log = requests
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3))
    version = client.get_session(remote.session_id).version
    real_get = client.get_session
    races = [0.003]

    def get_then_patch(session_id: str) -> Any:
        info = real_get(session_id)
        if races:
            with optserve.Client(live_server, transport="http") as other:
                other.update_param_group(session_id, 0, lr=races.pop())
        return info

    client.get_session = get_then_patch  # type: ignore[method-assign]
    log.clear()
    remote.state = defaultdict(dict)
    client.get_session = real_get  # type: ignore[method-assign]
    assert log == ["GET " + remote.session_id, "PUT state_dict"] * 2
    info = client.get_session(remote.session_id)
    assert info.param_groups[0].lr == 0.003  # (not the 1e-2 the first GET saw)
    assert info.version == version + 1
    assert client.export_state(remote.session_id)["state"] == {}
    local.param_groups[0]["lr"] = 0.003
    local.state = defaultdict(dict)
    g = torch.Generator().manual_seed(77)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
    local.zero_grad()
    F.mse_loss(local_model(x), y).backward()
    local.step()
    names = info.param_names
    grads = {n: p.grad for n, p in zip(names, local_model.parameters(), strict=True)}
    out = client.step(remote.session_id, grads)
    assert out.params is not None
    for n, p in zip(names, local_model.parameters(), strict=True):
        assert torch.equal(torch.as_tensor(out.params[n]), p.detach()), n
    remote.close(delete_session=True)


def test_a_reset_that_keeps_losing_the_race_raises_and_changes_nothing(
        requests: tuple[optserve.Client, list[str]], live_server: str) -> None:
    """Another client steps the scheduler by hand after every ``GET`` the reset makes (the
    version stays, the revision moves): after three refused imports the reset raises
    ``PreconditionFailedError`` (412, ``field`` ``base_revision``); the state is not reset and
    the lr is the other client's."""
    client, log = requests
    remote_model = mlp()
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2,
                                      scheduler={"name": "StepLR",
                                                 "options": {"step_size": 1, "gamma": 0.5}})
    train(remote_model, remote, range(2))
    kept = {p: copy.deepcopy(s) for p, s in remote.state.items()}
    real_get = client.get_session

    def get_then_step_scheduler(session_id: str) -> Any:
        info = real_get(session_id)
        with optserve.Client(live_server, transport="http") as other:
            other.scheduler_step(session_id)
        return info

    client.get_session = get_then_step_scheduler  # type: ignore[method-assign]
    log.clear()
    with pytest.raises(optserve.PreconditionFailedError) as refused:
        remote.state = defaultdict(dict)
    client.get_session = real_get  # type: ignore[method-assign]
    assert refused.value.status_code == 412 and refused.value.field == "base_revision"
    assert log == ["GET " + remote.session_id, "PUT state_dict"] * 3
    info = client.get_session(remote.session_id)
    assert info.param_groups[0].lr == 1e-2 * 0.5 ** 5  # (two steps, three scheduler steps)
    assert len(remote.state) == 4
    for p, state in kept.items():
        for key, value in state.items():
            assert torch.equal(remote.state[p][key], value), key
    remote.close(delete_session=True)
