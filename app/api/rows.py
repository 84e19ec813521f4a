"""Row pulls: some rows of a parameter (an embedding table) instead of all of it.

- ``GET /v1/sessions/{id}/params?name=emb&rows=1,5,9`` (``rows`` repeated or comma-separated);
- ``POST /v1/sessions/{id}/params/rows`` for long row lists: JSON ``{"rows": {"emb": [1, 5, 9],
  ...}}`` (lists of integers, or int64 JSON tensors) or a safetensors body of int64 ``[n]``
  tensors keyed by parameter name; several parameters at once.

Both answer like a whole pull (versions, ``If-None-Match`` → 304, ``?min_version=&wait_s=``
long polls) with row-sparse tensors (:mod:`app.wire.sparse`): the rows in the order asked,
repeats kept.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from app.api import conditions
from app.api.bodies import (
    FOREIGN_METADATA,
    body_kind,
    json_object,
    offload,
    only_keys,
    read_body,
    tensor_encoding,
    tensors_response,
    version_headers,
    wants_binary,
)
from app.api.deps import EngineDep, MinVersion, SettingsDep, TenantDep, WaitSeconds
from app.api.requests import params_dtype_query
from app.api.strict_requests import StrictRoute
from app.engine.interface import ParamsResult
from app.errors import Invalid
from app.wire.safetensors_body import read_safetensors
from app.wire.sparse import MAX_INDICES, indices_from_json

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=StrictRoute)
_ROW = re.compile(r"-?[0-9]{1,18}")
SessionId = Annotated[str, Path(description="session id", max_length=200)]


def names_from_query(names: list[str] | None) -> list[str] | None:
    """``?names=w,b`` (repeated or comma-separated) to ``["w", "b"]``; None without ``names``.
    Given but naming nothing (``?names=``, ``?names=,``) is a 422 ``invalid_query`` naming
    ``names``: it pulled ``{}``, an empty selection no client means (a stray comma beside a
    name, ``?names=w,``, is only a separator)."""
    if names is None:
        return None
    wanted = [n for item in names for n in item.split(",") if n]
    if not wanted:
        raise Invalid("names must name at least one parameter (leave it out to pull them all)",
                      code="invalid_query", field="names")
    return wanted


def rows_from_query(names: list[str] | None, name: list[str], rows: list[str] | None
                    ) -> dict[str, torch.Tensor]:
    """``?name=emb&rows=1,5,9`` (or ``?names=emb``) to ``{"emb": tensor([1, 5, 9])}``; every
    ``name`` given counts (a repeated one, or one beside ``names``, was dropped unsaid).
    ``name`` given empty is a 422 ``invalid_query`` naming it (it was looked up as a parameter
    named ``""``: ``unknown_parameter`` naming ``rows.``); ``rows`` left out is a 422
    ``invalid_rows`` naming ``rows`` (it answered no rows: the whole parameter is
    ``?names=emb``). ``rows=`` given empty asks no rows, as a POST's ``[]`` does."""
    if any(not n for n in name):
        raise Invalid("name must name the parameter whose rows to pull", code="invalid_query",
                      field="name")
    chosen = [*name, *(names or [])]
    if len(chosen) != 1:
        raise Invalid("rows are pulled from one parameter: name it with ?name=",
                      code="invalid_rows", field="name")
    if rows is None:
        raise Invalid("a row pull (?name=) needs the rows to pull: ?name=emb&rows=1,5,9 (a "
                      "whole parameter is pulled with ?names=)", code="invalid_rows",
                      field="rows")
    values: list[int] = []
    for item in rows:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if not _ROW.fullmatch(part):
                raise Invalid(f"rows must be row indices (integers), got {part!r:.40}",
                              code="invalid_rows", field="rows")
            values.append(int(part))
    if len(values) > MAX_INDICES:
        raise Invalid("too many rows", code="invalid_rows", field="rows")
    return {chosen[0]: torch.tensor(values, dtype=torch.int64)}


def rows_from_body(buf: bytearray, binary: bool) -> dict[str, torch.Tensor]:
    if binary:
        tensors, metadata = read_safetensors(buf)
        # (a POST's rows are its tensors: any other entry is refused, as a JSON field is)
        only_keys({k: None for k in metadata if k not in FOREIGN_METADATA}, set(),
                  "__metadata__")
        for n, t in tensors.items():
            if t.dtype != torch.int64 or t.dim() != 1:
                raise Invalid("each tensor holds one parameter's rows: int64 of shape [n]",
                              code="invalid_rows", field=f"rows.{n}")
        return {n: t.clone() for n, t in tensors.items()}
    obj = json_object(buf)
    only_keys(obj, {"rows"})
    raw = obj.get("rows")
    if not isinstance(raw, dict):
        raise Invalid("rows must be an object mapping parameter names to row indices",
                      code="invalid_rows", field="rows")
    return {n: indices_from_json(v, f"rows.{n}", "invalid_rows", "rows") for n, v in raw.items()}


async def answer(request: Request, result: ParamsResult, binary: bool, b64: bool) -> Response:
    headers = version_headers(result.version, result.step)
    if result.not_modified:
        return Response(status_code=304, headers=headers)
    return await tensors_response(binary, b64, result.scalars(), result.params, headers)


async def pull(request: Request, engine: Any, tenant: str, session_id: str,
               rows: dict[str, torch.Tensor], min_version: int | None, wait_s: float,
               binary: bool, b64: bool, params_dtype: torch.dtype | None = None) -> Response:
    """``params_dtype``: the rows' values narrowed as a whole pull's (``?params_dtype=``)."""
    expected = conditions.strict_match(request)
    held = conditions.none_match_versions(request)
    if min_version is None and wait_s > 0 and held:
        min_version = max(held) + 1
    result = await engine.pull_rows(session_id, rows, min_version=min_version, wait_s=wait_s,
                                    unless_versions=held, tenant=tenant,
                                    params_dtype=params_dtype)
    conditions.check_read(expected, result.version, result.step)
    return await answer(request, result, binary, b64)


@router.post("/{session_id}/params/rows", summary="Pull some rows of parameters")
async def post_rows(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    min_version: MinVersion = None,
    wait_s: WaitSeconds = 0.0,
) -> Response:
    conditions.one_query(request, "min_version", "wait_s")
    binary, b64 = wants_binary(request), tensor_encoding(request)
    narrow = params_dtype_query(request)
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    kind = body_kind(request)  # (415 before the body)
    buf = await read_body(request, int(settings.max_body_mb * 1024 * 1024))
    rows = await offload(lambda: rows_from_body(buf, kind == "binary"), len(buf))
    return await pull(request, engine, tenant, session_id, rows, min_version, wait_s, binary,
                      b64, narrow)
