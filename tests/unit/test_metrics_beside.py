"""The norms of a step whose answer does not carry them (``?metrics=history``, what
``RemoteOptimizer`` asks through shared memory), taken on a thread of their own beside the
session's next step (``metrics.after_answer``, from ``metrics.BESIDE_FROM`` elements): the
history rows are bitwise those of the same steps with the norms taken on the device worker,
and the parameters torch's. The thread is slowed down, so that every operation that reads the
rows (a history query, a snapshot) or writes the buffers the norms read (an answered step, a
step that leaves a parameter out, the next step's copy) runs while it still works: each must
wait for it, or the values differ. A restart (from a snapshot, or replaying the log) gives the
same rows (with a snapshot, read only from it: the stop's snapshot must wait too)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, GroupSpec, chunked, embedded_engine, metrics
from app.engine import host as host_module
from app.engine.history import HistoryQuery
from tests.unit.test_metrics_history import run, seeded

SHAPES = {"big": (600_000,), "run": (300_000,), "small": (40, 3)}
GROUPS = (("big", "small"), ("run",))
FIELDS = ("step", "grad_norm.0", "update_norm.0", "param_norm.0", "update_ratio.0",
          "grad_norm.1", "update_norm.1", "param_norm.1", "update_ratio.1")
#: what each step does: norms after the answer, in the answer, after the answer with "big"
#: left out (a parameter stepped in chunks, left unchanged: its norm reads the live tensor, so
#: not beside), or after the answer and then a history query at once
PLAN = ["history", "history", "answer", "history", "partial", "history", "query", "history",
        "history"]


def _history(eng: Any) -> list[list[float]]:
    cols = run(eng.history("s", HistoryQuery(fields=list(FIELDS)))).columns
    return [[float(cols[f][i]) for f in FIELDS] for i in range(len(cols["step"]))]


def _run(tmp_path: Path, beside: bool, snapshot: bool, monkeypatch: pytest.MonkeyPatch
         ) -> tuple[list[list[float]], list[list[list[float]]], dict[str, torch.Tensor], int]:
    """The plan's steps (SGD with momentum, two groups): the rows at the end, the rows each
    query saw, the parameters, and how many steps took their norms beside."""
    monkeypatch.setattr(metrics, "BESIDE_FROM", 1 if beside else 1 << 60)
    monkeypatch.setattr(host_module, "INLINE_BYTES", -1)  # on the worker, as large ones run
    real = metrics._norms_beside
    jobs: list[int] = []

    def slow(s: Any, job: Any, groups: Any) -> bool:
        assert threading.current_thread().name.startswith("optserve-norms")
        jobs.append(1)
        time.sleep(0.15)
        return real(s, job, groups)
    monkeypatch.setattr(metrics, "_norms_beside", slow)
    data = tmp_path / ("beside" if beside else "worker") / ("snap" if snapshot else "log")
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.SGD([{"params": [local[n] for n in names]} for names in GROUPS],
                          lr=0.01, momentum=0.9)
    eng = embedded_engine("cpu", warm_up=False, data_dir=data, durability="step")
    run(eng.start())
    # (after the host, which sets the server's setting): "big" is stepped in chunks, and its
    # copy for the norms after the answers is one of its own (``Layout.big``)
    chunked.configure(1 << 16)
    seen: list[list[list[float]]] = []
    try:
        run(eng.create(CreateSpec("SGD", [GroupSpec({n: p0[n].clone() for n in names})
                                          for names in GROUPS],
                                  options={"lr": 0.01, "momentum": 0.9}, id="s")))
        for k, kind in enumerate(PLAN):
            sent = {n: seeded(s, 10 * k + i) for i, (n, s) in enumerate(SHAPES.items())
                    if not (kind == "partial" and n == "big")}
            for n, t in local.items():
                t.grad = sent.get(n)
            opt.step()
            result = run(eng.step("s", sent, return_params=True,
                                  answer_metrics=kind == "answer"))
            assert result.params is not None
            for n in SHAPES:
                assert torch.equal(result.params[n], local[n]), (k, n)
            if kind == "query":
                seen.append(_history(eng))
        # (with a snapshot, the rows are read only from it: the stop's snapshot must wait)
        rows = None if snapshot else _history(eng)
    finally:
        run(eng.stop(snapshot=snapshot))
        chunked.configure(chunked.DEFAULT_CHUNK)
    again = embedded_engine("cpu", warm_up=False, data_dir=data, durability="step")
    run(again.start())
    try:
        restored = _history(again)
        assert rows is None or restored == rows, "the rows a restart restores"
    finally:
        run(again.stop(snapshot=False))
    return restored, seen, local, len(jobs)


@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "replay"])
def test_norms_taken_beside_equal_those_taken_on_the_worker(
        tmp_path: Path, snapshot: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, seen, params, jobs = _run(tmp_path, True, snapshot, monkeypatch)
    want, want_seen, want_params, none = _run(tmp_path, False, snapshot, monkeypatch)
    assert none == 0
    # every step whose norms come after its answer but the one leaving "big" out (the last
    # step's too: no step after it to overlap, but it is handed over all the same)
    assert jobs == PLAN.count("history") + PLAN.count("query")
    assert len(rows) == len(PLAN) and rows == want  # bitwise, NaN-free
    assert all(v == v for row in rows for v in row)
    assert seen == want_seen and len(seen) == 1
    for n in SHAPES:
        assert torch.equal(params[n], want_params[n])
