"""A GAN trained with PyTorch Lightning's manual optimization over two ``RemoteOptimizer``s, as
Lightning's own GAN example has it: ``self.optimizers()``, ``toggle_optimizer`` /
``untoggle_optimizer`` around each network's ``manual_backward`` and step, the generator's
gradients clipped, and the two schedulers ``configure_optimizers`` returns (``StepLR`` and
``ExponentialLR``) stepped by hand from ``self.lr_schedulers()`` at each epoch's last batch.
Trained four epochs in one go, and two epochs with a ``ModelCheckpoint`` then resumed with
``trainer.fit(ckpt_path=...)`` into a new module and new optimizers up to four: both equal the
same four epochs with local ``torch.optim.Adam`` optimizers (parameters, both optimizers'
states and both schedulers' states, bit for bit).

    python -m examples.thirdparty.lightning_gan_resume [--url http://127.0.0.1:8000]

Needs ``pytorch-lightning`` (2.6); exits 1 when a remote run differs from the local one.
(Lightning 2.x trains several optimizers only under manual optimization: a module returning
two from ``configure_optimizers`` with ``automatic_optimization`` on is its ``RuntimeError``,
with local and remote optimizers alike.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import optserve
from examples.thirdparty._common import compare, server

EPOCHS = 4
BATCHES = 8
NOISE = 4
LR = 2e-3


class GAN(pl.LightningModule):
    def __init__(self, url: str | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(NOISE, 16), nn.ReLU(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2),
                                           nn.Linear(16, 1))
        self.url = url
        self.made: list[torch.optim.Optimizer] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        sched_g, sched_d = self.lr_schedulers()  # type: ignore[misc]
        z = torch.randn(len(real), NOISE, generator=torch.Generator().manual_seed(
            1000 * self.current_epoch + batch_idx))
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), ones)
        self.manual_backward(g_loss)
        self.clip_gradients(opt_g, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(
                      self.discriminator(self.generator(z).detach()), zeros)) / 2
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        if self.trainer.is_last_batch:
            sched_g.step()
            sched_d.step()

    def configure_optimizers(self) -> Any:
        options: dict[str, Any] = {"lr": LR, "betas": (0.5, 0.999)}
        if self.url is None:
            self.made = [torch.optim.Adam(self.generator.named_parameters(), **options),
                         torch.optim.Adam(self.discriminator.named_parameters(), **options)]
        else:
            client = optserve.Client(self.url)
            self.made = [
                optserve.RemoteOptimizer(self.generator.named_parameters(), "Adam", client,
                                         **options),
                optserve.RemoteOptimizer(self.discriminator.named_parameters(), "Adam", client,
                                         **options)]
        opt_g, opt_d = self.made
        return ([opt_g, opt_d],
                [torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.7),
                 torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.8)])


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    real = torch.randn(BATCHES * 16, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])
    return DataLoader(TensorDataset(real), batch_size=16)


def fit(url: str | None, epochs: int, ckpt_dir: Path | None = None,
        ckpt_path: Path | None = None) -> tuple[GAN, pl.Trainer]:
    module = GAN(url)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                         enable_checkpointing=ckpt_dir is not None,
                         default_root_dir=str(ckpt_dir) if ckpt_dir else None,
                         enable_progress_bar=False, enable_model_summary=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return module, trainer


def same(label: str, local: tuple[GAN, pl.Trainer], remote: tuple[GAN, pl.Trainer]) -> bool:
    print(f"{label}:")
    ok = compare("parameters", local[0].state_dict(), remote[0].state_dict())
    for name, mine, theirs in zip(("generator", "discriminator"), local[0].made, remote[0].made,
                                  strict=True):
        # (a RemoteOptimizer's state dict holds torch's keys, with the same values)
        ok &= compare(f"{name} optimizer state", mine.state_dict(), theirs.state_dict())
    for name, mine_cfg, theirs_cfg in zip(("generator", "discriminator"),
                                          local[1].lr_scheduler_configs,
                                          remote[1].lr_scheduler_configs, strict=True):
        ok &= compare(f"{name} scheduler state", mine_cfg.scheduler.state_dict(),
                      theirs_cfg.scheduler.state_dict())
    ok &= local[1].global_step == remote[1].global_step
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--url", help="a running optserve server (default: start a local one)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(LightningModule|log_every_n_steps).*")
    with server(args.url) as url:
        print(f"pytorch-lightning {pl.__version__}, torch {torch.__version__}, server {url}")
        local = fit(None, EPOCHS)
        whole = fit(url, EPOCHS)
        ok = same("four epochs", local, whole)
        with tempfile.TemporaryDirectory() as tmp:
            first = fit(url, EPOCHS // 2, Path(tmp))
            ckpt = Path(first[1].checkpoint_callback.best_model_path)  # type: ignore[union-attr]
            print(f"  checkpoint {ckpt.name}")
            resumed = fit(url, EPOCHS, Path(tmp), ckpt_path=ckpt)
        ok &= same("two epochs, a checkpoint, trainer.fit(ckpt_path=...) to four", local,
                   resumed)
        for module, _ in (whole, first, resumed):
            for opt in module.made:
                assert isinstance(opt, optserve.RemoteOptimizer)
                opt.close(delete_session=True)
    print("OK: the remote runs equal the local one" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
