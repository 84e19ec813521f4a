"""An LBFGS ``history_size`` that is not a whole number of at least 1 is refused up front.

torch's ``LBFGS`` constructor takes any ``history_size``, and its step fails at the first
curvature pair it keeps (0: ``pop from empty list``; a negative one: ``al`` too short; a float,
3.0 too: ``[None] * 3.0``), the second step on any problem. The server took such a value at
create, in a PATCH of the group and in an import, and then refused every step from the second
on with ``step_failed`` blaming the evaluation (found by :mod:`tests.unit.test_lbfgs_stateful`):
now each is a 422 ``invalid_option`` naming ``history_size``, and changes nothing. What torch
fails on is found at test time, in process; 1, the smallest history that works, steps bitwise
as torch.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine.interface import EvaluationRequest, StepResult
from app.errors import OptserveError
from tests.unit.test_lbfgs_stateful import Mirror, evaluation_at, seeded
from tests.unit.test_operations_stateful import same_tree

BAD = [0, -1, 2.5, 3.0]
OPTIONS = {"lr": 1, "max_iter": 2}


def params() -> dict[str, torch.Tensor]:
    return {"w": seeded((3,), 1), "b": seeded((1,), 2)}


async def lbfgs_step(eng: Front, sid: str) -> StepResult:
    answer = await eng.open_evaluation_step(sid, None, return_params=True)
    while isinstance(answer, EvaluationRequest):
        answer = await eng.evaluate(sid, answer.evaluation, evaluation_at(dict(answer.params)),
                                    "fp")
    return answer


async def refused(call: Any, field: str) -> None:
    with pytest.raises(OptserveError) as info:
        await call
    assert (info.value.status, info.value.code, info.value.field) == (
        422, "invalid_option", field), info.value.detail


@pytest.mark.parametrize("history_size", BAD)
def test_torch_fails_on_its_second_step(history_size: float) -> None:
    """What the refusals stand on: torch's own LBFGS with it fails at its second step."""
    mirror = Mirror({**OPTIONS, "history_size": history_size}, None)
    mirror.step()
    with pytest.raises((IndexError, TypeError)):
        mirror.step()


@pytest.mark.parametrize("history_size", BAD)
def test_a_history_size_torch_cannot_step_is_refused_everywhere(history_size: float) -> None:
    async def go() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            bad = {**OPTIONS, "history_size": history_size}
            await refused(eng.create(CreateSpec("LBFGS", [GroupSpec(params())], bad, id="a")),
                          "options.history_size")
            await refused(eng.create(CreateSpec(
                "LBFGS", [GroupSpec(params(), {"history_size": history_size})], dict(OPTIONS),
                id="a")), "param_groups.0.history_size")
            assert await eng.list_sessions() == []

            await eng.create(CreateSpec("LBFGS", [GroupSpec(params())],
                                        {**OPTIONS, "history_size": 2}, id="s"))
            mirror = Mirror({**OPTIONS, "history_size": 2}, None)
            await lbfgs_step(eng, "s")
            mirror.step()
            before = (await eng.export_state("s")).state_dict
            await refused(eng.update_param_group("s", 0, {"history_size": history_size}),
                          "param_groups.0.history_size")
            sd = copy.deepcopy(mirror.opt.state_dict())
            sd["param_groups"][0]["history_size"] = history_size
            await refused(eng.import_state("s", sd), "state_dict.param_groups.0.history_size")
            same_tree((await eng.export_state("s")).state_dict, before, "refusals")
            for _ in range(2):  # the session steps on, as torch does
                result = await lbfgs_step(eng, "s")
                mirror.step()
            same_tree(dict(result.params or {}), mirror.params, "params")
            same_tree((await eng.export_state("s")).state_dict["state"],
                      mirror.opt.state_dict()["state"], "state")
        finally:
            await eng.stop()
    asyncio.run(go())


def test_a_history_of_one_steps_as_torch() -> None:
    async def go() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec("LBFGS", [GroupSpec(params())],
                                        {**OPTIONS, "history_size": 1}, id="s"))
            mirror = Mirror({**OPTIONS, "history_size": 1}, None)
            for _ in range(4):
                result = await lbfgs_step(eng, "s")
                mirror.step()
            same_tree(dict(result.params or {}), mirror.params, "params")
            same_tree((await eng.export_state("s")).state_dict["state"],
                      mirror.opt.state_dict()["state"], "state")
        finally:
            await eng.stop()
    asyncio.run(go())
