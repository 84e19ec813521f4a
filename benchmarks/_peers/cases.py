"""What every system computes: one float32 parameter tensor of N elements, a torch optimizer,
and a fixed cycle of seeded gradients (step i uses gradient ``i % K``). The reference is the
same steps replayed with in-process torch; every system's final parameters must equal it
bitwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # torch.optim class name
    options: dict[str, Any]


#: label -> optimizer; labels are the table's row names
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "Adam": OptimizerSpec("Adam", {"lr": 1e-3}),
    "SGD-momentum": OptimizerSpec("SGD", {"lr": 0.01, "momentum": 0.9}),
}

#: what a transport does to a gradient before the optimizer sees it (a lossy wire format must
#: name its rounding here so the reference replays the same values)
GRAD_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda g: g,
    "bf16": lambda g: g.to(torch.bfloat16).to(torch.float32),
}

_CYCLE_BYTES = 64 * 1024 * 1024  # keep at most this much distinct gradient data per process


@dataclass(frozen=True)
class Case:
    optimizer: str  # a key of OPTIMIZERS
    n: int
    seed: int = 0

    @property
    def spec(self) -> OptimizerSpec:
        return OPTIMIZERS[self.optimizer]

    @property
    def grad_count(self) -> int:
        """Distinct gradients in the cycle: 3, or 2 when 3 would hold more than 64 MB."""
        return 3 if 3 * 4 * self.n <= _CYCLE_BYTES else 2

    def initial_params(self) -> torch.Tensor:
        return torch.randn(self.n, generator=torch.Generator().manual_seed(self.seed))

    def grads(self) -> list[torch.Tensor]:
        return [torch.randn(self.n, generator=torch.Generator().manual_seed(self.seed + 1 + j))
                for j in range(self.grad_count)]

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        cls = getattr(torch.optim, self.spec.name)
        opt: torch.optim.Optimizer = cls(params, **self.spec.options)
        return opt


def fmt_n(n: int) -> str:
    """1000 -> "1e3" (the tables' N)."""
    mantissa, exp = f"{n:.0e}".split("e")
    short = f"{mantissa}e{int(exp)}"
    return short if float(short) == n else str(n)


def replay(case: Case, steps: int, transform: str = "none") -> npt.NDArray[np.float32]:
    """The parameters after ``steps`` in-process steps of ``case``."""
    p = case.initial_params()
    opt = case.make_optimizer([p])
    grads = [GRAD_TRANSFORMS[transform](g) for g in case.grads()]
    for i in range(steps):
        p.grad = grads[i % len(grads)]
        opt.step()
    out: npt.NDArray[np.float32] = p.detach().numpy().copy()
    return out


def bitwise_diff(got: npt.NDArray[Any], want: npt.NDArray[np.float32]) -> str | None:
    """None when ``got`` is bitwise ``want``; otherwise what differs."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    differ = got.view(np.uint32) != want.view(np.uint32)
    count = int(differ.sum())
    if count == 0:
        return None
    idx = int(np.flatnonzero(differ)[0])
    return (f"{count} of {want.size} elements differ (first at {idx}: {got[idx]!r} vs "
            f"{want[idx]!r})")
