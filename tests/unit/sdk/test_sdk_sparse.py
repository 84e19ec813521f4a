"""The SDK's row-sparse codec and the request bodies of sparse steps, row pulls and LBFGS
evaluations (no server): what goes on the wire, and what comes back from it."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from optserve import _api, _sparse
from optserve import _safetensors as st
from optserve import _tensors as T


def coo(rows: list[int], values: torch.Tensor, n: int = 10) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, *values.shape[1:]),
                                   check_invariants=False)


def test_sparse_gradients_travel_as_sent() -> None:
    """Indices in their order, duplicates kept (as nn.Embedding(sparse=True) leaves them)."""
    g = coo([4, 1, 4], torch.arange(6.0).reshape(3, 2))
    call = _api.step("s", {"emb": g, "b": torch.ones(2)}, return_params="touched", binary=False)
    assert ("return", "touched") in call.params
    assert call.content is not None
    body = json.loads(call.content)
    assert body["grads"]["emb"] == {"dtype": "float32", "shape": [10, 2], "indices": [4, 1, 4],
                                    "values": {"dtype": "float32", "shape": [3, 2],
                                               "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}}
    assert body["grads"]["b"]["shape"] == [2]
    call = _api.step("s", {"emb": g}, return_params=True, binary=True)
    assert call.content is not None
    wires, _ = st.loads(bytes(call.content))
    assert set(wires) == {"emb.indices", "emb.values"}
    assert T.wire_values(wires["emb.indices"]).tolist() == [4, 1, 4]
    assert wires["emb.indices"].dtype == "int64"


def test_row_sparse_numpy_input_and_refusals() -> None:
    rs = _sparse.RowSparse(np.array([2, 0]), np.ones((2, 3), np.float32), (5, 3))
    call = _api.push_grads("s", {"emb": rs}, binary=False)
    assert call.content is not None
    assert json.loads(call.content)["grads"]["emb"]["indices"] == [2, 0]
    two_d = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1), (2, 2),
                                    check_invariants=False)
    with pytest.raises(TypeError, match="row-sparse"):
        _api.step("s", {"w": two_d}, return_params=True, binary=True)


def _response(content: bytes, ctype: str) -> httpx.Response:
    return httpx.Response(200, content=content, headers={"content-type": ctype,
                                                         "x-optserve-version": "3",
                                                         "x-optserve-step": "3"})


@pytest.mark.parametrize("use_torch", [True, False])
def test_sparse_answers_decode(monkeypatch: pytest.MonkeyPatch, use_torch: bool) -> None:
    monkeypatch.setattr(T, "USE_TORCH", use_torch)
    values = np.arange(4, dtype=np.float32).reshape(2, 2)
    body = {"version": 3, "step": 3, "lr": [0.1], "params": {"emb": {
        "dtype": "float32", "shape": [9, 2], "indices": [7, 1],
        "values": {"dtype": "float32", "shape": [2, 2], "data": values.reshape(-1).tolist()}},
        "b": {"dtype": "float32", "shape": [1], "data": [5.0]}}}
    binary = st.dumps({"emb.indices": T.to_wire(np.array([7, 1])), "emb.values":
                       T.to_wire(values), "b": T.to_wire(np.array([5.0], np.float32))},
                      {"version": "3", "step": "3", "lr": "[0.1]",
                       "sparse": json.dumps({"emb": [9, 2]})})
    for response in (_response(json.dumps(body).encode(), "application/json"),
                     _response(binary, "application/octet-stream")):
        result = _api.step("s", {}, return_params="touched", binary=False).parse(response)
        assert result.params is not None
        emb = result.params["emb"]
        if use_torch:
            assert emb.layout == torch.sparse_coo and tuple(emb.shape) == (9, 2)
            assert emb._indices()[0].tolist() == [7, 1]
            assert np.array_equal(emb._values().numpy(), values)
        else:
            assert isinstance(emb, _sparse.RowSparse) and emb.shape == (9, 2)
            assert emb.indices.tolist() == [7, 1] and np.array_equal(emb.values, values)


def test_row_pulls_use_the_query_or_a_body() -> None:
    call = _api.pull_rows("s", {"emb": [3, 1]}, binary=True)
    assert (call.method, call.path) == ("GET", "/v1/sessions/s/params")
    assert call.params[:2] == [("name", "emb"), ("rows", "3,1")]
    call = _api.pull_rows("s", {"emb": list(range(_api.ROWS_IN_QUERY + 1))}, binary=False)
    assert (call.method, call.path) == ("POST", "/v1/sessions/s/params/rows")
    assert call.content is not None and json.loads(call.content)["rows"]["emb"][-1] == 256
    call = _api.pull_rows("s", {"a": [1], "b": np.array([2])}, binary=True)
    assert call.method == "POST" and call.content is not None
    wires, _ = st.loads(bytes(call.content))
    assert T.wire_values(wires["b"]).tolist() == [2] and wires["a"].dtype == "int64"
    with pytest.raises(TypeError):
        _api.pull_rows("s", {"a": [1.5]}, binary=True)
    # an empty list asks no rows (it was a TypeError: numpy makes [] a float array), as an
    # empty int64 tensor does
    for no_rows in ([], (), torch.zeros(0, dtype=torch.int64)):
        call = _api.pull_rows("s", {"emb": no_rows}, binary=True)
        assert (call.method, call.params[:2]) == ("GET", [("name", "emb"), ("rows", "")])
    call = _api.pull_rows("s", {"a": [], "b": [2]}, binary=False)
    assert call.content is not None and json.loads(call.content)["rows"] == {"a": [], "b": [2]}


def test_evaluation_bodies() -> None:
    call = _api.open_evaluation_step("s", None, None, binary=True, timeout_s=5)
    assert call.content == b"" and ("timeout_s", "5.0") in call.params
    call = _api.evaluate("s", "ab.2", float("nan"), {"w": torch.ones(2)}, binary=False)
    assert call.idempotent and call.path == "/v1/sessions/s/step/ab.2"
    assert call.content is not None
    assert json.loads(call.content)["loss"] == "NaN"
    call = _api.evaluate("s", "ab.2", 0.1 + 0.2, {"w": torch.ones(2)}, binary=True)
    assert call.content is not None
    _, meta = st.loads(bytes(call.content))
    assert float(json.loads(meta["loss"])) == 0.1 + 0.2  # every bit of the float64
