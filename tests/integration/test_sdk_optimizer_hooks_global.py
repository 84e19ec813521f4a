"""``RemoteOptimizer`` under torch's optimizer hooks: the process-wide step hooks
(``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook``, which profilers
and step counters install) and each optimizer's state-dict hooks
(``register_state_dict_pre_hook``, ``register_state_dict_post_hook`` returning a new dict,
``register_load_state_dict_pre_hook`` returning a changed state dict,
``register_load_state_dict_post_hook``), through a checkpoint saved and loaded mid-training
under a local scheduler. Each run is compared with the same run on the local ``torch.optim``
optimizer: the hooks' calls, the parameters and the state, bit for bit."""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import optserve

pytestmark = pytest.mark.integration


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


def make(client: optserve.Client | None, model: nn.Module) -> torch.optim.Optimizer:
    if client is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return optserve.RemoteOptimizer(model.parameters(), "AdamW", client, lr=1e-2,
                                    weight_decay=0.05)


def train(client: optserve.Client | None) -> tuple[nn.Module, torch.optim.Optimizer,
                                                   list[Any]]:
    """Six steps under OneCycleLR, a checkpoint through ``torch.save`` after the third loaded
    into the same optimizer (``load_state_dict``), with every kind of hook logging."""
    model = mlp()
    opt = make(client, model)
    sched = lrs.OneCycleLR(opt, max_lr=0.05, total_steps=6)
    log: list[Any] = []
    mine = {id(opt)}

    here = threading.get_ident()

    def seen(kind: str) -> Any:
        # (this thread's steps: the live server runs in this process, its own optimizers'
        # steps on its worker thread)
        return lambda o, args, kwargs: (log.append((kind, id(o) in mine))
                                        if threading.get_ident() == here else None)
    handles = [register_optimizer_step_pre_hook(seen("global pre")),
               register_optimizer_step_post_hook(seen("global post"))]
    try:
        opt.register_step_pre_hook(seen("pre"))
        opt.register_state_dict_pre_hook(lambda o: log.append("state_dict pre"))
        opt.register_state_dict_post_hook(
            lambda o, sd: {**sd, "param_groups": [dict(g, tag="saved")
                                                  for g in sd["param_groups"]]})

        def load_pre(o: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
            log.append("load pre")
            changed = copy.deepcopy(sd)
            changed["param_groups"][0]["weight_decay"] = 0.2
            return changed
        opt.register_load_state_dict_pre_hook(load_pre)
        opt.register_load_state_dict_post_hook(
            lambda o: log.append(("load post", o.param_groups[0]["weight_decay"],
                                  o.param_groups[0]["tag"], len(o.state))))
        for i in range(6):
            opt.zero_grad()
            loss_at(model, i).backward()
            opt.step()
            sched.step()
            if i == 2:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt.load_state_dict(torch.load(buf, weights_only=True))
    finally:
        for handle in handles:
            handle.remove()
    return model, opt, log


def test_global_step_hooks_see_only_the_users_steps_and_state_dict_hooks_run_as_torchs(
        client: optserve.Client) -> None:
    """The global step hooks fire once per step of the user's optimizer, as with torch's
    (before, ``load_state_dict`` stepped throwaway torch optimizers to work out which state keys
    the session's optimizer keeps, and each of those steps ran the global hooks too: a step
    counter counted steps nobody took). The state-dict hooks run in torch's order, a changed
    state dict returned by the load pre-hook is the one loaded, and the loaded option is the
    one the next steps use."""
    local_model, local, local_log = train(None)
    remote_model, remote, remote_log = train(client)
    assert remote_log == local_log
    assert local_log.count(("global pre", True)) == 6
    assert all(entry[1] for entry in local_log if isinstance(entry, tuple)
               and entry[0].startswith("global"))
    for (name, a), b in zip(remote_model.named_parameters(), local_model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name
    mine, torchs = remote.state_dict(), local.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["param_groups"][0]["weight_decay"] == 0.2
    for pid, entry in torchs["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(mine["state"][pid][key]), value), (pid, key)
