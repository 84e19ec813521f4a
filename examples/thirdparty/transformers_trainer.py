"""Hugging Face ``transformers.Trainer`` with ``RemoteOptimizer``: a tiny GPT-2 built from a
config (nothing downloaded), ``Trainer(optimizers=(RemoteOptimizer(...), scheduler))``, a
checkpoint saved by ``save_strategy="steps"`` and ``trainer.train(resume_from_checkpoint=...)``
in a new ``Trainer`` with a new ``RemoteOptimizer``; the runs equal the same ones with the
local ``torch.optim.AdamW``.

    python -m examples.thirdparty.transformers_trainer [--url http://127.0.0.1:8000]

Needs ``transformers`` (4.5x or 5.x); exits 1 when a remote run differs from the local one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: the model is a config's

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import optserve  # noqa: E402
from examples.thirdparty._common import compare, server  # noqa: E402

STEPS = 8
SAVE_AT = 4
OPTIONS = {"lr": 5e-3, "weight_decay": 0.01}


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (64, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def trainer(client: optserve.Client | None, out: Path) -> tuple[Trainer, Any]:
    net = model()
    decay = [p for n, p in net.named_parameters() if "ln" not in n and "bias" not in n]
    rest = [p for n, p in net.named_parameters() if "ln" in n or "bias" in n]
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    opt: torch.optim.Optimizer
    if client is None:
        opt = torch.optim.AdamW(groups, **OPTIONS)
    else:
        opt = optserve.RemoteOptimizer(groups, "AdamW", client, **OPTIONS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=STEPS,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=1.0,
        save_strategy="steps", save_steps=SAVE_AT, logging_strategy="no", seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=net, args=args, train_dataset=Tokens(), optimizers=(opt, sched)), opt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--url", help="a running optserve server (default: start a local one)")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    ok = True
    with server(args.url) as url, optserve.Client(url) as client, \
            tempfile.TemporaryDirectory() as tmp:
        print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
              f"server {url}")
        local, local_opt = trainer(None, Path(tmp) / "local")
        local.train()
        local_sd = local_opt.state_dict()
        print("uninterrupted run (a checkpoint saved at step "
              f"{SAVE_AT}):")
        remote, remote_opt = trainer(client, Path(tmp) / "remote")
        remote.train()
        ok &= compare("parameters", local.model.state_dict(), remote.model.state_dict())
        ok &= compare("optimizer state", local_sd, remote_opt.state_dict())
        print(f"resumed from the checkpoint of step {SAVE_AT} (a new Trainer and optimizer):")
        resumed, resumed_opt = trainer(client, Path(tmp) / "remote")
        resumed.train(resume_from_checkpoint=str(Path(tmp) / "remote" /
                                                 f"checkpoint-{SAVE_AT}"))
        ok &= compare("parameters", local.model.state_dict(), resumed.model.state_dict())
        ok &= compare("optimizer state", local_sd, resumed_opt.state_dict())
    print("OK: the remote runs equal the local one" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
