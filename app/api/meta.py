"""Health, readiness and the catalogues of optimizers and schedulers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from app.api.bodies import json_response
from app.api.deps import EngineDep
from app.api.problems import problem
from app.engine import optimizers, schedulers

router = APIRouter()


@router.get("/healthz", tags=["health"], summary="Liveness")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: the device worker is up")
async def readyz(engine: EngineDep) -> Response:
    if not engine.ready():
        return problem(503, "not_ready", "Not ready", "the device worker is not running")
    return json_response({"status": "ready", "device": engine.device})


@router.get("/v1/optimizers", tags=["catalogue"], summary="Optimizers and their defaults")
async def list_optimizers() -> Response:
    return json_response(optimizers.catalogue())


@router.get("/v1/schedulers", tags=["catalogue"], summary="Schedulers and their defaults")
async def list_schedulers() -> Response:
    return json_response(schedulers.catalogue())
