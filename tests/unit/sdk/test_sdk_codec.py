"""The SDK's tensor codecs: JSON tensors, safetensors bodies, value trees and state dicts."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from optserve import _safetensors as st
from optserve import _tensors as T
from optserve._safetensors import WireTensor

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ALL_DTYPES = [*FLOAT_DTYPES, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
              torch.bool]
NUMPY_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                np.uint8, np.bool_]


@pytest.fixture
def numpy_out(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Decode to numpy arrays, as the SDK does where torch is not installed."""
    monkeypatch.setattr(T, "USE_TORCH", False)
    yield


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def with_nonfinite(t: torch.Tensor) -> torch.Tensor:
    t = t.clone().reshape(-1)
    t[0], t[1], t[2] = math.nan, math.inf, -math.inf
    return t


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ua = a.contiguous().reshape(-1).view(torch.uint8)
    ub = b.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(ua, ub)


# --------------------------------------------------------------------------- torch in/out
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_torch_round_trip_through_wire(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(dtype, shape)
    w = T.to_wire(t)
    assert w.dtype == str(dtype).removeprefix("torch.")
    assert w.shape == shape
    back = T.from_wire(w)
    assert isinstance(back, torch.Tensor)
    assert bits_equal(back, t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("b64", [False, True])
def test_torch_json_tensor_round_trip(dtype: torch.dtype, b64: bool) -> None:
    t = sample(dtype, (3, 5))
    if dtype.is_floating_point:
        t = with_nonfinite(t).reshape(3, 5)
    obj = T.encode_json_tensor(T.to_wire(t), b64=b64)
    assert obj["dtype"] == str(dtype).removeprefix("torch.")
    assert obj["shape"] == [3, 5]
    # what travels is plain JSON (no NaN/Infinity literals)
    text = json.dumps(obj, allow_nan=False)
    back = T.from_wire(T.decode_json_tensor(json.loads(text)))
    if b64:
        assert bits_equal(back, t)
    else:
        assert back.dtype == t.dtype
        assert torch.equal(back.isnan(), t.isnan()) if dtype.is_floating_point else True
        assert torch.equal(back.nan_to_num(0.0), t.nan_to_num(0.0))


def test_json_data_is_plain_numbers_with_nonfinite_strings() -> None:
    t = torch.tensor([1.5, math.nan, math.inf, -math.inf, -0.0], dtype=torch.float32)
    obj = T.encode_json_tensor(T.to_wire(t))
    assert obj == {"dtype": "float32", "shape": [5],
                   "data": [1.5, "NaN", "Infinity", "-Infinity", -0.0]}
    assert T.encode_json_tensor(T.to_wire(torch.tensor([1, 2], dtype=torch.int64))) == {
        "dtype": "int64", "shape": [2], "data": [1, 2]}
    assert T.encode_json_tensor(T.to_wire(torch.tensor([True, False]))) == {
        "dtype": "bool", "shape": [2], "data": [True, False]}
    b = T.encode_json_tensor(T.to_wire(torch.tensor([1.0, 2.0])), b64=True)
    assert b == {"dtype": "float32", "shape": [2],
                 "b64": base64.b64encode(struct.pack("<2f", 1.0, 2.0)).decode()}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_json_data_is_exact_for_every_float_dtype(dtype: torch.dtype) -> None:
    """Decimal text in ``data`` carries every value of every float dtype bit for bit."""
    t = sample(dtype, (1000,), seed=3) / 7
    obj = json.loads(json.dumps(T.encode_json_tensor(T.to_wire(t))))
    back = T.from_wire(T.decode_json_tensor(obj))
    assert bits_equal(back, t)


def test_bfloat16_data_rounds_to_nearest_even() -> None:
    values = [1.0, 1.00390625, 1.005859375, 1.01171875, 3.0e38, -2.5, 1e-40]
    obj = {"dtype": "bfloat16", "shape": [len(values)], "data": values}
    back = T.from_wire(T.decode_json_tensor(obj))
    expected = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)
    assert bits_equal(back, expected)
    nan = T.from_wire(T.decode_json_tensor({"dtype": "bfloat16", "shape": [1], "data": ["NaN"]}))
    assert bool(nan.isnan().all())


def test_non_contiguous_and_grad_tensors_are_sent_by_value() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()
    assert not t.is_contiguous()
    assert torch.equal(T.from_wire(T.to_wire(t)), t)
    p = torch.nn.Parameter(torch.ones(2))
    w = T.to_wire(p * 2)
    assert torch.equal(T.from_wire(w), torch.tensor([2.0, 2.0]))
    with pytest.raises(TypeError, match="dense"):
        T.to_wire(torch.ones(2).to_sparse())
    with pytest.raises(TypeError, match="complex64"):
        T.to_wire(torch.ones(2, dtype=torch.complex64))


def test_decoded_tensors_are_writable_and_own_no_shared_response() -> None:
    body = st.dumps({"a": T.to_wire(torch.ones(3))})
    wires, _ = st.loads(body)
    t = T.from_wire(wires["a"])
    t.add_(1)  # no warning (filterwarnings=error), no error
    assert torch.equal(t, torch.full((3,), 2.0))


# --------------------------------------------------------------------------- numpy in/out
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_round_trip(dtype: Any, numpy_out: None) -> None:
    rng = np.random.default_rng(0)
    if dtype is np.bool_:
        a = rng.random((3, 4)) > 0.5
    elif np.issubdtype(dtype, np.floating):
        a = (rng.standard_normal((3, 4)) * 100).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, (3, 4), dtype=np.int64).astype(dtype)
    w = T.to_wire(a)
    assert w.dtype == np.dtype(dtype).name
    back = T.from_wire(w)
    assert isinstance(back, np.ndarray)
    assert back.dtype == a.dtype and back.shape == a.shape
    assert back.tobytes() == a.tobytes()
    for b64 in (False, True):
        obj = json.loads(json.dumps(T.encode_json_tensor(w, b64=b64)))
        again = T.from_wire(T.decode_json_tensor(obj))
        assert again.tobytes() == a.tobytes()
    back[...] = back  # writable


def test_numpy_big_endian_and_fortran_order(numpy_out: None) -> None:
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    back = T.from_wire(T.to_wire(a))
    assert back.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back, a)
    f = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    np.testing.assert_array_equal(T.from_wire(T.to_wire(f)), f)


def test_numpy_mode_refuses_bfloat16_with_a_clear_error(numpy_out: None) -> None:
    w = T.to_wire(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16.*torch"):
        T.from_wire(w)


def test_numpy_in_torch_out_and_back() -> None:
    a = np.array([[1.5, -2.0]], dtype=np.float32)
    t = T.from_wire(T.to_wire(a))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(a))


def test_plain_lists_become_torch_default_dtypes() -> None:
    assert T.to_wire([[1.0, 2.0], [3.0, 4.0]]).dtype == "float32"
    assert T.to_wire([1, 2]).dtype == "int64"
    assert T.to_wire([True]).dtype == "bool"
    w = T.to_wire(2.0)
    assert (w.dtype, w.shape) == ("float32", ())
    assert torch.equal(T.from_wire(T.to_wire([[1.0, 2.0]])), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError):
        T.to_wire(["a"])
    with pytest.raises(TypeError):
        T.to_wire(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- safetensors
def test_safetensors_written_here_loads_with_the_safetensors_package() -> None:
    tensors = {f"p{i}": sample(d, (2, 3), seed=i) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.empty(0, 4)
    body = st.dumps({k: T.to_wire(v) for k, v in tensors.items()}, {"version": "7"})
    loaded = safetensors.torch.load(body)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert bits_equal(loaded[k], v), k
    (n,) = struct.unpack("<Q", body[:8])
    assert n % 8 == 0
    assert json.loads(body[8 : 8 + n])["__metadata__"] == {"version": "7"}


def test_safetensors_from_the_package_loads_here() -> None:
    tensors = {f"p{i}": sample(d, (4, 3), seed=i) for i, d in enumerate(ALL_DTYPES)}
    body = safetensors.torch.save(tensors, metadata={"lr": "[0.1]"})
    wires, metadata = st.loads(body)
    assert metadata == {"lr": "[0.1]"}
    for k, v in tensors.items():
        assert bits_equal(T.from_wire(wires[k]), v), k


def test_safetensors_numpy_package_interop(numpy_out: None) -> None:
    arrays = {"a": np.arange(5, dtype=np.float32), "b": np.ones((2, 2), dtype=np.float16)}
    wires, _ = st.loads(safetensors.numpy.save(arrays))
    for k, a in arrays.items():
        np.testing.assert_array_equal(T.from_wire(wires[k]), a)
    back = safetensors.numpy.load(st.dumps({k: T.to_wire(a) for k, a in arrays.items()}))
    for k, a in arrays.items():
        np.testing.assert_array_equal(back[k], a)


def test_safetensors_empty_file() -> None:
    body = st.dumps({})
    assert st.loads(body) == ({}, {})
    assert safetensors.torch.load(body) == {}


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\x01", "shorter"),
        (struct.pack("<Q", 100) + b"{}", "claims"),
        (struct.pack("<Q", 2) + b"[]", "object"),
        (struct.pack("<Q", 3) + b"{x}", "JSON"),
        (struct.pack("<Q", 40) + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'[:40],
         "JSON"),
        (struct.pack("<Q", 56) + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  ',
         "data_offsets"),
        (struct.pack("<Q", 56) + b'{"a":{"dtype":"C64","shape":[2],"data_offsets":[0,8]}}  '
         + bytes(8), "dtype"),
        (struct.pack("<Q", 56) + b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}  '
         + bytes(8), "cannot hold"),
    ],
)
def test_safetensors_reader_rejects_malformed_bodies(body: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        st.loads(body)


def test_wire_tensor_checks_its_size() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        WireTensor("float32", (3,), memoryview(bytes(8)))
    with pytest.raises(ValueError, match="unsupported dtype"):
        WireTensor("complex64", (1,), memoryview(bytes(8)))


# --------------------------------------------------------------------------- trees and state dicts
def adam_state_dict() -> dict[str, Any]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    return opt.state_dict()


def assert_same_tree(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and bits_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a.keys(), b)
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def test_tree_encoding_of_options() -> None:
    tree = {"lr": 0.1, "betas": (0.9, 0.99), "max": math.inf, "min": -math.inf,
            "bad": math.nan, "n": np.int64(3), "flag": True, "none": None,
            "t": torch.tensor(0.5)}
    out = T.tree_to_json(tree)
    assert out == {"lr": 0.1, "betas": [0.9, 0.99], "max": {"$float": "inf"},
                   "min": {"$float": "-inf"}, "bad": {"$float": "nan"}, "n": 3, "flag": True,
                   "none": None, "t": {"dtype": "float32", "shape": [], "data": [0.5]}}
    back = T.options_from_wire(out)
    assert back["betas"] == (0.9, 0.99)
    assert back["max"] == math.inf and math.isnan(back["bad"])
    assert torch.equal(back["t"], torch.tensor(0.5))
    with pytest.raises(TypeError, match="set"):
        T.tree_to_json({"x": {1, 2}})


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
def test_state_dict_round_trip_keeps_torch_format(fmt: str) -> None:
    sd = adam_state_dict()
    if fmt == "json":
        back = T.decode_state_json(json.loads(T.encode_state_json(sd)))
    else:
        back = T.decode_state_safetensors(T.encode_state_safetensors(sd))
    assert_same_tree(sd, back)
    assert list(back["state"]) == [0, 1]
    assert back["param_groups"][0]["betas"] == (0.8, 0.95)
    # and a local optimizer takes it
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    opt = torch.optim.Adam(params)
    opt.load_state_dict(back)
    assert opt.param_groups[0]["lr"] == sd["param_groups"][0]["lr"]


def test_state_safetensors_layout() -> None:
    sd = adam_state_dict()
    wires, metadata = st.loads(T.encode_state_safetensors(sd))
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step",
            "state.1.exp_avg"} <= set(wires)
    skeleton = json.loads(metadata[T.STATE_METADATA_KEY])
    assert skeleton["state"]["0"]["exp_avg"] == {"$tensor": "state.0.exp_avg"}
    assert skeleton["param_groups"][0]["params"] == [0, 1]


def test_state_safetensors_accepts_unreferenced_state_tensors() -> None:
    """protocol.md: state tensors may sit at ``state.<id>.<key>`` with no ``$tensor`` ref."""
    skeleton = {"state": {"0": {"note": "x"}},
                "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99], "params": [0]}]}
    body = st.dumps({"state.0.exp_avg": T.to_wire(torch.ones(2)),
                     "state.0.step": T.to_wire(torch.tensor(3.0))},
                    {T.STATE_METADATA_KEY: json.dumps(skeleton)})
    sd = T.decode_state_safetensors(body)
    assert sd["state"][0]["note"] == "x"
    assert torch.equal(sd["state"][0]["exp_avg"], torch.ones(2))
    assert torch.equal(sd["state"][0]["step"], torch.tensor(3.0))
    assert sd["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]
    with pytest.raises(ValueError, match="neither referenced"):
        T.decode_state_safetensors(st.dumps({"stray": T.to_wire(torch.ones(1))},
                                            {T.STATE_METADATA_KEY: json.dumps(skeleton)}))
    with pytest.raises(ValueError, match="optserve_state"):
        T.decode_state_safetensors(st.dumps({}))
