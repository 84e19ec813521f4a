"""The memory format of a ``RemoteOptimizer``'s state: torch's optimizers keep each
parameter's per-element state in the parameter's strides
(``torch.zeros_like(p, memory_format=torch.preserve_format)``, or a clone of ``p.grad``, which
autograd lays out as ``p``), so a ``torch.channels_last`` conv weight's ``exp_avg`` is
channels_last too; ``opt.state`` and ``state_dict()`` of a ``RemoteOptimizer`` have the same
strides (and values, bit for bit) as the local optimizer's, for every optimizer with such
state. The parameters keep the user's strides through the steps (the new values are copied
into them), and a channels_last state dict loads and goes on as torch."""

from __future__ import annotations

import copy
import gc
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import optserve

pytestmark = pytest.mark.integration

#: every optimizer whose state holds tensors of the parameter's shape, with options that make
#: all of its keys (amsgrad's max_exp_avg_sq, centered RMSprop's grad_avg, ...)
OPTIMIZERS: list[tuple[str, dict[str, Any]]] = [
    ("Adam", {"lr": 1e-2, "amsgrad": True}),
    ("AdamW", {"lr": 1e-2}),
    ("Adamax", {"lr": 1e-2}),
    ("NAdam", {"lr": 1e-2}),
    ("RAdam", {"lr": 1e-2}),
    ("RMSprop", {"lr": 1e-2, "momentum": 0.9, "centered": True}),
    ("Adadelta", {"lr": 1.0}),
    ("Adagrad", {"lr": 1e-2}),
    ("ASGD", {"lr": 1e-2}),
    ("Rprop", {"lr": 1e-2}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9}),
]


@pytest.fixture(scope="module")
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, transport="http", max_retries=0) as c:
        yield c


class Net(nn.Module):
    """A channels_last conv, a linear layer whose weight is a transposed (dense, not
    contiguous) tensor, and contiguous biases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(4, 2)
        self.lin.weight = nn.Parameter(torch.randn(4, 2).t())
        self.conv.weight = nn.Parameter(
            self.conv.weight.detach().to(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(self.conv(x).mean(dim=(2, 3)))
        return out


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(2, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


def assert_same_layout(local_model: nn.Module, local: torch.optim.Optimizer,
                       remote_model: nn.Module, remote: optserve.RemoteOptimizer) -> None:
    """Parameters, ``opt.state`` and ``state_dict()["state"]``: equal bit for bit, with the
    local optimizer's strides."""
    pairs = list(zip(local_model.parameters(), remote_model.parameters(), strict=True))
    for p, q in pairs:
        assert torch.equal(p, q) and q.stride() == p.stride()
    remote_sd, local_sd = remote.state_dict()["state"], local.state_dict()["state"]
    views = [(local.state[p], remote.state[q]) for p, q in pairs]
    views += [(local_sd[i], remote_sd[i]) for i in range(len(pairs))]
    for (p, _), (want, got) in zip(pairs * 2, views, strict=True):
        tensors = {k for k, v in want.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        assert tensors, want
        for key in tensors:
            assert torch.equal(got[key], want[key]), key
            assert got[key].stride() == want[key].stride() == p.stride(), key


@pytest.mark.parametrize(("name", "options"), OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_state_has_the_strides_of_its_parameter_as_torch(
        client: optserve.Client, name: str, options: dict[str, Any]) -> None:
    local_model = Net()
    remote_model = copy.deepcopy(local_model)
    assert not local_model.conv.weight.is_contiguous()
    local = getattr(torch.optim, name)(local_model.parameters(), **options)
    with optserve.RemoteOptimizer(remote_model.parameters(), client=client, optimizer=name,
                                  **options) as remote:
        train(local_model, local, range(2))
        train(remote_model, remote, range(2))
        assert_same_layout(local_model, local, remote_model, remote)


def test_a_channels_last_state_dict_loads_and_goes_on_as_torch(
        client: optserve.Client) -> None:
    local_model = Net()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    train(local_model, local, range(2))
    saved = copy.deepcopy(local.state_dict())
    assert not saved["state"][0]["exp_avg"].is_contiguous()
    remote_model = copy.deepcopy(local_model)
    with optserve.RemoteOptimizer(remote_model.parameters(), client=client, optimizer="Adam",
                                  lr=1e-2) as remote:
        remote.load_state_dict(saved)
        assert_same_layout(local_model, local, remote_model, remote)
        train(local_model, local, range(2, 4))
        train(remote_model, remote, range(2, 4))
        assert_same_layout(local_model, local, remote_model, remote)


def reachable_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor ``root`` holds: reachable through the objects it refers to (containers,
    instances and their attributes; not through modules, classes or functions, whose globals
    are no one's state, nor into the tensors found)."""
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType,
            types.CodeType)
    seen, found, todo = {id(root)}, [], [root]
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if id(ref) in seen or isinstance(ref, skip):
                continue
            seen.add(id(ref))
            if isinstance(ref, torch.Tensor):
                found.append(ref)
            else:
                todo.append(ref)
    return found


@pytest.mark.parametrize(("name", "options"), [OPTIMIZERS[0], OPTIMIZERS[-1]],
                         ids=[OPTIMIZERS[0][0], OPTIMIZERS[-1][0]])
def test_the_state_read_is_held_once(client: optserve.Client, name: str,
                                     options: dict[str, Any]) -> None:
    """``state_dict()`` twice (the second served from the first read: a 304) and ``opt.state``:
    torch's values and strides, the second's tensors the first's, and nothing the optimizer
    holds is a second copy of a state tensor. (The last state read was kept as it came off
    the wire, contiguous, beside the copies laid out as torch's that ``opt.state`` and
    ``state_dict()`` hand out: the channels_last and transposed weights' state twice until
    the next step, and a 304 laid out yet another copy.)"""
    local_model = Net()
    remote_model = copy.deepcopy(local_model)
    local = getattr(torch.optim, name)(local_model.parameters(), **options)
    with optserve.RemoteOptimizer(remote_model.parameters(), client=client, optimizer=name,
                                  **options) as remote:
        train(local_model, local, range(2))
        train(remote_model, remote, range(2))
        first = remote.state_dict()
        second = remote.state_dict()
        assert_same_layout(local_model, local, remote_model, remote)
        state = [v for entry in remote.state.values() for v in entry.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        laid_out = [v for v in state if not v.is_contiguous()]
        assert laid_out  # (the conv's and the transposed weight's)
        for i, _ in enumerate(remote_model.parameters()):
            for key, value in first["state"][i].items():
                assert second["state"][i][key] is value, (i, key)
        held = {id(v) for v in state}
        copies = [(tuple(t.shape), t.stride()) for t in reachable_tensors(remote)
                  if id(t) not in held and any(t.shape == v.shape and torch.equal(t, v)
                                               for v in state)]
        assert copies == []
        train(local_model, local, range(2, 4))
        train(remote_model, remote, range(2, 4))
        assert_same_layout(local_model, local, remote_model, remote)
