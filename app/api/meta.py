"""Health, readiness and the catalogues of optimizers and schedulers."""

from __future__ import annotations

import gc
from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.bodies import check_accept, json_response
from app.api.deps import EngineDep, TenantDep
from app.api.problems import problem
from app.api.strict_requests import StrictRoute
from app.engine import optimizers, schedulers
from app.gc_settle import settler

router = APIRouter(dependencies=[Depends(check_accept)], route_class=StrictRoute)


@router.get("/healthz", tags=["health"], summary="Liveness")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: the device worker is up")
async def readyz(request: Request, engine: EngineDep, tenant: TenantDep) -> Response:
    if getattr(request.app.state, "draining", False):
        return problem(503, "draining", "Draining", "the server is shutting down")
    status = await engine.status()
    if not status.ready:
        response = problem(503, "not_ready", "Not ready", status.reason or "not ready")
        response.headers["Retry-After"] = "5"
        return response
    body: dict[str, Any] = {"status": "ready", "device": engine.device}
    # Stored sessions of this tenant that failed their checks at start and are not served
    # (the server log names every one with its reason; the files are left for an operator).
    mine = [{"id": session_id, "reason": reason}
            for session_id, reason in (await engine.refused(tenant=tenant)).items()]
    if mine:
        body["refused"] = mine
    return json_response(body)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@router.get("/v1/transport", tags=["catalogue"], summary="Transports besides HTTP")
async def transport(request: Request) -> Response:
    """The same-host transport's socket, told only to clients on this machine (a remote client
    never learns the path); ``{"local": null}`` otherwise."""
    local = getattr(request.app.state, "local_transport", None)
    client = request.client.host if request.client is not None else ""
    if local is None or local.path is None or client not in _LOOPBACK:
        return json_response({"local": None})
    server = request.scope.get("server")
    port = server[1] if isinstance(server, (tuple, list)) and len(server) == 2 else None
    # the port this connection reached: a client that dialled another one (a proxy on this
    # machine stands between) keeps to HTTP in its "auto" mode, so the proxy sees every step
    return json_response({"local": {"socket": str(local.path), "protocol": 1, "port": port}})


@router.get("/v1/optimizers", tags=["catalogue"], summary="Optimizers and their defaults")
async def list_optimizers() -> Response:
    return json_response(optimizers.catalogue())


@router.get("/v1/schedulers", tags=["catalogue"], summary="Schedulers and their defaults")
async def list_schedulers() -> Response:
    return json_response(schedulers.catalogue())


@router.get("/metrics", tags=["health"], summary="Prometheus metrics")
async def metrics(request: Request, engine: EngineDep) -> Response:
    registry = request.app.state.metrics
    status = await engine.status(memory=True)
    registry.sessions.set(status.sessions)
    registry.device_memory.set(status.memory_bytes)
    connections = getattr(request.app.state, "connections", None)
    if connections is not None:
        registry.connections.set(connections.open)
        registry.connections_limit.set(connections.limit)
        registry.connections_lingering.set(connections.lingering)
    registry.gc_frozen.set(gc.get_freeze_count())
    sweeps = settler.sweeps
    if sweeps > registry.gc_sweeps_seen:
        registry.gc_sweeps.inc(sweeps - registry.gc_sweeps_seen)
    registry.gc_sweeps_seen = sweeps
    bodies = getattr(request.app.state, "body_memory", None)
    if bodies is not None:
        registry.body_bytes.set(bodies.held)
        registry.body_bytes_limit.set(bodies.limit)
        registry.bodies_waiting.set(bodies.waiting)
    local = getattr(request.app.state, "local_transport", None)
    if local is not None:
        registry.bindings.set(local.binding_slots.held)
        registry.bindings_limit.set(local.binding_slots.limit)
        registry.binding_bytes.set(local.binding_memory.held)
        registry.binding_bytes_limit.set(local.binding_memory.limit)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
