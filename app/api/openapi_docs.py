"""The OpenAPI document as a contract: request bodies (JSON and safetensors), responses in
both content types with their headers, and problem+json for every error.

Routes read raw bodies for speed, so their schemas are declared here (``SCHEMAS``) and merged
into FastAPI's generated document; ``tests/unit/test_openapi_schemas.py`` checks them against
bodies the server really accepts and refuses. Everything per operation comes from one table,
``OPERATIONS``; what every mutating operation shares is one list each
(``MUTATING_HEADERS``, ``MUTATING_PROBLEMS``), so adding a header or a problem status to all
of them is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from fastapi import FastAPI

JSON, BINARY, PROBLEM = "application/json", "application/octet-stream", "application/problem+json"
TEXT = "text/plain"
CSV = "text/csv"
MUTATING = frozenset({"post", "put", "patch", "delete"})
MAX_NAME = 512  # app.engine.session.MAX_NAME: a parameter name's length
MAX_DIMS = 32  # app.wire.dtypes.MAX_DIMS
MAX_EXTENT = 2**48  # app.wire.json_tensor.MAX_EXTENT: a shape's product bound
MAX_STALENESS = 2**62  # app.engine.ps: max_staleness range
SESSION_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
WORKER_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"


def _ref(name: str, kind: str = "schemas") -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


TENSOR_EXAMPLE = {"dtype": "float32", "shape": [1], "data": [2.0]}
_TENSOR_MAP = {"type": "object", "additionalProperties": _ref("Tensor"),
               "propertyNames": {"minLength": 1, "maxLength": MAX_NAME}}
_SCALARS = {"type": "object", "maxProperties": 16,
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_./:-]{0,63}$"},
            "additionalProperties": {"type": "number"},
            "description": "the client's own scalars (loss, accuracy, ...) recorded with this "
                           "step in the session's history: at most 16, finite numbers",
            "example": {"loss": 0.25}}
_SESSION_OPTIONS: dict[str, Any] = {
    "metrics": {"type": ["boolean", "null"],
                "description": "per-step gradient, update and parameter norms on the device "
                               "(default: OPTSERVE_METRICS)"},
    "history": {"type": ["integer", "null"], "minimum": 0, "maximum": 10_000_000,
                "description": "rows of per-step metrics the session keeps (a ring; default "
                               "OPTSERVE_HISTORY_STEPS)"},
}
_PS_PROPERTIES: dict[str, Any] = {
    "max_staleness": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_STALENESS,
                      "description": "asynchronous pushes: refuse (409 stale_gradient) a "
                                     "gradient computed more than this many versions ago"},
    "staleness_lr": {"type": "string", "enum": ["none", "inverse"],
                     "description": "inverse: a push s versions old steps with every "
                                    "group's lr divided by 1 + s (that step only)"},
}

SCHEMAS: dict[str, Any] = {
    "Tensor": {
        "type": "object",
        "description": "A JSON tensor: flat row-major `data` (exactly prod(shape) values) or "
                       "raw little-endian bytes in `b64`, never both. Non-finite values in "
                       "`data` are the strings \"NaN\", \"Infinity\", \"-Infinity\". Parameters "
                       "and gradients are floating point; the other dtypes appear in state "
                       "dicts.",
        "required": ["dtype", "shape"],
        "properties": {
            "dtype": {"type": "string", "enum": ["float16", "bfloat16", "float32", "float64",
                                                 "int8", "int16", "int32", "int64", "uint8",
                                                 "bool"]},
            "shape": {"type": "array", "maxItems": MAX_DIMS,
                      "items": {"type": "integer", "minimum": 0, "maximum": MAX_EXTENT}},
            "data": {"type": "array", "items": {"oneOf": [
                {"type": "number"}, {"type": "boolean"},
                {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}},
            "b64": {"type": "string", "format": "byte",
                    "pattern": "^[A-Za-z0-9+/]*={0,2}$"},
        },
        "oneOf": [{"required": ["data"]}, {"required": ["b64"]}],
        "additionalProperties": False,
        "example": TENSOR_EXAMPLE,
    },
    "Tensors": {**_TENSOR_MAP, "description": "Tensors by parameter name."},
    "ParamTensors": {**_TENSOR_MAP, "minProperties": 1,
                     "description": "Tensors by parameter name, at least one."},
    "SparseTensor": {
        "type": "object",
        "description": "Some rows of a parameter (a row-sparse gradient, or rows pulled): row "
                       "indices and one row of values each; duplicates allowed in gradients "
                       "(summed). In safetensors bodies: '<name>.indices' (int64 [n]) and "
                       "'<name>.values' ([n, ...]).",
        "required": ["indices", "values"],
        "properties": {
            "dtype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                      "description": "the parameter's (dense) shape"},
            "indices": {"anyOf": [{"type": "array", "items": {"type": "integer",
                                                                "minimum": 0}},
                                  _ref("Tensor")]},
            "values": _ref("Tensor"),
        },
        "example": {"dtype": "float32", "shape": [1000, 2], "indices": [3, 17],
                    "values": {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4]}},
    },
    "MaybeSparseTensors": {"type": "object",
                           "additionalProperties": {"anyOf": [_ref("Tensor"),
                                                              _ref("SparseTensor")]},
                           "description": "Tensors by parameter name, dense or row-sparse."},
    "Rows": {"type": "object", "required": ["rows"],
             "properties": {"rows": {
                 "type": "object", "description": "rows to pull by parameter name: a list of "
                 "row indices, or an int64 JSON tensor of shape [n]",
                 "additionalProperties": {"anyOf": [
                     {"type": "array", "items": {"type": "integer", "minimum": 0}},
                     _ref("Tensor")]}}},
             "additionalProperties": False,
             "example": {"rows": {"emb": [1, 5, 9]}}},
    "Evaluation": {
        "type": "object", "required": ["loss"],
        "description": "An LBFGS evaluation: the loss and gradients at the parameters asked.",
        "properties": {"loss": {"anyOf": [{"type": "number"}, {"type": "string", "enum": [
                           "NaN", "Infinity", "-Infinity"]}]},
                       "grads": _ref("Tensors")},
        "additionalProperties": False,
        "example": {"loss": 0.25, "grads": {"x": {"dtype": "float32", "shape": [1],
                                                  "data": [0.5]}}},
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
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
        "additionalProperties": False,
        "example": {"name": "StepLR", "options": {"step_size": 10, "gamma": 0.1}},
    },
    "ParamGroup": {
        "type": "object", "required": ["params"],
        "properties": {"params": {**_TENSOR_MAP, "description": "Tensors by parameter name; "
                                  "a group may have none, as torch's may."}},
        "additionalProperties": True,
        "description": "A param group: its tensors plus any optimizer options of its own.",
        "example": {"params": {"y": TENSOR_EXAMPLE}, "lr": 0.01},
    },
    "GroupOptions": {
        "type": "object",
        "description": "Optimizer options of one param group to change (lr, momentum, ...). "
                       "Each replaces the group's value (torch's group[\"lr\"] = v), but "
                       "those \"$fill\" lists (\"$fill\": [\"lr\"]): each of those is "
                       "filled into the tensor the group holds, as a torch scheduler fills a "
                       "tensor lr, so every group and the defaults holding that tensor follow.",
        "not": {"required": ["params"]},
        "example": {"lr": 0.05},
    },
    "CreateSession": {
        "type": "object", "required": ["optimizer"],
        "description": "Exactly one of params (one param group) and param_groups.",
        "properties": {
            "optimizer": {"type": "string", "example": "SGD"},
            "options": {"type": "object"},
            "params": _ref("ParamTensors"),
            "param_groups": {"type": "array", "minItems": 1, "items": _ref("ParamGroup"),
                             "contains": {"type": "object",
                                          "properties": {"params": {"minProperties": 1}}},
                             "description": "param groups; some group must have a "
                                            "parameter"},
            "scheduler": _nullable(_ref("SchedulerSpec")),
            "id": {"type": ["string", "null"], "pattern": SESSION_ID_PATTERN},
            "nonfinite": {"type": ["string", "null"], "enum": ["reject", "skip", "allow", None]},
            "durability": {"type": ["string", "null"],
                           "enum": ["step", "interval", "memory", None]},
            "sync": _nullable({"allOf": [_ref("SyncOptions")], "required": ["workers"]}),
            **_PS_PROPERTIES,
            **_SESSION_OPTIONS,
            "shards": {"type": "integer", "minimum": 1, "maximum": 64,
                       "description": "split the parameters over this many session hosts"},
            "resources": _ref("Resources"),
            "placement": {"type": "string", "enum": ["pack", "spread"],
                          "description": "Ray engine: how to choose the session's host"},
        },
        "oneOf": [{"required": ["params"]}, {"required": ["param_groups"]}],
        "additionalProperties": False,
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
        "description": "Session options to change (absent fields keep their value): the "
                       "parameter-server ones, metrics, history, and scheduler (null only: "
                       "removes the session's scheduler).",
        "properties": {"sync": _nullable(_ref("SyncOptions")), **_PS_PROPERTIES,
                       "metrics": {"type": "boolean",
                                   "description": _SESSION_OPTIONS["metrics"]["description"]},
                       "history": {**_SESSION_OPTIONS["history"], "type": "integer"},
                       "scheduler": {"type": "null",
                                     "description": "null removes the session's scheduler "
                                                    "(the groups keep their lr): the way out "
                                                    "of a schedule refused with 409 "
                                                    "scheduler_out_of_range that a PATCH of "
                                                    "the lr cannot steer, and of one torch "
                                                    "cannot step on (422 scheduler_failed, "
                                                    "409 scheduler_exhausted). A scheduler is "
                                                    "given only at create."}},
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
            "revision": {"type": "integer", "minimum": 0,
                         "description": "every change applied to the session, counted (steps, "
                                        "imports, overwrites, option changes, scheduler "
                                        "steps...; not pushes or zero_grad): what a "
                                        "conditional import's ?base_revision= names"},
            "defaults": {"type": "object"},
            "param_groups": {"type": "array", "items": {"type": "object"}},
            "scheduler": {"type": ["object", "null"]},
            "shared_tensors": {
                "type": "array", "items": {"type": "array", "items": {"type": "array"}},
                "description": "the option slots that hold one tensor, one list per tensor "
                               "held by more than one: [\"defaults\", key] or [group index, "
                               "key] (a tensor lr given as the default is the defaults' and "
                               "every group's built from them, as in torch); left out where "
                               "there are none"},
            "replayed": {"type": "boolean", "enum": [True],
                         "description": "the answer to a repeated Idempotency-Key (a create, "
                                        "a PATCH, a param group added or changed, an import): "
                                        "nothing was applied again, the session is described "
                                        "as it is now; left out otherwise"},
        },
        "additionalProperties": True,
    },
    "SessionList": {
        "type": "object", "required": ["sessions"],
        "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
    },
    "Grads": {"type": "object", "properties": {"grads": _ref("MaybeSparseTensors"),
                                               "scalars": _SCALARS},
              "additionalProperties": False,
              "description": "Gradients by parameter name; a parameter left out has no "
                             "gradient this step (torch skips it). Scalars sent with a push "
                             "(/grads) are recorded with the next step (several values for "
                             "one name: their mean). In a safetensors body, scalars are the "
                             "JSON text of __metadata__.scalars.",
              "example": {"grads": {"x": {"dtype": "float32", "shape": [1], "data": [16.0]}}}},
    "StepRequest": {
        "description": "A step's gradients (StepBody); on an LBFGS session, which opens a step "
                       "that asks for evaluations, nothing (`{}`) or its first evaluation, the "
                       "loss and gradients at the current parameters (Evaluation: one round "
                       "trip fewer)",
        "anyOf": [_ref("StepBody"), _ref("Evaluation")],
    },
    "StepBody": {"type": "object",
                 "properties": {
                     "grads": _ref("MaybeSparseTensors"),
                     "param_groups": {
                         "description": "option changes made atomically with this step, by "
                                        "group index (an object keyed by index, or a list; "
                                        "validated like PATCH .../param_groups/{i}: a "
                                        "refused option fails the whole step; an entry's "
                                        "\"$fill\": [\"lr\"] fills the tensor lr the group "
                                        "holds, as a torch scheduler does, instead of "
                                        "replacing the group's value)",
                         "oneOf": [{"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                                    "additionalProperties": {"type": "object"}},
                                   {"type": "array", "items": {"type": ["object", "null"]}}]},
                     "scalars": _SCALARS,
                 },
                 "additionalProperties": False,
                 "description": "Gradients by parameter name (a parameter left out has no "
                                "gradient this step), option changes for the step, and the "
                                "client's own scalars to record with it.",
                 "example": {"grads": {"x": {"dtype": "float32", "shape": [1],
                                             "data": [16.0]}},
                             "param_groups": {"0": {"lr": 0.05}}}},
    "ParamsBody": {"type": "object", "required": ["params"],
                   "properties": {"params": _ref("ParamTensors")},
                   "additionalProperties": False,
                   "example": {"params": {"x": TENSOR_EXAMPLE}}},
    "Params": {"type": "object", "required": ["version", "step", "lr", "params"],
               "properties": {"version": {"type": "integer"}, "step": {"type": "integer"},
                              "lr": {"type": "array", "items": {"type": "number"}},
                              "params": _ref("MaybeSparseTensors")},
               "additionalProperties": True},
    "Version": {"type": "object", "required": ["version", "step"],
                "properties": {"version": {"type": "integer"}, "step": {"type": "integer"}},
                "additionalProperties": True},
    "SchedulerStep": {"type": "object",
                      "properties": {"metric": {
                          "description": "ReduceLROnPlateau's metric; NaN and +-inf (which "
                                         "JSON has no literal for) as {\"$float\": \"nan\"}, "
                                         "\"inf\" or \"-inf\", taken as torch takes them",
                          "anyOf": [{"type": ["number", "null"]},
                                    {"type": "object", "required": ["$float"],
                                     "properties": {"$float": {
                                         "type": "string", "enum": ["nan", "inf", "-inf"]}},
                                     "additionalProperties": False}]}},
                      "additionalProperties": False, "example": {"metric": 0.5}},
    "StepAnswer": {
        "description": "A step's end (StepResult), or, on an LBFGS session, a question "
                       "asking for the loss and gradients at params (EvaluationQuestion: "
                       "`needs` is `evaluation`; it carries no `lr`).",
        "oneOf": [_ref("StepResult"), _ref("EvaluationQuestion")],
    },
    "EvaluationQuestion": {
        "type": "object",
        "required": ["needs", "step_id", "evaluation", "evaluations", "version", "step",
                     "timeout_s", "params"],
        "description": "LBFGS: the open step waits for the loss and gradients at params, "
                       "posted to POST .../step/{evaluation} (docs/protocol.md, \"LBFGS: the "
                       "closure as a round trip\")",
        "properties": {"needs": {"type": "string", "enum": ["evaluation"]},
                       "step_id": {"type": "string", "description": "the open step (DELETE "
                                   ".../step/{step_id} abandons it)"},
                       "evaluation": {"type": "string", "description": "the evaluation "
                                      "asked for"},
                       "evaluations": {"type": "integer", "description": "evaluations "
                                       "taken so far"},
                       "version": {"type": "integer"}, "step": {"type": "integer"},
                       "timeout_s": {"type": "number", "description": "how long the step "
                                     "waits for this evaluation"},
                       "replayed": {"type": "boolean"},
                       "params": _ref("Tensors")},
        "additionalProperties": True,
        "example": {"needs": "evaluation", "step_id": "aa2a9536ae9d1cdb",
                    "evaluation": "aa2a9536ae9d1cdb.1", "evaluations": 0, "version": 0,
                    "step": 0, "timeout_s": 60.0,
                    "params": {"x": {"dtype": "float64", "shape": [1], "data": [1.5]}}},
    },
    "StepResult": {
        "type": "object", "required": ["version", "step", "lr"],
        "properties": {"version": {"type": "integer"}, "step": {"type": "integer"},
                       "lr": {"type": "array", "items": {"type": "number"}},
                       "skipped": {"type": "boolean"},
                       "nonfinite": {"type": "array", "items": {"type": "string"}},
                       "sync": {"type": "object", "description": "a sync round's step: "
                                "workers that contributed, expected K, partial"},
                       "staleness": {"type": "integer"},
                       "loss": {"type": "number", "description": "LBFGS: the first "
                                "evaluation's loss"},
                       "evaluations": {"type": "integer", "description": "LBFGS: the "
                                       "closure calls the step took"},
                       "replayed": {"type": "boolean", "description": "answered from its "
                                    "Idempotency-Key (or a committed evaluation's repeat)"},
                       "params_version": {"type": "integer", "description": "a replay's: "
                                          "the version of the params it carries, when the "
                                          "session moved on since"},
                       "metrics": _ref("StepMetrics"),
                       "params": _ref("MaybeSparseTensors")},
        "additionalProperties": True,
        "example": {"version": 1, "step": 1, "lr": [0.1], "skipped": False,
                    "params": {"x": {"dtype": "float32", "shape": [1], "data": [0.39999998]}}},
    },
    "StepMetrics": {
        "type": "object", "required": ["n", "time", "groups", "nonfinite"],
        "description": "This step's metrics (also its row in the session's history; absent "
                       "with ?metrics=history). Norms are L2, each tensor's taken in its own "
                       "dtype on the device (as torch.nn.utils.clip_grad_norm_ takes them) and "
                       "combined in Python floats; a session with metrics off has only lr per "
                       "group. Non-finite values are {\"$float\": \"inf\"}.",
        "properties": {
            "n": {"type": "integer", "description": "the history row (steps of the session, "
                                                    "skipped ones included)"},
            "time": {"type": "number", "description": "wall time of the step (Unix seconds)"},
            "groups": {"type": "array", "items": {
                "type": "object",
                "properties": {k: {"oneOf": [{"type": "number"}, {"type": "object"}]}
                               for k in ("lr", "grad_norm", "update_norm", "param_norm",
                                         "update_ratio")},
                "description": "lr: the lr this update used; grad_norm: of the gradient "
                               "stepped with; update_norm: of theta_after - theta_before; "
                               "param_norm: after the step; update_ratio: their quotient"}},
            "nonfinite": {"type": "integer", "description": "non-finite gradient values"},
            "staleness": {"type": "integer"},
            "workers": {"type": "array", "items": {"type": "string"}},
            "scalars": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "additionalProperties": True,
    },
    "History": {
        "type": "object", "required": ["id", "capacity", "rows", "fields", "columns"],
        "description": "Rows of per-step metrics, columnar. With ?points=, every column X is "
                       "X.min and X.max per bucket of consecutive rows. Absent values are "
                       "null; infinities {\"$float\": \"inf\"}.",
        "properties": {
            "id": {"type": "string"},
            "capacity": {"type": "integer", "description": "rows the session keeps"},
            "first": {"type": ["integer", "null"], "description": "oldest n still kept"},
            "last": {"type": ["integer", "null"], "description": "newest n"},
            "rows": {"type": "integer", "description": "rows selected (before downsampling)"},
            "points": {"type": ["integer", "null"]},
            "fields": {"type": "array", "items": {"type": "string"}},
            "columns": {"type": "object", "additionalProperties": {"type": "array"}},
        },
        "additionalProperties": False,
        "example": {"id": "seed", "capacity": 100000, "first": 1, "last": 2, "rows": 2,
                    "points": None, "fields": ["n", "scalars.loss"],
                    "columns": {"n": [1, 2], "scalars.loss": [0.5, 0.25]}},
    },
    "StateDict": {
        "type": "object",
        "description": "torch's state_dict shape with JSON tensors; optional scheduler state.",
        "properties": {"state": {"type": "object"},
                       "param_groups": {"type": "array", "items": {"type": "object"}},
                       "scheduler": {"type": ["object", "null"]}},
        "additionalProperties": True,
    },
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string", "enum": ["ok"]}}},
    "Ready": {"type": "object", "required": ["status", "device"],
              "properties": {"status": {"type": "string", "enum": ["ready"]},
                             "device": {"type": "string"},
                             "refused": {"type": "array", "items": {"type": "object"}}}},
    "Object": {"type": "object", "additionalProperties": True},
    "Transport": {"type": "object", "required": ["local"],
                  "description": "The same-host transport's Unix socket: told only to "
                                 "clients on the server's machine (null otherwise)",
                  "properties": {"local": _nullable({
                      "type": "object", "required": ["socket", "protocol"],
                      "properties": {"socket": {"type": "string"},
                                     "protocol": {"type": "integer"},
                                     "port": _nullable({
                                         "type": "integer",
                                         "description": "the TCP port this request reached "
                                                        "(a client that dialled another one "
                                                        "talks through a proxy)"})}})}},
}

# ----------------------------------------------------------------------------- headers
_VERSION_TAG = {"type": "string", "pattern": '^(W/)?"?[0-9]{1,18}"?$', "example": '"5"'}
_MATCH_MEMBER = '((W/)?"[0-9]{1,18}"|[0-9]{1,18})'
#: a strict precondition's If-Match: *, or a list of versions (RFC 9110 13.1.1)
_MATCH_LIST = {"type": "string", "example": '"5"',
               "pattern": f"^([*]|{_MATCH_MEMBER}([ \\t]*,[ \\t]*{_MATCH_MEMBER})*)$"}
# (each is required where an answer lists it: the server always sends it there)
RESPONSE_HEADERS: dict[str, Any] = {
    "X-Request-Id": {"description": "this request's id (the client's own X-Request-Id when it "
                                    "is 1-128 of [A-Za-z0-9._:-], else a new one); also in "
                                    "problem bodies and the server log",
                     "schema": {"type": "string"}},
    "ETag": {"description": "the session's version, quoted (\"5\"): send it back in "
                            "If-None-Match or If-Match", "schema": _VERSION_TAG},
    "X-Optserve-Version": {"description": "the session's version (rises with every applied "
                                          "step, overwrite or state import)",
                           "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "X-Optserve-Step": {"description": "optimizer steps taken (torch's step count)",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "X-Optserve-Revision": {"description": "the session's revision (rises with every change "
                                           "applied to it, option changes included): send it "
                                           "back as a state import's ?base_revision=",
                            "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "X-Optserve-State-Tag": {"description": "the state dict's tag, quoted (\"r<revision>."
                                            "<token>\": the session's revision and a token "
                                            "minted with each creation or restore of it): send "
                                            "it back as is in If-None-Match",
                             "schema": {"type": "string",
                                        "pattern": "^\"r[0-9]+\\.[0-9a-f]+\"$"}},
    "Location": {"description": "the new session's URL path",
                 "schema": {"type": "string", "example": "/v1/sessions/seed"}},
    "GroupLocation": {"description": "the new param group's URL path (PATCH it there to change "
                                     "its options), also on a replayed addition",
                      "schema": {"type": "string",
                                 "example": "/v1/sessions/seed/param_groups/1"}},
    "Idempotent-Replayed": {"description": "true: the answer to a repeated Idempotency-Key "
                                           "(nothing was applied again)",
                            "schema": {"type": "string", "enum": ["true"]}},
    "Retry-After": {"description": "seconds to wait before retrying (503)",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
}
_VERSION_HEADERS = ("ETag", "X-Optserve-Version", "X-Optserve-Step")

# Request headers the routes read themselves (FastAPI cannot list them).
HEADERS: dict[str, dict[str, Any]] = {
    "X-Optserve-Worker": {
        "name": "X-Optserve-Worker", "in": "header", "required": False,
        "description": "the pushing worker's id; required by sessions with sync rounds",
        "schema": {"type": "string", "pattern": WORKER_PATTERN}},
    "If-Match": {
        "name": "If-Match", "in": "header", "required": False,
        "description": "the version the gradients were computed from (as ?base_version=): "
                       "409 stale_gradient past max_staleness, or when older than the "
                       "session's latest overwrite or state import, or its create (a "
                       "version of a deleted session of the same id)",
        "schema": _VERSION_TAG},
    "If-Match (change)": {
        "name": "If-Match", "in": "header", "required": False,
        "description": "apply only if the session is still at this version (the ETag it was "
                       "read with; as ?base_version=), or at one of a list (\"4\", \"5\"); "
                       "* holds whenever the session exists: 412 precondition_failed "
                       "otherwise, nothing done, with the current ETag and "
                       "X-Optserve-Version. Compared strongly: a weak tag (W/\"5\") matches "
                       "no version. A version moves with steps, imports and overwrites "
                       "only: name ?base_revision= to also refuse after option changes",
        "schema": _MATCH_LIST},
    "If-Match (read)": {
        "name": "If-Match", "in": "header", "required": False,
        "description": "answer only if the session is at this version (the ETag it was read "
                       "with), or at one of a list; * whenever it exists: 412 "
                       "precondition_failed otherwise, with the current ETag (e.g. a state "
                       "dict read at the version of the parameters read before it). Compared "
                       "strongly: a weak tag (W/\"5\") matches no version",
        "schema": _MATCH_LIST},
    "If-None-Match": {
        "name": "If-None-Match", "in": "header", "required": False,
        "description": "304 when the current version is one of these (W/\"5\" names 5 too); "
                       "*: 304 whenever the session exists; tags that are no version are "
                       "ignored; outside RFC 9110's grammar (* in a list, w/\"5\"): 422 "
                       "invalid_precondition",
        "schema": {"type": "string", "example": '"5"'}},
    "If-None-Match (star)": {
        "name": "If-None-Match", "in": "header", "required": False,
        "description": "only * is evaluated: 304 whenever the session exists (a version tag "
                       "is not: this answer's ETag is the parameters' version, which option "
                       "changes do not move); outside RFC 9110's grammar: 422 "
                       "invalid_precondition",
        "schema": {"type": "string", "example": "*"}},
    "If-None-Match (state)": {
        "name": "If-None-Match", "in": "header", "required": False,
        "description": "*: 304 whenever the session exists; a state tag, \"r<revision>.<token>\" "
                       "(the X-Optserve-State-Tag a state dict was read with; W/ too): 304 "
                       "when the session is still the one read then (not one deleted and made "
                       "again under its id; not restored since: a restart mints new tokens) "
                       "at that revision (every change moves it); a revision alone, "
                       "\"r<revision>\", or a version tag is not evaluated (this answer's ETag "
                       "is the parameters' version, which option changes do not move); "
                       "outside RFC 9110's grammar: 422 invalid_precondition",
        "schema": {"type": "string", "example": '"r12.5f0c3a9e81d24b67"'}},
}
# Query parameters the routes read themselves.
#: every query parameter a step takes (``encoding``: ``bodies.tensor_encoding``; ``timeout_s``:
#: an LBFGS step's, ``evaluations``): ``requests.StepQuery`` refuses any other, or one given
#: twice, with a 422
STEP_QUERY = ("return", "base_version", "encoding", "upcast", "params_dtype", "metrics",
              "timeout_s")

QUERY: dict[str, dict[str, Any]] = {
    "return": {
        "name": "return", "in": "query", "required": False,
        "description": "params: the updated parameters come back; none: only version, step "
                       "and lr; touched: only the rows stepped with row-sparse gradients "
                       "(and the parameters stepped with dense ones)",
        "schema": {"type": "string", "enum": ["params", "none", "touched"],
                   "default": "params"}},
    "timeout_s": {
        "name": "timeout_s", "in": "query", "required": False,
        "description": "LBFGS sessions: how long the open step waits for each evaluation "
                       "(default OPTSERVE_EVALUATION_TIMEOUT_S); other sessions refuse it "
                       "(422 invalid_query)",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600}},
    "base_version": {
        "name": "base_version", "in": "query", "required": False,
        "description": "the version the gradients were computed from (or If-Match): 409 "
                       "stale_gradient past max_staleness, or when older than the session's "
                       "latest overwrite or state import, or its create (a version of a "
                       "deleted session of the same id)",
        "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}},
    "base_version (change)": {
        "name": "base_version", "in": "query", "required": False,
        "description": "apply only if the session is still at this version (or If-Match): "
                       "412 precondition_failed otherwise, nothing done",
        "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}},
    "base_revision": {
        "name": "base_revision", "in": "query", "required": False,
        "description": "apply only if the session is still at this revision (its "
                       "X-Optserve-Revision: nothing at all changed since, option changes and "
                       "scheduler steps included): 412 precondition_failed otherwise, nothing "
                       "done",
        "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}},
    "upcast": {
        "name": "upcast", "in": "query", "required": False,
        "description": "accept float16/bfloat16 gradients for float32/float64 parameters "
                       "(widened once on the device; the session keeps its precision)",
        "schema": {"type": "boolean", "default": False}},
    "params_dtype": {
        "name": "params_dtype", "in": "query", "required": False,
        "description": "send the parameters back narrowed to this dtype",
        "schema": {"type": "string", "enum": ["float16", "bfloat16"]}},
    "params_dtype (pull)": {
        "name": "params_dtype", "in": "query", "required": False,
        "description": "send the parameters (or rows) narrowed to this dtype, as a step's "
                       "?params_dtype= does (floating parameters wider than it; the session "
                       "keeps its own; past float16's range a value narrows to an infinity); "
                       "the version and ETag are the answer's version's, whatever the width",
        "schema": {"type": "string", "enum": ["float16", "bfloat16"]}},
    "metrics": {
        "name": "metrics", "in": "query", "required": False,
        "description": "answer: the step's metrics (norms per group) in the answer; history: "
                       "no metrics in the answer, and an async step of a session this server "
                       "holds takes its norms after answering (off the step's path) into its "
                       "history row, before any later operation on the session, a snapshot "
                       "included (a sync round's step takes them before, as ever); ignored by "
                       "LBFGS sessions",
        "schema": {"type": "string", "enum": ["answer", "history"], "default": "answer"}},
    "encoding": {
        "name": "encoding", "in": "query", "required": False,
        "description": "tensors in a JSON answer: flat `data` lists (default) or base64 `b64`",
        "schema": {"type": "string", "enum": ["data", "b64"], "default": "data"}},
    "format": {
        "name": "format", "in": "query", "required": False,
        "description": "json, safetensors (default when the body or Accept is "
                       "application/octet-stream) or torch (a torch.save file, loaded only "
                       "with weights_only=True)",
        "schema": {"type": "string", "enum": ["json", "safetensors", "torch"]}},
}

# ----------------------------------------------------------------------------- problems
COMMON_PROBLEMS: dict[str, str] = {
    "400": "Malformed body (not JSON / not safetensors; a key twice in a JSON object) or "
           "header (an Accept weight that is not a qvalue; a header that counts once given "
           "twice)",
    "401": "Missing or wrong API key",
    "404": "Unknown session",
    "409": "Conflict (id taken, a keyed create whose session was deleted, scheduler "
           "exhausted, scheduler out of range, duplicate push, round timeout, stale gradient, "
           "LBFGS step in progress or ended)",
    "413": "Body larger than OPTSERVE_MAX_BODY_MB",
    "415": "Content-Type neither JSON nor octet-stream",
    "422": "Invalid input (shape, dtype, option, state...)",
    "429": "A per-tenant limit is reached",
    "417": "expectation_failed: an Expect other than 100-continue; nothing was done, the "
           "connection is closed",
}
PROBLEMS: dict[str, str] = {
    "406": "Accept names no media type this operation answers with",
    "408": ("The request body stalled for OPTSERVE_BODY_TIMEOUT_S, or was not whole within it plus "
            "its bytes at OPTSERVE_BODY_MIN_KIB_S (the connection is closed)"),
    "412": "precondition_failed: the session is no longer at the version (If-Match, "
           "?base_version=) or revision (?base_revision=) named; nothing was applied (a "
           "read: nothing is answered). Its ETag, X-Optserve-Version and X-Optserve-Step (and "
           "X-Optserve-Revision where known) give the session's current version, as a 200 "
           "would (absent only for a session at no version: one out of service); on a read "
           "of the state dict, X-Optserve-State-Tag (and current_state_tag) its state tag, "
           "as a 200 or 304 would give it; an "
           "If-Match list's first 16 versions are in base_versions, their number in "
           "base_versions_count",
    "503": "Not ready (device worker down, data directory not writable, or draining)",
}

# --------------------------------------------- what every mutating operation shares (1 line)
#: request headers every POST/PUT/PATCH/DELETE reads (parameter objects), e.g.
#:   {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {...}}
MUTATING_HEADERS: list[dict[str, Any]] = [
    {"name": "Idempotency-Key", "in": "header", "required": False,
     "description": "makes the request safe to retry: a repeat of a key the session already "
                    "applied is answered with the original result (Idempotent-Replayed: "
                    "true), not applied again, also after a restart; a repeat with another "
                    "request is a 422 idempotency_key_reused",
     "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}},
]
#: problem statuses every POST/PUT/PATCH/DELETE may answer: {status: description}, e.g.
#:   "507": "The data directory is full"
MUTATING_PROBLEMS: dict[str, str] = {
    "500": "apply_failed: the operation failed on the server after it began; the session was "
           "rebuilt from its store as it was before",
    "503": "Nothing was applied, retry after Retry-After: storage_error (an I/O error), "
           "out_of_file_descriptors (the server had no file descriptor left), session_damaged",
    "507": "storage_full: the operation's log record did not fit on the disk; nothing was "
           "applied",
}


@dataclass(frozen=True)
class Op:
    """One operation's contract beyond what FastAPI sees in its signature."""

    id: str
    body: str | None = None  # request body schema (JSON)
    body_binary: bool = False  # also takes a safetensors body
    body_optional: bool = False  # an empty body is accepted
    ok: str | None = "Object"  # success body schema; None: no body
    ok_binary: bool = False  # also answers safetensors (per Accept)
    ok_media: str | None = None  # the one media type of a non-JSON answer (metrics)
    ok_also: tuple[str, ...] = ()  # media types a JSON answer may also come in (per Accept)
    versioned: bool = False  # success carries ETag / X-Optserve-Version / X-Optserve-Step
    query: tuple[str, ...] = ()  # keys of QUERY
    headers: tuple[str, ...] = ()  # keys of HEADERS
    problems: tuple[str, ...] = ()  # keys of PROBLEMS, beyond COMMON_PROBLEMS
    links: bool = False  # the created session's operations, linked by its id

    @property
    def produces(self) -> tuple[str, ...]:
        """The media types a success answers with, preferred first (Accept is checked against
        them: 406 before any work)."""
        if self.ok_media is not None:
            return (self.ok_media,)
        if self.ok is None:
            return ()
        return ((JSON, BINARY) if self.ok_binary else (JSON,)) + self.ok_also


S = "/v1/sessions/{session_id}"


class _Conditional(TypedDict):
    query: tuple[str, ...]
    headers: tuple[str, ...]
    problems: tuple[str, ...]


#: what a change that takes a precondition lists (``Expected``: If-Match / ?base_version=,
#: ?base_revision=; 412 when the session is no longer there)
CONDITIONAL: _Conditional = {
    "query": ("base_version (change)", "base_revision"), "headers": ("If-Match (change)",),
    "problems": ("412",)}
#: what a versioned read lists: If-Match evaluated on its answer (412 when of another version)
READ_CONDITIONAL: _Conditional = {"query": (), "headers": ("If-Match (read)",),
                                  "problems": ("412",)}
OPERATIONS: dict[tuple[str, str], Op] = {
    ("get", "/healthz"): Op("health", ok="Health"),
    ("get", "/readyz"): Op("ready", ok="Ready", problems=("503",)),
    ("get", "/metrics"): Op("metrics", ok=None, ok_media=TEXT),
    ("get", "/v1/optimizers"): Op("listOptimizers"),
    ("get", "/v1/schedulers"): Op("listSchedulers"),
    ("get", "/v1/sessions"): Op("listSessions", ok="SessionList"),
    ("get", "/v1/transport"): Op("transport", ok="Transport"),
    ("post", "/v1/sessions"): Op("createSession", "CreateSession", body_binary=True,
                                 ok="Session", versioned=True, links=True),
    ("get", S): Op("getSession", ok="Session", versioned=True, query=(),
                   headers=("If-None-Match (star)", *READ_CONDITIONAL["headers"]),
                   problems=READ_CONDITIONAL["problems"]),
    ("delete", S): Op("deleteSession", ok=None, **CONDITIONAL),
    ("patch", S): Op("configureSession", "PsOptions", ok="Session", versioned=True,
                     **CONDITIONAL),
    ("post", f"{S}/step"): Op("step", "StepRequest", body_binary=True, ok="StepAnswer",
                              ok_binary=True, versioned=True,
                              query=STEP_QUERY,
                              headers=("X-Optserve-Worker", "If-Match")),
    ("post", f"{S}/grads"): Op("pushGrads", "Grads", body_binary=True, ok="Version",
                               versioned=True, query=("upcast",)),
    ("post", f"{S}/zero_grad"): Op("zeroGrad", ok="Version", versioned=True),
    ("get", f"{S}/params"): Op("getParams", ok="Params", ok_binary=True, versioned=True,
                               query=("encoding", "params_dtype (pull)"),
                               headers=("If-None-Match", *READ_CONDITIONAL["headers"]),
                               problems=READ_CONDITIONAL["problems"]),
    ("post", f"{S}/params/rows"): Op("pullRows", "Rows", body_binary=True, ok="Params",
                                     ok_binary=True, versioned=True,
                                     query=("encoding", "params_dtype (pull)"),
                                     headers=("If-None-Match", *READ_CONDITIONAL["headers"]),
                                     problems=READ_CONDITIONAL["problems"]),
    ("post", f"{S}/step/{{eval_id}}"): Op("evaluate", "Evaluation", body_binary=True,
                                         ok="StepAnswer", ok_binary=True, versioned=True,
                                         query=("encoding",)),
    ("delete", f"{S}/step/{{step_id}}"): Op("abandonStep", ok="Object"),
    ("put", f"{S}/params"): Op("putParams", "ParamsBody", body_binary=True, ok="Params",
                               ok_binary=True, versioned=True,
                               query=("encoding", *CONDITIONAL["query"]),
                               headers=CONDITIONAL["headers"],
                               problems=CONDITIONAL["problems"]),
    ("post", f"{S}/param_groups"): Op("addParamGroup", "ParamGroup", body_binary=True,
                                      ok="Session", versioned=True, **CONDITIONAL),
    ("patch", f"{S}/param_groups/{{index}}"): Op("updateParamGroup", "GroupOptions",
                                                 ok="Session", versioned=True, **CONDITIONAL),
    ("post", f"{S}/scheduler/step"): Op("schedulerStep", "SchedulerStep", body_optional=True,
                                        ok="Version", versioned=True, **CONDITIONAL),
    ("get", f"{S}/state_dict"): Op("exportState", ok="StateDict", ok_binary=True,
                                   versioned=True, query=("format", "encoding"),
                                   headers=("If-None-Match (state)",
                                            *READ_CONDITIONAL["headers"]),
                                   problems=READ_CONDITIONAL["problems"]),
    ("put", f"{S}/state_dict"): Op("importState", "StateDict", body_binary=True, ok="Session",
                                   versioned=True,
                                   query=("format", *CONDITIONAL["query"]),
                                   headers=CONDITIONAL["headers"],
                                   problems=CONDITIONAL["problems"]),
    ("get", f"{S}/history"): Op("getHistory", ok="History", ok_also=(CSV,)),
}
ALSO_DESCRIPTIONS = {CSV: "the same columns as CSV: a header row, then one line per row (or "
                          "bucket); empty cells for absent values"}
#: the operations a created session's id leads to (OpenAPI links from createSession)
SESSION_LINKS = ("getSession", "configureSession", "deleteSession", "step", "pushGrads",
                 "zeroGrad", "getParams", "putParams", "addParamGroup", "schedulerStep",
                 "exportState", "importState", "getHistory")

_BINARY_BODY = {"schema": {"type": "string", "format": "binary"},
                "description": "a safetensors file (see docs/protocol.md)"}


def _headers(names: tuple[str, ...]) -> dict[str, Any]:
    return {n: _ref(n, "headers") for n in names}


def _request_body(op: Op) -> dict[str, Any]:
    assert op.body is not None
    content: dict[str, Any] = {JSON: {"schema": _ref(op.body)}}
    if op.body_binary:
        content[BINARY] = _BINARY_BODY
    return {"required": not op.body_optional, "content": content}


def _success(op: Op, method: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": "OK"}
    if op.ok is not None:
        content: dict[str, Any] = {JSON: {"schema": _ref(op.ok)}}
        if op.ok_binary:
            content[BINARY] = _BINARY_BODY
        for media in op.ok_also:
            content[media] = {"schema": {"type": "string"},
                              "description": ALSO_DESCRIPTIONS.get(media, "")}
        out["content"] = content
    elif op.ok_media is not None:
        out["content"] = {op.ok_media: {"schema": {"type": "string"}}}
    names = ("X-Request-Id",) + (_VERSION_HEADERS if op.versioned else ())
    if op.ok == "Session" or op.id == "exportState":
        names += ("X-Optserve-Revision",)
    if op.id == "exportState":
        names += ("X-Optserve-State-Tag",)
    if method in MUTATING:
        names += ("Idempotent-Replayed",)
    if op.id == "createSession":
        names += ("Location",)
    out["headers"] = _headers(names)
    if op.id == "addParamGroup":
        out["headers"]["Location"] = _ref("GroupLocation", "headers")
    if op.links:
        out["links"] = {target: {"operationId": target,
                                 "parameters": {"session_id": "$response.body#/id"}}
                        for target in SESSION_LINKS}
    return out


def _problem(text: str) -> dict[str, Any]:
    return {"description": text, "content": {PROBLEM: {"schema": _ref("Problem")}},
            "headers": _headers(("X-Request-Id",))}


def _document(op: Op, method: str, path: str, doc_op: dict[str, Any]) -> None:
    doc_op["operationId"] = op.id
    responses: dict[str, Any] = doc_op.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's HTTPValidationError: ours is a Problem
    code = next((k for k in responses if k.startswith("2")), "200")
    responses[code] = _success(op, method)
    params: list[dict[str, Any]] = doc_op.setdefault("parameters", [])
    # (one a route also declares in its signature is listed once: OpenAPI names are unique)
    given = {(p.get("in"), p.get("name")) for p in params}
    params.extend(QUERY[q] for q in op.query if ("query", QUERY[q]["name"]) not in given)
    params.extend(HEADERS[h] for h in op.headers)
    if op.body is not None:
        doc_op["requestBody"] = _request_body(op)
    problems = dict(COMMON_PROBLEMS)
    problems.update({s: PROBLEMS[s] for s in op.problems})
    if op.produces:
        problems["406"] = PROBLEMS["406"]
    if op.body is not None:
        problems["408"] = PROBLEMS["408"]
    if method in MUTATING:
        params.extend(MUTATING_HEADERS)
        problems.update(MUTATING_PROBLEMS)
    for status, text in sorted(problems.items()):
        responses.setdefault(status, _problem(text))
        if status == "503":
            responses[status]["headers"] = _headers(("X-Request-Id", "Retry-After"))
        if status == "412":  # the session's current version, as a 200's (its text says so)
            responses[status]["headers"] = _headers(("X-Request-Id", *_VERSION_HEADERS,
                                                     "X-Optserve-Revision") + (
                ("X-Optserve-State-Tag",) if op.id == "exportState" else ()))
    if op.id in ("getParams", "pullRows"):
        responses["304"] = {"description": "Not modified (If-None-Match names the current "
                                           "version, or is *)",
                            "headers": _headers(("X-Request-Id",) + _VERSION_HEADERS)}
    if op.id in ("getSession", "exportState"):
        responses["304"] = {"description": "Not modified (If-None-Match: *; the session "
                                           "exists)" if op.id == "getSession" else
                                           "Not modified (If-None-Match: *, or a state tag "
                                           "\"r<revision>.<token>\" naming the session's)",
                            "headers": _headers(("X-Request-Id", *_VERSION_HEADERS,
                                                 "X-Optserve-Revision") + (
                                ("X-Optserve-State-Tag",) if op.id == "exportState" else ()))}
    if path != "/healthz":
        doc_op["security"] = [{"bearer": []}, {}]
    if not params:
        doc_op.pop("parameters")


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                          description=app.description, routes=app.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas.update(SCHEMAS)
        components["headers"] = RESPONSE_HEADERS
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "OPTSERVE_API_KEYS; absent keys = open server"}}
        for path, methods in doc.get("paths", {}).items():
            for method, doc_op in methods.items():
                op = OPERATIONS.get((method, path))
                if op is None:
                    raise RuntimeError(f"{method.upper()} {path} is not in "
                                       "app.api.openapi_docs.OPERATIONS")
                _document(op, method, path, doc_op)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
