"""The embedded engine: sessions in this process, one worker thread per device."""

from __future__ import annotations

import uuid
from typing import Any

import torch

from app.engine.interface import (
    CreateSpec,
    GroupSpec,
    NonFinitePolicy,
    ParamsResult,
    StepResult,
    Tensors,
)
from app.engine.session import Session, check_session_id
from app.engine.worker import DeviceWorker
from app.errors import Conflict, NotFound


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"OPTSERVE_DEVICE={setting} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"OPTSERVE_DEVICE={setting}: only auto, cpu, cuda, cuda:N")
    return device


class EmbeddedEngine:
    def __init__(
        self, device: str = "auto", torch_threads: int = 0,
        default_nonfinite: NonFinitePolicy = "reject",
    ) -> None:
        self._device = resolve_device(device)
        self.device = str(self._device)
        self._worker = DeviceWorker(self._device, torch_threads)
        self._sessions: dict[str, Session] = {}
        self._default_nonfinite: NonFinitePolicy = default_nonfinite

    async def start(self) -> None:
        self._worker.start()

    async def stop(self) -> None:
        self._worker.stop()

    def ready(self) -> bool:
        return self._worker.alive()

    def _get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r:.140}", code="session_not_found",
                           field="session_id")
        return session

    # All of the below run on the worker thread, in submission order.
    async def create(self, spec: CreateSpec) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            session_id = check_session_id(spec.id) if spec.id is not None else uuid.uuid4().hex
            if session_id in self._sessions:
                raise Conflict(f"a session with id {session_id!r} already exists",
                               code="session_exists", field="id")
            nonfinite = spec.nonfinite or self._default_nonfinite
            session = Session.create(session_id, spec.optimizer, spec.groups, spec.options,
                                     spec.scheduler, nonfinite, self._device)
            self._sessions[session_id] = session
            return session.describe()
        return await self._worker.run(op)

    async def describe(self, session_id: str) -> dict[str, Any]:
        return await self._worker.run(lambda: self._get(session_id).describe())

    async def list_sessions(self) -> list[dict[str, Any]]:
        return await self._worker.run(lambda: [s.describe() for s in self._sessions.values()])

    async def delete(self, session_id: str) -> None:
        def op() -> None:
            self._get(session_id)
            del self._sessions[session_id]
        await self._worker.run(op)

    async def step(self, session_id: str, grads: Tensors, *, return_params: bool) -> StepResult:
        return await self._worker.run(lambda: self._get(session_id).step(grads, return_params))

    async def push(self, session_id: str, grads: Tensors) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            s.push(grads)
            return {"version": s.version, "step": s.step_count, "accumulated": sorted(s.accum)}
        return await self._worker.run(op)

    async def zero_grad(self, session_id: str) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            s.zero_grad()
            return {"version": s.version, "step": s.step_count, "accumulated": []}
        return await self._worker.run(op)

    async def pull(self, session_id: str, names: list[str] | None) -> ParamsResult:
        return await self._worker.run(lambda: self._get(session_id).pull(names))

    async def overwrite(self, session_id: str, params: Tensors) -> ParamsResult:
        return await self._worker.run(lambda: self._get(session_id).overwrite(params))

    async def add_param_group(self, session_id: str, group: GroupSpec) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            s.add_param_group(group)
            return s.describe()
        return await self._worker.run(op)

    async def update_param_group(
        self, session_id: str, index: int, options: dict[str, Any]
    ) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            s.update_param_group(index, options)
            return s.describe()
        return await self._worker.run(op)

    async def scheduler_step(self, session_id: str, metric: float | None) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            s.scheduler_step(metric)
            return {"version": s.version, "step": s.step_count, "lr": s.lrs(),
                    "last_epoch": getattr(s.scheduler, "last_epoch", None)}
        return await self._worker.run(op)

    async def export_state(self, session_id: str) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            return {"state_dict": s.export_state(), "version": s.version, "step": s.step_count}
        return await self._worker.run(op)

    async def import_state(self, session_id: str, state: dict[str, Any]) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            s = self._get(session_id)
            s.import_state(state)
            return s.describe()
        return await self._worker.run(op)
