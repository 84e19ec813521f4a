"""The front: what every engine shares above its session hosts — tenancy (a session key is
``tenant~id``), per-tenant limits, readiness — and nothing of where a session lives. It speaks
to a host only with operation values and plain results.

Sync rounds and long polls are kept by the host that holds the session (so workers of one
round may talk to different fronts of one cluster).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.history import HistoryQuery, HistoryResult, downsample
from app.engine.host import EmbeddedHost
from app.engine.interface import (
    CreateSpec,
    EngineStatus,
    Evaluation,
    EvaluationRequest,
    GradsResult,
    GroupSpec,
    IdemKey,
    ParamsResult,
    ReturnParams,
    SchedulerResult,
    SessionInfo,
    StateExport,
    StepResult,
    Tensors,
    session_key,
    split_key,
)
from app.engine.metrics import check_scalars
from app.engine.ops import (
    AddParamGroup,
    Configure,
    ImportState,
    Overwrite,
    Push,
    SchedulerStep,
    UpdateParamGroup,
    ZeroGrad,
)
from app.engine.session import check_session_id
from app.errors import Invalid, TooMany

DEFAULT_TENANT = "default"


@dataclass
class Limits:
    max_sessions: int = 0  # per tenant; 0 = unlimited
    max_session_elements: int = 0  # parameter elements per session; 0 = unlimited


class Front:
    """The engine the HTTP routes call (implements :class:`app.engine.interface.Engine`)."""

    def __init__(self, host: EmbeddedHost, limits: Limits | None = None) -> None:
        self.host = host
        self.device = host.device
        self.limits = limits or Limits()

    async def start(self) -> None:
        await self.host.start()

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.host.stop(snapshot=snapshot)

    async def status(self, *, memory: bool = False) -> EngineStatus:
        return await self.host.status(memory=memory)

    async def refused(self, *, tenant: str = DEFAULT_TENANT) -> dict[str, str]:
        """This tenant's stored sessions that failed their checks at start (by id)."""
        out = {}
        for key, reason in sorted(self.host.refused().items()):
            owner, session_id = split_key(key)
            if owner == tenant:
                out[session_id] = reason
        return out

    # ------------------------------------------------------------------ sessions
    async def create(self, spec: CreateSpec, *, tenant: str = DEFAULT_TENANT,
                     idem: IdemKey | None = None) -> SessionInfo:
        if idem is not None:
            made = self.host.find_create(tenant, idem)
            if made is not None:
                info = await self.host.describe(made)
                info.replayed = True
                return info
        session_id = check_session_id(spec.id) if spec.id is not None else uuid.uuid4().hex
        self._check_create_limits(tenant, spec)
        return await self.host.create(session_key(tenant, session_id), spec, idem=idem)

    def _check_create_limits(self, tenant: str, spec: CreateSpec) -> None:
        lim = self.limits
        if lim.max_sessions:
            mine = len(self.host.keys(session_key(tenant, "")))
            if mine >= lim.max_sessions:
                raise TooMany(f"this tenant already has {mine} sessions; the limit "
                              f"(OPTSERVE_MAX_SESSIONS) is {lim.max_sessions}",
                              code="too_many_sessions", field="id", limit=lim.max_sessions)
        self._check_elements(sum(t.numel() for g in spec.groups for t in g.params.values()))

    def _check_elements(self, n: int) -> None:
        limit = self.limits.max_session_elements
        if limit and n > limit:
            raise Invalid(f"the session would hold {n} parameter elements; the limit "
                          f"(OPTSERVE_MAX_SESSION_ELEMENTS) is {limit}",
                          code="session_too_large", field="params", limit=limit)

    async def describe(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> SessionInfo:
        return await self.host.describe(session_key(tenant, session_id))

    async def list_sessions(self, *, tenant: str = DEFAULT_TENANT) -> list[SessionInfo]:
        return await self.host.list_sessions(session_key(tenant, ""))

    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                     idem: IdemKey | None = None) -> bool:
        return await self.host.delete(session_key(tenant, session_id), idem=idem)

    # ------------------------------------------------------------------ gradients and steps
    async def step(
        self, session_id: str, grads: Tensors, *, return_params: ReturnParams,
        worker: str | None = None, base_version: int | None = None,
        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, params_into: Tensors | None = None,
        upcast: bool = False, params_dtype: torch.dtype | None = None,
        scalars: dict[str, Any] | None = None,
    ) -> StepResult:
        return await self.host.step(session_key(tenant, session_id), grads,
                                    want_params=return_params, worker=worker,
                                    base_version=base_version, idem=idem, options=options,
                                    params_into=params_into, upcast=upcast,
                                    params_dtype=params_dtype,
                                    scalars=check_scalars(scalars) or None)

    # ------------------------------------------------------------------ LBFGS evaluations
    def uses_evaluations(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        """Whether ``POST .../step`` on this session opens an evaluation step (LBFGS)."""
        return self.host.uses_evaluations(session_key(tenant, session_id))

    async def open_evaluation_step(
        self, session_id: str, first: Evaluation | None, *, return_params: ReturnParams,
        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
        timeout_s: float | None = None,
    ) -> EvaluationRequest | StepResult:
        return await self.host.open_evaluation_step(
            session_key(tenant, session_id), first, want_params=return_params, idem=idem,
            timeout_s=timeout_s)

    async def evaluate(self, session_id: str, eval_id: str, ev: Evaluation, fingerprint: str,
                       *, tenant: str = DEFAULT_TENANT) -> EvaluationRequest | StepResult:
        return await self.host.evaluate(session_key(tenant, session_id), eval_id, ev,
                                        fingerprint)

    async def abandon_step(self, session_id: str, step_id: str, *,
                           tenant: str = DEFAULT_TENANT) -> str:
        return await self.host.abandon_step(session_key(tenant, session_id), step_id)

    async def push(self, session_id: str, grads: Tensors, *, tenant: str = DEFAULT_TENANT,
                   idem: IdemKey | None = None, upcast: bool = False,
                   scalars: dict[str, Any] | None = None) -> GradsResult:
        out: GradsResult = await self.host.execute(
            session_key(tenant, session_id),
            Push(grads, upcast, check_scalars(scalars) or None), idem=idem)
        return out

    async def history(self, session_id: str, query: HistoryQuery, *,
                      tenant: str = DEFAULT_TENANT) -> HistoryResult:
        """The session's per-step history (rows ``since < n <= until``, chosen fields),
        downsampled to ``query.points`` buckets off the event loop."""
        result = await self.host.history(session_key(tenant, session_id), query)
        if query.points is not None:
            points = query.points
            result.columns = await asyncio.to_thread(downsample, result.columns, points)
        return result

    async def zero_grad(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                        idem: IdemKey | None = None) -> GradsResult:
        out: GradsResult = await self.host.execute(session_key(tenant, session_id),
                                                   ZeroGrad(), idem=idem)
        return out

    # ------------------------------------------------------------------ parameters
    async def pull(
        self, session_id: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        tenant: str = DEFAULT_TENANT, params_into: Tensors | None = None,
    ) -> ParamsResult:
        return await self.host.pull(session_key(tenant, session_id), names,
                                    min_version=min_version, wait_s=wait_s,
                                    unless_versions=unless_versions, params_into=params_into)

    async def pull_rows(
        self, session_id: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        tenant: str = DEFAULT_TENANT,
    ) -> ParamsResult:
        return await self.host.pull_rows(session_key(tenant, session_id), rows,
                                         min_version=min_version, wait_s=wait_s,
                                         unless_versions=unless_versions)

    async def overwrite(self, session_id: str, params: Tensors, *,
                        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                        ) -> ParamsResult:
        out: ParamsResult = await self.host.execute(session_key(tenant, session_id),
                                                    Overwrite(params), idem=idem)
        return out

    async def add_param_group(self, session_id: str, group: GroupSpec, *,
                              tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                              ) -> SessionInfo:
        key = session_key(tenant, session_id)
        if self.limits.max_session_elements:
            info = await self.host.describe(key)
            have = sum(_numel(p["shape"]) for p in info.params.values())
            self._check_elements(have + sum(t.numel() for t in group.params.values()))
        out: SessionInfo = await self.host.execute(
            key, AddParamGroup(group.params, group.options), idem=idem)
        return out

    async def update_param_group(self, session_id: str, index: int, options: dict[str, Any],
                                 *, tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                                 ) -> SessionInfo:
        out: SessionInfo = await self.host.execute(session_key(tenant, session_id),
                                                   UpdateParamGroup(index, options), idem=idem)
        return out

    async def configure(self, session_id: str, options: dict[str, Any], *,
                        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                        ) -> SessionInfo:
        key = session_key(tenant, session_id)
        done: SessionInfo = await self.host.execute(key, Configure(options), idem=idem)
        info = await self.host.describe(key)  # with the open sync round's pending workers
        info.replayed = done.replayed
        return info

    # ------------------------------------------------------------------ state
    async def scheduler_step(self, session_id: str, metric: float | None, *,
                             tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                             ) -> SchedulerResult:
        out: SchedulerResult = await self.host.execute(session_key(tenant, session_id),
                                                       SchedulerStep(metric), idem=idem)
        return out

    async def export_state(self, session_id: str, *, tenant: str = DEFAULT_TENANT
                           ) -> StateExport:
        return await self.host.export_state(session_key(tenant, session_id))

    async def trim(self) -> None:
        """Return free heap pages to the OS (after a large one-off answer was sent)."""
        await self.host.trim()

    async def import_state(self, session_id: str, state: dict[str, Any], *,
                           tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                           ) -> SessionInfo:
        out: SessionInfo = await self.host.execute(session_key(tenant, session_id),
                                                   ImportState(state), idem=idem)
        return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
