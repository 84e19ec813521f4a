"""Row-sparse tensors on the wire: a gradient for some rows of a parameter, or some rows of a
parameter pulled from the server.

- JSON: ``{"dtype": D, "shape": [rows, ...], "indices": [i, ...], "values": <JSON tensor of
  shape [n, ...]>}``. ``indices`` is a list of integers (or a JSON ``int64`` tensor of shape
  ``[n]``); ``shape`` (the dense shape) and ``dtype`` (the values' dtype) may be left out.
- safetensors: two entries, ``<name>.indices`` (``int64``, shape ``[n]``) and
  ``<name>.values`` (shape ``[n, ...]``). An integer ``.indices`` entry can never be a
  gradient of its own (gradients are floating), so the pair is unambiguous.

Decoding checks what can be checked without the session (indices non-negative, one per row of
values, rows fitting a given ``shape``) and builds a ``torch.sparse_coo_tensor`` with the
indices and values as sent (no coalescing: duplicate rows stay, as torch's own embedding
backward leaves them). Without a ``shape`` its row count is the smallest that holds the indices
(torch's own inference); the engine checks the rows against the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from app.errors import Invalid
from app.wire.dtypes import DTYPE_NAMES, TORCH_DTYPES
from app.wire.json_tensor import MAX_EXTENT, decode_json_tensor, encode_json_tensor, parse_shape

INDICES, VALUES = ".indices", ".values"
_KEYS = frozenset({"dtype", "shape", "indices", "values"})
MAX_INDICES = 1 << 31


def is_sparse_json(obj: object) -> bool:
    return isinstance(obj, dict) and "indices" in obj and "values" in obj


def indices_from_json(raw: object, field: str, code: str = "invalid_sparse",
                      what: str = "indices") -> torch.Tensor:
    """A list of integers or an int64 JSON tensor of shape ``[n]`` as an int64 tensor; else
    a 422 ``code`` (a sparse gradient's ``invalid_sparse``, a row pull's ``invalid_rows``)
    naming ``field``, saying what ``what`` must be."""
    if isinstance(raw, dict):
        t = decode_json_tensor(raw, field)
        if t.dtype != torch.int64 or t.dim() != 1:
            raise Invalid(f"{what} must be a list of integers or an int64 tensor of shape [n]",
                          code=code, field=field)
        return t
    if not isinstance(raw, list):
        raise Invalid(f"{what} must be a list of integers or an int64 tensor of shape [n]",
                      code=code, field=field)
    if len(raw) > MAX_INDICES or not all(type(i) is int for i in raw):
        raise Invalid(f"{what} must be a list of integers", code=code, field=field)
    try:
        return torch.from_numpy(np.array(raw, dtype=np.int64).reshape(-1))
    except OverflowError:
        raise Invalid("an index does not fit int64", code="index_out_of_range",
                      field=field) from None


def build(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | None,
          field: str) -> torch.Tensor:
    """A row-sparse tensor from checked parts (see the module docstring)."""
    if values.dim() == 0:
        raise Invalid("values must have one row per index: a tensor of shape [n, ...]",
                      code="invalid_sparse", field=f"{field}.values")
    if indices.shape[0] != values.shape[0]:
        raise Invalid(f"{indices.shape[0]} indices but {values.shape[0]} rows of values",
                      code="invalid_sparse", field=f"{field}.indices")
    low = int(indices.min()) if indices.numel() else 0
    high = int(indices.max()) if indices.numel() else -1
    if low < 0:
        raise Invalid(f"row index {low} is negative", code="index_out_of_range",
                      field=f"{field}.indices")
    if shape is None:
        shape = (high + 1, *values.shape[1:])
        # a shape as parse_shape bounds one given: an index near int64's top would overflow
        # torch's size (a TypeError, a 500) and far below it the strides
        if math.prod(max(d, 1) for d in shape) > MAX_EXTENT:
            raise Invalid(f"row index {high} is too large", code="index_out_of_range",
                          field=f"{field}.indices")
    else:
        if len(shape) != values.dim() or tuple(shape[1:]) != tuple(values.shape[1:]):
            raise Invalid(f"values of shape {list(values.shape)} are not rows of shape "
                          f"{list(shape)}", code="shape_mismatch", field=f"{field}.values")
        if high >= shape[0]:
            raise Invalid(f"row index {high} is out of range for shape {list(shape)}",
                          code="index_out_of_range", field=f"{field}.indices")
    return torch.sparse_coo_tensor(indices.reshape(1, -1), values, shape,
                                   check_invariants=False)


def decode_sparse_json(obj: dict[str, Any], field: str) -> torch.Tensor:
    extra = obj.keys() - _KEYS
    if extra:
        raise Invalid(f"unknown sparse tensor key(s) {sorted(extra)}; expected indices, values "
                      "and optionally dtype and shape", code="invalid_sparse", field=field)
    values = decode_json_tensor(obj["values"], f"{field}.values")
    dtype = obj.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str) or dtype not in TORCH_DTYPES:
            raise Invalid(f"unknown dtype {dtype!r:.40}", code="invalid_tensor",
                          field=f"{field}.dtype")
        if TORCH_DTYPES[dtype] != values.dtype:
            raise Invalid(f"dtype is {dtype} but the values are {DTYPE_NAMES[values.dtype]}",
                          code="dtype_mismatch", field=f"{field}.dtype")
    shape = parse_shape(obj["shape"], field) if "shape" in obj else None
    if shape is not None and len(shape) == 0:
        raise Invalid("a sparse tensor's shape has at least one dimension (its rows)",
                      code="invalid_sparse", field=f"{field}.shape")
    indices = indices_from_json(obj["indices"], f"{field}.indices")
    return build(indices, values, shape, field)


def pair_safetensors(tensors: dict[str, torch.Tensor], field: str) -> dict[str, torch.Tensor]:
    """safetensors entries with ``<name>.indices`` (integer) + ``<name>.values`` pairs merged
    into row-sparse tensors named ``<name>``."""
    pairs = [k[: -len(INDICES)] for k, t in tensors.items()
             if k.endswith(INDICES) and not t.is_floating_point() and t.dtype != torch.bool]
    if not pairs:
        return tensors
    out = dict(tensors)
    for name in pairs:
        where = f"{field}.{name}"
        idx = out.pop(name + INDICES)
        if name + VALUES not in out:
            raise Invalid(f"{name + INDICES!r:.80} has no {name + VALUES!r:.80} beside it (a "
                          "sparse tensor is the pair)", code="invalid_sparse", field=where)
        if name in out:
            raise Invalid(f"{name!r:.80} is sent both dense and sparse", code="invalid_sparse",
                          field=where)
        values = out.pop(name + VALUES)
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise Invalid("indices must be an int64 tensor of shape [n]", code="invalid_sparse",
                          field=f"{where}.indices")
        out[name] = build(idx, values, None, where)
    return out


def has_sparse(tensors: dict[str, torch.Tensor] | None) -> bool:
    return any(t.layout == torch.sparse_coo for t in (tensors or {}).values())


def encode_sparse_json(t: torch.Tensor, *, b64: bool = False) -> dict[str, Any]:
    """A row-sparse CPU tensor to its JSON form (indices as a list of integers)."""
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
            "indices": t._indices()[0].tolist(),
            "values": encode_json_tensor(t._values(), b64=b64)}


def encode_json(t: torch.Tensor, *, b64: bool = False) -> dict[str, Any]:
    """A dense or row-sparse CPU tensor to its JSON form."""
    if t.layout == torch.sparse_coo:
        return encode_sparse_json(t, b64=b64)
    return encode_json_tensor(t, b64=b64)


def split_for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense tensors as they are, row-sparse ones as their ``.indices`` / ``.values`` pair."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.layout == torch.sparse_coo:
            out[name + INDICES] = t._indices()[0].contiguous()
            out[name + VALUES] = t._values()
        else:
            out[name] = t
    return out
