"""LBFGS steps over HTTP: the closure as a round trip (:mod:`app.engine.evaluations`).

- ``POST /v1/sessions/{id}/step`` on an LBFGS session opens a step. Its body may carry the
  first evaluation (the loss and gradients at the current parameters, which a client usually
  has already): JSON ``{"loss": x, "grads": {...}}``, or safetensors gradients with
  ``__metadata__.loss``; or be empty. ``?timeout_s=`` bounds the wait for each evaluation.
- The answer is either a question — ``{"needs": "evaluation", "step_id", "evaluation",
  "evaluations", "version", "step", "timeout_s", "params": {...}}``: post the loss and
  gradients at ``params`` to ``POST .../step/{evaluation}`` — or the step's end: a step answer
  with ``loss`` (the first evaluation's, as torch's ``step`` returns it) and ``evaluations``.
- ``DELETE .../step/{step_id}`` abandons an open step (the session unchanged).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import crc32c
import orjson
from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from app.api.bodies import (
    FOREIGN_METADATA,
    body_kind,
    json_object,
    json_response,
    offload,
    only_keys,
    read_body,
    tensor_encoding,
    tensor_map,
    tensors_response,
    version_headers,
    wants_binary,
)
from app.api.conditions import idempotency
from app.api.deps import EngineDep, SettingsDep, TenantDep
from app.api.strict_requests import StrictRoute
from app.engine.evaluations import MAX_TIMEOUT_S
from app.engine.interface import Evaluation, EvaluationRequest, ReturnParams, StepResult
from app.engine.ops.lbfgs import loss_value
from app.errors import Invalid
from app.wire.safetensors_body import read_safetensors

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=StrictRoute)
SessionId = Annotated[str, Path(description="session id", max_length=200)]
REPLAYED_HEADER = "Idempotent-Replayed"


def parse_evaluation(buf: bytearray, binary: bool, required: bool) -> Evaluation | None:
    """An evaluation body (None for an empty one where it may be left out)."""
    if not buf.strip() and not required:
        return None
    if binary:
        tensors, metadata = read_safetensors(buf)
        # (its loss and gradients only, as in JSON: a param_groups or scalars entry, which a
        # step of another optimizer takes, would be dropped unread)
        only_keys({k: None for k in metadata if k not in FOREIGN_METADATA}, {"loss"},
                  "__metadata__")
        if "loss" not in metadata:
            raise Invalid("an evaluation carries its loss in __metadata__.loss",
                          code="missing_field", field="loss")
        try:
            raw: Any = orjson.loads(metadata["loss"])
        except orjson.JSONDecodeError:
            raw = metadata["loss"]
        return Evaluation(loss_value(raw, "loss"), dict(tensors))
    obj = json_object(buf)
    only_keys(obj, {"loss", "grads"})
    if not obj and not required:
        return None
    if "loss" not in obj:
        raise Invalid("an evaluation carries its loss", code="missing_field", field="loss")
    return Evaluation(loss_value(obj["loss"], "loss"), tensor_map(obj.get("grads", {}), "grads"))


_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _timeout(request: Request) -> float | None:
    raw = request.query_params.get("timeout_s")
    if raw is None:
        return None
    # plain ASCII decimals only, as the integer queries take (Python's float() also takes
    # "1_0", other scripts' digits and surrounding spaces)
    value = float(raw) if _DECIMAL.fullmatch(raw) else math.nan
    if not 0 < value <= MAX_TIMEOUT_S:
        raise Invalid(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]",
                      code="invalid_query", field="timeout_s")
    return value


async def answer(result: EvaluationRequest | StepResult, binary: bool, b64: bool) -> Response:
    if isinstance(result, EvaluationRequest):
        headers = version_headers(result.version, result.step)
        return await tensors_response(binary, b64, result.scalars(), result.params, headers)
    headers = version_headers(result.version, result.step, result.tag_version)
    if result.replayed:
        headers[REPLAYED_HEADER] = "true"
    return await tensors_response(binary, b64, result.scalars(), result.params, headers)


async def open_step(request: Request, engine: Any, tenant: str, max_bytes: int,
                    session_id: str, returned: ReturnParams, binary: bool, b64: bool,
                    base_version: int | None = None) -> Response:
    """``POST .../step`` on an LBFGS session (``base_version``: the step's ``?base_version=``
    or ``If-Match``, which must name the session's version)."""
    timeout_s = _timeout(request)
    buf = await read_body(request, max_bytes)
    kind = body_kind(request) if buf.strip() else "json"
    first = await offload(lambda: parse_evaluation(buf, kind == "binary", False), len(buf))
    idem = await idempotency(request, buf)
    result = await engine.open_evaluation_step(session_id, first, return_params=returned,
                                               tenant=tenant, idem=idem, timeout_s=timeout_s,
                                               base_version=base_version)
    return await answer(result, binary, b64)


@router.post("/{session_id}/step/{eval_id}", summary="Answer an LBFGS step's evaluation")
async def post_evaluation(
    session_id: SessionId,
    eval_id: Annotated[str, Path(description="the evaluation asked for", max_length=64)],
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    binary, b64 = wants_binary(request), tensor_encoding(request)
    # (404 before the body; and the 422 of a session that has no evaluations: sharded, Ray)
    await engine.refuse_unknown(session_id, tenant=tenant, evaluation=True)
    kind = body_kind(request)  # (415 before the body)
    buf = await read_body(request, int(settings.max_body_mb * 1024 * 1024))
    ev = await offload(lambda: parse_evaluation(buf, kind == "binary", True), len(buf))
    assert ev is not None
    checksum = await offload(lambda: crc32c.crc32c(buf), len(buf))
    fingerprint = f"{kind} {len(buf)}:{checksum:08x}"
    result = await engine.evaluate(session_id, eval_id, ev, fingerprint, tenant=tenant)
    return await answer(result, binary, b64)


@router.delete("/{session_id}/step/{step_id}", summary="Abandon an open LBFGS step")
async def abandon_step(
    session_id: SessionId,
    step_id: Annotated[str, Path(description="the open step", max_length=64)],
    engine: EngineDep,
    tenant: TenantDep,
) -> Response:
    outcome = await engine.abandon_step(session_id, step_id, tenant=tenant)
    return json_response({"step_id": step_id, "outcome": outcome})
