"""The OpenAPI document as a contract: request bodies (JSON and safetensors), responses in
both content types, and problem+json for every error. Routes read raw bodies for speed, so
their schemas are declared here and merged into FastAPI's generated document."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

JSON, BINARY, PROBLEM = "application/json", "application/octet-stream", "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


TENSOR_EXAMPLE = {"dtype": "float32", "shape": [1], "data": [2.0]}
SCHEMAS: dict[str, Any] = {
    "Tensor": {
        "type": "object",
        "description": "A JSON tensor: raw little-endian bytes in b64, or flat row-major data.",
        "required": ["dtype", "shape"],
        "properties": {
            "dtype": {"type": "string", "enum": ["float16", "bfloat16", "float32", "float64",
                                                 "int8", "int16", "int32", "int64", "uint8",
                                                 "bool"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                      "maxItems": 32},
            "data": {"type": "array", "items": {"oneOf": [
                {"type": "number"}, {"type": "boolean"},
                {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}},
            "b64": {"type": "string", "format": "byte"},
        },
        "example": TENSOR_EXAMPLE,
    },
    "Tensors": {"type": "object", "additionalProperties": _ref("Tensor"),
                "description": "Tensors by parameter name."},
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "code": {"type": "string", "description": "machine-readable reason"},
            "field": {"type": "string", "description": "the offending input, dotted path"},
            "request_id": {"type": "string"},
        },
        "additionalProperties": True,
        "example": {"type": "urn:optserve:problem:shape_mismatch", "title": "Invalid input",
                    "status": 422, "detail": "'x' has shape [1] but the tensor sent has [2]",
                    "code": "shape_mismatch", "field": "grads.x"},
    },
    "SchedulerSpec": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "options": {"type": "object"},
                       "step_on": {"type": "string", "enum": ["optimizer", "manual"]}},
        "example": {"name": "StepLR", "options": {"step_size": 10, "gamma": 0.1}},
    },
    "ParamGroup": {
        "type": "object", "required": ["params"],
        "properties": {"params": _ref("Tensors")},
        "additionalProperties": True,
        "description": "A param group: its tensors plus any optimizer options of its own.",
    },
    "CreateSession": {
        "type": "object", "required": ["optimizer"],
        "properties": {
            "optimizer": {"type": "string", "example": "SGD"},
            "options": {"type": "object"},
            "params": _ref("Tensors"),
            "param_groups": {"type": "array", "items": _ref("ParamGroup")},
            "scheduler": _ref("SchedulerSpec"),
            "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
            "nonfinite": {"type": "string", "enum": ["reject", "skip", "allow"]},
            "durability": {"type": "string", "enum": ["step", "interval", "memory"]},
            "sync": {"oneOf": [_ref("SyncOptions"), {"type": "null"}]},
            "max_staleness": {"type": ["integer", "null"], "minimum": 0},
            "staleness_lr": {"type": ["string", "null"], "enum": ["none", "inverse", None]},
            "shards": {"type": "integer", "minimum": 1, "maximum": 64,
                       "description": "split the parameters over this many session hosts"},
            "resources": _ref("Resources"),
            "placement": {"type": "string", "enum": ["pack", "spread"],
                          "description": "Ray engine: how to choose the session's host"},
        },
        "additionalProperties": True,
        "example": {"id": "seed", "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9},
                    "params": {"x": TENSOR_EXAMPLE},
                    "scheduler": {"name": "StepLR", "options": {"step_size": 10, "gamma": 0.1}}},
    },
    "Resources": {
        "type": "object",
        "description": "Ray engine: what the session's host asks Ray for (the embedded engine "
                       "ignores it). Fractions up to 1 (num_gpus 0.25: four hosts per GPU).",
        "properties": {
            "num_cpus": {"type": "number", "minimum": 0},
            "num_gpus": {"type": "number", "minimum": 0},
            "memory": {"type": "integer", "minimum": 0},
            "resources": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "additionalProperties": False,
        "example": {"num_gpus": 0.25, "num_cpus": 1},
    },
    "SyncOptions": {
        "type": "object",
        "description": "Synchronous rounds (parameter-server mode): each step waits for K "
                       "distinct workers (X-Optserve-Worker), then one step with the reduced "
                       "gradients answers them all. In a PATCH, fields merge into the current "
                       "ones.",
        "properties": {
            "workers": {"type": "integer", "minimum": 1, "maximum": 10000},
            "reduce": {"type": "string", "enum": ["mean", "sum"]},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
            "on_timeout": {"type": "string", "enum": ["fail", "apply_partial"]},
        },
        "additionalProperties": False,
        "example": {"workers": 4, "reduce": "mean", "timeout_s": 30, "on_timeout": "fail"},
    },
    "PsOptions": {
        "type": "object",
        "description": "Parameter-server options to change (absent fields keep their value).",
        "properties": {
            "sync": {"oneOf": [_ref("SyncOptions"), {"type": "null"}]},
            "max_staleness": {"type": ["integer", "null"], "minimum": 0},
            "staleness_lr": {"type": ["string", "null"], "enum": ["none", "inverse", None]},
        },
        "additionalProperties": False,
        "example": {"sync": {"workers": 2}},
    },
    "Session": {
        "type": "object",
        "required": ["id", "optimizer", "device", "version", "step", "defaults", "param_groups"],
        "properties": {
            "id": {"type": "string"}, "optimizer": {"type": "string"},
            "device": {"type": "string"}, "version": {"type": "integer"},
            "step": {"type": "integer"}, "lr": {"type": "array", "items": {"type": "number"}},
            "defaults": {"type": "object"},
            "param_groups": {"type": "array", "items": {"type": "object"}},
            "scheduler": {"type": ["object", "null"]},
        },
        "additionalProperties": True,
    },
    "Grads": {"type": "object", "properties": {"grads": _ref("Tensors")},
              "additionalProperties": True,
              "example": {"grads": {"x": {"dtype": "float32", "shape": [1], "data": [16.0]}}}},
    "Params": {"type": "object", "properties": {"params": _ref("Tensors")},
               "additionalProperties": True},
    "StepResult": {
        "type": "object", "required": ["version", "step", "lr"],
        "properties": {"version": {"type": "integer"}, "step": {"type": "integer"},
                       "lr": {"type": "array", "items": {"type": "number"}},
                       "skipped": {"type": "boolean"},
                       "nonfinite": {"type": "array", "items": {"type": "string"}},
                       "sync": {"type": "object", "description": "a sync round's step: "
                                "workers that contributed, expected K, partial"},
                       "staleness": {"type": "integer"},
                       "params": _ref("Tensors")},
        "additionalProperties": True,
        "example": {"version": 1, "step": 1, "lr": [0.1], "skipped": False,
                    "params": {"x": {"dtype": "float32", "shape": [1], "data": [0.39999998]}}},
    },
    "StateDict": {
        "type": "object",
        "description": "torch's state_dict shape with JSON tensors; optional scheduler state.",
        "properties": {"state": {"type": "object"},
                       "param_groups": {"type": "array", "items": {"type": "object"}},
                       "scheduler": {"type": "object"}},
        "additionalProperties": True,
    },
    "Object": {"type": "object", "additionalProperties": True},
}

_SAFETENSORS = {"schema": {"type": "string", "format": "binary"},
                "description": "a safetensors file (see docs/protocol.md)"}
_ERRORS = {
    "400": "Malformed body (not JSON / not safetensors)",
    "401": "Missing or wrong API key",
    "404": "Unknown session",
    "406": "Accept names neither JSON nor octet-stream",
    "409": "Conflict (id taken, scheduler exhausted, duplicate push, round timeout, stale "
           "gradient)",
    "413": "Body larger than OPTSERVE_MAX_BODY_MB",
    "415": "Content-Type neither JSON nor octet-stream",
    "422": "Invalid input (shape, dtype, option, state...)",
    "429": "A per-tenant limit is reached",
}


def _body(schema: str, binary: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": _ref(schema)}}
    if binary:
        content[BINARY] = _SAFETENSORS
    return {"required": False, "content": content}


def _ok(schema: str, binary: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": _ref(schema)}}
    if binary:
        content[BINARY] = _SAFETENSORS
    return {"description": "OK", "content": content}


# (method, path) -> (operationId, request body schema or None, success schema, binary out)
OPERATIONS: dict[tuple[str, str], tuple[str, str | None, str | None, bool]] = {
    ("get", "/v1/optimizers"): ("listOptimizers", None, "Object", False),
    ("get", "/v1/schedulers"): ("listSchedulers", None, "Object", False),
    ("get", "/v1/sessions"): ("listSessions", None, "Object", False),
    ("post", "/v1/sessions"): ("createSession", "CreateSession", "Session", False),
    ("get", "/v1/sessions/{session_id}"): ("getSession", None, "Session", False),
    ("delete", "/v1/sessions/{session_id}"): ("deleteSession", None, None, False),
    ("patch", "/v1/sessions/{session_id}"): ("configureSession", "PsOptions", "Session", False),
    ("post", "/v1/sessions/{session_id}/step"): ("step", "Grads", "StepResult", True),
    ("post", "/v1/sessions/{session_id}/grads"): ("pushGrads", "Grads", "Object", False),
    ("post", "/v1/sessions/{session_id}/zero_grad"): ("zeroGrad", None, "Object", False),
    ("get", "/v1/sessions/{session_id}/params"): ("getParams", None, "Params", True),
    ("put", "/v1/sessions/{session_id}/params"): ("putParams", "Params", "Params", True),
    ("post", "/v1/sessions/{session_id}/param_groups"): ("addParamGroup", "ParamGroup",
                                                         "Session", False),
    ("patch", "/v1/sessions/{session_id}/param_groups/{index}"): ("updateParamGroup", "Object",
                                                                  "Session", False),
    ("post", "/v1/sessions/{session_id}/scheduler/step"): ("schedulerStep", "Object", "Object",
                                                           False),
    ("get", "/v1/sessions/{session_id}/state_dict"): ("exportState", None, "StateDict", True),
    ("put", "/v1/sessions/{session_id}/state_dict"): ("importState", "StateDict", "Session",
                                                      False),
}


_VERSION_TAG = {"type": "string", "pattern": '^(W/)?"?[0-9]{1,18}"?$', "example": '"5"'}
# Headers the routes read from the request directly (so FastAPI cannot list them).
HEADERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("post", "/v1/sessions/{session_id}/step"): [
        {"name": "X-Optserve-Worker", "in": "header", "required": False,
         "description": "the pushing worker's id; required by sessions with sync rounds",
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"}},
        {"name": "If-Match", "in": "header", "required": False,
         "description": "the version the gradients were computed from (as ?base_version=)",
         "schema": _VERSION_TAG},
    ],
    ("get", "/v1/sessions/{session_id}/params"): [
        {"name": "If-None-Match", "in": "header", "required": False,
         "description": "304 when the current version is one of these",
         "schema": {"type": "string", "example": '"5"'}},
    ],
}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                          description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        components.update(SCHEMAS)
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "OPTSERVE_API_KEYS; absent keys = open server"}}
        for path, methods in doc.get("paths", {}).items():
            for method, op in methods.items():
                spec = OPERATIONS.get((method, path))
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if spec is not None:
                    op_id, body, ok, binary_out = spec
                    op["operationId"] = op_id
                    if body is not None:
                        op["requestBody"] = _body(body, binary=body in ("Grads", "Params",
                                                                          "CreateSession",
                                                                          "ParamGroup",
                                                                          "StateDict"))
                    code = next(iter(k for k in responses if k.startswith("2")), "200")
                    if ok is not None:
                        responses[code] = _ok(ok, binary_out)
                if (method, path) in HEADERS:
                    op.setdefault("parameters", []).extend(HEADERS[(method, path)])
                if (method, path) == ("get", "/v1/sessions/{session_id}/params"):
                    responses["304"] = {"description": "Not modified (If-None-Match names the "
                                                       "current version)"}
                if path == "/metrics":
                    responses["200"] = {"description": "Prometheus text exposition format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}
                if path != "/healthz":
                    op["security"] = [{"bearer": []}, {}]
                for status, text in _ERRORS.items():
                    responses.setdefault(status, {
                        "description": text,
                        "content": {PROBLEM: {"schema": _ref("Problem")}}})
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
