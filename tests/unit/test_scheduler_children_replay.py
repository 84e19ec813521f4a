"""The create check's step of a SequentialLR's later children (PolynomialLR's ``power: -1e6``
after a milestone) refuses a create asked for now; a create record logged before the check,
which a server took, still replays as it ran (its session restores and steps up to its
milestone as in-process torch does), so no acknowledged session is lost to an upgrade."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from app.engine import GroupSpec
from app.engine.ops import CreateSession, decode
from app.engine.schedulers import step as scheduler_step
from app.errors import Invalid

SCHEDULER: dict[str, Any] = {"name": "SequentialLR", "options": {
    "schedulers": [{"name": "ConstantLR", "options": {"factor": 0.5}},
                   {"name": "PolynomialLR", "options": {"power": -1e6}}],
    "milestones": [3]}}


def record() -> CreateSession:
    return CreateSession("s", "SGD", [GroupSpec({"w": torch.ones(2)})], {"lr": 0.1},
                         SCHEDULER)


def test_a_create_asked_for_now_is_refused_naming_the_child_option() -> None:
    asked = record()
    asked.request = True
    with pytest.raises(Invalid) as caught:
        asked.build(torch.device("cpu"))
    assert (caught.value.code, caught.value.field) == (
        "invalid_option", "scheduler.options.schedulers.1.options.power")


def test_a_logged_create_replays_as_it_ran() -> None:
    replayed = decode("create", record().to_tree())
    assert isinstance(replayed, CreateSession) and not replayed.request
    s = replayed.build(torch.device("cpu"))
    p = torch.ones(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5),
            torch.optim.lr_scheduler.PolynomialLR(opt, power=-1e6)], milestones=[3])
    assert s.scheduler is not None
    for _ in range(3):  # up to and through the milestone's restart, as torch
        scheduler_step(s.scheduler)
        local.step()
        assert s.lrs() == [g["lr"] for g in opt.param_groups]
    with pytest.raises(OverflowError):  # (and torch's own refusal after it)
        local.step()
