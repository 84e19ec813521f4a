"""Tensors and trees of values to and from the wire (no HTTP here).

In: ``torch.Tensor`` (any device; detached and copied to the CPU), ``numpy.ndarray``, or plain
(nested) Python numbers, which become float32 / int64 / bool as ``torch.tensor`` would make them.
Out: ``torch.Tensor`` on the CPU when torch is importable, else ``numpy.ndarray`` (bfloat16 then
raises, numpy having no such dtype).

JSON tensors are ``{"dtype", "shape", "data": [flat]}`` (non-finite values as the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"``) or ``{"dtype", "shape", "b64"}``. Inside trees
(options, state dicts) tuples become lists, non-finite floats ``{"$float": "inf"|"-inf"|"nan"}``
and, in safetensors bodies, tensors ``{"$tensor": key}``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from . import _safetensors
from ._constants import TORCH_HINT
from ._json import json_dumps
from ._safetensors import DTYPES, WireTensor


class _LazyTorch:
    """``torch``, imported the first time something of it is used: the SDK (and the CLI)
    start in a fraction of a second when no tensor needs torch."""

    def __getattr__(self, name: str) -> Any:
        import torch as module

        return getattr(module, name)


# Only the presence of torch is checked here; importing it waits for first use.
torch: Any = _LazyTorch() if importlib.util.find_spec("torch") is not None else None


def _torch_loaded() -> Any:
    """The torch module if something already imported it (a tensor from it can exist only
    then), else None; never imports it."""
    return sys.modules.get("torch")

if TYPE_CHECKING:
    import torch as _torch_t

    TensorLike: TypeAlias = "_torch_t.Tensor | npt.NDArray[Any] | list[Any] | float | int | bool"
else:
    TensorLike = Any

#: What the SDK returns for a tensor: ``torch.Tensor`` when torch is importable, else
#: ``numpy.ndarray``.
Tensor: TypeAlias = Any

HAS_TORCH = torch is not None
#: Return torch tensors (True) or numpy arrays (False). Tests flip it to exercise numpy.
USE_TORCH = HAS_TORCH

STATE_METADATA_KEY = "optserve_state"

_NUMPY: dict[str, str] = {
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "u1",
    "bool": "?",
}
_NUMPY_NAMES: dict[tuple[str, int], str] = {
    ("f", 2): "float16",
    ("f", 4): "float32",
    ("f", 8): "float64",
    ("i", 1): "int8",
    ("i", 2): "int16",
    ("i", 4): "int32",
    ("i", 8): "int64",
    ("u", 1): "uint8",
    ("b", 1): "bool",
}
FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT_TAGS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_JSON_TENSOR_KEYS = frozenset({"dtype", "shape", "data", "b64"})


def _torch_dtypes() -> dict[str, Any]:
    assert torch is not None
    return {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
        "int8": torch.int8,
        "int16": torch.int16,
        "int32": torch.int32,
        "int64": torch.int64,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }


_torch_dtypes = functools.cache(_torch_dtypes)


@functools.cache
def _torch_names() -> dict[Any, str]:
    """torch dtype -> wire name."""
    return {v: k for k, v in _torch_dtypes().items()}


def is_torch_tensor(x: object) -> bool:
    loaded = _torch_loaded()
    return loaded is not None and isinstance(x, loaded.Tensor)


def is_tensor(x: object) -> bool:
    """A torch tensor or a numpy array (what trees carry as tensors)."""
    return isinstance(x, np.ndarray) or is_torch_tensor(x)


# --------------------------------------------------------------------------- to the wire
def to_wire(x: TensorLike, what: str = "tensor") -> WireTensor:
    """Any accepted tensor input to a :class:`WireTensor` (C order, little-endian)."""
    loaded = _torch_loaded()
    if loaded is not None and isinstance(x, loaded.Tensor):
        return _from_torch(x, what, loaded)
    if isinstance(x, np.ndarray):
        return _from_numpy(x, what)
    if isinstance(x, np.generic):
        return _from_numpy(np.asarray(x), what)
    if isinstance(x, (list, tuple, float, int, bool)):
        arr = np.asarray(x)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        elif arr.dtype.kind != "b":
            raise TypeError(f"{what}: a list of numbers was expected, got {arr.dtype} values")
        return _from_numpy(arr, what)
    raise TypeError(
        f"{what}: expected a torch.Tensor, numpy.ndarray or (nested) list of numbers, "
        f"got {type(x).__name__}"
    )


def _from_torch(t: Any, what: str, module: Any) -> WireTensor:
    """``module``: torch itself (its attributes read directly, not through the lazy proxy:
    a model of 1,000 tensors sends 1,000 of these per step)."""
    if t.layout != module.strided:
        raise TypeError(f"{what}: only dense (strided) tensors can be sent, got {t.layout}")
    name = _torch_names().get(t.dtype)
    if name is None:
        raise TypeError(f"{what}: dtype {t.dtype} cannot be sent; one of {sorted(DTYPES)}")
    t = t.detach()
    if t.device.type != "cpu":
        if t.device.type == "meta":
            raise ValueError(
                f"{what}: a tensor on the meta device has no values to send; materialize it "
                "first (module.to_empty(device=...) and initialize it)")
        t = t.cpu()
    if t.is_conj() or t.is_neg() or not t.is_contiguous():
        t = t.resolve_conj().resolve_neg().contiguous()
    shape = tuple(t.shape)  # (torch.Size holds ints)
    if t.numel() == 0:
        return WireTensor(name, shape, memoryview(b""))
    if name == "bfloat16":  # numpy has no bfloat16: its bits as bytes (a view of the same
        # element size, which takes any strides: one element may have any, contiguous or not)
        t = t.view(module.int16)
    try:
        values = t.numpy()
    except RuntimeError as exc:
        if type(t) is module.Tensor:
            raise
        # a wrapper subclass with no storage of its own: a DTensor (FSDP2's fully_shard,
        # tensor parallelism) holds one process's shard of a tensor sharded over several
        raise TypeError(
            f"{what}: a {type(t).__name__} cannot be sent, only a plain tensor (a DTensor, as "
            "FSDP2's fully_shard and tensor parallelism make, is one process's shard of a "
            "tensor sharded over several; RemoteOptimizer does not take them)") from exc
    return WireTensor(name, shape, values.data.cast("B"))


def _from_numpy(a: npt.NDArray[Any], what: str) -> WireTensor:
    name = _NUMPY_NAMES.get((a.dtype.kind, a.dtype.itemsize))
    if name is None:
        raise TypeError(f"{what}: numpy dtype {a.dtype} cannot be sent; one of {sorted(_NUMPY)}")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    shape = tuple(int(d) for d in a.shape)
    a = np.ascontiguousarray(a)  # (makes a 0-d array 1-d: the shape is taken before)
    return WireTensor(name, shape, a.reshape(-1).view(np.uint8).data)


def _bf16_to_f32(data: memoryview) -> npt.NDArray[np.float32]:
    bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def _f32_to_bf16(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """Round float32 values to bfloat16 bit patterns (nearest, ties to even; NaN stays NaN)."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16).astype(np.uint16)) | np.uint16(0x0040)
    return rounded


def wire_values(w: WireTensor) -> npt.NDArray[Any]:
    """The flat values as a numpy array (bfloat16 widened to float32)."""
    if w.dtype == "bfloat16":
        return _bf16_to_f32(w.data)
    return np.frombuffer(w.data, dtype=_NUMPY[w.dtype])


def encode_json_tensor(
    w: WireTensor, *, b64: bool = False, as_numpy: bool = False
) -> dict[str, Any]:
    """A :class:`WireTensor` to a JSON tensor object. ``as_numpy`` leaves finite ``data`` as
    a numpy array for :func:`json_dumps` to write directly (no Python list in between)."""
    out: dict[str, Any] = {"dtype": w.dtype, "shape": list(w.shape)}
    if b64:
        out["b64"] = base64.b64encode(w.data).decode("ascii")
        return out
    values = wire_values(w)
    if w.dtype in FLOATING and not bool(np.isfinite(values).all()):
        out["data"] = [
            x if math.isfinite(x) else ("NaN" if math.isnan(x) else
                                        ("Infinity" if x > 0 else "-Infinity"))
            for x in values.tolist()
        ]
    else:
        out["data"] = values if as_numpy else values.tolist()
    return out


# --------------------------------------------------------------------------- from the wire
def is_json_tensor(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and "dtype" in obj
        and "shape" in obj
        and ("data" in obj or "b64" in obj)
        and obj.keys() <= _JSON_TENSOR_KEYS
    )


def decode_json_tensor(obj: object) -> WireTensor:
    """A JSON tensor object to a :class:`WireTensor`. Raises ``ValueError``."""
    if not is_json_tensor(obj):
        raise ValueError(f"not a JSON tensor: {str(obj)[:80]}")
    assert isinstance(obj, dict)
    dtype, shape = obj["dtype"], obj["shape"]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    numel = math.prod(shape)
    if "b64" in obj:
        try:
            raw = base64.b64decode(obj["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ValueError("b64 is not valid base64") from None
        return WireTensor(dtype, tuple(shape), memoryview(bytearray(raw)))
    data = obj["data"]
    if not isinstance(data, list) or len(data) != numel:
        raise ValueError(f"data must be a flat list of {numel} values")
    if dtype in FLOATING and any(isinstance(x, str) for x in data):
        try:
            data = [_NONFINITE_IN[x] if isinstance(x, str) else x for x in data]
        except KeyError as exc:
            raise ValueError(f"unexpected string {exc.args[0]!r} in data") from None
    if dtype == "bfloat16":
        arr: npt.NDArray[Any] = _f32_to_bf16(np.array(data, dtype=np.float32))
    else:
        arr = np.array(data, dtype=_NUMPY[dtype])
    return WireTensor(dtype, tuple(shape), arr.reshape(-1).view(np.uint8).data)


def from_wire(w: WireTensor) -> Tensor:
    """A :class:`WireTensor` to a CPU ``torch.Tensor`` (or ``numpy.ndarray`` without torch)."""
    if USE_TORCH and torch is not None:
        dtype = _torch_dtypes()[w.dtype]
        if w.numel == 0:
            return torch.empty(w.shape, dtype=dtype)
        data: memoryview | bytearray = w.data
        if w.data.readonly:
            data = bytearray(w.data)
        return torch.frombuffer(data, dtype=dtype).reshape(w.shape)
    if w.dtype == "bfloat16":
        raise TypeError(
            "a bfloat16 tensor came back but numpy has no bfloat16: install torch "
            f"({TORCH_HINT})"
        )
    arr = np.frombuffer(w.data, dtype=_NUMPY[w.dtype])
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr.reshape(w.shape)


def tensors_from_safetensors(body: bytes | bytearray | memoryview
                             ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors body's tensors (as :func:`from_wire` makes them: views of one private
    buffer, or of ``body`` itself when it is a writable memoryview) and its metadata. With
    torch, each run of tensors of one dtype laid end to end is one ``torch.frombuffer`` split
    into its tensors by one torch call, not a ``frombuffer`` and a ``reshape`` each (1,000
    small tensors: 3.8 -> 1.0 ms); which runs there are is worked out once per header
    (:class:`_Runs`, kept with the parsed header: a model's answers all have the same one)."""
    if not (USE_TORCH and torch is not None):
        wires, metadata = _safetensors.loads(body)
        return {name: from_wire(w) for name, w in wires.items()}, metadata
    buf, header, start, metadata = _safetensors.parsed(body)
    runs = header.derived.get("runs")
    if runs is None:  # (the data's alignment, start % 8, is part of the header's key)
        runs = header.derived["runs"] = _Runs(header.entries, start)
    return runs.split(buf, start), metadata


class _Runs:
    """How a header's tensors come out of its buffer (:func:`tensors_from_safetensors`): runs
    of tensors of one dtype laid end to end (each one ``frombuffer`` split by one call), and
    the tensors that are copies of their own (empty, or not aligned to their element size,
    as ``loads`` makes them). Offsets from the data's start, which lies at ``start`` (or at
    another place of the same alignment modulo 8) in the buffer."""

    def __init__(self, entries: tuple[_safetensors.Entry, ...], start: int) -> None:
        #: the names in the header's order (the answer's order)
        self.names = tuple(name for name, *_ in entries)
        self.alone: list[_safetensors.Entry] = []
        #: (wire dtype, first byte, elements, each one's elements, names, shapes: None for a
        #: flat one, whose piece is its tensor as it is)
        self.runs: list[tuple[str, int, int, list[int], tuple[str, ...],
                              tuple[tuple[int, ...] | None, ...]]] = []
        run: list[_safetensors.Entry] = []
        for entry in sorted(entries, key=lambda e: e[3]):
            _name, dtype, _shape, begin, end = entry
            if begin == end or (start + begin) % _safetensors.DTYPES[dtype][1]:
                self.alone.append(entry)
                continue
            if run and (run[-1][1] != dtype or run[-1][4] != begin):
                self._add(run)
                run = []
            run.append(entry)
        if run:
            self._add(run)

    def _add(self, run: list[_safetensors.Entry]) -> None:
        itemsize = _safetensors.DTYPES[run[0][1]][1]
        begin = run[0][3]
        self.runs.append((run[0][1], begin, (run[-1][4] - begin) // itemsize,
                          [(end - start) // itemsize for _, _, _, start, end in run],
                          tuple(name for name, *_ in run),
                          tuple(None if len(shape) == 1 else shape for _, _, shape, _, _ in run)))

    def split(self, buf: bytearray | memoryview, start: int) -> dict[str, Tensor]:
        module = _torch_loaded() or torch
        dtypes = _torch_dtypes()
        out: dict[str, Tensor] = dict.fromkeys(self.names)
        for name, wire, dims, begin, end in self.alone:
            # a copy of its own, as loads makes
            data = memoryview(bytearray(memoryview(buf)[start + begin:start + end]))
            out[name] = from_wire(WireTensor.trusted(wire, dims, data))
        for wire, begin, count, sizes, names, shapes in self.runs:
            flat = module.frombuffer(buf, dtype=dtypes[wire], count=count,
                                     offset=start + begin)
            if len(names) == 1:
                out[names[0]] = flat if shapes[0] is None else flat.view(shapes[0])
                continue
            pieces = flat.split_with_sizes(sizes)
            for name, shape, piece in zip(names, shapes, pieces, strict=True):
                out[name] = piece if shape is None else piece.view(shape)
        return out


# --------------------------------------------------------------------------- tensor maps
def encode_tensor_map(tensors: Mapping[str, TensorLike], what: str) -> dict[str, WireTensor]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping of names to tensors, got "
                        f"{type(tensors).__name__}")
    for name in tensors:
        if not isinstance(name, str):
            raise TypeError(f"{what}: names must be strings, got {name!r}")
    return encode_dense(tensors, what)


def encode_dense(tensors: Mapping[str, TensorLike], what: str) -> dict[str, WireTensor]:
    """:func:`encode_tensor_map` of string-named tensors (row-sparse ones excluded), in their
    order."""
    out: dict[str, WireTensor] = {}
    small: list[tuple[str, Any]] = []
    loaded = _torch_loaded()
    # a plain tensor or parameter (a subclass may override anything: the general path)
    joinable = _joinable() if loaded is not None else ()
    strided = loaded.strided if loaded is not None else None
    for name, t in tensors.items():
        x: Any = t  # (a torch tensor where joinable)
        if type(x) in joinable and x.layout is strided and x.is_cpu \
                and x.numel() <= JOIN_MAX:
            small.append((name, t))
            out[name] = None  # type: ignore[assignment]  # (its place in the order)
        else:
            out[name] = to_wire(t, f"{what}[{name!r}]")
    if len(small) > 1:
        _join_small(small, out, loaded, what)
    elif small:
        name, t = small[0]
        out[name] = _from_torch(t, f"{what}[{name!r}]", loaded)
    return out


#: torch tensors of at most this many elements travel from one joined copy of them all
#: (per dtype), each tensor's bytes a view of it: a model of 1,000 small tensors is encoded
#: with a few torch calls instead of a dozen per tensor (6.9 -> 1.6 ms for 1,000 gradients of
#: 4 floats). Larger ones go from their own memory, uncopied.
JOIN_MAX = 1 << 14


@functools.cache
def _joinable() -> frozenset[type]:
    import torch as module

    return frozenset({module.Tensor, module.nn.Parameter})


def _join_small(small: list[tuple[str, Any]], out: dict[str, WireTensor], module: Any,
                what: str) -> None:
    """``out[name]`` for small dense CPU torch tensors: per dtype, one joined copy (a
    ``torch.cat`` of them all, which resolves conjugate and negative views and strides), each
    tensor's bytes a view of it. A dtype the wire has no name for takes the general path
    (its error)."""
    names = _torch_names()
    groups: dict[Any, list[tuple[str, Any]]] = {}
    for name, t in small:
        groups.setdefault(t.dtype, []).append((name, t))
    for dtype, members in groups.items():
        wire = names.get(dtype)
        if wire is None or len(members) == 1:
            for name, t in members:
                out[name] = _from_torch(t, f"{what}[{name!r}]", module)
            continue
        with module.no_grad():
            flat = module._C._nn.flatten_dense_tensors([t for _, t in members])
        # (all of them empty: a joined tensor whose strides no byte view takes)
        data = flat.view(module.uint8).numpy().data if flat.numel() else memoryview(b"")
        size = flat.element_size()
        offset = 0
        trusted = WireTensor.trusted
        for name, t in members:
            end = offset + t.numel() * size
            out[name] = trusted(wire, tuple(t.shape), data[offset:end])
            offset = end


def json_tensor_map(tensors: Mapping[str, WireTensor]) -> dict[str, Any]:
    """Request-body tensors: numpy ``data`` that :func:`json_dumps` writes directly."""
    return {name: encode_json_tensor(w, as_numpy=True) for name, w in tensors.items()}


def decode_json_tensor_map(obj: object) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise ValueError("expected an object of named tensors")
    return {str(name): from_wire(decode_json_tensor(t)) for name, t in obj.items()}


# --------------------------------------------------------------------------- trees
def _float_tag(x: float) -> dict[str, str]:
    return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def tree_to_wire(obj: Any, on_tensor: Callable[[WireTensor, str], Any], path: str = "") -> Any:
    """A tree of values and tensors to JSON values; ``on_tensor(w, dotted_path)`` encodes
    each tensor (as a JSON tensor or a ``{"$tensor": key}`` reference)."""
    if is_tensor(obj):
        return on_tensor(to_wire(obj, path or "tensor"), path)
    if isinstance(obj, Mapping):
        return {
            str(k): tree_to_wire(v, on_tensor, f"{path}.{k}" if path else str(k))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [
            tree_to_wire(v, on_tensor, f"{path}.{i}" if path else str(i))
            for i, v in enumerate(obj)
        ]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return _float_tag(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot send a {type(obj).__name__} (at {path or 'top level'!r})")


def tree_to_json(obj: Any) -> Any:
    """A tree to plain JSON values with tensors as JSON tensors."""
    return tree_to_wire(obj, lambda w, _path: encode_json_tensor(w))


def number_from_wire(x: Any) -> float:
    """A JSON number, or the service's ``{"$float": "inf"}`` encoding of a non-finite one."""
    if isinstance(x, dict) and x.keys() == {"$float"} and x["$float"] in _FLOAT_TAGS:
        return float(_FLOAT_TAGS[x["$float"]])
    return float(x)


def tree_from_wire(
    obj: Any,
    tensors: Mapping[str, Tensor] | None = None,
    referenced: set[str] | None = None,
) -> Any:
    """JSON values back to a tree: ``$float`` tags, JSON tensors and ``$tensor`` references
    (looked up in ``tensors``; their keys are added to ``referenced``) become values."""
    if isinstance(obj, dict):
        if obj.keys() == {"$float"} and obj["$float"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[obj["$float"]]
        if obj.keys() == {"$tensor"}:
            key = obj["$tensor"]
            if tensors is None or key not in tensors:
                raise ValueError(f"$tensor reference {key!r} names no tensor in the body")
            if referenced is not None:
                referenced.add(key)
            return tensors[key]
        if is_json_tensor(obj):
            return from_wire(decode_json_tensor(obj))
        return {k: tree_from_wire(v, tensors, referenced) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_from_wire(v, tensors, referenced) for v in obj]
    return obj


# --------------------------------------------------------------------------- state dicts
_NOT_OPTIONS = ("params", "param_names")


def _tupleize(v: Any) -> Any:
    """torch keeps pairs such as Adam's ``betas`` as tuples; JSON made them lists. An element
    may be ``None`` where torch's is (Adafactor's default ``eps`` is ``(None, 1e-3)``)."""
    numbers = [x for x in v if x is not None] if isinstance(v, list) else []
    if numbers and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return tuple(v)
    return v


def options_from_wire(options: Mapping[str, Any]) -> dict[str, Any]:
    """Decoded optimizer options as torch holds them (number lists back to tuples)."""
    return {
        k: (v if k in _NOT_OPTIONS else _tupleize(tree_from_wire(v))) for k, v in options.items()
    }


def state_dict_to_torch_format(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded state tree to torch's shape: integer state ids, tuple options."""
    out: dict[str, Any] = {}
    state = tree.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("state_dict.state must be an object")
    out["state"] = {(int(k) if isinstance(k, str) and k.isdigit() else k): v
                    for k, v in state.items()}
    groups = tree.get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("state_dict.param_groups must be a list of objects")
    out["param_groups"] = [
        {k: (v if k in _NOT_OPTIONS else _tupleize(v)) for k, v in g.items()} for g in groups
    ]
    for k, v in tree.items():
        if k not in out:
            out[k] = v
    return out


def encode_state_safetensors(state_dict: Mapping[str, Any]) -> bytes:
    """A torch-format state dict to a safetensors body: every tensor under its dotted path
    (``state.<id>.<key>``, ...), the rest as JSON in ``__metadata__["optserve_state"]`` with
    ``{"$tensor": path}`` where each tensor was."""
    tensors: dict[str, WireTensor] = {}

    def put(w: WireTensor, path: str) -> dict[str, str]:
        tensors[path] = w
        return {"$tensor": path}

    tree = tree_to_wire(state_dict, put)
    return _safetensors.dumps(tensors, {STATE_METADATA_KEY: json.dumps(tree, allow_nan=False)})


def decode_state_safetensors(body: bytes) -> dict[str, Any]:
    """A safetensors state body to a torch-format state dict. Raises ``ValueError``."""
    wires, metadata = _safetensors.loads(body)
    raw = metadata.get(STATE_METADATA_KEY)
    if raw is None:
        raise ValueError(f"safetensors state has no __metadata__[{STATE_METADATA_KEY!r}]")
    tensors = {k: from_wire(w) for k, w in wires.items()}
    referenced: set[str] = set()
    tree = tree_from_wire(json.loads(raw), tensors, referenced)
    if not isinstance(tree, dict):
        raise ValueError("optserve_state must be a JSON object")
    state = tree.setdefault("state", {})
    for key, t in tensors.items():
        if key in referenced:
            continue
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state":
            raise ValueError(f"tensor {key!r} is neither referenced nor a state.<id>.<key>")
        state.setdefault(parts[1], {})[parts[2]] = t
    return state_dict_to_torch_format(tree)


def encode_state_json(state_dict: Mapping[str, Any]) -> bytes:
    return json_dumps(tree_to_json(state_dict))


def decode_state_json(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError("a state dict must be a JSON object")
    tree = tree_from_wire(obj)
    assert isinstance(tree, dict)
    return state_dict_to_torch_format(tree)
