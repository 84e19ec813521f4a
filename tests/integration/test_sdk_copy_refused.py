"""Pickling or copying a ``RemoteOptimizer`` is refused with a ``TypeError`` that says why (it
stands for a live server session) and what to do instead (its ``state_dict()``); a model that
does not hold the optimizer deep-copies as ever, and training goes on unaffected."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve

pytestmark = pytest.mark.integration


def step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(30 + i)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


class Holder(nn.Module):
    """A module that keeps its optimizer as an attribute (as some training code does)."""

    def __init__(self, inner: nn.Module, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.inner = inner
        self.opt = opt


@pytest.mark.parametrize("how", [pickle.dumps, copy.copy, copy.deepcopy],
                         ids=["pickle", "copy", "deepcopy"])
def test_copying_the_optimizer_says_why_and_what_to_do(live_server: str,
                                                       how: Callable[[Any], Any]) -> None:
    """``pickle``, ``copy.copy``, ``copy.deepcopy`` of the optimizer, or pickling or
    deep-copying a module holding it: a ``TypeError`` naming the session and ``state_dict()``
    (a shallow copy of such a module shares the optimizer). ``copy.deepcopy`` of the model
    alone works during training: the copy holds the values of then, the optimizer goes on
    stepping the original, bit for bit as a local Adam, and its state_dict loads into a local
    Adam that then steps the copy as the original was stepped."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    with optserve.Client(live_server, transport="http", max_retries=0) as client:
        remote = optserve.RemoteOptimizer(model.parameters(), "Adam", client, lr=1e-2)
        local = torch.optim.Adam(twin.parameters(), lr=1e-2)
        for i in range(2):
            step(model, remote, i)
            step(twin, local, i)
        holder = Holder(model, remote)
        for target in (remote, holder) if how is not copy.copy else (remote,):
            with pytest.raises(TypeError) as refused:
                how(target)
            message = str(refused.value)
            assert "cannot be pickled or copied" in message
            assert repr(remote.session_id) in message and "state_dict()" in message
        if how is copy.copy:  # a shallow copy of the module shares the optimizer
            assert copy.copy(holder).opt is remote
        kept = copy.deepcopy(model)  # the model alone: unaffected
        assert kept.weight is not model.weight
        for p, q in zip(kept.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)
        resumed = torch.optim.Adam(kept.parameters(), lr=1e-2)
        resumed.load_state_dict(remote.state_dict())
        for i in range(2, 4):
            step(model, remote, i)
            step(twin, local, i)
            step(kept, resumed, i)
        for p, q, r in zip(model.parameters(), twin.parameters(), kept.parameters(),
                           strict=True):
            assert torch.equal(p, q) and torch.equal(r, q)
        remote.close(delete_session=True)
