"""A scheduler option torch refuses at create is named where the client gave it.

torch's message does not always name the option: PolynomialLR's ``power: -1e6`` raises
``OverflowError: (34, 'Numerical result out of range')`` at its first step, a zero
``T_max`` or ``step_size_up`` a ``ZeroDivisionError``, OneCycleLR's negative
``final_div_factor`` makes a negative ``min_lr``; and a value past int64 is found in the
scheduler's state under another name (CosineAnnealingWarmRestarts' ``T_i``, CyclicLR's
``base_lrs``). With more than one option given these named only ``scheduler.options``; inside a
SequentialLR every child's refusal named the parent's ``milestones``. Each names its option now,
in its place (``scheduler.options.schedulers.<i>.options.<key>`` when nested), as the LinearLR
factors do. The premise (torch itself refuses) is checked against in-process torch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests.torch_reference import build_scheduler

pytestmark = pytest.mark.integration

#: id: (scheduler name, options, the option refused)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "polynomial-power": ("PolynomialLR", {"total_iters": 4, "power": -1e6}, "power"),
    "polynomial-power-most": ("PolynomialLR", {"total_iters": 4, "power": -1e308}, "power"),
    "polynomial-power-int": ("PolynomialLR", {"total_iters": 4, "power": -(2**63)}, "power"),
    "cosine-t-max-zero": ("CosineAnnealingLR", {"T_max": 0, "eta_min": 0.0}, "T_max"),
    "cyclic-step-size-up-zero": ("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1,
                                              "step_size_up": 0, "gamma": 1.0}, "step_size_up"),
    "onecycle-div-factor-zero": ("OneCycleLR", {"max_lr": 0.1, "total_steps": 10,
                                                "div_factor": 0, "final_div_factor": 1e4},
                                 "div_factor"),
    "onecycle-div-factor-negative": ("OneCycleLR", {"max_lr": 0.1, "total_steps": 10,
                                                    "div_factor": -1e6}, "div_factor"),
    "onecycle-final-div-factor": ("OneCycleLR", {"max_lr": 0.1, "total_steps": 10,
                                                 "final_div_factor": -1e308}, "final_div_factor"),
    "warm-restarts-t0-past-int64": ("CosineAnnealingWarmRestarts",
                                    {"T_0": 2**63, "T_mult": 1}, "T_0"),
    "cyclic-base-lr-past-int64": ("CyclicLR", {"base_lr": 2**63, "max_lr": 0.1}, "base_lr"),
    "cyclic-max-momentum-past-int64": ("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1,
                                                    "max_momentum": 2**63}, "max_momentum"),
}
#: the ones torch's own scheduler raises for (the others are refused by the server's checks of
#: what the scheduler keeps or writes: int64, a negative lr)
TORCH_RAISES = {"polynomial-power", "polynomial-power-most", "polynomial-power-int",
                "cosine-t-max-zero", "cyclic-step-size-up-zero", "onecycle-div-factor-zero"}


def create(c: TestClient, scheduler: dict[str, Any]) -> Any:
    return c.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9},
        "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}},
        "scheduler": scheduler})


def torch_refuses(name: str, options: dict[str, Any]) -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises((ValueError, ZeroDivisionError, OverflowError)):
        sched = build_scheduler({"name": name, "options": options}, opt)
        p.grad = torch.ones(2)
        opt.step()
        sched.step()


@pytest.mark.parametrize("nested", [False, True], ids=["top", "in-sequential"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refused_scheduler_option_is_named(app_client: TestClient, case: str,
                                             nested: bool) -> None:
    name, options, key = CASES[case]
    if case in TORCH_RAISES:
        torch_refuses(name, options)
    spec: dict[str, Any] = {"name": name, "options": options}
    want = f"scheduler.options.{key}"
    if nested:
        spec = {"name": "SequentialLR", "options": {
            "schedulers": [spec, {"name": "ConstantLR", "options": {"factor": 0.5}}],
            "milestones": [3]}}
        want = f"scheduler.options.schedulers.0.options.{key}"
    r = create(app_client, spec)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (r.json()["code"], r.json()["field"]) == ("invalid_option", want), r.json()


def test_a_nested_schedulers_own_words_name_its_option(app_client: TestClient) -> None:
    """torch's message for a child (LinearLR's "Starting multiplicative factor ...") names the
    child's option, not the SequentialLR's only one."""
    r = create(app_client, {"name": "SequentialLR", "options": {
        "schedulers": [{"name": "LinearLR", "options": {"start_factor": 2.0,
                                                        "total_iters": 3}},
                       {"name": "ExponentialLR", "options": {"gamma": 0.9}}],
        "milestones": [3]}})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "scheduler.options.schedulers.0.options.start_factor"
