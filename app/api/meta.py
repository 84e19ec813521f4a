"""Health, readiness and the catalogues of optimizers and schedulers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.bodies import check_accept, json_response
from app.api.deps import EngineDep, TenantDep
from app.api.problems import problem
from app.engine import optimizers, schedulers

router = APIRouter(dependencies=[Depends(check_accept)])


@router.get("/healthz", tags=["health"], summary="Liveness")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: the device worker is up")
async def readyz(request: Request, engine: EngineDep, tenant: TenantDep) -> Response:
    if getattr(request.app.state, "draining", False):
        return problem(503, "draining", "Draining", "the server is shutting down")
    if not engine.ready():
        return problem(503, "not_ready", "Not ready",
                       "the device worker is not running or the data directory is not writable")
    body: dict[str, Any] = {"status": "ready", "device": engine.device}
    # Stored sessions of this tenant that failed their checks at start and are not served
    # (the server log names every one with its reason; the files are left for an operator).
    refused: dict[str, str] = getattr(engine, "refused", {})
    mine = [{"id": key.split("~", 1)[1], "reason": reason}
            for key, reason in sorted(refused.items()) if key.split("~", 1)[0] == tenant]
    if mine:
        body["refused"] = mine
    return json_response(body)


@router.get("/v1/optimizers", tags=["catalogue"], summary="Optimizers and their defaults")
async def list_optimizers() -> Response:
    return json_response(optimizers.catalogue())


@router.get("/v1/schedulers", tags=["catalogue"], summary="Schedulers and their defaults")
async def list_schedulers() -> Response:
    return json_response(schedulers.catalogue())


@router.get("/metrics", tags=["health"], summary="Prometheus metrics")
async def metrics(request: Request, engine: EngineDep) -> Response:
    registry = request.app.state.metrics
    registry.sessions.set(engine.session_count())
    registry.device_memory.set(engine.memory_bytes())
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
