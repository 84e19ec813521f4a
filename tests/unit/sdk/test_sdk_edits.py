"""``optserve._edits``: which parameters differ from their references, bit for bit (NaN equal
to the same NaN, -0.0 not 0.0), small ones compared joined together and one by one where
the joined buffers differ, large ones on their own; references kept without a copy where an
answer's tensor can serve, copies of their own otherwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optserve import _edits
from optserve._edits import SMALL, References, bitwise_equal


def test_bitwise_equal_compares_bits() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert bitwise_equal(nan, nan.clone())  # torch.equal says False: NaN != NaN
    assert not torch.equal(nan, nan.clone())
    zero = torch.tensor([0.0, 1.0])
    assert torch.equal(zero, torch.tensor([-0.0, 1.0]))  # a float compare misses the sign
    assert not bitwise_equal(zero, torch.tensor([-0.0, 1.0]))
    assert not bitwise_equal(zero, zero.double())
    assert not bitwise_equal(zero, zero.reshape(2, 1))
    assert bitwise_equal(torch.nn.Parameter(zero.clone()), zero)


def _as_integers(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The comparison ``memcmp`` stands in for: the values' bits as integers, each tensor
    read through its own strides."""
    return a.shape == b.shape and bool(torch.equal(_edits._bits(a), _edits._bits(b)))


_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64,
           torch.int64, torch.uint8]


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(_DTYPES), numel=st.integers(0, 3 * SMALL),
       offset=st.integers(0, 7), flip=st.one_of(st.none(), st.integers(0, 1 << 30)),
       bit=st.integers(0, 7), seed=st.integers(0, 1 << 16))
def test_byte_comparison_agrees_with_the_integer_one(
        dtype: torch.dtype, numel: int, offset: int, flip: int | None, bit: int, seed: int
) -> None:
    """Contiguous CPU tensors are compared by ``memcmp`` over exactly their own bytes (a view
    into a larger storage at an offset, the last byte included): it answers as the integer
    comparison does, one flipped bit anywhere included."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, ((numel + offset + 3) * 16,), dtype=torch.uint8, generator=gen)
    storage = base.view(dtype)
    a = storage[offset:offset + numel]
    b = a.clone()
    raw = b.view(torch.uint8) if numel else b
    if flip is not None and numel:
        raw.view(-1)[flip % raw.numel()] ^= 1 << bit
    # the bytes around the view differ in the clone's neighbours: they must not count
    assert _edits._same_bytes(a, b) is not None  # the memcmp path answers
    assert bitwise_equal(a, b) == _as_integers(a, b) == (flip is None or numel == 0)
    joined = _edits._joined_equal([a, a], [b, b]) if numel else True
    assert joined == (flip is None or numel == 0)


def test_views_whose_bytes_are_not_their_values_are_compared_as_values() -> None:
    """A strided view, a conjugate view and a negative view: not by ``memcmp`` (their bytes
    are another tensor's), and still bit for bit."""
    z = torch.randn(64, dtype=torch.complex64)
    assert _edits._same_bytes(z.conj(), z.conj().resolve_conj()) is None
    assert bitwise_equal(z.conj(), z.conj().resolve_conj())
    assert not bitwise_equal(z.conj(), z)
    m = torch.randn(8, 8)
    assert _edits._same_bytes(m.t(), m.t().contiguous()) is None
    assert bitwise_equal(m.t(), m.t().contiguous())
    flipped = m.t().contiguous()
    flipped[7, 0] = -flipped[7, 0]
    assert not bitwise_equal(m.t(), flipped)


@pytest.mark.parametrize("numel", [4, SMALL + 1], ids=["joined", "alone"])
def test_edited_among_finds_exactly_the_edited(numel: int) -> None:
    gen = torch.Generator().manual_seed(0)
    params = {str(i): torch.nn.Parameter(torch.randn(numel, generator=gen)) for i in range(6)}
    params["6"] = torch.nn.Parameter(torch.randn(numel, generator=gen).double())
    params["3"].data[0] = float("nan")
    refs = References()
    refs.snapshot(params.items())
    assert refs.edited_among(params, set()) == set()
    params["1"].data.clamp_(-0.01, 0.01)  # through .data: the version counter stays
    params["3"].data[0] = float("nan")  # the same NaN again: no edit
    params["4"].data[1] = -params["4"].data[1]
    params["5"].data = params["5"].data.clone()  # a new tensor of the same values: no edit
    params["6"].data[-1] += 1
    assert refs.edited_among(params, set()) == {"1", "4", "6"}
    params["2"].data = params["2"].data.float().reshape(1, numel)[:, :-1]  # fewer values
    assert refs.edited_among(params, set()) == {"1", "2", "4", "6"}
    refs.snapshot(params.items())
    assert refs.edited_among(params, set()) == set()


def test_answer_tensors_serve_as_references_and_copies_are_reused() -> None:
    small = torch.nn.Parameter(torch.randn(8))
    refs = References()
    assert not refs.usable(small, small.detach().clone())  # copied into a copy: cheaper
    p = torch.nn.Parameter(torch.randn(SMALL + 8))
    refs.snapshot([("p", p)])
    owned = refs._refs["p"]
    assert owned.data_ptr() != p.data_ptr()
    p.data.add_(1.0)
    refs.snapshot([("p", p)])  # copied into the copy it keeps
    assert refs._refs["p"] is owned and torch.equal(owned, p.detach())
    answer = torch.randn(SMALL + 8)
    assert refs.usable(p, answer)
    assert not refs.usable(p, answer.double())
    assert not refs.usable(p, p.data)  # (the parameter's own memory: zero_copy)
    with torch.no_grad():
        p.copy_(answer)
    refs.adopt("p", answer)
    assert refs._refs["p"] is answer and refs.edited_among({"p": p}, set()) == set()
    # an answer that left "p" out (its memory then overwritten): a copy of p, as it was
    refs.settle([("p", p)], answered=[])
    assert refs._refs["p"] is not answer and refs.edited_among({"p": p}, set()) == set()
    answer.zero_()
    assert refs.edited_among({"p": p}, set()) == set()


def test_rows_update_the_kept_copy() -> None:
    table = torch.nn.Parameter(torch.randn(10, 3))
    refs = References()
    refs.snapshot([("t", table)])
    rows, values = torch.tensor([2, 7]), torch.randn(2, 3)
    with torch.no_grad():
        table.index_copy_(0, rows, values)
    refs.rows("t", table, rows, values)
    assert refs.edited_among({"t": table}, set()) == set()


def test_skipped_parameters_are_not_compared_and_the_plan_follows_new_references() -> None:
    params = {str(i): torch.nn.Parameter(torch.randn(4)) for i in range(5)}
    refs = References()
    refs.snapshot(params.items())
    assert refs.edited_among(params, set()) == set()  # (the plan is made here)
    params["2"].data.add_(1.0)
    assert refs.edited_among(params, {"2"}) == set()
    assert refs.edited_among(params, set()) == {"2"}
    # a new reference of one of them (a new copy, of the edited values): the plan is made
    # again with it
    refs._owned.discard("2")
    refs.snapshot([("2", params["2"])])
    assert refs.edited_among(params, set()) == set()
    params["0"].data = params["0"].data.double()  # another dtype, the same numbers
    assert refs.edited_among(params, set()) == {"0"}
