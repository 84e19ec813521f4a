"""``PackedTensors.deferred``: a session's parameters copied out as bytes whose tensor views
are made only on the first look inside the mapping. Every way of looking inside must see
exactly the eager views; a binary answer is its header and bytes without making any."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch

from app.api.bodies import tensors_response
from app.engine.session import BlockPlan, flat_block
from app.wire.safetensors_body import PackedTensors, packed_from_plan, safetensors_header


def params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return flat_block({"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen),
                       "d": torch.randn(5, generator=gen).double(),
                       "h": torch.randn(2, generator=gen).half(), "e": torch.empty(0)},
                      torch.device("cpu"))


def deferred() -> tuple[PackedTensors, dict[str, torch.Tensor]]:
    plan = BlockPlan.of(params())
    assert plan is not None
    packed = plan.pack()
    assert packed._pending is not None
    eager = packed_from_plan(packed._pending[0], plan.views)
    return packed, dict(eager.items())


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


LOOKS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    "getitem": lambda d: d["w"], "iter": lambda d: list(iter(d)), "len": len,
    "contains": lambda d: ("b" in d, "x" in d), "keys": lambda d: list(d.keys()),
    "values": lambda d: list(d.values()), "items": lambda d: list(d.items()),
    "get": lambda d: (d.get("d"), d.get("x")), "copy": lambda d: d.copy(),
    "dict": dict, "unpack": lambda d: {**d}, "bool": bool, "list": list,
    "reversed": lambda d: list(reversed(d)), "or": lambda d: d | {"x": torch.ones(1)},
    "ror": lambda d: {"x": torch.ones(1)} | d, "repr": lambda d: repr(d).count("tensor"),
    "update into": lambda d: {**{}, **dict(d)},
}


@pytest.mark.parametrize("look", list(LOOKS))
def test_every_look_inside_sees_the_eager_views(look: str) -> None:
    packed, eager = deferred()
    got, want = LOOKS[look](packed), LOOKS[look](eager)
    assert same(got, want), (got, want)
    assert packed._pending is None
    assert same(dict(packed.items()), eager)


def test_equality_sees_the_views() -> None:
    packed, eager = deferred()
    empty = PackedTensors()
    assert packed != empty and empty != packed  # (equal lengths would compare the tensors)
    assert packed._pending is None


def test_a_change_makes_the_views_first_and_forgets_the_header_entries() -> None:
    packed, eager = deferred()
    packed["x"] = torch.ones(1)
    assert packed.entries is None and packed._pending is None
    assert list(packed) == [*eager, "x"]
    assert all(torch.equal(packed[n], eager[n]) for n in eager)


def test_a_binary_answer_is_the_header_and_bytes_without_views() -> None:
    packed, eager = deferred()
    scalars = {"version": 3, "lr": [0.1], "note": "text"}
    response = asyncio.run(tensors_response(True, False, scalars, packed, {}))
    assert packed._pending is not None  # no view was made
    body = b"".join(bytes(p) for p in response.parts)  # type: ignore[attr-defined]
    loaded = safetensors.torch.load(body)
    assert sorted(loaded) == sorted(eager)
    assert all(torch.equal(loaded[n], eager[n]) for n in eager)
    meta = {"version": "3", "lr": "[0.1]", "note": "text"}
    assert body[:len(body) - len(packed.buffer)] == safetensors_header(eager, meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packing_narrowed_casts_as_it_copies(dtype: torch.dtype) -> None:
    """``pack(tensors, dtype)``: floating tensors wider than ``dtype`` come out as
    ``t.to(dtype)`` would make them (runs of several tensors too), narrower or non-floating
    ones (float16, int64) as they are; every view is aligned, and the buffer reads
    back as the same safetensors the ``safetensors`` package reads."""
    from app.wire.safetensors_body import pack

    gen = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(5, 3, generator=gen, dtype=torch.float64),
               "b": torch.randn(7, generator=gen),
               "c": torch.randn(4, 2, generator=gen),
               "h": torch.randn(3, generator=gen).to(torch.float16),
               "i": torch.arange(4)}
    out = pack(tensors, dtype)
    for name, t in tensors.items():
        want = t.to(dtype) if t.is_floating_point() and t.element_size() > dtype.itemsize \
            else t
        assert out[name].dtype == want.dtype, name
        assert torch.equal(out[name], want), name
        assert out[name].data_ptr() % out[name].element_size() == 0, name
    read = safetensors.torch.load(bytes(safetensors_header(out, None)) + bytes(out.buffer))
    assert all(torch.equal(read[n], out[n]) for n in tensors)
    plain = pack(tensors)
    assert all(torch.equal(plain[n], t) and plain[n].dtype == t.dtype
               for n, t in tensors.items())
