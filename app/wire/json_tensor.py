"""JSON tensors: ``{"dtype", "shape", "data": [flat]}`` or ``{"dtype", "shape", "b64"}``.

Decoding is strict: every malformed input raises :class:`app.errors.Invalid` naming the
field; nothing is ever cast silently.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from app.errors import Invalid, shown
from app.wire.dtypes import DTYPE_NAMES, MAX_DIMS, NUMPY_FOR_LIST, TORCH_DTYPES
from app.wire.tree_path import TreePath

_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_TENSOR_KEYS = frozenset({"dtype", "shape", "data", "b64"})
# Bound on the product of a shape's dimensions (zeros counted as ones): torch overflows computing
# strides for shapes such as [0, 2**62, 4] even though they hold no elements.
MAX_EXTENT = 2**48


def is_json_tensor(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and "dtype" in obj
        and "shape" in obj
        and ("data" in obj or "b64" in obj)
        and obj.keys() <= _TENSOR_KEYS
    )


def parse_shape(shape: object, field: str | TreePath) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise Invalid(f"shape must be a list of non-negative integers, got {shown(shape, 80)}",
                      code="invalid_tensor", field=f"{field}.shape")
    if len(shape) > MAX_DIMS:
        raise Invalid(f"shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed",
                      code="invalid_tensor", field=f"{field}.shape")
    for d in shape:
        if type(d) is not int or d < 0:
            raise Invalid("shape must be a list of non-negative integers, got "
                          f"{shown(shape, 80)}",
                          code="invalid_tensor", field=f"{field}.shape")
    if math.prod(max(d, 1) for d in shape) > MAX_EXTENT:
        raise Invalid(f"shape {shown(shape, 80)} is too large", code="invalid_tensor",
                      field=f"{field}.shape")
    return tuple(shape)


def _from_list(data: list[Any], dtype: str, numel: int, field: str | TreePath) -> np.ndarray:
    if len(data) != numel:
        raise Invalid(f"data has {len(data)} values but shape holds {numel}",
                      code="invalid_tensor", field=f"{field}.data")
    kinds = set(map(type, data))
    if dtype == "bool":
        if not kinds <= {bool}:
            raise Invalid("a bool tensor's data must be true/false values",
                          code="invalid_tensor", field=f"{field}.data")
        return np.array(data, dtype=np.bool_)
    if not kinds <= {float, int}:
        if bool in kinds:
            raise Invalid("data holds true/false where numbers are expected",
                          code="invalid_tensor", field=f"{field}.data")
        if kinds <= {float, int, str} and dtype in ("float16", "bfloat16", "float32", "float64"):
            converted = []
            for i, x in enumerate(data):
                if type(x) is str:
                    if x not in _NONFINITE_IN:
                        raise Invalid(f"data[{i}] is the string {x!r:.40}; only \"NaN\", "
                                      "\"Infinity\" and \"-Infinity\" stand for numbers",
                                      code="invalid_tensor", field=f"{field}.data")
                    converted.append(_NONFINITE_IN[x])
                else:
                    converted.append(x)
            data = converted
        else:
            bad = next(x for x in data if type(x) not in (float, int))
            raise Invalid(f"data must be a flat list of numbers; found {type(bad).__name__} "
                          f"{shown(bad, 40)}", code="invalid_tensor", field=f"{field}.data")
    try:
        with np.errstate(over="raise", invalid="raise"):
            arr = np.array(data, dtype=NUMPY_FOR_LIST[dtype])
    except (OverflowError, FloatingPointError, ValueError) as exc:
        raise Invalid(f"data does not fit dtype {dtype}: {exc}",
                      code="invalid_tensor", field=f"{field}.data") from None
    if dtype.startswith("int") or dtype == "uint8":
        if not kinds <= {int}:
            raise Invalid(f"an {dtype} tensor's data must be integers",
                          code="invalid_tensor", field=f"{field}.data")
    elif dtype != "bool" and not np.isfinite(arr).all():
        big = np.isinf(arr) & np.isfinite(np.array(data, dtype=np.float64))
        if big.any():
            raise Invalid(f"data holds values out of range for {dtype}",
                          code="invalid_tensor", field=f"{field}.data")
    return arr


def decode_json_tensor(obj: object, field: str | TreePath, *,
                       canonical: bool = True) -> torch.Tensor:
    """A JSON tensor object to a CPU tensor (owning its memory). ``canonical``: a ``b64`` text
    must be the one base64 text of its bytes (:func:`_canonical_b64`); what the service's own
    files hold (snapshots, logged records: options as requests gave them) is decoded with
    False, as servers before this check took it."""
    dtype, shape, numel = _tensor_form(obj, field)
    assert isinstance(obj, dict)  # (checked by _tensor_form)
    torch_dtype = TORCH_DTYPES[dtype]
    if "b64" in obj:
        raw = _b64_checked(obj["b64"], dtype, shape, numel, field, canonical)
        if numel == 0:
            return torch.empty(shape, dtype=torch_dtype)
        return torch.frombuffer(raw, dtype=torch_dtype).reshape(shape)
    arr = _from_list(_data_list(obj["data"], field), dtype, numel, field)
    return _in_range(torch.from_numpy(arr), dtype, field).reshape(shape)


def _tensor_form(obj: object, field: str | TreePath) -> tuple[str, tuple[int, ...], int]:
    """A JSON tensor's form checked (an object of known keys, a known dtype, a shape, exactly
    one of data or b64): its dtype's name, shape and number of elements."""
    if not isinstance(obj, dict):
        raise Invalid("a tensor must be an object {\"dtype\", \"shape\", \"data\" | \"b64\"}",
                      code="invalid_tensor", field=str(field))
    extra = obj.keys() - _TENSOR_KEYS
    if extra:
        raise Invalid(f"unknown tensor key(s) {sorted(extra)}; expected dtype, shape and "
                      "one of data/b64", code="invalid_tensor", field=str(field))
    dtype = obj.get("dtype")
    if not isinstance(dtype, str) or dtype not in TORCH_DTYPES:
        raise Invalid(f"unknown dtype {dtype!r:.40}; one of {sorted(TORCH_DTYPES)}",
                      code="invalid_tensor", field=f"{field}.dtype")
    if "shape" not in obj:
        raise Invalid("missing shape", code="invalid_tensor", field=f"{field}.shape")
    shape = parse_shape(obj["shape"], field)
    if ("data" in obj) == ("b64" in obj):
        raise Invalid("give exactly one of data or b64", code="invalid_tensor",
                      field=str(field))
    return dtype, shape, math.prod(shape)


def _b64_checked(text: object, dtype: str, shape: tuple[int, ...], numel: int,
                 field: str | TreePath, canonical: bool) -> bytearray:
    """A ``b64`` tensor's bytes, checked: a base64 string, of the bytes its shape of its dtype
    takes, canonical where asked."""
    if not isinstance(text, str):
        raise Invalid("b64 must be a base64 string", code="invalid_tensor",
                      field=f"{field}.b64")
    itemsize = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    raw = _b64_bytes(text, numel * itemsize, field)
    if len(raw) != numel * itemsize:
        raise Invalid(f"b64 holds {len(raw)} bytes but shape {list(shape)} of {dtype} needs "
                      f"{numel * itemsize}", code="invalid_tensor", field=f"{field}.b64")
    if canonical and not _canonical_b64(text, raw):
        raise Invalid(_NOT_CANONICAL, code="invalid_tensor", field=f"{field}.b64")
    return raw


def _data_list(data: object, field: str | TreePath) -> list[Any]:
    if not isinstance(data, list):
        raise Invalid("data must be a flat list of numbers", code="invalid_tensor",
                      field=f"{field}.data")
    return data


def _in_range(tensor: torch.Tensor, dtype: str, field: str | TreePath) -> torch.Tensor:
    """A ``data`` tensor (made as float32 for the half types, as torch makes a half of a
    Python float: double -> float -> half) in its dtype: values finite in float32 may still
    round past the half type's range."""
    torch_dtype = TORCH_DTYPES[dtype]
    if torch_dtype not in (torch.float16, torch.bfloat16):
        return tensor
    converted = tensor.to(torch_dtype)
    if bool((torch.isinf(converted) & torch.isfinite(tensor)).any()):
        raise Invalid(f"data holds values out of range for {dtype}",
                      code="invalid_tensor", field=f"{field}.data")
    return converted


def all_decode(named: Mapping[str, object], field: str) -> bool:
    """Whether :func:`decode_json_tensor` decodes every JSON tensor of ``named`` (each as
    ``<field>.<name>``, canonical), found without making them: each one's form and ``b64``
    checked as it checks them, and the ``data`` values of each dtype all at once by the same
    checks (each one looks at each value alone, so the values of several tensors pass them
    together exactly when each tensor's pass them). True only where every one decodes; False
    where one may not (decode them, in order, for the first one's problem)."""
    values: dict[str, list[Any]] = {}
    try:  # (a problem's words are not kept: ``field`` alone names where it is)
        for obj in named.values():
            dtype, shape, numel = _tensor_form(obj, field)
            assert isinstance(obj, dict)  # (checked by _tensor_form)
            if "b64" in obj:
                _b64_checked(obj["b64"], dtype, shape, numel, field, True)
                continue
            data = _data_list(obj["data"], field)
            if len(data) != numel:
                return False
            values.setdefault(dtype, []).extend(data)
        for dtype, data in values.items():
            arr = _from_list(data, dtype, len(data), field)
            _in_range(torch.from_numpy(arr), dtype, field)
    except Invalid:
        return False
    return True


#: base64 characters decoded at a time (a multiple of 4): a large tensor's bytes are decoded
#: piece by piece into their one buffer, not into a whole ``bytes`` and then copied
B64_PIECE = 1 << 22


def _b64_bytes(text: str, size: int, field: str | TreePath) -> bytearray:
    """The bytes of ``text`` (strict base64, as ``base64.b64decode(validate=True)`` takes it)
    in a new writable buffer. A text of the length ``size`` bytes take is decoded piece by
    piece into one buffer; any other whole (the caller's size check then refuses it)."""
    try:
        if len(text) <= B64_PIECE or len(text) != 4 * -(-size // 3):
            return bytearray(base64.b64decode(text, validate=True))
        out = bytearray(len(text) // 4 * 3)
        pos = 0
        for start in range(0, len(text), B64_PIECE):
            end = start + B64_PIECE
            if end < len(text) and text[end - 1] == "=":  # padding is the last piece's only
                raise ValueError("padding before the end")
            piece = binascii.a2b_base64(text[start:end], strict_mode=True)
            out[pos:pos + len(piece)] = piece
            pos += len(piece)
        del out[pos:]  # the padding's
        return out
    except (binascii.Error, ValueError):
        raise Invalid("b64 is not valid base64", code="invalid_tensor",
                      field=f"{field}.b64") from None


_NOT_CANONICAL = ("b64 is not canonical base64: padding past what its bytes need (exactly "
                  "4 * ceil(n / 3) characters for n bytes), or nonzero bits after its last "
                  "byte")


def _canonical_b64(text: str, raw: bytes | bytearray) -> bool:
    """Whether ``text`` (valid base64, decoded into ``raw``) is the one text base64 writes for
    those bytes: no padding past the last group (``AAAA====`` decodes as ``AAAA`` does), and
    zero bits after the last byte in a padded last group (``AB==`` decodes as ``AA==`` does).
    Checks the length and the last group only."""
    if len(text) != 4 * -(-len(raw) // 3):
        return False
    tail = len(raw) % 3
    return tail == 0 or text[-4:] == base64.b64encode(bytes(raw[-tail:])).decode("ascii")


def refuse_loose_b64(value: object, field: str) -> None:
    """422 ``invalid_tensor`` naming ``<path>.b64`` for the first JSON tensor in ``value`` (a
    request's options: objects and lists of them, a tensor ``lr``) whose ``b64`` is valid
    base64 but not canonical (:func:`_canonical_b64`). Only a request's options are checked
    so: the engine decodes them as logged records hold them too (servers before this check
    took such text), and leaves any other problem of a tensor to its decoder."""
    levels: list[Iterator[tuple[object, TreePath]]] = [iter([(value, TreePath(field))])]
    while levels:
        entry = next(levels[-1], None)
        if entry is None:
            levels.pop()
            continue
        item, path = entry
        if isinstance(item, dict):
            text = item.get("b64")
            if is_json_tensor(item) and isinstance(text, str):
                try:
                    raw = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    continue  # (not base64 at all: the decoder says so)
                if not _canonical_b64(text, raw):
                    raise Invalid(_NOT_CANONICAL, code="invalid_tensor", field=f"{path}.b64")
                continue
            levels.append(_children(item.items(), path))
        elif isinstance(item, list):
            levels.append(_children(enumerate(item), path))


def _children(items: Iterable[tuple[object, object]], at: TreePath
              ) -> Iterator[tuple[object, TreePath]]:
    """A node's items with their paths, made as the walk takes them (one level's at a time:
    no path string and no entry per item held at once)."""
    for k, v in items:
        yield v, at.child(k)


def tensor_values(t: torch.Tensor) -> Any:
    """The flat values of a CPU tensor, ready for orjson (numpy array when all finite)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.float()
    arr = flat.numpy()
    # numpy's check: torch's isfinite().all() costs ~40 us of dispatch per tensor at 1e3
    if flat.is_floating_point():
        finite = np.isfinite(arr)
        if not bool(finite.all()):
            # numpy scalars, not Python floats: orjson writes each in its own dtype's shortest
            # text, as it writes the array (a float32 0.1 stays "0.1", not 0.10000000149011612)
            values: list[Any] = list(arr)
            for i in np.flatnonzero(~finite).tolist():
                x = values[i]
                values[i] = "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
            return values
    return arr


def encode_json_tensor(t: torch.Tensor, *, b64: bool = False) -> dict[str, Any]:
    """A CPU tensor to a JSON tensor object (values as a numpy array orjson serializes)."""
    t = t.detach()
    out: dict[str, Any] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if b64:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out["b64"] = base64.b64encode(raw).decode("ascii")
    else:
        out["data"] = tensor_values(t)
    return out
