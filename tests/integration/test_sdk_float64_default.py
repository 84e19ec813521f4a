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

import numpy as np
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
    assert_same_state(local, remote)
    assert_same_dtypes(local, remote)  # (float64 counts, as torch's: the checkpoint's)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("count", [2**24 + 1, float(2**24 + 1)], ids=["int", "float"])
def test_a_count_float32_cannot_hold_given_as_a_number_loads_as_torch(
        client: optserve.Client, count: float) -> None:
    """A checkpoint whose ``step`` counts are Python numbers (as torch before 1.12 saved
    them) that float32 cannot hold exactly: torch's ``load_state_dict`` makes each a float64
    tensor here (``Adam.__setstate__``), and so does the SDK; it sent the number, refused
    with a 422 "expected a tensor of shape []". Training goes on bitwise as torch's, the
    counts float64 as torch's."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    steps(local_model, local, range(2))
    checkpoint = copy.deepcopy(local.state_dict())
    for entry in checkpoint["state"].values():
        entry["step"] = count
    remote_model.load_state_dict(local_model.state_dict())
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2)
    local.load_state_dict(copy.deepcopy(checkpoint))
    remote.load_state_dict(checkpoint)
    assert_same_dtypes(local, remote)
    steps(local_model, local, range(2, 4))
    steps(remote_model, remote, range(2, 4))
    assert_same_params(local_model, remote_model)
    assert_same_state(local, remote)
    assert_same_dtypes(local, remote)
    assert local.state_dict()["state"][0]["step"].item() == 2**24 + 3  # (not rounded)
    remote.close(delete_session=True)


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


@pytest.mark.parametrize("name,options", [("ASGD", {}), ("NAdam", {}),
                                          ("Adam", {"differentiable": True}),
                                          ("AdamW", {"differentiable": True})])
def test_a_default_switched_to_float64_after_construction_is_refused_at_the_step(
        client: optserve.Client, name: str, options: dict[str, bool]) -> None:
    """The refusal holds at each step, not only at construction: a default switched to
    float64 after the optimizer was made raised nothing, and NAdam's steps went on from a
    float32 ``mu_product`` where torch's (made at the first step) was float64. The step is
    refused before anything is sent (the session's version stays); switched back, the
    optimizer steps as torch's."""
    w = torch.tensor([1.0, -2.0, 0.5])
    local_w, remote_w = w.clone(), torch.nn.Parameter(w.clone())
    local = getattr(torch.optim, name)([local_w], lr=0.1, **options)
    remote = optserve.RemoteOptimizer([remote_w], name, client, lr=0.1, **options)

    def step(i: int) -> None:
        local_w.grad = torch.tensor([0.3, -0.7, 1.1]) * (i + 1)
        remote_w.grad = local_w.grad.clone()
        local.step()
        remote.step()

    step(0)
    version = client.get_session(remote.session_id).version
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(ValueError, match="default dtype is float64"):
            remote.step()
        with pytest.raises(ValueError, match="default dtype is float64"):
            remote.step(lambda: torch.tensor(0.5, dtype=torch.float32))
    finally:
        torch.set_default_dtype(before)
    assert client.get_session(remote.session_id).version == version
    for i in range(1, 3):
        step(i)
    assert torch.equal(remote_w.detach(), local_w)
    assert_same_state(local, remote)


def assert_same_dtypes(local: torch.optim.Optimizer, remote: optserve.RemoteOptimizer) -> None:
    """``state_dict()`` and ``state`` hold each value in torch's dtype (its ``step`` counts
    included), and the same values."""
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert local_sd["state"].keys() == remote_sd["state"].keys()
    for pid, entry in local_sd["state"].items():
        for key, value in entry.items():
            held = remote_sd["state"][pid][key]
            assert held.dtype == value.dtype, (pid, key)
            assert torch.equal(held, value), (pid, key)
    local_params = [p for g in local.param_groups for p in g["params"]]
    remote_params = [p for g in remote.param_groups for p in g["params"]]
    for p, q in zip(local_params, remote_params, strict=True):
        assert {k: v.dtype for k, v in local.state[p].items()} == \
            {k: v.dtype for k, v in remote.state[q].items()}


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "RAdam"])
def test_step_counts_come_back_in_torchs_dtype(client: optserve.Client, name: str) -> None:
    """Under a float64 default torch makes a parameter's ``step`` count float64 at its first
    step (the session's is float32): ``state_dict()`` and ``state`` give it as torch's, dtype
    for dtype (they gave float32), and a parameter whose state was made before the default
    changed keeps float32 in both (torch's count stays as it was made); a checkpoint's float32
    count loaded under the float64 default stays float32, as in torch's."""
    before = torch.get_default_dtype()
    w0, w1 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 3.0])
    local_ws = [w0.clone().requires_grad_(), w1.clone().requires_grad_()]
    remote_ws = [w0.clone().requires_grad_(), w1.clone().requires_grad_()]
    local = getattr(torch.optim, name)(local_ws, lr=0.1)
    remote = optserve.RemoteOptimizer(remote_ws, name, client, lr=0.1)

    def step(ws: list[torch.Tensor], opt: torch.optim.Optimizer, i: int, which: int) -> None:
        opt.zero_grad()
        ((ws[which] * (i + 1.5)).sin().sum()).backward()
        opt.step()

    for ws, opt in ((local_ws, local), (remote_ws, remote)):
        step(ws, opt, 0, 0)  # (w0's state made under float32)
    checkpoint = copy.deepcopy(local.state_dict())
    torch.set_default_dtype(torch.float64)
    try:
        for i in range(1, 3):
            for ws, opt in ((local_ws, local), (remote_ws, remote)):
                step(ws, opt, i, 1)  # (w1's state made under float64)
        # (torch's, here: Adagrad makes every parameter's state at construction)
        assert local.state[local_ws[1]]["step"].dtype == (
            torch.float32 if name == "Adagrad" else torch.float64)
        assert local.state[local_ws[0]]["step"].dtype == torch.float32
        assert_same_dtypes(local, remote)
        local.load_state_dict(copy.deepcopy(checkpoint))
        remote.load_state_dict(copy.deepcopy(checkpoint))
        for ws, opt in ((local_ws, local), (remote_ws, remote)):
            step(ws, opt, 3, 1)  # (w1's made again: float64; w0's loaded float32)
        assert_same_dtypes(local, remote)
    finally:
        torch.set_default_dtype(before)
    assert all(torch.equal(p, q) for p, q in zip(local_ws, remote_ws, strict=True))
    assert_same_dtypes(local, remote)  # (the default does not change a count made)


@pytest.mark.usefixtures("float64_default")
def test_adagrad_made_under_a_float64_default_gives_float64_counts(
        client: optserve.Client) -> None:
    """Adagrad makes each parameter's state at construction: made under a float64 default, its
    counts are float64 in torch's ``state_dict()`` and ``state`` before any step and after,
    and so they are in a ``RemoteOptimizer``'s."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adagrad(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adagrad", client, lr=1e-2)
    assert local.state_dict()["state"][0]["step"].dtype == torch.float64  # torch's, here
    assert_same_dtypes(local, remote)
    steps(local_model, local, range(2))
    steps(remote_model, remote, range(2))
    assert_same_params(local_model, remote_model)
    assert_same_dtypes(local, remote)


def _as_numbers(checkpoint: dict, keys: tuple[str, ...], kind: type) -> dict:
    """``checkpoint`` with its scalar state ``keys`` as Python numbers of ``kind``, as torch
    before 1.12 saved them (``"step": 3``)."""
    for entry in checkpoint["state"].values():
        for key in keys:
            if key in entry:
                entry[key] = kind(entry[key].item())
    return checkpoint


@pytest.mark.parametrize("name,keys,kind,default", [
    ("Adam", ("step",), int, torch.float32),
    ("Adam", ("step",), float, torch.float64),
    ("Adagrad", ("step",), int, torch.float64),
    ("RMSprop", ("step",), int, torch.float32),
    ("ASGD", ("step", "eta", "mu"), float, torch.float32),
    ("NAdam", ("step", "mu_product"), float, torch.float32),
    ("AdamW", ("step",), np.float64, torch.float32),
], ids=["Adam-int", "Adam-float64-default", "Adagrad-float64-default", "RMSprop", "ASGD",
        "NAdam", "AdamW-numpy"])
def test_a_checkpoint_with_number_counts_loads_as_torchs_does(
        client: optserve.Client, name: str, keys: tuple[str, ...], kind: type,
        default: torch.dtype) -> None:
    """A state dict whose counts (ASGD's ``eta``/``mu``, NAdam's ``mu_product`` too) are
    Python numbers, as torch before 1.12 saved them, loads into a local optimizer (its
    ``__setstate__`` makes them tensors in the default dtype) and went to the session as
    numbers: a 422 "expected a tensor of shape []" for ``state_dict.state.0.step``. It loads,
    the counts come back in torch's dtype, and training goes on bitwise as torch's."""
    before = torch.get_default_dtype()
    local_model, remote_model = mlp(), mlp()
    remote_model.load_state_dict(local_model.state_dict())
    local = getattr(torch.optim, name)(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), name, client, lr=1e-2)
    steps(local_model, local, range(2))
    steps(remote_model, remote, range(2))
    checkpoint = _as_numbers(copy.deepcopy(local.state_dict()), keys, kind)
    torch.set_default_dtype(default)
    try:
        local.load_state_dict(copy.deepcopy(checkpoint))
        remote.load_state_dict(copy.deepcopy(checkpoint))
        assert_same_dtypes(local, remote)
    finally:
        torch.set_default_dtype(before)
    steps(local_model, local, range(2, 5))
    steps(remote_model, remote, range(2, 5))
    assert_same_params(local_model, remote_model)
    assert_same_state(local, remote)
    assert_same_dtypes(local, remote)
