"""A WGAN trained with PyTorch Lightning's manual optimization and ``RemoteOptimizer``: two
optimizers (the critic's and the generator's RMSprop, as the WGAN paper has them), the critic
stepped ``N_CRITIC`` times per generator step, and its weights clipped after each of its
steps the way WGAN's reference code does it, through ``.data``
(``for p in critic.parameters(): p.data.clamp_(-c, c)``), which leaves the version counter as
it was. The run equals the same run with local ``torch.optim.RMSprop`` optimizers: parameters
and both optimizers' states, bit for bit (``RemoteOptimizer`` sends the clipped values before
the critic's next step; ``detect_data_edits``).

    python -m examples.thirdparty.lightning_wgan [--url http://127.0.0.1:8000]

Needs ``pytorch-lightning`` (2.6); exits 1 when the remote run differs from the local one.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optserve
from examples.thirdparty._common import compare, server

BATCHES = 15
N_CRITIC = 5
CLIP = 0.01
LR = 5e-5 * 100  # (the paper's 5e-5, larger: a few steps move the weights visibly)
NOISE = 4


class WGAN(pl.LightningModule):
    def __init__(self, url: str | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(NOISE, 16), nn.ReLU(), nn.Linear(16, 2))
        self.critic = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.url = url
        self.remote: list[optserve.RemoteOptimizer] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_critic, opt_generator = self.optimizers()  # type: ignore[misc]
        noise = torch.randn(len(real), NOISE, generator=torch.Generator().manual_seed(batch_idx))
        fake = self.generator(noise)
        # the critic: maximize D(real) - D(fake), then clip its weights through .data
        loss_critic = self.critic(fake.detach()).mean() - self.critic(real).mean()
        opt_critic.zero_grad()
        self.manual_backward(loss_critic)
        opt_critic.step()
        for p in self.critic.parameters():
            p.data.clamp_(-CLIP, CLIP)
        # the generator, every N_CRITIC critic steps: maximize D(G(z))
        if (batch_idx + 1) % N_CRITIC == 0:
            loss_generator = -self.critic(self.generator(noise)).mean()
            opt_generator.zero_grad()
            self.manual_backward(loss_generator)
            opt_generator.step()

    def configure_optimizers(self) -> Any:
        if self.url is None:
            return (torch.optim.RMSprop(self.critic.named_parameters(), lr=LR),
                    torch.optim.RMSprop(self.generator.named_parameters(), lr=LR))
        client = optserve.Client(self.url)
        self.remote = [
            optserve.RemoteOptimizer(self.critic.named_parameters(), "RMSprop", client, lr=LR),
            optserve.RemoteOptimizer(self.generator.named_parameters(), "RMSprop", client,
                                     lr=LR)]
        return tuple(self.remote)


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    real = torch.randn(BATCHES * 32, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])
    return DataLoader(TensorDataset(real), batch_size=32)


def fit(url: str | None) -> tuple[WGAN, pl.Trainer]:
    module = WGAN(url)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, loader())
    return module, trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--url", help="a running optserve server (default: start a local one)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(LightningModule|log_every_n_steps).*")
    with server(args.url) as url:
        print(f"pytorch-lightning {pl.__version__}, torch {torch.__version__}, server {url}")
        local, local_trainer = fit(None)
        remote, _ = fit(url)
        ok = compare("parameters", local.state_dict(), remote.state_dict())
        for name, mine, theirs in zip(("critic", "generator"), local_trainer.optimizers,
                                      remote.remote, strict=True):
            ok &= compare(f"{name} optimizer state", mine.state_dict(), theirs.state_dict())
        clipped = all(bool(p.abs().max() <= CLIP) for p in remote.critic.parameters())
        print(f"  critic weights within ±{CLIP}: {clipped}")
        ok &= clipped
        for opt in remote.remote:
            opt.close(delete_session=True)
    print("OK: the remote runs equal the local one" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
