"""``RemoteOptimizer`` against the local ``torch.optim`` optimizer where a demanding user would
notice a difference: an entry of ``opt.state`` made by reading it (torch's ``defaultdict``),
the exception type of a sparse gradient an optimizer refuses, option values given as NumPy
scalars or bools, and an edit of ``opt.state`` the session cannot import. Each case runs the
same code on both and compares what torch gives."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import optserve
from tests.integration import test_sdk_dropin_edges as dropin

pytestmark = pytest.mark.integration


# test_sdk_dropin_edges's client fixture, model and training data
client = dropin.client
mlp, backward, train = dropin.mlp, dropin.backward, dropin.train


def assert_same(a: Any, b: Any) -> None:
    """``a`` and ``b`` equal and of the same types all the way down (tensors bitwise), a
    dict's keys as a set: see the test of entries made by reading for their order."""
    dropin.assert_same_form(a, b, ordered=False)


def pair(client: optserve.Client, optimizer: str, **options: Any
         ) -> tuple[nn.Sequential, torch.optim.Optimizer, nn.Sequential, Any]:
    local_model, remote_model = mlp(), mlp()
    local = getattr(torch.optim, optimizer)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, client, **options)
    return local_model, local, remote_model, remote


# ------------------------------------------------------------------ entries made by reading
def test_an_entry_made_by_reading_the_state_is_kept_as_torch_keeps_it(
        client: optserve.Client) -> None:
    """Reading ``opt.state[p]`` makes an empty entry (torch's ``state`` is a
    ``defaultdict(dict)``): ``state_dict()`` lists it (``{0: {}}``) and ``len(opt.state)``
    counts it, before the first step and after steps that leave that parameter without a
    gradient (it stays empty), as torch's do; once the parameter steps, its entry is its
    state."""
    local_model, local, remote_model, remote = pair(client, "Adam", lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        assert opt.state[model[0].weight] == {}
    assert len(local.state) == len(remote.state) == 1
    assert_same(local.state_dict(), remote.state_dict())
    for model, opt in ((local_model, local), (remote_model, remote)):
        opt.state[model[2].bias]  # noqa: B018 - the read makes the entry
        opt.zero_grad()
        backward(model, 0)
        model[0].weight.grad = None  # the entries read stay empty through the step
        model[2].bias.grad = None
        opt.step()
    assert len(local.state) == len(remote.state)
    assert_same(local.state_dict(), remote.state_dict())
    assert remote.state[remote_model[2].bias] == {}
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(1, 3))
    assert len(local.state) == len(remote.state)
    assert_same(local.state_dict(), remote.state_dict())
    for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(a, b)
    remote.close(delete_session=True)



# ------------------------------------------------------------------ gradients' layouts
@pytest.mark.parametrize("optimizer, options, sparse", [
    ("Adam", {}, True), ("AdamW", {}, True), ("RMSprop", {}, True), ("NAdam", {}, True),
    ("Adagrad", {"weight_decay": 0.1}, True), ("SparseAdam", {}, False)])
def test_a_gradient_layout_the_optimizer_refuses_raises_torchs_exception_type(
        client: optserve.Client, optimizer: str, options: dict[str, Any], sparse: bool) -> None:
    """A sparse gradient (a dense one for SparseAdam) that torch's step refuses with a
    ``RuntimeError`` is a ``RuntimeError`` here too (``GradientLayoutError``: also the SDK's
    ``ValidationError``, with the server's problem), nothing stepped. (Torch's Adagrad counts
    the refused step in its state's ``step`` before refusing it; a session's step is all or
    nothing, so only the parameters are compared.)"""
    raised: list[BaseException] = []
    tables = []
    for remote in (False, True):
        torch.manual_seed(0)
        table = nn.Embedding(10, 3, sparse=sparse)
        opt: Any = (optserve.RemoteOptimizer(table.parameters(), optimizer, client, **options)
                    if remote else getattr(torch.optim, optimizer)(table.parameters(), **options))
        table(torch.tensor([1, 4])).sum().backward()
        with pytest.raises(Exception) as caught:
            opt.step()
        raised.append(caught.value)
        tables.append((table, opt))
    local_error, remote_error = raised
    assert type(local_error) is RuntimeError
    assert isinstance(remote_error, RuntimeError)
    assert isinstance(remote_error, optserve.ValidationError)
    assert isinstance(remote_error, optserve.GradientLayoutError)
    assert remote_error.code == ("sparse_unsupported" if sparse else "dense_gradient")
    (local_table, local), (remote_table, remote) = tables
    assert torch.equal(local_table.weight, remote_table.weight)
    remote.close(delete_session=True)


# ------------------------------------------------------------------ option values' objects
OBJECTS: dict[str, tuple[str, dict[str, Any]]] = {
    "numpy float64 lr, betas": ("Adam", {"lr": np.float64(1e-2),
                                         "betas": (np.float64(0.8), 0.99)}),
    "numpy float32 momentum": ("SGD", {"lr": 0.1, "momentum": np.float32(0.5)}),
    "numpy int": ("SGD", {"lr": np.float64(0.1), "weight_decay": np.int64(0)}),
    # bools are ints to torch (its checks, 0.0 <= lr, pass; it steps with lr 1)
    "bool lr, weight_decay": ("Adam", {"lr": True, "weight_decay": False}),
    "bool momentum": ("SGD", {"lr": 0.1, "momentum": True, "dampening": True}),
}
#: the cases whose session warns (``optserve.PrecisionWarning``: a NumPy float32 option)
NARROW = {"numpy float32 momentum"}


@pytest.mark.parametrize("case", list(OBJECTS))
def test_option_values_keep_the_objects_given_as_torch_keeps_them(
        client: optserve.Client, case: str) -> None:
    """Options given as NumPy scalars stay those objects in ``param_groups`` (and in
    ``state_dict()``'s groups), as torch's groups hold what was given, also after steps,
    a value set by hand and a checkpoint loaded back; the session steps with their values."""
    optimizer, options = OBJECTS[case]
    with pytest.warns(optserve.PrecisionWarning) if case in NARROW else nullcontext():
        local_model, local, remote_model, remote = pair(client, optimizer, **options)
    assert_same(local.param_groups, remote.param_groups)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    assert_same(local.param_groups, remote.param_groups)
    assert_same(local.state_dict(), remote.state_dict())
    for model, opt in ((local_model, local), (remote_model, remote)):
        opt.param_groups[0]["lr"] = np.float64(0.05)
        train(model, opt, range(2, 3))
        opt.load_state_dict(opt.state_dict())
        train(model, opt, range(3, 4))
    assert_same(local.param_groups, remote.param_groups)
    for model, opt in ((local_model, local), (remote_model, remote)):
        opt.param_groups[0]["lr"] = True  # (sent with the step: a group's PATCH)
        train(model, opt, range(4, 5))
    assert_same(local.param_groups, remote.param_groups)
    assert_same(local.state_dict(), remote.state_dict())
    for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(a, b)
    remote.close(delete_session=True)


# ------------------------------------------------------------------ a refused state edit
def test_a_state_edit_the_session_refuses_stays_pending_as_in_torch(
        client: optserve.Client) -> None:
    """An edit of ``opt.state`` the session cannot take (a momentum buffer of another shape)
    fails every step until it is fixed, as torch's optimizer does (its state stays as edited):
    the refused import leaves the edit in ``opt.state``, to be sent again at the next step,
    not dropped after the first refusal. Once fixed, training goes on as torch's."""
    local_model, local, remote_model, remote = pair(client, "SGD", lr=0.1, momentum=0.9)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    kept: list[torch.Tensor] = []
    for model, opt in ((local_model, local), (remote_model, remote)):
        weight = model[0].weight
        kept.append(opt.state[weight]["momentum_buffer"].clone())
        opt.state[weight]["momentum_buffer"] = torch.zeros(3)
        for _ in range(2):
            opt.zero_grad()
            backward(model, 2)
            with pytest.raises((RuntimeError, ValueError)):
                opt.step()
        assert list(opt.state[weight]["momentum_buffer"].shape) == [3]
    with pytest.raises(optserve.ValidationError):
        remote.state_dict()
    for model, opt, buffer in ((local_model, local, kept[0]), (remote_model, remote, kept[1])):
        opt.state[model[0].weight]["momentum_buffer"] = buffer
        train(model, opt, range(2, 4))
    assert_same(local.state_dict(), remote.state_dict())
    for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(a, b)
    remote.close(delete_session=True)
