"""A step's JSON body (over OFFLOAD_BYTES) naming more tensors than its session holds is refused
from its tensors' names, dtypes and shapes before their values are decoded, as a safetensors
body is from its header (``test_excess_step_entries``): a 7.6 MB step naming 100,000 unknown
tensors made every one of them first (1.16 s of server CPU, 0.25-0.30 s after the fix: what
is left is the JSON parse; ``benchmarks/unknown_names.py``). The answer is the one the step
gave once every tensor was decoded (``sessions._refuse_entries`` switched off), with the
entries up to and including the refused one decoded first, so that a malformed one among them
is still the answer, and those after it checked without being made (decoded only where one may
be malformed): a malformed tensor after the refused one is the answer too, as decoded whole.
Nothing changes: the parameters, the optimizer's state and the step count are as they were,
and the next step is torch's. A sharded session's step bodies (JSON and safetensors) are
refused the same way, at their first name the session's layout lacks (it checked their names
once every tensor was made), but for a body with ``scalars`` (refused first, after the
body)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.api import bodies, sessions
from app.api.bodies import OFFLOAD_BYTES
from tests.integration.test_excess_step_entries import (  # noqa: F401 - the fixture
    BIN_CT,
    GRADS,
    PARAMS,
    _excess,
    _held,
    _session,
    _step_both,
    made,
)
from tests.torch_reference import json_tensor

pytestmark = pytest.mark.integration


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The fields of the JSON tensors the server decoded, in order."""
    fields: list[str] = []
    decode = bodies.decode_json_tensor

    def counted(obj: object, field: Any, **kw: Any) -> torch.Tensor:
        fields.append(str(field))
        return decode(obj, field, **kw)
    monkeypatch.setattr(bodies, "decode_json_tensor", counted)
    yield fields


def _body(grads: dict[str, Any]) -> dict[str, Any]:
    body = {"grads": {n: json_tensor(t) if isinstance(t, torch.Tensor) else t
                      for n, t in grads.items()}}
    assert len(str(body)) > OFFLOAD_BYTES  # (a body large enough to be refused early)
    return body


def _post(client: TestClient, sid: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/v1/sessions/{sid}/step", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    out: dict[str, Any] = r.json()
    return out


def _whole_way(client: TestClient, monkeypatch: pytest.MonkeyPatch, decoded: list[str],
               sid: str, body: dict[str, Any]) -> dict[str, Any]:
    """The answer of the same body decoded whole first, as before (up to a malformed tensor:
    its decode error), every tensor made."""
    decoded.clear()
    with monkeypatch.context() as patched:
        patched.setattr(sessions, "_refuse_entries", lambda *args: None)
        out = _post(client, sid, body)
    if out["code"] != "invalid_tensor":
        assert len(decoded) == len(body["grads"])
    return out


BAD_DATA = {"dtype": "float32", "shape": [3], "data": [1.0, 2.0]}  # 2 values for 3


@pytest.mark.parametrize("grads,code,field,count", [
    # the session's names first, then 27 it lacks: the first of those is named, and only
    # the tensors up to it are decoded
    (_excess(dict(GRADS)), "unknown_parameter", "grads.extra000", 4),
    (_excess({}, 30), "unknown_parameter", "grads.extra000", 1),
    # an earlier entry's mismatch is the answer, as the session's check found it first
    (_excess({"a": GRADS["a"].double()}), "dtype_mismatch", "grads.a", 1),
    (_excess({"c": GRADS["c"], "b": torch.zeros(2, 1)}), "shape_mismatch", "grads.b", 2),
    # a malformed tensor before the refused one, or the refused one itself: its problem
    ({"a": BAD_DATA, **_excess({})}, "invalid_tensor", "grads.a.data", 1),
    ({"a": GRADS["a"], "extra": BAD_DATA, **_excess({})}, "invalid_tensor",
     "grads.extra.data", 2),
])
def test_excess_json_entries_refused_before_their_values(
        app_client: TestClient, decoded: list[str], monkeypatch: pytest.MonkeyPatch,
        grads: dict[str, Any], code: str, field: str, count: int) -> None:
    local, opt = _session(app_client, "s")
    held = _held(app_client, "s")
    body = _body(grads)
    decoded.clear()
    got = _post(app_client, "s", body)
    assert (got["code"], got["field"]) == (code, field), got
    assert len(decoded) == count, decoded  # (was: every tensor of the body)
    before = _whole_way(app_client, monkeypatch, decoded, "s", body)
    for key in ("status", "code", "field", "detail"):
        assert got[key] == before[key], (key, got, before)
    assert _held(app_client, "s") == held
    _step_both(app_client, "s", local, opt, {n: -2 * g for n, g in GRADS.items()})


@pytest.mark.parametrize("fields,headers", [({}, {}), ({"param_groups": {"01": {}}}, {})])
@pytest.mark.parametrize("late", [
    BAD_DATA,  # (its values: 2 for 3)
    {"dtype": "float32", "shape": [2], "data": [1.0, "x"]},  # (a value that is no number)
    {"dtype": "float16", "shape": [1], "data": [1e6]},  # (past float16's range)
    {"dtype": "float32", "shape": [1], "b64": "AAAA"},  # (3 bytes for 4)
    {"dtype": "float32", "shape": [1], "data": [1.0], "b64": "AAAAAA=="},  # (both)
])
def test_a_malformed_tensor_after_the_refused_one_is_the_answer(
        app_client: TestClient, decoded: list[str], monkeypatch: pytest.MonkeyPatch,
        late: dict[str, Any], fields: dict[str, Any], headers: dict[str, str]) -> None:
    """A body naming unknown tensors first and then a malformed one (its values, its range,
    its b64, its form), alone or with a step's other refusal (its ``param_groups``' form):
    decoded whole, the malformed tensor is the answer (every tensor is decoded before a name
    is looked at), and so it is refused from its entries too. It was the first unknown
    name, the tensors after it never looked at, so the same body's answer hung on its size
    (a body of 256 KiB or less is decoded whole). Nothing changes, and the next step is
    torch's."""
    local, opt = _session(app_client, "late")
    held = _held(app_client, "late")
    body = {**_body({**_excess(dict(GRADS)), "zlast": late}), **fields}

    def post() -> dict[str, Any]:
        r = app_client.post("/v1/sessions/late/step", json=body, headers=headers)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        out: dict[str, Any] = r.json()
        return out
    decoded.clear()
    got = post()
    with monkeypatch.context() as patched:  # the same body decoded whole
        patched.setattr(sessions, "_refuse_entries", lambda *args: None)
        before = post()
    assert before["code"] == "invalid_tensor" and before["field"].startswith("grads.zlast")
    for key in ("status", "code", "field", "detail"):
        assert got[key] == before[key], (key, got, before)
    assert _held(app_client, "late") == held
    _step_both(app_client, "late", local, opt, GRADS)


def test_well_formed_tensors_after_the_refused_one_are_not_made(
        app_client: TestClient, decoded: list[str]) -> None:
    """Tensors after the refused name that all decode (``data`` of several dtypes, ``b64``,
    the non-finite names) are checked without being made: only those up to the refused one
    are, and the answer is its name's."""
    _session(app_client, "fine")
    tail = {"f16": {"dtype": "float16", "shape": [2], "data": [1.5, -2.0]},
            "nan": {"dtype": "float32", "shape": [2], "data": ["NaN", -1.0]},
            "i64": {"dtype": "int64", "shape": [1, 2], "data": [3, -4]},
            "ok": {"dtype": "bool", "shape": [1], "data": [True]},
            "b64": json_tensor(torch.arange(3, dtype=torch.float64), b64=True)}
    body = _body({**_excess(dict(GRADS)), **tail})
    decoded.clear()
    got = _post(app_client, "fine", body)
    assert (got["code"], got["field"]) == ("unknown_parameter", "grads.extra000")
    assert len(decoded) == 4, decoded


@pytest.mark.parametrize("fields,headers", [
    ({"param_groups": {"01": {}}}, {}),  # (not a group index)
    ({"scalars": 5}, {}),  # (not an object)
    ({}, {"Idempotency-Key": "a b"}),  # (a space)
])
def test_a_malformed_tensor_before_the_refused_one_comes_before_the_steps_other_refusals(
        app_client: TestClient, decoded: list[str], monkeypatch: pytest.MonkeyPatch,
        fields: dict[str, Any], headers: dict[str, str]) -> None:
    """A body with a malformed tensor before its first unknown name and another refusal of
    the step (its ``param_groups``' form, its ``scalars``, its ``Idempotency-Key``): decoded
    whole, the malformed tensor was the answer (the tensors are decoded before the rest is
    checked); refused from its entries it was the other refusal, the malformed tensor never
    decoded. It is the malformed tensor again, only the tensors up to the refused name
    decoded, and nothing changes."""
    local, opt = _session(app_client, "o")
    held = _held(app_client, "o")
    body = {**_body({"a": BAD_DATA, **_excess({})}), **fields}

    def post() -> dict[str, Any]:
        r = app_client.post("/v1/sessions/o/step", json=body, headers=headers)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        out: dict[str, Any] = r.json()
        return out
    decoded.clear()
    got = post()
    assert (got["code"], got["field"]) == ("invalid_tensor", "grads.a.data"), got
    assert decoded == ["grads.a"]
    with monkeypatch.context() as patched:  # the same body decoded whole, as before
        patched.setattr(sessions, "_refuse_entries", lambda *args: None)
        before = post()
    for key in ("status", "code", "field", "detail"):
        assert got[key] == before[key], (key, got, before)
    assert _held(app_client, "o") == held
    _step_both(app_client, "o", local, opt, {n: -2 * g for n, g in GRADS.items()})


def test_sparse_or_malformed_entries_go_the_whole_way(
        app_client: TestClient, decoded: list[str]) -> None:
    """A body with a row-sparse gradient, or an entry whose dtype or shape cannot be read,
    is decoded whole, as before (its answer the first problem the decode or the session
    finds)."""
    _session(app_client, "w")
    held = _held(app_client, "w")
    for extra, code, field in (
            ({"zsparse": {"indices": [0], "values": json_tensor(torch.ones(1, 1))}},
             "unknown_parameter", "grads.extra000"),
            ({"zbad": {"dtype": "float99", "shape": [1], "data": [1.0]}},
             "invalid_tensor", "grads.zbad.dtype")):
        decoded.clear()
        got = _post(app_client, "w", _body({**_excess(dict(GRADS)), **extra}))
        assert (got["code"], got["field"]) == (code, field), got
        assert len(decoded) >= 30, len(decoded)
    assert _held(app_client, "w") == held


def _sharded(client: TestClient, sid: str) -> tuple[dict[str, torch.Tensor],
                                                    torch.optim.Adam]:
    """A sharded session (two shards) of PARAMS stepped once with GRADS, and torch's run."""
    r = client.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.1}, "shards": 2,
        "params": {n: json_tensor(t) for n, t in PARAMS.items()}})
    assert r.status_code == 201, r.text
    local = {n: torch.nn.Parameter(t.clone()) for n, t in PARAMS.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.1)
    _step_both(client, sid, local, opt, GRADS)
    return local, opt


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
def test_a_sharded_sessions_excess_entries_are_refused_before_their_values(
        app_client: TestClient, decoded: list[str],
        made: list[int],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """A sharded session checks a step's names against its layout before its shards see
    the gradients: a body naming more tensors than it holds is refused at its first unknown
    name (after a dtype mismatch of a known one: the layout's check is of names only) before
    the values after it are made, with the same answer as before; one with ``scalars`` is
    decoded whole and refused for them, as before. Nothing changes; it steps as torch's."""
    local, opt = _sharded(app_client, "sh")
    held = _held(app_client, "sh")
    grads = _excess({"a": GRADS["a"].double(), "b": GRADS["b"]})

    def post(scalars: dict[str, float] | None = None) -> dict[str, Any]:
        decoded.clear()
        made.clear()
        if fmt == "json":
            body = _body(grads)
            if scalars is not None:
                body["scalars"] = scalars
            return _post(app_client, "sh", body)
        meta = None if scalars is None else {"scalars": json.dumps(scalars)}
        r = app_client.post("/v1/sessions/sh/step", content=save(grads, metadata=meta),
                            headers=BIN_CT)
        assert r.status_code == 422, r.text
        out: dict[str, Any] = r.json()
        return out
    got = post()
    assert (got["code"], got["field"]) == ("unknown_parameter", "grads.extra000"), got
    assert got["detail"] == "unknown parameter 'extra000'; this session has 'a', 'b', 'c'"
    if fmt == "json":
        assert decoded == ["grads.a", "grads.b", "grads.extra000"]  # (was: every tensor)
    else:
        assert made == []  # (was: every tensor made)
    with monkeypatch.context() as patched:  # the same body decoded whole, as before
        patched.setattr(sessions, "_refuse_entries", lambda *args: None)
        before = post()
    assert len(decoded) == len(grads) if fmt == "json" else made == [len(grads)]
    for key in ("status", "code", "field", "detail"):
        assert got[key] == before[key], (key, got, before)
    scalars = post({"loss": 0.5})
    assert (scalars["code"], scalars["field"]) == ("not_supported_here", "scalars"), scalars
    assert len(decoded) == len(grads) if fmt == "json" else made == [len(grads)]
    assert _held(app_client, "sh") == held
    _step_both(app_client, "sh", local, opt, {n: -2 * g for n, g in GRADS.items()})
