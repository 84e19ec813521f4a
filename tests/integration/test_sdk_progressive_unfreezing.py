"""Progressive unfreezing over ``RemoteOptimizer`` with local schedulers: the head trains
first, then ``add_param_group`` adds the middle layer and later the first one (each unfrozen
with ``requires_grad_``), the ``LambdaLR`` rebuilt over the grown groups from its epoch (a
group's ``initial_lr`` set, ``last_epoch=``) and a ``StepLR`` added over all of them,
``clip_grad_norm_`` and ``zero_grad(set_to_none=False)`` every other step; a checkpoint
(model, optimizer, both schedulers) resumed halfway into a new model and a new three-group
``RemoteOptimizer``. Compared bit for bit with the same run on ``torch.optim.AdamW``,
including the ``ValueError`` torch's scheduler raises when it is stepped over a group it was
not built with."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs

import optserve

pytestmark = pytest.mark.integration

LAMBDAS = [lambda e: 0.9 ** e, lambda e: 0.8 ** e, lambda e: 0.95 ** e]


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def loss_at(model: nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    return F.mse_loss(model(x), y)


def train(client: optserve.Client | None, resume_at: int | None = None
          ) -> tuple[nn.Module, torch.optim.Optimizer, Any, Any, list[str]]:
    def make(groups: Any) -> torch.optim.Optimizer:
        if client is None:
            return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
        return optserve.RemoteOptimizer(groups, "AdamW", client, lr=1e-2, weight_decay=0.05)
    model = mlp()
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)
    opt = make(model[4].parameters())
    sched: Any = lrs.LambdaLR(opt, LAMBDAS[0])
    step_lr: Any = None
    refusals: list[str] = []
    for i in range(12):
        if i in (3, 6):
            layer, lr = (model[2], 3e-3) if i == 3 else (model[0], 1e-3)
            for p in layer.parameters():
                p.requires_grad_(True)
            extra = {"weight_decay": 0.0} if i == 6 else {}
            opt.add_param_group({"params": layer.parameters(), "lr": lr, **extra})
            if i == 3:
                try:  # torch's scheduler zips its lists with the groups: one short now
                    sched.step()
                except ValueError as exc:
                    refusals.append(str(exc))
            opt.param_groups[-1]["initial_lr"] = lr
            sched = lrs.LambdaLR(opt, LAMBDAS[:len(opt.param_groups)], last_epoch=i - 1)
            if i == 6:
                step_lr = lrs.StepLR(opt, step_size=2, gamma=0.5)
        opt.zero_grad(set_to_none=i % 2 == 0)
        loss_at(model, i).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        if step_lr is not None:
            step_lr.step()
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step_lr": step_lr.state_dict()}, buf)
            buf.seek(0)
            checkpoint = torch.load(buf, weights_only=False)  # (LambdaLR keeps no lambdas)
            model = mlp()
            model.load_state_dict(checkpoint["model"])
            opt = make([{"params": model[4].parameters()}, {"params": model[2].parameters()},
                        {"params": model[0].parameters()}])
            sched = lrs.LambdaLR(opt, LAMBDAS)
            step_lr = lrs.StepLR(opt, step_size=2, gamma=0.5)
            opt.load_state_dict(checkpoint["opt"])
            sched.load_state_dict(checkpoint["sched"])
            step_lr.load_state_dict(checkpoint["step_lr"])
    return model, opt, sched, step_lr, refusals


@pytest.mark.parametrize("resume_at", [None, 8])
def test_progressive_unfreezing_under_local_schedulers(client: optserve.Client,
                                                       resume_at: int | None) -> None:
    want_model, want_opt, want_sched, want_step_lr, want_refusals = train(None)
    model, opt, sched, step_lr, refusals = train(client, resume_at)
    assert refusals == want_refusals and len(refusals) == 1
    for (name, a), b in zip(model.named_parameters(), want_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    mine, torchs = opt.state_dict(), want_opt.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for pid, entry in torchs["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(mine["state"][pid][key]), value), (pid, key)
    assert sched.state_dict() == want_sched.state_dict()
    assert step_lr.state_dict() == want_step_lr.state_dict()
