"""A session whose scheduler torch would refuse at a fixed later step is either refused at
create or, at that step, told how to step on.

- A SequentialLR's later child (also nested, also inside a ChainedScheduler) that torch
  refuses when SequentialLR restarts it at its milestone or steps it once after (PolynomialLR's
  ``power: -1e6`` overflows at its first step) was accepted at create: the create check built
  and stepped only the child that runs first. At the milestone every step was then refused,
  all or nothing, so the session could never step past it. It is refused at create now, a 422
  naming the child's option in its place (``scheduler.options.schedulers.<i>.options.<key>``).
- A schedule torch runs for a while and then refuses for good (PolynomialLR with a negative
  power at its ``total_iters``, ConstantLR's ``factor: 0`` at its ``total_iters``, OneCycleLR
  past its ``total_steps``) is taken, as torch takes it; the step it cannot take is refused
  saying how to step on (``PATCH /v1/sessions/{id}`` with ``{"scheduler": null}``), and doing
  that lets the session step on, equal to torch without the scheduler.

Every premise (torch itself refuses there; the valid specs run past their milestones) is
checked against in-process torch at test time.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import httpx
import pytest
import torch

from tests.torch_reference import (
    Reference,
    assert_tensors_equal,
    build_scheduler,
    grad_stream,
    json_tensor,
    make_params,
    tensors_from_json,
)

pytestmark = pytest.mark.integration

SHAPES = {"weight": [3, 2], "bias": [3]}
SGD = ("SGD", {"lr": 0.1, "momentum": 0.9})
PROBLEM = "application/problem+json"


def spec(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "options": options}


def seq(milestones: list[int], *children: dict[str, Any]) -> dict[str, Any]:
    return spec("SequentialLR", schedulers=list(children), milestones=milestones)


def chain(*children: dict[str, Any]) -> dict[str, Any]:
    return spec("ChainedScheduler", schedulers=list(children))


def create_body(sid: str, sched: dict[str, Any], seed: int = 1) -> dict[str, Any]:
    params = make_params(SHAPES, seed)
    return {"id": sid, "optimizer": SGD[0], "options": SGD[1],
            "params": {n: json_tensor(t) for n, t in params.items()},
            "scheduler": copy.deepcopy(sched)}


def local(sched: dict[str, Any] | None, seed: int = 1) -> Reference:
    ref = Reference(getattr(torch.optim, SGD[0]), [(make_params(SHAPES, seed), {})], SGD[1])
    if sched is not None:
        with warnings.catch_warnings():  # (torch's call-order advice, as the server's)
            warnings.simplefilter("ignore")
            ref.scheduler = build_scheduler(copy.deepcopy(sched), ref.optimizer)
    return ref


def local_step(ref: Reference, grads: dict[str, torch.Tensor]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.step(grads)


def step(http: httpx.Client, sid: str, grads: dict[str, torch.Tensor]) -> httpx.Response:
    return http.post(f"/v1/sessions/{sid}/step",
                     json={"grads": {n: json_tensor(g) for n, g in grads.items()}})


def state(http: httpx.Client, sid: str) -> tuple[Any, Any]:
    return (http.get(f"/v1/sessions/{sid}").json(),
            http.get(f"/v1/sessions/{sid}/state_dict").json())


def torch_fails_at(sched: dict[str, Any], most: int = 12) -> int:
    """The optimizer step (1-based) at whose scheduler step in-process torch raises."""
    ref = local(sched)
    stream = grad_stream(SHAPES, seed=2)
    for k in range(1, most + 1):
        try:
            local_step(ref, next(stream))
        except (ValueError, ZeroDivisionError, OverflowError):
            return k
    raise AssertionError(f"torch stepped {sched['name']} {most} times")


POLY_OVERFLOWS = spec("PolynomialLR", power=-1e6)
#: id: (scheduler, the field the create refusal names)
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "sequential-second-child-steps-overflow": (
        seq([3], spec("ConstantLR", factor=0.5), POLY_OVERFLOWS),
        "scheduler.options.schedulers.1.options.power"),
    "sequential-second-child-two-options": (
        seq([3], spec("ConstantLR", factor=0.5), spec("PolynomialLR", total_iters=4,
                                                         power=-1e6)),
        "scheduler.options.schedulers.1.options.power"),
    "sequential-third-child": (
        seq([2, 4], spec("ConstantLR", factor=0.5), spec("ExponentialLR", gamma=0.9),
            POLY_OVERFLOWS),
        "scheduler.options.schedulers.2.options.power"),
    "sequential-in-chained": (
        chain(spec("ExponentialLR", gamma=0.9),
              seq([3], spec("ConstantLR", factor=0.5), POLY_OVERFLOWS)),
        "scheduler.options.schedulers.1.options.schedulers.1.options.power"),
    "sequential-in-sequential-first-child": (
        seq([6], seq([2], spec("ConstantLR", factor=0.5), POLY_OVERFLOWS),
            spec("ExponentialLR", gamma=0.9)),
        "scheduler.options.schedulers.0.options.schedulers.1.options.power"),
    "sequential-second-child-restart-divides-by-zero": (
        seq([3], spec("ConstantLR", factor=0.5), spec("CosineAnnealingLR", T_max=0,
                                                         eta_min=0.0)),
        "scheduler.options.schedulers.1.options.T_max"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_later_child_torch_refuses_is_refused_at_create(http: httpx.Client,
                                                          case: str) -> None:
    sched, field = REFUSED[case]
    fails_at = torch_fails_at(sched)
    assert fails_at > 1  # (the first step goes through: the old check saw nothing)
    sid = f"children-{case}"
    r = http.post("/v1/sessions", json=create_body(sid, sched))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("invalid_option", field), problem
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


@pytest.mark.parametrize("milestone", [1, 2, 3])
@pytest.mark.parametrize("nested", ["chained", "sequential"])
def test_a_nested_child_torch_cannot_restart_is_named_at_any_milestone(
        http: httpx.Client, milestone: int, nested: str) -> None:
    """A SequentialLR whose later child is a ChainedScheduler or SequentialLR, which torch
    cannot restart at its milestone (``NotImplementedError``), is a 422 ``invalid_scheduler``
    naming that child, whatever the milestone: at milestone 1 the create probe's own step
    crossed it first, and the refusal was a bare ``"NotImplementedError"`` naming only
    ``scheduler.options`` (an ``invalid_option`` no option of the spec causes)."""
    child = (chain(spec("ExponentialLR", gamma=0.9)) if nested == "chained"
             else seq([1], spec("ExponentialLR", gamma=0.9), spec("StepLR", step_size=1)))
    sched = seq([milestone], spec("LinearLR", start_factor=0.5, total_iters=2), child)
    ref = local(sched)
    stream = grad_stream(SHAPES, seed=2)
    with pytest.raises(NotImplementedError):  # (the premise: torch stops at the milestone)
        for _ in range(milestone):
            local_step(ref, next(stream))
    sid = f"children-restart-{nested}-{milestone}"
    r = http.post("/v1/sessions", json=create_body(sid, sched))
    assert r.status_code == 422, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("invalid_scheduler",
                                                   "scheduler.options.schedulers.1"), problem
    assert "cannot switch to" in problem["detail"]
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


#: id: (scheduler, optimizer steps): valid nested specs run past every milestone
VALID: dict[str, tuple[dict[str, Any], int]] = {
    "warmup-cosine": (seq([3], spec("LinearLR", start_factor=0.25, total_iters=3),
                          spec("CosineAnnealingLR", T_max=4, eta_min=0.001)), 9),
    "three-children": (seq([2, 5], spec("ConstantLR", factor=0.5, total_iters=2),
                           spec("PolynomialLR", total_iters=3, power=2.0),
                           spec("ExponentialLR", gamma=0.9)), 9),
    "sequential-in-chained": (chain(spec("ExponentialLR", gamma=0.95),
                                    seq([2], spec("ConstantLR", factor=0.5),
                                        spec("StepLR", step_size=2, gamma=0.5))), 8),
    "sequential-in-sequential": (seq([5], seq([2], spec("ConstantLR", factor=0.5),
                                              spec("ExponentialLR", gamma=0.9)),
                                     spec("MultiStepLR", milestones=[2, 3], gamma=0.5)), 10),
    # a child SequentialLR restarts but never steps (the next milestone is the same): torch
    # takes the spec and never steps it, so neither is it stepped at create
    "never-stepped-child": (seq([3, 3], spec("ConstantLR", factor=0.5), POLY_OVERFLOWS,
                                spec("ExponentialLR", gamma=0.9)), 7),
    "one-cycle-after-warmup": (seq([2], spec("LinearLR", start_factor=0.5, total_iters=2),
                                   spec("OneCycleLR", max_lr=0.2, total_steps=6)), 8),
}


@pytest.mark.parametrize("case", list(VALID))
def test_valid_nested_specs_step_past_their_milestones_as_torch(http: httpx.Client,
                                                                case: str) -> None:
    sched, steps = VALID[case]
    sid = f"children-ok-{case}"
    r = http.post("/v1/sessions", json=create_body(sid, sched))
    assert r.status_code == 201, r.text
    ref = local(sched)
    stream = grad_stream(SHAPES, seed=3)
    for k in range(steps):
        grads = next(stream)
        r = step(http, sid, grads)
        assert r.status_code == 200, (k, r.text)
        local_step(ref, grads)
        assert r.json()["lr"] == ref.lrs(), k  # (floats compared exactly: bitwise)
        assert_tensors_equal(tensors_from_json(r.json()["params"]), ref.params, f"step {k}")
    assert http.delete(f"/v1/sessions/{sid}").status_code in (200, 204)


#: id: (scheduler, the answer's status and code, how its detail names the scheduler) for
#: schedules torch runs, then refuses
STUCK: dict[str, tuple[dict[str, Any], int, str, str]] = {
    "polynomial-negative-power": (spec("PolynomialLR", total_iters=3, power=-1.0), 422,
                                  "scheduler_failed", "PolynomialLR.step() raises"),
    "constant-factor-zero": (spec("ConstantLR", factor=0.0, total_iters=2), 422,
                             "scheduler_failed", "ConstantLR.step() raises"),
    "one-cycle-past-total-steps": (spec("OneCycleLR", max_lr=0.1, total_steps=3), 409,
                                   "scheduler_exhausted", "OneCycleLR has run its 3"),
    "in-sequential-after-milestone": (
        seq([2], spec("ConstantLR", factor=0.5), spec("PolynomialLR", total_iters=2,
                                                         power=-1.0)),
        422, "scheduler_failed",
        "SequentialLR.step() (its PolynomialLR, scheduler.options.schedulers.1) raises"),
}


@pytest.mark.parametrize("case", list(STUCK))
def test_a_schedule_torch_stops_says_how_to_step_on(http: httpx.Client, case: str) -> None:
    sched, status, code, names = STUCK[case]
    fails_at = torch_fails_at(sched)
    sid = f"children-stuck-{case}"
    r = http.post("/v1/sessions", json=create_body(sid, sched))
    assert r.status_code == 201, r.text  # (torch takes it, and runs it until then)
    ref = local(sched)
    stream = grad_stream(SHAPES, seed=4)
    for k in range(1, fails_at):
        grads = next(stream)
        r = step(http, sid, grads)
        assert r.status_code == 200, (k, r.text)
        local_step(ref, grads)
        assert r.json()["lr"] == ref.lrs()
    grads = next(stream)
    before = state(http, sid)
    for _ in range(2):  # (and again: stuck there, the same refusal)
        r = step(http, sid, grads)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith(PROBLEM)
        problem = r.json()
        assert (problem["code"], problem["field"]) == (code, "scheduler"), problem
        assert names in problem["detail"], problem
        assert f'PATCH /v1/sessions/{sid} with {{"scheduler": null}}' in problem["detail"]
        assert state(http, sid) == before
    # doing what it says steps on, as torch would without the scheduler
    r = http.patch(f"/v1/sessions/{sid}", json={"scheduler": None})
    assert r.status_code == 200, r.text
    ref.scheduler = None
    for _ in range(2):
        r = step(http, sid, grads)
        assert r.status_code == 200, r.text
        local_step(ref, grads)
        assert r.json()["lr"] == ref.lrs()
        assert_tensors_equal(tensors_from_json(r.json()["params"]), ref.params)
        grads = next(stream)
