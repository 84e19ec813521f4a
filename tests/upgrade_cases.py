"""The data directories older commits wrote (``tests/fixtures/upgrade/<case>``: ``stored/`` as
that commit left it, ``inputs.json`` what its client sent), for the tests that start the current
code on them: a case copied out, and the local torch run of what the commit acknowledged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "upgrade"


def f32(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def copied_case(name: str, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """The case's inputs, and a copy of its data directory under ``tmp_path``."""
    case = FIXTURES / name
    data = tmp_path / "data"
    shutil.copytree(case / "stored", data)
    return json.loads((case / "inputs.json").read_text()), data


def sgd_after_its_step(inputs: dict[str, Any]) -> tuple[dict[str, torch.Tensor],
                                                         torch.optim.SGD]:
    """The sharded-push cases' session run locally: its parameters ``u`` and ``v`` created as
    the case did, stepped once with the case's gradients by torch's SGD with its options."""
    made = inputs["create"]
    local = {n: f32(v) for n, v in made["params"].items()}
    opt = torch.optim.SGD([local["u"], local["v"]], **made["options"])
    for n, p in local.items():
        p.grad = f32(inputs["step"][n])
    opt.step()
    return local, opt
