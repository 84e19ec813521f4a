"""``GET .../params?params_dtype=`` (and the row pulls): a pull answered narrowed, as a step's
answer is, over a real server.

The session's values are stepped by Adam on the server and by an in-process ``torch.optim.Adam``
here on the same gradients; every narrowed answer must equal that local run's float32 values
``.to(dtype)`` bit for bit (floating parameters wider than the dtype only), and equal the
narrowed answer of a step of the same version (finite float32 values past float16's range
included: the step narrows them to infinities, and so does the pull). Sessions sharded and
not (``shards``): a sharded session's shards narrow their parts, as the unsharded session
narrows them all.
"""

from __future__ import annotations

import base64
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import safetensors.torch
import torch

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
NARROW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64",
         torch.bfloat16: "bfloat16"}
#: w holds values past float16's range (65504) that stay past it after a step; h is float16
#: (never narrowed further, nor widened), d float64 (narrowed as float32 is)
SHAPES = {"w": ((6, 50), torch.float32), "b": ((40,), torch.float32),
          "h": ((30,), torch.float16), "d": ((20,), torch.float64)}


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(24)
    out = {n: torch.randn(shape, generator=g).to(dtype) for n, (shape, dtype) in SHAPES.items()}
    out["w"][0, :4] = torch.tensor([1e5, -7e4, 65520.0, 3e38])
    return out


def grads_of(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + k)
    return {n: torch.randn(shape, generator=g).to(dtype) for n, (shape, dtype) in SHAPES.items()}


def local_values(steps: int) -> dict[str, torch.Tensor]:
    """The session's values after ``steps`` Adam steps, computed here by torch."""
    params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
    opt = torch.optim.Adam(list(params.values()), lr=1e-2)
    for k in range(steps):
        for n, g in grads_of(k).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}


def narrowed(values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: t.to(dtype) if t.element_size() > dtype.itemsize else t
            for n, t in values.items()}


def jt(t: torch.Tensor) -> dict[str, object]:
    return {"dtype": NAMES[t.dtype], "shape": list(t.shape),
            "data": t.double().reshape(-1).tolist()}


def from_json(obj: dict[str, object]) -> torch.Tensor:
    dtype = getattr(torch, str(obj["dtype"]))
    shape = [int(s) for s in obj["shape"]]  # type: ignore[attr-defined]
    if "b64" in obj:
        raw = bytearray(base64.b64decode(str(obj["b64"])))
        return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()
    data = [float(x) for x in obj["data"]]  # type: ignore[attr-defined]
    # (each number is the shortest text that reads back as that dtype's value)
    return torch.tensor(data, dtype=torch.float64).to(dtype).reshape(shape)


def create(http: httpx.Client, shards: int = 1) -> str:
    sid = f"narrowpull-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "Adam", "shards": shards,
                                         "options": {"lr": 1e-2},
                                         "params": {n: jt(t) for n, t in initial().items()}})
    assert r.status_code == 201, r.text
    return sid


def step(http: httpx.Client, sid: str, k: int, query: str = "") -> httpx.Response:
    r = http.post(f"/v1/sessions/{sid}/step?{query}",
                  content=safetensors.torch.save(grads_of(k)),
                  headers={"Content-Type": BINARY, "Accept": BINARY})
    assert r.status_code == 200, r.text
    return r


def pull(http: httpx.Client, sid: str, query: str, binary: bool = True,
         headers: dict[str, str] | None = None) -> tuple[httpx.Response, dict[str, torch.Tensor]]:
    r = http.get(f"/v1/sessions/{sid}/params?{query}",
                 headers={"Accept": BINARY if binary else "application/json", **(headers or {})})
    if r.status_code != 200:
        return r, {}
    if binary:
        return r, safetensors.torch.load(r.content)
    return r, {n: from_json(t) for n, t in r.json()["params"].items()}


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
                   ) -> None:
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        assert got[n].dtype == w.dtype and got[n].shape == w.shape, (what, n, got[n].dtype)
        # (bits, not values: an infinity, a -0.0 and a NaN compare as what they are)
        bits = torch.int16 if w.element_size() == 2 else torch.int64 \
            if w.element_size() == 8 else torch.int32
        assert torch.equal(got[n].view(bits), w.view(bits)), f"{what}: {n} differs"


@pytest.fixture
def http(live_server: str) -> httpx.Client:
    with httpx.Client(base_url=live_server, timeout=120) as client:
        yield client  # type: ignore[misc]


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("encoding", ["binary", "json", "json-b64"])
def test_narrowed_pull_equals_the_float32_values_narrowed(
        http: httpx.Client, dtype_name: str, encoding: str, shards: int) -> None:
    dtype = NARROW[dtype_name]
    sid = create(http, shards)
    stepped = step(http, sid, 0, f"params_dtype={dtype_name}")
    want = local_values(1)
    _, full = pull(http, sid, "")
    assert_bitwise(full, want, "full-width pull")
    query = f"params_dtype={dtype_name}" + ("&encoding=b64" if encoding == "json-b64" else "")
    r, got = pull(http, sid, query, binary=encoding == "binary")
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"1"' and r.headers["x-optserve-version"] == "1"
    assert_bitwise(got, narrowed(want, dtype), f"{dtype_name} {encoding} pull")
    # the step's narrowed answer of the same version: the same tensors, bit for bit
    assert_bitwise(got, safetensors.torch.load(stepped.content), "the step's answer")
    if dtype == torch.float16:  # past float16's range: infinities, as the step sends them
        assert torch.isinf(got["w"][0, :4]).all() and not torch.isinf(want["w"]).any()
    assert got["h"].dtype == torch.float16 and got["d"].dtype == dtype
    # some names only
    r, some = pull(http, sid, f"names=w&names=h&params_dtype={dtype_name}",
                   binary=encoding == "binary")
    assert_bitwise(some, {n: v for n, v in narrowed(want, dtype).items() if n in ("w", "h")},
                   "names=w,h")


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_narrowed_pull_head_304_and_long_poll(http: httpx.Client, dtype_name: str,
                                              shards: int) -> None:
    dtype = NARROW[dtype_name]
    sid = create(http, shards)
    step(http, sid, 0)
    query = f"params_dtype={dtype_name}"
    r, got = pull(http, sid, query)
    head = http.head(f"/v1/sessions/{sid}/params?{query}", headers={"Accept": BINARY})
    assert head.status_code == 200 and head.headers["etag"] == '"1"'
    assert int(head.headers["content-length"]) == len(r.content)
    # the same version at either width: one ETag, and If-None-Match of it is a 304
    _, full = pull(http, sid, "")
    not_modified = http.get(f"/v1/sessions/{sid}/params?{query}",
                            headers={"Accept": BINARY, "If-None-Match": '"1"'})
    assert not_modified.status_code == 304 and not not_modified.content
    assert not_modified.headers["etag"] == '"1"'
    # a long poll (If-None-Match + wait_s, and min_version) answers the next version narrowed
    with ThreadPoolExecutor(2) as pool:
        polls = [pool.submit(pull, http, sid, f"{query}&wait_s=30",
                             True, {"If-None-Match": '"1"'}),
                 pool.submit(pull, http, sid, f"{query}&min_version=2&wait_s=30", False)]
        time.sleep(0.3)
        assert not any(p.done() for p in polls)
        step(http, sid, 1)
        want = narrowed(local_values(2), dtype)
        for p in polls:
            r, got = p.result(timeout=60)
            assert r.status_code == 200 and r.headers["etag"] == '"2"', r.text
            assert_bitwise(got, want, "the long poll's answer")


@pytest.mark.parametrize("shards", [1, 2])
def test_narrowed_row_pulls(http: httpx.Client, shards: int) -> None:
    sid = create(http, shards)
    step(http, sid, 0)
    want = local_values(1)
    rows = [0, 3, 0, 5]
    for dtype_name, dtype in NARROW.items():
        r = http.get(f"/v1/sessions/{sid}/params?name=w&rows=0,3,0,5&params_dtype={dtype_name}",
                     headers={"Accept": BINARY})
        assert r.status_code == 200, r.text
        got = safetensors.torch.load(r.content)
        assert got["w.indices"].tolist() == rows
        assert_bitwise({"w": got["w.values"]}, {"w": want["w"][rows].to(dtype)}, "GET rows")
        r = http.post(f"/v1/sessions/{sid}/params/rows?params_dtype={dtype_name}",
                      json={"rows": {"w": rows, "d": [1, 2]}})
        assert r.status_code == 200, r.text
        answer = r.json()["params"]
        for name, idx in (("w", rows), ("d", [1, 2])):
            assert answer[name]["indices"] == idx
            assert_bitwise({name: from_json(answer[name]["values"])},
                           {name: want[name][idx].to(dtype)}, "POST rows")
        r = http.post(f"/v1/sessions/{sid}/params/rows?params_dtype={dtype_name}",
                      json={"rows": {"w": rows}}, headers={"If-None-Match": '"1"'})
        assert r.status_code == 304


@pytest.mark.parametrize("query", [
    "params_dtype=float32", "params_dtype=int8", "params_dtype=", "params_dtype=BFLOAT16",
    "params_dtype=bfloat16&params_dtype=bfloat16",
    "name=w&rows=1&params_dtype=float64",
])
@pytest.mark.parametrize("shards", [1, 2])
def test_a_bad_params_dtype_is_a_422_naming_it(http: httpx.Client, query: str,
                                               shards: int) -> None:
    """Refused as the step refuses it: the same problem, word for word (the pulls read the
    query with the step's parser), where a good value is taken; sharded or not."""
    sid = create(http, shards)
    assert http.get(f"/v1/sessions/{sid}/params?params_dtype=bfloat16").status_code == 200
    details = set()
    for r in (http.get(f"/v1/sessions/{sid}/params?{query}"),
              http.post(f"/v1/sessions/{sid}/params/rows?{query.removeprefix('name=w&rows=1&')}",
                        json={"rows": {"w": [1]}}),
              http.post(f"/v1/sessions/{sid}/step?{query.removeprefix('name=w&rows=1&')}",
                        content=safetensors.torch.save(grads_of(0)),
                        headers={"Content-Type": BINARY})):
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["field"] == "params_dtype" and problem["code"] == "invalid_query"
        details.add(problem["detail"])
    assert details <= {"params_dtype must be float16 or bfloat16",
                       "params_dtype is given more than once"} and len(details) == 1
    # the step refused it too: nothing was applied
    assert http.get(f"/v1/sessions/{sid}").json()["version"] == 0
