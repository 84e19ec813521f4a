"""The metrics' copy for the next step's update norm, refilled as the norms of a step whose
answer does not carry them are taken (``metrics._norms_into``): tensors of more than
``metrics.FUSED`` elements (here 262,144) are subtracted, normed and refilled chunk by chunk.
At the server's own step chunk: a parameter of 2.2e6 elements (stepped in chunks; with
``?metrics=history`` compared with a kept copy of it), one of 7e5 (a run of its own), one of
3e5 beside a small one (a run of both), one small. Every step's norms must equal torch's,
bitwise the same as the same steps' norms taken whole (``FUSED`` past every size), and the
parameters torch's bit for bit; with norms in the answers too (no refill there)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.engine import CreateSpec, GroupSpec, embedded_engine, metrics
from app.engine import host as host_module
from app.engine.history import HistoryQuery
from tests.unit.test_metrics_history import close, norm, run, seeded

SHAPES = {"big": (2_200_000,), "alone": (700_000,), "run": (300_000,), "small": (40, 3)}
GROUPS = (("big", "small"), ("alone", "run"))
NORMS = ("grad_norm", "update_norm", "param_norm", "update_ratio")


def _rows(fused: bool, answered: bool, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[list[list[dict[str, float]]], dict[str, torch.Tensor]]:
    """Four SGD-with-momentum steps (the third leaves "alone" and "small" out), each step's
    per-group norms (from its answer, or its history row), checked against torch's."""
    monkeypatch.setattr(metrics, "FUSED", 1 << 18 if fused else 1 << 40)
    monkeypatch.setattr(host_module, "INLINE_BYTES", -1)  # on the worker, as large ones run
    eng = embedded_engine("cpu", warm_up=False)
    run(eng.start())
    try:
        p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
        run(eng.create(CreateSpec("SGD", [GroupSpec({n: p0[n].clone() for n in names})
                                          for names in GROUPS],
                                  options={"lr": 0.01, "momentum": 0.9}, id="r")))
        local = {n: t.clone() for n, t in p0.items()}
        opt = torch.optim.SGD([{"params": [local[n] for n in names]} for names in GROUPS],
                              lr=0.01, momentum=0.9)
        rows = []
        for k in range(4):
            sent = {n: seeded(s, 10 * k + i) for i, (n, s) in enumerate(SHAPES.items())
                    if not (k == 2 and n in ("alone", "small"))}
            before = {n: t.clone() for n, t in local.items()}
            for n, t in local.items():
                t.grad = sent.get(n)
            opt.step()
            result = run(eng.step("r", sent, return_params=True, answer_metrics=answered))
            assert result.params is not None
            for n in SHAPES:
                assert torch.equal(result.params[n], local[n]), (k, n)
            if answered:
                assert result.metrics is not None
                got = result.metrics["groups"]
            else:
                cols = run(eng.history("r", HistoryQuery(since=k))).columns
                got = [{f: float(cols[f"{f}.{gi}"][0]) for f in NORMS} for gi in range(2)]
            for gi, names in enumerate(GROUPS):
                close(got[gi]["update_norm"], norm([local[n] - before[n] for n in names]),
                      f"step {k} group {gi} update")
                close(got[gi]["param_norm"], norm([local[n] for n in names]),
                      f"step {k} group {gi} param")
            rows.append([{f: g[f] for f in NORMS} for g in got])
        return rows, local
    finally:
        run(eng.stop())


@pytest.mark.parametrize("answered", [True, False], ids=["answer", "history"])
def test_norms_refilled_chunk_by_chunk_equal_torch_and_the_whole_tensors(
        answered: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, params = _rows(True, answered, monkeypatch)
    whole, same = _rows(False, answered, monkeypatch)
    assert fused == whole  # bitwise: the same pieces normed by the same torch calls
    for n in SHAPES:
        assert torch.equal(params[n], same[n])


def test_a_step_takes_no_separate_copy_for_the_next_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With norms taken after the answers, the copy for the next step's update norm is the one
    the norms refilled: no whole copy of the parameters after each step (``take_ahead`` finds
    it taken), only before the first."""
    copies: list[Any] = []
    real = metrics._copy
    monkeypatch.setattr(metrics, "_copy", lambda layout: (copies.append(1), real(layout)))
    _rows(True, False, monkeypatch)
    assert copies == [1]
