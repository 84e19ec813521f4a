"""Third-party training code against ``RemoteOptimizer``: the scripts of
``examples/thirdparty`` (PyTorch Lightning's ``Trainer`` with a checkpoint resumed by
``fit(ckpt_path=...)``, and a WGAN under its manual optimization), run as a subprocess
against the live server. The script trains once with the local ``torch.optim`` optimizer and
once with the remote one and exits 1 when parameters or optimizer state differ (bitwise).
pytorch-lightning comes with the ``thirdparty`` extra (in requirements-lock.txt, installed by
scripts/bootstrap);
``accelerate_prepare`` and ``transformers_trainer`` are run by hand: their huggingface-hub
brings httpx2, which would change starlette's TestClient under the rest of the suite (README,
"Third-party training code")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["lightning_trainer", "lightning_wgan",
                                    "lightning_gan_resume"])
def test_a_lightning_run_equals_the_local_one(live_server: str, script: str) -> None:
    """``lightning_wgan``: manual optimization with two optimizers, the critic's weights
    clipped through ``.data`` after each of its steps (WGAN's reference code);
    ``lightning_gan_resume``: manual optimization with ``toggle_optimizer``, two schedulers
    stepped by hand from ``self.lr_schedulers()`` and a ``fit(ckpt_path=...)`` resume."""
    env = {k: v for k, v in os.environ.items() if k != "OPTSERVE_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"),
                                         env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    done = subprocess.run([sys.executable, "-m", f"examples.thirdparty.{script}",
                           "--url", live_server], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "OK: the remote runs equal the local one" in done.stdout
    assert "DIFFERENT" not in done.stdout
