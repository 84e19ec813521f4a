"""Hugging Face ``accelerate`` with ``RemoteOptimizer``: ``Accelerator(cpu=True).prepare(model,
optimizer, dataloader, scheduler)``, ``accelerator.backward``, ``clip_grad_norm_``, gradient
accumulation, and ``save_state``/``load_state`` into a new model and a new ``RemoteOptimizer``
that train on; the run equals the same run with the local ``torch.optim.Adam``.

    python -m examples.thirdparty.accelerate_prepare [--url http://127.0.0.1:8000]

Needs ``accelerate`` (1.x); exits 1 when a remote run differs from the local one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import optserve
from examples.thirdparty._common import compare, data, server

STEPS = 8  # optimizer steps, of ACCUMULATE batches each
ACCUMULATE = 2
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.99)}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def optimizer(net: nn.Module, client: optserve.Client | None) -> torch.optim.Optimizer:
    if client is None:
        return torch.optim.Adam(net.parameters(), **OPTIONS)
    return optserve.RemoteOptimizer(net.parameters(), "Adam", client, **OPTIONS)


def run(client: optserve.Client | None, steps: range, state: str | None = None,
        save: str | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train ``steps`` (of ``STEPS``): from the start, or from ``accelerator.save_state``'s
    folder ``state``; ``save``: ``save_state`` into that folder at the end."""
    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    net = model()
    opt = optimizer(net, client)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x, y = data(n=16 * ACCUMULATE * STEPS)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    net, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
    if state is not None:
        accelerator.load_state(state)
    batches = list(loader)
    for step in steps:
        for xb, yb in batches[step * ACCUMULATE:(step + 1) * ACCUMULATE]:
            with accelerator.accumulate(net):
                loss = F.mse_loss(net(xb), yb)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
    if save is not None:
        accelerator.save_state(save)
    return accelerator.unwrap_model(net), opt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--url", help="a running optserve server (default: start a local one)")
    args = ap.parse_args()
    ok = True
    with server(args.url) as url, optserve.Client(url) as client:
        print(f"accelerate {accelerate.__version__}, torch {torch.__version__}, server {url}")
        local_net, local_opt = run(None, range(STEPS))
        local_sd = local_opt.state_dict()
        print("uninterrupted run:")
        remote_net, remote_opt = run(client, range(STEPS))
        ok &= compare("parameters", local_net.state_dict(), remote_net.state_dict())
        ok &= compare("optimizer state", local_sd, remote_opt.state_dict())
        print("save_state halfway, load_state into a new model and optimizer, train on:")
        with tempfile.TemporaryDirectory() as tmp:
            run(client, range(STEPS // 2), save=tmp)
            resumed_net, resumed_opt = run(client, range(STEPS // 2, STEPS), state=tmp)
        ok &= compare("parameters", local_net.state_dict(), resumed_net.state_dict())
        ok &= compare("optimizer state", local_sd, resumed_opt.state_dict())
    print("OK: the remote runs equal the local one" if ok else "FAILED")
    return 0 if ok else 1




if __name__ == "__main__":
    sys.exit(main())
