"""The front: what every engine shares above its session hosts — tenancy (a session key is
``tenant~id``), per-tenant limits, readiness — and nothing of where a session lives. A router
(:mod:`app.engine.router`) names the host of each session key; the front speaks to it only with
operation values and plain results.

Sync rounds and long polls are kept by the host that holds the session (so workers of one
round may talk to different fronts of one cluster).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from app.engine.host import EmbeddedHost
from app.engine.interface import (
    CreateSpec,
    EngineStatus,
    GradsResult,
    GroupSpec,
    IdemKey,
    ParamsResult,
    SchedulerResult,
    SessionInfo,
    StateExport,
    StepResult,
    Tensors,
    session_key,
    split_key,
)
from app.engine.ops import (
    AddParamGroup,
    Configure,
    ImportState,
    Operation,
    Overwrite,
    Push,
    SchedulerStep,
    UpdateParamGroup,
    ZeroGrad,
)
from app.engine.router import LocalRouter, Router, SessionHost
from app.engine.session import check_session_id
from app.errors import Invalid, NotFound, TooMany

DEFAULT_TENANT = "default"
_TOMBSTONES = 10_000


@dataclass
class Limits:
    max_sessions: int = 0  # per tenant; 0 = unlimited
    max_session_elements: int = 0  # parameter elements per session; 0 = unlimited


class Front:
    """The engine the HTTP routes call (implements :class:`app.engine.interface.Engine`)."""

    def __init__(self, router: Router | EmbeddedHost, limits: Limits | None = None) -> None:
        self.router: Router = (LocalRouter(router) if isinstance(router, EmbeddedHost)
                               else router)
        self.device = self.router.device
        self.limits = limits or Limits()
        # keyed deletes this front answered, so a retry that finds nothing still gets its 204
        self._tombstones: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def start(self) -> None:
        await self.router.start()

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.router.stop(snapshot=snapshot)

    async def status(self, *, memory: bool = False) -> EngineStatus:
        return await self.router.status(memory=memory)

    async def refused(self, *, tenant: str = DEFAULT_TENANT) -> dict[str, str]:
        """This tenant's stored sessions that failed their checks at start (by id)."""
        out = {}
        for key, reason in sorted((await self.router.refused()).items()):
            owner, session_id = split_key(key)
            if owner == tenant:
                out[session_id] = reason
        return out

    async def _host(self, tenant: str, session_id: str) -> tuple[SessionHost, str]:
        key = session_key(tenant, session_id)
        return await self.router.route(key), key

    # ------------------------------------------------------------------ sessions
    async def create(self, spec: CreateSpec, *, tenant: str = DEFAULT_TENANT,
                     idem: IdemKey | None = None) -> SessionInfo:
        if idem is not None:
            made = await self.router.find_create(tenant, idem)
            if made is not None:
                info = await (await self.router.route(made)).describe(made)
                info.replayed = True
                return info
        session_id = check_session_id(spec.id) if spec.id is not None else uuid.uuid4().hex
        await self._check_create_limits(tenant, spec)
        return await self.router.create(session_key(tenant, session_id), spec, idem=idem)

    async def _check_create_limits(self, tenant: str, spec: CreateSpec) -> None:
        lim = self.limits
        if lim.max_sessions:
            mine = await self.router.count(session_key(tenant, ""))
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
        host, key = await self._host(tenant, session_id)
        return await host.describe(key)

    async def list_sessions(self, *, tenant: str = DEFAULT_TENANT) -> list[SessionInfo]:
        return await self.router.list_sessions(session_key(tenant, ""))

    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                     idem: IdemKey | None = None) -> None:
        gone = self._tombstones.get((tenant, idem.key)) if idem is not None else None
        try:
            await self.router.delete(session_key(tenant, session_id), idem=idem)
        except NotFound:
            if gone is None:
                raise
            if idem is not None and gone != idem.fingerprint:
                raise Invalid("this Idempotency-Key was already used for a different request; "
                              "use a fresh key for every new operation",
                              code="idempotency_key_reused", field="Idempotency-Key") from None
            return
        if idem is not None:
            self._tombstones[(tenant, idem.key)] = idem.fingerprint
            while len(self._tombstones) > _TOMBSTONES:
                self._tombstones.popitem(last=False)

    # ------------------------------------------------------------------ gradients and steps
    async def step(
        self, session_id: str, grads: Tensors, *, return_params: bool,
        worker: str | None = None, base_version: int | None = None,
        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None,
    ) -> StepResult:
        host, key = await self._host(tenant, session_id)
        return await host.step(key, grads, want_params=return_params, worker=worker,
                               base_version=base_version, idem=idem, options=options)

    async def push(self, session_id: str, grads: Tensors, *, tenant: str = DEFAULT_TENANT,
                   idem: IdemKey | None = None) -> GradsResult:
        out: GradsResult = await self._execute(tenant, session_id, Push(grads), idem)
        return out

    async def zero_grad(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                        idem: IdemKey | None = None) -> GradsResult:
        out: GradsResult = await self._execute(tenant, session_id, ZeroGrad(), idem)
        return out

    # ------------------------------------------------------------------ parameters
    async def pull(
        self, session_id: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        tenant: str = DEFAULT_TENANT,
    ) -> ParamsResult:
        host, key = await self._host(tenant, session_id)
        return await host.pull(key, names, min_version=min_version, wait_s=wait_s,
                               unless_versions=unless_versions)

    async def overwrite(self, session_id: str, params: Tensors, *,
                        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                        ) -> ParamsResult:
        out: ParamsResult = await self._execute(tenant, session_id, Overwrite(params), idem)
        return out

    async def add_param_group(self, session_id: str, group: GroupSpec, *,
                              tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                              ) -> SessionInfo:
        host, key = await self._host(tenant, session_id)
        if self.limits.max_session_elements:
            info = await host.describe(key)
            have = sum(_numel(p["shape"]) for p in info.params.values())
            self._check_elements(have + sum(t.numel() for t in group.params.values()))
        out: SessionInfo = await host.execute(
            key, AddParamGroup(group.params, group.options), idem=idem)
        return out

    async def update_param_group(self, session_id: str, index: int, options: dict[str, Any],
                                 *, tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                                 ) -> SessionInfo:
        out: SessionInfo = await self._execute(tenant, session_id,
                                               UpdateParamGroup(index, options), idem)
        return out

    async def configure(self, session_id: str, options: dict[str, Any], *,
                        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                        ) -> SessionInfo:
        host, key = await self._host(tenant, session_id)
        await host.execute(key, Configure(options), idem=idem)
        return await host.describe(key)

    # ------------------------------------------------------------------ state
    async def scheduler_step(self, session_id: str, metric: float | None, *,
                             tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                             ) -> SchedulerResult:
        out: SchedulerResult = await self._execute(tenant, session_id, SchedulerStep(metric),
                                                   idem)
        return out

    async def export_state(self, session_id: str, *, tenant: str = DEFAULT_TENANT
                           ) -> StateExport:
        host, key = await self._host(tenant, session_id)
        return await host.export_state(key)

    async def import_state(self, session_id: str, state: dict[str, Any], *,
                           tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None
                           ) -> SessionInfo:
        out: SessionInfo = await self._execute(tenant, session_id, ImportState(state), idem)
        return out


    async def _execute(self, tenant: str, session_id: str, op: Operation,
                       idem: IdemKey | None) -> Any:
        host, key = await self._host(tenant, session_id)
        return await host.execute(key, op, idem=idem)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
