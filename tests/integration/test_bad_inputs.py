"""Hostile and malformed input against a real server.

Every case asserts the exact 4xx status, an RFC 9457 ``application/problem+json`` body (``type``,
``title``, ``status``, ``detail``, ``code`` and, where it applies, ``field``), and that the
session is exactly as it was: params bitwise, version, step, the accumulated gradients and the
exported state_dict. The accumulator is checked by effect: after the bad request, a step with no
body gradients must equal an in-process ``torch.optim.Adam`` that stepped on what was
accumulated before the bad request.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch
from conftest import ENGINES, LiveServer, _test_settings

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
JSON_CT = {"content-type": "application/json"}
BIN_CT = {"content-type": "application/octet-stream"}
NAMES = ("w", "b", "s")
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
          torch.bfloat16: "bfloat16", torch.int32: "int32"}
ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int32: "I32", torch.uint8: "U8",
             torch.int64: "I64"}


# --------------------------------------------------------------------------- the session

def p0() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([[0.5, -1.0, 2.0], [0.25, 3.0, -0.75]]),
        "b": torch.tensor([0.1, 0.2, -0.3]),
        "s": torch.tensor(1.5),  # a 0-d parameter
    }


G1 = {
    "w": torch.tensor([[0.1, -0.2, 0.3], [0.4, -0.5, 0.6]]),
    "b": torch.tensor([1.0, -2.0, 0.5]),
    "s": torch.tensor(-0.25),
}
G2_W = torch.tensor([[0.05, 0.01, -0.02], [0.3, 0.2, -0.1]])  # accumulated before the bad request
LR = 0.1


def jt(t: torch.Tensor) -> dict[str, Any]:
    """A JSON tensor (``data`` form), written by the test itself, not by the server's codec."""
    return {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def jt_b64(t: torch.Tensor) -> dict[str, Any]:
    raw = t.contiguous().numpy().tobytes()
    return {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
            "b64": base64.b64encode(raw).decode()}


def from_jt(obj: dict[str, Any]) -> torch.Tensor:
    dtype = {v: k for k, v in DTYPES.items()}[obj["dtype"]]
    raw = base64.b64decode(obj["b64"])
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(obj["shape"]).clone()


def st_file(header: dict[str, Any], data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file from a raw header dict and data bytes (no validation at all)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


def st_of(tensors: dict[str, torch.Tensor]) -> bytes:
    header: dict[str, Any] = {}
    data = b""
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return st_file(header, data)


def reference_params() -> dict[str, torch.Tensor]:
    """In-process torch: Adam over P0, a step on G1, then a step with only w's accumulated G2."""
    params = {n: t.clone() for n, t in p0().items()}
    opt = torch.optim.Adam([params[n] for n in NAMES], lr=LR)
    for n in NAMES:
        params[n].grad = G1[n].clone()
    opt.step()
    for n in NAMES:
        params[n].grad = None
    params["w"].grad = G2_W.clone()
    opt.step()
    return params


@dataclass
class Snapshot:
    describe: dict[str, Any]
    params: dict[str, Any]
    state_dict: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def snapshot(http: httpx.Client, sid: str) -> Snapshot:
    d = http.get(f"/v1/sessions/{sid}")
    p = http.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"})
    sd = http.get(f"/v1/sessions/{sid}/state_dict", params={"encoding": "b64"})
    for r in (d, p, sd):
        settle_if_5xx(r)
        assert r.status_code == 200, r.text
    return Snapshot(d.json(), p.json(), sd.json(),
                    {k: p.headers[k] for k in ("etag", "x-optserve-version", "x-optserve-step")})


@dataclass
class Sess:
    http: httpx.Client
    id: str
    before: Snapshot

    @property
    def url(self) -> str:
        return f"/v1/sessions/{self.id}"

    def assert_unchanged(self, *, check_accumulator: bool = True) -> None:
        after = snapshot(self.http, self.id)
        assert after.describe == self.before.describe
        assert after.params == self.before.params  # b64: bitwise
        assert after.state_dict == self.before.state_dict  # b64: bitwise
        assert after.headers == self.before.headers
        assert after.describe["version"] == 1 and after.describe["step"] == 1
        assert after.describe["accumulated"] == ["w"]
        if not check_accumulator:
            return
        # the accumulator still holds exactly G2_W: a step with no body grads applies it
        r = self.http.post(f"{self.url}/step", params={"encoding": "b64"}, json={"grads": {}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["version"], body["step"], body["skipped"]) == (2, 2, False)
        expected = reference_params()
        for n in NAMES:
            got = from_jt(body["params"][n])
            assert torch.equal(got.view(torch.int32), expected[n].detach().view(torch.int32)), n


_CREATED: list[tuple[httpx.Client, str]] = []


@pytest.fixture(autouse=True)
def _delete_sessions() -> Iterator[None]:
    """Delete this test's sessions, so that one a server bug left broken cannot fail the
    session list for the tests after it."""
    yield
    while _CREATED:
        client, sid = _CREATED.pop()
        try:
            client.delete(f"/v1/sessions/{sid}")
        except (httpx.HTTPError, RuntimeError):  # RuntimeError: that client is closed
            pass


def new_session(http: httpx.Client, optimizer: str = "Adam", **extra: Any) -> str:
    sid = f"bad-{uuid.uuid4().hex[:12]}"
    _CREATED.append((http, sid))
    body = {"optimizer": optimizer, "options": {"lr": LR}, "id": sid,
            "params": {n: jt(t) for n, t in p0().items()}, **extra}
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return sid


@pytest.fixture
def sess(http: httpx.Client) -> Sess:
    """An Adam session that has stepped once on G1 and accumulated G2 for ``w``."""
    sid = new_session(http)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(t) for n, t in G1.items()}})
    assert r.status_code == 200, r.text
    r = http.post(f"/v1/sessions/{sid}/grads", json={"grads": {"w": jt(G2_W)}})
    assert r.status_code == 200, r.text
    return Sess(http, sid, snapshot(http, sid))


def settle_if_5xx(r: httpx.Response) -> None:
    """After a 5xx, let the server thread finish logging its traceback before pytest formats
    the failure: on CPython 3.11 both use the ``ast`` module's process-wide state (traceback
    carets, pytest's source display), and racing them ends the run with an INTERNALERROR
    ("AST constructor recursion depth mismatch") that hides which tests failed."""
    if r.status_code >= 500:
        time.sleep(0.5)


def assert_problem(
    r: httpx.Response, status: int, code: str | None = None, field: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    settle_if_5xx(r)
    assert r.status_code == status, f"{r.status_code} {r.text[:500]}"
    assert r.headers["content-type"].split(";")[0].strip() == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert isinstance(body["code"], str) and body["code"]
    assert body["type"] == f"urn:optserve:problem:{body['code']}"
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    if field is not None:
        assert body.get("field") == field, body
    if detail is not None:
        assert detail in body["detail"], body
    return body


# --------------------------------------------------------------------------- step: JSON bodies

def _w(**over: Any) -> dict[str, Any]:
    """A JSON tensor for ``w`` with some keys replaced (or removed when the value is ...)."""
    base: dict[str, Any] = jt(G1["w"])
    for k, v in over.items():
        if v is ...:
            base.pop(k)
        else:
            base[k] = v
    return base


def _grads(**tensors: Any) -> bytes:
    return json.dumps({"grads": tensors}).encode()


@dataclass
class Case:
    id: str
    body: bytes | Callable[[], bytes]
    status: int
    code: str
    field: str | None
    headers: dict[str, str] | list[tuple[str, str]] = field(
        default_factory=lambda: dict(JSON_CT))
    params: dict[str, str] | list[tuple[str, str]] = field(default_factory=dict)
    detail: str | None = None


def _f64_w() -> dict[str, Any]:
    return jt(G1["w"].double())


STEP_CASES = [
    # shapes, dtypes, names
    Case("wrong-shape", _grads(w=_w(shape=[3, 2])), 422, "shape_mismatch", "grads.w"),
    Case("float64-grad-for-float32", _grads(w=_f64_w()), 422, "dtype_mismatch", "grads.w",
         detail="float64"),
    Case("int32-grad", _grads(w=_w(dtype="int32", data=[1, 2, 3, 4, 5, 6])), 422,
         "dtype_mismatch", "grads.w"),
    Case("float16-grad", _grads(w=_w(dtype="float16")), 422, "dtype_mismatch", "grads.w"),
    Case("unknown-param", _grads(zzz=jt(G1["b"])), 422, "unknown_parameter", "grads.zzz"),
    Case("unknown-param-beside-good", _grads(w=jt(G1["w"]), q=jt(G1["b"])), 422,
         "unknown_parameter", "grads.q"),
    Case("0d-param-shape-1", _grads(s=jt(torch.tensor([0.5]))), 422, "shape_mismatch",
         "grads.s"),
    Case("shape-[]-for-2d", _grads(w=_w(shape=[], data=[1.0])), 422, "shape_mismatch",
         "grads.w"),
    Case("0d-with-no-value", _grads(s={"dtype": "float32", "shape": [], "data": []}), 422,
         "invalid_tensor", "grads.s.data"),
    # the tensor object itself
    Case("data-too-short", _grads(w=_w(data=[1.0] * 5)), 422, "invalid_tensor", "grads.w.data",
         detail="5 values"),
    Case("data-too-long", _grads(w=_w(data=[1.0] * 7)), 422, "invalid_tensor", "grads.w.data"),
    Case("invalid-base64", _grads(w=_w(data=..., b64="@@not base64@@")), 422, "invalid_tensor",
         "grads.w.b64"),
    Case("b64-byte-count", _grads(w=_w(data=..., b64=base64.b64encode(b"\0" * 20).decode())),
         422, "invalid_tensor", "grads.w.b64", detail="20 bytes"),
    Case("b64-not-string", _grads(w=_w(data=..., b64=[1, 2])), 422, "invalid_tensor",
         "grads.w.b64"),
    Case("string-in-data", _grads(w=_w(data=[1.0, "abc", 3.0, 4.0, 5.0, 6.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("lowercase-nan-string", _grads(w=_w(data=[1.0, "nan", 3.0, 4.0, 5.0, 6.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("nested-list-in-data", _grads(w=_w(data=[[1.0], 2.0, 3.0, 4.0, 5.0, 6.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("unflattened-data", _grads(w=_w(data=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("bools-in-data", _grads(w=_w(data=[True, False, True, 1.0, 2.0, 3.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("null-in-data", _grads(w=_w(data=[None, 1.0, 2.0, 3.0, 4.0, 5.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("object-in-data", _grads(w=_w(data=[{}, 1.0, 2.0, 3.0, 4.0, 5.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("data-not-list", _grads(w=_w(data="1,2,3,4,5,6")), 422, "invalid_tensor",
         "grads.w.data"),
    Case("out-of-range-float32", _grads(w=_w(data=[1e39, 1.0, 2.0, 3.0, 4.0, 5.0])), 422,
         "invalid_tensor", "grads.w.data"),
    Case("deeply-nested-data", lambda: (b'{"grads": {"w": {"dtype": "float32", "shape": [6], '
                                        b'"data": ' + b"[" * 900 + b"]" * 900 + b"}}}"),
         422, "invalid_tensor", "grads.w.data"),
    Case("sparse-index-int64-max", _grads(w={"indices": [2**63 - 1],
                                             "values": jt(G1["w"][:1])}), 422,
         "index_out_of_range", "grads.w.indices"),
    Case("sparse-index-past-int64", _grads(w={"indices": [2**64 - 1],
                                              "values": jt(G1["w"][:1])}), 422,
         "index_out_of_range", "grads.w.indices"),
    Case("unknown-dtype", _grads(w=_w(dtype="float8")), 422, "invalid_tensor", "grads.w.dtype"),
    Case("missing-shape", _grads(w=_w(shape=...)), 422, "invalid_tensor", "grads.w.shape"),
    Case("negative-dim", _grads(w=_w(shape=[-2, -3])), 422, "invalid_tensor", "grads.w.shape"),
    Case("float-dim", _grads(w=_w(shape=[2.0, 3])), 422, "invalid_tensor", "grads.w.shape"),
    Case("huge-empty-shape", _grads(w=_w(shape=[0, 2**62, 4], data=[])), 422, "invalid_tensor",
         "grads.w.shape"),
    Case("data-and-b64", _grads(w=_w(b64="")), 422, "invalid_tensor", "grads.w"),
    Case("extra-tensor-key", _grads(w=_w(device="cuda")), 422, "invalid_tensor", "grads.w"),
    Case("tensor-is-a-list", _grads(w=[1.0, 2.0]), 422, "invalid_tensor", "grads.w"),
    Case("grads-is-a-list", json.dumps({"grads": [1, 2]}).encode(), 422, "invalid_body",
         "grads"),
    Case("unknown-top-level-key", json.dumps({"gradients": {}}).encode(), 422, "unknown_field",
         "gradients"),
    # non-finite values under the default policy (reject)
    Case("nan-grad", _grads(w=_w(data=[1.0, "NaN", 3.0, 4.0, 5.0, 6.0])), 422,
         "nonfinite_gradient", "grads.w"),
    Case("infinity-grad", _grads(b=jt(G1["b"]), w=_w(data=[1.0, 2.0, 3.0, 4.0, 5.0, "Infinity"])),
         422, "nonfinite_gradient", "grads.w"),
    Case("minus-infinity-b64", _grads(
        b=jt_b64(torch.tensor([1.0, float("-inf"), 0.0]))), 422, "nonfinite_gradient", "grads.b"),
    Case("nan-plus-accumulated", _grads(w=jt_b64(torch.full((2, 3), float("nan")))), 422,
         "nonfinite_gradient", "grads.w"),
    # not JSON / not an object
    Case("malformed-json", b'{"grads": {"w": ', 400, "invalid_json", "body"),
    Case("trailing-garbage", b'{"grads": {}} x', 400, "invalid_json", "body"),
    Case("invalid-utf8", b'{"grads": {"\xff\xfe": 1}}', 400, "invalid_json", "body"),
    Case("json-array-body", b"[1, 2, 3]", 400, "invalid_json", "body"),
    Case("json-null-body", b"null", 400, "invalid_json", "body"),
    Case("json-string-body", b'"grads"', 400, "invalid_json", "body"),
    Case("nan-literal-json", b'{"grads": {"w": {"dtype": "float32", "shape": [], "data": [NaN]}}}',
         400, "invalid_json", "body"),
    Case("100000-brackets", lambda: b"[" * 100_000, 400, "invalid_json", "body"),
    Case("100000-objects", lambda: b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400,
         "invalid_json", "body"),
    Case("empty-body", b"", 400, "invalid_json", "body"),
    # transport
    Case("text-plain", _grads(w=jt(G1["w"])), 415, "unsupported_media_type", "content-type",
         headers={"content-type": "text/plain"}),
    Case("form-urlencoded", b"grads=1", 415, "unsupported_media_type", "content-type",
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("accept-html", _grads(w=jt(G1["w"])), 406, "not_acceptable", "accept",
         headers={**JSON_CT, "accept": "text/html"}),
    Case("accept-json-q0", _grads(w=jt(G1["w"])), 406, "not_acceptable", "accept",
         headers={**JSON_CT, "accept": "application/json;q=0"}),
    Case("return-bogus", _grads(w=jt(G1["w"])), 422, "invalid_query", "return",
         params={"return": "bogus"}),
    Case("encoding-bogus", _grads(w=jt(G1["w"])), 422, "invalid_query", "encoding",
         params={"encoding": "hex"}),
    Case("query-misspelt", _grads(w=jt(G1["w"])), 422, "invalid_query", "retrun",
         params={"retrun": "none"}),
    Case("query-twice", _grads(w=jt(G1["w"])), 422, "invalid_query", "metrics",
         params=[("metrics", "history"), ("metrics", "answer")]),
    Case("query-twice-same", _grads(w=jt(G1["w"])), 422, "invalid_query", "return",
         params=[("return", "none"), ("return", "none")]),
    # a header that counts once, on two lines: one was taken, the other dropped unsaid
    Case("content-type-twice", _grads(w=jt(G1["w"])), 400, "bad_request", "content-type",
         headers=[("content-type", "application/json"),
                  ("content-type", "application/octet-stream")],
         detail="Content-Type is given 2 times"),
    Case("idempotency-key-twice", _grads(w=jt(G1["w"])), 400, "bad_request", "Idempotency-Key",
         headers=[*JSON_CT.items(), ("idempotency-key", "k-1"), ("idempotency-key", "k-2")],
         detail="Idempotency-Key is given 2 times"),
    Case("if-match-twice", _grads(w=jt(G1["w"])), 400, "bad_request", "If-Match",
         headers=[*JSON_CT.items(), ("if-match", '"1"'), ("if-match", '"1"')]),
    Case("worker-twice", _grads(w=jt(G1["w"])), 400, "bad_request", "X-Optserve-Worker",
         headers=[*JSON_CT.items(), ("x-optserve-worker", "a"), ("x-optserve-worker", "b")]),
    Case("content-encoding-twice", _grads(w=jt(G1["w"])), 400, "bad_request",
         "content-encoding",
         headers=[*JSON_CT.items(), ("content-encoding", "identity"),
                  ("content-encoding", "gzip")]),
]

# --------------------------------------------------------------------------- step: safetensors

_W_RAW = G1["w"].numpy().tobytes()
_B_RAW = G1["b"].numpy().tobytes()
_GOOD_ST = st_of({"w": G1["w"], "b": G1["b"]})
_W_HDR = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
_B_HDR = {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}


def _st(**hdr: Any) -> bytes:
    return st_file(hdr, _W_RAW + _B_RAW)


ST_CASES = [
    Case("st-truncated", _GOOD_ST[:-5], 400, "invalid_safetensors", "body.b.data_offsets",
         headers=BIN_CT),
    Case("st-shorter-than-8", b"\x10\0\0", 400, "invalid_safetensors", "body", headers=BIN_CT),
    Case("st-header-longer-than-body", st_file({"w": _W_HDR}, _W_RAW, header_len=10_000), 400,
         "invalid_safetensors", "body", headers=BIN_CT),
    Case("st-header-length-2**64-1", b"\xff" * 8 + b"{}", 400, "invalid_safetensors", "body",
         headers=BIN_CT),
    Case("st-header-not-json", struct.pack("<Q", 8) + b"{nope!!}", 400, "invalid_safetensors",
         "body", headers=BIN_CT),
    Case("st-header-a-list", struct.pack("<Q", 8) + b"[1,2,3] ", 400, "invalid_safetensors",
         "body", headers=BIN_CT),
    Case("st-header-nested-100000", lambda: struct.pack("<Q", 200_000) + b"[" * 100_000
         + b"]" * 100_000, 400, "invalid_safetensors", "body", headers=BIN_CT),
    Case("st-overlapping-offsets", _st(w=_W_HDR, b={**_B_HDR, "data_offsets": [12, 24]}), 400,
         "invalid_safetensors", "body.b", headers=BIN_CT),
    Case("st-trailing-bytes", st_file({"w": _W_HDR}, _W_RAW + b"\0" * 8), 400,
         "invalid_safetensors", "body", headers=BIN_CT),
    Case("st-offsets-past-end", _st(w=_W_HDR, b={**_B_HDR, "data_offsets": [24, 48]}), 400,
         "invalid_safetensors", "body.b.data_offsets", headers=BIN_CT),
    Case("st-offsets-reversed", _st(w=_W_HDR, b={**_B_HDR, "data_offsets": [36, 24]}), 400,
         "invalid_safetensors", "body.b.data_offsets", headers=BIN_CT),
    Case("st-bytes-do-not-fit-shape", _st(w={**_W_HDR, "shape": [2, 2]}, b=_B_HDR), 400,
         "invalid_safetensors", "body.w.data_offsets", headers=BIN_CT),
    Case("st-entry-missing-offsets", _st(w={"dtype": "F32", "shape": [2, 3]}), 400,
         "invalid_safetensors", "body.w", headers=BIN_CT),
    Case("st-metadata-not-strings", st_file({"__metadata__": {"a": 1}, "w": _W_HDR}, _W_RAW), 400,
         "invalid_safetensors", "body.__metadata__", headers=BIN_CT),
    Case("st-metadata-misspelt-field", st_file({"__metadata__": {"param_group": "[{}]"},
                                                "w": _W_HDR}, _W_RAW), 422,
         "unknown_field", "__metadata__.param_group", headers=BIN_CT),
    Case("st-unsupported-dtype", _st(w={**_W_HDR, "dtype": "F8_E4M3"}, b=_B_HDR), 422,
         "invalid_tensor", "body.w.dtype", headers=BIN_CT),
    Case("st-complex-dtype", _st(w={**_W_HDR, "dtype": "C64", "shape": [3]}, b=_B_HDR), 422,
         "invalid_tensor", "body.w.dtype", headers=BIN_CT),
    Case("st-float64-grad", st_of({"w": G1["w"].double()}), 422, "dtype_mismatch", "grads.w",
         headers=BIN_CT),
    Case("st-wrong-shape", st_of({"w": G1["w"].reshape(3, 2).contiguous()}), 422,
         "shape_mismatch", "grads.w", headers=BIN_CT),
    Case("st-unknown-param", st_of({"w": G1["w"], "nope": G1["b"]}), 422, "unknown_parameter",
         "grads.nope", headers=BIN_CT),
    Case("st-nan-grad", st_of({"b": torch.tensor([0.0, float("nan"), 1.0])}), 422,
         "nonfinite_gradient", "grads.b", headers=BIN_CT),
    Case("st-empty-body", b"", 400, "invalid_safetensors", "body", headers=BIN_CT),
    # a row-sparse pair whose row index sizes the tensor past int64 (its rows: index + 1)
    Case("st-sparse-index-int64-max", lambda: st_of({
        "w.indices": torch.tensor([2**63 - 1]), "w.values": G1["w"][:1].contiguous()}), 422,
        "index_out_of_range", "grads.w.indices", headers=BIN_CT),
    Case("st-sparse-index-past-strides", lambda: st_of({
        "w.indices": torch.tensor([2**62]), "w.values": G1["w"][:1].contiguous()}), 422,
        "index_out_of_range", "grads.w.indices", headers=BIN_CT),
    Case("st-json-sent-as-binary", _grads(w=jt(G1["w"])), 400, "invalid_safetensors", "body",
         headers=BIN_CT),
]


@pytest.mark.parametrize("case", STEP_CASES + ST_CASES, ids=lambda c: c.id)
def test_step_rejects(sess: Sess, case: Case) -> None:
    body = case.body() if callable(case.body) else case.body
    r = sess.http.post(f"{sess.url}/step", content=body, headers=case.headers,
                       params=case.params)
    assert_problem(r, case.status, case.code, case.field, case.detail)
    sess.assert_unchanged()


@pytest.mark.parametrize("case", [c for c in STEP_CASES + ST_CASES
                                  if c.code not in ("not_acceptable", "invalid")
                                  and not c.params  # the step's query cases
                                  and c.id not in ("if-match-twice", "worker-twice")],
                         ids=lambda c: c.id)
def test_grads_push_rejects(sess: Sess, case: Case) -> None:
    """POST .../grads reads the same bodies: the same refusals, and nothing accumulated."""
    body = case.body() if callable(case.body) else case.body
    r = sess.http.post(f"{sess.url}/grads", content=body, headers=case.headers)
    assert_problem(r, case.status, case.code, case.field, case.detail)
    sess.assert_unchanged()


def test_nonfinite_error_names_every_bad_parameter(sess: Sess) -> None:
    b = {"dtype": "float32", "shape": [3], "data": ["Infinity", 0.0, "-Infinity"]}
    r = sess.http.post(f"{sess.url}/step", content=_grads(
        w=_w(data=["NaN"] * 6), b=b, s=jt(torch.tensor(0.5))), headers=JSON_CT)
    body = assert_problem(r, 422, "nonfinite_gradient")
    assert sorted(body["names"]) == ["b", "w"]
    assert body["field"] in ("grads.w", "grads.b")
    sess.assert_unchanged()


def test_unicode_digits_are_not_numbers(sess: Sess) -> None:
    """``"²"`` passes ``str.isdigit()`` but not ``int()``: every integer the client writes as
    text (a query's base_version, If-Match, If-None-Match, a step's group index, a state id) is
    a 4xx naming it, or (If-None-Match) a tag that names no version, never a 500."""
    step = _grads(w=jt(G1["w"]))
    r = sess.http.post(f"{sess.url}/step", content=step, headers=JSON_CT,
                       params={"base_version": "\u00b2"})
    assert_problem(r, 422, "invalid_query", "base_version")
    r = sess.http.post(f"{sess.url}/step", content=step,
                       headers={**JSON_CT, "if-match": '"\u00b2"'.encode("latin-1")})
    assert_problem(r, 422, "invalid_base_version", "If-Match")
    options = json.dumps({"grads": {}, "param_groups": {"\u00b2": {"lr": 0.5}}}).encode()
    r = sess.http.post(f"{sess.url}/step", content=options, headers=JSON_CT)
    assert_problem(r, 422, "invalid_body", "param_groups.\u00b2")
    state = json.loads(json.dumps(sess.before.state_dict))
    state["state"] = {"\u00b2": state["state"]["0"]}
    r = sess.http.put(f"{sess.url}/state_dict", json=state)
    assert_problem(r, 422, "state_mismatch", "state_dict.state.\u00b2")
    r = sess.http.get(f"{sess.url}/params", params={"encoding": "b64"},
                      headers={"if-none-match": '"\u00b2"'.encode("latin-1")})
    assert r.status_code == 200, r.text
    assert r.json() == sess.before.params  # bitwise (b64)
    sess.assert_unchanged()


def test_a_version_with_a_leading_zero_is_no_if_match_tag(sess: Sess) -> None:
    """``If-Match: "01"`` is no ETag this server gives (entity tags compare character by
    character, RFC 9110 8.8.3.2): a 422 naming ``If-Match`` on a step (a base version), a
    strict change and in a list, as ``"a"`` is; it matched version 1. Nothing changes."""
    step = _grads(w=jt(G1["w"]))
    for tag in ('"01"', '"00"', 'W/"01"', '01'):
        r = sess.http.post(f"{sess.url}/step", content=step,
                           headers={**JSON_CT, "if-match": tag})
        assert_problem(r, 422, "invalid_base_version", "If-Match")
    for tag in ('"00"', '"01"', '"0", "01"'):
        r = sess.http.patch(f"{sess.url}/param_groups/0", json={"lr": 0.5},
                            headers={"if-match": tag})
        assert_problem(r, 422, "invalid_base_version", "If-Match")
    sess.assert_unchanged()


def test_an_index_written_twice_is_422(sess: Sess) -> None:
    """``"0"`` and ``"00"`` name one group (one parameter id): one of the two was dropped
    without a word (a step's lr change lost to the other key's eps change, one of two states
    imported). Both are a 422 naming the second key; nothing changes."""
    options = json.dumps({"grads": {}, "param_groups": {"0": {"lr": 0.5},
                                                        "00": {"eps": 1e-3}}}).encode()
    r = sess.http.post(f"{sess.url}/step", content=options, headers=JSON_CT)
    assert_problem(r, 422, "invalid_body", "param_groups.00")
    state = json.loads(json.dumps(sess.before.state_dict))
    state["state"]["00"] = state["state"]["0"]
    r = sess.http.put(f"{sess.url}/state_dict", json=state)
    assert_problem(r, 422, "state_mismatch", "state_dict.state.00")
    sess.assert_unchanged()


@pytest.mark.parametrize(("changes", "fld"), [
    ([{}, {}], "param_groups.1"),
    ([None, None], "param_groups.1"),
    ({"1": {}}, "param_groups.1"),
    ({"0": {"lr": 0.5}, "3": {}}, "param_groups.3"),
    ("st", "param_groups.2"),
], ids=["list-empty", "list-null", "object-empty", "change-and-empty", "safetensors"])
def test_a_step_entry_for_a_group_the_session_lacks_is_422(sess: Sess, changes: Any,
                                                           fld: str) -> None:
    """A step's ``{}`` or ``null`` for a group the session does not have is a client's mistake
    (its groups are not what it thinks), as a change for that group is: it was stepped as if
    the entry were not there. A 422 naming the entry, nothing changed."""
    if changes == "st":
        header = {"__metadata__": {"param_groups": json.dumps({"2": {}})},
                  "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
        r = sess.http.post(f"{sess.url}/step", content=st_file(
            header, G1["w"].numpy().tobytes()), headers=BIN_CT)
    else:
        r = sess.http.post(f"{sess.url}/step", json={"grads": {}, "param_groups": changes})
    assert_problem(r, 422, "unknown_param_group", fld, "does not exist; this session has 1")
    sess.assert_unchanged()


@pytest.mark.parametrize("changes", [[{}], [None], {"0": {}}, []],
                         ids=["list-empty", "list-null", "object-empty", "no-entries"])
def test_a_step_entry_that_changes_nothing_steps_as_torch(sess: Sess, changes: Any) -> None:
    """``{}`` and ``null`` for the session's own groups leave them alone: the step is the step
    without them, equal to in-process torch."""
    r = sess.http.post(f"{sess.url}/step", params={"encoding": "b64"},
                       json={"grads": {}, "param_groups": changes})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["step"], body["skipped"]) == (2, 2, False)
    expected = reference_params()
    for n in NAMES:
        assert torch.equal(from_jt(body["params"][n]), expected[n].detach()), n
    assert sess.http.get(sess.url).json()["revision"] == sess.before.describe["revision"] + 1


def test_a_sync_push_entry_for_a_group_the_session_lacks_is_422(http: httpx.Client) -> None:
    """In a session with sync rounds too (which takes no option changes with a push, but
    ``{}`` for its groups): a 422 naming the entry, and the round holds no push of it."""
    sid = new_session(http, sync={"workers": 2, "timeout_s": 30})
    before = snapshot(http, sid)
    url = f"/v1/sessions/{sid}/step"
    grads = {n: jt(t) for n, t in G1.items()}
    for changes, fld in (({"1": {}}, "param_groups.1"), ([{}, None], "param_groups.1")):
        r = http.post(url, json={"grads": grads, "param_groups": changes},
                      headers={"X-Optserve-Worker": "a"})
        assert_problem(r, 422, "unknown_param_group", fld)
    assert http.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []
    after = snapshot(http, sid)
    assert (after.describe, after.params, after.state_dict) == (
        before.describe, before.params, before.state_dict)
    r = http.post(url, json={"grads": grads, "param_groups": {"0": {"lr": 0.5}}},
                  headers={"X-Optserve-Worker": "a"})
    assert_problem(r, 422, "invalid_body", "param_groups")


def test_a_worker_id_with_a_no_break_space_is_no_other_workers_id(http: httpx.Client) -> None:
    """Only spaces and tabs surround a header value: ``X-Optserve-Worker: a<NBSP>`` was taken
    as worker ``a`` (``str.strip`` takes a no-break space too), so it pushed into ``a``'s
    place in the round. It is a 422 ``invalid_worker`` naming the header, the round holds no
    push, and the round then takes ``a`` and ``b`` as ever."""
    sid = new_session(http, sync={"workers": 2, "timeout_s": 30})
    before = snapshot(http, sid)
    url = f"/v1/sessions/{sid}/step"
    grads = {n: jt(t) for n, t in G1.items()}
    r = http.post(url, json={"grads": grads}, headers={"X-Optserve-Worker": b"a\xa0"})
    assert_problem(r, 422, "invalid_worker", "X-Optserve-Worker")
    assert http.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []
    after = snapshot(http, sid)
    assert (after.describe, after.params, after.state_dict) == (
        before.describe, before.params, before.state_dict)
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=http.base_url, timeout=60) as other:
        first = threading.Thread(target=lambda: answers.append(other.post(
            url, json={"grads": grads}, headers={"X-Optserve-Worker": "a"})))
        first.start()
        deadline = time.monotonic() + 30
        while http.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] != ["a"]:
            assert time.monotonic() < deadline, "worker a's push never joined the round"
            time.sleep(0.02)
        second = http.post(url, json={"grads": grads}, headers={"X-Optserve-Worker": "b"})
        first.join(60)
    assert second.status_code == 200, second.text
    assert [r.status_code for r in answers] == [200], answers
    assert second.json()["version"] == before.describe["version"] + 1


# --------------------------------------------------------------------------- other session routes

def test_unknown_session(http: httpx.Client) -> None:
    for method, path, kwargs in [
        ("POST", "/v1/sessions/no-such-session/step", {"json": {"grads": {}}}),
        ("POST", "/v1/sessions/no-such-session/grads", {"json": {"grads": {}}}),
        ("POST", "/v1/sessions/no-such-session/zero_grad", {}),
        ("GET", "/v1/sessions/no-such-session", {}),
        ("GET", "/v1/sessions/no-such-session/params", {}),
        ("PUT", "/v1/sessions/no-such-session/params", {"json": {"params": {}}}),
        ("GET", "/v1/sessions/no-such-session/state_dict", {}),
        ("PATCH", "/v1/sessions/no-such-session/param_groups/0", {"json": {"lr": 0.1}}),
        ("DELETE", "/v1/sessions/no-such-session", {}),
    ]:
        r = http.request(method, path, **kwargs)
        assert_problem(r, 404, "session_not_found", "session_id", "no-such-session")


def test_unknown_route_and_wrong_method(sess: Sess) -> None:
    assert_problem(sess.http.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(sess.http.get(f"{sess.url}/step"), 405, "method_not_allowed")
    sess.assert_unchanged()


@pytest.mark.parametrize("method, tail, body", [
    ("POST", "/step/", {"grads": {}}), ("POST", "/grads/", {"grads": {}}),
    ("POST", "/zero_grad/", None), ("PUT", "/params/", {"params": {}}),
    ("PATCH", "/param_groups/0/", {"lr": 0.5}), ("POST", "/scheduler/step/", {}),
    ("DELETE", "/", None), ("GET", "/params/", None), ("POST", "/step//", {"grads": {}}),
])
def test_a_trailing_slash_is_a_404_naming_the_path_meant(sess: Sess, method: str, tail: str,
                                                         body: Any) -> None:
    """A path with a trailing '/' is no route: a 404 problem naming the path without it,
    nothing done, not a 307 to it (which curl, ``curl -f`` too, took for an answer and
    exited 0 with the step not taken; its Location came from the request's Host)."""
    kwargs = {"json": body} if body is not None else {}
    r = sess.http.request(method, sess.url + tail, follow_redirects=False, **kwargs)
    meant = (sess.url + tail).rstrip("/")
    assert_problem(r, 404, "not_found", "path", f"did you mean '{meant}'?")
    assert "location" not in r.headers
    sess.assert_unchanged()


def test_an_unknown_route_names_the_path(sess: Sess) -> None:
    assert_problem(sess.http.get("/v2/sessions/"), 404, "not_found", "path",
                   "no route at '/v2/sessions/'")
    assert "did you mean" not in sess.http.get("/v2/sessions/").json()["detail"]


def test_session_id_too_long_in_path(sess: Sess) -> None:
    r = sess.http.get(f"/v1/sessions/{'x' * 201}")
    assert_problem(r, 422, "invalid", "session_id")
    sess.assert_unchanged()


def test_put_params_rejects(sess: Sess) -> None:
    cases: list[tuple[bytes, dict[str, str], int, str, str]] = [
        (json.dumps({"params": {"w": _w(data=[1.0, "NaN", 3.0, 4.0, 5.0, 6.0])}}).encode(),
         JSON_CT, 422, "nonfinite_parameter", "params.w"),
        (json.dumps({"params": {"w": _w(shape=[6])}}).encode(), JSON_CT, 422, "shape_mismatch",
         "params.w"),
        (json.dumps({"params": {"b": jt(G1["b"].double())}}).encode(), JSON_CT, 422,
         "dtype_mismatch", "params.b"),
        (json.dumps({"params": {"b": jt(G1["b"]), "x": jt(G1["b"])}}).encode(), JSON_CT, 422,
         "unknown_parameter", "params.x"),
        (json.dumps({"params": {}}).encode(), JSON_CT, 422, "invalid_params", "params"),
        (json.dumps({"grads": {}}).encode(), JSON_CT, 422, "unknown_field", "grads"),
        (b"", JSON_CT, 400, "invalid_json", "body"),
        (b"not json", JSON_CT, 400, "invalid_json", "body"),
        (_GOOD_ST[:-1], BIN_CT, 400, "invalid_safetensors", "body.b.data_offsets"),
        (b"{}", {"content-type": "text/csv"}, 415, "unsupported_media_type", "content-type"),
    ]
    for body, headers, status, code, fld in cases:
        r = sess.http.put(f"{sess.url}/params", content=body, headers=headers)
        assert_problem(r, status, code, fld)
    r = sess.http.put(f"{sess.url}/params", json={"params": {"b": jt(G1["b"])}},
                      headers={"accept": "image/png"})
    assert_problem(r, 406, "not_acceptable", "accept")
    sess.assert_unchanged()


def test_get_params_rejects(sess: Sess) -> None:
    r = sess.http.get(f"{sess.url}/params", params={"names": "w,nope"})
    assert_problem(r, 422, "unknown_parameter", "names.nope")
    # names given but naming nothing pulled {} (200): an empty selection no client means
    for empty in ("", ",", ",,"):
        r = sess.http.get(f"{sess.url}/params", params={"names": empty})
        assert_problem(r, 422, "invalid_query", "names")
    r = sess.http.get(f"{sess.url}/params", params=[("names", ""), ("names", ",")])
    assert_problem(r, 422, "invalid_query", "names")
    r = sess.http.get(f"{sess.url}/params", headers={"accept": "text/plain"})
    assert_problem(r, 406, "not_acceptable", "accept")
    r = sess.http.get(f"{sess.url}/state_dict", params={"format": "pickle"})
    assert_problem(r, 422, "invalid_query", "format")
    sess.assert_unchanged()


def test_a_row_pulls_unknown_metadata_entry_is_422(sess: Sess) -> None:
    """A safetensors ``POST .../params/rows`` body is its ``int64 [n]`` tensors: another
    ``__metadata__`` entry is a 422 ``unknown_field`` naming it, as ``{"rows": ..., "foo": 1}``
    is in JSON (it was dropped unread); ``format``, which other writers add, is taken."""
    rows = torch.tensor([1, 0], dtype=torch.int64).numpy().tobytes()
    header = {"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}
    url = f"{sess.url}/params/rows"
    for meta in [{"min_version": "9"}, {"rows": '{"w": [0]}'}]:
        r = sess.http.post(url, content=st_file({"__metadata__": meta, **header}, rows),
                           headers=BIN_CT)
        assert_problem(r, 422, "unknown_field", f"__metadata__.{next(iter(meta))}")
    r = sess.http.post(url, content=st_file({"__metadata__": {"format": "pt"}, **header}, rows),
                       headers=BIN_CT)
    assert r.status_code == 200, r.text
    want = sess.http.post(url, json={"rows": {"w": [1, 0]}}).json()
    assert r.json() == want
    sess.assert_unchanged()


@pytest.mark.parametrize(("method", "path", "query", "fld"), [
    ("GET", "params", [("min_version", "0"), ("min_version", "5")], "min_version"),
    ("GET", "params", [("wait_s", "0"), ("wait_s", "30")], "wait_s"),
    ("GET", "params", [("encoding", "b64"), ("encoding", "data")], "encoding"),
    ("GET", "params", [("name", "w"), ("rows", "0"), ("min_version", "0"),
                       ("min_version", "9")], "min_version"),
    ("GET", "params", [("name", "w"), ("name", "w"), ("rows", "0")], "name"),
    ("POST", "params/rows", [("min_version", "0"), ("min_version", "9")], "min_version"),
    ("POST", "params/rows", [("encoding", "b64"), ("encoding", "b64")], "encoding"),
    ("GET", "state_dict", [("format", "json"), ("format", "safetensors")], "format"),
    ("GET", "state_dict", [("encoding", "data"), ("encoding", "b64")], "encoding"),
    ("POST", "grads", [("upcast", "false"), ("upcast", "true")], "upcast"),
])
def test_a_query_value_given_twice_is_422(sess: Sess, method: str, path: str,
                                          query: list[tuple[str, str]], fld: str) -> None:
    """One wins (FastAPI's last, query_params.get's first) no more: a 422 naming it."""
    body = ({"rows": {"w": [1]}} if path == "params/rows"
            else {"grads": {"w": jt(G2_W)}} if path == "grads" else None)
    r = sess.http.request(method, f"{sess.url}/{path}", params=query, json=body)
    assert_problem(r, 422, "invalid_query", fld, f"{fld} is given more than once")
    sess.assert_unchanged()


def test_query_values_given_once_are_taken(sess: Sess) -> None:
    """The same values, once each, are taken (the refusals above are about the repeat)."""
    r = sess.http.get(f"{sess.url}/params", params={"encoding": "b64", "min_version": "0"})
    assert r.status_code == 200, r.text
    plain = sess.http.get(f"{sess.url}/params").json()["params"]
    for name, t in r.json()["params"].items():
        want = torch.tensor(plain[name]["data"]).reshape(plain[name]["shape"])
        assert "b64" in t and torch.equal(from_jt(t), want), name
    sess.assert_unchanged()


# --------------------------------------------------------------------------- PATCH param_groups

def _torch_error(make: Callable[[], object]) -> str:
    with pytest.raises(ValueError) as info:
        make()
    return str(info.value)


@pytest.mark.parametrize(
    ("index", "body", "status", "code", "fld"),
    [
        (7, {"lr": 0.5}, 422, "unknown_param_group", "index"),
        (0, {"momentum": 0.9}, 422, "unknown_option", "param_groups.0.momentum"),
        (0, {"lr": "fast"}, 422, "invalid_option", "param_groups.0.lr"),
        (0, {"lr": None}, 422, "invalid_option", "param_groups.0.lr"),
        (0, {"betas": [0.9]}, 422, "invalid_option", "param_groups.0.betas"),
        (0, {"amsgrad": 1}, 422, "invalid_option", "param_groups.0.amsgrad"),
        (0, {"params": ["w"]}, 422, "unknown_option", "param_groups.0.params"),
        (0, [0.5], 400, "invalid_json", "body"),
    ],
    ids=["unknown-index", "unknown-option", "lr-string", "lr-null", "betas-length",
         "amsgrad-int", "params-key", "not-an-object"],
)
def test_patch_rejects(sess: Sess, index: int, body: Any, status: int, code: str,
                       fld: str) -> None:
    r = sess.http.patch(f"{sess.url}/param_groups/{index}", json=body)
    assert_problem(r, status, code, fld)
    sess.assert_unchanged()


@pytest.mark.parametrize("betas", [[0.9, "fast"], [{"dtype": "float32", "shape": [],
                                                    "data": [0.9]}, 0.999]],
                         ids=["not-a-number", "tensor"])
def test_a_betas_element_is_named_in_the_detail_as_in_the_field(sess: Sess,
                                                                betas: list[Any]) -> None:
    """The refusal of one element of ``betas`` names it in its detail as its field does
    (``param_groups.0.betas.1``); the detail said ``betas[1]``."""
    r = sess.http.patch(f"{sess.url}/param_groups/0", json={"betas": betas})
    index = 1 if betas[1] == "fast" else 0
    field = f"param_groups.0.betas.{index}"
    problem = assert_problem(r, 422, "invalid_option", field)
    assert problem["detail"].startswith(f"{field} "), problem
    sess.assert_unchanged()


def test_compressed_bodies_are_refused_by_name(sess: Sess) -> None:
    """A gzip body was parsed as it came ("not valid JSON: str is not valid UTF-8"): every
    route that reads a body now says that its Content-Encoding is not supported."""
    state = sess.http.get(f"{sess.url}/state_dict").content
    compressed = {"content-encoding": "gzip", **JSON_CT}
    for method, path, body in [
        ("POST", "/v1/sessions", {"optimizer": "SGD", "params": {"w": jt(torch.ones(2))}}),
        ("POST", f"{sess.url}/step", {"grads": {"w": jt(G2_W)}}),
        ("POST", f"{sess.url}/grads", {"grads": {"w": jt(G2_W)}}),
        ("PUT", f"{sess.url}/params", {"params": {"b": jt(G1["b"])}}),
        ("PATCH", f"{sess.url}/param_groups/0", {"lr": 0.5}),
        ("PATCH", sess.url, {"history": 5}),
        ("PUT", f"{sess.url}/state_dict", json.loads(state)),
    ]:
        r = sess.http.request(method, path, content=gzip.compress(json.dumps(body).encode()),
                              headers=compressed)
        problem = assert_problem(r, 415, "unsupported_media_type", "content-encoding")
        assert "gzip" in problem["detail"], problem
    sess.assert_unchanged()
    r = sess.http.request("PATCH", f"{sess.url}/param_groups/0", content=b'{"lr": 0.5}',
                          headers={"content-encoding": "identity", **JSON_CT})
    assert r.status_code == 200 and r.json()["lr"] == [0.5], r.text


def test_patch_bad_index_and_content_type(sess: Sess) -> None:
    assert_problem(sess.http.patch(f"{sess.url}/param_groups/-1", json={"lr": 1.0}), 422,
                   "invalid", "index")
    assert_problem(sess.http.patch(f"{sess.url}/param_groups/x", json={"lr": 1.0}), 422,
                   "invalid", "index")
    r = sess.http.patch(f"{sess.url}/param_groups/0", content=b'{"lr": 0.5}',
                        headers={"content-type": "text/plain"})
    assert_problem(r, 415, "unsupported_media_type", "content-type")
    r = sess.http.patch(f"{sess.url}/param_groups/0", content=_GOOD_ST, headers=BIN_CT)
    assert_problem(r, 415, "unsupported_media_type", "content-type")
    sess.assert_unchanged()


@pytest.mark.parametrize("option", [{"lr": -1}, {"eps": -1.0}, {"weight_decay": -0.5},
                                    {"betas": [1.5, 0.999]}],
                         ids=["lr", "eps", "weight_decay", "betas"])
def test_patch_invalid_value_leaves_group_unchanged(sess: Sess, option: dict[str, Any]) -> None:
    (name, value), = option.items()
    local = tuple(value) if isinstance(value, list) else value
    message = _torch_error(lambda: torch.optim.Adam([torch.zeros(1)], **{name: local}))
    r = sess.http.patch(f"{sess.url}/param_groups/0", json=option)
    body = assert_problem(r, 422, "invalid_option", f"param_groups.0.{name}")
    assert body["detail"] == message
    sess.assert_unchanged()


def test_add_param_group_invalid_value(sess: Sess) -> None:
    message = _torch_error(lambda: torch.optim.Adam([torch.zeros(1)], lr=-0.5))
    r = sess.http.post(f"{sess.url}/param_groups", json={"params": {"c": jt(G1["b"])},
                                                         "lr": -0.5})
    body = assert_problem(r, 422, "invalid_option", "param_groups.1.lr")
    assert body["detail"] == message
    sess.assert_unchanged()


def test_create_group_invalid_value(sess: Sess) -> None:
    message = _torch_error(lambda: torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=-1.0))
    r = sess.http.post("/v1/sessions", json={"optimizer": "SGD", "options": {"lr": 0.1},
                                             "param_groups": [{"params": {"x": jt(G1["b"])},
                                                               "momentum": -1.0}]})
    body = assert_problem(r, 422, "invalid_option", "param_groups.0.momentum")
    assert body["detail"] == message
    sess.assert_unchanged()


# --------------------------------------------------------------------------- POST param_groups

def test_add_param_group_rejects(sess: Sess) -> None:
    url = f"{sess.url}/param_groups"
    cases: list[tuple[Any, int, str, str]] = [
        ({"params": {"w": jt(G1["w"])}}, 422, "invalid_params", "param_groups.1.params.w"),
        ({"params": {"i": {"dtype": "int32", "shape": [2], "data": [1, 2]}}}, 422,
         "invalid_dtype", "param_groups.1.params.i"),
        ({"params": {"c": jt(G1["b"])}, "momentum": 0.9}, 422, "unknown_option",
         "param_groups.1.momentum"),
        ({"params": {"c": jt(G1["b"])}, "betas": [0.9]}, 422, "invalid_option",
         "param_groups.1.betas"),
        ({"lr": 0.1}, 422, "missing_field", "param_group.params"),
        ({"params": {"c": _w(data=[1.0])}}, 422, "invalid_tensor", "param_group.params.c.data"),
    ]
    for body, status, code, fld in cases:
        assert_problem(sess.http.post(url, json=body), status, code, fld)
    sess.assert_unchanged()


# --------------------------------------------------------------------------- create

def _create_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"optimizer": "Adam", "options": {"lr": 0.01},
                            "params": {"x": jt(torch.tensor([1.0, 2.0]))}}
    body.update(over)
    return body


def _nested_scheduler(depth: int) -> dict[str, Any]:
    """A ChainedScheduler ``depth`` levels above a ConstantLR."""
    spec: dict[str, Any] = {"name": "ConstantLR"}
    for _ in range(depth):
        spec = {"name": "ChainedScheduler", "options": {"schedulers": [spec]}}
    return spec


CREATE_CASES: list[tuple[str, Any, int, str, str | None, str | None]] = [
    ("unknown-optimizer", _create_body(optimizer="Adamm"), 422, "unknown_optimizer",
     "optimizer", "Adamm"),
    ("optimizer-not-string", _create_body(optimizer=["Adam"]), 422, "unknown_optimizer",
     "optimizer", None),
    ("missing-optimizer", {"params": {"x": jt(torch.tensor([1.0]))}}, 422, "missing_field",
     "optimizer", None),
    ("lbfgs-two-groups", {"optimizer": "LBFGS", "param_groups": [
        {"params": {"a": jt(torch.tensor([1.0]))}}, {"params": {"b": jt(torch.tensor([1.0]))}}]},
     422, "invalid_option", None, "per-parameter options"),
    ("sparse-adam-lr", _create_body(optimizer="SparseAdam", options={"lr": -1.0}), 422,
     "invalid_option", "options.lr", "learning rate"),
    ("unknown-option", _create_body(options={"lrr": 0.1}), 422, "unknown_option", "options.lrr",
     "lrr"),
    ("option-wrong-type", _create_body(options={"lr": "fast"}), 422, "invalid_option",
     "options.lr", None),
    ("options-not-object", _create_body(options=[0.1]), 422, "invalid_option", "options", None),
    ("group-unknown-option", _create_body(params=None) | {"param_groups": [
        {"params": {"x": jt(torch.tensor([1.0]))}, "nesterov": True}]}, 422, "unknown_option",
     "param_groups.0.nesterov", None),
    ("unknown-scheduler", _create_body(scheduler={"name": "FancyLR"}), 422, "unknown_scheduler",
     "scheduler.name", "FancyLR"),
    ("lambda-scheduler", _create_body(scheduler={"name": "LambdaLR",
                                                 "options": {"lr_lambda": "x"}}),
     422, "unsupported_scheduler", "scheduler.name", "callable"),
    ("scheduler-unknown-option", _create_body(scheduler={"name": "StepLR", "options": {
        "step_size": 2, "gama": 0.5}}), 422, "unknown_option", "scheduler.options.gama", None),
    ("scheduler-missing-option", _create_body(scheduler={"name": "StepLR"}), 422,
     "invalid_option", "scheduler.options.step_size", "step_size"),
    # a scheduler spec is bounded: nesting past 8 levels (deeper ones were a 500 from 100 or
    # so, and an export that its own import refused from 30), more than 64 schedulers, a list
    # option of more than 1,000 entries (1e6 milestones: 8 s to create, 5 s every step)
    ("scheduler-nested-9-deep", _create_body(scheduler=_nested_scheduler(9)), 422,
     "invalid_scheduler", "scheduler" + ".options.schedulers.0" * 8 + ".options.schedulers",
     "8"),
    ("scheduler-nested-200-deep", _create_body(scheduler=_nested_scheduler(200)), 422,
     "invalid_scheduler", "scheduler" + ".options.schedulers.0" * 8 + ".options.schedulers",
     None),
    ("scheduler-65-children", _create_body(scheduler={"name": "ChainedScheduler", "options": {
        "schedulers": [{"name": "ConstantLR"}] * 65}}), 422, "invalid_scheduler",
     "scheduler.options.schedulers", "64"),
    ("milestones-1001", _create_body(scheduler={"name": "MultiStepLR", "options": {
        "milestones": list(range(1, 1002))}}), 422, "invalid_option",
     "scheduler.options.milestones", "1000"),
    ("milestones-1e6", _create_body(scheduler={"name": "MultiStepLR", "options": {
        "milestones": list(range(1_000_000))}}), 422, "invalid_option",
     "scheduler.options.milestones", None),
    # a momentum a scheduler puts in the groups must fit the parameters' dtype, as the
    # optimizer's own options must: it was taken, and every step after was a 422 naming
    # param_groups.0.base_momentum, a field no step sends
    ("cyclic-base-momentum-past-float32", _create_body(
        optimizer="SGD", options={"lr": 0.1, "momentum": 0.9},
        scheduler={"name": "CyclicLR", "options": {"base_lr": 0.01, "max_lr": 0.1,
                                                   "base_momentum": 1e308}}),
     422, "option_overflow", "scheduler.options.base_momentum", None),
    # ... and be a momentum torch takes, as an import of the session's own state requires
    ("cyclic-base-momentum-negative", _create_body(
        optimizer="SGD", options={"lr": 0.1, "momentum": 0.9},
        scheduler={"name": "CyclicLR", "options": {"base_lr": 0.01, "max_lr": 0.1,
                                                   "base_momentum": -0.5}}),
     422, "invalid_option", "scheduler.options.base_momentum", "negative"),
    ("one-cycle-adam-momentum-one", _create_body(
        scheduler={"name": "OneCycleLR", "options": {"max_lr": 0.1, "total_steps": 10,
                                                     "max_momentum": 1.0}}),
     422, "invalid_option", "scheduler.options.max_momentum", "beta1"),
    ("one-cycle-max-momentum-past-float32", _create_body(
        optimizer="SGD", options={"lr": 0.1, "momentum": 0.9},
        scheduler={"name": "OneCycleLR", "options": {"max_lr": 0.1, "total_steps": 10,
                                                     "max_momentum": 1e308}}),
     422, "option_overflow", "scheduler.options.max_momentum", None),
    # OneCycleLR keeps epochs * steps_per_epoch as total_steps: past int64 no export could
    # write it (its JSON export was a 500)
    ("one-cycle-total-steps-past-int64", _create_body(
        scheduler={"name": "OneCycleLR", "options": {"max_lr": 0.1, "epochs": 10**10,
                                                     "steps_per_epoch": 10**10}}),
     422, "invalid_option", "scheduler.options.epochs", "int64"),
    # MultiStepLR keeps its milestones as a Counter's keys: one past int64 made a torch export
    # that no import takes (and a JSON one whose milestone imported back as a string)
    ("multistep-milestone-past-int64", _create_body(
        scheduler={"name": "MultiStepLR", "options": {"milestones": [3, 2**63]}}),
     422, "invalid_option", "scheduler.options.milestones", "int64"),
    # torch's words for a scheduler option name it (they named only scheduler.options)
    ("linear-start-factor", _create_body(
        scheduler={"name": "LinearLR", "options": {"start_factor": 2.0, "total_iters": 3}}),
     422, "invalid_option", "scheduler.options.start_factor", "Starting multiplicative"),
    ("linear-end-factor", _create_body(
        scheduler={"name": "LinearLR", "options": {"end_factor": -0.5, "total_iters": 3}}),
     422, "invalid_option", "scheduler.options.end_factor", "Ending multiplicative"),
    ("plateau-min-lr-list", _create_body(
        scheduler={"name": "ReduceLROnPlateau", "options": {"min_lr": [], "patience": 2}}),
     422, "invalid_option", "scheduler.options.min_lr", "min_lrs"),
    ("plateau-min-lr-past-int64", _create_body(
        scheduler={"name": "ReduceLROnPlateau", "options": {"min_lr": 2**63, "patience": 2}}),
     422, "invalid_option", "scheduler.options.min_lr", "int64"),
    # torch's LBFGS makes max_eval max_iter * 5 // 4: from a max_iter of -2**63 (or 2**64 - 1)
    # past what a JSON answer holds, the create was applied, then answered with a 500, and
    # every list of the sessions after it was a 500 too
    ("lbfgs-max-iter-int64-min", _create_body(optimizer="LBFGS", options={"max_iter": -2**63}),
     422, "invalid_option", "options.max_iter", "max_eval"),
    ("lbfgs-max-iter-uint64-max", _create_body(optimizer="LBFGS",
                                               options={"max_iter": 2**64 - 1}),
     422, "invalid_option", "options.max_iter", "max_eval"),
    # torch's step with a weight_decay of true raises "Boolean alpha only supported for
    # Boolean results.", which named only "options" beside another option
    ("weight-decay-true", _create_body(optimizer="SGD", options={"lr": 0.1,
                                                                 "weight_decay": True}),
     422, "invalid_option", "options.weight_decay", "Boolean alpha"),
    ("bad-id-space", _create_body(id="bad id!"), 422, "invalid_id", "id", None),
    ("bad-id-slash", _create_body(id="../etc/passwd"), 422, "invalid_id", "id", None),
    ("bad-id-empty", _create_body(id=""), 422, "invalid_id", "id", None),
    ("bad-id-leading-dot", _create_body(id=".hidden"), 422, "invalid_id", "id", None),
    ("bad-id-unicode", _create_body(id="sess\u00e9"), 422, "invalid_id", "id", None),
    ("bad-id-too-long", _create_body(id="a" * 129), 422, "invalid_id", "id", None),
    ("bad-id-number", _create_body(id=12), 422, "invalid_id", "id", None),
    ("int-params", _create_body(params={"x": {"dtype": "int64", "shape": [1], "data": [1]}}),
     422, "invalid_dtype", "param_groups.0.params.x", None),
    ("no-params", {"optimizer": "SGD"}, 422, "missing_field", "params", None),
    ("empty-params", _create_body(params={}), 422, "invalid_params", "param_groups.0.params",
     None),
    ("params-and-groups", _create_body(param_groups=[{"params": {}}]), 422, "invalid_body",
     "params", None),
    ("empty-param-groups", _create_body(params=None) | {"param_groups": []}, 422,
     "invalid_body", "param_groups", None),
    ("bad-nonfinite-policy", _create_body(nonfinite="ignore"), 422, "invalid_body", "nonfinite",
     None),
    ("unknown-field", _create_body(optimiser="SGD"), 422, "unknown_field", "optimiser", None),
    ("bad-tensor", _create_body(params={"x": {"dtype": "float32", "shape": [2],
                                              "data": [1.0]}}), 422, "invalid_tensor",
     "params.x.data", None),
]


def _drop_none(body: Any) -> Any:
    return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body


@pytest.mark.parametrize(("name", "body", "status", "code", "fld", "detail"), CREATE_CASES,
                         ids=[c[0] for c in CREATE_CASES])
def test_create_rejects(sess: Sess, name: str, body: Any, status: int, code: str,
                        fld: str | None, detail: str | None) -> None:
    before = sess.http.get("/v1/sessions").json()
    body = _drop_none(body)
    attempted = f"never-{uuid.uuid4().hex[:8]}"
    if "id" not in body:
        body = {**body, "id": attempted}
    r = sess.http.post("/v1/sessions", json=body)
    assert_problem(r, status, code, fld, detail)
    assert sess.http.get("/v1/sessions").json() == before
    assert sess.http.get(f"/v1/sessions/{attempted}").status_code == 404
    sess.assert_unchanged()


# --------------------------------------------------------------------------- nested values

#: orjson reads a JSON text nested up to 1,024 levels: a value nested about that deep, past
#: Python's recursion limit, was a 500 (the checks of options, shapes and data walked it, or
#: wrote it into the problem's detail, by recursion) where one nested 40 deep was a 422
NESTED_DEPTHS = (40, 1015)
_X = b'{"dtype": "float32", "shape": [1], "data": [1.0]}'


def _nested(kind: str, depth: int) -> bytes:
    if kind == "list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a": ' * depth + b"1" + b"}" * depth


def _in_create(json_text: bytes) -> Callable[[bytes], bytes]:
    return lambda v: b'{"optimizer": "Adam", ' + json_text.replace(b"@", v) + b"}"


NESTED_CASES: list[tuple[str, str, str, Callable[[bytes], bytes], str, str]] = [
    ("create-option", "POST", "", _in_create(b'"params": {"x": ' + _X + b'}, "options": '
                                             b'{"lr": @}'), "invalid_option", "options.lr"),
    ("create-betas", "POST", "", _in_create(b'"params": {"x": ' + _X + b'}, "options": '
                                            b'{"betas": [0.9, @]}'), "invalid_option",
     "options.betas.1"),
    ("create-group-option", "POST", "", _in_create(b'"param_groups": [{"params": {"x": ' + _X
                                                   + b'}, "eps": @}]'), "invalid_option",
     "param_groups.0.eps"),
    ("create-scheduler-option", "POST", "", _in_create(
        b'"params": {"x": ' + _X + b'}, "scheduler": {"name": "StepLR", "options": '
        b'{"step_size": 2, "gamma": @}}'), "invalid_option", "scheduler.options.gamma"),
    ("create-data", "POST", "", _in_create(b'"params": {"x": {"dtype": "float32", "shape": '
                                           b'[1], "data": [@]}}'), "invalid_tensor",
     "params.x.data"),
    ("create-shape", "POST", "", _in_create(b'"params": {"x": {"dtype": "float32", "shape": '
                                            b'@, "data": [1.0]}}'), "invalid_tensor",
     "params.x.shape"),
    ("patch-group", "PATCH", "/param_groups/0", lambda v: b'{"lr": ' + v + b"}",
     "invalid_option", "param_groups.0.lr"),
    ("add-group", "POST", "/param_groups", lambda v: b'{"params": {"c": ' + _X + b'}, "lr": '
     + v + b"}", "invalid_option", "param_groups.1.lr"),
    ("step-group-option", "POST", "/step", lambda v: b'{"grads": {"s": {"dtype": "float32", '
     b'"shape": [], "data": [1.0]}}, "param_groups": [{"betas": ' + v + b"}]}",
     "invalid_option", "param_groups.0.betas"),
    ("put-shape", "PUT", "/params", lambda v: b'{"params": {"s": {"dtype": "float32", '
     b'"shape": ' + v + b', "data": [1.0]}}}', "invalid_tensor", "params.s.shape"),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "code", "fld"), NESTED_CASES,
                         ids=[c[0] for c in NESTED_CASES])
def test_values_nested_as_deep_as_json_goes_are_422(
        sess: Sess, name: str, method: str, path: str, body: Callable[[bytes], bytes],
        code: str, fld: str) -> None:
    """A list or an object nested 1,015 levels deep where an option, a shape or a tensor's
    data goes is refused as one nested 40 deep is: a 422 naming the field, its detail short,
    nothing made or changed."""
    before = sess.http.get("/v1/sessions").json()
    url = f"{sess.url}{path}" if path else "/v1/sessions"
    for kind in ("list", "object"):
        for depth in NESTED_DEPTHS:
            r = sess.http.request(method, url, content=body(_nested(kind, depth)),
                                  headers=JSON_CT)
            problem = assert_problem(r, 422, code, fld)
            assert len(problem["detail"]) < 400, problem
    assert sess.http.get("/v1/sessions").json() == before
    sess.assert_unchanged()


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("Adam", {"lr": -1.0}), ("Adam", {"betas": [0.9, 1.0]}), ("SGD", {"momentum": -0.5}),
     ("SGD", {"lr": 0.1, "nesterov": True}), ("AdamW", {"eps": -1e-8}),
     ("RMSprop", {"alpha": -0.1}), ("Adagrad", {"lr_decay": -1.0})],
    ids=["adam-lr", "adam-beta2", "sgd-momentum", "sgd-nesterov", "adamw-eps", "rmsprop-alpha",
         "adagrad-lr_decay"],
)
def test_create_invalid_hyperparameter_has_torch_message(
    sess: Sess, optimizer: str, options: dict[str, Any]
) -> None:
    cls = getattr(torch.optim, optimizer)
    local = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    message = _torch_error(lambda: cls([torch.zeros(1)], **local))
    r = sess.http.post("/v1/sessions", json=_create_body(optimizer=optimizer, options=options))
    body = assert_problem(r, 422, "invalid_option")
    assert body["detail"] == message
    assert body["field"].startswith("options.")
    sess.assert_unchanged()


def test_create_non_object_and_empty_bodies(sess: Sess) -> None:
    before = sess.http.get("/v1/sessions").json()
    for content, headers, status, code in [
        (b"", JSON_CT, 400, "invalid_json"),
        (b"[]", JSON_CT, 400, "invalid_json"),
        (b"42", JSON_CT, 400, "invalid_json"),
        (b"{", JSON_CT, 400, "invalid_json"),
        (b"[" * 100_000, JSON_CT, 400, "invalid_json"),
        (b"optimizer=SGD", {"content-type": "application/x-www-form-urlencoded"}, 415,
         "unsupported_media_type"),
        (b"", BIN_CT, 400, "invalid_safetensors"),
    ]:
        r = sess.http.post("/v1/sessions", content=content, headers=headers)
        assert_problem(r, status, code, "content-type" if status == 415 else "body")
    assert sess.http.get("/v1/sessions").json() == before
    sess.assert_unchanged()


def test_create_safetensors_bad_metadata(sess: Sess) -> None:
    before = sess.http.get("/v1/sessions").json()
    x = torch.tensor([1.0, 2.0])
    good = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = x.numpy().tobytes()
    for metadata, code, fld in [
        ({"optimizer": "Nope"}, "unknown_optimizer", "optimizer"),
        ({"optimizer": "Adam", "options": '{"lr": -1}'}, "invalid_option", "options.lr"),
        ({"optimizer": "Adam", "param_groups": '[{"params": ["y"]}]'}, "unknown_parameter",
         "param_groups.0.params"),
        ({"optimizer": "Adam", "param_groups": '[{"params": []}]'}, "invalid_body",
         "param_groups"),
        ({"optimizer": "Adam", "param_groups": '{"params": ["x"]}'}, "invalid_body",
         "param_groups"),
        ({"optimizer": "Adam", "id": "no good"}, "invalid_id", "id"),
        ({"optimizer": "Adam", "colour": "red"}, "unknown_field", "colour"),
        # the parameters are the body's tensors: a params entry would be dropped unread
        ({"optimizer": "Adam", "params": json.dumps({"y": jt(torch.ones(1))})},
         "unknown_field", "params"),
        # one tensor listed twice in a group, as in two groups (not made one parameter quietly)
        ({"optimizer": "Adam", "param_groups": '[{"params": ["x", "x"]}]'}, "invalid_params",
         "param_groups.0.params.x"),
    ]:
        r = sess.http.post("/v1/sessions", content=st_file({"__metadata__": metadata, **good}, raw),
                           headers=BIN_CT)
        assert_problem(r, 422, code, fld)
    assert sess.http.get("/v1/sessions").json() == before
    sess.assert_unchanged()


def test_duplicate_id_is_409(sess: Sess) -> None:
    r = sess.http.post("/v1/sessions", json=_create_body(id=sess.id, optimizer="SGD"))
    assert_problem(r, 409, "session_exists", "id", sess.id)
    sess.assert_unchanged()  # the original (Adam, its state) is untouched


# --------------------------------------------------------------------------- state_dict import

def test_import_state_rejects(sess: Sess) -> None:
    url = f"{sess.url}/state_dict"
    good = sess.before.state_dict
    bad_shape = json.loads(json.dumps(good))
    bad_shape["state"]["0"]["exp_avg"] = jt(torch.zeros(3, 2))
    extra_group = json.loads(json.dumps(good))
    extra_group["param_groups"].append(extra_group["param_groups"][0])
    bad_lr = json.loads(json.dumps(good))
    bad_lr["param_groups"][0]["lr"] = "big"
    bad_float = json.loads(json.dumps(good))
    bad_float["param_groups"][0]["eps"] = {"$float": [1]}
    for body, status, code, fld in [
        (bad_shape, 422, "state_mismatch", "state_dict.state.0.exp_avg"),
        (extra_group, 422, "state_mismatch", "state_dict.param_groups"),
        (bad_lr, 422, "invalid_option", "state_dict.param_groups.0.lr"),
        (bad_float, 422, "invalid_state", "state_dict.param_groups.0.eps"),
        ({"state": {}, "param_groups": [], "extra": 1}, 422, "state_mismatch",
         "state_dict.extra"),
        ([1, 2], 400, "invalid_json", None),
    ]:
        assert_problem(sess.http.put(url, json=body), status, code, fld)
    r = sess.http.put(url, params={"format": "torch"}, content=b"PK\x03\x04 not a zip",
                      headers=BIN_CT)
    assert_problem(r, 422, "invalid_torch_file", "body")
    r = sess.http.put(url, content=st_of({"state.0.exp_avg": torch.zeros(2, 3)}), headers=BIN_CT)
    assert_problem(r, 422, "invalid_state", "__metadata__.optserve_state")
    sess.assert_unchanged()


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("keys", [("+0",), (" 0",), ("\u0660",), ("0", "00"), ("00",),
                                  ("0_0",), ("0.0",), ("-0",), ("0 ",)],
                         ids=["plus", "space", "arabic-indic", "twice", "leading-zero",
                              "underscore", "decimal-point", "minus", "trailing-space"])
def test_a_state_key_is_a_parameter_id_on_every_session(http: httpx.Client, shards: int,
                                                        keys: tuple[str, ...]) -> None:
    """A JSON state import's keys are parameter ids written as an export writes them (plain
    decimal digits, no leading zero), the same on a sharded session, which read them with
    ``int()`` (``"+0"``, ``" 0"`` or ``"\u0660"`` was parameter 0, and of ``"0"`` and ``"00"``
    the later one was taken, the other dropped); ``"00"`` alone was parameter 0 on every
    session: a 422 ``state_mismatch`` naming the key, nothing imported. On both engines (the
    Ray one refuses it at its front too, before any host)."""
    sid = new_session(http, shards=shards)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(t) for n, t in G1.items()}})
    assert r.status_code == 200, r.text
    before = snapshot(http, sid)
    exported = http.get(f"/v1/sessions/{sid}/state_dict").json()
    state = dict(exported["state"])
    entry = state.pop("0")
    for key in keys:
        state[key] = entry
    r = http.put(f"/v1/sessions/{sid}/state_dict", json={**exported, "state": state})
    assert_problem(r, 422, "state_mismatch", f"state_dict.state.{keys[-1]}")
    assert snapshot(http, sid) == before
    r = http.put(f"/v1/sessions/{sid}/state_dict", json=exported)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("names", ["short", "long", "not-names", "text"])
def test_param_names_of_another_length_are_refused_on_every_session(
        http: httpx.Client, shards: int, names: str) -> None:
    """An imported group's ``param_names`` lists one name per parameter: another count (or
    not a list of names) is a 422 ``state_mismatch`` naming it, nothing imported; a sharded
    session took any."""
    sid = new_session(http, shards=shards)
    before = snapshot(http, sid)
    exported = http.get(f"/v1/sessions/{sid}/state_dict").json()
    own = exported["param_groups"][0]["param_names"]
    given = {"short": own[:-1], "long": [*own, "x"], "not-names": [*own[:-1], 5],
             "text": ",".join(own)}[names]
    group = {**exported["param_groups"][0], "param_names": given}
    r = http.put(f"/v1/sessions/{sid}/state_dict", json={**exported, "param_groups": [group]})
    assert_problem(r, 422, "state_mismatch", "state_dict.param_groups.0.param_names")
    assert snapshot(http, sid) == before


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("where", ["key", "params"])
def test_an_id_past_int64_in_a_torch_file_is_invalid_state_on_every_session(
        http: httpx.Client, shards: int, where: str) -> None:
    """A ``torch.save`` state naming a parameter id past int64 (a state key, or in a group's
    ``params``) is a 422 ``invalid_state`` naming it on a sharded session too (its split read
    it as an id no group lists: ``state_mismatch``), nothing imported."""
    sid = new_session(http, shards=shards)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(t) for n, t in G1.items()}})
    assert r.status_code == 200, r.text
    before = snapshot(http, sid)
    url = f"/v1/sessions/{sid}/state_dict"
    state = torch.load(io.BytesIO(http.get(url, params={"format": "torch"}).content),
                       weights_only=True)
    last = len(state["param_groups"][0]["params"]) - 1
    if where == "key":
        state["state"][2**70] = state["state"].pop(last)
        fld = "state_dict.state"
    else:
        state["param_groups"][0]["params"][last] = 2**70
        fld = f"state_dict.param_groups.0.params.{last}"
    buf = io.BytesIO()
    torch.save(state, buf)
    r = http.put(url, params={"format": "torch"}, content=buf.getvalue(), headers=BIN_CT)
    assert_problem(r, 422, "invalid_state", fld)
    assert snapshot(http, sid) == before


@pytest.mark.parametrize(("offset", "value"), [(6, 106), (10, 99), (8, 1)],
                         ids=["zip-version-10.6", "compression-99", "encrypted"])
def test_a_torch_file_whose_zip_python_cannot_read_is_422(sess: Sess, offset: int,
                                                          value: int) -> None:
    """A ``torch.save`` file whose zip directory asks for a later zip version (``zipfile``
    raises ``NotImplementedError``, which the check before ``torch.load`` let through: a 500
    and the connection reset), an unknown compression method or encryption: a 422
    ``invalid_torch_file``, nothing imported."""
    url = f"{sess.url}/state_dict"
    data = bytearray(sess.http.get(url, params={"format": "torch"}).content)
    at = data.find(b"PK\x01\x02")  # the first central directory entry
    data[at + offset:at + offset + 2] = struct.pack("<H", value)
    r = sess.http.put(url, params={"format": "torch"}, content=bytes(data), headers=BIN_CT)
    assert_problem(r, 422, "invalid_torch_file", "body")
    sess.assert_unchanged()


def test_a_state_tensor_referenced_twice_is_refused(sess: Sess) -> None:
    """A safetensors state whose skeleton points two entries (``exp_avg`` and
    ``exp_avg_sq``) at one tensor was imported as two copies of it; torch never exports a
    state whose entries share a tensor: a 422 ``invalid_state`` naming the second reference,
    nothing imported. The export as it came (each entry its own key) imports."""
    url = f"{sess.url}/state_dict"
    exported = sess.http.get(url, headers={"accept": "application/octet-stream"}).content
    n = struct.unpack("<Q", exported[:8])[0]
    header = json.loads(exported[8:8 + n])
    meta = header.pop("__metadata__")
    skeleton = json.loads(meta["optserve_state"])
    entry = skeleton["state"]["0"]
    shared, dropped = entry["exp_avg"]["$tensor"], entry["exp_avg_sq"]["$tensor"]
    entry["exp_avg_sq"] = {"$tensor": shared}
    data, out = b"", {}
    for key, h in header.items():
        if key == dropped:  # (no tensor left unreferenced: the duplicate is the only fault)
            continue
        raw = exported[8 + n + h["data_offsets"][0]:8 + n + h["data_offsets"][1]]
        out[key] = {**h, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    out["__metadata__"] = {**meta, "optserve_state": json.dumps(skeleton)}
    r = sess.http.put(url, content=st_file(out, data), headers=BIN_CT)
    assert_problem(r, 422, "invalid_state", "state_dict.state.0.exp_avg_sq",
                   "state_dict.state.0.exp_avg and at state_dict.state.0.exp_avg_sq")
    sess.assert_unchanged()
    r = sess.http.put(url, content=exported, headers=BIN_CT)
    assert r.status_code == 200, r.text
    assert snapshot(sess.http, sess.id).state_dict == sess.before.state_dict  # b64: bitwise


def test_an_unreferenced_state_tensor_is_named_as_a_body_entry(sess: Sess) -> None:
    """A safetensors state whose body holds a tensor the skeleton does not reference: a 422
    ``invalid_state`` naming it as the body's other refusals name its entries,
    ``body.<key>`` (``body.<key>.data_offsets`` for a bad one); it was named by its bare key
    (``state.0.extra``), as if a path of the state dict. Nothing imported."""
    url = f"{sess.url}/state_dict"
    exported = sess.http.get(url, headers={"accept": "application/octet-stream"}).content
    n = struct.unpack("<Q", exported[:8])[0]
    header = json.loads(exported[8:8 + n])
    data = exported[8 + n:]
    extra = torch.tensor([1.0, 2.0]).numpy().tobytes()
    header["state.0.extra"] = {"dtype": "F32", "shape": [2],
                               "data_offsets": [len(data), len(data) + len(extra)]}
    r = sess.http.put(url, content=st_file(header, data + extra), headers=BIN_CT)
    assert_problem(r, 422, "invalid_state", "body.state.0.extra", "'state.0.extra'")
    sess.assert_unchanged()


def test_a_state_import_refuses_an_unknown_metadata_entry(sess: Sess) -> None:
    """A safetensors state import's ``__metadata__`` holds the skeleton (and ``format``, which
    other writers add); any other entry is a 422 ``unknown_field``, as in a step's body, with
    nothing imported: a misspelt entry is never dropped unread."""
    url = f"{sess.url}/state_dict"
    exported = sess.http.get(url, headers={"accept": "application/octet-stream"}).content
    n = struct.unpack("<Q", exported[:8])[0]
    header = json.loads(exported[8:8 + n])
    data = exported[8 + n:]
    meta = header["__metadata__"]
    for extra in ["scheduler", "optserve_stat"]:
        header["__metadata__"] = {**meta, extra: "{}"}
        r = sess.http.put(url, content=st_file(header, data), headers=BIN_CT)
        assert_problem(r, 422, "unknown_field", f"__metadata__.{extra}")
    sess.assert_unchanged()
    header["__metadata__"] = {**meta, "format": "pt"}
    r = sess.http.put(url, content=st_file(header, data), headers=BIN_CT)
    assert r.status_code == 200, r.text
    assert snapshot(sess.http, sess.id).state_dict == sess.before.state_dict


# --------------------------------------------------------------------------- nonfinite policies

def _nonfinite_session(http: httpx.Client, policy: str) -> str:
    sid = new_session(http, nonfinite=policy)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(t) for n, t in G1.items()}})
    assert r.status_code == 200, r.text
    return sid


def test_skip_policy_skips_the_step(http: httpx.Client) -> None:
    sid = _nonfinite_session(http, "skip")
    before = snapshot(http, sid)
    grads = {"w": _w(data=[1.0, "NaN", 3.0, 4.0, 5.0, 6.0]), "b": jt(G1["b"])}
    r = http.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"},
                  json={"grads": grads})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["skipped"] is True
    assert body["nonfinite"] == ["w"]
    assert (body["version"], body["step"]) == (1, 1)
    assert body["params"] == before.params["params"]
    assert r.headers["x-optserve-version"] == "1" and r.headers["x-optserve-step"] == "1"
    after = snapshot(http, sid)
    assert after.params == before.params
    assert after.state_dict == before.state_dict
    assert after.describe == before.describe
    # and through safetensors
    r = http.post(f"/v1/sessions/{sid}/step", content=st_of(
        {"s": torch.tensor(float("inf"))}), headers={**BIN_CT, "accept": BIN_CT["content-type"]})
    assert r.status_code == 200, r.text
    assert r.headers["x-optserve-version"] == "1"
    assert snapshot(http, sid).state_dict == before.state_dict


def test_allow_policy_steps_like_torch(http: httpx.Client) -> None:
    sid = _nonfinite_session(http, "allow")
    g = G1["w"].clone()
    g[0, 1] = float("nan")
    g[1, 2] = float("inf")
    r = http.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"},
                  json={"grads": {"w": jt_b64(g), "b": jt(G1["b"])}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["skipped"] is False and body["nonfinite"] == ["w"]
    assert (body["version"], body["step"]) == (2, 2)
    params = {n: t.clone() for n, t in p0().items()}
    opt = torch.optim.Adam([params[n] for n in NAMES], lr=LR)
    for n in NAMES:
        params[n].grad = G1[n].clone()
    opt.step()
    params["w"].grad, params["b"].grad, params["s"].grad = g.clone(), G1["b"].clone(), None
    opt.step()
    for n in NAMES:
        got = from_jt(body["params"][n])
        assert torch.equal(got.view(torch.int32), params[n].detach().view(torch.int32)), n
    assert bool(torch.isnan(from_jt(body["params"]["w"])).any())


# --------------------------------------------------------------------------- scheduler exhausted

def test_exhausted_one_cycle_is_409(http: httpx.Client) -> None:
    sid = new_session(http, optimizer="SGD", scheduler={"name": "OneCycleLR", "options": {
        "max_lr": 0.5, "total_steps": 2}})
    for _ in range(2):
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}})
        assert r.status_code == 200, r.text
    before = snapshot(http, sid)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}})
    assert_problem(r, 409, "scheduler_exhausted", "scheduler")
    r = http.post(f"/v1/sessions/{sid}/scheduler/step")
    assert_problem(r, 409, "scheduler_exhausted", "scheduler")
    r = http.post(f"/v1/sessions/{sid}/scheduler/step", json={"metric": 1.0})
    assert_problem(r, 422, "invalid_metric", "metric")
    after = snapshot(http, sid)
    assert (after.describe, after.params, after.state_dict) == (
        before.describe, before.params, before.state_dict)


# --------------------------------------------------------------------------- 413

@pytest.fixture(scope="module")
def small_server() -> Iterator[str]:
    server = LiveServer(_test_settings(max_body_mb=0.002))  # 2097 bytes
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def test_body_over_limit_is_413(small_server: str) -> None:
    limit = int(0.002 * 1024 * 1024)
    with httpx.Client(base_url=small_server, timeout=60) as http:
        sid = new_session(http)
        before = snapshot(http, sid)
        big = jt(torch.zeros(2, 3))
        big["data"] = [0.0] * 6
        padding = " " * limit
        body = b'{"grads": {"w": ' + json.dumps(big).encode() + padding.encode() + b"}}"
        assert len(body) > limit
        # declared in Content-Length
        r = http.post(f"/v1/sessions/{sid}/step", content=body, headers=JSON_CT)
        problem = assert_problem(r, 413, "payload_too_large", "body", str(limit))
        assert problem["limit"] == limit
        # streamed (chunked, no Content-Length): refused once it passes the limit

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 512):
                yield body[i:i + 512]

        r = http.post(f"/v1/sessions/{sid}/step", content=chunks(), headers=JSON_CT)
        assert_problem(r, 413, "payload_too_large", "body")
        r = http.post("/v1/sessions", content=b"{" + b" " * (limit + 10) + b"}",
                      headers=JSON_CT)
        assert_problem(r, 413, "payload_too_large", "body")
        r = http.put(f"/v1/sessions/{sid}/params", content=b"\0" * (limit + 1), headers=BIN_CT)
        assert_problem(r, 413, "payload_too_large", "body")
        after = snapshot(http, sid)
        assert (after.describe, after.params, after.state_dict) == (
            before.describe, before.params, before.state_dict)
        assert [s["id"] for s in http.get("/v1/sessions").json()["sessions"]] == [sid]
        # a body just under the limit still works
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}})
        assert r.status_code == 200


# --------------------------------------------------------------------------- engine gaps
# These fail against the engine as committed; each names what the engine should do.

@pytest.mark.parametrize(
    ("path", "body", "fld"),
    [("/v1/sessions", _create_body(options={"lr": {"$float": []}}), "options.lr"),
     ("/v1/sessions", _create_body(scheduler={"name": "StepLR", "options": {
         "step_size": 1, "gamma": {"$float": {}}}}), "scheduler.options.gamma"),
     ("PATCH", {"eps": {"$float": [1]}}, "param_groups.0.eps")],
    ids=["option", "scheduler-option", "patch"],
)
def test_unhashable_float_tag_is_422(sess: Sess, path: str, body: Any, fld: str) -> None:
    """``{"$float": <list or object>}`` must be a 422, not a TypeError (unhashable) and a 500."""
    if path == "PATCH":
        r = sess.http.patch(f"{sess.url}/param_groups/0", json=body)
    else:
        r = sess.http.post(path, json=body)
    assert_problem(r, 422, "invalid_option", fld)
    sess.assert_unchanged()


def test_import_group_missing_an_option_is_422(sess: Sess) -> None:
    """A param group without ``lr`` must be refused before loading (torch would load it and the
    session would answer 500 to everything after)."""
    bad = json.loads(json.dumps(sess.before.state_dict))
    del bad["param_groups"][0]["lr"]
    r = sess.http.put(f"{sess.url}/state_dict", json=bad)
    assert_problem(r, 422, "state_mismatch")
    sess.assert_unchanged()


def test_import_empty_adagrad_state_entry_is_422(http: httpx.Client) -> None:
    """Adagrad's __setstate__ needs ``step`` in every entry: an empty entry is a 422, not a
    KeyError raised inside load_state_dict."""
    sid = new_session(http, optimizer="Adagrad")
    assert http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}}).status_code \
        == 200
    before = snapshot(http, sid)
    bad = json.loads(json.dumps(before.state_dict))
    bad["state"]["0"] = {}
    r = http.put(f"/v1/sessions/{sid}/state_dict", json=bad)
    assert_problem(r, 422, "state_mismatch", "state_dict.state.0")
    after = snapshot(http, sid)
    assert (after.describe, after.params, after.state_dict) == (
        before.describe, before.params, before.state_dict)


def test_step_torch_cannot_take_is_not_500(http: httpx.Client) -> None:
    """StepLR(gamma=1e308) drives lr past float32 at the first scheduler step, where SGD's
    ``param.add_(grad, alpha=-lr)`` would raise RuntimeError at the next step: the step whose
    scheduler step would write it is the client's 409 ``scheduler_out_of_range`` naming the lr
    (it was taken, and every later step a 422), not a 500; nothing changes."""
    sid = new_session(http, optimizer="SGD", scheduler={"name": "StepLR", "options": {
        "step_size": 1, "gamma": 1e308}})
    before = snapshot(http, sid)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}})
    assert_problem(r, 409, "scheduler_out_of_range", "param_groups.0.lr")
    after = snapshot(http, sid)
    assert (after.params, after.describe, after.state_dict) == (
        before.params, before.describe, before.state_dict)


@pytest.mark.parametrize(("optimizer", "shape"), [("Adafactor", (0, 3)), ("Adafactor", (0,)),
                                                ("Muon", (3, 0))])
@pytest.mark.parametrize("how", ["step", "pushed"])
def test_a_gradient_with_no_elements_torch_cannot_step_is_422(
        http: httpx.Client, optimizer: str, shape: tuple[int, ...], how: str) -> None:
    """torch's Adafactor (and its Muon for some shapes) divides by a parameter's element count
    and raises ZeroDivisionError in the middle of a step with a gradient for a parameter with
    no elements (its constructor takes the parameter): that step was a 500 ``apply_failed``.
    A 422 ``invalid_gradient`` naming the gradient, sent or accumulated, nothing changed; the
    step with that gradient left out steps as torch does."""
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    z = torch.zeros(shape)
    gw = torch.tensor([[0.1, -0.2], [0.3, 0.4]])
    ref = {"w": w.clone(), "z": z.clone()}
    opt = getattr(torch.optim, optimizer)(list(ref.values()), lr=LR)
    ref["w"].grad, ref["z"].grad = gw.clone(), torch.zeros(shape)
    with pytest.raises(ZeroDivisionError):
        opt.step()
    ref = {"w": w.clone(), "z": z.clone()}
    opt = getattr(torch.optim, optimizer)(list(ref.values()), lr=LR)
    ref["w"].grad = gw.clone()
    opt.step()
    sid = f"bad-{uuid.uuid4().hex[:12]}"
    _CREATED.append((http, sid))
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": optimizer, "options": {"lr": LR},
                                        "params": {"w": jt(w), "z": jt(z)}})
    assert r.status_code == 201, r.text
    url = f"/v1/sessions/{sid}"
    grads = {"w": jt(gw), "z": jt(torch.zeros(shape))}
    if how == "pushed":
        assert http.post(f"{url}/grads", json={"grads": {"z": grads.pop("z")}}).status_code == 200
    before = snapshot(http, sid)
    r = http.post(f"{url}/step", json={"grads": grads})
    assert_problem(r, 422, "invalid_gradient", "grads.z", "ZeroDivisionError")
    after = snapshot(http, sid)
    assert (after.params, after.describe, after.state_dict) == (
        before.params, before.describe, before.state_dict)
    assert http.post(f"{url}/zero_grad").status_code == 200
    r = http.post(f"{url}/step", params={"encoding": "b64"}, json={"grads": {"w": jt(gw)}})
    assert r.status_code == 200, r.text
    got = r.json()["params"]
    assert torch.equal(from_jt(got["w"]), ref["w"])
    assert got["z"]["shape"] == list(shape) and not base64.b64decode(got["z"]["b64"])


def test_own_state_reimports_after_linear_decay_to_zero(http: httpx.Client) -> None:
    """LinearLR(end_factor=0) ends at lr = -1.48e-18 in torch's own arithmetic (in-process
    torch gives the same). The session's exported state must import back into it, as torch's
    load_state_dict accepts it: the constructor's lr >= 0 check is not for state dicts."""
    sid = new_session(http, optimizer="SGD", options={"lr": 0.1, "momentum": 0.9},
                      scheduler={"name": "LinearLR", "options": {"end_factor": 0.0}})
    params = {n: t.clone() for n, t in p0().items()}
    opt = torch.optim.SGD([params[n] for n in NAMES], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LinearLR(opt, end_factor=0.0)
    for _ in range(6):
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}})
        assert r.status_code == 200, r.text
        params["b"].grad = G1["b"].clone()
        opt.step()
        sched.step()
    assert r.json()["lr"] == [opt.param_groups[0]["lr"]] and r.json()["lr"][0] < 0
    exported = http.get(f"/v1/sessions/{sid}/state_dict")
    r = http.put(f"/v1/sessions/{sid}/state_dict", content=exported.content, headers=JSON_CT)
    assert r.status_code == 200, r.text
    r = http.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"},
                  json={"grads": {"b": jt(G1["b"])}})
    params["b"].grad = G1["b"].clone()
    opt.step()
    assert torch.equal(from_jt(r.json()["params"]["b"]), params["b"].detach())


def test_group_changes_after_linear_decay_to_zero(http: httpx.Client) -> None:
    """Same session state as above. A PATCH is checked with torch's constructor checks on the
    whole resulting group, whatever the group held before: changing only the momentum of a
    group whose lr a scheduler left at -1.48e-18 is refused (naming lr, unchanged), changing
    both is accepted; adding another group is not refused for the first group's lr."""
    sid = new_session(http, optimizer="SGD", options={"lr": 0.1, "momentum": 0.9},
                      scheduler={"name": "LinearLR", "options": {"end_factor": 0.0}})
    for _ in range(6):
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"b": jt(G1["b"])}})
        assert r.status_code == 200, r.text
    before = http.get(f"/v1/sessions/{sid}").json()
    r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"momentum": 0.5})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "param_groups.0.lr" and "learning rate" in r.json()["detail"]
    assert http.get(f"/v1/sessions/{sid}").json() == before
    r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"momentum": 0.5, "lr": 0.0})
    assert r.status_code == 200, r.text
    assert r.json()["param_groups"][0]["momentum"] == 0.5
    r = http.post(f"/v1/sessions/{sid}/param_groups", json={"params": {"c": jt(G1["b"])},
                                                            "lr": 0.1})
    assert r.status_code == 201, r.text
    assert r.json()["lr"][1] == 0.1


def test_metadata_other_writers_add_is_taken(sess: Sess) -> None:
    """``{"format": "pt"}``, which ``safetensors.torch.save_model`` and Hugging Face
    checkpoints write, is the one ``__metadata__`` entry a step takes beside its own fields
    (any other unknown one is a 422, as in JSON: ``st-metadata-misspelt-field``)."""
    body = st_file({"__metadata__": {"format": "pt", "scalars": '{"loss": 0.5}'},
                    "w": _W_HDR}, _W_RAW)
    before = sess.http.get(sess.url).json()["version"]
    r = sess.http.post(f"{sess.url}/step", content=body, headers=BIN_CT)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before + 1 and r.json()["metrics"]["scalars"] == {"loss": 0.5}


@pytest.mark.parametrize("policy", ["reject", "skip", "allow"])
def test_nonfinite_initial_parameters_are_refused_as_put_refuses_them(
        http: httpx.Client, policy: str) -> None:
    """A create or an added group with NaN/Inf parameter values, in a session that does not
    allow non-finite values: 422 ``nonfinite_parameter`` naming the parameter, nothing made
    or changed, as ``PUT .../params`` refuses the same values (both used to be taken).
    ``nonfinite: allow`` takes them and steps them as torch does."""
    bad = torch.tensor([1.0, float("nan"), 2.0])
    body = {"optimizer": "SGD", "options": {"lr": 0.1}, "nonfinite": policy,
            "param_groups": [{"params": {"w": jt(torch.ones(3))}},
                             {"params": {"v": jt_b64(bad)}}]}
    before = http.get("/v1/sessions").json()
    r = http.post("/v1/sessions", json=body)
    if policy != "allow":
        assert_problem(r, 422, "nonfinite_parameter", "param_groups.1.params.v")
        assert http.get("/v1/sessions").json() == before
    else:
        assert r.status_code == 201, r.text
        http.delete(f"/v1/sessions/{r.json()['id']}")
    sid = new_session(http, nonfinite=policy)
    url = f"/v1/sessions/{sid}"
    state = http.get(f"{url}/state_dict", params={"encoding": "b64"}).json()
    r = http.post(f"{url}/param_groups", json={"params": {"v": jt_b64(torch.tensor([math.inf]))}})
    if policy != "allow":
        assert_problem(r, 422, "nonfinite_parameter", "param_groups.1.params.v")
        assert http.get(f"{url}/state_dict", params={"encoding": "b64"}).json() == state
        assert len(http.get(url).json()["param_groups"]) == 1
    else:
        assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- non-finite options
# torch's constructors test ``0.0 <= lr`` and the like: a NaN fails them, an infinity passes
# (lr, eps, weight_decay), and nothing checks a scheduler's options or the keys a scheduler
# adds to a group. Such values were taken, and the next step made the parameters NaN/inf.

INF = {"$float": "inf"}
NAN = {"$float": "nan"}
MINUS_INF = {"$float": "-inf"}


def _tensor_lr(word: str) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [], "data": [word]}


@pytest.mark.parametrize(
    ("how", "body", "fld"),
    [("patch", {"lr": INF}, "param_groups.0.lr"),
     ("patch", {"eps": INF}, "param_groups.0.eps"),
     ("patch", {"weight_decay": NAN}, "param_groups.0.weight_decay"),
     ("patch", {"weight_decay": INF}, "param_groups.0.weight_decay"),
     ("patch", {"betas": [0.9, INF]}, "param_groups.0.betas.1"),
     ("patch", {"betas": [NAN, 0.999]}, "param_groups.0.betas.0"),
     ("patch", {"lr": _tensor_lr("Infinity")}, "param_groups.0.lr"),
     ("step", {"0": {"lr": INF}}, "param_groups.0.lr"),
     ("step", [{"eps": MINUS_INF}], "param_groups.0.eps"),
     ("add", {"lr": INF}, "param_groups.1.lr"),
     ("add", {"weight_decay": NAN}, "param_groups.1.weight_decay"),
     ("add", {"betas": [0.9, INF]}, "param_groups.1.betas.1")],
    ids=["patch-lr-inf", "patch-eps-inf", "patch-wd-nan", "patch-wd-inf", "patch-beta2-inf",
         "patch-beta1-nan", "patch-tensor-lr-inf", "step-lr-inf", "step-eps-minus-inf",
         "add-lr-inf", "add-wd-nan", "add-beta2-inf"],
)
def test_nonfinite_options_are_refused(sess: Sess, how: str, body: Any, fld: str) -> None:
    """A NaN or an infinite option, in a PATCH, with a step or in an added group: 422
    ``invalid_option`` naming it, and the session exactly as it was (a later step still equals
    in-process torch's)."""
    if how == "patch":
        r = sess.http.patch(f"{sess.url}/param_groups/0", json=body)
    elif how == "step":
        r = sess.http.post(f"{sess.url}/step", json={"grads": {}, "param_groups": body})
    else:
        r = sess.http.post(f"{sess.url}/param_groups",
                           json={"params": {"c": jt(G1["b"])}, **body})
    problem = assert_problem(r, 422, "invalid_option", fld)
    assert "finite" in problem["detail"], problem
    sess.assert_unchanged()


@pytest.mark.parametrize(
    ("body", "fld"),
    [(_create_body(options={"lr": INF}), "options.lr"),
     (_create_body(options={"lr": _tensor_lr("Infinity")}), "options.lr"),
     (_create_body(optimizer="SGD", options={"lr": 0.1, "momentum": INF}), "options.momentum"),
     (_create_body(optimizer="SGD", options={"lr": 0.1, "dampening": NAN}),
      "options.dampening"),
     (_create_body(params=None) | {"param_groups": [
         {"params": {"x": jt(torch.tensor([1.0]))}},
         {"params": {"y": jt(torch.tensor([1.0]))}, "eps": INF}]}, "param_groups.1.eps"),
     (_create_body(scheduler={"name": "ExponentialLR", "options": {"gamma": NAN}}),
      "scheduler.options.gamma"),
     (_create_body(scheduler={"name": "StepLR", "options": {"step_size": 1, "gamma": INF}}),
      "scheduler.options.gamma"),
     (_create_body(scheduler={"name": "CosineAnnealingLR", "options": {"T_max": 5,
                                                                       "eta_min": NAN}}),
      "scheduler.options.eta_min"),
     (_create_body(scheduler={"name": "SequentialLR", "options": {"milestones": [2], "schedulers": [
         {"name": "ConstantLR", "options": {}},
         {"name": "ExponentialLR", "options": {"gamma": INF}}]}}),
      "scheduler.options.schedulers.1.options.gamma"),
     (_create_body(optimizer="Rprop", options={"lr": 0.01, "step_sizes": [MINUS_INF, 50.0]}),
      "options.step_sizes.0")],
    ids=["lr-inf", "tensor-lr-inf", "sgd-momentum-inf", "sgd-dampening-nan", "group-eps-inf",
         "exponential-gamma-nan", "step-gamma-inf", "cosine-eta-min-nan", "nested-gamma-inf",
         "rprop-min-step-minus-inf"],
)
def test_nonfinite_create_options_are_refused(sess: Sess, body: dict[str, Any],
                                              fld: str) -> None:
    before = sess.http.get("/v1/sessions").json()
    attempted = f"never-{uuid.uuid4().hex[:8]}"
    r = sess.http.post("/v1/sessions", json={**_drop_none(body), "id": attempted})
    assert_problem(r, 422, "invalid_option", fld, "finite")
    assert sess.http.get("/v1/sessions").json() == before
    assert sess.http.get(f"/v1/sessions/{attempted}").status_code == 404
    sess.assert_unchanged()


def test_nonfinite_create_options_in_safetensors_metadata_are_refused(sess: Sess) -> None:
    before = sess.http.get("/v1/sessions").json()
    good = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = torch.tensor([1.0, 2.0]).numpy().tobytes()
    for metadata, fld in [
        ({"optimizer": "Adam", "options": '{"lr": {"$float": "inf"}}'}, "options.lr"),
        ({"optimizer": "Adam", "scheduler": '{"name": "ExponentialLR", "options": '
                                            '{"gamma": {"$float": "nan"}}}'},
         "scheduler.options.gamma"),
    ]:
        r = sess.http.post("/v1/sessions", content=st_file({"__metadata__": metadata, **good},
                                                           raw), headers=BIN_CT)
        assert_problem(r, 422, "invalid_option", fld)
    assert sess.http.get("/v1/sessions").json() == before
    sess.assert_unchanged()


def _torch_file(state: dict[str, Any]) -> bytes:
    f = io.BytesIO()
    torch.save(state, f)
    return f.getvalue()


def test_nonfinite_options_in_an_imported_state_are_refused(sess: Sess) -> None:
    """A state dict whose group options are NaN or infinite, as JSON (``$float`` tags, a
    tensor lr), safetensors (tags in its skeleton) or a torch file (Python floats): 422
    ``invalid_option`` naming the option, nothing loaded; the state as exported still
    imports (after the checks, so they refuse nothing else)."""
    url = f"{sess.url}/state_dict"
    good = sess.before.state_dict
    for key, value in [("lr", INF), ("eps", NAN), ("weight_decay", INF),
                       ("betas", [0.9, INF]), ("lr", _tensor_lr("NaN"))]:
        bad = json.loads(json.dumps(good))
        bad["param_groups"][0][key] = value
        fld = f"state_dict.param_groups.0.{key}" + (".1" if key == "betas" else "")
        assert_problem(sess.http.put(url, json=bad), 422, "invalid_option", fld, "finite")
    exported = sess.http.get(url, headers={"accept": "application/octet-stream"}).content
    n = struct.unpack("<Q", exported[:8])[0]
    header = json.loads(exported[8:8 + n])
    skeleton = json.loads(header["__metadata__"]["optserve_state"])
    skeleton["param_groups"][0]["eps"] = INF
    header["__metadata__"]["optserve_state"] = json.dumps(skeleton)
    body = st_file(header, exported[8 + n:])
    assert_problem(sess.http.put(url, content=body, headers=BIN_CT), 422, "invalid_option",
                   "state_dict.param_groups.0.eps")
    state = torch.load(io.BytesIO(sess.http.get(url, params={"format": "torch"}).content),
                       weights_only=True)
    state["param_groups"][0]["weight_decay"] = math.nan
    r = sess.http.put(url, params={"format": "torch"}, content=_torch_file(state),
                      headers=BIN_CT)
    assert_problem(r, 422, "invalid_option", "state_dict.param_groups.0.weight_decay")
    state["param_groups"][0]["weight_decay"] = math.inf
    r = sess.http.put(url, params={"format": "torch"}, content=_torch_file(state),
                      headers=BIN_CT)
    assert_problem(r, 422, "invalid_option", "state_dict.param_groups.0.weight_decay")
    sess.assert_unchanged(check_accumulator=False)
    r = sess.http.put(url, json=good)  # the import as exported: taken, the values unchanged
    assert r.status_code == 200, r.text
    after = snapshot(sess.http, sess.id)
    assert after.params["params"] == sess.before.params["params"]
    assert after.state_dict == good


def _stepped_alike(http: httpx.Client, sid: str, opt: torch.optim.Optimizer,
                   params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """One step of ``sid`` over JSON (base64) and of the in-process ``opt`` over ``params``,
    both with ``grads``: the session's answer."""
    r = http.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"},
                  json={"grads": {n: jt(g) for n, g in grads.items()}})
    assert r.status_code == 200, r.text
    for n in NAMES:
        params[n].grad = grads[n].clone()
    opt.step()
    return {n: from_jt(r.json()["params"][n]) for n in NAMES}


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("ASGD", {"lr": 0.01, "t0": INF}), ("Rprop", {"lr": 0.01, "step_sizes": [1e-6, INF]}),
     ("Adafactor", {"lr": 0.01, "d": INF})],
    ids=["asgd-t0", "rprop-max-step", "adafactor-d"],
)
def test_an_infinity_that_means_no_bound_is_taken(http: httpx.Client, optimizer: str,
                                                  options: dict[str, Any]) -> None:
    """+inf is taken where torch gives it a meaning (no bound): ASGD's ``t0`` (never average),
    Rprop's largest step size, Adafactor's clipping threshold ``d``; the session steps as
    in-process torch does, at create and in a PATCH. -inf there is still refused."""
    sid = new_session(http, optimizer=optimizer, options=options)
    local = {k: (tuple(math.inf if v == INF else v for v in val) if isinstance(val, list)
                 else math.inf if val == INF else val) for k, val in options.items()}
    params = {n: t.clone() for n, t in p0().items()}
    opt = getattr(torch.optim, optimizer)([params[n] for n in NAMES], **local)
    for k in range(3):
        got = _stepped_alike(http, sid, opt, params, {n: G1[n] * (k + 1) for n in NAMES})
        for n in NAMES:
            assert torch.isfinite(got[n]).all() and torch.equal(got[n], params[n].detach()), n
    (name, value), = ((k, v) for k, v in options.items() if k != "lr")
    r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={name: value})
    assert r.status_code == 200, r.text
    minus = [value[0], MINUS_INF] if isinstance(value, list) else MINUS_INF
    fld = f"param_groups.0.{name}" + (".1" if isinstance(value, list) else "")
    assert_problem(http.patch(f"/v1/sessions/{sid}/param_groups/0", json={name: minus}), 422,
                   "invalid_option", fld)


@pytest.mark.parametrize(("dtype", "t0"), [("float16", None), ("float16", 1e300),
                                         ("float32", 1e39), ("bfloat16", 1e300)],
                         ids=["f16-default", "f16-1e300", "f32-1e39", "bf16-1e300"])
def test_asgd_t0_past_the_parameters_dtype_steps_as_torch(http: httpx.Client, dtype: str,
                                                          t0: float | None) -> None:
    """ASGD's ``t0`` never meets the parameters' dtype (torch subtracts it from the step
    count), so no value of it overflows one; but it was checked as if it did: the default
    t0, 1e6, is past float16's range, and an ASGD session of float16 parameters was refused
    every step and every PATCH (422 ``option_overflow`` naming t0) that torch steps. Now it
    steps as in-process torch, and an lr PATCH is taken."""
    wide = getattr(torch, dtype)
    options: dict[str, Any] = {"lr": 0.01, **({} if t0 is None else {"t0": t0})}
    start = {n: t.to(wide) for n, t in p0().items()}
    sid = f"bad-{uuid.uuid4().hex[:12]}"
    _CREATED.append((http, sid))
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "ASGD", "options": options,
                                        "params": {n: jt(t) for n, t in start.items()}})
    assert r.status_code == 201, r.text
    params = {n: t.clone() for n, t in start.items()}
    opt = torch.optim.ASGD([params[n] for n in NAMES], **options)
    for k in range(3):
        if k == 2:
            r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 0.02})
            assert r.status_code == 200, r.text
            opt.param_groups[0]["lr"] = 0.02
        got = _stepped_alike(http, sid, opt, params,
                             {n: (G1[n] * (k + 1)).to(wide) for n in NAMES})
        for n in NAMES:
            assert torch.equal(got[n], params[n]), n


def _scheduled(http: httpx.Client, optimizer: str, scheduler: dict[str, Any],
               options: dict[str, Any] | None = None) -> tuple[str, Snapshot]:
    sid = new_session(http, optimizer=optimizer, scheduler=scheduler,
                      options=options or {"lr": LR})
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(t) for n, t in G1.items()}})
    assert r.status_code == 200, r.text
    return sid, snapshot(http, sid)


def _same(http: httpx.Client, sid: str, before: Snapshot) -> None:
    after = snapshot(http, sid)
    assert (after.describe, after.params, after.state_dict) == (
        before.describe, before.params, before.state_dict)


def test_scheduler_group_keys_out_of_range_are_refused(http: httpx.Client) -> None:
    """The keys a scheduler adds to a group (``initial_lr``, and OneCycleLR's ``max_lr``,
    ``min_lr``, ``base_momentum``, ``max_momentum``) are refused NaN, infinite or out of
    range as torch refuses such an ``lr`` (``lr: -5`` is torch's own 422): in a PATCH and with
    a step; nothing changes. In range, they are taken."""
    sid, before = _scheduled(http, "SGD", {"name": "StepLR", "options": {"step_size": 1}})
    url = f"/v1/sessions/{sid}/param_groups/0"
    message = _torch_error(lambda: torch.optim.SGD([torch.zeros(1)], lr=-5))
    assert_problem(http.patch(url, json={"lr": -5}), 422, "invalid_option", "param_groups.0.lr",
                   message)
    for value in (-5, -1e-9, NAN, INF):
        assert_problem(http.patch(url, json={"initial_lr": value}), 422, "invalid_option",
                       "param_groups.0.initial_lr")
        r = http.post(f"/v1/sessions/{sid}/step",
                      json={"grads": {}, "param_groups": [{"initial_lr": value}]})
        assert_problem(r, 422, "invalid_option", "param_groups.0.initial_lr")
    _same(http, sid, before)
    r = http.patch(url, json={"initial_lr": 0.05})
    assert r.status_code == 200 and r.json()["param_groups"][0]["initial_lr"] == 0.05, r.text

    sid, before = _scheduled(http, "Adam", {"name": "OneCycleLR", "options": {
        "max_lr": 0.1, "total_steps": 10}})
    url = f"/v1/sessions/{sid}/param_groups/0"
    for key, value in [("max_lr", -0.1), ("min_lr", NAN), ("max_lr", INF),
                       ("base_momentum", -0.5), ("max_momentum", 1.5), ("max_momentum", 1.0)]:
        assert_problem(http.patch(url, json={key: value}), 422, "invalid_option",
                       f"param_groups.0.{key}")
    _same(http, sid, before)
    r = http.patch(url, json={"max_lr": 0.2, "max_momentum": 0.9})
    assert r.status_code == 200, r.text


def test_nonfinite_scheduler_state_is_refused_on_import(http: httpx.Client) -> None:
    """A state dict whose scheduler state holds a NaN or an infinity (``gamma``, a base lr) or a
    group an ``initial_lr`` out of range: 422 naming it, nothing loaded. ReduceLROnPlateau's
    ``best`` is +inf by design (before its first metric): its own export imports back."""
    sid, before = _scheduled(http, "SGD", {"name": "ExponentialLR", "options": {"gamma": 0.5}})
    url = f"/v1/sessions/{sid}/state_dict"
    good = before.state_dict
    for path, value, code in [(("scheduler", "gamma"), NAN, "invalid_state"),
                              (("scheduler", "gamma"), INF, "invalid_state"),
                              (("scheduler", "base_lrs", 0), NAN, "invalid_state"),
                              (("param_groups", 0, "initial_lr"), -5, "invalid_option"),
                              (("param_groups", 0, "initial_lr"), NAN, "invalid_option")]:
        bad = json.loads(json.dumps(good))
        at: Any = bad
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value
        assert_problem(http.put(url, json=bad), 422, code,
                       "state_dict." + ".".join(map(str, path)))
    _same(http, sid, before)

    sid, before = _scheduled(http, "SGD", {"name": "ReduceLROnPlateau", "options": {}})
    exported = before.state_dict
    assert exported["scheduler"]["best"] == INF
    r = http.put(f"/v1/sessions/{sid}/state_dict", json=exported)
    assert r.status_code == 200, r.text
    bad = json.loads(json.dumps(exported))
    bad["scheduler"]["factor"] = NAN
    assert_problem(http.put(f"/v1/sessions/{sid}/state_dict", json=bad), 422, "invalid_state",
                   "state_dict.scheduler.factor")


@pytest.mark.parametrize(("lr_dtype", "value"), [
    ("float32", 1e39),
    ("float16", 70000.0),
    ("float32", {"dtype": "float64", "shape": [], "data": [1e39]}),
], ids=["number-past-float32", "number-past-float16", "float64-tensor-past-float32"])
@pytest.mark.parametrize("how", ["patch", "step"])
def test_a_fill_past_the_tensor_lrs_range_is_422(http: httpx.Client, lr_dtype: str,
                                                  value: Any, how: str) -> None:
    """``$fill`` of a value the session's tensor lr cannot hold: torch's ``fill_`` raises for
    a number past the dtype's range (the check's fill of a copy did too: a bare 500), and
    leaves the tensor infinite for a float16 one or a wider tensor's value. A 422
    ``option_overflow`` naming the option, nothing changed; a value in range is filled and
    steps as torch."""
    dtype = getattr(torch, lr_dtype)
    number = value if isinstance(value, float) else torch.tensor(value["data"][0],
                                                                 dtype=torch.float64)
    held = torch.tensor(LR, dtype=dtype)
    try:
        held.fill_(number)
    except RuntimeError:
        pass  # (torch refuses it)
    else:
        assert not torch.isfinite(held)  # (torch takes it as an infinite lr)
    sid = new_session(http, options={"lr": {"dtype": lr_dtype, "shape": [], "data": [LR]}})
    url = f"/v1/sessions/{sid}"
    before = snapshot(http, sid)
    change = {"lr": value, "$fill": ["lr"]}
    grads = {n: jt(t) for n, t in G1.items()}
    r = (http.patch(f"{url}/param_groups/0", json=change) if how == "patch"
         else http.post(f"{url}/step", json={"grads": grads, "param_groups": [change]}))
    assert_problem(r, 422, "option_overflow", "param_groups.0.lr", "beyond the range")
    after = snapshot(http, sid)
    assert (after.describe, after.params, after.state_dict) == (
        before.describe, before.params, before.state_dict)
    r = http.post(f"{url}/step", params={"encoding": "b64"},
                  json={"grads": grads, "param_groups": [{"lr": 0.05, "$fill": ["lr"]}]})
    assert r.status_code == 200, r.text
    params = {n: t.clone() for n, t in p0().items()}
    lr = torch.tensor(LR, dtype=dtype)
    opt = torch.optim.Adam([params[n] for n in NAMES], lr=lr)
    lr.fill_(0.05)
    for n in NAMES:
        params[n].grad = G1[n].clone()
    opt.step()
    for n in NAMES:
        assert torch.equal(from_jt(r.json()["params"][n]), params[n]), n


# --------------------------------------------------------------------------- zero_grad's body

def test_zero_grad_takes_no_body(sess: Sess) -> None:
    """``POST .../zero_grad`` takes no body: it read none, so a misspelt or misplaced field
    (``{"names": ["w"]}``, as if it cleared some) was ignored and everything cleared. Now a
    body with a field is a 422 ``unknown_field`` naming it, one that is not a JSON object a 400
    ``invalid_json`` and one that is not JSON a 415, as on every other route, and nothing is
    cleared; no body, whitespace, or ``{}`` still clear the accumulator."""
    url = f"{sess.url}/zero_grad"
    for content, headers, status, code, fld in [
        (b'{"names": ["w"]}', JSON_CT, 422, "unknown_field", "names"),
        (b'{"bogus": 1}', JSON_CT, 422, "unknown_field", "bogus"),
        (b"[1]", JSON_CT, 400, "invalid_json", "body"),
        (b'"w"', JSON_CT, 400, "invalid_json", "body"),
        (b"{", JSON_CT, 400, "invalid_json", "body"),
        (b"names=w", {"content-type": "application/x-www-form-urlencoded"}, 415,
         "unsupported_media_type", "content-type"),
    ]:
        assert_problem(sess.http.post(url, content=content, headers=headers), status, code, fld)
    sess.assert_unchanged()  # (its step applies the accumulated gradient: push it again)
    for content, headers in [(b"", {}), (b" \n", JSON_CT), (b"{}", JSON_CT)]:
        r = sess.http.post(f"{sess.url}/grads", json={"grads": {"w": jt(G2_W)}})
        assert r.status_code == 200 and r.json()["accumulated"] == ["w"], r.text
        r = sess.http.post(url, content=content, headers=headers)
        assert r.status_code == 200 and r.json()["accumulated"] == [], r.text
        assert sess.http.get(sess.url).json()["accumulated"] == []


@pytest.mark.parametrize("tag", ["nan", "inf", "-inf"])
def test_a_non_finite_metric_is_taken_by_reduce_lr_on_plateau_as_torch_takes_it(
        http: httpx.Client, tag: str) -> None:
    """``{"metric": {"$float": "nan"}}`` (how the clients write a NaN metric: JSON has no
    literal for it) steps ReduceLROnPlateau as torch's own ``scheduler.step(nan)`` does (a NaN
    is never better: a bad epoch, and with ``patience: 0`` the lr is cut; ``-inf`` becomes
    ``best``): a loss gone NaN must not stop training that goes on in process. A malformed
    tag is still a 422 ``invalid_metric``, and a scheduler that takes no metric refuses it,
    changing nothing."""
    value = _FLOATS[tag]
    sid, _ = _scheduled(http, "SGD", {"name": "ReduceLROnPlateau", "options": {"patience": 0}})
    ref_opt = torch.optim.SGD(list(p0().values()), lr=LR)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, patience=0)
    metrics: list[Any] = ([{"$float": tag}, 1.0, {"$float": tag}] if tag != "-inf"
                          else [1.0, {"$float": tag}, 0.5])
    for metric in metrics:
        r = http.post(f"/v1/sessions/{sid}/scheduler/step", json={"metric": metric})
        assert r.status_code == 200, r.text
        ref.step(value if isinstance(metric, dict) else metric)
        assert r.json()["lr"] == ref.get_last_lr()
        exported = http.get(f"/v1/sessions/{sid}/state_dict").json()["scheduler"]
        for key in ("best", "num_bad_epochs", "last_epoch", "cooldown_counter"):
            got = exported[key]
            assert (_FLOATS[got["$float"]] if isinstance(got, dict) else got) \
                == ref.state_dict()[key], key
    assert ref.get_last_lr() != [LR] if tag != "-inf" else ref.best == -math.inf
    r = http.post(f"/v1/sessions/{sid}/scheduler/step", json={"metric": {"$float": "huge"}})
    assert_problem(r, 422, "invalid_metric", "metric")
    sid, before = _scheduled(http, "SGD", {"name": "StepLR", "options": {"step_size": 1},
                                           "step_on": "manual"})
    r = http.post(f"/v1/sessions/{sid}/scheduler/step", json={"metric": {"$float": tag}})
    assert_problem(r, 422, "invalid_metric", "metric")
    _same(http, sid, before)


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def test_timeout_s_is_refused_by_a_step_that_waits_for_no_evaluation(sess: Sess) -> None:
    """``?timeout_s=`` bounds an LBFGS step's wait for each evaluation; another session's
    step took it and ignored it (a client that meant to bound its step got no bound): 422
    ``invalid_query`` naming it, nothing applied, nothing cleared."""
    body = {"grads": {n: jt(t) for n, t in G1.items()}}
    for query in ("timeout_s=5", "timeout_s=bogus", "return=none&timeout_s=0.5"):
        r = sess.http.post(f"{sess.url}/step?{query}", json=body)
        assert_problem(r, 422, "invalid_query", "timeout_s")
    sess.assert_unchanged()
