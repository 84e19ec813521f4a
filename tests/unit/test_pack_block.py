"""``BlockPlan``: a session's parameters copied out with one copy when they tile its flat
block, and None (the caller packs them one by one) whenever they do not."""

from __future__ import annotations

import torch

from app.engine.interface import Tensors
from app.engine.session import BlockPlan, flat_block
from app.wire.safetensors_body import PackedTensors


def pack_block(params: Tensors) -> PackedTensors | None:
    """All of ``params`` copied out with one copy, when they tile one flat block in
    ``pack``'s order; else None."""
    plan = BlockPlan.of(params)
    return plan.pack() if plan is not None else None


def block(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return flat_block(tensors, torch.device("cpu"))


def test_a_flat_block_of_several_dtypes_comes_out_whole_and_equal() -> None:
    gen = torch.Generator().manual_seed(0)
    given = {"h": torch.randn(3, generator=gen).half(), "a": torch.randn(2, 3, generator=gen),
             "d": torch.randn(5, generator=gen).double(), "b": torch.randn(7, generator=gen),
             "e": torch.empty(0)}
    params = block(given)
    packed = pack_block(params)
    assert packed is not None
    # widest dtype first (as pack lays them out), the order given within a dtype
    assert list(packed) == ["d", "a", "b", "e", "h"]
    for name, t in given.items():
        assert packed[name].dtype == t.dtype and packed[name].shape == t.shape
        assert torch.equal(packed[name], t)
        if t.numel():
            assert packed[name].data_ptr() != params[name].data_ptr()  # a copy
    assert len(packed.buffer) == sum(t.nbytes for t in given.values())
    # the copy does not follow the parameters
    with torch.no_grad():
        params["a"].add_(1.0)
    assert torch.equal(packed["a"], given["a"])


def test_parameters_that_do_not_tile_the_block_are_not_packed_as_one() -> None:
    params = block({"a": torch.randn(4), "b": torch.randn(4), "c": torch.randn(4)})
    assert pack_block(params) is not None
    moved = dict(params, b=params["b"].clone())  # left the block (own storage)
    assert pack_block(moved) is None
    swapped = {"b": params["b"], "a": params["a"], "c": params["c"]}  # out of block order
    assert pack_block(swapped) is None
    gap = {"a": params["a"], "c": params["c"]}
    assert pack_block(gap) is None
    square = block({"m": torch.randn(3, 3)})["m"]
    assert pack_block({"m": square.t()}) is None  # not contiguous
    part = block({"w": torch.randn(8)})["w"]
    assert pack_block({"w": part[:4]}) is not None
    assert torch.equal(pack_block({"w": part[2:6]})["w"], part[2:6])  # type: ignore[index]
    assert pack_block({}) is None
