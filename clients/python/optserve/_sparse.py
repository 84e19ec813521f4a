"""Row-sparse tensors on the wire (no HTTP here): gradients for some rows of a parameter (an
embedding table), and rows pulled from the server.

In: a ``torch.sparse_coo_tensor`` with one sparse dimension (what ``nn.Embedding(sparse=True)``
leaves in ``.grad``; sent as it is, indices in their order, duplicates kept) or a
:class:`RowSparse`. Out: a ``torch.sparse_coo_tensor`` when torch is importable, else a
:class:`RowSparse` of numpy arrays.

JSON: ``{"dtype", "shape", "indices": [...], "values": <JSON tensor>}``; safetensors: two
entries ``<name>.indices`` (int64 ``[n]``) and ``<name>.values``; in a safetensors answer
``__metadata__["sparse"]`` gives each sparse tensor's dense shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _tensors as T
from ._safetensors import WireTensor

INDICES, VALUES = ".indices", ".values"


@dataclass(frozen=True)
class RowSparse:
    """Some rows of a parameter: ``values[i]`` is row ``indices[i]`` of a tensor of ``shape``
    (what the SDK returns for sparse answers when torch is not installed; also accepted as a
    gradient)."""

    indices: npt.NDArray[np.int64]
    values: npt.NDArray[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SparseWire:
    indices: WireTensor
    values: WireTensor
    shape: tuple[int, ...]


def is_sparse(x: object) -> bool:
    if isinstance(x, RowSparse):
        return True
    loaded = T._torch_loaded()  # (torch itself: not the lazy proxy, once per tensor of a step)
    return loaded is not None and isinstance(x, loaded.Tensor) and x.layout != loaded.strided


def to_sparse_wire(x: Any, what: str) -> SparseWire:
    if isinstance(x, RowSparse):
        idx = np.ascontiguousarray(x.indices, dtype=np.int64).reshape(-1)
        return SparseWire(T.to_wire(idx, f"{what}.indices"), T.to_wire(x.values, f"{what}.values"),
                          tuple(x.shape))
    torch = T.torch
    if x.layout != torch.sparse_coo or x.sparse_dim() != 1:
        raise TypeError(f"{what}: only row-sparse COO tensors (one sparse dimension, as "
                        f"nn.Embedding(sparse=True) makes) can be sent, got {x.layout}")
    x = x.detach()
    return SparseWire(T.to_wire(x._indices()[0], f"{what}.indices"),
                      T.to_wire(x._values(), f"{what}.values"), tuple(int(d) for d in x.shape))


def encode_tensor_map(tensors: Mapping[str, Any], what: str
                      ) -> dict[str, WireTensor | SparseWire]:
    """Like :func:`optserve._tensors.encode_tensor_map`, row-sparse tensors included."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping of names to tensors, got "
                        f"{type(tensors).__name__}")
    out: dict[str, WireTensor | SparseWire] = {}
    dense: dict[str, Any] = {}
    loaded = T._torch_loaded()
    # (a plain dense tensor, the common case, with two checks: 1,000 gradients a step)
    plain = T._joinable() if loaded is not None else frozenset()
    strided = loaded.strided if loaded is not None else None
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: names must be strings, got {name!r}")
        if type(t) in plain and t.layout is strided:
            out[name] = dense[name] = t
        elif is_sparse(t):
            out[name] = to_sparse_wire(t, f"{what}[{name!r}]")
        else:
            out[name] = dense[name] = t  # (its place in the order; encoded below)
    if len(dense) == len(out):
        return dict(T.encode_dense(dense, what))
    out.update(T.encode_dense(dense, what))
    return out


def has_sparse(tensors: Mapping[str, Any]) -> bool:
    return any(isinstance(t, SparseWire) for t in tensors.values())


def json_map(tensors: Mapping[str, WireTensor | SparseWire]) -> dict[str, Any]:
    """Request-body JSON for dense and sparse tensors."""
    out: dict[str, Any] = {}
    for name, w in tensors.items():
        if isinstance(w, SparseWire):
            out[name] = {"dtype": w.values.dtype, "shape": list(w.shape),
                         "indices": T.wire_values(w.indices),
                         "values": T.encode_json_tensor(w.values, as_numpy=True)}
        else:
            out[name] = T.encode_json_tensor(w, as_numpy=True)
    return out


def safetensors_map(tensors: Mapping[str, WireTensor | SparseWire]) -> dict[str, WireTensor]:
    """Safetensors entries: sparse tensors as their ``.indices`` / ``.values`` pair."""
    out: dict[str, WireTensor] = {}
    for name, w in tensors.items():
        if isinstance(w, SparseWire):
            out[name + INDICES] = w.indices
            out[name + VALUES] = w.values
        else:
            out[name] = w
    return out


def from_rows(indices: WireTensor, values: WireTensor, shape: tuple[int, ...] | None) -> Any:
    """Rows from the wire: a ``torch.sparse_coo_tensor`` (or a :class:`RowSparse`)."""
    idx = T.wire_values(indices).astype(np.int64, copy=False)
    if shape is None:
        rows = int(idx.max()) + 1 if idx.size else 0
        shape = (rows, *values.shape[1:])
    if T.USE_TORCH and T.torch is not None:
        torch = T.torch
        return torch.sparse_coo_tensor(torch.from_numpy(np.array(idx)).reshape(1, -1),
                                       T.from_wire(values), tuple(shape),
                                       check_invariants=False)
    return RowSparse(np.array(idx), T.from_wire(values), tuple(shape))


def decode_json_map(obj: object) -> dict[str, Any]:
    """An answer's ``params``: dense and sparse JSON tensors."""
    if not isinstance(obj, dict):
        raise ValueError("expected an object of named tensors")
    out: dict[str, Any] = {}
    for name, t in obj.items():
        if isinstance(t, dict) and "indices" in t and "values" in t:
            indices = np.asarray(t["indices"], dtype=np.int64)
            wire = T.to_wire(indices, f"{name}.indices")
            shape = tuple(t["shape"]) if "shape" in t else None
            out[str(name)] = from_rows(wire, T.decode_json_tensor(t["values"]), shape)
        else:
            out[str(name)] = T.from_wire(T.decode_json_tensor(t))
    return out


def pair_wires(wires: Mapping[str, WireTensor], shapes: Any) -> dict[str, Any]:
    """An answer's safetensors entries: ``.indices`` / ``.values`` pairs to sparse tensors
    (their dense shapes from ``__metadata__["sparse"]``)."""
    if isinstance(shapes, str):
        shapes = json.loads(shapes)
    shapes = shapes if isinstance(shapes, dict) else {}
    out: dict[str, Any] = {}
    taken: set[str] = set()
    for key, w in wires.items():
        if key.endswith(INDICES) and w.dtype == "int64":
            name = key[: -len(INDICES)]
            if name + VALUES in wires:
                shape = shapes.get(name)
                out[name] = from_rows(w, wires[name + VALUES],
                                      tuple(shape) if shape is not None else None)
                taken.update((key, name + VALUES))
    for key, w in wires.items():
        if key not in taken:
            out[key] = T.from_wire(w)
    return out
