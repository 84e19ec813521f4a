"""The engine interface: plain data and CPU tensors in and out, no state outside it.

The embedded engine (one worker thread per device, in-process) implements it; a later engine
may place each session in a remote actor behind the same HTTP front, so callers must not
assume the session lives in their process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

NonFinitePolicy = Literal["reject", "skip", "allow"]
Durability = Literal["step", "interval", "memory"]
Tensors = dict[str, torch.Tensor]


@dataclass
class GroupSpec:
    """One param group: named CPU tensors plus the group's own options (JSON values)."""

    params: Tensors
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CreateSpec:
    optimizer: str
    groups: list[GroupSpec]
    options: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    id: str | None = None
    nonfinite: NonFinitePolicy | None = None
    durability: Durability | None = None
    #: parameter-server options (``sync``, ``max_staleness``, ``staleness_lr``), as JSON values
    ps_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    version: int
    step: int
    lr: list[float]
    skipped: bool = False
    nonfinite: list[str] = field(default_factory=list)
    params: Tensors | None = None
    #: sync rounds: ``{"workers": [ids that contributed], "expected": K, "partial": bool}``
    sync: dict[str, Any] | None = None
    #: async pushes that named their base version: how many versions old they were
    staleness: int | None = None


@dataclass
class ParamsResult:
    version: int
    step: int
    lr: list[float]
    params: Tensors
    #: the caller already holds this version (``If-None-Match``): ``params`` is empty
    not_modified: bool = False


class Engine(Protocol):
    device: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def ready(self) -> bool: ...
    def session_count(self) -> int: ...
    def memory_bytes(self) -> int: ...

    async def create(self, spec: CreateSpec, *, tenant: str = ...) -> dict[str, Any]: ...
    async def describe(self, session_id: str, *, tenant: str = ...) -> dict[str, Any]: ...
    async def list_sessions(self, *, tenant: str = ...) -> list[dict[str, Any]]: ...
    async def delete(self, session_id: str, *, tenant: str = ...) -> None: ...

    async def step(
        self, session_id: str, grads: Tensors, *, return_params: bool,
        worker: str | None = ..., base_version: int | None = ..., tenant: str = ...,
    ) -> StepResult: ...
    async def configure(
        self, session_id: str, options: dict[str, Any], *, tenant: str = ...
    ) -> dict[str, Any]: ...
    async def push(
        self, session_id: str, grads: Tensors, *, tenant: str = ...
    ) -> dict[str, Any]: ...
    async def zero_grad(self, session_id: str, *, tenant: str = ...) -> dict[str, Any]: ...
    async def pull(
        self, session_id: str, names: list[str] | None, *, min_version: int | None = ...,
        wait_s: float = ..., unless_versions: frozenset[int] = ..., tenant: str = ...,
    ) -> ParamsResult: ...
    async def overwrite(
        self, session_id: str, params: Tensors, *, tenant: str = ...
    ) -> ParamsResult: ...

    async def add_param_group(
        self, session_id: str, group: GroupSpec, *, tenant: str = ...
    ) -> dict[str, Any]: ...
    async def update_param_group(
        self, session_id: str, index: int, options: dict[str, Any], *, tenant: str = ...
    ) -> dict[str, Any]: ...
    async def scheduler_step(
        self, session_id: str, metric: float | None, *, tenant: str = ...
    ) -> dict[str, Any]: ...

    async def export_state(self, session_id: str, *, tenant: str = ...) -> dict[str, Any]: ...
    async def import_state(
        self, session_id: str, state: dict[str, Any], *, tenant: str = ...
    ) -> dict[str, Any]: ...
