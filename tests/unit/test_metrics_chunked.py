"""Metrics of parameters stepped in chunks (``app/engine/chunked.py``), on the embedded engine.

Their update norms come from the chunked step itself (each chunk copied and subtracted while
it is in the cache), so the session keeps no whole copy of them; the norms must still equal
the same quantities computed here with torch (a local ``torch.optim`` run, float64 norms), and
the parameters torch's bit for bit. Chunks of 7 elements from 20 elements up: "w" (128) and
"e" (40) are chunked, "b" and "h" are not, and each group has one of each."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, chunked, embedded_engine, metrics
from app.engine import host as host_module
from app.engine.history import HistoryQuery
from app.engine.session import Session
from tests.unit.test_metrics_history import close, norm, run, seeded

SHAPES = {"w": (16, 8), "b": (8,), "h": (5, 3), "e": (40,)}
GROUPS = (("w", "b"), ("h", "e"))
NORMS = ("grad_norm", "update_norm", "param_norm", "update_ratio")


@pytest.fixture
def engine() -> Iterator[Front]:
    eng = embedded_engine("cpu", warm_up=False)
    run(eng.start())
    chunked.configure(7, smallest=20)  # (after the host, which sets the server's setting)
    try:
        yield eng
    finally:
        run(eng.stop())
        chunked.configure(chunked.DEFAULT_CHUNK)


def step_locally(opt: torch.optim.Optimizer, local: dict[str, torch.Tensor],
                 sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``opt.step()`` with the gradients ``sent`` (those left out: none); the values before."""
    before = {n: t.clone() for n, t in local.items()}
    for n, t in local.items():
        t.grad = sent.get(n)
    opt.step()
    return before


def session(engine: Front, sid: str) -> Session:
    host, key = run(engine._host("default", sid))
    return host.embedded._sessions[key]  # type: ignore[attr-defined,no-any-return]


def stepped_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that counts the chunks the metrics watched (one entry per chunk)."""
    seen: list[int] = []
    real = chunked.Watch.stepped

    def spy(self: chunked.Watch, opt: Any, param: torch.Tensor, view: torch.Tensor) -> None:
        seen.append(view.numel())
        real(self, opt, param, view)
    monkeypatch.setattr(chunked.Watch, "stepped", spy)
    return seen


OPTIMIZERS = [("Adam", {"lr": 0.01, "weight_decay": 0.01}), ("SGD", {"lr": 0.1}),
              ("SGD", {"lr": 0.1, "momentum": 0.9}), ("NAdam", {"lr": 0.02}),
              ("Rprop", {"lr": 0.01})]


@pytest.mark.parametrize("where", ["worker", "inline"])
@pytest.mark.parametrize("name,options", OPTIMIZERS,
                         ids=[f"{n}-{'-'.join(o)}" for n, o in OPTIMIZERS])
def test_norms_of_parameters_stepped_in_chunks_equal_torch(
        engine: Front, name: str, options: dict[str, Any], where: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Five steps: the first (the chunked parameters' state made chunk by chunk), one that
    leaves out a chunked and an unchunked parameter, one whose norms go to the history only
    (``?metrics=history``: taken after the answer from a copy of every parameter), all with
    torch's norms and parameters; with norms in the answer the session's copy for the update
    norm holds only the unchunked parameters."""
    if where == "worker":
        monkeypatch.setattr(host_module, "INLINE_BYTES", -1)
    watched = stepped_chunks(monkeypatch)
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    run(engine.create(CreateSpec(name, [GroupSpec({n: p0[n].clone() for n in names})
                                        for names in GROUPS], options=dict(options), id="c")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = getattr(torch.optim, name)([{"params": [local[n] for n in names]} for names in GROUPS],
                                     **options)
    for k in range(5):
        sent = {n: seeded(s, 100 * k + i) for i, (n, s) in enumerate(SHAPES.items())
                if not (k == 2 and n in ("e", "b"))}
        lrs = [float(g["lr"]) for g in opt.param_groups]
        before = step_locally(opt, local, sent)
        answered = k != 3
        result = run(engine.step("c", sent, return_params=True, answer_metrics=answered))
        assert result.params is not None
        for n in SHAPES:
            assert torch.equal(result.params[n], local[n]), (k, n)
        if answered:
            assert result.metrics is not None
            got = result.metrics["groups"]
        else:
            assert result.metrics is None
            cols = run(engine.history("c", HistoryQuery(since=k))).columns
            got = [{f: float(cols[f"{f}.{gi}"][0]) for f in NORMS} for gi in range(2)]
        for gi, names in enumerate(GROUPS):
            want_upd = norm([local[n] - before[n] for n in names])
            want_par = norm([local[n] for n in names])
            close(got[gi]["grad_norm"], norm([sent[n] for n in names if n in sent]),
                  f"step {k} group {gi} grad")
            close(got[gi]["update_norm"], want_upd, f"step {k} group {gi} update")
            close(got[gi]["param_norm"], want_par, f"step {k} group {gi} param")
            close(got[gi]["update_ratio"], want_upd / want_par, f"step {k} group {gi} ratio")
            if answered:
                assert got[gi]["lr"] == lrs[gi]
    # chunks watched: w's 19 in each step with its norms in the answer (all but k = 3), e's 6
    # in those of them with its gradient (not k = 2); the norms taken after the answer come
    # from a copy of every parameter
    assert len(watched) == 4 * 19 + 3 * 6
    layout = session(engine, "c").metrics_layout
    assert [n for _, _, n in layout.big] == ["w", "e"]
    small = sum(math.prod(SHAPES[n]) for n in ("b", "h")) * 4
    assert layout.scratch is not None and layout.scratch.numel() < small + 2 * 16


def test_a_chunkable_parameter_stepped_whole_is_copied_for_its_norm(
        engine: Front, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that takes the large parameters whole after all (``chunked.plan`` finds nothing
    to chunk: here forced) copies them for that step: the norms are still torch's."""
    watched = stepped_chunks(monkeypatch)
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    run(engine.create(CreateSpec("Adam", [GroupSpec({n: p0[n].clone() for n in names})
                                          for names in GROUPS], options={"lr": 0.01}, id="w")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam([{"params": [local[n] for n in names]} for names in GROUPS], lr=0.01)
    plan = chunked.plan
    for k in range(3):
        if k == 1:
            monkeypatch.setattr(chunked, "plan", lambda opt, name: [])
        else:
            monkeypatch.setattr(chunked, "plan", plan)
        sent = {n: seeded(s, 10 * k + i) for i, (n, s) in enumerate(SHAPES.items())}
        before = step_locally(opt, local, sent)
        result = run(engine.step("w", sent, return_params=True))
        assert result.params is not None and result.metrics is not None
        for n in SHAPES:
            assert torch.equal(result.params[n], local[n]), (k, n)
        for gi, names in enumerate(GROUPS):
            got = result.metrics["groups"][gi]
            close(got["update_norm"], norm([local[n] - before[n] for n in names]), f"{k} {gi}")
            close(got["param_norm"], norm([local[n] for n in names]), f"{k} {gi} param")
    assert len(watched) == 2 * (19 + 6)  # steps 0 and 2


def test_metrics_layout_follows_the_chunk_setting(engine: Front) -> None:
    """The layout is worked out again when the chunk setting changes: with chunking off,
    every parameter is in the copy, and the norms are still torch's."""
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    run(engine.create(CreateSpec("SGD", [GroupSpec({n: p0[n].clone() for n in names})
                                         for names in GROUPS],
                                 options={"lr": 0.1, "momentum": 0.9}, id="s")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.SGD([{"params": [local[n] for n in names]} for names in GROUPS], lr=0.1,
                          momentum=0.9)
    for k in range(3):
        if k == 1:
            chunked.configure(0)
        sent = {n: seeded(s, 10 * k + i) for i, (n, s) in enumerate(SHAPES.items())}
        before = step_locally(opt, local, sent)
        result = run(engine.step("s", sent, return_params=True))
        assert result.metrics is not None
        for gi, names in enumerate(GROUPS):
            close(result.metrics["groups"][gi]["update_norm"],
                  norm([local[n] - before[n] for n in names]), f"{k} {gi}")
        layout = session(engine, "s").metrics_layout
        assert isinstance(layout, metrics.Layout)
        assert [n for _, _, n in layout.big] == (["w", "e"] if k == 0 else [])


@pytest.mark.parametrize("where", ["worker", "inline"])
@pytest.mark.parametrize("name,options", OPTIMIZERS[:3], ids=["Adam", "SGD", "SGD-momentum"])
def test_norms_after_the_answer_equal_those_in_the_answer(
        engine: Front, name: str, options: dict[str, Any], where: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Twin sessions, one answering its norms (taken in the chunked step), one leaving them to
    the history (``?metrics=history``: taken after the answer from a copy of every parameter,
    chunk by chunk all the same): the same values, value for value, and torch's. The second
    keeps a copy of its large parameters, the first none."""
    if where == "worker":
        monkeypatch.setattr(host_module, "INLINE_BYTES", -1)
    watched = stepped_chunks(monkeypatch)
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    for sid in ("a", "h"):
        run(engine.create(CreateSpec(name, [GroupSpec({n: p0[n].clone() for n in names})
                                            for names in GROUPS], options=dict(options),
                                     id=sid)))
    local = {n: t.clone() for n, t in p0.items()}
    opt = getattr(torch.optim, name)([{"params": [local[n] for n in names]} for names in GROUPS],
                                     **options)
    for k in range(4):
        sent = {n: seeded(s, 100 * k + i) for i, (n, s) in enumerate(SHAPES.items())
                if not (k == 2 and n == "w")}
        before = step_locally(opt, local, sent)
        answered = run(engine.step("a", sent, return_params=True))
        quiet = run(engine.step("h", sent, return_params=True, answer_metrics=False))
        assert answered.params is not None and quiet.params is not None
        assert answered.metrics is not None and quiet.metrics is None
        for n in SHAPES:
            assert torch.equal(answered.params[n], local[n]), (k, n)
            assert torch.equal(quiet.params[n], local[n]), (k, n)
        for gi, names in enumerate(GROUPS):
            got = answered.metrics["groups"][gi]
            close(got["update_norm"], norm([local[n] - before[n] for n in names]), f"{k} {gi}")
            close(got["param_norm"], norm([local[n] for n in names]), f"{k} {gi} param")
    rows = {sid: {k: v.tolist() for k, v in
                  run(engine.history(sid, HistoryQuery())).columns.items() if k != "time"}
            for sid in ("a", "h")}
    assert rows["a"] == rows["h"]
    assert len(watched) == 3 * 19 + 4 * 6  # the answering twin's steps only (w: not k = 2)
    assert session(engine, "a").metrics_layout.big_before is None
    copies = session(engine, "h").metrics_layout.big_before
    assert [tuple(c.shape) for c in copies] == [SHAPES["w"], SHAPES["e"]]


class _NormsFail:
    """``torch`` as ``chunked`` sees it, whose ``_foreach_norm`` fails."""

    def __getattr__(self, name: str) -> Any:
        if name == "_foreach_norm":
            raise RuntimeError("no norms today")
        return getattr(torch, name)


def test_a_failure_of_the_chunks_norms_leaves_the_step_whole(
        engine: Front, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked step's own norm work failing (here: torch's norm, inside the step) costs the
    step its norms, never the step: torch's parameters, an answer without norms, and the next
    step with torch's norms again."""
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    run(engine.create(CreateSpec("Adam", [GroupSpec({n: p0[n].clone() for n in names})
                                          for names in GROUPS], options={"lr": 0.01}, id="f")))
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam([{"params": [local[n] for n in names]} for names in GROUPS], lr=0.01)
    for k in range(3):
        sent = {n: seeded(s, 10 * k + i) for i, (n, s) in enumerate(SHAPES.items())}
        before = step_locally(opt, local, sent)
        if k == 1:
            monkeypatch.setattr(chunked, "torch", _NormsFail())
        result = run(engine.step("f", sent, return_params=True))
        monkeypatch.setattr(chunked, "torch", torch)
        assert result.params is not None and result.metrics is not None
        for n in SHAPES:
            assert torch.equal(result.params[n], local[n]), (k, n)
        groups = result.metrics["groups"]
        if k == 1:
            assert all("update_norm" not in g for g in groups), groups
            continue
        for gi, names in enumerate(GROUPS):
            close(groups[gi]["update_norm"], norm([local[n] - before[n] for n in names]),
                  f"{k} {gi}")


@pytest.mark.parametrize("answered", [True, False], ids=["answer", "history"])
def test_an_unchanged_large_parameter_holding_nan_makes_the_update_norm_nan(
        engine: Front, answered: bool) -> None:
    """A large parameter without a gradient in a step changes by nothing, except where it holds
    a NaN or an infinity (after - before is NaN there, as torch computes it): its group's
    update norm is NaN then, in both modes, as for a small parameter."""
    w = seeded(SHAPES["w"], 1)
    w[3, 4] = math.nan
    run(engine.create(CreateSpec("SGD", [GroupSpec({"w": w, "b": seeded((8,), 2)}),
                                         GroupSpec({"h": seeded((5, 3), 3),
                                                    "e": seeded((40,), 4)})],
                                 options={"lr": 0.1}, id="n", nonfinite="allow")))
    grads = {"b": seeded((8,), 5), "h": seeded((5, 3), 6)}
    result = run(engine.step("n", grads, return_params=False, answer_metrics=answered))
    if answered:
        assert result.metrics is not None
        groups = result.metrics["groups"]
    else:
        cols = run(engine.history("n", HistoryQuery())).columns
        groups = [{f: float(cols[f"{f}.{gi}"][0]) for f in NORMS} for gi in range(2)]
    nan = {"$float": "nan"} if answered else None  # (the answer's JSON form of a NaN)
    for key in ("update_norm", "param_norm"):
        got = groups[0][key]
        assert got == nan if answered else math.isnan(got), (key, got)
    want = 0.1 * norm([grads["h"]])  # e left out, finite: no change
    assert math.isclose(groups[1]["update_norm"], want, rel_tol=1e-6)


def test_a_group_added_later_clones_its_norms_inputs_and_keeps_no_large_copy(
        engine: Front) -> None:
    """After ``add_param_group`` the parameters no longer tile one block: the small ones are
    cloned per step, and a step whose norms go to the history clones the large one too (no copy
    kept for it); every norm is still torch's, in both modes."""
    p0 = {"w": seeded((16, 8), 1), "b": seeded((8,), 2)}
    run(engine.create(CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in p0.items()})],
                                 options={"lr": 0.01}, id="g")))
    c0 = seeded((5,), 3)
    run(engine.add_param_group("g", GroupSpec({"c": c0.clone()}, {"lr": 0.02})))
    local = {**{n: t.clone() for n, t in p0.items()}, "c": c0.clone()}
    opt = torch.optim.Adam([local["w"], local["b"]], lr=0.01)
    opt.add_param_group({"params": [local["c"]], "lr": 0.02})
    groups = [["w", "b"], ["c"]]
    for k in range(4):
        answered = k % 2 == 0
        sent = {n: seeded(tuple(t.shape), 10 * k + i) for i, (n, t) in enumerate(local.items())}
        before = step_locally(opt, local, sent)
        result = run(engine.step("g", sent, return_params=True, answer_metrics=answered))
        if answered:
            assert result.metrics is not None
            got = result.metrics["groups"]
        else:
            cols = run(engine.history("g", HistoryQuery(since=k))).columns
            got = [{f: float(cols[f"{f}.{gi}"][0]) for f in NORMS} for gi in range(2)]
        for gi, names in enumerate(groups):
            close(got[gi]["update_norm"], norm([local[n] - before[n] for n in names]),
                  f"{k} {gi}")
            close(got[gi]["param_norm"], norm([local[n] for n in names]), f"{k} {gi} param")
        layout = session(engine, "g").metrics_layout
        assert layout.copies is None and layout.big_before is None
        assert [n for _, _, n in layout.big] == ["w"]


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-a-small-one"])
@pytest.mark.parametrize("chunk_after", [0, 65536], ids=["unchunked", "other-chunk"])
def test_replayed_rows_do_not_depend_on_the_step_chunk(tmp_path: Any, chunk_after: int,
                                                       beside: bool) -> None:
    """A restart replays the logged steps under its own ``OPTSERVE_STEP_CHUNK``: the history
    rows it rebuilds equal those answered before (every update and parameter norm is taken over
    the same fixed pieces, ``chunked.NORM_PIECE``, however the step chunks the parameter), and
    the parameters are the same bits. 2,100,000 elements: chunked at the default setting, not
    a whole number of pieces; ``beside``: a small parameter follows it in its group (and in
    the flat block, where a parameter stepped whole shares a run with its neighbours)."""
    n = 2_100_000

    def seeded_n(seed: int) -> torch.Tensor:
        return torch.randn(n + 64 if beside else n, generator=torch.Generator().manual_seed(seed))

    def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
        # views of one buffer, laid out as a safetensors body's and the log record's are
        return {"w": t[:n], "b": t[n:]} if beside else {"w": t}

    async def live() -> tuple[dict[str, list[float]], torch.Tensor]:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
        await eng.start()
        await eng.create(CreateSpec("Adam", [GroupSpec(split(seeded_n(1)))],
                                    options={"lr": 0.01}, id="r"))
        for k in range(3):
            await eng.step("r", split(seeded_n(10 + k)), return_params=False,
                           answer_metrics=k != 1)
        rows = (await eng.history("r", HistoryQuery())).columns
        params = (await eng.pull("r", None)).params["w"].clone()
        await eng.stop(snapshot=False)  # the disk as a crash leaves it: replay at the start
        return {k: v.tolist() for k, v in rows.items() if k != "time"}, params

    async def replayed() -> tuple[dict[str, list[float]], torch.Tensor]:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step",
                              step_chunk=chunk_after)
        await eng.start()
        try:
            rows = (await eng.history("r", HistoryQuery())).columns
            params = (await eng.pull("r", None)).params["w"].clone()
            return {k: v.tolist() for k, v in rows.items() if k != "time"}, params
        finally:
            await eng.stop()
            chunked.configure(chunked.DEFAULT_CHUNK)

    before_rows, before_params = run(live())
    after_rows, after_params = run(replayed())
    assert after_rows == before_rows
    assert torch.equal(after_params, before_params)


def test_replayed_rows_do_not_depend_on_when_foreach_was_set(tmp_path: Any) -> None:
    """A group's ``foreach`` changed after some steps (torch's foreach step takes no chunks)
    and a snapshot taken after that: the steps replayed from it rebuild the rows answered
    before. A parameter some step chunk could chunk is normed on its own whatever the groups'
    ``foreach``/``fused`` (the metrics' layout kept the choice made before the change, and
    the snapshot's restore made the other: the update and parameter norms differed in their
    last bits)."""
    n = 600_000  # chunked by no step at the default setting, by some at another

    def grads(k: int) -> dict[str, torch.Tensor]:
        # views of one buffer, laid out as a safetensors body's and the log record's are (the
        # gradient norm of gradients that come apart is another matter: see the notes)
        flat = torch.cat([seeded((n,), 10 + k), seeded((64,), 20 + k)])
        return {"w": flat[:n], "b": flat[n:]}

    def engine_at(d: Any) -> Front:
        return embedded_engine("cpu", warm_up=False, data_dir=d, durability="step",
                               snapshot_every_steps=3)

    async def live() -> dict[str, list[float]]:
        eng = engine_at(tmp_path)
        await eng.start()
        await eng.create(CreateSpec("Adam", [GroupSpec({"w": seeded((n,), 1),
                                                        "b": seeded((64,), 2)})],
                                    options={"lr": 0.01}, id="f"))
        for k in range(2):
            await eng.step("f", grads(k), return_params=False)
        await eng.update_param_group("f", 0, {"foreach": True})
        for k in range(2, 6):
            await eng.step("f", grads(k), return_params=False)
        rows = (await eng.history("f", HistoryQuery())).columns
        await eng.stop(snapshot=False)  # a crash: the snapshot after step 3, then the log
        return {k: v.tolist() for k, v in rows.items() if k != "time"}

    async def replayed() -> dict[str, list[float]]:
        eng = engine_at(tmp_path)
        await eng.start()
        try:
            rows = (await eng.history("f", HistoryQuery())).columns
            return {k: v.tolist() for k, v in rows.items() if k != "time"}
        finally:
            await eng.stop()

    before = run(live())
    assert run(replayed()) == before
