"""Groups of many small parameters stepped by torch's foreach implementation of the session's
own optimizer, where that gives the for-loop's values bit for bit.

On a CPU, torch's optimizers default (``foreach=None``) to their single-tensor for-loop: a
Python loop over a group's tensors, several torch calls each. For 1,000 parameters of 4 floats
that loop is the whole step (Adam about 21 ms here, SGD with momentum 6.3 ms), and the
optimizer's ``_multi_tensor_*`` twin, whose ``torch._foreach_*`` calls loop in C++ over the
same per-tensor kernels on a CPU, takes about half of it (11 and 3.7 ms). For most optimizers
the twin makes the same kernel calls per tensor with the same scalars, so every element comes
out with the same bits; for some it computes the same update in another order (NAdam, RAdam
and ASGD, in torch 2.13), which rounds otherwise.

So a group of an optimizer in :data:`SAME_CALLS` (Adadelta, Adam, AdamW, Adamax, RMSprop,
Rprop and SGD, whose two paths torch writes with the same calls, read line by line against the
installed torch: see there) that the client left at
``foreach=None`` (torch's own choice), of at least
:data:`SMALLEST_GROUP` parameters with gradients, all dense float32 or float64 CPU tensors,
with no tensor among its options and neither ``fused``, ``capturable`` nor ``differentiable``
set, and none of its parameters stepped in chunks (``chunked``), steps with ``foreach=True``
for that one ``optimizer.step()`` and gets its own value back after it: state dicts, exports
and the session's options never see it. A probe must agree too (:func:`agrees`), a guard
against a torch whose code has moved since (a probe alone is not enough: NAdam's two paths
take the square root of the bias correction at different points, and agree on random values
for six steps before they differ): the same optimizer class, with the group's options, steps
small tensors of
the group's dtypes both ways for a few steps with random gradients; the parameters and every
state entry must end bitwise equal, and the gradients unchanged (the twin of Nesterov SGD adds
into its gradients in place; the server's gradients may be views of the request's body). The
verdict is kept per optimizer, options' shape and dtypes; an option's shape is what torch's
code branches on (a number's being zero, one or negative; a flag; a string), not its value,
so a scheduler that changes lr every step does not probe again.
``tests/integration/test_conformance.py`` runs every config of torch's ``optim_db`` for these
optimizers through this, on the machine that runs the tests.
"""

from __future__ import annotations

import logging
import weakref
from types import TracebackType
from typing import Any

import torch

from app.engine import chunked

log = logging.getLogger("optserve.engine")

#: the optimizers whose ``_multi_tensor_*`` make, on real CPU tensors without ``capturable``
#: or ``differentiable``, the calls of their ``_single_tensor_*`` per tensor with the same
#: scalars (torch 2.13, read line by line): Adam (AdamW is Adam with decoupled weight decay):
#: ``lerp_``, ``mul_``/``addcmul_``, ``sqrt``, division by and addition of Python floats,
#: ``addcdiv_`` with ``(lr / bc) * -1`` where the loop writes ``-(lr / bc)`` (the same float),
#: ``maximum`` for amsgrad, ``neg`` for maximize, ``add(param, alpha=wd)`` or
#: ``mul_(1 - lr * wd)``; SGD: ``add(param, alpha=wd)``, ``mul_``/``add_`` into the momentum
#: buffer (a clone of the gradient at first), ``add_(grad, alpha=-lr)``; RMSprop: ``mul_`` and
#: ``addcmul_`` into the square average, ``lerp_``, ``addcmul(value=-1)`` and ``sqrt_`` when
#: centered, ``add_(eps)``, ``mul_``/``addcdiv_`` into the momentum buffer and
#: ``add_(buf, alpha=-lr)``, else ``addcdiv_(grad, avg, value=-lr)``; Adamax: ``lerp_``,
#: ``mul_(beta2)``, ``abs`` and ``add_(eps)``, ``maximum`` into the infinity norm, ``addcdiv_``
#: with ``(lr / bc) * -1`` for ``-(lr / bc)``; Adadelta: ``neg`` for maximize,
#: ``add(param, alpha=wd)``, ``mul_(rho)``/``addcmul_`` into the square average and into the
#: accumulated delta, ``add(eps)`` and ``sqrt_`` of both, ``div_`` and ``mul_(grad)`` of the
#: delta, ``add_(delta, alpha=-lr)``; Rprop: ``mul`` of gradient and previous gradient
#: (for maximize the twin negates the product where the loop multiplies the negated
#: gradient: the same values, and a NaN's sign goes where ``sign`` makes it 0 either way),
#: ``sign``, the masked writes of ``etaplus``, ``etaminus`` and 1, ``mul_`` and ``clamp_`` of
#: the step sizes, zeros where the sign was ``etaminus`` (a ``where`` into its copy of the
#: gradient, where the loop writes through a mask: the same values), ``addcmul_(sign,
#: step_size, value=-1)``. (Nesterov SGD adds
#: into the gradients in place: the probe's check of the gradients turns it down unless
#: weight decay or maximize made them copies first. Not Adagrad: its twin multiplies the
#: gradient by ``-clr`` before dividing, where the loop's ``addcdiv_`` divides first.)
SAME_CALLS = frozenset({"Adadelta", "Adam", "Adamax", "AdamW", "RMSprop", "Rprop", "SGD"})
#: a group is switched from this many parameters (with gradients) on: below it the for-loop's
#: Python work is small beside the rest of a step
SMALLEST_GROUP = 16
_smallest = SMALLEST_GROUP
_DTYPES = (torch.float32, torch.float64)
#: options torch reads as flags of the step's kind (never switched from)
_REFUSING = ("fused", "capturable", "differentiable")
#: the probe: element counts of its tensors (per dtype), and its steps
_PROBE_SIZES = (1, 7, 33, 130)
_PROBE_STEPS = 3
#: verdicts kept (all dropped when there are this many, as ``sparse``'s probe cache does: a
#: verdict probed again costs a few small steps)
_KEPT = 512
_verdicts: dict[tuple[Any, ...], bool] = {}


def configure(smallest: int) -> None:
    """Switch groups of at least ``smallest`` parameters (0: never). Process-wide; tests
    lower it so that every group of torch's ``optim_db`` configs goes through here."""
    global _smallest
    if smallest < 0:
        raise ValueError("the smallest switched group must be >= 0 parameters")
    _smallest = smallest


class _Switched:
    """:func:`switched`'s context (a class: a generator's context manager cost twice as much,
    on every step)."""

    __slots__ = ("_opt", "_name", "_splits", "_groups")

    def __init__(self, opt: torch.optim.Optimizer, name: str,
                 splits: list[chunked.Split] | None) -> None:
        self._opt, self._name, self._splits = opt, name, splits
        self._groups: list[dict[str, Any]] = []

    def __enter__(self) -> None:
        self._groups = _switchable(self._opt, self._name, self._splits or [])
        for group in self._groups:
            group["foreach"] = True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for group in self._groups:
            group["foreach"] = None


def switched(opt: torch.optim.Optimizer, name: str,
             splits: list[chunked.Split] | None = None) -> _Switched:
    """``foreach=True`` in each group that steps bitwise alike with it (the module's
    docstring), for the ``optimizer.step()`` made inside; every group's own value after."""
    return _Switched(opt, name, splits)


def _switchable(opt: torch.optim.Optimizer, name: str, splits: list[chunked.Split]
                ) -> list[dict[str, Any]]:
    if _smallest <= 0 or name not in SAME_CALLS:
        return []
    out = []
    split = {id(sp.param) for sp in splits}
    for index, group in enumerate(opt.param_groups):
        params = group["params"]
        if len(params) < _smallest or "foreach" not in group or group["foreach"] is not None:
            continue
        if any(group.get(key) for key in _REFUSING):
            continue
        shape = _options_shape(group)
        dtypes = _param_dtypes(opt, index, params)
        if shape is None or dtypes is None or (split and any(id(p) in split for p in params)):
            continue
        grads = [p.grad for p in params]
        stepped = sum(g is not None for g in grads)  # (not count(None): Tensor.__eq__)
        if stepped < _smallest or not all(
                g is None or (g.layout is _STRIDED and g.dtype is p.dtype)
                for g, p in zip(grads, params, strict=True)):
            continue
        if agrees(type(opt), group, shape, dtypes):
            out.append(group)
    return out


_STRIDED = torch.strided
#: per optimizer, per group: the ids of its parameters as last seen (the same tensors, whose
#: dtype and device never change) and their dtypes (None: one is not a dense float32/float64
#: CPU tensor); a group's tensors are checked again only when they change, not at every step
#: (half a millisecond for 1,000 parameters)
_SEEN: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, tuple[
    list[int], tuple[torch.dtype, ...] | None]]] = weakref.WeakKeyDictionary()


def _param_dtypes(opt: torch.optim.Optimizer, index: int, params: list[torch.Tensor]
                  ) -> tuple[torch.dtype, ...] | None:
    seen = _SEEN.setdefault(opt, {})
    known = seen.get(index)
    ids = list(map(id, params))
    if known is not None and known[0] == ids:
        return known[1]
    verdict = None
    if all(p.device.type == "cpu" and p.dtype in _DTYPES and p.layout is _STRIDED
           for p in params):
        verdict = tuple(sorted({p.dtype for p in params}, key=str))
    seen[index] = (ids, verdict)
    return verdict


def _options_shape(group: dict[str, Any]) -> tuple[Any, ...] | None:
    """What torch's code may branch on in the group's options (None: an option this module
    does not switch with, such as a tensor)."""
    out = []
    for key in sorted(group):
        if key == "params":
            continue
        shape = _shape(group[key])
        if shape is _UNSHAPED:
            return None
        out.append((key, shape))
    return tuple(out)


#: an option value :func:`_shape` has no shape for
_UNSHAPED = object()


def _shape(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return (type(value).__name__, value == 0, value == 1, value < 0)
    if isinstance(value, (tuple, list)):
        shapes = [_shape(v) for v in value]
        return _UNSHAPED if _UNSHAPED in shapes else (type(value).__name__, *shapes)
    return _UNSHAPED  # (a tensor, or anything else)


def agrees(cls: type[torch.optim.Optimizer], group: dict[str, Any], shape: tuple[Any, ...],
           dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether ``cls`` with ``group``'s options steps tensors of ``dtypes`` to the same bits
    with ``foreach`` as without, leaving gradients unchanged (probed once per ``shape`` and
    ``dtypes``)."""
    key = (cls, shape, dtypes)
    known = _verdicts.get(key)
    if known is not None:
        return known
    try:
        verdict = _probe(cls, {k: v for k, v in group.items() if k != "params"}, dtypes)
    except Exception:  # noqa: BLE001 - an optimizer the probe cannot run is not switched
        log.debug("foreach probe of %s failed", cls.__name__, exc_info=True)
        verdict = False
    if len(_verdicts) >= _KEPT:
        _verdicts.clear()
    _verdicts[key] = verdict
    return verdict


def _probe(cls: type[torch.optim.Optimizer], options: dict[str, Any],
           dtypes: tuple[torch.dtype, ...]) -> bool:
    gen = torch.Generator().manual_seed(20261205)

    def values() -> list[torch.Tensor]:
        return [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                for dtype in dtypes for n in _PROBE_SIZES]
    start = values()
    grads = [values() for _ in range(_PROBE_STEPS)]
    ends = []
    make: Any = cls  # (its own defaults)
    for foreach in (False, True):
        params = [p.clone() for p in start]
        opt = make([{**options, "params": params, "foreach": foreach}])
        for step in grads:
            given = [g.clone() for g in step]
            for p, g in zip(params, given, strict=True):
                p.grad = g
            opt.step()
            if not all(map(_same, given, step)):
                return False
        ends.append((params, [opt.state[p] for p in params]))
    (pa, sa), (pb, sb) = ends
    if not all(map(_same, pa, pb)):
        return False
    for a, b in zip(sa, sb, strict=True):
        if a.keys() != b.keys():
            return False
        for k, v in a.items():
            w = b[k]
            if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
                if not (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor)
                        and _same(v, w)):
                    return False
            elif v != w:
                return False
    return True


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so -0.0 is not 0.0, and a NaN is its own bits)."""
    return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))
