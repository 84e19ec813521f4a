"""One function per endpoint, building an :class:`APICall`: the request to send and how to
read its response. No I/O here, so :class:`optserve.Client` and :class:`optserve.AsyncClient`
share every line of it and differ only in how they send.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from . import _safetensors, _sparse
from . import _tensors as T
from ._constants import (
    JSON,
    MAX_WAIT_S,
    OCTET_STREAM,
    REVISION_HEADER,
    STATE_TAG_HEADER,
    STEP_HEADER,
    TORCH_HINT,
    VERSION_HEADER,
    WORKER_HEADER,
)
from ._gc import gc_paused
from ._json import json_dumps, json_loads
from ._last_export import StateExport
from ._last_export import StateFormat as StateFormat
from ._safetensors import Body, WireTensor
from ._sparse import SparseWire
from ._tensors import Tensor, TensorLike
from ._types import (
    EvaluationRequest,
    History,
    OptimizerInfo,
    ParamsResult,
    SchedulerInfo,
    SchedulerStepResult,
    SessionInfo,
    StepResult,
    VersionInfo,
)
from ._types import _untag as untag

R = TypeVar("R")
NonFinitePolicy = Literal["reject", "skip", "allow"]
Durability = Literal["step", "interval", "memory"]
#: A param group for :meth:`Client.create_session`: ``{"params": {name: tensor} | [tensor, ...],
#: **options}``.
ParamGroup = Mapping[str, Any]
ParamsArg = Mapping[str, TensorLike] | Sequence[TensorLike]


@dataclass(frozen=True)
class APICall(Generic[R]):
    """A request (method, path, query, body) and the function that reads its response."""

    method: str
    path: str
    parse: Callable[[httpx.Response], R]
    params: list[tuple[str, str]] = field(default_factory=list)
    #: a safetensors body stays a :class:`~optserve._safetensors.Body` (its buffers, unjoined)
    content: bytes | Body | None = None
    content_type: str | None = None
    accept: str = JSON
    #: Safe to send twice. Only idempotent calls are retried after the request may have
    #: reached the server (read errors, read timeouts); others only when it surely did not.
    idempotent: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    #: How long the server may legitimately hold the request before answering (a long poll,
    #: a sync round): added to the client's read timeout; ``None``: no read timeout.
    wait_s: float | None = 0.0
    #: Where a large binary answer is read: ``into(size)`` gives a writable buffer of that
    #: size (:class:`~optserve._base_client.ReceiveBuffer`: one kept buffer, so the tensors
    #: of the previous answer read into it change). ``None``: a fresh buffer per answer.
    into: Callable[[int], memoryview] | None = None
    #: the tensors the exchange carries: from :data:`~optserve._gc.PAUSE_GC_TENSORS` on, the
    #: collector is paused while the answer is decoded (not while it is awaited); ``None``: as
    #: many as the answer holds, counted in it (:func:`answer_tensors`) before it is decoded
    gc_tensors: int | None = 0


IDEMPOTENCY_HEADER = "Idempotency-Key"


def with_key(call: APICall[R], key: str) -> APICall[R]:
    """The call with this ``Idempotency-Key`` (the same for all its retries)."""
    return dataclasses.replace(call, headers={**call.headers, IDEMPOTENCY_HEADER: key})


def _sid(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise TypeError(f"session id must be a non-empty string, got {session_id!r}")
    return "/v1/sessions/" + quote(session_id, safe="")


# --------------------------------------------------------------------------- response readers
def _is_binary(response: httpx.Response) -> bool:
    ctype = str(response.headers.get("content-type", ""))
    return ctype.split(";")[0].strip().lower() == OCTET_STREAM


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json_loads(response.content)
    except ValueError as exc:
        raise ValueError(f"response is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("response is not a JSON object")
    return body


def _header_int(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None else None


def _version_step(response: httpx.Response, body: Mapping[str, Any]) -> tuple[int, int]:
    version = body.get("version", _header_int(response, VERSION_HEADER))
    step = body.get("step", _header_int(response, STEP_HEADER))
    if version is None or step is None:
        raise ValueError("response carries no version/step")
    return int(version), int(step)


def answer_tensors(response: httpx.Response) -> int:
    """How many tensors an answer holds, counted without decoding it: the entries of a
    safetensors header (its ``data_offsets`` keys), the JSON tensor objects of a JSON body (its
    ``dtype`` keys). Decides whether the collector is paused while it is decoded (a pull's
    answer has as many tensors as the session holds, which the caller may not know)."""
    content = response.content
    if _is_binary(response):
        if len(content) < 8:
            return 0
        end = 8 + int.from_bytes(bytes(content[:8]), "little")
        return bytes(content[8:end]).count(b'"data_offsets"')
    return bytes(content).count(b'"dtype"')


def _tensor_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """(scalars, params) from a JSON body or a safetensors body with scalars in metadata."""
    if _is_binary(response):
        params, metadata = T.tensors_from_safetensors(response.content)
        scalars = {}
        for k, v in metadata.items():
            try:
                scalars[k] = json.loads(v)
            except ValueError:
                scalars[k] = v
        if "sparse" in scalars:  # row-sparse answers: .indices / .values pairs
            wires, _ = _safetensors.loads(response.content)
            return scalars, _sparse.pair_wires(wires, scalars.pop("sparse"))
        return scalars, params
    body = _json(response)
    params = body.pop("params", None)
    return body, (_sparse.decode_json_map(params) if params is not None else None)


def _parse_session(response: httpx.Response) -> SessionInfo:
    return SessionInfo.from_json(_json(response))


def _parse_sessions(response: httpx.Response) -> list[SessionInfo]:
    body = _json(response)
    return [SessionInfo.from_json(s) for s in body["sessions"]]


def _parse_dict(response: httpx.Response) -> dict[str, Any]:
    return _json(response)


def _parse_none(response: httpx.Response) -> None:
    return None


def _parse_version(response: httpx.Response) -> VersionInfo:
    body = _json(response) if response.content else {}
    return VersionInfo(*_version_step(response, body))


def _parse_step(response: httpx.Response) -> StepResult:
    scalars, params = _tensor_response(response)
    version, step = _version_step(response, scalars)
    params_version = scalars.get("params_version")
    return StepResult(
        version=version,
        step=step,
        lr=[T.number_from_wire(x) for x in scalars.get("lr", [])],
        skipped=bool(scalars.get("skipped", False)),
        params=params,
        nonfinite=list(scalars.get("nonfinite", [])),
        sync=scalars.get("sync"),
        staleness=scalars.get("staleness"),
        replayed=bool(scalars.get("replayed", False)),
        params_version=None if params_version is None else int(params_version),
        metrics=_metrics(scalars.get("metrics")),
    )


def _metrics(value: Any) -> dict[str, Any] | None:
    return untag(value) if isinstance(value, dict) else None


def step_result(scalars: Mapping[str, Any], params: Mapping[str, Any] | None, *,
                copy: bool) -> StepResult:
    """A step's answer that came another way than HTTP (the same-host transport): its
    scalars, and its parameters (copied out of the shared slots unless ``copy`` is False)."""
    out = None
    if params is not None:
        out = {n: (t.clone() if hasattr(t, "clone") else t.copy()) if copy else t
               for n, t in params.items()}
    params_version = scalars.get("params_version")
    return StepResult(
        version=int(scalars["version"]), step=int(scalars["step"]),
        lr=[T.number_from_wire(x) for x in scalars.get("lr", [])],
        skipped=bool(scalars.get("skipped", False)), params=out,
        nonfinite=list(scalars.get("nonfinite", [])), sync=scalars.get("sync"),
        staleness=scalars.get("staleness"), replayed=bool(scalars.get("replayed", False)),
        params_version=None if params_version is None else int(params_version),
        metrics=_metrics(scalars.get("metrics")))


def transport() -> APICall[dict[str, Any]]:
    return APICall("GET", "/v1/transport", _json)


def _parse_step_no_params(response: httpx.Response) -> StepResult:
    result = _parse_step(response)
    if result.params:
        raise ValueError("asked for no params but the step response carries some")
    return dataclasses.replace(result, params=None)


def _parse_params(response: httpx.Response) -> ParamsResult:
    scalars, params = _tensor_response(response)
    version, step = _version_step(response, scalars)
    lr = scalars.get("lr", [])
    return ParamsResult(version=version, step=step, params=params or {},
                        lr=[T.number_from_wire(x) for x in lr] if isinstance(lr, list) else [])


def _parse_optimizers(response: httpx.Response) -> list[OptimizerInfo]:
    body = _json(response)
    return [
        OptimizerInfo(name=str(o["name"]), defaults=T.options_from_wire(o.get("defaults") or {}))
        for o in body["optimizers"]
    ]


def _parse_schedulers(response: httpx.Response) -> list[SchedulerInfo]:
    body = _json(response)
    return [
        SchedulerInfo(
            name=str(s["name"]),
            defaults=T.options_from_wire(s.get("defaults") or {}),
            required=[str(r) for r in s.get("required", [])],
            default_step_on=str(s.get("default_step_on", "optimizer")),
        )
        for s in body["schedulers"]
    ]


def _parse_scheduler_step(response: httpx.Response) -> SchedulerStepResult:
    body = _json(response)
    version, step = _version_step(response, body)
    return SchedulerStepResult(
        lr=[float(x) for x in body.get("lr", [])], version=version, step=step, raw=body
    )


# --------------------------------------------------------------------------- request bodies
def _json_body(obj: Any) -> tuple[bytes, str]:
    return json_dumps(obj), JSON


def _tensor_body(
    tensors: Mapping[str, WireTensor | SparseWire], key: str, binary: bool
) -> tuple[bytes | Body, str]:
    if binary:
        return _safetensors.body(_sparse.safetensors_map(tensors)), OCTET_STREAM
    return _json_body({key: _sparse.json_map(tensors)})


def _options_json(options: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(options).__name__}")
    encoded = T.tree_to_json(dict(options))
    assert isinstance(encoded, dict)
    return encoded


def _named(
    params: ParamsArg | Iterable[tuple[str, TensorLike]], start: int, what: str
) -> dict[str, WireTensor]:
    """``{name: tensor}``, ``[(name, tensor), ...]`` or ``[tensor, ...]`` (named by position
    from ``start``) to wire tensors."""
    if T.is_tensor(params):
        raise TypeError(f"{what} must be a mapping or a list of tensors, not a single tensor")
    if isinstance(params, Mapping):
        return T.encode_tensor_map(params, what)
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(f"{what} must be a mapping or a list of tensors, got "
                        f"{type(params).__name__}")
    out: dict[str, WireTensor] = {}
    for i, item in enumerate(params, start):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, tensor = item
        else:
            name, tensor = str(i), item
        if name in out:
            raise ValueError(f"{what}: parameter name {name!r} appears twice")
        out[name] = T.to_wire(tensor, f"{what}[{name!r}]")
    return out


def _groups(
    params: ParamsArg | None, param_groups: Sequence[ParamGroup] | None
) -> list[tuple[dict[str, WireTensor], dict[str, Any]]]:
    if (params is None) == (param_groups is None):
        raise ValueError("give params or param_groups (exactly one of them)")
    raw_groups: Sequence[ParamGroup] = (
        [{"params": params}] if param_groups is None else param_groups
    )
    if isinstance(raw_groups, Mapping) or not raw_groups:
        raise TypeError("param_groups must be a non-empty list of dicts")
    out: list[tuple[dict[str, WireTensor], dict[str, Any]]] = []
    seen: set[str] = set()
    for i, group in enumerate(raw_groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"param_groups[{i}] must be a dict with 'params'")
        tensors = _named(group["params"], len(seen), f"param_groups[{i}].params")
        dup = seen.intersection(tensors)
        if dup:
            raise ValueError(f"parameter name {sorted(dup)[0]!r} appears in two groups")
        seen.update(tensors)
        options = _options_json({k: v for k, v in group.items() if k != "params"},
                                f"param_groups[{i}]")
        out.append((tensors, options))
    return out


def _scheduler_json(scheduler: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    if isinstance(scheduler, str):
        return {"name": scheduler}
    return _options_json(scheduler, "scheduler")


# --------------------------------------------------------------------------- endpoints
def health() -> APICall[dict[str, Any]]:
    return APICall("GET", "/healthz", _parse_dict)


def ready() -> APICall[dict[str, Any]]:
    return APICall("GET", "/readyz", _parse_dict)


def list_optimizers() -> APICall[list[OptimizerInfo]]:
    return APICall("GET", "/v1/optimizers", _parse_optimizers)


def list_schedulers() -> APICall[list[SchedulerInfo]]:
    return APICall("GET", "/v1/schedulers", _parse_schedulers)


def create_session(
    optimizer: str,
    params: ParamsArg | None,
    *,
    param_groups: Sequence[ParamGroup] | None,
    options: Mapping[str, Any] | None,
    scheduler: str | Mapping[str, Any] | None,
    id: str | None,
    nonfinite: NonFinitePolicy | None,
    binary: bool,
    ps_options: Mapping[str, Any] | None = None,
) -> APICall[SessionInfo]:
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a torch.optim class name, got {optimizer!r}")
    tensors = _count(params) + sum(
        _count(g.get("params")) for g in (param_groups if isinstance(param_groups, Sequence)
                                          else ()) if isinstance(g, Mapping))
    with gc_paused(tensors):  # (the per-tensor encoding; see optserve._gc)
        return _create_call(optimizer, _groups(params, param_groups), options=options,
                            scheduler=scheduler, id=id, nonfinite=nonfinite, binary=binary,
                            ps_options=ps_options)


def _count(params: object) -> int:
    """How many tensors a ``params`` argument holds (0 when it cannot say without iterating)."""
    return len(params) if isinstance(params, (Mapping, Sequence)) else 0


def _create_call(
    optimizer: str, groups: list[tuple[dict[str, WireTensor], dict[str, Any]]], *,
    options: Mapping[str, Any] | None, scheduler: str | Mapping[str, Any] | None,
    id: str | None, nonfinite: NonFinitePolicy | None, binary: bool,
    ps_options: Mapping[str, Any] | None,
) -> APICall[SessionInfo]:
    fields: dict[str, Any] = {"optimizer": optimizer}
    if options:
        fields["options"] = _options_json(options, "options")
    sched = _scheduler_json(scheduler)
    if sched is not None:
        fields["scheduler"] = sched
    if id is not None:
        fields["id"] = id
    if nonfinite is not None:
        fields["nonfinite"] = nonfinite
    fields.update({k: v for k, v in (ps_options or {}).items() if v is not None})
    if binary:
        tensors = {name: w for g, _ in groups for name, w in g.items()}
        fields["param_groups"] = [{"params": list(g), **opts} for g, opts in groups]
        metadata = {k: json.dumps(v, allow_nan=False) for k, v in fields.items()}
        content: bytes | Body
        content, ctype = _safetensors.body(tensors, metadata), OCTET_STREAM
    else:
        fields["param_groups"] = [
            {"params": T.json_tensor_map(g), **opts} for g, opts in groups
        ]
        content, ctype = _json_body(fields)
    return APICall("POST", "/v1/sessions", _parse_session, content=content, content_type=ctype,
                   idempotent=False, gc_tensors=sum(len(g) for g, _ in groups))


def list_sessions() -> APICall[list[SessionInfo]]:
    return APICall("GET", "/v1/sessions", _parse_sessions)


def get_session(session_id: str, *, at_version: int | None = None) -> APICall[SessionInfo]:
    return APICall("GET", _sid(session_id), _parse_session, headers=_read_at(at_version))


def _read_at(at_version: int | None) -> dict[str, str]:
    """A conditional read's header: ``at_version`` as ``If-Match`` (the server answers 412
    when the answer would be of another version)."""
    if at_version is None:
        return {}
    if type(at_version) is not int or at_version < 0:
        raise ValueError(f"at_version must be a non-negative int, got {at_version!r}")
    return {"If-Match": f'"{at_version}"'}


def delete_session(session_id: str, *, base_version: int | None = None,
                   base_revision: int | None = None) -> APICall[None]:
    params, headers = _preconditions(base_version, base_revision)
    return APICall("DELETE", _sid(session_id), _parse_none, params=params, headers=headers)


def _preconditions(base_version: int | None, base_revision: int | None
                   ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """A conditional change's query and headers: ``base_version`` as ``If-Match``,
    ``base_revision`` as ``?base_revision=`` (the server answers 412 when the session is no
    longer at them, with nothing done)."""
    for name, value in (("base_version", base_version), ("base_revision", base_revision)):
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    params = [] if base_revision is None else [("base_revision", str(base_revision))]
    return params, {} if base_version is None else {"If-Match": f'"{base_version}"'}


def group_changes(param_groups: Mapping[int, Mapping[str, Any]] | None) -> dict[str, Any]:
    """Per-group option changes for a step body: ``{"<index>": {option: value}}``."""
    out: dict[str, Any] = {}
    for index, options in (param_groups or {}).items():
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"param group index must be a non-negative int, got {index!r}")
        if options:
            out[str(index)] = _options_json(options, f"param_groups[{index}]")
    return out


def step(
    session_id: str,
    grads: Mapping[str, TensorLike] | None,
    *,
    return_params: bool | Literal["touched"],
    binary: bool,
    worker: str | None = None,
    base_version: int | None = None,
    param_groups: Mapping[int, Mapping[str, Any]] | None = None,
    upcast: bool = False,
    params_dtype: str | None = None,
    scalars: Mapping[str, float] | None = None,
    into: Callable[[int], memoryview] | None = None,
    metrics: Literal["answer", "history"] = "answer",
) -> APICall[StepResult]:
    """``POST .../step``; its encoding with the collector paused for 1,000 gradients or more,
    the decoding of its answer for 1,000 parameters or more in it (see optserve._gc)."""
    with gc_paused(len(grads or {})):
        call = _step_call(session_id, _sparse.encode_tensor_map(grads or {}, "grads"),
                          return_params=return_params, binary=binary, worker=worker,
                          base_version=base_version, param_groups=param_groups, upcast=upcast,
                          params_dtype=params_dtype, scalars=scalars, into=into,
                          metrics=metrics)
    return dataclasses.replace(call, gc_tensors=None)


def _step_call(
    session_id: str,
    wires: Mapping[str, WireTensor | SparseWire],
    *,
    return_params: bool | Literal["touched"],
    binary: bool,
    worker: str | None,
    base_version: int | None,
    param_groups: Mapping[int, Mapping[str, Any]] | None,
    upcast: bool,
    params_dtype: str | None,
    scalars: Mapping[str, float] | None,
    into: Callable[[int], memoryview] | None,
    metrics: Literal["answer", "history"],
) -> APICall[StepResult]:
    extra: dict[str, Any] = {}
    changes = group_changes(param_groups)
    if changes:
        extra["param_groups"] = changes
    if scalars:
        extra["scalars"] = scalars_json(scalars)
    content, ctype = _tensors_with(wires, "grads", binary, extra)
    query: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    if upcast:
        query.append(("upcast", "true"))
    _narrow_query(query, params_dtype)
    if base_version is not None:
        if not isinstance(base_version, int) or isinstance(base_version, bool) \
                or base_version < 0:
            raise ValueError(f"base_version must be a non-negative int, got {base_version!r}")
        query.append(("base_version", str(base_version)))
    if worker is not None:
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"worker must be a non-empty string, got {worker!r}")
        headers[WORKER_HEADER] = worker
    if history_only(metrics):
        query.append(("metrics", "history"))
    # A sync-round push waits for the other workers; the server's round timeout bounds it.
    wait_s = None if worker is not None else 0.0
    if return_params == "touched":
        query.insert(0, ("return", "touched"))
    if return_params:
        return APICall("POST", _sid(session_id) + "/step", _parse_step, params=query,
                       content=content, content_type=ctype,
                       accept=OCTET_STREAM if binary else JSON, idempotent=False,
                       headers=headers, wait_s=wait_s, into=into)
    return APICall("POST", _sid(session_id) + "/step", _parse_step_no_params,
                   params=[("return", "none"), *query], content=content, content_type=ctype,
                   idempotent=False, headers=headers, wait_s=wait_s)


def history_only(metrics: str) -> bool:
    """Whether a step's ``metrics`` choice leaves its norms to the history (``"history"``)
    rather than the answer (``"answer"``, the default)."""
    if metrics not in ("answer", "history"):
        raise ValueError(f"metrics must be 'answer' or 'history', got {metrics!r}")
    return metrics == "history"


def scalars_json(scalars: Mapping[str, float]) -> dict[str, float]:
    """A step's client scalars (``{"loss": 0.3}``): plain finite floats (a 0-d tensor's value
    is taken); the server checks names and bounds."""
    out: dict[str, float] = {}
    for name, value in scalars.items():
        item = getattr(value, "item", None)
        number = float(item() if callable(item) else value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"scalar {name!r} must be finite, got {number}")
        out[str(name)] = number
    return out


def _tensors_with(wires: Mapping[str, WireTensor | SparseWire], key: str, binary: bool,
                  extra: Mapping[str, Any]) -> tuple[bytes | Body, str]:
    """Named tensors (row-sparse ones too) plus extra fields: JSON ``{key: ..., **extra}`` or
    safetensors with each extra field as JSON text in ``__metadata__``."""
    if not extra:
        return _tensor_body(wires, key, binary)
    if binary:
        metadata = {k: json.dumps(v, allow_nan=False) for k, v in extra.items()}
        return _safetensors.body(_sparse.safetensors_map(wires), metadata), OCTET_STREAM
    return _json_body({key: _sparse.json_map(wires), **extra})


def history(
    session_id: str, *, since: int | None = None, until: int | None = None,
    fields: Iterable[str] | None = None, points: int | None = None, csv: bool = False,
) -> APICall[Any]:
    """``GET .../history``: a :class:`History` (JSON) or the CSV text."""
    query: list[tuple[str, str]] = []
    for name, value in (("since", since), ("until", until), ("points", points)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
            query.append((name, str(value)))
    if fields is not None:
        names = [fields] if isinstance(fields, str) else list(fields)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"fields must name at least one field, each a non-empty string, "
                             f"got {names!r:.80} (None: every field)")
        query.append(("fields", ",".join(names)))
    if csv:
        return APICall("GET", _sid(session_id) + "/history", _parse_text, params=query,
                       accept="text/csv")
    return APICall("GET", _sid(session_id) + "/history", _parse_history, params=query)


def _parse_history(response: httpx.Response) -> History:
    return History.from_json(_json(response))


def _parse_text(response: httpx.Response) -> str:
    return response.text


def push_grads(
    session_id: str, grads: Mapping[str, TensorLike], *, binary: bool,
    scalars: Mapping[str, float] | None = None, upcast: bool = False,
) -> APICall[VersionInfo]:
    extra = {"scalars": scalars_json(scalars)} if scalars else {}
    content, ctype = _tensors_with(_sparse.encode_tensor_map(grads, "grads"), "grads", binary,
                                   extra)
    return APICall("POST", _sid(session_id) + "/grads", _parse_version,
                   params=[("upcast", "true")] if upcast else [], content=content,
                   content_type=ctype, idempotent=False)


def zero_grad(session_id: str) -> APICall[VersionInfo]:
    return APICall("POST", _sid(session_id) + "/zero_grad", _parse_version)


def _narrow_query(query: list[tuple[str, str]], params_dtype: str | None) -> None:
    """``?params_dtype=`` (a step's, a pull's): the parameters answered narrowed."""
    if params_dtype is not None:
        if params_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"params_dtype must be 'float16' or 'bfloat16', got {params_dtype!r}")
        query.append(("params_dtype", params_dtype))


def get_params(
    session_id: str, names: Iterable[str] | None, *, binary: bool,
    min_version: int | None = None, wait_s: float | None = None,
    at_version: int | None = None, params_dtype: str | None = None,
) -> APICall[ParamsResult]:
    headers = _read_at(at_version)
    query: list[tuple[str, str]] = []
    held = 0.0
    _narrow_query(query, params_dtype)
    if min_version is not None:
        if not isinstance(min_version, int) or isinstance(min_version, bool) or min_version < 0:
            raise ValueError(f"min_version must be a non-negative int, got {min_version!r}")
        query.append(("min_version", str(min_version)))
    if wait_s is not None:
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not wait_s >= 0:
            raise ValueError(f"wait_s must be a non-negative number, got {wait_s!r}")
        query.append(("wait_s", repr(float(wait_s))))
        held = min(float(wait_s), MAX_WAIT_S)
    if names is not None:
        if isinstance(names, str):
            names = [names]
        asked = len(query)
        for n in names:
            if not isinstance(n, str) or "," in n or not n:
                raise ValueError(f"cannot ask for parameter {n!r} by name (a comma separates "
                                 "names in ?names=); pull all parameters instead")
            query.append(("names", n))
        if len(query) == asked:  # (it pulled every parameter: the server refuses ?names=)
            raise ValueError("names must name at least one parameter; leave it out (None) to "
                             "pull them all")
    # (the collector paused while an answer of 1,000 tensors or more is decoded, not while a
    # long poll waits for it: see optserve._gc)
    return APICall("GET", _sid(session_id) + "/params", _parse_params, params=query,
                   accept=OCTET_STREAM if binary else JSON, wait_s=held, gc_tensors=None,
                   headers=headers)


#: at most this many rows travel in the query string (GET); more go in a body (POST)
ROWS_IN_QUERY = 256


def pull_rows(
    session_id: str, rows: Mapping[str, TensorLike], *, binary: bool,
    min_version: int | None = None, wait_s: float | None = None,
    params_dtype: str | None = None,
) -> APICall[ParamsResult]:
    """Some rows of some parameters: ``GET .../params?name=&rows=`` for one parameter and a
    few rows, else ``POST .../params/rows``."""
    if not isinstance(rows, Mapping) or not rows:
        raise TypeError("rows must map parameter names to row indices")
    with gc_paused(_count(rows)):  # (the per-tensor encoding; see optserve._gc)
        return _pull_rows_call(session_id, rows, binary=binary, min_version=min_version,
                               wait_s=wait_s, params_dtype=params_dtype)


def _pull_rows_call(
    session_id: str, rows: Mapping[str, TensorLike], *, binary: bool,
    min_version: int | None, wait_s: float | None, params_dtype: str | None,
) -> APICall[ParamsResult]:
    lists: dict[str, list[int]] = {}
    for name, idx in rows.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names are strings, got {name!r}")
        if isinstance(idx, (list, tuple)) and not idx:
            lists[name] = []  # (no rows: numpy and torch would make it a float array)
            continue
        wire = T.to_wire(idx, f"rows[{name!r}]")
        if wire.dtype not in ("int64", "int32", "int16", "int8", "uint8") or len(wire.shape) > 1:
            raise TypeError(f"rows[{name!r}]: row indices are a 1-D list of integers")
        lists[name] = [int(i) for i in T.wire_values(wire)]
    query: list[tuple[str, str]] = []
    held = 0.0
    if min_version is not None:
        query.append(("min_version", str(int(min_version))))
    if wait_s is not None:
        query.append(("wait_s", repr(float(wait_s))))
        held = min(float(wait_s), MAX_WAIT_S)
    _narrow_query(query, params_dtype)
    accept = OCTET_STREAM if binary else JSON
    (name, first), = list(lists.items())[:1]
    if len(lists) == 1 and len(first) <= ROWS_IN_QUERY and "," not in name:
        query = [("name", name), ("rows", ",".join(map(str, first))), *query]
        return APICall("GET", _sid(session_id) + "/params", _parse_params, params=query,
                       accept=accept, wait_s=held, gc_tensors=None)
    if binary:
        import numpy as np

        wires = {n: T.to_wire(np.asarray(v, dtype=np.int64), n) for n, v in lists.items()}
        content: bytes | Body
        content, ctype = _safetensors.body(wires), OCTET_STREAM
    else:
        content, ctype = _json_body({"rows": lists})
    return APICall("POST", _sid(session_id) + "/params/rows", _parse_params, params=query,
                   content=content, content_type=ctype, accept=accept, wait_s=held,
                   gc_tensors=None)


def _parse_evaluation(response: httpx.Response) -> StepResult | EvaluationRequest:
    """An LBFGS step's answer: its next question, or its end."""
    scalars, params = _tensor_response(response)
    if scalars.get("needs") == "evaluation":
        version, step = _version_step(response, scalars)
        return EvaluationRequest(step_id=str(scalars["step_id"]),
                                 evaluation=str(scalars["evaluation"]),
                                 evaluations=int(scalars["evaluations"]), version=version,
                                 step=step, params=params or {},
                                 timeout_s=float(scalars.get("timeout_s", 0.0)))
    result = _parse_step(response)
    loss = scalars.get("loss")
    return dataclasses.replace(
        result, loss=None if loss is None else T.number_from_wire(loss),
        evaluations=None if scalars.get("evaluations") is None else int(
            scalars["evaluations"]))


def _evaluation_body(loss: float | None, grads: Mapping[str, TensorLike] | None, binary: bool
                     ) -> tuple[bytes | Body, str]:
    if loss is None:
        return b"", JSON
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"loss must be a number, got {type(loss).__name__}")
    value = float(loss)
    wires = T.encode_tensor_map(grads or {}, "grads")
    text: Any = value if value == value and abs(value) != float("inf") else (
        "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity"))
    if binary:
        return _safetensors.body(wires, {"loss": json.dumps(text)}), OCTET_STREAM
    return _json_body({"loss": text, "grads": T.json_tensor_map(wires)})


def open_evaluation_step(
    session_id: str, loss: float | None, grads: Mapping[str, TensorLike] | None, *,
    binary: bool, return_params: bool = True, timeout_s: float | None = None,
) -> APICall[StepResult | EvaluationRequest]:
    """``POST .../step`` on an LBFGS session (with the first evaluation, if given). The
    collector is paused while 1,000 gradients or more are encoded and while an answer of 1,000
    tensors or more is decoded (see optserve._gc)."""
    with gc_paused(_count(grads)):
        content, ctype = _evaluation_body(loss, grads, binary)
    query: list[tuple[str, str]] = [] if return_params else [("return", "none")]
    if timeout_s is not None:
        query.append(("timeout_s", repr(float(timeout_s))))
    return APICall("POST", _sid(session_id) + "/step", _parse_evaluation, params=query,
                   content=content, content_type=ctype, accept=OCTET_STREAM if binary else JSON,
                   idempotent=False, gc_tensors=None)


def evaluate(
    session_id: str, eval_id: str, loss: float, grads: Mapping[str, TensorLike] | None, *,
    binary: bool,
) -> APICall[StepResult | EvaluationRequest]:
    """``POST .../step/{eval_id}``: safe to send again (the evaluation id names it). The
    collector paused as for :func:`open_evaluation_step`."""
    if not isinstance(eval_id, str) or not eval_id:
        raise ValueError(f"eval_id must be a non-empty string, got {eval_id!r}")
    with gc_paused(_count(grads)):
        content, ctype = _evaluation_body(loss, grads, binary)
    return APICall("POST", f"{_sid(session_id)}/step/{quote(eval_id, safe='')}",
                   _parse_evaluation, content=content, content_type=ctype,
                   accept=OCTET_STREAM if binary else JSON, idempotent=True, gc_tensors=None)


def abandon_step(session_id: str, step_id: str) -> APICall[dict[str, Any]]:
    return APICall("DELETE", f"{_sid(session_id)}/step/{quote(step_id, safe='')}", _parse_dict)


def configure_session(session_id: str, options: Mapping[str, Any], *,
                      base_version: int | None = None, base_revision: int | None = None
                      ) -> APICall[SessionInfo]:
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a mapping, got {type(options).__name__}")
    params, headers = _preconditions(base_version, base_revision)
    content, ctype = _json_body(dict(options))
    return APICall("PATCH", _sid(session_id), _parse_session, content=content,
                   content_type=ctype, params=params, headers=headers)


def put_params(
    session_id: str, params: Mapping[str, TensorLike], *, binary: bool,
    base_version: int | None = None, base_revision: int | None = None,
) -> APICall[ParamsResult]:
    """``PUT .../params``; the collector paused while 1,000 parameters or more are encoded and
    while an answer of 1,000 tensors or more is decoded (see optserve._gc)."""
    query, headers = _preconditions(base_version, base_revision)
    with gc_paused(_count(params)):
        content, ctype = _tensor_body(T.encode_tensor_map(params, "params"), "params", binary)
    return APICall("PUT", _sid(session_id) + "/params", _parse_params, content=content,
                   content_type=ctype, accept=OCTET_STREAM if binary else JSON,
                   gc_tensors=None, params=query, headers=headers)


def add_param_group(
    session_id: str,
    params: ParamsArg | Iterable[tuple[str, TensorLike]],
    options: Mapping[str, Any],
    *,
    start: int,
    binary: bool,
    base_version: int | None = None,
    base_revision: int | None = None,
) -> APICall[SessionInfo]:
    query, headers = _preconditions(base_version, base_revision)
    tensors = _named(params, start, "params")
    opts = _options_json(options, "options")
    if binary:
        metadata = {k: json.dumps(v, allow_nan=False) for k, v in opts.items()}
        content: bytes | Body
        content, ctype = _safetensors.body(tensors, metadata), OCTET_STREAM
    else:
        content, ctype = _json_body({"params": T.json_tensor_map(tensors), **opts})
    return APICall("POST", _sid(session_id) + "/param_groups", _parse_session, content=content,
                   content_type=ctype, idempotent=False, params=query, headers=headers)


def update_param_group(
    session_id: str, index: int, options: Mapping[str, Any], *,
    base_version: int | None = None, base_revision: int | None = None,
) -> APICall[SessionInfo]:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"param group index must be a non-negative int, got {index!r}")
    params, headers = _preconditions(base_version, base_revision)
    content, ctype = _json_body(_options_json(options, "options"))
    return APICall("PATCH", f"{_sid(session_id)}/param_groups/{index}", _parse_session,
                   content=content, content_type=ctype, params=params, headers=headers)


def _check_format(format: str) -> None:
    if format not in ("safetensors", "json", "torch"):
        raise ValueError(f"format must be 'safetensors', 'json' or 'torch', got {format!r}")


def export_state(session_id: str, *, format: StateFormat, at_version: int | None = None
                 ) -> APICall[dict[str, Any]]:
    _check_format(format)
    headers = _read_at(at_version)

    def parse(response: httpx.Response) -> dict[str, Any]:
        if format == "torch":
            return _load_torch(response.content)
        if format == "safetensors":
            if not _is_binary(response):
                raise ValueError("asked for a safetensors state dict, got "
                                 f"{response.headers.get('content-type')!r}")
            return T.decode_state_safetensors(response.content)
        return T.decode_state_json(_json(response))

    accept = JSON if format == "json" else OCTET_STREAM
    return APICall("GET", _sid(session_id) + "/state_dict", parse,
                   params=[("format", format)], accept=accept, headers=headers)


def export_state_at(session_id: str, *, format: StateFormat
                    ) -> APICall[tuple[dict[str, Any], int | None]]:
    """:func:`export_state`, with the session version the state is of (its header)."""
    call = export_state(session_id, format=format)

    def parse(response: httpx.Response) -> tuple[dict[str, Any], int | None]:
        return call.parse(response), _header_int(response, VERSION_HEADER)

    return APICall(call.method, call.path, parse, params=call.params, accept=call.accept,
                   headers=call.headers)


def export_state_if_changed(session_id: str, *, format: StateFormat,
                            last: StateExport | None, hold: bool = True
                            ) -> APICall[StateExport]:
    """:func:`export_state`, with the session version and revision the state is of, and
    conditional on ``last`` (a state of this session read before in this ``format``, none of
    its tensors changed in place since: see :class:`~optserve._last_export.StateExport`): sent
    with the state tag its answer gave, ``If-None-Match: "r<revision>.<token>"`` (the
    ``X-Optserve-State-Tag`` header, sent back as is), answered 304 (no body: ``last``'s state
    again) while the session is still the one read then (not one deleted and made again under
    its id, not restored by a restart since) at that revision (every change moves the
    revision: its state dict is as read then); a server that does not evaluate the tag, or
    gives none, answers the whole state. ``hold``: what is read is kept for a read after it
    (``RemoteOptimizer`` keeps it itself, once it laid it out)."""
    call = export_state(session_id, format=format)
    tag = None if last is None else last.since(session_id, format)
    headers = {} if tag is None else {"If-None-Match": tag}

    def parse(response: httpx.Response) -> StateExport:
        version = _header_int(response, VERSION_HEADER)
        answered = _header_int(response, REVISION_HEADER)
        answered_tag = response.headers.get(STATE_TAG_HEADER)
        if response.status_code == 304:
            if last is None or tag is None:
                raise ValueError("304 Not Modified to an unconditional read")
            return last.again(version, answered, answered_tag)
        read = StateExport(session_id, format, call.parse(response), version, answered,
                           tag=answered_tag)
        return read.kept_as_given() if hold else read

    return APICall(call.method, call.path, parse, params=call.params, accept=call.accept,
                   headers=headers)


def _load_torch(content: bytes) -> dict[str, Any]:
    try:
        import io

        import torch
    except ImportError as exc:  # pragma: no cover - needs an environment without torch
        raise TypeError(f"format='torch' needs torch ({TORCH_HINT})") from exc
    sd = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError("the torch.save file does not hold a dict")
    return sd


def import_state(
    session_id: str, state_dict: Mapping[str, Any] | bytes, *, format: StateFormat,
    base_version: int | None = None, base_revision: int | None = None,
) -> APICall[SessionInfo]:
    _check_format(format)
    conditions, headers = _preconditions(base_version, base_revision)
    if isinstance(state_dict, (bytes, bytearray, memoryview)):
        if format != "torch":
            raise TypeError("raw bytes are accepted only with format='torch' (a torch.save file)")
        content, ctype = bytes(state_dict), OCTET_STREAM
    elif not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    elif format == "torch":
        content, ctype = _torch_save(state_dict), OCTET_STREAM
    elif format == "safetensors":
        content, ctype = T.encode_state_safetensors(state_dict), OCTET_STREAM
    else:
        content, ctype = T.encode_state_json(state_dict), JSON
    return APICall("PUT", _sid(session_id) + "/state_dict", _parse_session,
                   params=[("format", format), *conditions], content=content,
                   content_type=ctype, headers=headers)


def _torch_save(state_dict: Mapping[str, Any]) -> bytes:
    try:
        import io

        import torch
    except ImportError as exc:  # pragma: no cover - needs an environment without torch
        raise TypeError(f"format='torch' needs torch ({TORCH_HINT})") from exc
    f = io.BytesIO()
    torch.save(dict(state_dict), f)
    return f.getvalue()


def scheduler_step(session_id: str, metric: float | None, *, base_version: int | None = None,
                   base_revision: int | None = None) -> APICall[SchedulerStepResult]:
    params, headers = _preconditions(base_version, base_revision)
    body: dict[str, Any] = {}
    if metric is not None:
        if isinstance(metric, bool):
            raise TypeError("metric must be a number")
        value = float(metric)
        # NaN and infinities as the protocol writes them ({"$float": "nan"}): JSON has no
        # literal for them (orjson would write null, which reads as no metric at all)
        body["metric"] = value if math.isfinite(value) else T._float_tag(value)
    content, ctype = _json_body(body)
    return APICall("POST", _sid(session_id) + "/scheduler/step", _parse_scheduler_step,
                   content=content, content_type=ctype, idempotent=False, params=params,
                   headers=headers)
