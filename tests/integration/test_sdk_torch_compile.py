"""``RemoteOptimizer`` called from code under ``torch.compile``: the optimizer step compiled
as torch's tutorials compile it ("Compiling the optimizer with torch.compile", and with an LR
scheduler, its ``lr`` a tensor so that the schedule does not recompile), and a whole compiled
training step over a compiled model. Dynamo shows traced code every ``param_groups`` entry
with ``capturable`` set to True (``OptimizerVariable._set_capturable``), so a step traced by
it sent ``capturable: True`` to the server, which a CPU session refuses (422); the step now
runs outside the trace, as torch's step runs uncompiled. Each run is compared, bitwise at
every step, with the same code uncompiled over the local ``torch.optim`` optimizer (CPU, same
torch build), over both transports. (A compiled local optimizer is not the reference: its
traced arithmetic differs from the eager step's in the last bits, and the server steps
eagerly; see clients/python/README.md.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs

import optserve
from tests.integration.test_sdk_distributed_checkpoint import assert_same

pytestmark = pytest.mark.integration

#: dynamo's own backend that runs the captured graphs as they are: the capture (where the
#: options were read as dynamo shows them) is the same as inductor's, without a C++ build
BACKEND = "eager"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def optimizer(client: optserve.Client | None, model: nn.Module, **options: Any
              ) -> torch.optim.Optimizer:
    if client is None:
        return torch.optim.AdamW(model.parameters(), **options)
    return optserve.RemoteOptimizer(model.parameters(), "AdamW", client, **options)


Snapshot = tuple[list[torch.Tensor], dict[str, Any], dict[str, Any] | None]


def snapshot(model: nn.Module, opt: torch.optim.Optimizer,
             sched: lrs.LRScheduler | None = None) -> Snapshot:
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()),
            None if sched is None else copy.deepcopy(sched.state_dict()))


def compiled(fn: Callable[..., Any], compile: bool) -> Callable[..., Any]:
    return torch.compile(fn, backend=BACKEND) if compile else fn


def compiled_optimizer_with_scheduler(client: optserve.Client | None, compile: bool, *,
                                      tensor_lr: bool) -> list[Snapshot]:
    """torch's tutorials: ``opt.step()`` and ``sched.step()`` in one compiled function (the
    one with a scheduler makes the lr a tensor)."""
    torch._dynamo.reset()
    model = mlp()
    opt = optimizer(client, model, lr=torch.tensor(0.01) if tensor_lr else 0.01,
                    weight_decay=0.05)
    sched = lrs.LinearLR(opt, start_factor=0.25, total_iters=4)

    def optimizer_step() -> None:
        opt.step()
        sched.step()

    step = compiled(optimizer_step, compile)

    snapshots = []
    for i in range(6):
        opt.zero_grad()
        x, y = batch(i)
        F.mse_loss(model(x), y).backward()
        step()
        snapshots.append(snapshot(model, opt, sched))
    return snapshots


def compiled_training_step(client: optserve.Client | None, compile: bool) -> list[Snapshot]:
    """Forward, backward, step and ``zero_grad`` in one compiled function over a compiled
    model."""
    torch._dynamo.reset()
    model = mlp()
    forward = compiled(model, compile)
    opt = optimizer(client, model, lr=0.01)

    def training_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    train_step = compiled(training_step, compile)

    snapshots = []
    for i in range(5):
        train_step(*batch(i))
        snapshots.append(snapshot(model, opt))
    return snapshots


@pytest.mark.parametrize("transport", ["http", "local"])
@pytest.mark.parametrize("run", [
    partial(compiled_optimizer_with_scheduler, tensor_lr=False),
    partial(compiled_optimizer_with_scheduler, tensor_lr=True),
    compiled_training_step,
], ids=["optimizer-float-lr", "optimizer-tensor-lr", "training-step"])
def test_a_compiled_step_equals_torchs_uncompiled_step(
        live_server: str, transport: str,
        run: Callable[[optserve.Client | None, bool], list[Snapshot]]) -> None:
    expected = run(None, False)
    with optserve.Client(live_server, max_retries=0, transport=transport) as client:
        got = run(client, True)
    assert len(got) == len(expected)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert_same(want, have, f"step {i}")
        assert not have[1]["param_groups"][0]["capturable"]
