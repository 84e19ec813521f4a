"""Groups of many small parameters stepped through torch's foreach twin of the optimizer
(``app.engine.foreach_steps``) end bitwise where torch's own for-loop ends, on this machine:
parameters and state_dicts, over steps whose lr changes, float32 and float64 together. The
twin really runs where it may; it does not where it may not (a gradient it would change in
place, a tensor lr, a group the client set, too few parameters, a chunked parameter, an
optimizer outside ``SAME_CALLS``), and no group keeps ``foreach=True`` after the step."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from app.engine import chunked, foreach_steps
from tests.torch_reference import assert_tensors_equal, assert_trees_equal

CASES = [
    ("Adam", {"lr": 1e-3}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "maximize": True, "weight_decay": 0.05, "betas": (0.8, 0.9)}),
    ("Adam", {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.1, "eps": 1e-6}),
    ("AdamW", {"lr": 1e-3}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "maximize": True, "nesterov": True}),
    ("RMSprop", {"lr": 1e-2}),
    ("RMSprop", {"lr": 1e-2, "centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 1e-2, "maximize": True, "momentum": 0.9, "alpha": 0.9}),
    ("Adamax", {"lr": 2e-3}),
    ("Adamax", {"lr": 2e-2, "weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.95)}),
    ("Adadelta", {"lr": 1.0}),
    ("Adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1}),
    ("Adadelta", {"lr": 0.5, "maximize": True, "weight_decay": 0.05}),
    ("Adadelta", {"lr": 0.5, "maximize": True}),
    ("Rprop", {"lr": 1e-2}),
    ("Rprop", {"lr": 1e-1, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.05)}),
    ("Rprop", {"lr": 1e-2, "maximize": True}),
]
SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 300]


@pytest.fixture
def multi(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the optimizers whose ``_multi_tensor_*`` ran on the test's groups (not
    the probe's few tensors)."""
    ran: list[str] = []
    for path, fn in (("torch.optim.adam", "_multi_tensor_adam"),
                     ("torch.optim.sgd", "_multi_tensor_sgd"),
                     ("torch.optim.rmsprop", "_multi_tensor_rmsprop"),
                     ("torch.optim.adamax", "_multi_tensor_adamax"),
                     ("torch.optim.adagrad", "_multi_tensor_adagrad"),
                     ("torch.optim.adadelta", "_multi_tensor_adadelta"),
                     ("torch.optim.rprop", "_multi_tensor_rprop")):
        module = importlib.import_module(path)
        real = getattr(module, fn)

        def spy(*args: Any, _real: Any = real, _fn: str = fn, **kwargs: Any) -> Any:
            if len(args[0]) >= foreach_steps.SMALLEST_GROUP:
                ran.append(_fn)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, fn, spy)
    yield ran
    foreach_steps.configure(foreach_steps.SMALLEST_GROUP)


def named(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(i): t for i, t in enumerate(tensors)}


def _params(seed: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SIZES[i % len(SIZES)], generator=gen, dtype=torch.float64)
            .to(torch.float32 if i % 3 else torch.float64) for i in range(n)]


def _run(name: str, kwargs: dict[str, Any], switch: bool, n: int = 40, steps: int = 7,
         group_extra: dict[str, Any] | None = None
         ) -> tuple[list[torch.Tensor], dict[str, Any], list[torch.Tensor]]:
    """Params, state_dict and the last step's gradients (as left by the step) after
    ``steps`` steps, through ``foreach_steps.switched`` or plainly."""
    params = _params(0, n)
    opt = getattr(torch.optim, name)([{"params": params, **(group_extra or {})}],
                                     **copy.deepcopy(kwargs))
    gen = torch.Generator().manual_seed(1)
    grads: list[torch.Tensor] = []
    for k in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                 for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.param_groups[0]["lr"] = kwargs["lr"] * (1 + 0.1 * k)  # (a scheduler's way)
        if switch:
            with foreach_steps.switched(opt, name):
                opt.step()
        else:
            opt.step()
        assert opt.param_groups[0].get("foreach") is (group_extra or {}).get("foreach", None)
    return params, opt.state_dict(), grads


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda v: str(v))
def test_switched_groups_end_bitwise_where_the_loop_ends(multi: list[str], name: str,
                                                         kwargs: dict[str, Any]) -> None:
    want, want_sd, want_grads = _run(name, kwargs, switch=False)
    assert multi == []
    got, got_sd, got_grads = _run(name, kwargs, switch=True)
    assert_tensors_equal(named(got), named(want), f"{name} {kwargs}")
    assert_trees_equal(got_sd, want_sd, f"{name} {kwargs} state_dict")
    assert_tensors_equal(named(got_grads), named(want_grads), "grads")
    # the twin ran at every step, except where it would add into the gradients in place
    in_place = kwargs.get("nesterov") and not (kwargs.get("weight_decay")
                                               or kwargs.get("maximize"))
    assert len(multi) == (0 if in_place else 7), multi


def test_nesterov_sgd_adding_into_its_gradients_is_not_switched(multi: list[str]) -> None:
    kwargs = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    got, _, grads = _run("SGD", kwargs, switch=True)
    assert multi == []
    want, _, want_grads = _run("SGD", kwargs, switch=False)
    assert_tensors_equal(named(got), named(want), "params")
    assert_tensors_equal(named(grads), named(want_grads), "grads")


@pytest.mark.parametrize(("why", "name", "kwargs", "n", "extra"), [
    ("too few parameters", "Adam", {"lr": 1e-3}, foreach_steps.SMALLEST_GROUP - 1, None),
    ("foreach set by the client", "Adam", {"lr": 1e-3}, 40, {"foreach": False}),
    ("a tensor lr", "Adam", {"lr": 1e-3}, 40, {"betas": (0.9, torch.tensor(0.99))}),
    ("an optimizer whose twin rounds otherwise", "NAdam", {"lr": 1e-3}, 40, None),
    ("a twin that divides in another order (not in SAME_CALLS)", "Adagrad", {"lr": 1e-2}, 40,
     None),
])
def test_groups_that_may_not_switch_step_as_ever(multi: list[str], why: str, name: str,
                                                 kwargs: dict[str, Any], n: int,
                                                 extra: dict[str, Any] | None) -> None:
    params = _params(0, n)
    opt = getattr(torch.optim, name)([{"params": params, **(extra or {})}], **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    assert foreach_steps._switchable(opt, name, []) == [], why
    with foreach_steps.switched(opt, name):
        opt.step()
    assert multi == [], why


def test_a_group_with_a_chunked_parameter_is_not_switched(multi: list[str]) -> None:
    """Its chunks step one after the other, each with its own state: a foreach call over all
    of them would lose what chunks are for (a chunk's passes while it is in the cache)."""
    chunked.configure(5, smallest=6)
    try:
        params = [torch.randn(30), *(torch.randn(3) for _ in range(40))]
        other = [torch.randn(3) for _ in range(40)]
        opt = torch.optim.Adam([{"params": params}, {"params": other}], lr=1e-3)
        for p in [*params, *other]:
            p.grad = torch.ones_like(p)
        opt.step()  # (state for all)
        splits = chunked.plan(opt, "Adam")
        assert len(splits) == 1 and splits[0].param is params[0]
        assert foreach_steps._switchable(opt, "Adam", splits) == [opt.param_groups[1]]
    finally:
        chunked.configure(chunked.DEFAULT_CHUNK)


def test_the_probe_finds_nadams_twin_rounding_otherwise() -> None:
    """Outside SAME_CALLS a probe is not trusted alone (it agrees for a few steps), but over
    more steps it does find the difference: what the guard is for."""
    opt = torch.optim.NAdam([torch.zeros(1)], lr=1e-3)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    saved = foreach_steps._PROBE_STEPS
    try:
        foreach_steps._PROBE_STEPS = 12
        assert not foreach_steps._probe(torch.optim.NAdam, group, (torch.float32,))
        assert foreach_steps._probe(torch.optim.Adam, {k: v for k, v in torch.optim.Adam(
            [torch.zeros(1)]).param_groups[0].items() if k != "params"}, (torch.float32,))
    finally:
        foreach_steps._PROBE_STEPS = saved


def test_a_parameter_replaced_in_a_group_is_checked_again(multi: list[str]) -> None:
    """The group's tensors are checked once, and again when one is replaced: a float16
    parameter put in a switched group's list turns the switch off."""
    params = _params(0, 40)
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    assert foreach_steps._switchable(opt, "Adam", []) == [opt.param_groups[0]]
    half = torch.zeros(3, dtype=torch.float16)
    half.grad = torch.ones_like(half)
    opt.param_groups[0]["params"][5] = half
    assert foreach_steps._switchable(opt, "Adam", []) == []


@pytest.mark.parametrize(("name", "kwargs"), [
    ("Rprop", {"lr": 1e-2, "maximize": True}), ("Rprop", {"lr": 1e-2}),
    ("Adadelta", {"lr": 0.5, "maximize": True, "weight_decay": 0.1}),
], ids=str)
def test_non_finite_gradients_end_bitwise_where_the_loop_ends(multi: list[str], name: str,
                                                              kwargs: dict[str, Any]) -> None:
    """A session that lets non-finite gradients through (``nonfinite: allow``): NaNs of
    either sign and infinities, some steps, NaN bits included (Rprop's twin negates the
    product of the gradient and the previous one where the loop negates the gradient)."""
    def run(switch: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
        params = _params(0, 40)
        opt = getattr(torch.optim, name)(params, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            for p in params:
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                pick = torch.rand(p.shape, generator=gen)
                g[pick < 0.1] = float("nan")
                g[(pick >= 0.1) & (pick < 0.2)] = -float("nan")
                g[(pick >= 0.2) & (pick < 0.25)] = float("inf")
                p.grad = g
            if switch:
                with foreach_steps.switched(opt, name):
                    opt.step()
            else:
                opt.step()
        return params, opt.state_dict()

    want, want_sd = run(False)
    got, got_sd = run(True)
    assert len(multi) == 5
    assert_tensors_equal(named(got), named(want), name)  # (bit for bit, NaNs too)
    assert_trees_equal(got_sd, want_sd, f"{name} state_dict")
