"""Per-step metrics and the history ring, on the embedded engine (no HTTP).

Every norm a step reports is compared with the same quantity computed here, in-process, with
torch on the same parameters and gradients (a local ``torch.optim`` run of the same class and
options, float64 norms): several optimizers, two param groups, a gradient left out."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine, metrics
from app.engine import host as host_module
from app.engine import store as store_module
from app.engine import worker as worker_module
from app.engine.history import History, HistoryQuery, csv_text, downsample, jsonable
from app.errors import Invalid

T = TypeVar("T")
REL = 1e-6


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def engine() -> Iterator[Front]:
    eng = embedded_engine("cpu", warm_up=False)
    run(eng.start())
    try:
        yield eng
    finally:
        run(eng.stop())


def seeded(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(torch.float32)


SHAPES = {"w": (16, 8), "b": (8,), "h": (5, 3)}
GROUPS = (("w", "b"), ("h",))
OPTIMIZERS: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, [{}, {"lr": 0.03}]),
    ("Adam", {"lr": 0.01, "weight_decay": 0.01}, [{}, {"lr": 0.002}]),
    ("AdamW", {"lr": 0.005}, [{"weight_decay": 0.1}, {}]),
    ("RMSprop", {"lr": 0.01}, [{}, {"lr": 0.05, "momentum": 0.5}]),
    ("Adagrad", {"lr": 0.1}, [{}, {}]),
]


def norm(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def close(got: float, want: float, what: str) -> None:
    assert math.isclose(got, want, rel_tol=REL, abs_tol=1e-12), (what, got, want)


def assert_step_as_torch(result: Any, groups: list[list[str]], sent: dict[str, torch.Tensor],
                         local: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                         what: str = "") -> None:
    """The step's answer equals the local torch step: the parameters bitwise, and each
    group's gradient, update and parameter norms."""
    assert result.params is not None
    for n in local:
        assert torch.equal(result.params[n], local[n]), (what, n)
    if result.metrics is None or "grad_norm" not in result.metrics["groups"][0]:
        raise AssertionError(f"{what}: no norms")
    for gi, names in enumerate(groups):
        got = result.metrics["groups"][gi]
        close(got["grad_norm"], norm([sent[n] for n in names]), f"{what} grad {gi}")
        close(got["update_norm"], norm([local[n] - before[n] for n in names]),
              f"{what} upd {gi}")
        close(got["param_norm"], norm([local[n] for n in names]), f"{what} param {gi}")


@pytest.mark.parametrize("name,options,group_options", OPTIMIZERS,
                         ids=[o[0] for o in OPTIMIZERS])
def test_step_metrics_equal_torch_in_process(engine: Front, name: str, options: dict[str, Any],
                                             group_options: list[dict[str, Any]]) -> None:
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    spec = CreateSpec(name, [GroupSpec({n: p0[n].clone() for n in names}, dict(opts))
                             for names, opts in zip(GROUPS, group_options, strict=True)],
                      options=dict(options), id="m")
    run(engine.create(spec))
    local = {n: t.clone().requires_grad_(True) for n, t in p0.items()}
    opt = getattr(torch.optim, name)([{"params": [local[n] for n in names], **opts}
                                      for names, opts in zip(GROUPS, group_options, strict=True)],
                                     **options)
    for k in range(4):
        sent = {n: seeded(s, 100 * k + i) for i, (n, s) in enumerate(SHAPES.items())
                if not (k == 2 and n == "b")}  # one step without b's gradient
        before = {n: t.detach().clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = sent.get(n)
        lrs = [float(g["lr"]) for g in opt.param_groups]
        opt.step()
        result = run(engine.step("m", sent, return_params=True, scalars={"loss": 1.0 / (k + 1)}))
        assert result.metrics is not None
        m = result.metrics
        assert m["n"] == k + 1 and m["nonfinite"] == 0
        assert m["scalars"] == {"loss": 1.0 / (k + 1)}
        for gi, names in enumerate(GROUPS):
            got = m["groups"][gi]
            want_grad = norm([sent[n] for n in names if n in sent])
            want_upd = norm([local[n].detach() - before[n] for n in names])
            want_par = norm([local[n].detach() for n in names])
            close(got["grad_norm"], want_grad, f"{name} step {k} group {gi} grad_norm")
            close(got["update_norm"], want_upd, f"{name} step {k} group {gi} update_norm")
            close(got["param_norm"], want_par, f"{name} step {k} group {gi} param_norm")
            close(got["update_ratio"], want_upd / want_par, f"{name} group {gi} ratio")
            assert got["lr"] == lrs[gi]
        assert result.params is not None
        for n in SHAPES:  # and the step itself is still torch's, bit for bit
            assert torch.equal(result.params[n], local[n].detach()), n

    hist = run(engine.history("m", HistoryQuery()))
    assert hist.rows == 4 and hist.first == 1 and hist.last == 4
    cols = hist.columns
    assert cols["n"].tolist() == [1, 2, 3, 4] and cols["step"].tolist() == [1, 2, 3, 4]
    assert cols["scalars.loss"].tolist() == [1.0, 0.5, 1 / 3, 0.25]
    assert {"lr.0", "lr.1", "grad_norm.1", "update_ratio.0", "time"} <= set(cols)


@pytest.mark.parametrize("layout", ["one dtype per group", "mixed dtypes in a group"])
def test_metrics_per_group_span_and_per_tensor_agree_with_torch(engine: Front,
                                                                 layout: str) -> None:
    """Groups that are each one span of the flat block take their norms per span; a group of
    two dtypes (the block lays out float64 first, so its tensors are not one span) takes them
    per tensor. Both must equal torch in float64."""
    f64 = torch.float64 if layout == "mixed dtypes in a group" else torch.float32
    p0 = {"a": seeded((3, 4), 1), "c": seeded((5,), 2).to(f64), "b": seeded((2,), 3)}
    groups = [["a", "c"], ["b"]]
    run(engine.create(CreateSpec("Adam", [GroupSpec({n: p0[n].clone() for n in names})
                                          for names in groups], options={"lr": 0.1},
                                 id="mix")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam([{"params": [local[n] for n in names]} for names in groups], lr=0.1)
    for k in range(3):
        sent = {n: seeded(tuple(t.shape), 10 * k + i).to(t.dtype)
                for i, (n, t) in enumerate(p0.items())}
        before = {n: t.clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = sent[n]
        opt.step()
        result = run(engine.step("mix", sent, return_params=True))
        assert_step_as_torch(result, groups, sent, local, before, f"step {k}")


@pytest.mark.parametrize("name", ["SparseAdam", "SGD", "Adagrad"])
def test_metrics_of_row_sparse_steps_equal_torch(engine: Front, name: str) -> None:
    """A row-sparse gradient (duplicate rows included) has the norm of the gradient the
    optimizer steps with: its rows with duplicates summed."""
    table = seeded((20, 4), 1)
    run(engine.create(CreateSpec(name, [GroupSpec({"emb": table.clone()}, {})],
                                 options={"lr": 0.1}, id="sp")))
    local = table.clone()
    opt = getattr(torch.optim, name)([local], lr=0.1)
    rows = torch.tensor([[3, 7, 3, 19]])
    grad = torch.sparse_coo_tensor(rows, seeded((4, 4), 2), (20, 4), check_invariants=True)
    before = local.clone()
    local.grad = grad
    opt.step()
    result = run(engine.step("sp", {"emb": grad}, return_params=True))
    assert result.metrics is not None
    got = result.metrics["groups"][0]
    close(got["grad_norm"], norm([grad.coalesce().to_dense()]), f"{name} grad_norm")
    close(got["update_norm"], norm([local - before]), f"{name} update_norm")
    close(got["param_norm"], norm([local]), f"{name} param_norm")
    assert result.params is not None and torch.equal(result.params["emb"], local)


def test_metrics_off_keeps_lr_and_scalars(engine: Front) -> None:
    spec = CreateSpec("SGD", [GroupSpec({"x": torch.ones(3)})], options={"lr": 0.5}, id="off",
                      metrics=False)
    info = run(engine.create(spec))
    assert info.metrics is False
    r = run(engine.step("off", {"x": torch.ones(3)}, return_params=False,
                        scalars={"acc": 0.5}))
    assert r.metrics is not None
    assert r.metrics["groups"] == [{"lr": 0.5}] and r.metrics["scalars"] == {"acc": 0.5}
    info = run(engine.configure("off", {"metrics": True, "history": 10}))
    assert info.metrics is True and info.history == 10
    r = run(engine.step("off", {"x": torch.ones(3)}, return_params=False))
    assert r.metrics is not None
    close(r.metrics["groups"][0]["update_norm"], 0.5 * math.sqrt(3), "update")


def test_pushed_scalars_go_with_the_next_step_as_their_mean(engine: Front) -> None:
    run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(2)})], id="acc")))
    run(engine.push("acc", {"x": torch.ones(2)}, scalars={"loss": 1.0}))
    run(engine.push("acc", {"x": torch.ones(2)}, scalars={"loss": 2.0, "tokens": 10}))
    r = run(engine.step("acc", {}, return_params=False, scalars={"loss": 3.0}))
    assert r.metrics is not None and r.metrics["scalars"] == {"loss": 2.0, "tokens": 10.0}
    close(r.metrics["groups"][0]["grad_norm"], 2 * math.sqrt(2), "accumulated grad norm")
    run(engine.push("acc", {"x": torch.ones(2)}, scalars={"loss": 9.0}))
    run(engine.zero_grad("acc"))  # discards the pushed scalars with the gradients
    r = run(engine.step("acc", {"x": torch.ones(2)}, return_params=False))
    assert r.metrics is not None and "scalars" not in r.metrics


def test_skipped_steps_count_nonfinite_values(engine: Front) -> None:
    run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(4)})], id="nf",
                                 nonfinite="skip")))
    r = run(engine.step("nf", {"x": torch.tensor([1.0, math.inf, math.nan, 0.0])},
                        return_params=False))
    assert r.skipped and r.metrics is not None and r.metrics["nonfinite"] == 2
    run(engine.step("nf", {"x": torch.ones(4)}, return_params=False))
    cols = run(engine.history("nf", HistoryQuery(fields=["skipped", "nonfinite", "step"]))).columns
    assert list(cols) == ["n", "skipped", "nonfinite", "step"]
    assert cols["n"].tolist() == [1, 2] and cols["step"].tolist() == [0, 1]
    assert cols["skipped"].tolist() == [1, 0] and cols["nonfinite"].tolist() == [2, 0]


@pytest.mark.parametrize("bad,field", [
    ({f"s{i}": 1.0 for i in range(17)}, "scalars"),
    ({"": 1.0}, "scalars."),
    ({"x" * 65: 1.0}, "scalars." + "x" * 65),
    ({"1abc": 1.0}, "scalars.1abc"),
    ({"loss": math.inf}, "scalars.loss"),
    ({"loss": "0.3"}, "scalars.loss"),
    ({"loss": True}, "scalars.loss"),
    ([1.0], "scalars"),
])
def test_bad_scalars_are_refused_and_change_nothing(engine: Front, bad: Any, field: str) -> None:
    run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(2)})], id="bad")))
    with pytest.raises(Invalid) as err:
        run(engine.step("bad", {"x": torch.ones(2)}, return_params=False, scalars=bad))
    assert err.value.field == field and err.value.code == "invalid_scalars"
    assert run(engine.describe("bad")).version == 0


def test_ring_wraps_and_keeps_the_newest_rows() -> None:
    h = History(5)
    for i in range(12):
        h.append({"step": i + 1, "x": float(i)} if i % 3 else {"step": i + 1})
    assert len(h) == 5 and h.bounds() == (8, 12)
    cols = h.select(None, None, None)
    assert cols["n"].tolist() == [8, 9, 10, 11, 12]
    assert np.isnan(cols["x"][2]) and cols["x"][0] == 7.0
    assert h.select(9, 11, ["x"])["n"].tolist() == [10, 11]
    again = History.from_tree(h.to_tree())
    assert again.select(None, None, None)["x"].tolist()[:2] == [7.0, 8.0]
    again.append({"step": 13})
    assert again.bounds() == (9, 13)
    again.resize(2)
    assert again.select(None, None, None)["n"].tolist() == [12, 13]


def test_downsampling_keeps_the_global_min_and_max() -> None:
    rng = np.random.default_rng(0)
    rows = 100_000
    x = rng.normal(size=rows)
    x[31_337] = 50.0  # one spike up, one down
    x[77_777] = -40.0
    x[5] = np.nan  # an absent value
    cols = {"n": np.arange(1, rows + 1, dtype=np.float64), "x": x}
    out = downsample(cols, 500)
    assert len(out["x.min"]) == 500 == len(out["n.max"])
    assert np.nanmax(out["x.max"]) == 50.0 and np.nanmin(out["x.min"]) == -40.0
    assert out["n.min"][0] == 1 and out["n.max"][-1] == rows
    assert (out["x.min"] <= out["x.max"]).all()
    small = downsample({"n": np.array([1.0, 2.0]), "x": np.array([3.0, 4.0])}, 500)
    assert small["x.min"].tolist() == [3.0, 4.0] == small["x.max"].tolist()


def test_encodings_of_absent_and_infinite_values() -> None:
    col = np.array([1.0, np.nan, np.inf, -np.inf])
    assert jsonable("grad_norm.0", col) == [1.0, None, {"$float": "inf"}, {"$float": "-inf"}]
    assert jsonable("step", np.array([1.0, 2.0])) == [1, 2]
    text = csv_text({"n": np.array([1.0, 2.0]), "scalars.loss": np.array([0.1, np.nan])})
    assert text == "n,scalars.loss\n1,0.1\n2,\n"


@pytest.mark.parametrize("where", ["inline", "worker"])
def test_metrics_stay_right_when_the_parameters_change_between_steps(
        engine: Front, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics keep how they copy and norm the parameters from step to step; whatever
    changes the parameters in between (an added group, which lays out a new block; values
    overwritten in place; metrics turned off and on) must still give torch's norms.

    ``worker``: every step runs on the device worker's thread (as a large session's steps do),
    where the copy for the next step's update norm is taken after each step's answer has been
    handed over (``metrics.take_ahead``); ``inline``: on the event loop's thread (a small
    session's), where it is taken on the loop's next turn, after the step's answer
    (``app.after_answer.later``)."""
    ahead: list[tuple[int, str]] = []
    take_ahead = metrics.take_ahead

    def spy(s: Any, layout: Any) -> None:
        take_ahead(s, layout)
        ahead.append((s.version, threading.current_thread().name))
    monkeypatch.setattr(metrics, "take_ahead", spy)
    if where == "worker":
        monkeypatch.setattr(host_module, "INLINE_BYTES", -1)
    p0 = {"a": seeded((3, 4), 1), "b": seeded((5,), 2)}
    run(engine.create(CreateSpec("SGD", [GroupSpec({n: t.clone() for n, t in p0.items()})],
                                 options={"lr": 0.1, "momentum": 0.9}, id="chg")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.SGD([local["a"], local["b"]], lr=0.1, momentum=0.9)
    groups = [["a", "b"]]

    def step_both(k: int) -> None:
        sent = {n: seeded(tuple(t.shape), 100 * k + i) for i, (n, t) in enumerate(local.items())}
        before = {n: t.clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = sent[n]
        opt.step()
        result = run(engine.step("chg", sent, return_params=True))
        assert_step_as_torch(result, groups, sent, local, before, f"step {k}")

    step_both(0)
    step_both(1)
    new = {"a": seeded((3, 4), 7), "b": seeded((5,), 8)}  # overwritten in place
    run(engine.overwrite("chg", {n: t.clone() for n, t in new.items()}))
    with torch.no_grad():
        for n, t in new.items():
            local[n].copy_(t)
    step_both(2)
    run(engine.configure("chg", {"metrics": False}))
    sent = {n: seeded(tuple(t.shape), 900 + i) for i, (n, t) in enumerate(local.items())}
    for n, t in local.items():
        t.grad = sent[n]
    opt.step()
    off = run(engine.step("chg", sent, return_params=False))
    assert off.metrics is not None and "grad_norm" not in off.metrics["groups"][0]
    run(engine.configure("chg", {"metrics": True}))
    step_both(4)
    step_both(5)
    c0 = seeded((6,), 9)  # a new group: the session lays out a new block
    run(engine.add_param_group("chg", GroupSpec({"c": c0.clone()}, {"lr": 0.05})))
    local["c"] = c0.clone()
    opt.add_param_group({"params": [local["c"]], "lr": 0.05})
    groups.append(["c"])
    step_both(6)
    step_both(7)
    # taken after each step with metrics while the parameters tile one block (versions:
    # steps 0-2 made 1, 2 and 4 after the overwrite's 3; the step without metrics 5 and
    # took none; steps 4 and 5 made 6 and 7); the added group's tensor lies outside the
    # block, so steps 6 and 7 clone instead
    thread = "MainThread" if where == "inline" else "optserve-cpu"
    assert ahead == [(v, thread) for v in (1, 2, 4, 6, 7)], ahead


@pytest.mark.parametrize("groups", [[["a", "b", "c"]], [["a", "c"], ["b"]]],
                         ids=["one group", "two groups"])
def test_metrics_of_gradients_that_tile_one_buffer_equal_torch(engine: Front,
                                                               groups: list[list[str]]) -> None:
    """Gradients that are views of one buffer (a request body's) are checked and normed as
    that one span when they are exactly one group's; otherwise per tensor. Both equal torch;
    a NaN inside such a span is still found and refused."""
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 3)}
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(shapes.items())}
    run(engine.create(CreateSpec("SGD", [GroupSpec({n: p0[n].clone() for n in names})
                                         for names in groups],
                                 options={"lr": 0.1, "momentum": 0.9}, id="tile")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.SGD([{"params": [local[n] for n in names]} for names in groups], lr=0.1,
                          momentum=0.9)

    def body(k: int) -> dict[str, torch.Tensor]:
        flat = seeded((sum(math.prod(s) for s in shapes.values()),), 50 + k)
        out, pos = {}, 0
        for n, s in reversed(shapes.items()):  # the buffer's order is not the groups'
            out[n] = flat[pos:pos + math.prod(s)].view(s)
            pos += math.prod(s)
        return out

    for k in range(3):
        sent = body(k)
        before = {n: t.clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = sent[n].clone()
        opt.step()
        result = run(engine.step("tile", sent, return_params=True))
        assert_step_as_torch(result, groups, sent, local, before, f"step {k}")
    bad = body(9)
    bad["b"][2] = float("nan")
    with pytest.raises(Invalid) as info:
        run(engine.step("tile", bad, return_params=False))
    assert info.value.code == "nonfinite_gradient" and "'b'" in info.value.detail


def test_a_replayed_log_takes_one_copy_ahead_and_the_next_step_is_right(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart replays the session's logged steps in one job on the device worker; each
    replayed step defers a copy ahead, and only the first of them copies (the rest find the
    copy already taken at the session's version). The first step after the restart then
    reports torch's norms."""
    copied: list[int] = []
    copy_ahead = metrics.copy_ahead
    sessions: list[Any] = []
    take_ahead = metrics.take_ahead

    def spy_take(s: Any, layout: Any) -> None:
        sessions[:] = [s]
        take_ahead(s, layout)

    def spy_copy(layout: Any) -> None:
        copy_ahead(layout)
        copied.append(sessions[0].version)
    monkeypatch.setattr(metrics, "take_ahead", spy_take)
    monkeypatch.setattr(metrics, "copy_ahead", spy_copy)
    monkeypatch.setattr(host_module, "INLINE_BYTES", -1)  # every live step on the worker
    p0 = {"w": seeded((40, 30), 1), "b": seeded((30,), 2)}
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam([local["w"], local["b"]], lr=0.01)
    sent_at = [{n: seeded(tuple(t.shape), 10 * k + i) for i, (n, t) in enumerate(p0.items())}
               for k in range(5)]

    def local_step(sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        before = {n: t.clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = sent[n]
        opt.step()
        return before

    eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
    run(eng.start())
    try:
        run(eng.create(CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in p0.items()})],
                                  options={"lr": 0.01}, id="r")))
        for sent in sent_at[:4]:
            local_step(sent)
            run(eng.step("r", sent, return_params=False))
    finally:
        run(eng.stop(snapshot=False))  # the disk as a crash leaves it: four steps to replay
    assert copied == [1, 2, 3, 4]  # live: one after each step (steps run on the worker)
    copied.clear()
    eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
    run(eng.start())
    try:
        # the copy deferred after the restore job may still be running: the next step's job
        # queues behind it
        before = local_step(sent_at[4])
        result = run(eng.step("r", sent_at[4], return_params=True))
        assert copied[0] == 4 and copied.count(4) == 1 and set(copied) <= {4, 5}
        assert_step_as_torch(result, [["w", "b"]], sent_at[4], local, before, "after restart")
    finally:
        run(eng.stop())


def test_fill_sets_a_held_row_and_leaves_others_alone() -> None:
    h = History(4)
    for i in range(6):
        h.append({"step": i + 1, "lr.0": 0.1, "update_norm.0": math.nan})
    h.fill(6, {"update_norm.0": 2.5, "param_norm.0": 7.0})  # a new column, NaN elsewhere
    h.fill(4, {"update_norm.0": 1.5})
    h.fill(2, {"update_norm.0": 9.0})  # no longer held: nothing
    h.fill(7, {"update_norm.0": 9.0})  # not yet made: nothing
    cols = h.select(None, None, None)
    assert cols["n"].tolist() == [3, 4, 5, 6]
    assert np.isnan(cols["update_norm.0"][[0, 2]]).all()
    assert cols["update_norm.0"][[1, 3]].tolist() == [1.5, 2.5]
    assert np.isnan(cols["param_norm.0"][:3]).all() and cols["param_norm.0"][3] == 7.0
    empty = History(0)
    empty.append({"step": 1})
    empty.fill(1, {"x": 1.0})
    assert len(empty) == 0


NORM_FIELDS = [f"{k}.{gi}" for gi in range(2) for k in metrics.NORMS]


def _history_rows(engine: Front, sid: str) -> dict[str, list[float]]:
    cols = run(engine.history(sid, HistoryQuery())).columns
    return {k: v.tolist() for k, v in cols.items() if k != "time"}


@pytest.mark.parametrize("where", ["worker", "inline"])
@pytest.mark.parametrize("name,options", [("SGD", {"lr": 0.1, "momentum": 0.9}),
                                          ("Adam", {"lr": 0.01})])
def test_history_only_metrics_fill_the_row_after_the_answer_with_the_same_values(
        engine: Front, where: str, name: str, options: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``answer_metrics=False`` (``?metrics=history``): the answer carries no metrics; on the
    device worker the norms are taken after the answer has been handed over, and a history
    query sent right after the answer (queued while they are still being taken: they are
    slowed down here) sees them. The rows equal, value for value, those of a twin session
    stepped with metrics in its answers, and those equal torch's norms; the parameters equal
    torch's bit for bit. Inline (small) steps take them at once."""
    events: list[tuple[str, str]] = []
    norms_into = metrics._norms_into

    def slow_norms(s: Any, probe: Any, groups: Any, **kwargs: Any) -> bool:
        if s.id == "h" and threading.current_thread().name == "optserve-cpu":
            time.sleep(0.05)
        events.append(("norms", s.id))
        return norms_into(s, probe, groups, **kwargs)
    monkeypatch.setattr(metrics, "_norms_into", slow_norms)
    real_hand_over = worker_module._hand_over
    # (only answers handed to the loop the test's own calls run on: a server another test
    # module left running in this process has device workers of its own, whose background
    # jobs hand answers over too)
    ours: list[asyncio.AbstractEventLoop] = []

    async def on_our_loop(coro: Coroutine[Any, Any, T]) -> T:
        ours.append(asyncio.get_running_loop())
        return await coro

    def spy_hand_over(loop: asyncio.AbstractEventLoop, *args: Any) -> None:
        if loop in ours:
            events.append(("answer", ""))
        real_hand_over(loop, *args)
    monkeypatch.setattr(worker_module, "_hand_over", spy_hand_over)
    if where == "worker":
        monkeypatch.setattr(host_module, "INLINE_BYTES", -1)
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    for sid in ("a", "h"):
        run(engine.create(CreateSpec(name, [GroupSpec({n: p0[n].clone() for n in names})
                                            for names in GROUPS],
                                     options=dict(options), id=sid)))
    local = {n: t.clone() for n, t in p0.items()}
    opt = getattr(torch.optim, name)([{"params": [local[n] for n in names]} for names in GROUPS],
                                     **options)
    for k in range(3):
        sent = {n: seeded(s, 100 * k + i) for i, (n, s) in enumerate(SHAPES.items())}
        before = {n: t.clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = sent[n]
        opt.step()
        answered = run(engine.step("a", sent, return_params=True))
        assert_step_as_torch(answered, [list(g) for g in GROUPS], sent, local, before, f"a {k}")
        events.clear()
        quiet = run(on_our_loop(engine.step("h", sent, return_params=True,
                                            answer_metrics=False, scalars={"loss": float(k)})))
        assert quiet.metrics is None and quiet.params is not None
        for n in SHAPES:
            assert torch.equal(quiet.params[n], local[n]), n
        row = run(engine.history("h", HistoryQuery(since=k)))
        assert row.rows == 1 and row.columns["n"].tolist() == [k + 1]
        assert row.columns["scalars.loss"].tolist() == [float(k)]
        for f in NORM_FIELDS:  # the answer the twin got, in the row
            gi, key = int(f.split(".")[1]), f.split(".")[0]
            assert row.columns[f].tolist() == [answered.metrics["groups"][gi][key]], f
        if where == "worker":
            assert events[:2] == [("answer", ""), ("norms", "h")], events
        else:
            assert events[:1] == [("norms", "h")], events
    a_rows, h_rows = _history_rows(engine, "a"), _history_rows(engine, "h")
    assert {k: v for k, v in h_rows.items() if not k.startswith("scalars.")} == a_rows


def test_history_only_metrics_of_skipped_and_metrics_off_steps(engine: Front) -> None:
    run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(4)})], id="nf",
                                 nonfinite="skip")))
    r = run(engine.step("nf", {"x": torch.tensor([1.0, math.inf, 0.0, 0.0])},
                        return_params=False, answer_metrics=False))
    assert r.skipped and r.metrics is None
    run(engine.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(3)})], options={"lr": 0.5},
                                 id="off", metrics=False)))
    r = run(engine.step("off", {"x": torch.ones(3)}, return_params=False,
                        answer_metrics=False))
    assert r.metrics is None
    cols = run(engine.history("nf", HistoryQuery(fields=["skipped", "nonfinite"]))).columns
    assert cols["skipped"].tolist() == [1] and cols["nonfinite"].tolist() == [1]
    cols = run(engine.history("off", HistoryQuery())).columns
    assert cols["lr.0"].tolist() == [0.5] and "update_norm.0" not in cols


@pytest.mark.parametrize("snapshot", [False, True], ids=["replayed", "from a snapshot"])
def test_history_only_rows_survive_a_restart_unchanged(tmp_path: Any, snapshot: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose norms were filled after the answers are what a restart restores: replayed
    (the log does not say where the norms went: replay takes them at once, the same values)
    or read from a snapshot taken after them."""
    monkeypatch.setattr(host_module, "INLINE_BYTES", -1)
    p0 = {"w": seeded((40, 30), 1), "b": seeded((30,), 2)}
    eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
    run(eng.start())
    try:
        run(eng.create(CreateSpec("Adam", [GroupSpec({"w": p0["w"].clone()}),
                                           GroupSpec({"b": p0["b"].clone()}, {"lr": 0.1})],
                                  options={"lr": 0.01}, id="r")))
        for k in range(4):
            sent = {n: seeded(tuple(t.shape), 10 * k + i) for i, (n, t) in enumerate(p0.items())}
            assert run(eng.step("r", sent, return_params=False,
                                answer_metrics=False)).metrics is None
        live = _history_rows(eng, "r")
        assert not any(math.isnan(v) for f in NORM_FIELDS for v in live[f]), live
    finally:
        run(eng.stop(snapshot=snapshot))
    eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
    run(eng.start())
    try:
        assert _history_rows(eng, "r") == live
    finally:
        run(eng.stop())


@pytest.mark.parametrize("when", ["after the step", "at stop"])
def test_a_snapshot_waits_for_the_norms_taken_after_the_answer(
        tmp_path: Any, when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot right after a ``?metrics=history`` step (one every step, or the one a clean
    stop takes) is written once the device worker has filled the row's norms, and from a copy
    of the ring: the deferred fill is slowed down and the snapshot's write too (its checksum is
    taken before its bytes go out). The restart restores the row with its norms, torch's, and
    refuses nothing. Without the wait the row came back NaN, or the snapshot torn (a checksum
    mismatch: the session refused at start)."""
    monkeypatch.setattr(host_module, "INLINE_BYTES", -1)  # on the worker, as a large session
    norms_into = metrics._norms_into

    def slow_norms(s: Any, probe: Any, groups: Any, **kwargs: Any) -> bool:
        if threading.current_thread().name == "optserve-cpu":
            time.sleep(0.1)
        return norms_into(s, probe, groups, **kwargs)
    monkeypatch.setattr(metrics, "_norms_into", slow_norms)
    write_atomic = store_module.write_atomic

    def slow_write(path: Any, parts: Any, *args: Any) -> None:
        if path.name == "snapshot.bin":
            time.sleep(0.3)
        write_atomic(path, parts, *args)
    monkeypatch.setattr(store_module, "write_atomic", slow_write)
    p0, g = seeded((100,), 1), seeded((100,), 2)
    local = p0.clone()
    opt = torch.optim.SGD([local], lr=0.1)
    local.grad = g
    opt.step()
    want_update = float(torch.linalg.vector_norm(p0 - local))
    want_param = float(torch.linalg.vector_norm(local))
    every = 1 if when == "after the step" else 1000
    eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="interval",
                          snapshot_every_steps=every)
    run(eng.start())
    try:
        run(eng.create(CreateSpec("SGD", [GroupSpec({"w": p0.clone()})], options={"lr": 0.1},
                                  id="snap")))
        assert run(eng.step("snap", {"w": g}, return_params=False,
                            answer_metrics=False)).metrics is None
    finally:
        run(eng.stop())
    eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="interval")
    run(eng.start())
    try:
        assert not run(eng.status()).refused
        cols = run(eng.history("snap", HistoryQuery())).columns
        close(cols["update_norm.0"][0], want_update, "update_norm")
        close(cols["param_norm.0"][0], want_param, "param_norm")
    finally:
        run(eng.stop())


def test_records_logged_before_the_scalar_names_bound_replay_as_they_ran() -> None:
    """A step's record without ``scalar_names`` (logged before the bound existed) is not
    checked against it at replay, however many names the session has: a session restored
    from such a log is never refused its own acknowledged steps. One with it is checked."""
    from app.engine.interface import GroupSpec as Spec
    from app.engine.ops.gradients import Step
    from app.engine.session import Session

    s = Session.build("old", "SGD", [Spec({"w": torch.zeros(2)})], {"lr": 0.1}, None, "reject",
                      torch.device("cpu"))
    s.history.append({f"scalars.n{i}": 1.0 for i in range(metrics.MAX_SCALAR_NAMES + 5)})
    old = Step({"w": torch.ones(2)}, scalars={"another": 1.0}).to_tree()
    assert "scalar_names" not in old
    replayed = Step.from_tree(old)
    assert replayed.scalar_names is False
    replayed.check(s)  # taken
    new = Step.from_tree(Step({"w": torch.ones(2)}, scalars={"another": 1.0},
                              scalar_names=True).to_tree())
    assert new.scalar_names is True
    with pytest.raises(Invalid) as info:
        new.check(s)
    assert info.value.code == "invalid_scalars" and info.value.field == "scalars.another"
    known = Step.from_tree(Step({"w": torch.ones(2)}, scalars={"n0": 2.0},
                                scalar_names=True).to_tree())
    known.check(s)  # a name it has: taken
