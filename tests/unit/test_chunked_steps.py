"""Large parameters stepped chunk by chunk (``app.engine.chunked``) equal torch's whole step,
bitwise, on this machine: every elementwise optimizer config in torch's own ``optim_db``, over
several steps (the first whole, as torch makes the state there; one leaving a parameter out;
an lr changed between steps), with chunks of odd sizes that put elements in the kernels'
scalar tails, and the optimizers' state_dicts equal too (same keys in the same order)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

from app.engine import chunked
from tests.torch_reference import assert_tensors_equal, assert_trees_equal

SHAPES = {"w": (23, 17), "b": (29,), "s": (3,)}


def _configs() -> list[Any]:
    out = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in chunked.ELEMENTWISE:
            continue
        for i, oi in enumerate(info.optim_inputs_func("cpu", torch.float32)):
            out.append(pytest.param(info.optim_cls, dict(oi.kwargs), id=f"{name}-{i}-{oi.desc}"))
    return out


@pytest.fixture
def chunk_size() -> Iterator[None]:
    yield
    chunked.configure(chunked.DEFAULT_CHUNK)


def _params(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def _run(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], chunk: int,
         shapes: dict[str, tuple[int, ...]], steps: int = 5,
         dtype: torch.dtype = torch.float32
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Params and state_dict after ``steps`` steps through :func:`chunked.step` with chunks
    of ``chunk`` elements (0: whole), and how many steps were split."""
    chunked.configure(chunk, smallest=0)
    params = {n: t.to(dtype) for n, t in _params(0, shapes).items()}
    names = list(params)
    opt = cls([{"params": [params[n] for n in names[:2]]},
               {"params": [params[n] for n in names[2:]], "lr": 0.05}],
              **copy.deepcopy(kwargs))
    gen = torch.Generator().manual_seed(1)
    split = 0
    for k in range(steps):
        for n, p in params.items():
            p.grad = (None if (k == 2 and n == "w")
                      else torch.randn(p.shape, generator=gen).to(dtype))
        if k == 3:
            for group in opt.param_groups:
                lr = group["lr"]
                group["lr"] = lr * 0.5 if not isinstance(lr, torch.Tensor) else lr * 0.5
        split += bool(chunked._plan(opt, cls.__name__, chunk, 0))
        with torch.no_grad():
            chunked.step(opt, cls.__name__)
        assert {id(t) for t in opt.state} <= {id(p) for p in params.values()}, \
            "a chunk's state stayed behind"
    return params, opt.state_dict(), split


@pytest.mark.parametrize(("cls", "kwargs"), _configs())
def test_chunked_steps_equal_the_whole_step(chunk_size: None, cls: type[torch.optim.Optimizer],
                                            kwargs: dict[str, Any]) -> None:
    whole, whole_sd, _ = _run(cls, kwargs, 0, SHAPES)
    for chunk in (7, 64, 100):
        got, got_sd, split = _run(cls, kwargs, chunk, SHAPES)
        chunkable = not (kwargs.get("foreach") or kwargs.get("fused"))
        if chunkable:
            assert split >= 4, f"chunk {chunk}: only {split} steps were split"
        assert_tensors_equal(got, whole, f"chunk {chunk}")
        assert_trees_equal(got_sd, whole_sd, f"chunk {chunk}")
        assert list(got_sd["state"]) == list(whole_sd["state"]), f"chunk {chunk}: state order"
        for i, entry in whole_sd["state"].items():
            assert list(got_sd["state"][i]) == list(entry), f"chunk {chunk}: key order"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_chunks_split_across_threads_equal_the_whole_step(chunk_size: None, name: str,
                                                          dtype: torch.dtype) -> None:
    """Chunks larger than torch's grain size (32,768), so that each is split across two
    threads at other places than the whole tensor is. float16 and bfloat16 parameters are
    not chunked: their kernels' scalar tails round otherwise than their vectorised bodies
    (chunked, SGD's ``add_`` gave other bits in some elements)."""
    kwargs = {"SGD": {"lr": 0.01, "momentum": 0.9}}.get(name, {"lr": 1e-3})
    cls = getattr(torch.optim, name)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shapes = {"w": (100_003,), "b": (5,), "s": (40_001,)}
        whole, whole_sd, _ = _run(cls, kwargs, 0, shapes, steps=4, dtype=dtype)
        got, got_sd, split = _run(cls, kwargs, 40_001, shapes, steps=4, dtype=dtype)
    finally:
        torch.set_num_threads(threads)
    # steps 1, 2 and 4 (the first makes the state chunk by chunk; the third leaves w out)
    assert split == (3 if dtype in chunked.EXACT_DTYPES else 0)
    assert_tensors_equal(got, whole)  # bitwise (float16 Adam makes NaNs: eps is 0 there)
    assert_trees_equal(got_sd, whole_sd)


def test_what_is_not_chunked(chunk_size: None) -> None:
    """The whole step where chunks would not give torch's values or gain nothing: another
    optimizer, foreach, a first step (no state yet), a sparse gradient; a chunk size of 0."""
    p = torch.randn(50)
    for cls, kwargs in ((torch.optim.Adafactor, {}), (torch.optim.Adam, {"foreach": True})):
        opt = cls([p], **kwargs)
        p.grad = torch.randn(50)
        opt.step()
        assert chunked._plan(opt, cls.__name__, 7) == []
    opt = torch.optim.Adam([p])
    p.grad = torch.randn(50)
    assert [sp.fresh for sp in chunked._plan(opt, "Adam", 7)] == [True]  # no state yet
    opt.step()
    assert [sp.fresh for sp in chunked._plan(opt, "Adam", 7)] == [False]
    assert chunked._plan(opt, "Adam", 0) == []
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(50)
    sgd.step()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([1.0]), (50,),
                                    check_invariants=True)
    assert chunked._plan(sgd, "SGD", 7) == []


def test_only_parameters_of_several_chunks_are_chunked(chunk_size: None) -> None:
    """At the defaults, a parameter is chunked from SMALLEST_IN_CHUNKS chunks on."""
    chunked.configure(chunked.DEFAULT_CHUNK)
    smallest = chunked.SMALLEST_IN_CHUNKS * chunked.DEFAULT_CHUNK
    big, small = torch.zeros(smallest), torch.zeros(smallest - 1)
    opt = torch.optim.Adam([big, small])
    big.grad, small.grad = torch.ones(smallest), torch.ones(smallest - 1)
    opt.step()
    splits = chunked._plan(opt, "Adam", chunked.DEFAULT_CHUNK, smallest)
    assert [sp.param is big for sp in splits] == [True]
    assert len(splits[0].views) == chunked.SMALLEST_IN_CHUNKS


def test_the_first_step_of_a_large_parameter_makes_its_state_chunk_by_chunk(
        chunk_size: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step that makes a large parameter's state runs one chunk per ``optimizer.step()``
    and joins the chunks' state into whole tensors (the same keys and bits as torch's, by
    the tests above); the heap is trimmed once the answer is out (``after_job``), and not
    after the steps that follow."""
    queued: list[object] = []
    monkeypatch.setattr(chunked, "after_job", lambda fn: queued.append(fn) or True)
    chunked.configure(7, smallest=0)
    p = torch.randn(50)
    opt = torch.optim.Adam([p])
    for _ in range(3):
        p.grad = torch.randn(50)
        chunked.step(opt, "Adam")
    assert queued == [chunked.release_memory]


def test_a_nan_scalar_state_steps_as_torch_does(chunk_size: None) -> None:
    """NaN in a 0-dim state (NAdam's ``mu_product``, imported under ``nonfinite: allow``) is
    the same in every chunk: the chunked step runs, as torch's whole step does."""
    results = []
    for chunk in (0, 7):
        chunked.configure(chunk, smallest=0)
        p = torch.randn(50, generator=torch.Generator().manual_seed(3))
        opt = torch.optim.NAdam([p])
        p.grad = torch.ones(50)
        opt.step()
        opt.state[p]["mu_product"].fill_(float("nan"))
        p.grad = torch.ones(50)
        assert bool(chunked._plan(opt, "NAdam", chunk, 0)) == (chunk > 0)
        chunked.step(opt, "NAdam")
        results.append((p, opt.state_dict()))
    (whole, whole_sd), (got, got_sd) = results
    assert torch.equal(got.view(torch.int32), whole.view(torch.int32))
    assert_trees_equal(got_sd, whole_sd)


@pytest.mark.parametrize(("kwargs", "trims"), [({"lr": 0.1}, 0),
                                               ({"lr": 0.1, "weight_decay": 0.01}, 0),
                                               ({"lr": 0.1, "momentum": 0.9}, 1)])
def test_the_heap_is_trimmed_only_after_a_step_that_made_state(
        chunk_size: None, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, float],
        trims: int) -> None:
    """SGD without momentum never makes state: its whole steps queue no trim."""
    queued: list[object] = []
    monkeypatch.setattr(chunked, "after_job", lambda fn: queued.append(fn) or True)
    chunked.configure(7, smallest=0)
    p = torch.randn(50)
    opt = torch.optim.SGD([p], **kwargs)
    for _ in range(4):
        p.grad = torch.randn(50)
        chunked.step(opt, "SGD")
    assert len(queued) == trims
