"""Helpers shared by the conformance tests: JSON tensors and state trees in optserve's wire
format, deterministic gradients, and in-process ``torch.optim`` reference runs.

Small and general on purpose: nothing here knows about a particular optimizer or scheduler.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ----------------------------------------------------------------------------- JSON tensors
def json_tensor(t: torch.Tensor, *, b64: bool = False) -> dict[str, Any]:
    """A tensor as optserve's JSON tensor (``data`` by default, raw bytes with ``b64``)."""
    t = t.detach().cpu().contiguous()
    out: dict[str, Any] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if b64:
        out["b64"] = base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode()
        return out
    flat = t.reshape(-1)
    values = (flat.float() if flat.dtype == torch.bfloat16 else flat).tolist()
    out["data"] = [v if not isinstance(v, float) or math.isfinite(v)
                   else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
                   for v in values]
    return out


def is_json_tensor(obj: object) -> bool:
    return isinstance(obj, dict) and {"dtype", "shape"} <= obj.keys() and (
        "data" in obj or "b64" in obj)


def tensor_from_json(obj: dict[str, Any]) -> torch.Tensor:
    dtype = DTYPES[obj["dtype"]]
    shape = list(obj["shape"])
    if "b64" in obj:
        raw = bytearray(base64.b64decode(obj["b64"]))
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()
    data = [_NONFINITE.get(v, v) if isinstance(v, str) else v for v in obj["data"]]
    if dtype == torch.bfloat16:
        return torch.tensor(data, dtype=torch.float32).to(dtype).reshape(shape)
    return torch.tensor(data, dtype=dtype).reshape(shape)


def tensors_from_json(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: tensor_from_json(t) for name, t in obj.items()}


# ----------------------------------------------------------------------------- state trees
def to_wire(obj: Any, *, b64: bool = False) -> Any:
    """A tree (options, state dict) to JSON: tensors as JSON tensors, tuples as lists,
    non-finite floats as ``{"$float": ...}``, keys as strings."""
    if isinstance(obj, torch.Tensor):
        return json_tensor(obj, b64=b64)
    if isinstance(obj, dict):
        return {str(k): to_wire(v, b64=b64) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_wire(v, b64=b64) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    return obj


def from_wire(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """JSON back to a tree (``{"$tensor": key}`` references resolved from ``tensors``)."""
    if isinstance(obj, dict):
        if obj.keys() == {"$float"}:
            return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[obj["$float"]]
        if obj.keys() == {"$tensor"}:
            assert tensors is not None
            return tensors[obj["$tensor"]]
        if is_json_tensor(obj):
            return tensor_from_json(obj)
        return {k: from_wire(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_wire(v, tensors) for v in obj]
    return obj


def torch_state_dict(tree: dict[str, Any]) -> dict[str, Any]:
    """A state dict decoded from the wire into what ``Optimizer.load_state_dict`` takes:
    integer state ids, tuples where the optimizer's defaults have tuples."""
    out = dict(tree)
    out["state"] = {int(k): v for k, v in tree.get("state", {}).items()}
    groups = []
    for g in tree["param_groups"]:
        groups.append({k: tuple(v) if isinstance(v, list) and k not in (
            "params", "param_names") else v for k, v in g.items()})
    out["param_groups"] = groups
    return out


def state_to_safetensors(sd: dict[str, Any]) -> bytes:
    """A state dict as optserve's binary state format: tensors keyed by their dotted path,
    the rest as JSON in ``__metadata__.optserve_state`` with ``{"$tensor": key}`` refs."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            # a copy: torch's state may share one tensor in two places (LBFGS's 't' is its
            # tensor lr), which safetensors refuses to write
            tensors[path] = obj.detach().cpu().clone().contiguous()
            return {"$tensor": path}
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return to_wire(obj)

    skeleton = walk(sd, "")
    return st_save(tensors, metadata={"optserve_state": json.dumps(skeleton)})


def state_from_safetensors(body: bytes) -> dict[str, Any]:
    """optserve's binary state format back to a torch state dict."""
    header_len = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + header_len])
    skeleton = json.loads(header["__metadata__"]["optserve_state"])
    return torch_state_dict(from_wire(skeleton, st_load(body)))


def torch_bytes(obj: Any) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def torch_load(body: bytes) -> Any:
    return torch.load(io.BytesIO(body), weights_only=True)


# ----------------------------------------------------------------------------- gradients
def grad_stream(shapes: dict[str, list[int]], seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless deterministic pseudo-random float32 gradients for these parameters."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield {n: torch.randn(s, generator=gen, dtype=torch.float32) for n, s in shapes.items()}


def make_params(shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float32) for n, s in shapes.items()}


def adam_after(params: dict[str, torch.Tensor], *grads: dict[str, torch.Tensor], lr: float
               ) -> dict[str, torch.Tensor]:
    """Copies of ``params`` after one in-process torch Adam step (at ``lr``) per gradient."""
    local = {n: t.clone() for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=lr)
    for g in grads:
        for n, p in local.items():
            p.grad = g[n].clone()
        opt.step()
    return local


# ----------------------------------------------------------------------------- references
class Reference:
    """An in-process optimizer (and optional scheduler) over copies of named tensors, stepped
    the way a session steps: set every ``.grad``, ``step()``, scheduler step, clear grads."""

    def __init__(
        self,
        cls: type[torch.optim.Optimizer],
        groups: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
        kwargs: dict[str, Any],
    ) -> None:
        self.params: dict[str, torch.Tensor] = {}
        torch_groups = []
        for tensors, opts in groups:
            copies = [t.detach().clone() for t in tensors.values()]
            self.params.update(zip(tensors, copies, strict=True))
            torch_groups.append({"params": copies, **opts})
        self.optimizer = cls(torch_groups, **kwargs)
        self.scheduler: Any = None

    def step(self, grads: dict[str, torch.Tensor], scheduler: bool = True) -> None:
        for name, p in self.params.items():
            g = grads.get(name)
            p.grad = None if g is None else g.clone()
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None
        if scheduler and self.scheduler is not None:
            self.scheduler.step()

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


def assert_tensors_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = ""
) -> None:
    """Bitwise equality of named tensors (NaNs equal to NaNs in the same places)."""
    assert set(got) == set(want), f"{what}: names {sorted(got)} != {sorted(want)}"
    for name in want:
        a, b = got[name], want[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} {a} vs {b}"
        same = torch.equal(a, b) or bool(  # bitwise, so NaN payloads compare equal too
            (a.reshape(-1).contiguous().view(torch.uint8)
             == b.reshape(-1).contiguous().view(torch.uint8)).all())
        assert same, f"{what}: {name} differs: max abs diff {(a - b).abs().max().item()}"


def assert_trees_equal(got: Any, want: Any, path: str = "") -> None:
    """Deep equality of state trees (tensors bitwise; NaN equals NaN)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got)} is not a tensor"
        assert_tensors_equal({"t": got}, {"t": want}, path)
        return
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {type(got)}"
        assert {str(k) for k in got} == {str(k) for k in want}, f"{path}: keys differ"
        by_str = {str(k): v for k, v in got.items()}
        for k, v in want.items():
            assert_trees_equal(by_str[str(k)], v, f"{path}.{k}")
        return
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{path}: {got!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_trees_equal(g, w, f"{path}.{i}")
        return
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), f"{path}: {got!r} != nan"
        return
    assert got == want and type(got) in (type(want), int, float), f"{path}: {got!r} != {want!r}"


def build_scheduler(spec: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """An in-process ``torch.optim.lr_scheduler`` from optserve's JSON scheduler spec
    (``{"name", "options"}``; SequentialLR/ChainedScheduler nest specs in ``schedulers``)."""
    cls = getattr(torch.optim.lr_scheduler, spec["name"])
    options = dict(spec.get("options", {}))
    if "schedulers" in options:
        kids = [build_scheduler(k, optimizer) for k in options.pop("schedulers")]
        if spec["name"] == "ChainedScheduler":
            return cls(kids, optimizer=optimizer)
        return cls(optimizer, schedulers=kids, **options)
    return cls(optimizer, **options)
