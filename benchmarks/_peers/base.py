"""The interface every benchmarked system implements, and the registry of systems.

A system lives in a process of its own (``proc.py``). The driver calls, in that process:

    start()                      once: start servers, clusters, connections
    setup(case)                  per (optimizer, N): fresh parameters and optimizer state
    step() ... step()            timed, one call = one optimizer step as the worker sees it:
                                 send gradient i (i counts from 0 after setup), get the
                                 updated parameters back in a usable form
    params() / self_check()      after the timed steps: the bitwise check
    teardown()                   end of the case
    stop()                       once, at the end

Adding a system: subclass ``System`` (or ``GradSystem``), give it a ``name``, decorate it with
``@register`` in a module that ``systems.py`` imports. ``check`` says how the driver verifies
it; ``per_durability`` makes one instance per ``--durability`` level.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import torch

from benchmarks._peers.cases import GRAD_TRANSFORMS, Case


@dataclass(frozen=True)
class RunConfig:
    """Settings every system process gets."""

    data_dir: str  # root for servers' data directories and the disk probe
    json_max_n: int  # optserve-json skips larger N
    peer_heap_reuse: bool = False  # apply optserve's mallopt tuning in the peers' servers too
    #: TensorPipe transports and channels for torch-rpc (None: TensorPipe's default). "uv"
    #: (TCP) by default: TensorPipe's default picks its shm transport on one host, whose
    #: reactor busy-polls (about 0.7 of a core per process, idle or not), which would slow
    #: every other system in an interleaved run; torch-rpc-shm measures it on request.
    rpc_transports: tuple[str, ...] | None = ("uv",)
    rpc_channels: tuple[str, ...] | None = None
    #: more ``OPTSERVE_*`` settings for every optserve server (``--server-env``; none: the
    #: server's defaults, as a user's ``scripts/serve`` with only the run's settings)
    server_env: tuple[tuple[str, str], ...] = ()


class System(ABC):
    name: ClassVar[str]
    #: "replay": final params compared bitwise with in-process torch; "self": the system checks
    #: itself (echo: the bytes came back unchanged); "none"
    check: ClassVar[Literal["replay", "self", "none"]] = "replay"
    #: one instance per --durability level (optserve's servers), named "name[level]"
    per_durability: ClassVar[bool] = False
    #: what the wire does to gradients (a key of cases.GRAD_TRANSFORMS), for the replay
    grad_transform: ClassVar[str] = "none"
    #: a module that must be importable, and how to get it
    requires: ClassVar[str | None] = None
    install_hint: ClassVar[str] = ""

    def __init__(self, config: RunConfig, durability: str | None = None) -> None:
        self.config = config
        self.durability = durability

    @classmethod
    def supports(cls, case: Case, config: RunConfig) -> bool:
        return True

    def start(self) -> dict[str, Any]:
        """Start whatever the system needs; returns facts for the report's header."""
        return {}

    @abstractmethod
    def setup(self, case: Case) -> None: ...

    @abstractmethod
    def step(self) -> None: ...

    def params(self) -> npt.NDArray[np.float32]:
        raise NotImplementedError(f"{self.name} is not checked by replay")

    def self_check(self) -> str | None:
        """None when fine, else what is wrong (for ``check = "self"``)."""
        return None

    def info(self) -> dict[str, Any]:
        """Facts learned while stepping (e.g. torch threads where the step ran)."""
        return {}

    def teardown(self) -> None:
        return None

    def stop(self) -> None:
        return None


class GradSystem(System):
    """A system fed the case's gradient cycle: ``self.grads`` (torch, after the transform),
    ``self.index`` (the gradient for this step), ``self.steps`` (steps since setup)."""

    def setup(self, case: Case) -> None:
        self.case = case
        transform = GRAD_TRANSFORMS[self.grad_transform]
        self.grads = [transform(g) for g in case.grads()]
        self.steps = 0
        self.prepare(case, case.initial_params())

    @abstractmethod
    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        """Per case: make the optimizer (or session, actor, ...) over ``initial``."""

    @abstractmethod
    def exchange(self, grad_index: int) -> None:
        """Send ``self.grads[grad_index]``, keep the updated parameters."""

    def step(self) -> None:
        self.exchange(self.steps % len(self.grads))
        self.steps += 1


REGISTRY: dict[str, type[System]] = {}


def register(cls: type[System]) -> type[System]:
    if cls.name in REGISTRY:
        raise ValueError(f"system {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def instance_id(name: str, durability: str | None) -> str:
    return f"{name}[{durability}]" if durability else name
