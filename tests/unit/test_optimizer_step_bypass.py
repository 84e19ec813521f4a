"""``app.engine.optimizer_step.step``: ``optimizer.step()`` without torch's profiler range
while no profiler is on, and exactly ``optimizer.step()`` whenever something would see the
difference (a step hook, a profiler, a patched ``step``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from app.engine import optimizer_step


def _adam(seed: int = 0) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(37, generator=g)
    p.grad = torch.randn(37, generator=g)
    return torch.optim.Adam([p], lr=0.01, weight_decay=0.1), p


def _ranges_entered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the ``record_function`` ranges entered from now on."""
    seen: list[str] = []
    enter: Any = torch.autograd.profiler.record_function.__enter__

    def counting(self: Any) -> Any:
        seen.append(self.name)
        return enter(self)
    monkeypatch.setattr(torch.autograd.profiler.record_function, "__enter__", counting)
    return seen


def test_values_are_those_of_optimizer_step() -> None:
    ours, p = _adam()
    theirs, q = _adam()
    for i in range(5):
        grad = torch.randn(37, generator=torch.Generator().manual_seed(100 + i))
        p.grad, q.grad = grad.clone(), grad.clone()
        optimizer_step.step(ours)
        theirs.step()
        assert torch.equal(p, q)
    assert ours.state_dict()["state"][0]["step"] == theirs.state_dict()["state"][0]["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[p][key], theirs.state[q][key])


def test_no_profiler_range_when_nothing_would_see_it(monkeypatch: pytest.MonkeyPatch) -> None:
    opt, _ = _adam()
    seen = _ranges_entered(monkeypatch)
    optimizer_step.step(opt)
    assert seen == []
    opt.step()  # (torch's own: the range the bypass leaves out)
    assert seen == ["Optimizer.step#Adam.step"]


def test_the_optimizers_hooks_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    opt, p = _adam()
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    seen = _ranges_entered(monkeypatch)
    before = p.clone()
    optimizer_step.step(opt)
    assert calls == ["pre", "post"]
    assert seen == ["Optimizer.step#Adam.step"]  # (torch's own step, range and all)
    assert not torch.equal(p, before)


def test_a_global_hook_still_runs() -> None:
    opt, _ = _adam()
    calls: list[type] = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append(type(o)))
    try:
        optimizer_step.step(opt)
    finally:
        handle.remove()
    assert calls == [torch.optim.Adam]


def test_an_active_profiler_still_sees_the_step() -> None:
    opt, _ = _adam()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer_step.step(opt)
    assert "Optimizer.step#Adam.step" in {e.name for e in prof.events()}


def test_a_schedulers_step_counter_still_counts() -> None:
    """An LR scheduler patches the instance's ``step`` to note that the optimizer stepped
    (its warning about a scheduler stepped first depends on it): that ``step`` is called."""
    opt, _ = _adam()
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    opt._opt_called = False  # type: ignore[attr-defined]
    optimizer_step.step(opt)
    assert opt._opt_called is True  # type: ignore[attr-defined]
