"""The LBFGS evaluation protocol in the engine (no HTTP): steps replay bitwise from their
``lbfgs_step`` records after a crash and from snapshots after a graceful stop; a step open at a
stop or a delete is abandoned with nothing changed; the device worker stays free while a step
waits; a record that does not replay (fewer evaluations than the step asks) is refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine, persist
from app.engine.interface import Evaluation, EvaluationRequest, StepResult
from app.engine.ops import LbfgsStep
from app.errors import Conflict, Invalid, NotFound

X = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([2.0, -1.0, 0.5]) - 1.0
OPTIONS = {"lr": 1, "max_iter": 6, "history_size": 3, "line_search_fn": "strong_wolfe"}


def loss_at(params: dict[str, torch.Tensor]) -> Evaluation:
    w = params["w"].clone().requires_grad_()
    loss = ((X @ w - Y) ** 2).mean()
    loss.backward()
    assert w.grad is not None
    return Evaluation(float(loss.detach()), {"w": w.grad})


async def lbfgs_step(eng: Front, sid: str) -> StepResult:
    answer = await eng.open_evaluation_step(sid, None, return_params=True)
    while isinstance(answer, EvaluationRequest):
        answer = await eng.evaluate(sid, answer.evaluation, loss_at(dict(answer.params)), "fp")
    return answer


def local_steps(n: int) -> tuple[torch.Tensor, torch.optim.LBFGS]:
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([w], **OPTIONS)  # type: ignore[arg-type]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((X @ w - Y) ** 2).mean()
        loss.backward()
        return loss
    for _ in range(n):
        opt.step(closure)  # type: ignore[no-untyped-call]
    return w, opt


def engine(path: Path | None) -> Front:
    return embedded_engine("cpu", data_dir=path, durability="step" if path else "memory",
                           warm_up=False, snapshot_every_steps=1000)


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def same(a: Any, b: Any) -> None:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and bitwise(a, b)
    elif isinstance(b, dict):
        assert {str(k) for k in a} == {str(k) for k in b}
        by = {str(k): v for k, v in a.items()}
        for k, v in b.items():
            same(by[str(k)], v)
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("graceful", [False, True])
def test_steps_replay_bitwise_after_a_restart(tmp_path: Path, graceful: bool) -> None:
    async def go() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(CreateSpec("LBFGS", [GroupSpec({"w": torch.zeros(3)})], dict(OPTIONS),
                                    id="l"))
        for _ in range(3):
            await lbfgs_step(eng, "l")
        pending = await eng.open_evaluation_step("l", None, return_params=True)
        assert isinstance(pending, EvaluationRequest)
        await eng.stop(snapshot=graceful)  # the open step is abandoned
        eng = engine(tmp_path)
        await eng.start()
        try:
            w, opt = local_steps(3)
            got = await eng.pull("l", None)
            assert got.version == 3 and bitwise(got.params["w"], w.detach())
            same((await eng.export_state("l")).state_dict["state"], opt.state_dict()["state"])
            result = await lbfgs_step(eng, "l")
            w, opt = local_steps(4)
            assert result.params is not None and bitwise(result.params["w"], w.detach())
        finally:
            await eng.stop()
    asyncio.run(go())


def test_delete_abandons_an_open_step_and_the_worker_stays_free() -> None:
    async def go() -> None:
        eng = engine(None)
        await eng.start()
        try:
            await eng.create(CreateSpec("LBFGS", [GroupSpec({"w": torch.zeros(3)})],
                                        dict(OPTIONS), id="l"))
            await eng.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(4)})], {"lr": 0.1},
                                        id="s"))
            pending = await eng.open_evaluation_step("l", None, return_params=True)
            assert isinstance(pending, EvaluationRequest)
            started = time.monotonic()
            for _ in range(50):
                await eng.step("s", {"x": torch.ones(4)}, return_params=False)
            assert time.monotonic() - started < 5
            with pytest.raises(Conflict) as info:
                await eng.overwrite("l", {"w": torch.ones(3)})
            assert info.value.code == "step_in_progress"
            await eng.delete("l")
            with pytest.raises(NotFound):
                await eng.describe("l")
            with pytest.raises(Conflict) as info:  # the step ended without its evaluation
                await eng.evaluate("l", pending.evaluation, loss_at(dict(pending.params)), "x")
            assert info.value.code == "step_ended"
        finally:
            await eng.stop()
    asyncio.run(go())


def test_a_record_that_does_not_replay_is_refused() -> None:
    """Replay runs torch's LBFGS.step with the recorded evaluations: a record holding fewer
    than the step asks for is refused, not guessed at."""
    async def go() -> None:
        eng = engine(None)
        await eng.start()
        try:
            await eng.create(CreateSpec("LBFGS", [GroupSpec({"w": torch.zeros(3)})],
                                        dict(OPTIONS), id="l"))
            host = eng.host
            session = host._sessions["default~l"]
            first = loss_at({"w": torch.zeros(3)})
            op = LbfgsStep([first])
            record = persist.decode_record(persist.encode_record(persist.Record(op, 2, 1, [])))
            assert isinstance(record.op, LbfgsStep) and record.op.evaluations[0].loss == \
                first.loss
            with pytest.raises(Invalid) as info:
                await host._worker.run(lambda: record.op.check(session))
            assert info.value.code == "replay_mismatch"
        finally:
            await eng.stop()
    asyncio.run(go())


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_a_throwaway_lbfgs_step_takes_a_few_iterations_whatever_max_iter_says(
        line_search_fn: str | None) -> None:
    """The options' checks step a throwaway LBFGS on the device's worker: with the client's
    ``max_iter`` and tolerances that never stop it (negative), that step ran every iteration
    (10**6: about 50 s, every other session waiting). It takes at most two now
    (:data:`optimizers.PROBE_LBFGS_ITERATIONS`), and torch still speaks in it (a line search
    with no evaluation to spend is refused)."""
    from app.engine import optimizers

    t = torch.full((2, 2), 0.5)
    opt = torch.optim.LBFGS([t], max_iter=5000, tolerance_grad=-1, tolerance_change=-1,
                            line_search_fn=line_search_fn)
    t.grad = torch.full_like(t, 0.25)
    optimizers.probe_step(opt)
    assert 1 <= opt.state[t]["n_iter"] <= 2
    assert opt.state[t]["func_evals"] <= 3
    if line_search_fn is not None:
        with pytest.raises(Invalid, match="max_eval must be at least 1"):
            optimizers.probe(torch.optim.LBFGS, {}, [{"max_iter": 5000, "max_eval": 0,
                                                      "line_search_fn": line_search_fn}],
                             [torch.float32], torch.device("cpu"), {"max_eval": "options"})
