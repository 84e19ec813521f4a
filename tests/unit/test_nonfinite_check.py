"""``Session.nonfinite_names``: the coarse check (one reduction per span, or one foreach norm
for scattered tensors) must name exactly the tensors that ``torch.isfinite`` faults, whatever
the layout: one request body's span, scattered tensors, slots with gaps between them (the
same-host segment), finite values whose squares overflow, empty and half-precision tensors."""

from __future__ import annotations

import math

import pytest
import torch

from app.engine.session import Session

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def truth(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in tensors.items() if t.numel() and not bool(torch.isfinite(t).all())]


def values(dtype: torch.dtype, kind: str, n: int, seed: int) -> torch.Tensor:
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if kind == "nan":
        t[n // 2] = math.nan
    elif kind == "inf":
        t[-1] = -math.inf
    elif kind == "huge":  # finite, but its squares (and its sum, for float16) overflow
        t.fill_(torch.finfo(dtype).max / 2)
    return t


KINDS = ["ok", "nan", "inf", "huge", "ok", "ok"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["scattered", "one span", "slots with gaps", "two spans",
                                    "reversed"])
def test_names_exactly_the_nonfinite_tensors(dtype: torch.dtype, layout: str) -> None:
    sizes = [3, 0, 5, 1, 7, 2]
    parts = [values(dtype, kind, n, i) if n else torch.empty(0, dtype=dtype)
             for i, (kind, n) in enumerate(zip(KINDS, sizes, strict=True))]
    if layout == "scattered":
        tensors = {f"t{i}": p for i, p in enumerate(parts)}
    else:
        gap = 4 if layout == "slots with gaps" else 0
        block = torch.zeros(sum(sizes) + 4 * len(sizes), dtype=dtype)
        tensors, pos = {}, 0
        for i, p in enumerate(parts):
            if layout == "two spans" and i == 3:
                pos += 4
            view = block[pos:pos + p.numel()]
            view.copy_(p)
            tensors[f"t{i}"] = view
            pos += p.numel() + gap
        if layout == "reversed":  # laid out in one order, named in the other
            tensors = dict(reversed(list(tensors.items())))
    want = truth(tensors)
    assert want, "the case must hold non-finite values"
    assert sorted(Session.nonfinite_names(tensors)) == sorted(want)


def test_all_finite_is_empty_and_sparse_values_are_checked() -> None:
    dense = {"a": torch.randn(4), "b": torch.randn(2, 3)}
    assert Session.nonfinite_names(dense) == []
    sparse = torch.sparse_coo_tensor([[0, 2]], torch.tensor([[1.0, math.nan], [2.0, 3.0]]),
                                     (4, 2), check_invariants=True)
    assert Session.nonfinite_names({**dense, "e": sparse}) == ["e"]
