"""A group's gradient norm does not depend on how its gradients lie in memory.

The same gradients come apart (a JSON body, an in-process caller, accumulated ones) or end to
end (a safetensors body, the same-host segment, the log record a restart replays). The per-step
metrics norm a group's gradients joined in the group's order, in fixed pieces
(``app/engine/norm_pieces.py``); these tests lay the same values out every way and compare the
norms bit for bit, against each other and, within float rounding, against float64; and check
that a history rebuilt from the log after a crash equals what steps sent apart answered."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import CreateSpec, Front, GroupSpec, chunked, embedded_engine, norm_pieces
from app.engine.history import HistoryQuery
from tests.unit.test_metrics_history import close, norm, run, seeded


def bits(ts: list[torch.Tensor]) -> list[bytes]:
    return [t.detach().reshape(1).view(torch.uint8).numpy().tobytes() for t in ts]


def laid_out(values: list[torch.Tensor], how: str) -> list[torch.Tensor]:
    """The same values, each its own tensor ("apart"), views of one buffer in this order
    ("joined"), in the opposite order ("reversed"), or transposed copies ("strided")."""
    if how == "apart":
        return [v.clone() for v in values]
    if how == "strided":  # every other element of a buffer twice their size
        return [torch.empty(2 * v.numel(), dtype=v.dtype)[::2].copy_(v.reshape(-1))
                .reshape(v.shape) for v in values]
    order = list(range(len(values)))
    if how == "reversed":
        order.reverse()
    flat = torch.cat([values[i].reshape(-1) for i in order])
    out: dict[int, torch.Tensor] = {}
    at = 0
    for i in order:
        n = values[i].numel()
        out[i] = flat[at:at + n].view(values[i].shape)
        at += n
    return [out[i] for i in range(len(values))]


@pytest.fixture
def odd_pieces() -> Iterator[int]:
    chunked.configure(7, smallest=1 << 40)  # pieces of 7 elements, nothing chunked
    try:
        yield 7
    finally:
        chunked.configure(chunked.DEFAULT_CHUNK)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=40),
       seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 40))
def test_many_small_tensors_apart_give_the_joins_pieces(sizes: list[int], seed: int,
                                                        batch: int) -> None:
    """Many gradients smaller than a piece, laid apart or out of the group's order (a
    safetensors body sorted by name), are joined a stretch at a time (``norm_pieces.BATCH``
    elements, small here so that stretches end inside pieces): the same pieces, bit for bit."""
    chunked.configure(7, smallest=1 << 40)
    kept = norm_pieces.BATCH
    norm_pieces.BATCH = batch
    try:
        g = torch.Generator().manual_seed(seed)
        values = [torch.randn(n, generator=g) for n in sizes]
        expected = list(torch.cat(values).split(7)) if sum(sizes) else []
        for how in ("apart", "reversed", "strided"):
            got = norm_pieces.joined(laid_out(values, how))
            assert [p.numel() for p in got] == [p.numel() for p in expected], how
            for p, e in zip(got, expected, strict=True):
                assert torch.equal(p, e), how
    finally:
        norm_pieces.BATCH = kept
        chunked.configure(chunked.DEFAULT_CHUNK)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_the_pieces_are_the_join_cut_alike_whatever_the_layout(sizes: list[int],
                                                               seed: int) -> None:
    chunked.configure(7, smallest=1 << 40)
    try:
        g = torch.Generator().manual_seed(seed)
        values = [torch.randn(n, generator=g) for n in sizes]
        want = torch.cat(values) if values else torch.empty(0)
        expected = list(want.split(7)) if want.numel() else []
        for how in ("apart", "joined", "reversed", "strided"):
            got = norm_pieces.joined(laid_out(values, how))
            assert [p.numel() for p in got] == [p.numel() for p in expected], how
            for p, e in zip(got, expected, strict=True):
                assert torch.equal(p, e), how
            assert bits(list(torch._foreach_norm(got))) == bits(
                list(torch._foreach_norm(expected))) if got else not expected
    finally:
        chunked.configure(chunked.DEFAULT_CHUNK)


def test_tensors_end_to_end_are_cut_as_views_and_a_dtype_change_starts_a_run(
        odd_pieces: int) -> None:
    flat = torch.arange(20, dtype=torch.float32)
    got = norm_pieces.joined([flat[:5], flat[5:12], flat[12:]])
    assert [p.numel() for p in got] == [7, 7, 6]
    base = flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in got)  # no copy
    mixed = norm_pieces.joined([torch.ones(5), torch.ones(4, dtype=torch.float64),
                                torch.ones(3, dtype=torch.float64), torch.ones(2)])
    assert [(p.numel(), p.dtype) for p in mixed] == [
        (5, torch.float32), (7, torch.float64), (2, torch.float32)]


SHAPES = {"w": (9, 5), "b": (11,), "c": (3,), "h": (4, 4), "e": (13,)}
GROUPS = (("w", "b", "c"), ("h", "e"))


@pytest.fixture
def engine(odd_pieces: int) -> Iterator[Front]:
    eng = embedded_engine("cpu", warm_up=False)
    run(eng.start())
    chunked.configure(7, smallest=1 << 40)  # (after the host, which sets the server's setting)
    try:
        yield eng
    finally:
        run(eng.stop())


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_groups_gradient_norm_is_the_same_bits_however_the_gradients_lie(
        engine: Front, name: str) -> None:
    """One session per layout, the same gradients each step: apart (a JSON body), views of one
    buffer in the session's order (a binary body: one run over both groups), in the opposite
    order, per group (a run that is exactly one group's, as the log record of a one-group
    session), non-contiguous; and a step whose gradients are accumulated pushes."""
    layouts = ("apart", "joined", "reversed", "per-group", "strided")
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    for how in layouts:
        run(engine.create(CreateSpec(name, [GroupSpec({n: p0[n].clone() for n in names})
                                            for names in GROUPS],
                                     options={"lr": 0.01}, id=how)))
    for k in range(3):
        sent = {n: seeded(s, 50 * k + i) for i, (n, s) in enumerate(SHAPES.items())
                if not (k == 1 and n == "b")}  # one step without b's gradient
        answers: dict[str, list[list[bytes]]] = {}
        for how in layouts:
            if how == "per-group":
                grads: dict[str, torch.Tensor] = {}
                for names in GROUPS:
                    present = [n for n in names if n in sent]
                    grads.update(zip(present, laid_out([sent[n] for n in present], "joined"),
                                     strict=True))
            else:
                names_sent = list(sent)
                grads = dict(zip(names_sent, laid_out([sent[n] for n in names_sent], how),
                                 strict=True))
            r = run(engine.step(how, grads, return_params=False))
            assert r.metrics is not None
            groups = r.metrics["groups"]
            answers[how] = [[struct_bits(g["grad_norm"])] for g in groups]
            for gi, names in enumerate(GROUPS):
                close(groups[gi]["grad_norm"], norm([sent[n] for n in names if n in sent]),
                      f"{how} step {k} group {gi}")
        assert {h: a for h, a in answers.items() if a != answers["apart"]} == {}, k
    # accumulated: pushed apart and summed on the server, then stepped
    run(engine.push("apart", {n: sent[n] for n in ("w", "h")}))
    r = run(engine.step("apart", {n: sent[n] for n in ("b", "c", "e")}, return_params=False))
    run(engine.step("joined", dict(zip(list(sent), laid_out(list(sent.values()), "joined"),
                                       strict=True)), return_params=False))
    assert r.metrics is not None
    joined_rows = run(engine.history("joined", HistoryQuery())).columns
    for gi in range(len(GROUPS)):
        assert struct_bits(r.metrics["groups"][gi]["grad_norm"]) == struct_bits(
            float(joined_rows[f"grad_norm.{gi}"][-1])), gi


def struct_bits(x: float) -> bytes:
    return torch.tensor(x, dtype=torch.float64).reshape(1).view(torch.uint8).numpy().tobytes()


def test_rows_rebuilt_from_the_log_equal_the_answers_of_steps_sent_apart(
        tmp_path: Any) -> None:
    """Steps whose gradients came apart (as a JSON body gives them), then a crash: the restart
    replays the log records, whose gradients lie end to end, and rebuilds the same rows, bit
    for bit, for a one-group session (its record's run is exactly its group) and a two-group
    one. The tensors straddle the default norm pieces (65,536 elements)."""
    shapes = {"w": (40_000,), "b": (50_000,), "c": (37,), "h": (70_001,), "e": (3,)}
    sessions = {"one": [("w", "b", "c", "h", "e")], "two": [("w", "b", "c"), ("h", "e")]}

    async def live() -> dict[str, dict[str, list[float]]]:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
        await eng.start()
        out = {}
        for sid, groups in sessions.items():
            await eng.create(CreateSpec("Adam", [GroupSpec({n: seeded(shapes[n], i)
                                                             for i, n in enumerate(g)})
                                                  for g in groups],
                                        options={"lr": 0.01}, id=sid))
            for k in range(3):
                grads = {n: seeded(s, 100 * k + i) for i, (n, s) in enumerate(shapes.items())
                         if not (k == 1 and n == "c")}
                await eng.step(sid, grads, return_params=False, answer_metrics=k != 2)
            rows = (await eng.history(sid, HistoryQuery())).columns
            out[sid] = {k: v.tolist() for k, v in rows.items() if k != "time"}
        await eng.stop(snapshot=False)  # the disk as a crash leaves it: replay at the start
        return out

    async def replayed() -> dict[str, dict[str, list[float]]]:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="step")
        await eng.start()
        try:
            out = {}
            for sid in sessions:
                rows = (await eng.history(sid, HistoryQuery())).columns
                out[sid] = {k: v.tolist() for k, v in rows.items() if k != "time"}
            return out
        finally:
            await eng.stop()

    before = run(live())
    after = run(replayed())
    for sid in sessions:
        assert all(not math.isnan(v) for v in before[sid]["grad_norm.0"]), sid
    assert after == before


def test_gradients_that_came_apart_are_normed_once(engine: Front,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients that lie apart (a JSON body, widened ``?upcast`` ones) are normed by the
    non-finite check per group, end to end in the group's order, and the metrics take those
    norms: one pass over the gradients, as for a binary body; the values as ever."""
    p0 = {n: seeded(s, i) for i, (n, s) in enumerate(SHAPES.items())}
    run(engine.create(CreateSpec("SGD", [GroupSpec({n: p0[n].clone() for n in names})
                                         for names in GROUPS], options={"lr": 0.1},
                                 id="once")))
    joins: list[list[int]] = []
    real = norm_pieces.joined

    def counted(ts: Any) -> list[torch.Tensor]:
        joins.append([t.numel() for t in ts])
        return real(ts)
    monkeypatch.setattr(norm_pieces, "joined", counted)
    sent = {n: seeded(s, 7 + i) for i, (n, s) in enumerate(SHAPES.items())}
    r = run(engine.step("once", laid_out_dict(sent, "apart"), return_params=False))
    assert joins == [[45, 11, 3], [16, 13]]  # the check's, one per group; none by the metrics
    assert r.metrics is not None
    for gi, names in enumerate(GROUPS):
        close(r.metrics["groups"][gi]["grad_norm"], norm([sent[n] for n in names]), str(gi))


def laid_out_dict(sent: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    return dict(zip(sent, laid_out(list(sent.values()), how), strict=True))
