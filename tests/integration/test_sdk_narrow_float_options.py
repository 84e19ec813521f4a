"""An option given as a NumPy float32/float16 scalar: torch's own optimizer computes with it in
that precision (NumPy 2's promotion: Adam's ``lr / bias_correction1``) while the session
receives its value as a Python float and computes in float64. ``RemoteOptimizer`` sends the
value as before and warns (``optserve.PrecisionWarning``) once per optimizer and option, at
construction, ``add_param_group``, a group edit sent with a step, a scheduler's value and a
loaded state dict; ``float(x)`` steps as torch's given that float, bit for bit, silently."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

import optserve
from tests.integration import test_sdk_dropin_edges as dropin

pytestmark = pytest.mark.integration

client = dropin.client
mlp, train = dropin.mlp, dropin.train


def precision_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, optserve.PrecisionWarning)]


def test_a_float32_lr_warns_once_and_steps_with_its_value(client: optserve.Client) -> None:
    """Adam with ``lr=np.float32(...)``: one warning, at construction (pointing at the
    caller's line), none at the steps after, though a local ``StepLR`` keeps the lr a float32
    that rides with each step; the session steps as torch given ``float(lr)``. A second
    optimizer warns again."""
    lr = np.float32(3e-4)
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=float(lr))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=lr)
        schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
                      for opt in (local, remote)]
        for model, opt, scheduler in ((local_model, local, schedulers[0]),
                                      (remote_model, remote, schedulers[1])):
            for i in range(4):
                train(model, opt, range(i, i + 1))
                scheduler.step()
    messages = precision_warnings(record)
    assert len(messages) == 1, messages
    assert "'lr'" in messages[0] and "float32" in messages[0] and "float(x)" in messages[0]
    assert [w.filename for w in record if w.category is optserve.PrecisionWarning] == [__file__]
    assert isinstance(remote.param_groups[0]["lr"], np.float32)  # (the scheduler's value)
    for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.warns(optserve.PrecisionWarning, match="'lr'"):
        other = optserve.RemoteOptimizer(mlp().parameters(), "Adam", client, lr=lr)
    for opt in (remote, other):
        opt.close(delete_session=True)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "NAdam"])
def test_float_of_a_float32_steps_as_torch_bit_for_bit_without_a_warning(
        client: optserve.Client, optimizer: str) -> None:
    """``float(np.float32(x))`` given to both: no warning, and the session's steps equal a
    local torch optimizer's, bit for bit."""
    lr = float(np.float32(1.3e-3))
    local_model, remote_model = mlp(), mlp()
    local = getattr(torch.optim, optimizer)(local_model.parameters(), lr=lr)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, client, lr=lr)
        for model, opt in ((local_model, local), (remote_model, remote)):
            train(model, opt, range(5))
    assert precision_warnings(record) == []
    for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(a, b)
    remote.close(delete_session=True)


def test_python_floats_and_float64_scalars_do_not_warn(client: optserve.Client) -> None:
    """Python floats and ints and NumPy float64 scalars, at construction, in a new group, in
    a group edit and in a loaded state dict: no warning."""
    model = mlp()
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        remote = optserve.RemoteOptimizer(
            [{"params": params[:2], "lr": np.float64(1e-3)}, {"params": params[2:3]}],
            "Adam", client, lr=1e-3, betas=(np.float64(0.8), 0.99), weight_decay=0)
        train(model, remote, range(2))
        remote.param_groups[0]["lr"] = np.float64(2e-3)
        remote.param_groups[1]["eps"] = 1e-7
        train(model, remote, range(2, 3))
        remote.add_param_group({"params": params[3:], "lr": np.float64(5e-4)})
        remote.load_state_dict(remote.state_dict())
        train(model, remote, range(3, 4))
    assert precision_warnings(record) == []
    remote.close(delete_session=True)


EDITS: dict[str, tuple[str, Any]] = {
    "group edit sent with a step": ("betas", (np.float32(0.8), 0.99)),
    "float16 group edit": ("lr", np.float16(1e-2)),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_narrow_value_set_later_warns_once_per_option(client: optserve.Client,
                                                        case: str) -> None:
    """A group edit (sent with the next step), a new group and a loaded state dict holding a
    float32/float16 scalar warn once for each option, whichever path brings it first."""
    key, value = EDITS[case]
    model = mlp()
    params = list(model.parameters())
    remote = optserve.RemoteOptimizer(params[:3], "Adam", client, lr=1e-3)
    remote.param_groups[0][key] = value
    with pytest.warns(optserve.PrecisionWarning, match=repr(key)) as record:
        train(model, remote, range(1))
    assert len(precision_warnings(record.list)) == 1
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        remote.add_param_group({"params": params[3:], key: value})
        train(model, remote, range(1, 2))
    assert precision_warnings(quiet) == []
    with pytest.warns(optserve.PrecisionWarning, match="'eps'"):
        remote.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                                "eps": np.float32(1e-6)})
    saved = remote.state_dict()
    saved["param_groups"][0]["weight_decay"] = np.float32(0.0)
    with pytest.warns(optserve.PrecisionWarning, match="'weight_decay'"):
        remote.load_state_dict(saved)
    remote.close(delete_session=True)
