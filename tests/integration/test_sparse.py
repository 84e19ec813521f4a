"""Embedding tables over HTTP: row-sparse gradients (JSON and safetensors), SparseAdam, sparse
SGD and Adagrad, accumulation of sparse pushes, row pulls and ``?return=touched``, against a
live uvicorn server, every value bitwise equal to in-process torch; every refusal a 422 naming
the field with the session unchanged."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import torch

from app.wire.safetensors_body import read_safetensors, write_safetensors
from tests.torch_reference import json_tensor, tensor_from_json, tensors_from_json

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
ROWS, DIM = 50, 4
#: the row lists of successive steps: duplicates, an empty list, one row, repeats of a row
BATCHES = [[3, 7, 3, 49], [], [0], [7, 7, 7, 7, 1], [12, 3, 40, 41, 42, 3]]
OPTIMIZERS = {
    "SparseAdam": {"lr": 0.05, "betas": [0.8, 0.95]},
    "SGD": {"lr": 0.1},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
}


def table(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed))


def values_for(rows: list[int], seed: int) -> torch.Tensor:
    return torch.randn(len(rows), DIM, generator=torch.Generator().manual_seed(100 + seed))


def coo(rows: list[int], values: torch.Tensor, n: int = ROWS) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor(rows, dtype=torch.int64).reshape(1, -1), values,
                                   (n, values.shape[1]), check_invariants=False)


def sparse_json(rows: list[int], values: torch.Tensor, **extra: Any) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [ROWS, DIM], "indices": rows,
            "values": json_tensor(values), **extra}


def sparse_st(name: str, rows: list[int], values: torch.Tensor,
              meta: dict[str, str] | None = None, **dense: torch.Tensor) -> bytes:
    return write_safetensors({f"{name}.indices": torch.tensor(rows, dtype=torch.int64),
                              f"{name}.values": values, **dense}, meta)


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def create(http: httpx.Client, optimizer: str, options: dict[str, Any],
           **params: torch.Tensor) -> str:
    sid = f"emb-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": optimizer, "options": options,
                                        "params": {n: json_tensor(t) for n, t in params.items()}})
    assert r.status_code == 201, r.text
    return sid


def rows_from_json(obj: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    return list(obj["indices"]), tensor_from_json(obj["values"])


def snapshot(http: httpx.Client, sid: str) -> dict[str, Any]:
    params = tensors_from_json(http.get(f"/v1/sessions/{sid}/params").json()["params"])
    info = http.get(f"/v1/sessions/{sid}").json()
    return {"params": params, "state": http.get(f"/v1/sessions/{sid}/state_dict").json(),
            "version": info["version"], "accumulated": info["accumulated"]}


def assert_unchanged(http: httpx.Client, sid: str, before: dict[str, Any]) -> None:
    after = snapshot(http, sid)
    assert after["version"] == before["version"]
    assert after["state"] == before["state"]
    assert after["accumulated"] == before["accumulated"]
    for n, t in before["params"].items():
        assert bitwise(after["params"][n], t), n


def problem(r: httpx.Response, code: str, field: str) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    body: dict[str, Any] = r.json()
    assert (body["code"], body.get("field")) == (code, field), body
    return body


# --------------------------------------------------------------------------- bitwise runs
@pytest.mark.parametrize("fmt", ["json", "safetensors"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_sparse_steps_equal_torch(http: httpx.Client, optimizer: str, fmt: str) -> None:
    """Several steps with duplicate rows and an empty row list, answered with only the
    touched rows, every other step with all parameters: bitwise torch (a dense parameter in
    the same session is stepped alongside where the optimizer takes dense gradients)."""
    options = OPTIMIZERS[optimizer]
    dense = optimizer != "SparseAdam"
    start = {"emb": table(), **({"bias": torch.randn(DIM)} if dense else {})}
    sid = create(http, optimizer, options, **start)
    ref = {n: t.clone() for n, t in start.items()}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    opt = getattr(torch.optim, optimizer)(list(ref.values()), **kwargs)
    for i, rows in enumerate(BATCHES):
        values = values_for(rows, i)
        bias_grad = torch.full((DIM,), 0.1 * (i + 1))
        ret = "touched" if i % 2 == 0 else "params"
        if fmt == "json":
            grads: dict[str, Any] = {"emb": sparse_json(rows, values)}
            if dense:
                grads["bias"] = json_tensor(bias_grad)
            r = http.post(f"/v1/sessions/{sid}/step?return={ret}", json={"grads": grads})
            assert r.status_code == 200, r.text
            body = r.json()
            got = body["params"]
        else:
            extra = {"bias": bias_grad} if dense else {}
            r = http.post(f"/v1/sessions/{sid}/step?return={ret}",
                          content=sparse_st("emb", rows, values, **extra),
                          headers={"content-type": BINARY, "accept": BINARY})
            assert r.status_code == 200, r.text
            tensors, meta = read_safetensors(bytearray(r.content))
            body = {"version": int(meta["version"])}
            got = tensors
        ref["emb"].grad = coo(rows, values)
        if dense:
            ref["bias"].grad = bias_grad.clone()
        opt.step()
        for t in ref.values():
            t.grad = None
        assert body["version"] == i + 1
        if ret == "touched":
            touched = sorted(set(rows))
            if fmt == "json":
                idx, vals = rows_from_json(got["emb"])
            else:
                idx, vals = got["emb.indices"].tolist(), got["emb.values"]
            assert idx == touched
            assert bitwise(vals, ref["emb"].detach()[touched])
            if dense:
                bias = tensor_from_json(got["bias"]) if fmt == "json" else got["bias"]
                assert bitwise(bias, ref["bias"].detach())
        else:
            whole = tensors_from_json(got) if fmt == "json" else got
            for n, t in ref.items():
                assert bitwise(whole[n], t.detach()), (i, n)
    # the optimizer state is torch's, dense, and loads into a local optimizer
    sd = http.get(f"/v1/sessions/{sid}/state_dict?format=safetensors",
                  headers={"accept": BINARY})
    assert sd.status_code == 200
    local = opt.state_dict()["state"]
    exported = http.get(f"/v1/sessions/{sid}/state_dict").json()["state"]
    assert set(exported) == {str(k) for k in local}
    for pid, entry in local.items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                assert bitwise(tensor_from_json(exported[str(pid)][k]), v), k
            else:
                assert exported[str(pid)][k] == v, k


def test_accumulated_sparse_pushes_equal_torch(http: httpx.Client) -> None:
    """Pushes to /grads accumulate as torch sums gradients (sparse + sparse, dense + sparse);
    the step adds them to its own gradient."""
    sid = create(http, "SGD", {"lr": 0.1}, emb=table(1))
    ref = table(1)
    opt = torch.optim.SGD([ref], lr=0.1)
    pushes = [([1, 2, 1], 0), ([2, 9], 1)]
    total: torch.Tensor | None = None
    for rows, seed in pushes:
        v = values_for(rows, seed)
        r = http.post(f"/v1/sessions/{sid}/grads", json={"grads": {"emb": sparse_json(rows, v)}})
        assert r.status_code == 200, r.text
        assert r.json()["accumulated"] == ["emb"]
        total = coo(rows, v) if total is None else total + coo(rows, v)
    dense = torch.full((ROWS, DIM), 0.01)
    r = http.post(f"/v1/sessions/{sid}/grads", json={"grads": {"emb": json_tensor(dense)}})
    assert r.status_code == 200
    assert total is not None
    total = dense + total
    v = values_for([5], 7)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"emb": sparse_json([5], v)}})
    assert r.status_code == 200, r.text
    ref.grad = total + coo([5], v)
    opt.step()
    assert bitwise(tensor_from_json(r.json()["params"]["emb"]), ref.detach())
    assert http.get(f"/v1/sessions/{sid}").json()["accumulated"] == []


def test_sparse_without_shape_or_dtype(http: httpx.Client) -> None:
    """``shape`` and ``dtype`` may be left out (the parameter's are taken); indices may be an
    int64 JSON tensor; values base64."""
    sid = create(http, "SGD", {"lr": 1.0}, emb=table(2))
    v = values_for([4, 4], 3)
    r = http.post(f"/v1/sessions/{sid}/step?return=touched", json={"grads": {"emb": {
        "indices": json_tensor(torch.tensor([4, 4])), "values": json_tensor(v, b64=True)}}})
    assert r.status_code == 200, r.text
    ref = table(2)
    ref.add_(coo([4, 4], v), alpha=-1.0)
    idx, vals = rows_from_json(r.json()["params"]["emb"])
    assert idx == [4] and bitwise(vals, ref[[4]])


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("optimizer", "options", "field", "words"), [
    ("Adam", {"lr": 0.1}, "optimizer", "does not support sparse gradients"),
    ("RMSprop", {}, "optimizer", "does not support sparse gradients"),
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "param_groups.0.momentum", "momentum_buffer"),
    ("SGD", {"lr": 0.1, "weight_decay": 0.01}, "param_groups.0.weight_decay", "add(sparse"),
    ("SGD", {"lr": 0.1, "fused": True}, "param_groups.0.fused", "sparse"),
    ("Adagrad", {"lr": 0.1, "weight_decay": 0.01}, "param_groups.0.weight_decay",
     "not compatible with sparse"),
])
def test_optimizers_that_refuse_sparse(http: httpx.Client, optimizer: str,
                                       options: dict[str, Any], field: str, words: str) -> None:
    sid = create(http, optimizer, options, emb=table())
    before = snapshot(http, sid)
    v = values_for([1], 0)
    for path in ("step", "grads"):
        body = problem(http.post(f"/v1/sessions/{sid}/{path}",
                                 json={"grads": {"emb": sparse_json([1], v)}}),
                       "sparse_unsupported", field)
        assert words in body["detail"], body
    assert_unchanged(http, sid, before)


BAD_SPARSE: list[tuple[str, dict[str, Any], str, str]] = [
    ("row-too-large", sparse_json([3, 50], values_for([3, 50], 0)), "index_out_of_range",
     "grads.emb.indices"),
    ("negative-row", sparse_json([-1], values_for([0], 0)), "index_out_of_range",
     "grads.emb.indices"),
    ("row-beyond-declared-shape", {**sparse_json([9], values_for([9], 0)), "shape": [5, DIM]},
     "index_out_of_range", "grads.emb.indices"),
    ("more-rows-than-parameter", {**sparse_json([1], values_for([1], 0)),
                                  "shape": [ROWS + 1, DIM]}, "shape_mismatch",
     "grads.emb.shape"),
    ("row-shape", sparse_json([1], torch.zeros(1, DIM + 1)), "shape_mismatch",
     "grads.emb.values"),
    ("counts-differ", sparse_json([1, 2], values_for([1], 0)), "invalid_sparse",
     "grads.emb.indices"),
    ("values-dtype", sparse_json([1], torch.zeros(1, DIM, dtype=torch.float64)),
     "dtype_mismatch", "grads.emb.dtype"),
    ("values-float64-no-dtype", {"indices": [1], "values": json_tensor(
        torch.zeros(1, DIM, dtype=torch.float64))}, "dtype_mismatch", "grads.emb.values"),
    ("index-not-int", sparse_json([1.5], values_for([1], 0)), "invalid_sparse",  # type: ignore[list-item]
     "grads.emb.indices"),
    ("index-huge", sparse_json([2**70], values_for([1], 0)), "invalid_sparse",
     "grads.emb.indices"),
    ("scalar-values", {"indices": [1], "values": json_tensor(torch.tensor(1.0))},
     "invalid_sparse", "grads.emb.values"),
    ("unknown-key", {**sparse_json([1], values_for([1], 0)), "coalesced": True},
     "invalid_sparse", "grads.emb"),
    ("scalar-parameter", {"indices": [0], "values": json_tensor(torch.zeros(1))},
     "invalid_sparse", "grads.s"),
]


@pytest.mark.parametrize(("case", "tensor", "code", "field"), BAD_SPARSE,
                         ids=[c[0] for c in BAD_SPARSE])
def test_bad_sparse_gradients(http: httpx.Client, case: str, tensor: dict[str, Any], code: str,
                              field: str) -> None:
    sid = create(http, "SparseAdam", {"lr": 0.1}, emb=table(), s=torch.tensor(1.0))
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"emb": sparse_json([2], values_for(
        [2], 9))}})
    assert r.status_code == 200, r.text
    before = snapshot(http, sid)
    name = "s" if case == "scalar-parameter" else "emb"
    for path in ("step", "grads"):
        problem(http.post(f"/v1/sessions/{sid}/{path}", json={"grads": {name: tensor}}), code,
                field)
    assert_unchanged(http, sid, before)


def test_sparse_adam_refuses_dense_and_sparse_params_are_refused(http: httpx.Client) -> None:
    sid = create(http, "SparseAdam", {"lr": 0.1}, emb=table())
    before = snapshot(http, sid)
    body = problem(http.post(f"/v1/sessions/{sid}/step", json={"grads": {
        "emb": json_tensor(torch.zeros(ROWS, DIM))}}), "dense_gradient", "grads.emb")
    assert "SparseAdam does not support dense gradients" in body["detail"]
    problem(http.post(f"/v1/sessions/{sid}/grads", json={"grads": {
        "emb": json_tensor(torch.zeros(ROWS, DIM))}}), "dense_gradient", "grads.emb")
    # only gradients may be sparse: parameters are dense
    r = http.put(f"/v1/sessions/{sid}/params",
                 json={"params": {"emb": sparse_json([1], values_for([1], 0))}})
    assert r.status_code == 422 and r.json()["field"] == "params.emb", r.text
    assert_unchanged(http, sid, before)


@pytest.mark.parametrize(("body", "code", "field"), [
    (write_safetensors({"emb.indices": torch.tensor([1])}, None), "invalid_sparse", "grads.emb"),
    (write_safetensors({"emb.indices": torch.tensor([1], dtype=torch.int32),
                        "emb.values": torch.zeros(1, DIM)}, None), "invalid_sparse",
     "grads.emb.indices"),
    (write_safetensors({"emb.indices": torch.tensor([[1]]),
                        "emb.values": torch.zeros(1, DIM)}, None), "invalid_sparse",
     "grads.emb.indices"),
    (write_safetensors({"emb.indices": torch.tensor([ROWS]),
                        "emb.values": torch.zeros(1, DIM)}, None), "index_out_of_range",
     "grads.emb.indices"),
    (write_safetensors({"emb.indices": torch.tensor([1]), "emb.values": torch.zeros(1, DIM),
                        "emb": torch.zeros(ROWS, DIM)}, None), "invalid_sparse", "grads.emb"),
], ids=["indices-alone", "int32-indices", "2d-indices", "out-of-range", "dense-and-sparse"])
def test_bad_sparse_safetensors(http: httpx.Client, body: bytes, code: str, field: str) -> None:
    sid = create(http, "SGD", {"lr": 0.1}, emb=table())
    before = snapshot(http, sid)
    problem(http.post(f"/v1/sessions/{sid}/step", content=body,
                      headers={"content-type": BINARY}), code, field)
    assert_unchanged(http, sid, before)


# --------------------------------------------------------------------------- row pulls
def test_row_pulls(http: httpx.Client) -> None:
    """GET ?name=&rows= and POST .../params/rows (JSON and safetensors): the rows asked, in
    their order, repeats kept; versions, ETag and 304 as for whole pulls."""
    start = table(5)
    sid = create(http, "SparseAdam", {"lr": 0.1}, emb=start, other=torch.randn(3, DIM))
    r = http.get(f"/v1/sessions/{sid}/params", params={"name": "emb", "rows": "9,0,9"})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"0"'
    got = r.json()["params"]["emb"]
    assert got["shape"] == [ROWS, DIM] and got["indices"] == [9, 0, 9]
    assert bitwise(tensor_from_json(got["values"]), start[[9, 0, 9]])
    # repeated rows= and a binary answer
    r = http.get(f"/v1/sessions/{sid}/params?name=emb&rows=3&rows=4,5",
                 headers={"accept": BINARY})
    tensors, meta = read_safetensors(bytearray(r.content))
    assert meta["version"] == "0" and tensors["emb.indices"].tolist() == [3, 4, 5]
    assert bitwise(tensors["emb.values"], start[3:6])
    # a long row list as a body, several parameters at once
    long_rows = list(range(ROWS))[::-1] * 3
    r = http.post(f"/v1/sessions/{sid}/params/rows",
                  json={"rows": {"emb": long_rows, "other": [2]}})
    assert r.status_code == 200, r.text
    idx, vals = rows_from_json(r.json()["params"]["emb"])
    assert idx == long_rows and bitwise(vals, start[long_rows])
    assert list(r.json()["params"]) == ["emb", "other"]
    r = http.post(f"/v1/sessions/{sid}/params/rows",
                  content=write_safetensors({"emb": torch.tensor(long_rows)}, None),
                  headers={"content-type": BINARY, "accept": BINARY})
    tensors, _ = read_safetensors(bytearray(r.content))
    assert bitwise(tensors["emb.values"], start[long_rows])
    # 304 while nothing changed; 200 with the new rows after a step
    for pull in (lambda h: http.get(f"/v1/sessions/{sid}/params?name=emb&rows=1", headers=h),
                 lambda h: http.post(f"/v1/sessions/{sid}/params/rows",
                                     json={"rows": {"emb": [1]}}, headers=h)):
        r = pull({"if-none-match": '"0"'})
        assert r.status_code == 304 and r.headers["etag"] == '"0"' and not r.content
    v = values_for([1], 0)
    r = http.post(f"/v1/sessions/{sid}/step?return=none",
                  json={"grads": {"emb": sparse_json([1], v)}})
    assert r.status_code == 200
    ref = start.clone()
    opt = torch.optim.SparseAdam([ref], lr=0.1)
    ref.grad = coo([1], v)
    opt.step()
    r = http.get(f"/v1/sessions/{sid}/params?name=emb&rows=1",
                 headers={"if-none-match": '"0"'})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert bitwise(tensor_from_json(r.json()["params"]["emb"]["values"]), ref.detach()[[1]])


def test_a_row_pull_answers_no_more_than_a_whole_pull_or_the_floor(http: httpx.Client
                                                                    ) -> None:
    """Rows may repeat, so a few bytes of row indices could ask for any number of bytes of
    rows: 8 KB of indices of a table with long rows made the server gather 100 MB, and a
    body or query of a few hundred KiB more than the memory it had. A pull's rows hold at most
    as many elements as the session's parameters (what a whole pull answers) or
    ``ROWS_FLOOR`` (2**24), whichever is more: one past it is a 422 ``rows_too_large`` with
    ``limit``, before anything is gathered; one at it is answered, as is a short table's rows
    asked many times over."""
    from app.engine.sparse import ROWS_FLOOR
    wide = 1 << 20  # a row of 1,048,576 elements; the table (2 rows) is smaller than the floor
    start = torch.randn(2, wide, generator=torch.Generator().manual_seed(3))
    r = http.post("/v1/sessions", content=write_safetensors({"emb": start}, {"optimizer": "SGD"}),
                  headers={"content-type": BINARY})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    at = ROWS_FLOOR // wide
    for pull in (lambda n: http.get(f"/v1/sessions/{sid}/params",
                                    params={"name": "emb", "rows": ",".join(["1"] * n)},
                                    headers={"accept": BINARY}),
                 lambda n: http.post(f"/v1/sessions/{sid}/params/rows",
                                     content=write_safetensors(
                                         {"emb": torch.ones(n, dtype=torch.int64)}, None),
                                     headers={"content-type": BINARY, "accept": BINARY})):
        r = pull(at + 1)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "rows_too_large" and problem["field"] == "rows"
        assert problem["limit"] == ROWS_FLOOR
        r = pull(at)
        assert r.status_code == 200, r.text
        tensors, _ = read_safetensors(bytearray(r.content))
        assert tensors["emb.indices"].tolist() == [1] * at
        assert bitwise(tensors["emb.values"], start[[1] * at])
    # a short table's rows asked many times over (a batch's tokens): answered
    small = table(7)
    sid = create(http, "SGD", {"lr": 0.1}, emb=small)
    many = [i % ROWS for i in range(20_000)]
    r = http.post(f"/v1/sessions/{sid}/params/rows",
                  content=write_safetensors({"emb": torch.tensor(many)}, None),
                  headers={"content-type": BINARY, "accept": BINARY})
    assert r.status_code == 200, r.text
    assert bitwise(read_safetensors(bytearray(r.content))[0]["emb.values"], small[many])


def test_row_pull_long_poll(http: httpx.Client) -> None:
    sid = create(http, "SGD", {"lr": 0.1}, emb=table())
    r = http.get(f"/v1/sessions/{sid}/params?name=emb&rows=1&min_version=1&wait_s=0.2")
    assert r.status_code == 200 and r.json()["version"] == 0  # timed out: the current rows
    r = http.post(f"/v1/sessions/{sid}/params/rows?min_version=1&wait_s=0.2",
                  json={"rows": {"emb": [1]}}, headers={"if-none-match": '"0"'})
    assert r.status_code == 304


@pytest.mark.parametrize(("query", "body", "code", "field"), [
    ({"name": "emb", "rows": "50"}, None, "index_out_of_range", "rows.emb"),
    ({"name": "emb", "rows": "-1"}, None, "index_out_of_range", "rows.emb"),
    ({"name": "emb", "rows": "1,x"}, None, "invalid_rows", "rows"),
    ({"name": "nope", "rows": "1"}, None, "unknown_parameter", "rows.nope"),
    ({"name": "s", "rows": "0"}, None, "invalid_rows", "rows.s"),
    ({"rows": "1"}, None, "invalid_rows", "name"),
    ({"names": "emb,s", "rows": "1"}, None, "invalid_rows", "name"),
    # a repeated name, or one beside names: the last was pulled, the others dropped unsaid
    # (repeated: invalid_query, as any query parameter that takes one value given twice)
    ([("name", "emb"), ("name", "s"), ("rows", "0")], None, "invalid_query", "name"),
    ([("name", "emb"), ("names", "s"), ("rows", "0")], None, "invalid_rows", "name"),
    # a name without rows answered no rows (the whole parameter is ?names=emb); an empty name
    # was looked up as a parameter "" (unknown_parameter naming "rows."); names naming nothing
    ({"name": "emb"}, None, "invalid_rows", "rows"),
    ([("name", "emb"), ("min_version", "0")], None, "invalid_rows", "rows"),
    ({"name": "", "rows": "1"}, None, "invalid_query", "name"),
    ({"name": ""}, None, "invalid_query", "name"),
    ({"names": ",", "rows": "1"}, None, "invalid_query", "names"),
    # indices that are not integers: invalid_rows as in the GET form (was invalid_sparse)
    (None, {"rows": {"emb": [1.5]}}, "invalid_rows", "rows.emb"),
    (None, {"rows": {"emb": [1, True]}}, "invalid_rows", "rows.emb"),
    (None, {"rows": {"emb": "1,2"}}, "invalid_rows", "rows.emb"),
    (None, {"rows": {"emb": {"dtype": "float32", "shape": [1], "data": [1.0]}}}, "invalid_rows",
     "rows.emb"),
    (None, {"rows": {"emb": {"dtype": "int64", "shape": [1, 1], "data": [1]}}}, "invalid_rows",
     "rows.emb"),
    (None, {"rows": {"emb": [2**63]}}, "index_out_of_range", "rows.emb"),
    (None, {"rows": [1, 2]}, "invalid_rows", "rows"),
    (None, {"rows": {}}, "invalid_rows", "rows"),
    (None, {"rows": {"emb": [1]}, "extra": 1}, "unknown_field", "extra"),
])
def test_bad_row_pulls(http: httpx.Client, query: dict[str, str] | list[tuple[str, str]] | None,
                       body: Any, code: str, field: str) -> None:
    sid = create(http, "SGD", {"lr": 0.1}, emb=table(), s=torch.tensor(2.0))
    if body is None:
        r = http.get(f"/v1/sessions/{sid}/params", params=query)
    else:
        r = http.post(f"/v1/sessions/{sid}/params/rows", json=body)
    problem(r, code, field)


def test_a_row_pull_of_no_rows_answers_the_parameter_with_none(http: httpx.Client) -> None:
    """``rows=`` given empty asks no rows, as a POST's ``[]`` does (the SDKs send an empty row
    list so): the parameter's dense shape with no indices, not a refusal; ``rows`` left out is
    the 422 of test_bad_row_pulls."""
    sid = create(http, "SGD", {"lr": 0.1}, emb=table())
    got = http.get(f"/v1/sessions/{sid}/params", params={"name": "emb", "rows": ""})
    posted = http.post(f"/v1/sessions/{sid}/params/rows", json={"rows": {"emb": []}})
    for r in (got, posted):
        assert r.status_code == 200, r.text
        emb = r.json()["params"]["emb"]
        assert emb["shape"] == list(table().shape) and emb["indices"] == []
        assert tensor_from_json(emb["values"]).shape == (0, DIM)


def test_sync_round_of_sparse_pushes(http: httpx.Client) -> None:
    """Parameter-server rounds reduce sparse pushes too (summed in worker order, then divided
    once): the step equals torch on the reduced gradient."""
    sid = f"emb-sync-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "Adagrad",
                                        "options": {"lr": 0.1},
                                        "params": {"emb": json_tensor(table(3))},
                                        "sync": {"workers": 2, "reduce": "mean"}})
    assert r.status_code == 201, r.text
    pushes = {"w1": ([1, 4], 0), "w2": ([4, 6, 6], 1)}
    import concurrent.futures

    def push(worker: str) -> httpx.Response:
        rows, seed = pushes[worker]
        return http.post(f"/v1/sessions/{sid}/step", headers={"x-optserve-worker": worker},
                         json={"grads": {"emb": sparse_json(rows, values_for(rows, seed))}})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(push, ["w1", "w2"]))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    ref = table(3)
    opt = torch.optim.Adagrad([ref], lr=0.1)
    g = coo(*pushes["w1"][:1], values_for(*pushes["w1"]))  # type: ignore[arg-type]
    g = g + coo(pushes["w2"][0], values_for(*pushes["w2"]))
    ref.grad = g / 2
    opt.step()
    assert bitwise(tensor_from_json(answers[0].json()["params"]["emb"]), ref.detach())


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_sparse_gradients_of_one_dimensional_parameters(http: httpx.Client,
                                                        optimizer: str) -> None:
    """Row-sparse gradients of 1-D parameters behind a 2-D one: torch adds a sparse tensor
    into a 1-D dense view that does not start its storage at the wrong place (or crashes), so
    the service must never lay such parameters out that way. Bitwise torch, and the table
    untouched by the vectors' updates."""
    params = {"table": table(7), "a": torch.randn(30, generator=torch.Generator().manual_seed(8)),
              "b": torch.randn(40, generator=torch.Generator().manual_seed(9))}
    sid = create(http, optimizer, OPTIMIZERS[optimizer], **params)
    local = {n: t.clone() for n, t in params.items()}
    opt_cls = getattr(torch.optim, optimizer)
    opt = opt_cls(list(local.values()), **{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in OPTIMIZERS[optimizer].items()})
    for step, rows in enumerate([[29, 0, 29], [5, 28, 11]]):
        vec = torch.randn(len(rows), generator=torch.Generator().manual_seed(200 + step))
        grads = {n: torch.sparse_coo_tensor(torch.tensor([rows]), vec, local[n].shape,
                                            check_invariants=False) for n in ("a", "b")}
        body = {n: {"dtype": "float32", "shape": list(local[n].shape), "indices": rows,
                    "values": json_tensor(vec)} for n in ("a", "b")}
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": body})
        assert r.status_code == 200, r.text
        for n, p in local.items():
            p.grad = grads.get(n)
        opt.step()
    got = tensors_from_json(http.get(f"/v1/sessions/{sid}/params").json()["params"])
    for n, t in local.items():
        assert bitwise(got[n], t), n
    assert bitwise(got["table"], params["table"])  # never stepped: exactly as created


def test_float16_sparse_sums_torch_refuses_are_422s(http: httpx.Client) -> None:
    """torch has no sum of two float16 row-sparse tensors on a CPU ("cadd_sparse" not
    implemented for 'Half'): a second sparse push, or a sparse step onto a sparse push, of a
    float16 table was a 500 (``internal_error``). Now a 422 ``sparse_unsupported`` naming the
    gradient, the session unchanged; the accumulated push still steps, as torch would."""
    half = table(11).half()
    sid = create(http, "SGD", {"lr": 0.1}, emb=half)
    pushed = values_for([1, 2], 0).half()
    body = {"emb": {**sparse_json([1, 2], pushed), "dtype": "float16"}}
    assert http.post(f"/v1/sessions/{sid}/grads", json={"grads": body}).status_code == 200
    before = snapshot(http, sid)
    again = {"emb": {**sparse_json([2, 3], values_for([2, 3], 1).half()), "dtype": "float16"}}
    for path in ("grads", "step"):
        r = http.post(f"/v1/sessions/{sid}/{path}", json={"grads": again})
        problem(r, "sparse_unsupported", "grads.emb")
        assert_unchanged(http, sid, before)
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {}})
    assert r.status_code == 200, r.text
    ref = half.clone()
    opt = torch.optim.SGD([ref], lr=0.1)
    ref.grad = coo([1, 2], pushed)
    opt.step()
    assert bitwise(tensor_from_json(r.json()["params"]["emb"]), ref)


@pytest.mark.parametrize(("optimizer", "param_dtype", "wire_dtype", "fmt"), [
    ("SparseAdam", torch.float32, torch.bfloat16, "json"),
    ("Adagrad", torch.float64, torch.float16, "safetensors"),
    ("SGD", torch.float32, torch.float16, "safetensors"),
])
def test_narrow_sparse_gradients_are_widened_with_upcast(
        http: httpx.Client, optimizer: str, param_dtype: torch.dtype, wire_dtype: torch.dtype,
        fmt: str) -> None:
    """``?upcast=true`` widens the values of row-sparse gradients too (it was a 422 "no silent
    casts" even with the widening asked for: an embedding table, the largest gradient of a
    model, could not travel narrowed). A push and a step, each widened, equal torch on the
    widened gradients; without ``upcast`` refused, the session unchanged."""
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[wire_dtype]
    opts = OPTIMIZERS[optimizer]
    sid = create(http, optimizer, opts, emb=table(12).to(param_dtype))
    ref = table(12).to(param_dtype)
    opt = getattr(torch.optim, optimizer)(
        [ref], **{k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})

    def send(path: str, rows: list[int], v: torch.Tensor, query: str) -> httpx.Response:
        if fmt == "json":
            body = {"emb": {**sparse_json(rows, v), "dtype": name}}
            return http.post(f"/v1/sessions/{sid}/{path}{query}", json={"grads": body})
        return http.post(f"/v1/sessions/{sid}/{path}{query}", content=sparse_st("emb", rows, v),
                         headers={"content-type": BINARY})

    before = snapshot(http, sid)
    for path in ("grads", "step"):
        narrow = values_for([1], 0).to(wire_dtype)
        problem(send(path, [1], narrow, ""), "dtype_mismatch", "grads.emb.values")
        assert_unchanged(http, sid, before)
    for k in range(3):
        pushed, stepped = values_for([4, 1, 4], k).to(wire_dtype), values_for([0], k).to(
            wire_dtype)
        assert send("grads", [4, 1, 4], pushed, "?upcast=true").status_code == 200
        r = send("step", [0], stepped, "?upcast=true&return=touched")
        assert r.status_code == 200, r.text
        assert r.json()["params"]["emb"]["indices"] == [0, 1, 4]
        ref.grad = coo([4, 1, 4], pushed).to(param_dtype) + coo([0], stepped).to(param_dtype)
        opt.step()
    got = snapshot(http, sid)
    assert bitwise(got["params"]["emb"], ref)
    for key, value in opt.state_dict()["state"].get(0, {}).items():  # (SGD keeps none)
        mine = got["state"]["state"]["0"][key]
        assert (bitwise(tensor_from_json(mine), value) if isinstance(value, torch.Tensor)
                else mine == value), key


def test_upcast_never_narrows_nor_crosses_sparse_values(http: httpx.Client) -> None:
    """``upcast`` widens to float32/float64 only: bfloat16 values for a float16 table, or
    float32 values for a bfloat16 one, stay 422 ``dtype_mismatch``."""
    for param_dtype, sent in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        sid = create(http, "SGD", {"lr": 0.1}, emb=table(13).to(param_dtype))
        body = sparse_st("emb", [1], values_for([1], 0).to(sent))
        r = http.post(f"/v1/sessions/{sid}/step?upcast=true", content=body,
                      headers={"content-type": BINARY})
        problem(r, "dtype_mismatch", "grads.emb.values")
