"""``GET /v1/sessions/{id}/history``: a session's per-step metrics, as JSON or CSV."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from app.api.bodies import JSON, check_accept, negotiate, offload
from app.api.conditions import one_query
from app.api.deps import EngineDep, TenantDep
from app.api.strict_requests import StrictRoute
from app.engine.history import HistoryQuery, HistoryResult, csv_text, jsonable
from app.errors import Invalid

CSV = "text/csv"
MAX_POINTS = 100_000
MAX_FIELDS = 256

router = APIRouter(prefix="/v1/sessions", tags=["history"], route_class=StrictRoute,
                   dependencies=[Depends(check_accept)])
SessionId = Annotated[str, Path(description="session id", max_length=200)]


def _fields(values: list[str] | None) -> list[str] | None:
    """``?fields=``'s names (None: not given, every field); given, it must name one (a
    ``?fields=`` naming none is a 422, not every field: an empty selection is a client's
    mistake, as an empty ``?names=`` on a pull)."""
    if values is None:
        return None
    out = [f.strip() for item in values for f in item.split(",") if f.strip()]
    if not out:
        raise Invalid("fields names no field: leave it out for every field, or name some "
                      "(fields=lr,grad_norm)", code="invalid_query", field="fields")
    if len(out) > MAX_FIELDS:
        raise Invalid(f"at most {MAX_FIELDS} fields", code="invalid_query", field="fields")
    return out


@router.get("/{session_id}/history", summary="Per-step metrics (JSON or CSV)")
async def get_history(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    since: Annotated[int | None, Query(ge=0, le=2**62, description="only rows with n > since "
                                       "(the last n a poller has seen)")] = None,
    until: Annotated[int | None, Query(ge=0, le=2**62, description="only rows with n <= until")]
    = None,
    fields: Annotated[list[str] | None, Query(description="columns, comma-separated or "
                                              "repeated: n, step, version, time, skipped, "
                                              "nonfinite, staleness, workers, lr.<group>, "
                                              "grad_norm.<group>, ..., scalars.<name>; a family "
                                              "name (lr, grad_norm, update_norm, param_norm, "
                                              "update_ratio, scalars) stands for all of it")]
    = None,
    points: Annotated[int | None, Query(ge=1, le=MAX_POINTS, description="downsample to at "
                                        "most this many buckets: each column becomes "
                                        "<name>.min and <name>.max per bucket")] = None,
) -> Response:
    media = negotiate(request, (JSON, CSV))
    one_query(request, "since", "until", "points")  # (FastAPI would take the last one)
    query = HistoryQuery(since, until, _fields(fields), points)
    result = await engine.history(session_id, query, tenant=tenant)
    if media == CSV:
        text = await offload(lambda: csv_text(result.columns), 64 * result.rows)
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'inline; filename="{session_id}.csv"'})
    body = await offload(lambda: _json_body(session_id, result), 64 * result.rows)
    return Response(body, media_type=JSON)


def _json_body(session_id: str, result: HistoryResult) -> bytes:
    out: dict[str, Any] = {
        "id": session_id, "capacity": result.capacity, "first": result.first,
        "last": result.last, "rows": result.rows, "points": result.points,
        "fields": list(result.columns),
        "columns": {name: jsonable(name, col) for name, col in result.columns.items()},
    }
    return orjson.dumps(out)
