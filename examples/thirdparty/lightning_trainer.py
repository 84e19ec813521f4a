"""PyTorch Lightning's ``Trainer`` with ``RemoteOptimizer``: ``configure_optimizers`` returns
a ``RemoteOptimizer`` and a per-step lr scheduler; the run equals the same run with the local
``torch.optim.AdamW``, and so does a run stopped at a checkpoint and resumed from it with
``trainer.fit(ckpt_path=...)`` (a new module, a new ``RemoteOptimizer``).

    python -m examples.thirdparty.lightning_trainer [--url http://127.0.0.1:8000]

Needs ``pytorch-lightning`` (2.6); exits 1 when a remote run differs from the local one.
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
from examples.thirdparty._common import compare, data, server

STEPS = 12
EPOCHS = 5  # the run stops there, then resumes from its checkpoint
OPTIONS = {"lr": 1e-2, "weight_decay": 0.01}


class Regression(pl.LightningModule):
    def __init__(self, url: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.url = url
        self.remote: optserve.RemoteOptimizer | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt: torch.optim.Optimizer
        if self.url is None:
            opt = torch.optim.AdamW(self.named_parameters(), **OPTIONS)
        else:
            opt = self.remote = optserve.RemoteOptimizer(
                self.named_parameters(), "AdamW", optserve.Client(self.url), **OPTIONS)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> DataLoader[Any]:
    x, y = data()
    # one batch an epoch: a fit resumed from the checkpoint taken at an epoch's end runs that
    # epoch's batches again (Lightning 2.6 counts the epoch as not completed there), which
    # with one batch an epoch are the ones the uninterrupted fit takes next
    return DataLoader(TensorDataset(x, y), batch_size=len(x))


def fit(url: str | None, max_steps: int = -1, max_epochs: int | None = None,
        ckpt_dir: Path | None = None, ckpt_path: Path | None = None
        ) -> tuple[Regression, pl.Trainer]:
    module = Regression(url)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs,
                         logger=False,
                         enable_checkpointing=ckpt_dir is not None,
                         default_root_dir=str(ckpt_dir) if ckpt_dir else None,
                         enable_progress_bar=False, enable_model_summary=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return module, trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--url", help="a running optserve server (default: start a local one)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(LightningModule|log_every_n_steps).*")
    ok = True
    with server(args.url) as url:
        print(f"pytorch-lightning {pl.__version__}, torch {torch.__version__}, server {url}")
        local, local_trainer = fit(None, STEPS)
        local_opt = local_trainer.optimizers[0].state_dict()
        print("uninterrupted run:")
        remote, _ = fit(url, STEPS)
        assert remote.remote is not None
        ok &= compare("parameters", local.state_dict(), remote.state_dict())
        ok &= compare("optimizer state", local_opt, _torch_format(remote.remote.state_dict()))
        for where, at in (("local", None), ("remote", url)):
            print(f"{where}: stopped at a checkpoint, resumed with trainer.fit(ckpt_path=...):")
            resumed, resumed_opt = resume(at)
            same = compare("parameters", local.state_dict(), resumed.state_dict())
            same &= compare("optimizer state", local_opt, resumed_opt)
            ok &= same
    print("OK: the remote runs equal the local one" if ok else "FAILED")
    return 0 if ok else 1


def resume(url: str | None) -> tuple[Regression, dict[str, Any]]:
    """Train ``EPOCHS`` epochs with a ``ModelCheckpoint`` (one checkpoint at each epoch's
    end), then a new module (and optimizer) resumes from the last for the rest of ``STEPS``;
    its optimizer's state dict at the end."""
    with tempfile.TemporaryDirectory() as tmp:
        first, trainer = fit(url, max_epochs=EPOCHS, ckpt_dir=Path(tmp))
        ckpt = Path(trainer.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
        print(f"  checkpoint {ckpt.name}")
        if first.remote is not None:
            first.remote.close(delete_session=True)
        resumed, trainer = fit(url, STEPS, ckpt_dir=Path(tmp), ckpt_path=ckpt)
    state = (resumed.remote.state_dict() if resumed.remote is not None
             else trainer.optimizers[0].state_dict())
    return resumed, _torch_format(state)


def _torch_format(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A remote state dict without what only a session has (its server-side scheduler)."""
    return {k: v for k, v in state_dict.items() if k != "scheduler"}


if __name__ == "__main__":
    sys.exit(main())
