"""JSON tensors (``app.wire.json_tensor``): every dtype round-trips bit for bit through real JSON
text, in ``data`` and ``b64`` form; malformed input is an ``Invalid`` naming the field."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from app.errors import Invalid, OptserveError
from app.wire.dtypes import TORCH_DTYPES
from app.wire.json_tensor import (
    MAX_EXTENT,
    decode_json_tensor,
    encode_json_tensor,
    is_json_tensor,
    parse_shape,
    tensor_values,
)

FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("int8", "int16", "int32", "int64", "uint8")


def sample(dtype_name: str) -> torch.Tensor:
    """Edge values of the dtype: extremes, zeros of both signs, subnormals, non-finite."""
    dtype = TORCH_DTYPES[dtype_name]
    if dtype_name == "bool":
        return torch.tensor([[True, False, True], [False, False, True]])
    if dtype_name in INTS:
        info = torch.iinfo(dtype)
        return torch.tensor([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype)
    info = torch.finfo(dtype)
    values = [info.max, -info.max, info.tiny, info.smallest_normal / 4, -0.0, 0.0, 1.0 / 3,
              info.eps, math.inf, -math.inf, math.nan, 2.5]
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(3, 4)


def through_json(obj: Any) -> Any:
    return orjson.loads(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else \
        t.contiguous().view(torch.int16).numpy().tobytes()


def assert_same(got: torch.Tensor, want: torch.Tensor, *, nan_payload: bool) -> None:
    """Bit for bit; with ``nan_payload=False`` a NaN only has to be a NaN (the words "NaN"
    carry no payload, and torch's own float->bfloat16 gives 0x7FC0 or 0xFFFF for NaN depending
    on whether the conversion is vectorized)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if nan_payload or not want.is_floating_point():
        assert bits(got) == bits(want)
        return
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert bits(got[~nan]) == bits(want[~nan])


@pytest.mark.parametrize("dtype_name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("b64", [False, True], ids=["data", "b64"])
def test_round_trip_every_dtype(dtype_name: str, b64: bool) -> None:
    t = sample(dtype_name)
    obj = through_json(encode_json_tensor(t, b64=b64))
    assert obj["dtype"] == dtype_name and obj["shape"] == list(t.shape)
    assert ("b64" in obj) == b64 and ("data" in obj) != b64
    assert_same(decode_json_tensor(obj, "t"), t, nan_payload=b64)


@pytest.mark.parametrize("dtype_name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [[], [0], [2, 0, 3], [1, 1, 1, 1]])
@pytest.mark.parametrize("b64", [False, True], ids=["data", "b64"])
def test_round_trip_scalars_and_empty(dtype_name: str, shape: list[int], b64: bool) -> None:
    dtype = TORCH_DTYPES[dtype_name]
    t = torch.ones(shape, dtype=dtype) if dtype_name != "bool" else torch.ones(shape).bool()
    obj = through_json(encode_json_tensor(t, b64=b64))
    assert_same(decode_json_tensor(obj, "t"), t, nan_payload=True)


def test_nonfinite_written_as_words() -> None:
    t = torch.tensor([1.5, math.nan, math.inf, -math.inf], dtype=torch.bfloat16)
    obj = through_json(encode_json_tensor(t))
    assert obj["data"] == [1.5, "NaN", "Infinity", "-Infinity"]
    assert obj == {"dtype": "bfloat16", "shape": [4], "data": [1.5, "NaN", "Infinity",
                                                              "-Infinity"]}
    # finite tensors go out as a numpy array (fast path), non-finite ones as a list
    assert isinstance(tensor_values(torch.ones(3)), np.ndarray)
    assert isinstance(tensor_values(t), list)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_finite_values_beside_a_nonfinite_one_keep_their_dtypes_text(dtype: torch.dtype
                                                                     ) -> None:
    """A tensor holding a NaN or an infinity writes its finite values as a finite tensor's
    are written (its own dtype's shortest text: a float32 0.1 is ``0.1``), not as float64
    text (``0.10000000149011612``, the same bits but not the same text, and longer)."""
    finite = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(dtype)
    mixed = torch.cat([finite, torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)])
    shown = orjson.dumps(encode_json_tensor(finite), option=orjson.OPT_SERIALIZE_NUMPY)
    words = orjson.dumps(encode_json_tensor(mixed), option=orjson.OPT_SERIALIZE_NUMPY)
    numbers = shown.split(b'"data":[')[1].rstrip(b"]}")
    assert words.split(b'"data":[')[1].rstrip(b"]}") == (
        numbers + b',"NaN","Infinity","-Infinity"')
    assert_same(decode_json_tensor(orjson.loads(words), "t"), mixed, nan_payload=False)


def test_known_values_and_layout() -> None:
    obj = {"dtype": "float32", "shape": [2, 3], "data": [1, 2, 3, 4.5, -5, 6]}
    t = decode_json_tensor(obj, "w")
    assert torch.equal(t, torch.tensor([[1.0, 2.0, 3.0], [4.5, -5.0, 6.0]]))
    raw = base64.b64encode(np.array([1, -2], dtype="<i8").tobytes()).decode()
    t = decode_json_tensor({"dtype": "int64", "shape": [2], "b64": raw}, "x")
    assert t.tolist() == [1, -2]
    # b64 of a non-contiguous tensor is its row-major values
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    enc = encode_json_tensor(base.t(), b64=True)
    assert decode_json_tensor(enc, "t").tolist() == base.t().tolist()
    assert encode_json_tensor(base.t())["data"].tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_decoded_tensor_owns_its_memory() -> None:
    raw = bytearray(np.arange(4, dtype=np.float32).tobytes())
    obj = {"dtype": "float32", "shape": [4], "b64": base64.b64encode(raw).decode()}
    a, b = decode_json_tensor(obj, "t"), decode_json_tensor(obj, "t")
    a.add_(1)  # writable, and not shared with another decode
    assert b.tolist() == [0.0, 1.0, 2.0, 3.0]
    data = [0.0, 1.0]
    c = decode_json_tensor({"dtype": "float64", "shape": [2], "data": data}, "t")
    c.mul_(3)
    assert data == [0.0, 1.0]


def test_float_values_rounded_to_dtype() -> None:
    t = decode_json_tensor({"dtype": "float16", "shape": [1], "data": [0.1]}, "t")
    assert bits(t) == bits(torch.tensor([0.1], dtype=torch.float16))
    t = decode_json_tensor({"dtype": "bfloat16", "shape": [1], "data": [0.1]}, "t")
    assert bits(t) == bits(torch.tensor([0.1], dtype=torch.bfloat16))


def test_is_json_tensor() -> None:
    assert is_json_tensor({"dtype": "float32", "shape": [], "data": [1]})
    assert is_json_tensor({"dtype": "float32", "shape": [], "b64": ""})
    assert not is_json_tensor({"dtype": "float32", "shape": []})
    assert not is_json_tensor({"dtype": "float32", "shape": [], "data": [1], "x": 0})
    assert not is_json_tensor([1, 2])
    assert not is_json_tensor({"lr": 0.1})


def test_parse_shape() -> None:
    assert parse_shape([], "t") == ()
    assert parse_shape([2, 0, 3], "t") == (2, 0, 3)
    assert parse_shape([1] * 32, "t") == (1,) * 32
    for bad in ([1] * 33, [True], [2.0], [-1], "23", None, [[2]], [0, MAX_EXTENT + 1],
                [0, 2**62, 4]):
        with pytest.raises(Invalid) as info:
            parse_shape(bad, "g.w")
        assert info.value.field == "g.w.shape"
        assert info.value.code == "invalid_tensor"


def _w(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"dtype": "float32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
    for k, v in over.items():
        if v is ...:
            obj.pop(k)
        else:
            obj[k] = v
    return obj


B64_8 = base64.b64encode(b"\0" * 8).decode()

MALFORMED: list[tuple[str, object, str]] = [
    ("not-an-object", [1.0, 2.0], "w"),
    ("null", None, "w"),
    ("extra-key", _w(device="cpu"), "w"),
    ("missing-dtype", _w(dtype=...), "w.dtype"),
    ("unknown-dtype", _w(dtype="float8"), "w.dtype"),
    ("dtype-not-string", _w(dtype=32), "w.dtype"),
    ("dtype-case", _w(dtype="Float32"), "w.dtype"),
    ("complex-dtype", _w(dtype="complex64"), "w.dtype"),
    ("missing-shape", _w(shape=...), "w.shape"),
    ("shape-not-list", _w(shape=4), "w.shape"),
    ("shape-negative", _w(shape=[-4]), "w.shape"),
    ("shape-float", _w(shape=[4.0]), "w.shape"),
    ("shape-bool", _w(shape=[True, 4]), "w.shape"),
    ("no-data-nor-b64", _w(data=...), "w"),
    ("data-and-b64", _w(b64=B64_8), "w"),
    ("data-too-short", _w(data=[1.0]), "w.data"),
    ("data-too-long", _w(data=[1.0] * 5), "w.data"),
    ("data-not-list", _w(data="1 2 3 4"), "w.data"),
    ("data-nested", _w(data=[[1.0, 2.0], [3.0, 4.0]]), "w.data"),
    ("data-nested-one", _w(data=[[1.0], 2.0, 3.0, 4.0]), "w.data"),
    ("data-string", _w(data=[1.0, "2", 3.0, 4.0]), "w.data"),
    ("data-lower-nan", _w(data=[1.0, "nan", 3.0, 4.0]), "w.data"),
    ("data-inf-word", _w(data=[1.0, "inf", 3.0, 4.0]), "w.data"),
    ("data-null", _w(data=[1.0, None, 3.0, 4.0]), "w.data"),
    ("data-bool", _w(data=[True, False, True, False]), "w.data"),
    ("data-mixed-bool", _w(data=[1.0, False, 3.0, 4.0]), "w.data"),
    ("data-object", _w(data=[{}, 1.0, 2.0, 3.0]), "w.data"),
    ("float32-overflow", _w(data=[1e39, 0.0, 0.0, 0.0]), "w.data"),
    ("float16-overflow", _w(dtype="float16", data=[70000.0, 0.0, 0.0, 0.0]), "w.data"),
    ("bfloat16-overflow", _w(dtype="bfloat16", data=[3.4e38, 0.0, 0.0, 0.0]), "w.data"),
    ("float64-huge-int", _w(dtype="float64", data=[10**400, 0, 0, 0]), "w.data"),
    ("int-gets-float", _w(dtype="int32", data=[1.5, 2, 3, 4]), "w.data"),
    ("int-gets-integral-float", _w(dtype="int64", data=[1.0, 2, 3, 4]), "w.data"),
    ("int-gets-nan-word", _w(dtype="int32", data=["NaN", 2, 3, 4]), "w.data"),
    ("int8-overflow", _w(dtype="int8", data=[128, 0, 0, 0]), "w.data"),
    ("uint8-negative", _w(dtype="uint8", data=[-1, 0, 0, 0]), "w.data"),
    ("int64-overflow", _w(dtype="int64", data=[2**63, 0, 0, 0]), "w.data"),
    ("bool-gets-ints", _w(dtype="bool", data=[1, 0, 1, 0]), "w.data"),
    ("b64-invalid", _w(data=..., b64="!!!!"), "w.b64"),
    ("b64-bad-padding", _w(data=..., b64="AAA"), "w.b64"),
    ("b64-whitespace", _w(data=..., b64="AAAA AAAA AAAA"), "w.b64"),
    ("b64-not-string", _w(data=..., b64=None), "w.b64"),
    ("b64-too-few-bytes", _w(data=..., b64=B64_8), "w.b64"),
    ("b64-too-many-bytes", _w(data=..., b64=base64.b64encode(b"\0" * 17).decode()), "w.b64"),
    ("empty-huge-shape", _w(shape=[0, 2**62, 4], data=[]), "w.shape"),
    ("empty-huge-shape-b64", _w(shape=[0, 2**70], data=..., b64=""), "w.shape"),
]


@pytest.mark.parametrize(("name", "obj", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_invalid(name: str, obj: object, field: str) -> None:
    with pytest.raises(Invalid) as info:
        decode_json_tensor(obj, "w")
    err = info.value
    assert err.field == field
    assert err.status == 422 and err.code == "invalid_tensor"
    assert err.detail and isinstance(err, OptserveError)


def test_nonfinite_words_accepted_for_floats_only() -> None:
    for dtype in FLOATS:
        t = decode_json_tensor({"dtype": dtype, "shape": [3], "data": ["NaN", "Infinity",
                                                                       "-Infinity"]}, "t")
        assert t.dtype == TORCH_DTYPES[dtype]
        assert math.isnan(t[0].item()) and t[1].item() == math.inf and t[2].item() == -math.inf
    for dtype in INTS + ("bool",):
        with pytest.raises(Invalid):
            decode_json_tensor({"dtype": dtype, "shape": [1], "data": ["NaN"]}, "t")


def _b64_cases() -> list[tuple[str, str | None]]:
    """A 300-byte float32 tensor's base64 (400 characters) as sent, and spoilt: each case is
    decoded in pieces of 8 characters (``B64_PIECE``), so a bad character lands in a middle
    piece, or padding ends a middle piece. None: valid."""
    good = base64.b64encode(bytes(range(256)) + bytes(44)).decode()
    return [
        ("whole", None),
        ("bad-char-in-a-middle-piece", good[:13] + "!" + good[14:]),
        ("padding-ending-a-middle-piece", good[:14] + "==" + good[16:]),
        ("newline-in-a-middle-piece", good[:20] + "\n" + good[21:]),
        ("non-ascii-in-a-middle-piece", good[:20] + "\u00e9" + good[21:]),
        ("padding-in-the-last-piece", good[:-2] + "=="),  # valid: 298 bytes, not 300
    ]


@pytest.mark.parametrize(("name", "spoilt"), _b64_cases(), ids=[c[0] for c in _b64_cases()])
def test_large_b64_is_decoded_in_pieces_as_b64decode_would(
        name: str, spoilt: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long ``b64`` text is decoded piece by piece into the tensor's one buffer (no whole
    ``bytes`` copied again): the same values as ``base64.b64decode``, and each text it refuses
    is refused (422 naming the field)."""
    from app.wire import json_tensor
    monkeypatch.setattr(json_tensor, "B64_PIECE", 8)
    raw = bytes(range(256)) + bytes(44)
    text = base64.b64encode(raw).decode() if spoilt is None else spoilt
    obj = {"dtype": "float32", "shape": [75], "b64": text}
    if spoilt is None:
        t = decode_json_tensor(obj, "w")
        assert t.numpy().tobytes() == raw
        t.add_(1)  # a writable buffer of its own
        return
    if name == "padding-in-the-last-piece":
        assert len(base64.b64decode(spoilt, validate=True)) == 298
    else:
        with pytest.raises(ValueError):  # the reference refuses it too (binascii.Error)
            base64.b64decode(spoilt, validate=True)
    with pytest.raises(Invalid) as info:
        decode_json_tensor(obj, "w")
    assert info.value.field == "w.b64" and info.value.status == 422
    assert ("holds 298 bytes" in info.value.detail) == (name == "padding-in-the-last-piece")


def test_padding_moved_inside_a_long_b64_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding moved from the end into a middle piece keeps the decoded length (299 bytes
    either way) but is not base64 that ``b64decode`` takes: refused."""
    from app.wire import json_tensor
    monkeypatch.setattr(json_tensor, "B64_PIECE", 8)
    good = base64.b64encode(bytes(range(256)) + bytes(43)).decode()
    assert good.endswith("=") and not good.endswith("==")
    moved = good[:15] + "=" + good[16:-1] + "A"
    with pytest.raises(ValueError):
        base64.b64decode(moved, validate=True)
    with pytest.raises(Invalid) as info:
        decode_json_tensor({"dtype": "uint8", "shape": [299], "b64": moved}, "w")
    assert info.value.field == "w.b64" and "not valid base64" in info.value.detail
    t = decode_json_tensor({"dtype": "uint8", "shape": [299], "b64": good}, "w")
    assert t.numpy().tobytes() == bytes(range(256)) + bytes(43)
