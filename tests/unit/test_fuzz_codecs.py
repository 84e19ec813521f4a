"""Property tests: hostile input into the wire codecs raises only ``OptserveError`` subclasses
(which the HTTP layer maps to 4xx), never anything else, and what they accept is well-formed."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import OptserveError
from app.wire.dtypes import SAFETENSORS_NAMES, TORCH_DTYPES
from app.wire.json_tensor import decode_json_tensor, encode_json_tensor
from app.wire.safetensors_body import read_safetensors
from app.wire.tree import tree_from_json

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "", "float32"])
           | st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)

dtype_names = st.sampled_from(sorted(TORCH_DTYPES)) | st.text(max_size=8) | json_values
dims = st.integers(min_value=-2, max_value=5) | st.sampled_from([0, 2**31, 2**62, 2**64, 2**70])
shapes = st.lists(dims, max_size=4) | st.lists(st.just(1), min_size=30, max_size=40) | json_values
numbers = (st.integers(min_value=-(2**65), max_value=2**65) | st.floats()
           | st.sampled_from(["NaN", "Infinity", "-Infinity", True, None, [1.0], "x", 3.4e38,
                              -3.395e38, 65520.0, 1e-46, 2**63, -(2**63) - 1, 255, 256]))
datas = st.lists(numbers, max_size=12) | json_values
b64s = (st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
        | st.text(max_size=16) | json_values)


@st.composite
def tensor_like(draw: st.DrawFn) -> dict[str, Any]:
    """Objects that look like JSON tensors: each key present or not, each value odd or not."""
    obj: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        obj["dtype"] = draw(dtype_names)
    if draw(st.integers(0, 9)) > 0:
        obj["shape"] = draw(shapes)
    which = draw(st.sampled_from(["data", "b64", "both", "neither"]))
    if which in ("data", "both"):
        obj["data"] = draw(datas)
    if which in ("b64", "both"):
        obj["b64"] = draw(b64s)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=5))] = draw(scalars)
    return obj


@st.composite
def consistent_tensor(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON tensor whose data length matches its shape (values still anything numeric)."""
    dtype = draw(st.sampled_from(sorted(TORCH_DTYPES)))
    empty_but_huge = st.lists(st.sampled_from([1, 2, 2**31, 2**62, 2**70]), min_size=1,
                              max_size=3).map(lambda dims: [0, *dims])
    shape = draw(st.lists(st.integers(0, 3), max_size=3) | empty_but_huge)
    n = math.prod(shape)
    if draw(st.integers(0, 4)) == 0:
        itemsize = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
        return {"dtype": dtype, "shape": shape, "b64": base64.b64encode(raw).decode()}
    if dtype == "bool":
        data: list[Any] = draw(st.lists(st.booleans() | numbers, min_size=n, max_size=n))
    else:
        data = draw(st.lists(numbers, min_size=n, max_size=n))
    return {"dtype": dtype, "shape": shape, "data": data}


# --------------------------------------------------------------------------- JSON tensors

def _decode_or_optserve_error(obj: object) -> torch.Tensor | None:
    try:
        t = decode_json_tensor(obj, "t")
    except OptserveError as err:
        assert 400 <= err.status < 500 and err.detail
        assert err.field is not None and err.field.startswith("t")
        return None
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
    assert isinstance(obj, dict) and t.dtype == TORCH_DTYPES[obj["dtype"]]
    assert list(t.shape) == obj["shape"]
    return t


@FUZZ
@given(json_values)
def test_decode_json_tensor_any_value(obj: Any) -> None:
    _decode_or_optserve_error(obj)


@FUZZ
@given(tensor_like())
def test_decode_json_tensor_lookalikes(obj: dict[str, Any]) -> None:
    _decode_or_optserve_error(obj)


@FUZZ
@given(consistent_tensor())
def test_decode_json_tensor_values(obj: dict[str, Any]) -> None:
    t = _decode_or_optserve_error(obj)
    if t is not None and "data" in obj and all(
        type(x) in (int, float) and math.isfinite(x) for x in obj["data"]
    ):  # no silent overflow: finite numbers in, finite values out
        assert not t.is_floating_point() or bool(torch.isfinite(t).all())
    if t is not None:  # what is accepted encodes back to the same values
        again = decode_json_tensor(json.loads(json.dumps(_plain(encode_json_tensor(t)))), "t")
        assert torch.equal(torch.isnan(again), torch.isnan(t)) if t.is_floating_point() else True
        finite = ~torch.isnan(t) if t.is_floating_point() else torch.ones_like(t, dtype=torch.bool)
        assert torch.equal(again[finite], t[finite])


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    data = obj["data"]
    return {**obj, "data": data if isinstance(data, list) else data.tolist()}


# --------------------------------------------------------------------------- trees

tagged = (st.fixed_dictionaries({"$float": json_values | st.sampled_from(["inf", "-inf", "nan"])})
          | st.fixed_dictionaries({"$tensor": json_values | st.sampled_from(["a", "b"])}))
tree_values = st.recursive(
    scalars | tagged | tensor_like(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


@FUZZ
@given(tree_values, st.none() | st.just({"a": torch.zeros(2)}))
def test_tree_from_json_any_value(obj: Any, tensors: dict[str, torch.Tensor] | None) -> None:
    try:
        tree_from_json(obj, "state_dict", tensors)
    except OptserveError as err:
        assert err.status == 422 and err.field is not None


@FUZZ
@given(st.integers(min_value=60, max_value=3000))
def test_tree_from_json_deep(depth: int) -> None:
    obj: Any = 0
    for _ in range(depth):
        obj = {"k": [obj]}
    try:
        tree_from_json(obj, "state_dict")
    except OptserveError as err:
        assert err.code == "invalid_state"


# --------------------------------------------------------------------------- safetensors

def _read_or_optserve_error(buf: bytes) -> None:
    for candidate in (buf, bytearray(buf)):
        try:
            tensors, metadata = read_safetensors(candidate)
        except OptserveError as err:
            assert err.status in (400, 422) and err.field is not None
            continue
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        for t in tensors.values():
            assert isinstance(t, torch.Tensor)


@FUZZ
@given(st.binary(max_size=256))
def test_read_safetensors_arbitrary_bytes(buf: bytes) -> None:
    _read_or_optserve_error(buf)


st_dtypes = st.sampled_from(sorted(SAFETENSORS_NAMES)) | st.sampled_from(
    ["F8_E4M3", "C64", "f32", "", "BF16 "]) | json_values
st_entry = st.fixed_dictionaries(
    {"dtype": st_dtypes, "shape": shapes,
     "data_offsets": st.lists(st.integers(-4, 80) | st.sampled_from([2**64, 1.5]), max_size=3)
     | json_values},
) | json_values


@st.composite
def safetensors_like(draw: st.DrawFn) -> bytes:
    """Files with a JSON header of plausible (or not) entries and some data bytes; the header
    length sometimes lies."""
    header: Any = draw(st.dictionaries(st.text(max_size=4), st_entry, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | json_values)
    if draw(st.integers(0, 9)) == 0:
        header = draw(json_values)
    text = json.dumps(header).encode()
    data = draw(st.binary(max_size=80))
    n = len(text) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, 2**63]))
    return struct.pack("<Q", max(n, 0) % 2**64) + text + data


@FUZZ
@given(safetensors_like())
def test_read_safetensors_structured(buf: bytes) -> None:
    _read_or_optserve_error(buf)


@st.composite
def valid_then_mangled(draw: st.DrawFn) -> bytes:
    """A real file from the safetensors library with a few bytes changed or cut."""
    import safetensors.torch

    n = draw(st.integers(0, 3))
    tensors = {f"t{i}": torch.arange(draw(st.integers(0, 6)), dtype=torch.float32)
               for i in range(n)}
    blob = bytearray(safetensors.torch.save(tensors))
    for _ in range(draw(st.integers(0, 3))):
        if blob:
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(blob)))
    return bytes(blob[:cut] if draw(st.booleans()) else blob)


@FUZZ
@given(valid_then_mangled())
def test_read_safetensors_mangled(buf: bytes) -> None:
    _read_or_optserve_error(buf)


def _outcome(buf: bytes) -> Any:
    """What reading ``buf`` gives: its tensors (as bytes, dtype, shape) and metadata, or the
    error's class, code, field and detail."""
    try:
        tensors, metadata = read_safetensors(bytearray(buf))
    except OptserveError as err:
        return (type(err).__name__, err.code, err.field, err.detail)
    return ({n: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).tolist())
             for n, t in tensors.items()}, metadata)


@st.composite
def nearly_valid(draw: st.DrawFn) -> bytes:
    """Files of 1-D tensors of known dtypes laid end to end (the entries the fast path takes),
    one of them then nudged: a shape or an offset off by a little, another dtype, a shape or
    offset of another type, data bytes missing or left over."""
    names = draw(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=4,
                          unique=True))
    header: dict[str, Any] = {}
    pos = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_NAMES)))
        n = draw(st.integers(0, 5))
        size = n * TORCH_DTYPES[SAFETENSORS_NAMES[dtype]].itemsize
        header[name] = {"dtype": dtype, "shape": [n], "data_offsets": [pos, pos + size]}
        pos += size
    entry = header[draw(st.sampled_from(names))]
    nudge = draw(st.sampled_from(["none", "shape", "begin", "end", "dtype", "shape-type",
                                  "offset-type", "negative", "two-d"]))
    delta = draw(st.integers(-3, 3))
    if nudge == "shape":
        entry["shape"] = [entry["shape"][0] + delta]
    elif nudge == "begin":
        entry["data_offsets"][0] += delta
    elif nudge == "end":
        entry["data_offsets"][1] += delta
    elif nudge == "dtype":
        entry["dtype"] = draw(st.sampled_from(sorted(SAFETENSORS_NAMES)))
    elif nudge == "shape-type":
        entry["shape"] = [draw(st.sampled_from([True, 1.0, "1", None, 2**70]))]
    elif nudge == "offset-type":
        entry["data_offsets"][draw(st.integers(0, 1))] = draw(
            st.sampled_from([True, 0.0, "0", None, 2**70]))
    elif nudge == "negative":
        entry["shape"] = [-1 - abs(delta)]
    elif nudge == "two-d":
        entry["shape"] = [1, entry["shape"][0]]
    extra = draw(st.sampled_from([0, 0, 0, -1, 1, 4]))
    data = bytes(range(256))[: max(pos + extra, 0) % 256]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@FUZZ
@given(safetensors_like() | valid_then_mangled() | nearly_valid())
def test_the_header_fast_path_answers_as_the_full_checks(buf: bytes) -> None:
    """The common header entry is checked in a few operations (``_ST_DTYPES``); with that
    fast path off (no dtype known to it) every entry takes the full checks. Both must accept
    the same files with the same tensors, and refuse the same files with the same error.
    Kept headers are forgotten between the two reads."""
    from app.wire import safetensors_header

    safetensors_header.forget_headers()
    fast = _outcome(buf)
    safetensors_header.forget_headers()
    known = dict(safetensors_header._ST_DTYPES)
    safetensors_header._ST_DTYPES.clear()
    try:
        full = _outcome(buf)
    finally:
        safetensors_header._ST_DTYPES.update(known)
        safetensors_header.forget_headers()
    assert fast == full
