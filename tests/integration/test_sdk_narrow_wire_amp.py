"""``RemoteOptimizer(..., wire_dtype=...)`` under the torch helpers a mixed-precision loop puts
around it: ``torch.amp.GradScaler("cpu")`` (``unscale_``, a step skipped for an infinite
gradient, ``update``), ``clip_grad_norm_``, ``SequentialLR`` handing over to ``SWALR`` with an
``AveragedModel``, ``zero_grad(set_to_none=False)`` every other step, and a checkpoint (model,
optimizer, scheduler, scaler) resumed into a new model and optimizer halfway. Compared bit for
bit with torch doing what the narrow wire promises: float32 master weights stepped by the same
torch optimizer on the gradients narrowed and widened again, the model holding the master
weights narrowed after each step."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import SWALR, AveragedModel

import optserve

pytestmark = pytest.mark.integration


class NarrowingLocal(torch.optim.Optimizer):
    """In-process reference: the model's parameters in ``param_groups`` (where GradScaler,
    clipping and schedulers see them), an inner torch optimizer over float32 masters."""

    def __init__(self, params: Iterable[torch.Tensor], cls: type[torch.optim.Optimizer],
                 wire: torch.dtype, **options: Any) -> None:
        super().__init__(params, options)
        self.wire = wire
        self.masters = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        self.inner = cls(self.masters, **options)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        (group,), (inner,) = self.param_groups, self.inner.param_groups
        inner.update({k: v for k, v in group.items() if k != "params"})
        for p, m in zip(group["params"], self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.to(self.wire).to(p.dtype)
        self.inner.step()
        for p, m in zip(group["params"], self.masters, strict=True):
            p.copy_(m.to(self.wire).to(p.dtype))


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def loss_at(model: nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    return F.mse_loss(model(x), y)


def sequential(opt: torch.optim.Optimizer) -> lrs.SequentialLR:
    return lrs.SequentialLR(opt, [lrs.LinearLR(opt, 0.1, total_iters=3),
                                  lrs.ExponentialLR(opt, 0.9)], milestones=[3])


def train(client: optserve.Client | None, wire: str, resume_at: int | None = None
          ) -> tuple[nn.Module, list[torch.Tensor], dict[str, Any], nn.Module, float]:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        if client is None:
            return NarrowingLocal(model.parameters(), torch.optim.Adam, getattr(torch, wire),
                                  lr=1e-2)
        return optserve.RemoteOptimizer(model.parameters(), "Adam", client, lr=1e-2,
                                        wire_dtype=wire)
    model = mlp()
    opt = make(model)
    sched = sequential(opt)
    swa, swalr = AveragedModel(model), None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=2)
    for i in range(12):
        opt.zero_grad(set_to_none=i % 2 == 0)
        scaler.scale(loss_at(model, i)).backward()
        if i == 4:
            model[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        if i < 8:
            sched.step()
        else:
            swalr = swalr or SWALR(opt, swa_lr=0.005, anneal_epochs=2)
            swa.update_parameters(model)
            swalr.step()
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "scaler": scaler.state_dict()}, buf)
            buf.seek(0)
            checkpoint = torch.load(buf, weights_only=True)
            model = mlp()
            model.load_state_dict(checkpoint["model"])
            swa = AveragedModel(model)
            opt = make(model)
            sched = sequential(opt)
            opt.load_state_dict(checkpoint["opt"])
            sched.load_state_dict(checkpoint["sched"])
            scaler = torch.amp.GradScaler("cpu")
            scaler.load_state_dict(checkpoint["scaler"])
    if isinstance(opt, NarrowingLocal):
        return model, opt.masters, opt.inner.state_dict(), swa, scaler.get_scale()
    assert isinstance(opt, optserve.RemoteOptimizer) and client is not None
    server = client.get_params(opt.session_id).params
    return (model, [server[str(i)] for i in range(4)], opt.state_dict(), swa,
            scaler.get_scale())


@pytest.mark.parametrize("resume_at", [None, 5])
@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_grad_scaler_clipping_schedulers_and_swa_over_a_narrow_wire(
        client: optserve.Client, wire: str, resume_at: int | None) -> None:
    want_model, want_masters, want_sd, want_swa, want_scale = train(None, wire)
    model, masters, sd, swa, scale = train(client, wire, resume_at)
    assert scale == want_scale
    for (name, a), b in zip(model.named_parameters(), want_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    for i, (a, b) in enumerate(zip(masters, want_masters, strict=True)):
        assert torch.equal(a, b), i
        assert torch.equal(sd["master_params"][i], b), i
    assert [g["lr"] for g in sd["param_groups"]] == [g["lr"] for g in want_sd["param_groups"]]
    for pid, entry in want_sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(sd["state"][pid][key]), value), (pid, key)
    for a, b in zip(swa.parameters(), want_swa.parameters(), strict=True):
        assert torch.equal(a, b)
