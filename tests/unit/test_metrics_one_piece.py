"""The per-step norms of a small session take a shorter path: when every run of the metrics'
layout is one norm piece (``metrics.Layout.one_piece``), ``_norms_into`` takes them in a few
torch calls (``metrics._one_piece_norms``), and a body run of one piece is normed as it is by
the non-finite check (``session._piece_norms``). Both must give the general path's values bit
for bit: these tests step the same sessions (several groups, mixed dtypes, empty and
single-element parameters, runs at and past the piece, non-finite and overflowing gradients
let through, norms in the answer and taken after it, inline and on the device worker) with the
short paths and with the general ones, and compare every norm's bits, and the parameters with
an in-process torch run."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, GroupSpec, chunked, embedded_engine, metrics, norm_pieces
from app.engine import host as host_module
from app.engine import session as session_module
from app.engine.history import HistoryQuery
from app.wire.safetensors_body import read_safetensors, write_safetensors
from tests.unit.test_metrics_history import run

NORMS = ("grad_norm", "update_norm", "param_norm", "update_ratio")

#: (groups of {name: (shape, dtype)}): one tensor; two groups of float32; a group of mixed
#: dtypes (runs apart per dtype); empty and one-element parameters
CASES: dict[str, list[dict[str, tuple[tuple[int, ...], torch.dtype]]]] = {
    "one": [{"w": ((1000,), torch.float32)}],
    "groups": [{"w": ((16, 8), torch.float32), "b": ((8,), torch.float32)},
               {"h": ((5, 3), torch.float32)}],
    "dtypes": [{"a": ((33,), torch.float32), "d": ((9,), torch.float64),
                "c": ((4, 4), torch.float32)}, {"e": ((7,), torch.float64)}],
    "tiny": [{"z": ((0,), torch.float32), "one": ((1,), torch.float32)},
             {"k": ((2, 3), torch.float32)}],
}


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "huge" and t.numel():  # finite values whose float32 norm overflows
        t = t.sign() * 3e38 if dtype == torch.float32 else t * 1e300
    if kind == "nonfinite" and t.numel():
        t.view(-1)[0] = math.nan
        t.view(-1)[-1] = math.inf
    if kind == "zero":
        t = torch.zeros(shape, dtype=torch.float64)
    return t.to(dtype)


KINDS = ("plain", "zero", "plain", "huge", "plain", "nonfinite")


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _general_piece_norms(flat: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    parts = norm_pieces.norms([flat])
    return parts, parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _steps(case: str, short: bool, answered: bool, inline: bool,
           monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[bytes]], int, int]:
    """Each step's norms (bits, per group) for the session of ``case``, stepped with the short
    paths (``short``) or without them; and how many times each short path ran."""
    taken = {"norms": 0, "pieces": 0}
    with monkeypatch.context() as m:
        m.setattr(host_module, "INLINE_BYTES", 1 << 40 if inline else -1)
        fast_norms, fast_pieces = metrics._one_piece_norms, session_module._piece_norms
        if short:
            def counted_norms(*a: Any) -> None:
                taken["norms"] += 1
                fast_norms(*a)

            def counted_pieces(flat: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
                taken["pieces"] += 1 if 0 < flat.numel() <= chunked.piece() else 0
                return fast_pieces(flat)
            m.setattr(metrics, "_one_piece_norms", counted_norms)
            m.setattr(session_module, "_piece_norms", counted_pieces)
        else:
            made = metrics._runs

            def general(*a: Any) -> metrics.Layout:
                out = made(*a)
                out.one_piece = None
                return out
            m.setattr(metrics, "_runs", general)
            m.setattr(session_module, "_piece_norms", _general_piece_norms)
        groups = CASES[case]
        eng = embedded_engine("cpu", warm_up=False, default_nonfinite="allow")
        run(eng.start())
        try:
            p0 = {n: _values(shape, dt, i, "plain")
                  for i, (n, (shape, dt)) in enumerate(kv for g in groups for kv in g.items())}
            run(eng.create(CreateSpec("Adam", [GroupSpec({n: p0[n].clone() for n in g})
                                               for g in groups],
                                      options={"lr": 0.01}, id="s")))
            local = {n: t.clone() for n, t in p0.items()}
            opt = torch.optim.Adam([{"params": [local[n] for n in g]} for g in groups], lr=0.01)
            out = []
            for k, kind in enumerate(KINDS):
                sent = {n: _values(t.shape, t.dtype, 100 * k + i, kind)
                        for i, (n, t) in enumerate(p0.items())}
                body, _ = read_safetensors(bytearray(write_safetensors(sent, None)))
                for n, t in local.items():
                    t.grad = sent[n].clone()
                opt.step()
                result = run(eng.step("s", body, return_params=True, answer_metrics=answered))
                assert result.params is not None
                for n, t in local.items():  # bitwise, NaNs included
                    assert _same(result.params[n], t), (case, k, n)
                if answered:
                    assert result.metrics is not None
                    got = [{f: _read(g[f]) for f in NORMS} for g in result.metrics["groups"]]
                else:
                    cols = run(eng.history("s", HistoryQuery(since=k))).columns
                    got = [{f: float(cols[f"{f}.{gi}"][0]) for f in NORMS}
                           for gi in range(len(groups))]
                out.append([_bits(g[f]) for g in got for f in NORMS])
            return out, taken["norms"], taken["pieces"]
        finally:
            run(eng.stop())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.dtype == b.dtype and a.shape == b.shape
                and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))


def _read(x: Any) -> float:
    return float(x["$float"]) if isinstance(x, dict) else float(x)


@pytest.fixture(params=["default", "odd"])
def pieces(request: pytest.FixtureRequest) -> Iterator[str]:
    """The server's norm piece, or pieces of 7 elements (runs past a piece: the general path
    for those layouts, the short one for those within)."""
    if request.param == "odd":
        chunked.configure(7, smallest=1 << 40)
    try:
        yield request.param
    finally:
        chunked.configure(chunked.DEFAULT_CHUNK)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("answered", [True, False], ids=["answer", "history"])
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker"])
def test_short_paths_give_the_general_norms_bit_for_bit(
        case: str, answered: bool, inline: bool, pieces: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    short, norms_taken, pieces_taken = _steps(case, True, answered, inline, monkeypatch)
    general, _, _ = _steps(case, False, answered, inline, monkeypatch)
    assert short == general
    if pieces == "default" or case == "tiny":  # every run within a piece: the short paths ran
        assert norms_taken == len(KINDS)
        assert pieces_taken >= len(KINDS) - 1  # (the first body is checked tensor by tensor)
    assert short[1][0] == _bits(0.0)  # zero gradients: a grad norm of 0
    assert any(math.isnan(struct.unpack("<d", b)[0]) for b in short[-1])
