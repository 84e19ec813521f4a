"""Large parameters stepped in cache-sized chunks, by the session's own torch optimizer.

On a CPU, torch's single-tensor optimizers (its default there) run each of their elementwise
operations over a whole parameter before the next one: Adam over 1e7 float32 values makes
about eight passes over 40 MB tensors, each from memory, and allocates two 40 MB temporaries
(``exp_avg_sq.sqrt() / bias_correction2_sqrt``). The same optimizer stepped over the
parameter's chunks, one chunk after the other, keeps a chunk's tensors in the cache between
its passes and makes chunk-sized temporaries.

The values are bitwise those of the whole step, for the optimizers in :data:`ELEMENTWISE`
and float32 or float64 parameters: each of those optimizers updates every element from the
same element of the parameter, its gradient and its state tensors, and from per-parameter
scalars (the step count, NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) that are equal for
every chunk of one parameter, so each element goes through the same kernels with the same
inputs. Chunks move where a kernel's vectorised body ends and its scalar tail begins (as
torch's own thread count does); for float32 and float64 the two round alike, for float16 and
bfloat16 they do not (``add_(alpha=...)`` differs in some elements), so those stay whole.
``tests/unit/test_chunked_steps.py`` checks it on the machine that runs the tests, with
chunks of odd sizes that put elements in the tails.

How: :func:`step` swaps each group's ``params`` for a list in which every large parameter
(of at least :data:`SMALLEST_IN_CHUNKS` chunks, contiguous, with a dense contiguous
gradient of its shape) is replaced by views of its chunks, and gives each chunk a state
entry of its own: views of the parameter's state tensors (torch updates them in place, so
the whole tensors change) and a copy of each 0-dim tensor (each chunk counts its own step).
``optimizer.step()`` then runs as ever, with the groups' options as they are (a scheduler's
lr, a step's option changes). Afterwards the groups get their own lists back; every chunk's
0-dim state must agree, and is copied into the parameter's; a state tensor torch replaced
instead of updating in place is copied into its slice (or, where the parameter had none,
the chunks' are joined).

A parameter's first step (no state yet) runs one chunk per ``optimizer.step()`` call, with
only that chunk in its group: torch makes the chunk's state, which goes into whole tensors
made once. So no step holds whole-sized temporaries, nor the state twice. (Optimizer step
hooks, which sessions do not register, run once per call; the state's entries are put back
in the order torch's one call makes them.)

When the step's metrics want the update norm (``metrics.before_step``), each chunk steps in
an ``optimizer.step()`` call of its own between a copy of its values and the subtraction
(:class:`Watch`): the session then keeps no whole copy of a large parameter for that norm.

When the step's answer streams (:mod:`app.engine.answer_stream`: a binary answer without the
step's norms), each chunk steps in an ``optimizer.step()`` call of its own too, and its new
values are copied into the answer while the chunk is in the cache, which the caller sends on
while the next chunk steps (:class:`ChunkAnswer`).

Not chunked (the whole step as before): other optimizers (Adafactor and Muon treat a
matrix as one; LBFGS and SparseAdam step elsewhere), ``foreach``/``fused`` groups (their
kernels take every tensor at once already), float16, bfloat16 and complex parameters,
non-CPU devices and sparse gradients.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from app.engine import optimizer_step
from app.engine.worker import after_job
from app.runtime import release_memory

#: the dtypes whose kernels' vectorised bodies and scalar tails round alike (float16 and
#: bfloat16 ones do not: chunks, which move the tails, would change some elements' bits)
EXACT_DTYPES = (torch.float32, torch.float64)
ELEMENTWISE = frozenset({
    "Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "NAdam", "RAdam", "RMSprop",
    "Rprop", "SGD",
})
#: elements per chunk: 1 MiB of float32 per tensor (Adam's five tensors of a chunk and its
#: two temporaries stay within a CPU's L2 + L3)
DEFAULT_CHUNK = 1 << 18

#: parameters are chunked from this many chunks on: below it (8 MiB of float32 per tensor
#: at the default) a parameter's tensors stay in a CPU's L3 cache between passes anyway, and
#: the chunks' own costs (a Python loop of torch calls per chunk) would outweigh the gain
SMALLEST_IN_CHUNKS = 8

#: the per-step metrics take the update and parameter norms of a tensor as the norms of its
#: pieces of this many elements, at fixed offsets from its start, combined in float64
#: (``metrics``): so the values do not depend on whether or how the step chunks it (a chunk is
#: a whole number of pieces), a restart that replays steps under another setting gives the
#: same rows, and torch's float32 norm, which sums in float32, stays accurate (1.7e-7 against
#: float64 for 1e7 random values, where the whole tensor's is off by 3.6e-4). Smaller pieces
#: cost more than they gain: in a throwaway timing, a 1e7 Adam step with its norms took about
#: 3% longer in pieces of 65,536 than in the step's own chunks, and 10% in pieces of 32,768
NORM_PIECE = 1 << 16

_size = DEFAULT_CHUNK
_smallest = SMALLEST_IN_CHUNKS * DEFAULT_CHUNK
_piece = NORM_PIECE


def configure(elements: int, smallest: int | None = None) -> None:
    """Step parameters of at least ``smallest`` elements (default: :data:`SMALLEST_IN_CHUNKS`
    chunks) in chunks of ``elements`` (0: never). Process-wide, as torch's thread count is:
    the server sets it once from ``OPTSERVE_STEP_CHUNK`` (a multiple of :data:`NORM_PIECE`);
    tests force small odd chunks, which are then the norms' pieces too."""
    global _size, _smallest, _piece
    if elements < 0:
        raise ValueError("the step chunk must be >= 0 elements")
    _size = elements
    _smallest = SMALLEST_IN_CHUNKS * elements if smallest is None else smallest
    _piece = NORM_PIECE if elements % NORM_PIECE == 0 else elements


def piece() -> int:
    """Elements per norm piece (:data:`NORM_PIECE`, or a test's odd chunk)."""
    return _piece


def pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` (flattened) in pieces of :data:`NORM_PIECE` elements from its start (of a test's
    odd chunk instead: :func:`configure`): what the metrics take one norm of each. Contiguous
    (a copy of a strided ``t``): torch's norm of strided values rounds otherwise."""
    flat = t.reshape(-1).contiguous()
    if flat.numel() <= _piece:
        return [flat]  # (one piece: no slice of it to make)
    return [flat[a:a + _piece] for a in range(0, flat.numel(), _piece)]


@dataclass
class Split:
    param: torch.Tensor
    views: list[torch.Tensor]
    bounds: list[tuple[int, int]]
    #: no state yet (its first step): torch makes each chunk's, :func:`_first_step` joins them
    fresh: bool = False
    #: per chunk: the state entry handed to torch
    states: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Watch:
    """Norms a step's metrics want of its chunked parameters' updates (``metrics``: the update
    norm needs each parameter as it was before the step). With a watch, every chunk steps in
    an ``opt.step()`` call of its own, between a copy of its values into a chunk-sized buffer
    and the subtraction, both while the chunk is in the cache: so no step keeps a whole copy
    of a large parameter. Per parameter (by ``id``): per piece (:func:`pieces`), the norm of
    its update and of its values after the step (0-dim tensors on its device, in its dtype)."""

    update: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    param: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    #: the norms' own work failed: the chunks step on without it (metrics never fail a step)
    #: and the norms are not to be used
    failed: bool = False
    _buffers: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def stepped(self, opt: torch.optim.Optimizer, param: torch.Tensor, view: torch.Tensor
                ) -> None:
        """``opt.step()``, with ``view`` (a chunk of ``param``) the one tensor it steps."""
        before = None if self.failed else self._copy(view)
        optimizer_step.step(opt)
        if before is None:
            return
        try:
            before.sub_(view)
            # (a chunk starts at a multiple of the piece: its pieces are the parameter's)
            update = pieces(before)
            norms = torch._foreach_norm([*update, *pieces(view)])
        except Exception:  # noqa: BLE001 - metrics never fail a step
            self.failed = True
            return
        self.update.setdefault(id(param), []).extend(norms[:len(update)])
        self.param.setdefault(id(param), []).extend(norms[len(update):])

    def _copy(self, view: torch.Tensor) -> torch.Tensor | None:
        try:
            buffer = self._buffers.get(view.dtype)
            if buffer is None or buffer.numel() < view.numel():
                buffer = self._buffers[view.dtype] = torch.empty(
                    max(view.numel(), _size), dtype=view.dtype, device=view.device)
            before = buffer[:view.numel()]
            before.copy_(view)
            return before
        except Exception:  # noqa: BLE001 - metrics never fail a step
            self.failed = True
            return None


def may_chunk(opt: torch.optim.Optimizer, name: str, p: torch.Tensor) -> bool:
    """Whether :func:`step` steps ``p`` (one of ``opt``'s parameters) in chunks when its
    gradient allows (dense, contiguous, of its shape and dtype) and its state does."""
    return (_size > 0 and name in ELEMENTWISE and _large(p.numel(), _size, _smallest)
            and _plain(p) and not _fused(opt))


def may_ever_chunk(name: str, p: torch.Tensor) -> bool:
    """Whether some server setting (``OPTSERVE_STEP_CHUNK``, a multiple of :data:`NORM_PIECE`)
    would step ``p`` in chunks: the metrics norm it on its own, as the chunked step does, so
    that its norms do not change when a restart replays its steps under another setting.
    Whatever the groups' ``foreach``/``fused`` (options that change after the metrics' layout
    is made, and that a restored snapshot holds from the start)."""
    return (name in ELEMENTWISE and p.numel() >= SMALLEST_IN_CHUNKS * NORM_PIECE
            and _plain(p))


def _large(numel: int, chunk: int, smallest: int) -> bool:
    """A parameter of ``numel`` elements is worth chunks of ``chunk``."""
    return numel > chunk and numel >= smallest


def _plain(p: torch.Tensor) -> bool:
    """A parameter whose chunks step bitwise as the whole does (see the module's docstring)."""
    return p.device.type == "cpu" and p.dtype in EXACT_DTYPES and p.is_contiguous()


def _fused(opt: torch.optim.Optimizer) -> bool:
    """Some group takes every tensor at once already (``foreach``/``fused``)."""
    return any(group.get("foreach") or group.get("fused") for group in opt.param_groups)


def may_stream(nbytes: int) -> bool:
    """Whether an answer buffer of ``nbytes`` may hold a parameter stepped in chunks (the
    smallest chunked one's elements, at 2 bytes each in the narrowest answer): only such a
    step's answer is offered to stream (``app.api.streamed_step``), so a small step makes
    none of the stream's objects."""
    return _size > 0 and nbytes >= 2 * _smallest


def settings() -> tuple[int, int]:
    """The chunk and the smallest chunked parameter, in elements (what :func:`may_chunk`
    depends on besides the parameter)."""
    return _size, _smallest


def plan(opt: torch.optim.Optimizer, name: str) -> list[Split]:
    """The parameters :func:`step` would step in chunks now (their gradients set)."""
    if _size <= 0 or name not in ELEMENTWISE or not _large(_largest(opt), _size, _smallest):
        return []  # nothing to chunk: no walk over a many-tensor session's parameters
    return _plan(opt, name, _size, _smallest)


def step(opt: torch.optim.Optimizer, name: str, splits: list[Split] | None = None,
         watch: Watch | None = None, answer: ChunkAnswer | None = None) -> None:
    """``opt.step()``, its large parameters stepped chunk by chunk where that gives the same
    values (see the module's docstring). ``splits``: :func:`plan`'s, made just before (the
    gradients unchanged since); ``watch``: take its norms of the chunked parameters;
    ``answer``: told as the parameters not chunked, then each chunk, are stepped (every chunk
    in a call of its own; the caller asks only where no parameter is ``fresh``, whose chunks
    it is not told of)."""
    if splits is None:
        splits = plan(opt, name)
    if not splits:
        optimizer_step.step(opt)
        return
    kept = [sp for sp in splits if not sp.fresh]
    fresh = [sp for sp in splits if sp.fresh]
    saved = [group["params"] for group in opt.param_groups]
    had = {id(p) for p in opt.state}
    made = False
    try:
        # a watch's or an answer's chunks and fresh parameters step on their own below
        alone = watch is not None or answer is not None
        replaced = {id(sp.param): [] if alone else sp.views for sp in kept}
        replaced.update({id(sp.param): [] for sp in fresh})
        for group, params in zip(opt.param_groups, saved, strict=True):
            group["params"] = [v for p in params for v in replaced.get(id(p), [p])]
        for sp in kept:
            _hand_out(opt, sp)
        optimizer_step.step(opt)
        if answer is not None:
            answer.whole_stepped()
        if alone:
            for sp in kept:
                _alone(opt, sp, saved, watch, answer)(sp.views)
        for sp in kept:
            _take_back(opt, sp)
        for sp in fresh:
            made = _first_step(opt, sp, saved, watch) or made
    finally:
        for group, params in zip(opt.param_groups, saved, strict=True):
            group["params"] = params
        for sp in splits:
            for view in sp.views:
                opt.state.pop(view, None)
        if fresh:
            _in_torch_order(opt, had)
    if made:
        # the small blocks of the chunks' own state, freed: given back to the OS once the
        # answer is out
        after_job(release_memory)


class ChunkAnswer(Protocol):
    """What a step streaming its answer is told (on the worker thread): the parameters not
    stepped in chunks are done (:meth:`whole_stepped`), then each chunk is
    (:meth:`chunk_stepped`, while its values are in the cache)."""

    def whole_stepped(self) -> None: ...
    def chunk_stepped(self, param: torch.Tensor, a: int, b: int, view: torch.Tensor
                      ) -> None: ...


def _alone(opt: torch.optim.Optimizer, sp: Split, saved: list[list[torch.Tensor]],
           watch: Watch | None, answer: ChunkAnswer | None = None
           ) -> Callable[[list[torch.Tensor]], None]:
    """A function that steps the given views of ``sp``'s parameter alone: only they in its
    group, every other group empty; all in one ``opt.step()``, or with a ``watch`` one call
    each (:meth:`Watch.stepped`)."""
    index = next(i for i, params in enumerate(saved) if any(p is sp.param for p in params))
    groups = opt.param_groups

    def only(views: list[torch.Tensor]) -> None:
        for i, group in enumerate(groups):
            group["params"] = views if i == index else []

    bounds = ({id(v): ab for v, ab in zip(sp.views, sp.bounds, strict=True)}
              if answer is not None else {})

    def alone(views: list[torch.Tensor]) -> None:
        if watch is None and answer is None:
            only(views)
            optimizer_step.step(opt)
            return
        for view in views:
            only([view])
            if watch is not None:
                watch.stepped(opt, sp.param, view)
            else:
                optimizer_step.step(opt)
            if answer is not None:
                a, b = bounds[id(view)]
                answer.chunk_stepped(sp.param, a, b, view)

    return alone


#: per optimizer: its number of parameters, and the elements of its largest (a parameter's
#: size never changes; add_param_group changes the count)
_LARGEST: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, int]] = (
    weakref.WeakKeyDictionary())


def _largest(opt: torch.optim.Optimizer) -> int:
    count = sum(len(group["params"]) for group in opt.param_groups)
    known = _LARGEST.get(opt)
    if known is None or known[0] != count:
        known = (count, max((p.numel() for group in opt.param_groups
                             for p in group["params"]), default=0))
        _LARGEST[opt] = known
    return known[1]


def _in_torch_order(opt: torch.optim.Optimizer, had: set[int]) -> None:
    """``opt.state`` with the entries this step made in the order torch's one call would have
    made them (by group, then parameter; ``state_dict()["state"]`` keeps that order): the
    fresh parameters' entries came last, after the one call for the others."""
    new = [p for group in opt.param_groups for p in group["params"]
           if id(p) not in had and p in opt.state]
    if not new:
        return
    older = [(p, v) for p, v in opt.state.items() if id(p) in had]
    entries = older + [(p, opt.state[p]) for p in new]
    opt.state.clear()
    opt.state.update(entries)


def _first_step(opt: torch.optim.Optimizer, sp: Split, saved: list[list[torch.Tensor]],
                watch: Watch | None = None) -> bool:
    """A parameter's first step, one chunk per ``opt.step()`` with only that chunk in its
    group (every other group empty): torch makes the chunk's state, which goes into whole
    tensors made once (never the whole-sized temporaries and a second copy of the state at
    once); True when the parameter has state afterwards. An optimizer that made no state for
    the first chunk (SGD without momentum) steps the other chunks in one call (one each
    with a ``watch``)."""
    alone = _alone(opt, sp, saved, watch)
    whole: dict[str, Any] = {}
    for k, ((a, b), view) in enumerate(zip(sp.bounds, sp.views, strict=True)):
        alone([view])
        made = opt.state.pop(view, None) or {}
        if k == 0 and not made:
            alone(sp.views[1:])
            if any(opt.state.pop(v, None) for v in sp.views[1:]):
                raise RuntimeError("state made for some chunks only: not an elementwise step")
            return False
        if k == 0:
            for key, value in made.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    whole[key] = torch.empty(sp.param.shape, dtype=value.dtype,
                                             device=value.device)
                else:
                    whole[key] = value
        if list(made) != list(whole):
            raise RuntimeError("the chunks' state keys differ: not an elementwise step")
        for key, value in made.items():
            target = whole[key]
            _check_chunk(key, value, target, b - a)
            if isinstance(target, torch.Tensor) and target.dim() > 0:
                target.view(-1)[a:b].copy_(value.view(-1))
    opt.state[sp.param] = whole
    return True


def _plan(opt: torch.optim.Optimizer, name: str, chunk: int, smallest: int = 0
          ) -> list[Split]:
    if chunk <= 0 or name not in ELEMENTWISE or _fused(opt):
        return []
    splits: list[Split] = []
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None or not _large(p.numel(), chunk, smallest):
                continue
            if (not _plain(p) or g.layout != torch.strided or not g.is_contiguous()
                    or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
                return []
            state = opt.state.get(p)
            if state and not all(_splittable(v, p) for v in state.values()):
                return []  # state of another form
            flat, flat_grad = p.view(-1), g.view(-1)
            bounds = [(a, min(a + chunk, p.numel())) for a in range(0, p.numel(), chunk)]
            views = []
            for a, b in bounds:
                view = flat[a:b]
                view.grad = flat_grad[a:b]
                views.append(view)
            splits.append(Split(p, views, bounds, fresh=not state))
    return splits


def _splittable(value: Any, p: torch.Tensor) -> bool:
    """A state value :func:`step` can hand to chunks: a tensor of the parameter's shape
    (contiguous, on its device), a 0-dim tensor, or a plain value (None, a number)."""
    if not isinstance(value, torch.Tensor):
        return True
    if value.dim() == 0:
        return True
    return (value.shape == p.shape and value.dtype in EXACT_DTYPES and value.is_contiguous()
            and value.device == p.device and value.layout == torch.strided)


def _hand_out(opt: torch.optim.Optimizer, sp: Split) -> None:
    whole = opt.state[sp.param]
    for (a, b), view in zip(sp.bounds, sp.views, strict=True):
        entry: dict[str, Any] = {}
        for key, value in whole.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                entry[key] = value.view(-1)[a:b]
            elif isinstance(value, torch.Tensor):
                entry[key] = value.clone()
            else:
                entry[key] = value
        opt.state[view] = entry
        sp.states.append(entry)


def _take_back(opt: torch.optim.Optimizer, sp: Split) -> None:
    """The chunks' state into the parameter's: every key checked first (so a refusal writes
    nothing), then written."""
    whole = opt.state[sp.param]
    keys = list(whole)
    keys.extend(k for k in sp.states[0] if k not in whole)
    writes: list[tuple[str, list[Any]]] = []
    for key in keys:
        values = [state.get(key) for state in sp.states]
        for value, (a, b) in zip(values, sp.bounds, strict=True):
            _check_chunk(key, value, values[0], b - a)
        writes.append((key, values))
    for key, values in writes:
        first = values[0]
        target = whole.get(key)
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            if isinstance(target, torch.Tensor) and target.shape == sp.param.shape:
                flat = target.view(-1)
                for (a, b), part in zip(sp.bounds, values, strict=True):
                    if part.data_ptr() != flat[a:b].data_ptr():  # replaced, not updated
                        flat[a:b].copy_(part.view(-1))
            else:
                whole[key] = torch.cat([part.view(-1) for part in values]
                                       ).view(sp.param.shape)
        elif isinstance(first, torch.Tensor) and isinstance(target, torch.Tensor) \
                and target.dim() == 0:
            target.copy_(first)
        else:
            whole[key] = first


def _check_chunk(key: str, value: Any, like: Any, numel: int) -> None:
    """A chunk's state ``key`` as an elementwise step leaves it: a tensor of the chunk's
    ``numel`` where ``like`` (the first chunk's, or the whole state's) is a tensor of more than
    0 dimensions, else the same 0-dim or plain value as ``like``."""
    if isinstance(like, torch.Tensor) and like.dim() > 0:
        if not isinstance(value, torch.Tensor) or value.numel() != numel:
            raise RuntimeError(f"the chunks' state {key!r} is not chunk-shaped: not an "
                               "elementwise step")
    elif not _same(value, like):
        raise RuntimeError(f"the chunks' state {key!r} differ: not an elementwise step")


def _same(value: Any, first: Any) -> bool:
    """The same 0-dim state in two chunks: equal bits for tensors (NaN equals NaN), equal
    plain values of one type."""
    if isinstance(first, torch.Tensor):
        return (isinstance(value, torch.Tensor) and value.dim() == 0
                and value.dtype == first.dtype and torch.equal(
                    value.reshape(1).view(torch.uint8), first.reshape(1).view(torch.uint8)))
    if type(value) is not type(first):
        return False
    if isinstance(first, float) and math.isnan(first):
        return math.isnan(value)
    return bool(value == first)
