"""The floor: a torch optimizer step in the worker's own process, with the default glibc
allocator and with the heap reuse optserve's server applies (``app.runtime.tune_allocator``:
mallopt raises the mmap and trim thresholds so large temporaries are reused, not returned to
the OS each step)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from app.runtime import tune_allocator
from benchmarks._peers.base import GradSystem, register
from benchmarks._peers.cases import Case


@register
class InProcess(GradSystem):
    name = "in-process"

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        self.p = initial
        self.opt = case.make_optimizer([self.p])

    def exchange(self, grad_index: int) -> None:
        self.p.grad = self.grads[grad_index]
        self.opt.step()

    def params(self) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self.p.detach().numpy().copy()
        return out

    def info(self) -> dict[str, Any]:
        return {"step_threads": torch.get_num_threads()}


@register
class InProcessHeapReuse(InProcess):
    name = "in-process-heap"

    def start(self) -> dict[str, Any]:
        tune_allocator()
        return {"allocator": "app.runtime.tune_allocator (mallopt)"}
