"""Session routes: parse, call the engine, encode. Each reads like a table of contents."""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
import torch
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from app.api import body_memory, conditions, evaluations
from app.api import requests as parse
from app.api import rows as row_pulls
from app.api.auth import tenant_of
from app.api.bodies import (
    BINARY,
    JSON,
    OFFLOAD_BYTES,
    AskFirst,
    Entries,
    RefusedAfter,
    answer_in_place,
    body_kind,
    check_accept,
    json_object,
    json_response,
    negotiate,
    offload,
    only_keys,
    read_body,
    read_tensors,
    require_json,
    tensor_encoding,
    tensors_response,
    text_metadata,
    version_headers,
    wants_binary,
)
from app.api.conditions import IDEMPOTENCY_HEADER, idempotency, one_header
from app.api.deps import EngineDep, MinVersion, SettingsDep, TenantDep, WaitSeconds
from app.api.instrument import SENT_LATER, counter_for, metrics_of, outcome, phase
from app.api.requests import StepQuery, params_dtype_query
from app.api.streamed_step import StreamedResponse, StreamedStep, begun
from app.api.strict_requests import StrictRoute
from app.engine import chunked
from app.engine.idempotency import check_key
from app.engine.interface import (
    Engine,
    EntriesOp,
    EntriesRefusal,
    EntriesUnknown,
    IdemKey,
    ReturnParams,
    SessionInfo,
)
from app.engine.metrics import check_scalars
from app.engine.ops import Expected
from app.errors import Invalid, OptserveError
from app.wire.content_digest import cheap
from app.wire.integers import OPTION_INTS, int_text, ints_as_text
from app.wire.safetensors_body import header_end, read_safetensors, write_safetensors
from app.wire.tree import (
    int_outside,
    is_float_tag,
    tree_to_json,
    tree_to_safetensors,
    untag_float,
)

REPLAYED_HEADER = "Idempotent-Replayed"
#: the session's change counter, on answers that describe the session or export its state
REVISION_HEADER = "X-Optserve-Revision"
#: a state dict's tag (``"r<revision>.<token>"``, quoted as ``If-None-Match`` echoes it), on
#: every answer of ``GET .../state_dict`` (:func:`app.api.conditions.state_tag`)
STATE_TAG_HEADER = "X-Optserve-State-Tag"
#: what a step body may carry besides its gradients
STEP_FIELDS = frozenset({"param_groups", "scalars"})
#: what a push (/grads) body may carry besides its gradients
PUSH_FIELDS = frozenset({"scalars"})

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=StrictRoute,
                   dependencies=[Depends(check_accept)])  # 406 before any work
#: the longest session id a path may carry (longer: 422)
SESSION_ID_MAX = 200
SessionId = Annotated[str, Path(description="session id", max_length=SESSION_ID_MAX)]


def _max_bytes(settings: Any) -> int:
    return int(settings.max_body_mb * 1024 * 1024)


def _described(info: SessionInfo, status: int = 200) -> Response:
    headers = _headers(info.version, info.step, info.replayed)
    headers[REVISION_HEADER] = str(info.revision)
    return json_response(info.to_json(), status, headers)


def _headers(version: int, step: int, replayed: bool = False, tag: int | None = None
             ) -> dict[str, str]:
    headers = version_headers(version, step, tag)
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return headers


@router.post("", status_code=201, summary="Create a session")
async def create_session(
    request: Request, engine: EngineDep, tenant: TenantDep, settings: SettingsDep
) -> Response:
    binary = body_kind(request) == "binary"  # (a 415 before the body is read)
    buf = await read_body(request, _max_bytes(settings))
    idem = await idempotency(request, buf)
    if binary:
        def decode_binary() -> Any:
            tensors, metadata = read_safetensors(buf)
            return parse.create_spec(parse.metadata_fields(metadata), tensors,
                                     max_params=settings.max_session_params)
        spec = await offload(decode_binary, len(buf))
    else:
        spec = await offload(lambda: parse.create_spec(
            json_object(buf), max_params=settings.max_session_params), len(buf))
    buf = bytearray()  # a JSON body's bytes, freed before the session is made
    info = await engine.create(spec, tenant=tenant, idem=idem)
    response = _described(info, 201)
    response.headers["Location"] = f"/v1/sessions/{info.id}"
    return response


@router.get("", summary="List sessions")
async def list_sessions(engine: EngineDep, tenant: TenantDep) -> Response:
    infos = await engine.list_sessions(tenant=tenant)
    return json_response({"sessions": [info.to_json() for info in infos]})


@router.get("/{session_id}", summary="Describe a session")
async def get_session(session_id: SessionId, request: Request, engine: EngineDep,
                      tenant: TenantDep) -> Response:
    expected = conditions.strict_match(request)
    star = conditions.none_match_any(request)  # (a malformed one: 422 before any work)
    info = await engine.describe(session_id, tenant=tenant)
    conditions.check_read(expected, info.version, info.step, info.revision)
    if star:
        return _not_modified(info)
    return _described(info)


def _not_modified(info: SessionInfo, *, state: bool = False) -> Response:
    """304 for ``If-None-Match: *`` on a read of the session's description or state (RFC
    9110 13.1.2: false whenever the session exists), or for a state tag naming the
    session's revision and creation token on a read of its state (``state``: with its
    ``X-Optserve-State-Tag``), with the version headers a 200 has. A version tag is not
    evaluated there: their ETag is the parameters' version, which an option change (in both
    answers) does not move."""
    headers = _headers(info.version, info.step)
    headers[REVISION_HEADER] = str(info.revision)
    if state:
        headers[STATE_TAG_HEADER] = conditions.state_tag(info.revision, info.token)
    return Response(status_code=304, headers=headers)


@router.patch("/{session_id}", summary="Change session options (or remove the scheduler)")
async def configure_session(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    expected = _expected(request)
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    require_json(request)  # (415 before the body)
    await _refuse_stale(engine, request, session_id, tenant, expected)  # (412 before it too)
    buf = await read_body(request, _max_bytes(settings))
    options = json_object(buf)
    idem = await idempotency(request, buf)
    return _described(await engine.configure(session_id, options, tenant=tenant, idem=idem,
                                             expected=expected))


@router.delete("/{session_id}", status_code=204, summary="Delete a session")
async def delete_session(
    session_id: SessionId, request: Request, engine: EngineDep, tenant: TenantDep
) -> Response:
    expected = _expected(request)
    replayed = await engine.delete(session_id, tenant=tenant, idem=await idempotency(request),
                                   expected=expected)
    metrics_of(request).forget_session(session_id)
    return Response(status_code=204, headers={REPLAYED_HEADER: "true"} if replayed else None)


@router.post("/{session_id}/step", summary="Apply gradients (plus any accumulated) and step")
async def step(session_id: SessionId, request: Request) -> Response:
    """The hot path: its query is read by hand (``StepQuery``, documented in
    ``openapi_docs.QUERY``) and the engine, tenant and settings taken from the app, so FastAPI
    solves no dependencies per step."""
    engine: Engine = request.app.state.engine
    metrics = metrics_of(request)
    with outcome(metrics, metrics.steps, session_id) as counted:
        binary = wants_binary(request)  # 406 before any work
        query = StepQuery.parse(request)
        tenant = tenant_of(request.scope)
        max_bytes = _max_bytes(request.app.state.settings)
        b64 = tensor_encoding(request)
        returned: ReturnParams = query.return_params
        base = conditions.base_version(request, query.base_version)
        with conditions.base_named_as_sent(base, query.base_version):
            return await _step(request, engine, counted, session_id, query, tenant, max_bytes,
                               binary, b64, returned, base)


async def _step(request: Request, engine: Engine, counted: dict[str, Any], session_id: str,
                query: StepQuery, tenant: str, max_bytes: int, binary: bool,
                b64: bool, returned: ReturnParams, base: int | None) -> Response:
    """The step after its query and base version are read (a refusal of the base version
    names ``If-Match`` when the version came in that header: ``base_named_as_sent``)."""
    # (LBFGS: the closure protocol; a session nothing holds: its 404 here, before the body)
    if await engine.uses_evaluations(session_id, tenant=tenant):
        return await evaluations.open_step(request, engine, tenant, max_bytes,
                                           session_id, returned, binary, b64, base)
    if query.timeout_given:
        raise Invalid("timeout_s bounds an LBFGS step's wait for each evaluation; this "
                      "session's optimizer takes none", code="invalid_query",
                      field="timeout_s")
    worker = conditions.worker_id(request)
    early, ready = await _excess_entries(request, engine, session_id, tenant, "step",
                                         query.upcast, worker=worker)
    with phase(request, "decode"):
        grads, fields, buf = await read_tensors(
            request, max_bytes, "grads", STEP_FIELDS, sparse=True, before_tensors=early,
            before_ready=ready)
        options = parse.step_options(fields.get("param_groups"))
        idem = await _step_idempotency(request, buf, session_id, grads, fields, query,
                                       base, worker)
        # a binary answer of every parameter can be written over the spent gradients
        # (narrowed ones too, over narrow gradients: the engine checks each dtype)
        # (off the event loop for a header of many tensors: its entries in file order are
        # worked out once per layout, 1.2 s for 300,000 tensors, every other request waiting)
        in_place = (await offload(lambda: answer_in_place(grads, buf), header_end(buf))
                    if binary and returned is True and body_kind(request) == "binary"
                    and (query.params_dtype is not None or not query.upcast) else None)
    streamed = (StreamedStep(in_place, query.params_dtype)
                if in_place is not None and not query.answer_metrics
                and chunked.may_stream(in_place.buffer.nbytes) else None)
    stepping = engine.step(session_id, grads, return_params=returned,
                           worker=worker, base_version=base, tenant=tenant, idem=idem,
                           options=options, upcast=query.upcast,
                           params_dtype=query.params_dtype, params_into=in_place,
                           scalars=fields.get("scalars"),
                           answer_metrics=query.answer_metrics,
                           answer=streamed.stream() if streamed is not None else None)
    if streamed is None:
        result = await stepping
    else:
        task, began = await begun(streamed, stepping)
        if began:
            scalars = streamed.scalars
            # (counted once sent: ok, or cut short by the step's failure, under its code)
            counted["outcome"] = SENT_LATER
            metrics = metrics_of(request)
            return StreamedResponse(streamed, task, text_metadata(scalars),
                                    _headers(scalars["version"], scalars["step"]),
                                    counter_for(metrics, metrics.steps, session_id))
        result = task.result()
    if result.skipped:
        counted["outcome"] = "skipped"
    with phase(request, "encode"):
        return await tensors_response(
            binary, b64, result.scalars(), result.params,
            _headers(result.version, result.step, result.replayed, result.tag_version))


async def _excess_entries(request: Request, engine: Engine, session_id: str, tenant: str,
                          op: EntriesOp, upcast: bool = False, *, worker: str | None = None,
                          expected: Expected | None = None
                          ) -> tuple[Callable[[Entries, dict[str, Any]], None] | None,
                                     Callable[[], Awaitable[None]] | None]:
    """The ``before_tensors`` of :func:`read_tensors` for a step's, a push's or an
    overwrite's (``op``) body that may name more tensors than its session holds
    (:func:`_refuse_entries`, from its header), or None: a body of at most OFFLOAD_BYTES
    (decoded inline, in well under a millisecond, and refused as it was), a session that
    has no such check (:meth:`Engine.entries_refusal`); with what :func:`read_tensors` awaits
    where the refusal must ask first (``before_ready``: a Ray host's answer, for a body naming
    more tensors than the session held when this front last asked)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) <= OFFLOAD_BYTES:
        return None, None
    refusal = await engine.entries_refusal(session_id, tenant=tenant, worker=worker,
                                           idem_key=request.headers.get(IDEMPOTENCY_HEADER),
                                           op=op, expected=expected)
    if refusal is None:
        return None, None
    return functools.partial(_refuse_entries, request, refusal, upcast), refusal.ready


def _refuse_entries(request: Request, refusal: EntriesRefusal, upcast: bool,
                    entries: Entries, fields: dict[str, Any]) -> None:
    """A step's, a push's (``/grads``) or an overwrite's (``PUT .../params``) body naming
    more tensors than its session holds, refused from its entries (a safetensors header; a
    JSON body's tensors' dtypes and shapes) before its tensors are made (a body of 100,000
    entries for a session of ten was decoded whole first), with the operation's own answer
    (422 ``unknown_parameter`` naming the first name that is not a parameter's, or an
    earlier entry's mismatch); what the route refuses before the tensors are checked (a
    step's ``param_groups``' form, the ``Idempotency-Key``) is refused first, as it was, and
    so is a malformed ``scalars`` (a step's, a push's), which the engine checks before the
    tensors. Those come after the body's tensors up to the refused entry are decoded
    (``RefusedAfter``): a malformed one among them was the answer when every tensor was
    decoded first (it was refused for a malformed ``Idempotency-Key``, ``param_groups`` or
    ``scalars`` instead)."""
    if len(entries) <= refusal.held() or (not refusal.scalars and fields.get("scalars")):
        return
    try:
        refusal.refuse(entries, upcast, fields.get("scalars"))
    except OptserveError as exc:
        refused = exc
    except EntriesUnknown:  # (its host asked first: refusal.ready, then a second look)
        raise AskFirst from None
    else:  # (none found: the operation's own checks answer, once every tensor is decoded)
        return
    try:
        parse.step_options(fields.get("param_groups"))
        key = one_header(request, IDEMPOTENCY_HEADER, "Idempotency-Key")
        if key is not None:
            check_key(key)
        check_scalars(fields.get("scalars"))  # (as Front.step does, before the session's)
    except OptserveError as exc:
        raise RefusedAfter(exc, refused.field) from None
    raise refused


async def _step_idempotency(request: Request, buf: bytearray | memoryview, session_id: str,
                            grads: dict[str, torch.Tensor], fields: dict[str, Any],
                            query: StepQuery, base: int | None, worker: str | None
                            ) -> IdemKey | None:
    """A step's ``Idempotency-Key`` with the fingerprint of its content
    (:func:`conditions.step_fingerprint`: the same as the step's over the same-host transport
    or in another body format), and the one servers before it kept (a retry of a step they
    logged is still answered after an upgrade)."""
    key = await idempotency(request, buf)
    if key is None:
        return None
    returned = ("touched" if query.return_params == "touched"
                else "params" if query.return_params else "none")

    def fingerprint() -> str:
        return conditions.step_fingerprint(
            session_id, grads, returned=returned,
            metrics="answer" if query.answer_metrics else "history", base_version=base,
            worker=worker, upcast=query.upcast, params_dtype=query.params_dtype,
            param_groups=fields.get("param_groups"), scalars=fields.get("scalars"))
    # a body whose header's sampling plan is kept is sampled at once; others (their plan
    # made, or tensor by tensor) off the event loop when large
    content = fingerprint() if cheap(grads) else await offload(fingerprint, len(buf))
    return IdemKey(key.key, content, legacy=(key.fingerprint,))


@router.post("/{session_id}/grads", summary="Accumulate gradients for the next step")
async def push_grads(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    upcast: Annotated[bool, Query(description="accept float16/bfloat16 gradients for "
                                  "float32/float64 parameters (widened on the device)")] = False,
) -> Response:
    conditions.one_query(request, "upcast")
    with outcome(metrics_of(request), metrics_of(request).pushes, session_id):
        await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
        early, ready = await _excess_entries(request, engine, session_id, tenant, "push",
                                             upcast)
        grads, fields, buf = await read_tensors(request, _max_bytes(settings), "grads",
                                                PUSH_FIELDS, sparse=True, before_tensors=early,
                                                before_ready=ready)
        idem = await idempotency(request, buf)
        out = await engine.push(session_id, grads, tenant=tenant, idem=idem, upcast=upcast,
                                scalars=fields.get("scalars"))
    return json_response(out.to_json(), headers=_headers(out.version, out.step, out.replayed))


@router.post("/{session_id}/zero_grad", summary="Clear accumulated gradients")
async def zero_grad(
    session_id: SessionId, request: Request, engine: EngineDep, tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    # no body: none, whitespace or {} (a field, as if it cleared some names, is a 422)
    buf = await read_body(request, _max_bytes(settings))
    if buf.strip():
        require_json(request)
        only_keys(json_object(buf), set())
    out = await engine.zero_grad(session_id, tenant=tenant, idem=await idempotency(request))
    return json_response(out.to_json(), headers=_headers(out.version, out.step, out.replayed))


@router.get("/{session_id}/params", summary="Pull parameters")
async def get_params(
    session_id: SessionId,
    request: Request,
    engine: EngineDep, tenant: TenantDep,
    names: Annotated[list[str] | None, Query(description="names, repeated or comma-separated")]
    = None,
    min_version: MinVersion = None,
    wait_s: WaitSeconds = 0.0,
    name: Annotated[str | None, Query(description="the parameter whose rows to pull")] = None,
    rows: Annotated[list[str] | None, Query(description="row indices, repeated or "
                                            "comma-separated (with name)")] = None,
) -> Response:
    conditions.one_query(request, "min_version", "wait_s", "name")
    binary, b64 = wants_binary(request), tensor_encoding(request)
    narrow = params_dtype_query(request)
    wanted = row_pulls.names_from_query(names)
    if rows is not None or name is not None:
        wanted_rows = row_pulls.rows_from_query(wanted, request.query_params.getlist("name"),
                                                rows)
        return await row_pulls.pull(request, engine, tenant, session_id, wanted_rows,
                                    min_version, wait_s, binary, b64, narrow)
    expected = conditions.strict_match(request)
    held = conditions.none_match_versions(request)
    if min_version is None and wait_s > 0 and held:
        min_version = max(held) + 1  # If-None-Match + wait_s: wait for anything newer
    result = await engine.pull(session_id, wanted, min_version=min_version, wait_s=wait_s,
                               unless_versions=held, tenant=tenant, params_dtype=narrow)
    # (before If-None-Match: RFC 9110 13.2.2)
    conditions.check_read(expected, result.version, result.step)
    headers = version_headers(result.version, result.step)
    if result.not_modified:
        return Response(status_code=304, headers=headers)
    return await tensors_response(binary, b64, result.scalars(), result.params, headers)


@router.put("/{session_id}/params", summary="Overwrite parameters")
async def put_params(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    binary, b64 = wants_binary(request), tensor_encoding(request)
    expected = _expected(request)
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    await _refuse_stale(engine, request, session_id, tenant, expected)  # (412 before it too)
    early, ready = await _excess_entries(request, engine, session_id, tenant, "overwrite",
                                         expected=expected)
    params, _, buf = await read_tensors(request, _max_bytes(settings), "params",
                                        before_tensors=early, before_ready=ready)
    idem = await idempotency(request, buf)
    result = await engine.overwrite(session_id, params, tenant=tenant, idem=idem,
                                    expected=expected)
    headers = _headers(result.version, result.step, result.replayed)
    return await tensors_response(binary, b64, result.scalars(), result.params, headers)


@router.post("/{session_id}/param_groups", status_code=201, summary="add_param_group")
async def add_param_group(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    expected = _expected(request)
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    binary = body_kind(request) == "binary"  # (415 before the body)
    await _refuse_stale(engine, request, session_id, tenant, expected,  # (412 before it too)
                        sharded=False)  # (a sharded session's 422 not_supported first)
    buf = await read_body(request, _max_bytes(settings))
    idem = await idempotency(request, buf)
    if binary:
        group = await offload(lambda: parse.group_spec_binary(buf), len(buf))
    else:
        group = await offload(lambda: parse.group_spec(json_object(buf)), len(buf))
    info = await engine.add_param_group(session_id, group, tenant=tenant, idem=idem,
                                        expected=expected)
    response = _described(info, 201)
    if info.added_group is not None:  # (the group's URL: PATCH .../param_groups/{index})
        response.headers["Location"] = f"/v1/sessions/{info.id}/param_groups/{info.added_group}"
    return response


@router.patch("/{session_id}/param_groups/{index}", summary="Change a group's options")
async def update_param_group(
    session_id: SessionId,
    index: Annotated[int, Path(ge=0, le=1_000_000)],
    request: Request,
    engine: EngineDep, tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    if request.path_params.get("index") != str(index):  # (what the path wrote: "01", "+0", "0.0")
        raise Invalid("index is a param group's position as a plain whole number (0, 1, ...)",
                      code="invalid", field="index")
    expected = _expected(request)
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    require_json(request)  # (415 before the body)
    await _refuse_stale(engine, request, session_id, tenant, expected)  # (412 before it too)
    buf = await read_body(request, _max_bytes(settings))
    options = parse.group_changes(json_object(buf), index)
    idem = await idempotency(request, buf)
    return _described(await engine.update_param_group(session_id, index, options,
                                                      tenant=tenant, idem=idem,
                                                      expected=expected))


@router.post("/{session_id}/scheduler/step", summary="Step the scheduler by hand")
async def scheduler_step(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    expected = _expected(request)
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    await _refuse_stale(engine, request, session_id, tenant, expected)  # (412 before it too)
    buf = await read_body(request, _max_bytes(settings))
    if buf.strip():
        require_json(request)
    obj = json_object(buf) if buf.strip() else {}
    only_keys(obj, {"metric"})
    metric = obj.get("metric")
    if isinstance(metric, dict) and is_float_tag(metric):  # {"$float": "nan"}: no JSON literal
        metric = untag_float(metric, "metric", "invalid_metric")
    if metric is not None and type(metric) not in (int, float):
        raise Invalid("metric must be a number", code="invalid_metric", field="metric")
    out = await engine.scheduler_step(
        session_id, None if metric is None else float(metric), tenant=tenant,
        idem=await idempotency(request, buf), expected=expected)
    return json_response(out.to_json(), headers=_headers(out.version, out.step, out.replayed))


def _state_format(request: Request, default: str) -> str:
    conditions.one_query(request, "format")
    fmt = request.query_params.get("format", default)
    if fmt not in ("json", "safetensors", "torch"):
        raise Invalid("format must be json, safetensors or torch", code="invalid_query",
                      field="format")
    return fmt


@router.get("/{session_id}/state_dict", summary="Export optimizer and scheduler state")
async def export_state(
    session_id: SessionId, request: Request, engine: EngineDep, tenant: TenantDep
) -> Response:
    default = "safetensors" if wants_binary(request) else "json"
    fmt = _state_format(request, default)
    # a ?format= the Accept header excludes (?format=torch, Accept: application/json): 406
    # before any work, as without it, not an answer the client said it cannot take
    negotiate(request, (JSON if fmt == "json" else BINARY,))
    b64 = tensor_encoding(request)
    expected = conditions.strict_match(request)
    held = conditions.none_match_state_tags(request)
    if conditions.none_match_any(request) or held:
        # (304 whatever the state for *; for a state tag, the "r<revision>.<token>" a state
        # was read at, when the session is still that session object at that revision: every
        # change moves the revision, so its state dict is as read then, and the token is
        # minted with each creation and restore, so a session deleted and made again under
        # the same id, whose revisions count from 0 again, matches no tag of the old one;
        # told from its description, nothing exported)
        info = await engine.describe(session_id, tenant=tenant)
        conditions.check_read(expected, info.version, info.step, info.revision,
                              tag=conditions.state_tag(info.revision, info.token))
        if not held or (info.revision, info.token) in held:
            return _not_modified(info, state=True)
    out = await engine.export_state(session_id, tenant=tenant)
    tag = conditions.state_tag(out.revision, out.token)
    conditions.check_read(expected, out.version, out.step, out.revision, tag=tag)
    headers = version_headers(out.version, out.step)
    headers[REVISION_HEADER] = str(out.revision)
    headers[STATE_TAG_HEADER] = tag
    sd = out.state_dict
    if int_outside(sd.get("param_groups"), *OPTION_INTS):  # (as a description writes it)
        sd = {**sd, "param_groups": ints_as_text(sd["param_groups"], *OPTION_INTS)}

    def encode() -> bytes:
        if fmt == "torch":
            f = io.BytesIO()
            torch.save(sd, f)
            return f.getvalue()
        if fmt == "safetensors":
            skeleton, tensors = tree_to_safetensors(sd)
            return write_safetensors(tensors, {"optserve_state": orjson.dumps(skeleton).decode()})
        return orjson.dumps(tree_to_json(sd, b64=b64), option=orjson.OPT_SERIALIZE_NUMPY)
    content = await offload(encode, 1 << 30)
    media = "application/json" if fmt == "json" else BINARY
    return Response(content, media_type=media, headers=headers)


@router.put("/{session_id}/state_dict", summary="Import optimizer and scheduler state")
async def import_state(
    session_id: SessionId,
    request: Request,
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> Response:
    """Conditional with ``If-Match: "<version>"`` / ``?base_version=`` and/or
    ``?base_revision=``: imported only if the session is still at them (412 otherwise)."""
    expected = _expected(request)
    kind = body_kind(request)
    fmt = _state_format(request, "safetensors" if kind == "binary" else "json")
    await engine.refuse_unknown(session_id, tenant=tenant)  # (404 before the body)
    await _refuse_stale(engine, request, session_id, tenant, expected)  # (412 before it too)
    # (?format=json: a JSON text, however its Content-Type reads, counted as one)
    buf = await read_body(request, _max_bytes(settings), as_json=fmt == "json")
    idem = await idempotency(request, buf)
    if fmt == "torch":
        layout = await engine.describe_layout(session_id, tenant=tenant)
        limit, pickled = parse.torch_file_limit(layout), parse.torch_pickle_limit(layout)
        # (what torch's reader inflates it to counts as the body's: a 98 KB file of deflated
        # zeros expands to 100 MB, and an LBFGS session's limit grows with its history_size)
        data, expands = await offload(lambda: parse.torch_file(buf, limit, pickled), len(buf))
        body_memory.hold_now(request.scope, expands)
        state = await offload(lambda: parse.state_from_torch(data, limit, pickled), len(buf))
    elif fmt == "safetensors":
        state = await offload(lambda: parse.state_from_safetensors(buf), len(buf))
    else:
        state = await offload(lambda: parse.state_from_json(buf), len(buf))
    info = await engine.import_state(session_id, state, tenant=tenant, idem=idem,
                                     expected=expected)
    return _described(info)


async def _refuse_stale(engine: Engine, request: Request, session_id: str, tenant: str,
                        expected: Expected | None, *, sharded: bool = True) -> None:
    """A change's 412 from its request's head when its precondition can no longer hold
    (:meth:`Front.refuse_stale <app.engine.front.Front.refuse_stale>`: the session is past
    the versions it names), with the problem the operation's own check gives; it checks
    again after the body. (An ``Idempotency-Key`` given twice or malformed: its 400 or 422,
    after the body, as before.)"""
    if expected is None:
        return
    keys = request.headers.getlist(IDEMPOTENCY_HEADER)
    if len(keys) > 1:
        return
    if keys:
        try:
            check_key(keys[0])
        except Invalid:  # (its 422 comes after the body, as before)
            return
    await engine.refuse_stale(session_id, expected, tenant=tenant,
                              idem_key=keys[0] if keys else None, sharded=sharded)


def _expected(request: Request) -> Expected | None:
    """A change's precondition (``If-Match`` / ``?base_version=``, and/or
    ``?base_revision=``), read before its body; its refusal names ``If-Match`` when that
    header gave the version (:func:`conditions.strict_match`: ``*``, lists, strong
    comparison)."""
    query_version = _query_int(request, "base_version")
    match = conditions.strict_match(request, query_version)
    revision = _query_int(request, "base_revision")
    if revision is None:
        return match
    return dataclasses.replace(match, revision=revision) if match else Expected(None, revision)


def _query_int(request: Request, name: str) -> int | None:
    """An optional whole-number query parameter (0 to 10^18 - 1): 422 ``invalid_query``
    naming it otherwise."""
    raw = request.query_params.getlist(name)
    if not raw:
        return None
    value = int_text(raw[0], 18) if len(raw) == 1 else None
    if value is None:
        raise Invalid(f"{name} must be one whole number from 0 (the session's, as its answers "
                      "give it)", code="invalid_query", field=name)
    return value
