"""Row pulls and narrow wires on every engine, sessions sharded and not: on the Ray engine (its
hosts on the test cluster) and on a sharded session of either engine they answer as an
unsharded session of the embedded engine does (they were refused there, 422
``not_supported_here``).

Every answer is compared with an in-process ``torch.optim.Adam`` run on the same gradients
(widened from bfloat16 as the server widens them, ``?upcast=true``), bit for bit: rows in the
order asked, repeats kept, narrowed (``?params_dtype=``) as ``.to(dtype)`` narrows them; a
refusal is compared with the same request's refusal by an unsharded session of the embedded
engine's kind (the same problem, word for word), nothing changed."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from tests.conftest import ENGINES
from tests.torch_reference import json_tensor, tensor_from_json

pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine_url", ENGINES, indirect=True)]

BINARY = "application/octet-stream"
#: float32 tables (their rows pulled), a float32 bias, a float16 parameter (never narrowed
#: further nor widened), a float64 one (narrowed as float32 is) and a scalar (no rows)
SHAPES = {"emb": ((20, 4), torch.float32), "other": ((12, 4), torch.float32),
          "bias": ((4,), torch.float32), "h": ((6,), torch.float16),
          "d": ((5, 2), torch.float64), "s": ((), torch.float32)}
LR = 0.05


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(36)
    return {n: torch.randn(shape, generator=g).to(dtype) for n, (shape, dtype) in SHAPES.items()}


def grads_of(k: int, narrow: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Step ``k``'s gradients, in each parameter's dtype or, for the wider ones, ``narrow``."""
    g = torch.Generator().manual_seed(700 + k)
    out = {}
    for n, (shape, dtype) in SHAPES.items():
        t = torch.randn(shape, generator=g).to(dtype)
        out[n] = t.to(narrow) if narrow is not None and t.element_size() > 2 else t
    return out


class Twin:
    """The session's in-process torch twin."""

    def __init__(self) -> None:
        self.params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=LR)

    def step(self, *grads: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            total = None
            for g in grads:
                if n in g:
                    widened = g[n].to(p.dtype)
                    total = widened if total is None else total + widened
            p.grad = total
        self.opt.step()

    def values(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {n: narrow(p.detach().clone(), dtype) for n, p in self.params.items()}


def narrow(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.element_size() > dtype.itemsize else t


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape)
    assert torch.equal(got, want), f"{what} differs"


def create(http: httpx.Client, shards: int) -> str:
    sid = f"rows-narrow-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": {"lr": LR}, "shards": shards,
        "params": {n: json_tensor(t) for n, t in initial().items()}})
    assert r.status_code == 201, r.text
    if shards > 1:  # (spread over the shards: the rows pulled below come from both)
        placed = r.json()["placement"]["shards"]
        assert all(entry["params"] for entry in placed), placed
    return sid


def step_binary(http: httpx.Client, sid: str, grads: dict[str, torch.Tensor], query: str = "",
                headers: dict[str, str] | None = None) -> httpx.Response:
    r = http.post(f"/v1/sessions/{sid}/step?{query}", content=safetensors.torch.save(grads),
                  headers={"Content-Type": BINARY, "Accept": BINARY, **(headers or {})})
    assert r.status_code == 200, r.text
    return r


def rows_json(answer: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    return list(answer["indices"]), tensor_from_json(answer["values"])


@pytest.mark.parametrize("shards", [1, 2])
def test_row_pulls_answer_as_torch(http: httpx.Client, shards: int) -> None:
    """GET ``?name=&rows=`` (JSON and safetensors, repeated ``rows``), POST ``.../params/rows``
    (JSON and safetensors, several parameters on different shards, in the order asked),
    narrowed, ``If-None-Match`` (304) and a long poll answered by the next step."""
    sid = create(http, shards)
    twin = Twin()
    for k in range(2):
        step_binary(http, sid, grads_of(k), "return=none")
        twin.step(grads_of(k))
    want = twin.values()

    r = http.get(f"/v1/sessions/{sid}/params", params={"name": "emb", "rows": "9,0,9"})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"2"' and r.json()["version"] == 2
    idx, values = rows_json(r.json()["params"]["emb"])
    assert idx == [9, 0, 9]
    same_bits(values, want["emb"][[9, 0, 9]], "GET rows of emb")

    r = http.get(f"/v1/sessions/{sid}/params?name=other&rows=3&rows=11,3",
                 headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    got = safetensors.torch.load(r.content)
    assert got["other.indices"].tolist() == [3, 11, 3]
    same_bits(got["other.values"], want["other"][[3, 11, 3]], "GET rows of other, binary")

    asked = {"d": [4, 4, 0], "other": [5], "emb": [19, 0, 7]}
    r = http.post(f"/v1/sessions/{sid}/params/rows", json={"rows": asked})
    assert r.status_code == 200, r.text
    answer = r.json()["params"]
    assert list(answer) == list(asked)
    for name, rows in asked.items():
        idx, values = rows_json(answer[name])
        assert idx == rows, name
        same_bits(values, want[name][rows], f"POST rows of {name}")

    r = http.post(f"/v1/sessions/{sid}/params/rows?params_dtype=bfloat16",
                  content=safetensors.torch.save({n: torch.tensor(v) for n, v in asked.items()}),
                  headers={"Content-Type": BINARY, "Accept": BINARY})
    assert r.status_code == 200, r.text
    got = safetensors.torch.load(r.content)
    for name, rows in asked.items():
        assert got[f"{name}.indices"].tolist() == rows
        same_bits(got[f"{name}.values"], want[name][rows].to(torch.bfloat16),
                  f"narrowed rows of {name}")

    for pull in (lambda h: http.get(f"/v1/sessions/{sid}/params?name=emb&rows=1", headers=h),
                 lambda h: http.post(f"/v1/sessions/{sid}/params/rows", json={"rows": asked},
                                     headers=h)):
        r = pull({"If-None-Match": '"2"'})
        assert r.status_code == 304 and r.headers["etag"] == '"2"' and not r.content

    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(http.post, f"/v1/sessions/{sid}/params/rows?min_version=3&wait_s=30",
                           json={"rows": asked})
        time.sleep(0.5)
        assert not poll.done()
        step_binary(http, sid, grads_of(2), "return=none")
        twin.step(grads_of(2))
        r = poll.result(timeout=60)
    assert r.status_code == 200 and r.headers["etag"] == '"3"', r.text
    want = twin.values()
    for name, rows in asked.items():
        idx, values = rows_json(r.json()["params"][name])
        same_bits(values, want[name][rows], f"long-polled rows of {name}")
    http.delete(f"/v1/sessions/{sid}")


ROW_REFUSALS = [
    ("unknown parameter", "POST", {"rows": {"emb": [1], "nope": [0]}}),
    ("past the last row", "POST", {"rows": {"emb": [1], "other": [12]}}),
    ("a negative row", "POST", {"rows": {"emb": [-1]}}),
    ("a scalar", "POST", {"rows": {"s": [0]}}),
    ("no parameter", "POST", {"rows": {}}),
    ("rows not integers", "POST", {"rows": {"emb": [0.5]}}),
    ("no rows", "GET", {"name": "emb"}),
    ("a row past the end", "GET", {"name": "other", "rows": "0,12"}),
]


@pytest.mark.parametrize("shards", [1, 2])
def test_row_pull_refusals_are_the_unsharded_embedded_sessions(
        http: httpx.Client, shards: int, live_server: str) -> None:
    """Each bad row pull is a 422 problem naming the field, word for word the one an
    unsharded session of the embedded engine answers (its twin on the embedded server); the
    session is unchanged and still answers rows."""
    sid = create(http, shards)
    with httpx.Client(base_url=live_server, timeout=60) as plain:
        ref = create(plain, 1)
        for what, method, body in ROW_REFUSALS:
            answers = []
            for client, session in ((http, sid), (plain, ref)):
                if method == "POST":
                    r = client.post(f"/v1/sessions/{session}/params/rows", json=body)
                else:
                    r = client.get(f"/v1/sessions/{session}/params", params=body)
                assert r.status_code == 422, (what, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
                problem = r.json()
                answers.append({k: problem.get(k) for k in ("code", "field", "detail")})
            assert answers[0] == answers[1], what
            assert answers[0]["field"], what
        plain.delete(f"/v1/sessions/{ref}")
    r = http.get(f"/v1/sessions/{sid}/params", params={"name": "emb", "rows": "2"})
    assert r.status_code == 200 and r.json()["version"] == 0, r.text
    same_bits(rows_json(r.json()["params"]["emb"])[1], initial()["emb"][[2]], "rows after")
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("shards", [1, 2])
def test_narrow_wires_step_push_and_pull_as_torch(http: httpx.Client, shards: int) -> None:
    """bfloat16 gradients with ``?upcast=true`` (a binary step answered narrowed, a JSON push
    and a JSON step answered at full width), a narrowed pull, a keyed retry of a narrowed step
    (answered narrowed, not applied again), and bfloat16 gradients without ``upcast``: a 422
    ``dtype_mismatch`` naming the gradient, nothing applied."""
    bf16 = torch.bfloat16
    sid = create(http, shards)
    twin = Twin()

    key = uuid.uuid4().hex
    r = step_binary(http, sid, grads_of(0, bf16), "upcast=true&params_dtype=bfloat16",
                    {"Idempotency-Key": key})
    twin.step(grads_of(0, bf16))
    for name, want in twin.values(bf16).items():
        same_bits(safetensors.torch.load(r.content)[name], want, f"narrowed answer of {name}")
    again = step_binary(http, sid, grads_of(0, bf16), "upcast=true&params_dtype=bfloat16",
                        {"Idempotency-Key": key})
    assert again.headers.get("idempotent-replayed") == "true"
    assert safetensors.torch.load(again.content).keys() == twin.params.keys()
    for name, want in twin.values(bf16).items():
        same_bits(safetensors.torch.load(again.content)[name], want, f"replayed {name}")

    pushed, stepped = grads_of(1, bf16), grads_of(2, bf16)
    r = http.post(f"/v1/sessions/{sid}/grads?upcast=true",
                  json={"grads": {n: json_tensor(t) for n, t in pushed.items()}})
    assert r.status_code == 200, r.text
    r = http.post(f"/v1/sessions/{sid}/step?upcast=true",
                  json={"grads": {n: json_tensor(t) for n, t in stepped.items()}})
    assert r.status_code == 200, r.text
    twin.step(pushed, stepped)
    assert r.json()["version"] == 2
    for name, want in twin.values().items():
        same_bits(tensor_from_json(r.json()["params"][name]), want, f"full answer of {name}")

    r = http.get(f"/v1/sessions/{sid}/params?params_dtype=float16", headers={"Accept": BINARY})
    assert r.status_code == 200 and r.headers["etag"] == '"2"', r.text
    got = safetensors.torch.load(r.content)
    for name, want in twin.values(torch.float16).items():
        same_bits(got[name], want, f"float16 pull of {name}")

    r = http.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(grads_of(3, bf16)),
                  headers={"Content-Type": BINARY})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "dtype_mismatch" and problem["field"].startswith("grads."), problem
    r = http.post(f"/v1/sessions/{sid}/grads",
                  json={"grads": {"emb": json_tensor(grads_of(3, bf16)["emb"])}})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("dtype_mismatch", "grads.emb")
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.headers["etag"] == '"2"'
    got = safetensors.torch.load(r.content)
    for name, want in twin.values().items():
        same_bits(got[name], want, f"master weights of {name}")
    assert http.get(f"/v1/sessions/{sid}").json()["accumulated"] == []
    http.delete(f"/v1/sessions/{sid}")


TABLES = {"emb": (30, 4), "other": (16, 4), "bias": (4,)}


def sparse_grad(rows: list[int], seed: int, n: int) -> torch.Tensor:
    values = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, 4), check_invariants=True)


def sparse_json(t: torch.Tensor) -> dict[str, Any]:
    return {"indices": t._indices()[0].tolist(), "values": json_tensor(t._values())}


@pytest.mark.parametrize("shards", [1, 2])
def test_touched_answers_as_torch(http: httpx.Client, shards: int) -> None:
    """``?return=touched``: each stepped parameter's touched rows (each once, ascending) or
    the whole parameter for a dense gradient, in the session's order; narrowed with
    ``?params_dtype=``; a keyed retry answers the same rows; rows accumulated by a push are
    answered with the step that takes them. Values as torch's SGD on the same sparse
    gradients."""
    g = torch.Generator().manual_seed(5)
    start = {n: torch.randn(shape, generator=g) for n, shape in TABLES.items()}
    sid = f"touched-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "SGD", "options": {"lr": 0.1},
                                         "shards": shards,
                                         "params": {n: json_tensor(t) for n, t in start.items()}})
    assert r.status_code == 201, r.text
    params = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.1)

    def twin(grads: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            p.grad = grads.get(n)
        opt.step()

    def rows_of(answer: dict[str, Any], name: str) -> tuple[list[int], torch.Tensor]:
        return answer[name]["indices"], tensor_from_json(answer[name]["values"])

    # JSON: rows of emb (a repeat) and of other, bias whole
    grads = {"emb": sparse_grad([3, 17, 3], 1, 30), "other": sparse_grad([5], 2, 16),
             "bias": torch.randn(4, generator=g)}
    r = http.post(f"/v1/sessions/{sid}/step?return=touched", json={"grads": {
        "emb": sparse_json(grads["emb"]), "other": sparse_json(grads["other"]),
        "bias": json_tensor(grads["bias"])}})
    assert r.status_code == 200, r.text
    twin(grads)
    answer = r.json()["params"]
    assert list(answer) == ["emb", "other", "bias"]
    for name, rows in (("emb", [3, 17]), ("other", [5])):
        idx, values = rows_of(answer, name)
        assert idx == rows
        same_bits(values, params[name].detach()[rows], f"touched rows of {name}")
    same_bits(tensor_from_json(answer["bias"]), params["bias"].detach(), "bias whole")

    # safetensors, narrowed, keyed; its retry answers the same rows
    grads = {"other": sparse_grad([15, 0], 3, 16)}
    body = safetensors.torch.save({"other.indices": grads["other"]._indices()[0].clone(),
                                   "other.values": grads["other"]._values().clone()})
    key = uuid.uuid4().hex
    answers = []
    for _ in range(2):
        r = http.post(f"/v1/sessions/{sid}/step?return=touched&params_dtype=bfloat16",
                      content=body, headers={"Content-Type": BINARY, "Accept": BINARY,
                                             "Idempotency-Key": key})
        assert r.status_code == 200, r.text
        answers.append(safetensors.torch.load(r.content))
    assert r.headers.get("idempotent-replayed") == "true"
    twin(grads)
    for got in answers:
        assert set(got) == {"other.indices", "other.values"}
        assert got["other.indices"].tolist() == [0, 15]
        same_bits(got["other.values"], params["other"].detach()[[0, 15]].to(torch.bfloat16),
                  "narrowed touched rows")

    # rows pushed (accumulated) come back with the step that takes them
    pushed = {"emb": sparse_grad([29, 1], 4, 30)}
    r = http.post(f"/v1/sessions/{sid}/grads", json={"grads": {"emb": sparse_json(pushed["emb"])}})
    assert r.status_code == 200, r.text
    stepped = {"emb": sparse_grad([1, 8], 5, 30)}
    r = http.post(f"/v1/sessions/{sid}/step?return=touched",
                  json={"grads": {"emb": sparse_json(stepped["emb"])}})
    assert r.status_code == 200, r.text
    twin({"emb": pushed["emb"] + stepped["emb"]})
    idx, values = rows_of(r.json()["params"], "emb")
    assert idx == [1, 8, 29]
    same_bits(values, params["emb"].detach()[[1, 8, 29]], "accumulated and stepped rows")
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    got = safetensors.torch.load(r.content)
    for name, p in params.items():
        same_bits(got[name], p.detach(), f"{name} after the steps")
    http.delete(f"/v1/sessions/{sid}")
