"""State put into ``RemoteOptimizer.state`` for a parameter the session holds no state for
(``opt.state[p] = {"step": ..., "exp_avg": ...}``, or keys set into the entry ``opt.state[p]``
makes): a local optimizer steps from it, and so does the session. torch's own
``ZeroRedundancyOptimizer.load_state_dict`` loads its local optimizer that way, entry by
entry, so a ZeRO checkpoint resumed over ``RemoteOptimizer`` lost its whole state silently (the
session started afresh: ``step`` counted from 0, the moments zero). Each run is compared bit for
bit with the same run on the local ``torch.optim`` optimizer."""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn import functional as F

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range,
          frozen: nn.Parameter | None = None) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(10 + i)
        x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if frozen is not None:
            frozen.grad = None  # (this parameter not stepped: no state for it)
        opt.step()


def assert_same(local_model: nn.Module, local: torch.optim.Optimizer, remote_model: nn.Module,
                remote: torch.optim.Optimizer) -> None:
    for (name, p), q in zip(local_model.named_parameters(), remote_model.parameters(),
                            strict=True):
        assert torch.equal(p, q), name
    local_sd, remote_sd = local.state_dict(), remote.state_dict()
    assert remote_sd["state"].keys() == local_sd["state"].keys()
    for pid, entry in local_sd["state"].items():
        assert remote_sd["state"][pid].keys() == entry.keys(), pid
        for key, value in entry.items():
            assert torch.equal(remote_sd["state"][pid][key], value), (pid, key)


def saved_state() -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
    """A model and its AdamW state after three local steps."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    train(model, opt, range(3))
    return model.state_dict(), opt.state_dict()["state"]


@pytest.mark.parametrize("way", ["entry", "keys", "frozen"])
def test_state_given_to_parameters_without_any_is_stepped_from(client: optserve.Client,
                                                                way: str) -> None:
    """``entry``: ``opt.state[p] = {...}`` for every parameter of a fresh optimizer (as ZeRO's
    ``load_state_dict`` does); ``keys``: ``opt.state[p][k] = v`` into the entry that reading
    ``opt.state[p]`` makes; ``frozen``: after steps that left one parameter without a
    gradient (its state none, the others' the session's), its entry given by hand."""
    weights, state = saved_state()
    runs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
                 lambda ps: optserve.RemoteOptimizer(ps, "AdamW", client, lr=1e-2,
                                                     weight_decay=0.05)):
        model = mlp()
        model.load_state_dict(weights)
        opt = make(model.parameters())
        params = list(model.parameters())
        if way == "frozen":
            train(model, opt, range(3, 5), frozen=params[1])
            opt.state[params[1]] = copy.deepcopy(state[1])
        else:
            for index, entry in copy.deepcopy(state).items():
                if way == "entry":
                    opt.state[params[index]] = entry
                else:
                    for key, value in entry.items():
                        opt.state[params[index]][key] = value
        train(model, opt, range(5, 8))
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])


@pytest.fixture
def one_process_group() -> Iterator[None]:
    """A gloo process group of this process alone (world size 1, an in-memory store)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_zero_redundancy_optimizer_checkpoint_resumes_as_torchs(
        client: optserve.Client, one_process_group: None) -> None:
    """``ZeroRedundancyOptimizer(optimizer_class=RemoteOptimizer)``: trained, its state
    consolidated and saved, then loaded into a new one over a new model, which trains on:
    equal to the same with ``optimizer_class=torch.optim.AdamW``."""
    runs = []
    for cls in (torch.optim.AdamW,
                functools.partial(optserve.RemoteOptimizer, optimizer="AdamW", client=client)):
        model = mlp()
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2,
                                      weight_decay=0.05)
        train(model, opt, range(3))
        opt.consolidate_state_dict(to=0)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        checkpoint = torch.load(buf, weights_only=True)
        resumed_model = mlp()
        resumed_model.load_state_dict(checkpoint["model"])
        resumed = ZeroRedundancyOptimizer(resumed_model.parameters(), optimizer_class=cls,
                                          lr=1e-2, weight_decay=0.05)
        resumed.load_state_dict(checkpoint["opt"])
        train(resumed_model, resumed, range(3, 6))
        runs.append((resumed_model, resumed.optim))
    assert_same(*runs[0], *runs[1])
