"""A CosineAnnealingWarmRestarts whose period ``T_i`` (the last one times ``T_mult`` at each
restart) would pass int64 within 2**53 steps is refused where it is given: at create (422
``invalid_option`` naming its ``T_mult``, a nested one's in its place) and in an imported state
(naming ``state_dict.scheduler.T_mult``). It was accepted, and every step from that restart on
was a 422 ``counter_overflow`` (no state export holds such a count), where torch in-process goes
on with a Python int. Schedules that stay within int64 for 2**53 steps (``T_mult`` 2 with a
``T_0`` of a power of two passes it only a few steps before the step count itself does; ``T_0``
1 with ``T_mult`` 2**62 at step 2**62 + 1) are taken and step as torch's."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import torch

from tests.torch_reference import json_tensor, tensors_from_json

pytestmark = pytest.mark.integration

INT64_MAX = 2**63 - 1
P0 = torch.tensor([1.0, -2.0, 0.5])
GRAD = torch.tensor([0.25, 0.5, -1.0])


def create(c: httpx.Client, scheduler: dict[str, Any]) -> tuple[str, httpx.Response]:
    sid = f"wr-{uuid.uuid4().hex[:10]}"
    return sid, c.post("/v1/sessions", json={
        "id": sid, "optimizer": "SGD", "options": {"lr": 0.1},
        "params": {"w": json_tensor(P0)}, "scheduler": scheduler})


def torch_restart(t_0: int, t_mult: int) -> tuple[int, int]:
    """torch's own run (a Python int, no bound): the step whose restart first takes T_i past
    int64, and that T_i."""
    p = torch.nn.Parameter(P0.clone())
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult)
    for step in range(1, 1000):
        opt.step()
        sched.step()
        if sched.T_i > INT64_MAX:
            return step, sched.T_i
    raise AssertionError("no restart past int64 in 1,000 steps")


def assert_refused(r: httpx.Response, field: str, t_0: int, t_mult: int) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("invalid_option", field), problem
    step, t_i = torch_restart(t_0, t_mult)
    assert f"would restart at its step {step} (its last_epoch) with a period T_i of {t_i}, past " \
        "int64" in problem["detail"], problem["detail"]
    assert problem["limit"] == INT64_MAX


@pytest.mark.parametrize("t_0,t_mult", [(2, INT64_MAX), (4, 2**61), (3, 2**62)])
def test_a_period_past_int64_is_refused_at_create(live_server: str, t_0: int,
                                                  t_mult: int) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        cawr = {"name": "CosineAnnealingWarmRestarts", "options": {"T_0": t_0, "T_mult": t_mult}}
        sid, r = create(c, cawr)
        assert_refused(r, "scheduler.options.T_mult", t_0, t_mult)
        assert c.get(f"/v1/sessions/{sid}").status_code == 404
        nested = {"name": "SequentialLR", "options": {"milestones": [3], "schedulers": [
            {"name": "ConstantLR", "options": {"factor": 0.5, "total_iters": 3}}, cawr]}}
        sid, r = create(c, nested)
        assert_refused(r, "scheduler.options.schedulers.1.options.T_mult", t_0, t_mult)
        assert c.get(f"/v1/sessions/{sid}").status_code == 404


@pytest.mark.parametrize("t_0,t_mult", [(1, 2), (8, 2), (10, 3), (5, 1), (1, 2**62)])
def test_periods_within_int64_step_as_torch(live_server: str, t_0: int, t_mult: int) -> None:
    p = torch.nn.Parameter(P0.clone())
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult)
    with httpx.Client(base_url=live_server, timeout=60) as c:
        sid, r = create(c, {"name": "CosineAnnealingWarmRestarts",
                            "options": {"T_0": t_0, "T_mult": t_mult}})
        assert r.status_code == 201, r.text
        for _ in range(12):
            r = c.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(GRAD)}})
            assert r.status_code == 200, r.text
            p.grad = GRAD.clone()
            opt.step()
            sched.step()
            assert r.json()["lr"] == [opt.param_groups[0]["lr"]]
            assert torch.equal(tensors_from_json(r.json()["params"])["w"], p.detach())


def test_an_imported_state_with_such_a_period_is_refused(live_server: str) -> None:
    """The session's own export, its T_mult changed to one that passes int64 at the next
    restart: refused naming ``state_dict.scheduler.T_mult``, the session as it was (it steps
    on as torch's); the export as it was imports."""
    p = torch.nn.Parameter(P0.clone())
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2)
    with httpx.Client(base_url=live_server, timeout=60) as c:
        sid, r = create(c, {"name": "CosineAnnealingWarmRestarts",
                            "options": {"T_0": 2, "T_mult": 2}})
        assert r.status_code == 201, r.text

        def step() -> None:
            r = c.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(GRAD)}})
            assert r.status_code == 200, r.text
            p.grad = GRAD.clone()
            opt.step()
            sched.step()
            assert r.json()["lr"] == [opt.param_groups[0]["lr"]]
            assert torch.equal(tensors_from_json(r.json()["params"])["w"], p.detach())
        step()
        exported = c.get(f"/v1/sessions/{sid}/state_dict").json()
        assert exported["scheduler"]["T_mult"] == 2
        bad = {**exported, "scheduler": {**exported["scheduler"], "T_mult": INT64_MAX}}
        r = c.put(f"/v1/sessions/{sid}/state_dict", json=bad)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert (problem["code"], problem["field"]) == ("invalid_option",
                                                       "state_dict.scheduler.T_mult"), problem
        # (torch's own run from the same state: the restart at step 2 takes T_i to 2 * T_mult)
        assert f"would restart at its step 2 (its last_epoch) with a period T_i of " \
            f"{2 * INT64_MAX}" in problem["detail"], problem["detail"]
        assert c.get(f"/v1/sessions/{sid}/state_dict").json() == exported
        step()
        r = c.put(f"/v1/sessions/{sid}/state_dict", json=exported)
        assert r.status_code == 200, r.text
        assert c.get(f"/v1/sessions/{sid}/state_dict").json()["scheduler"] == \
            exported["scheduler"]
