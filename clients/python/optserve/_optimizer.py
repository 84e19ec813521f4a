"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose update runs in an optserve session.

Swap ``torch.optim.Adam(model.parameters(), lr=1e-3)`` for
``optserve.RemoteOptimizer(model.parameters(), "Adam", lr=1e-3)`` and keep the rest of the
training loop: ``zero_grad``, ``backward``, ``step``, gradient clipping, any
``torch.optim.lr_scheduler`` running locally, ``state_dict``/``load_state_dict`` checkpoints.

How it maps onto the service:

- construction creates a session from the parameters' current values (names: the given
  ``(name, tensor)`` pairs, a repeated name made unique as ``name#2``, ... in the session only,
  else ``"0"``, ``"1"``, ... by position across groups);
- ``step()`` first sends any parameter changed locally since the last step (in place, e.g. by
  ``module.load_state_dict`` or an ``nn.init`` function: anything that bumps the tensor's
  version counter; or through ``.data``: ``p.data.clamp_(...)``, ``p.data = t``, found by
  comparing the values bit for bit with those last written or sent, see ``optserve._edits``)
  and any param-group option changed locally (``group["lr"]`` set by a scheduler, ...), then
  sends every ``p.grad`` that is not ``None`` and copies the returned values into the
  parameters in place;
- ``zero_grad()`` is torch's own (local gradients; the server clears its own after each step);
- ``state_dict()`` fetches the session's state in torch's format, ``load_state_dict()`` imports
  one (from a ``RemoteOptimizer`` or a local optimizer of the same class);
- ``self.state`` is a view of the session's state, torch's ``{param: {"step": ...,
  "exp_avg": ..., ...}}`` (logging code that reads ``opt.state[p]["exp_avg"]``), fetched
  (one ``state_dict`` request) when first read after this optimizer learned of a newer session
  version from any answer (its steps, pulls, pushes, ``state_dict()``, ...) or after a
  ``load_state_dict`` or an ``add_param_group``: never older than the newest version it knows
  of, and no request while that has not moved (another worker's step shows once this one
  learns of it: its next step or :meth:`pull_params`). Edits of the session's values it
  fetched (``opt.state[p]["exp_avg"].zero_()``, a key assigned, an entry deleted) are sent
  before the next step, ``state_dict()`` or ``add_param_group()`` as one import of the state
  as it stands (:meth:`_write_back_state`; a parameter-server worker's stay local),
  conditional on the session version they were fetched at: another client's step since makes
  it a :class:`optserve.PreconditionFailedError`, the edit dropped, never a silent overwrite
  of that step's state; any other
  key put in an entry (timm ``Lookahead``'s
  ``lookahead_slow_buff``) is client-side state, kept across steps as a local optimizer keeps it
  (the same objects), carried in ``state_dict()`` beside the session's keys and split out again
  by ``load_state_dict()`` (``optserve._session_state``, ``optserve._state_keys``); assigning a
  mapping to it (``opt.state = defaultdict(dict)``) loads that state into the
  session (:meth:`_assign_state`): an empty one resets it, as it does a local optimizer's;
- the parameters are those given and those :meth:`add_param_group` adds: a group's
  ``"params"`` list edited by hand is a ``ValueError`` before anything is sent
  (:meth:`_check_groups`); a loaded state dict's groups lacking options torch added since it
  was saved get their defaults, as torch's ``load_state_dict`` gives them
  (:func:`_fill_as_torch_loads`);
- ``with RemoteOptimizer(...) as opt:`` deletes the session it created at the end of the block
  (``close(delete_session=True)``); without ``with``, ``close()`` keeps it.

Parameter-server mode: ``RemoteOptimizer(params, client=c, session_id="ps", worker="w3")``
does not create a session but joins the existing one as worker ``"w3"``: the session's group
options become the local ones, its current parameter values are copied into the local tensors,
and every ``step()`` pushes as that worker (``X-Optserve-Worker``) with the version its
gradients were computed from (``base_version``). In a sync session ``step()`` returns when the
round has stepped; in an async session with ``max_staleness`` a too-stale push raises
:class:`optserve.ConflictError` (``code == "stale_gradient"``): call :meth:`pull_params` and go
on with the next batch.
"""

from __future__ import annotations

import inspect
import math
import numbers
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast, overload

import torch
from torch.optim.optimizer import ParamsT

from . import _edits, _state_keys, _zero_copy
from ._api import Durability, NonFinitePolicy, StateFormat
from ._base_client import ReceiveBuffer
from ._client import Client
from ._exceptions import APIStatusError, OptserveError, PreconditionFailedError
from ._gc import gc_paused
from ._last_export import StateExport
from ._precision import NarrowFloatOptions
from ._session_state import SessionState, assigned_state
from ._stale import stale_import
from ._state_layout import laid_out_as_torch
from ._step_dtypes import STATE_MADE_AT_CONSTRUCTION, StepDtypes
from ._tensors import Tensor
from ._types import EvaluationRequest, SessionInfo

#: how many times ``opt.state = mapping`` reads the session and sends its conditional import
#: before it gives up (each failure: another client changed the session in between)
STATE_ASSIGN_ATTEMPTS = 3

__all__ = ["RemoteOptimizer"]

_NOT_OPTIONS = ("params", "param_names")
#: in a group's option changes: the options to fill into the tensor the session's group holds
#: (what a scheduler does to a tensor lr: every group and the defaults holding it follow), not
#: to replace the group's value with (docs/protocol.md, "Options with the step")
_FILL = "$fill"
#: the keys a torch scheduler adds to a group that a state import takes besides the optimizer's
#: options (docs/protocol.md: checked as torch checks ``lr``)
_SCHEDULER_GROUP_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum",
                                   "max_momentum"})
#: the top-level keys of a state dict the session takes (torch's ``load_state_dict`` reads
#: ``state`` and ``param_groups`` and ignores any other, such as one a state-dict hook added)
_STATE_DICT_KEYS = ("state", "param_groups", "scheduler")
#: with ``wire_dtype``, :meth:`RemoteOptimizer.state_dict` carries the session's parameters that
#: travel narrowed, at their own width, under this key (``{param id: tensor}``), as optimizers
#: that keep master weights carry them in theirs: the model's own (narrowed) values lose their
#: low bits, so a run resumed from them would go on from other weights than the session's
MASTER_PARAMS = "master_params"
#: how many times ``state_dict()`` exports the state and reads the master weights of its
#: version before it gives up (each failure: another worker stepped the session in between)
MASTER_READ_ATTEMPTS = 3

#: the problem codes of an evaluation whose LBFGS step the server no longer holds (it restarted
#: while the step was open, or the step waited past its evaluation timeout): nothing of the step
#: was applied, and :meth:`RemoteOptimizer.step` opens it again, at most this many times
_STEP_GONE = frozenset({"evaluation_not_found", "step_not_found"})
_LBFGS_REOPENS = 3


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _outside_compile(fn: _Fn) -> _Fn:
    """``fn`` run as it is, never traced by ``torch.compile`` (called from compiled code, the
    graph breaks around it). A step is a request to the server, nothing a graph can hold, and
    traced code sees each ``param_groups`` entry as dynamo shows it, with ``capturable`` set
    to True (``OptimizerVariable._set_capturable``), which the step would send."""
    return cast(_Fn, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


def _norm(value: Any) -> Any:
    """A comparable form of an option value (tensors to numbers, tuples to lists)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _scalar(value: Any) -> float | None:
    """A closure's loss as a finite float (a number or a one-element tensor), else None."""
    try:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return None
            value = value.detach().item()
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _same(a: Any, b: Any) -> bool:
    """Equal option values, or option changes by group (NaN equals NaN; a bool equals only a
    bool)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


@dataclass
class _UnansweredStep:
    """A step sent without an answer coming back (its outcome unknown: it may have been
    applied), and what it sent: the next ``step()`` sending the same (the user's retry) goes
    with its key, answered if it was applied and applied if it was not, once either way."""

    key: str
    #: each gradient sent: the ``p.grad`` tensor (weakly: a freed one matches nothing) and its
    #: version counter (a backward into it or any in-place edit bumps it)
    grads: dict[str, tuple[weakref.ref[torch.Tensor], int]]
    changes: Any  # the option changes sent with it, normalized
    scalars: dict[str, float]
    version: int  # the session version the local parameters (and its base_version) were at

    def matches(self, grads: Mapping[str, torch.Tensor], changes: Any,
                scalars: dict[str, float], version: int) -> bool:
        return (version == self.version and scalars == self.scalars
                and grads.keys() == self.grads.keys()
                and all(ref() is grads[n] and grads[n]._version == seen
                        for n, (ref, seen) in self.grads.items())
                and _same(changes, self.changes))


def _narrowed(grads: dict[str, torch.Tensor], wire: torch.dtype,
              kept: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Floating gradients wider than ``wire``, narrowed to it: dense ones, and row-sparse ones'
    values (the server widens both). To float16, a finite value past its range (65504) would
    travel as an infinity the server then refuses or steps with as the gradient's own: a
    ``ValueError`` naming the gradient instead. ``kept``: dense ones are narrowed into the
    buffers kept there by name (made at the first step, or when a gradient's shape or device
    changes), which the caller sends before it narrows again: no fresh block per step, whose
    pages a process faults in again whenever glibc has given its heap's top back (540 to
    1,630 page faults a step at 1e7 in ``benchmarks.peers``' ``optserve-sdk-bf16``)."""
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        if g.layout not in (torch.strided, torch.sparse_coo) or not g.is_floating_point() \
                or g.element_size() <= wire.itemsize:
            out[name] = g
            continue
        sparse = g.layout == torch.sparse_coo
        if kept is not None and not sparse:
            buffer = kept.get(name)
            if buffer is None or buffer.shape != g.shape or buffer.device != g.device:
                buffer = kept[name] = torch.empty(g.shape, dtype=wire, device=g.device)
            with torch.no_grad():
                narrow = buffer.copy_(g)
        else:
            narrow = g.to(wire)
        wide_values, narrow_values = (g._values(), narrow._values()) if sparse else (g, narrow)
        if wire == torch.float16 and bool(torch.isinf(narrow_values).any()) \
                and not bool(torch.isinf(wide_values).any()):
            raise ValueError(f"the gradient of {name!r} holds values beyond float16's range "
                             "(65504), which would travel as infinities: scale the loss "
                             "down, or use wire_dtype='bfloat16'")
        out[name] = narrow
    return out


def _loss_value(loss: Any) -> float:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach())
    return float(loss)



#: optimizers whose steps compute with scalar state tensors torch makes in its default dtype
#: (``_get_scalar_dtype``: float64 under ``torch.set_default_dtype(torch.float64)``); the
#: session's are float32. Others read their ``step`` as a Python number (``_get_value``).
_SCALAR_STATE_ARITHMETIC = {"ASGD": "step, eta, mu", "NAdam": "step, mu_product"}
#: optimizers that, with ``differentiable=True``, compute their bias corrections with the
#: ``step`` tensor itself (torch's ``_single_tensor_adam``: ``1 - beta1 ** step``), in float64
#: under ``torch.set_default_dtype(torch.float64)`` where the session's is float32
_DIFFERENTIABLE_STEP_ARITHMETIC = frozenset({"Adam", "AdamW"})


def _refuse_float64_scalar_steps(optimizer: str, options: Mapping[str, Any],
                                 groups: Sequence[Any]) -> None:
    """A ValueError, under ``torch.set_default_dtype(torch.float64)``, for an optimizer whose
    local steps would compute with float64 scalar state where the session's is float32 (the
    steps would differ silently)."""
    if torch.get_default_dtype() != torch.float64:
        return
    if optimizer in _SCALAR_STATE_ARITHMETIC:
        raise ValueError(
            f"torch's default dtype is float64 (torch.set_default_dtype): a local {optimizer} "
            f"would keep its scalar state ({_SCALAR_STATE_ARITHMETIC[optimizer]}) in float64 "
            "and step with it there, while the session keeps it in float32, so the steps "
            "would not be the same; create and step it with the default dtype float32 "
            "(torch's own)")
    if optimizer in _DIFFERENTIABLE_STEP_ARITHMETIC and any(
            g.get("differentiable", options.get("differentiable"))
            for g in [*(g for g in groups if isinstance(g, Mapping)), {}]):
        raise ValueError(
            f"torch's default dtype is float64 (torch.set_default_dtype): a local {optimizer} "
            "with differentiable=True would compute its bias corrections with its step count "
            "in float64, while the session keeps it in float32, so the steps would not be the "
            "same; leave differentiable out, or create and step it with the default dtype "
            "float32")


#: the scalar state an optimizer's ``__setstate__`` (run by torch's ``load_state_dict``) makes
#: a tensor of in torch's default dtype where a state dict gives it as a Python number, as
#: torch before 1.12 saved it (``"step": 3``)
_NUMBER_STATE_LOADED_AS_TENSORS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "RAdam",
                     "RMSprop", "Rprop"), ("step",)),
    "ASGD": ("step", "eta", "mu"), "NAdam": ("step", "mu_product")}


def _steps_as_the_session_keeps(state: Any, numbers_of: str | None = None) -> Any:
    """A state dict's ``"state"`` with each float64 ``step`` tensor that float32 holds exactly
    as float32, the session's (whose optimizer was made under torch's default dtype, float32).
    A local optimizer made under ``torch.set_default_dtype(torch.float64)`` keeps its steps in
    float64 (``_get_scalar_dtype``) and reads them as Python numbers, so the count is all that
    matters, and it is the same; a step count float32 cannot hold is left as it is (the
    session keeps it in float64, as torch's ``load_state_dict`` keeps a ``step``). With
    ``numbers_of`` (the optimizer's name, for a ``load_state_dict``), its scalar state given as
    Python numbers (an old checkpoint's ``"step": 3``) becomes a float32 tensor as that
    optimizer's ``__setstate__`` makes it (``torch.tensor(float(value), dtype=<default
    dtype>)``; under a float64 default, where float32 does not hold the number exactly, a
    float64 tensor, as torch's)."""
    if not isinstance(state, Mapping):
        return state
    keys = _NUMBER_STATE_LOADED_AS_TENSORS.get(numbers_of or "", ())
    out: dict[Any, Any] = {}
    for index, entry in state.items():
        step = entry.get("step") if isinstance(entry, Mapping) else None
        if isinstance(step, torch.Tensor) and step.dtype == torch.float64 and step.dim() == 0 \
                and step.float().double().item() == step.item():
            entry = {**entry, "step": step.float()}
        if isinstance(entry, Mapping) and any(_loads_as_a_tensor(entry.get(k)) for k in keys):
            entry = {**entry, **{k: _as_session_scalar(entry[k]) for k in keys
                                 if _loads_as_a_tensor(entry.get(k))}}
        out[index] = entry
    return out


def _loads_as_a_tensor(value: Any) -> bool:
    """A number torch's ``__setstate__`` takes as a count (``float(value)``): an int, a float,
    a NumPy scalar; not a bool, nor a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor))


def _as_session_scalar(value: float) -> torch.Tensor:
    """A Python number of a loaded state dict as the session's float32 tensor (torch's under a
    float32 default), or as the float64 tensor torch's ``__setstate__`` makes of it under a
    float64 default where float32 would round it (a ``step`` past 2**24: the session keeps a
    float64 count as it is, as torch does); it went as the number, which the session refuses
    (a 422 "expected a tensor of shape []")."""
    held = torch.tensor(float(value), dtype=torch.float32)
    if torch.get_default_dtype() == torch.float64 and held.item() != float(value):
        return torch.tensor(float(value), dtype=torch.float64)
    return held


class RemoteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` backed by an optserve session.

    Args:
        params: an iterable of tensors, of dicts (param groups with their own options), or of
            ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``), as torch takes.
        optimizer: the ``torch.optim`` class the server runs (``"Adam"``, ``"SGD"``, ...).
        client: the :class:`optserve.Client` to use (default: ``Client()`` from the
            environment, closed by :meth:`close`).
        session_id: the id for the new session (default: the server picks one); an existing
            id raises :class:`optserve.ConflictError`.
        scheduler: a scheduler for the server to run (``{"name": "StepLR", "options":
            {...}}``); the learning rates it sets come back after each step. A torch
            ``lr_scheduler`` running locally against this optimizer works too.
        binary: tensors travel as safetensors (default) or JSON.
        wire_dtype: ``"bfloat16"`` or ``"float16"``: gradients travel narrowed and the new
            parameters come back narrowed (half the bytes each way); the server keeps its
            master weights and optimizer state in the parameters' own dtype and widens the
            gradients on its device, so the local parameters hold the narrowed values of the
            server's (mixed-precision training with the master copy on the server).
            Row-sparse gradients (``nn.Embedding(sparse=True)``) travel with narrowed
            values too, and their touched rows come back narrowed. Each dense gradient is
            narrowed into a buffer kept for it (half a float32 parameter's bytes).
            Not for ``"LBFGS"`` (a ``ValueError``): its evaluations travel at the
            parameters' own width.
        durability, metrics, nonfinite: the new session's, as :meth:`Client.create_session`
            takes them (default: the server's settings). ``metrics=False`` saves the server
            the per-step norms (at 1e6 float32 parameters about 4 ms of a step).
        zero_copy: over the same-host transport (a server on this machine), a parameter's
            memory becomes its slot in the session's shared segment at its first step there,
            and the server writes the new values straight into it: no copy per step. Only a
            plain, contiguous CPU tensor whose memory nothing else views is moved (any other
            is copied into, as with ``zero_copy=False``); see ``optserve._zero_copy``.
        worker: join the existing session ``session_id`` as this worker (parameter-server
            mode) instead of creating one; its parameter names must be the ones this
            optimizer gives (``(name, tensor)`` pairs, else ``"0"``, ``"1"``, ...), group by
            group, with the same shapes. Takes no ``optimizer`` options or ``scheduler``: the
            session's are used.
        detect_data_edits: before each step, also send the parameters edited through
            ``p.data`` since the last one (``p.data.clamp_(...)``, ``p.data.copy_(...)``,
            ``p.data = t``, ``vector_to_parameters``), which the version counter does not
            show: each parameter whose version counter did not move is compared bit for bit
            with the values last written into it or sent (kept without a copy where the
            answer's memory can hold them: ``optserve._edits``). ``False``: only edits that
            bump the version counter are sent (call :meth:`push_params` after others).
        detect_state_data_edits: also find edits of the session's state through ``.data``
            (``opt.state[p]["exp_avg"].data.zero_()``, ``sd["state"][0]["exp_avg"].data =
            t`` on a tensor :meth:`state_dict` handed out), which the version counter does
            not show: each state tensor read into :attr:`state` or handed out is copied when
            read (the copies kept until the next step: the state's size again) and compared
            bit for bit with it before the next step or ``state_dict()``, and an edit is sent
            as an edit in place is. Off by default (the copy and the comparison cost what
            reading the state costs): without it such an edit is neither sent nor seen, so
            the next ``state_dict()`` (answered 304) hands the edited tensors out again as
            the session's while the session steps from its own; edit in place instead
            (``t.mul_(0.5)``, ``t.zero_()``, ``t.copy_(v)``: sent).
        **options: the optimizer's options (``lr=1e-3``, ``betas=(0.9, 0.99)``, ...).
    """

    def __init__(
        self,
        params: ParamsT,
        optimizer: str | type[torch.optim.Optimizer] = "Adam",
        client: Client | None = None,
        *,
        session_id: str | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        binary: bool = True,
        wire_dtype: str | None = None,
        worker: str | None = None,
        durability: Durability | None = None,
        metrics: bool | None = None,
        nonfinite: NonFinitePolicy | None = None,
        zero_copy: bool = True,
        detect_data_edits: bool = True,
        detect_state_data_edits: bool = False,
        **options: Any,
    ) -> None:
        optimizer = _optimizer_name(optimizer)
        if client is not None and not isinstance(client, Client):
            raise TypeError(
                f"client must be an optserve.Client (not {type(client).__name__}); "
                "RemoteOptimizer steps synchronously"
            )
        if wire_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"wire_dtype must be None, 'bfloat16' or 'float16', got "
                             f"{wire_dtype!r}")
        if wire_dtype is not None and optimizer == "LBFGS":
            # (its steps go as evaluations, which travel at the parameters' own width: the
            # step would be torch's on the unnarrowed gradients, not what wire_dtype promises)
            raise ValueError("wire_dtype is not offered for LBFGS: its closure's gradients "
                             "and the points its line search tries travel at the parameters' "
                             "own width (leave wire_dtype out)")
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                "dicts, but got " + torch.typename(params)
            )
        if worker is not None:
            if session_id is None:
                raise ValueError("worker=... joins an existing session: give its session_id")
            if options or scheduler is not None or (durability, metrics, nonfinite) != (
                    None, None, None):
                raise ValueError("a worker joining a session takes the session's options, "
                                 "scheduler and policies; pass none of them")
        self._initializing = True
        options = _as_torch_makes(optimizer, options)
        items: list[Any] = list(params)
        _refuse_float64_scalar_steps(optimizer, options, items)
        # Each group's own options, before torch fills in the defaults.
        explicit: list[dict[str, Any]] = [{}]
        if items and isinstance(items[0], dict):
            explicit = [
                {k: v for k, v in g.items() if k not in _NOT_OPTIONS}
                for g in items
                if isinstance(g, dict)
            ]
        # the keys each group held as given (torch keeps them first, its defaults after)
        given = ([list(g) if isinstance(g, dict) else [] for g in items]
                 if items and isinstance(items[0], dict) else [["params"]])
        super().__init__(items, dict(options))
        self._initializing = False
        # a group's option that is the default's very tensor (``lr=t`` given both ways) is the
        # session's group's by being left out: the group takes the defaults' tensor there, one
        # tensor as here (torch's groups hold the object given)
        explicit = [_without_defaults(g, options) for g in explicit]

        self._owns_client = client is None
        self._client: Client = client if client is not None else Client()
        if worker is None and any(explicit):
            try:
                explicit = self._server_options(optimizer, explicit)
            except BaseException:
                if self._owns_client:
                    self._client.close()
                raise
        self._binary = binary
        self._zero_copy = zero_copy
        self._in_slots = _zero_copy.InSlots()
        self._wire_dtype = getattr(torch, wire_dtype) if wire_dtype else None
        #: the dense gradients narrowed to ``wire_dtype`` are narrowed into these, by name
        #: (:func:`_narrowed`)
        self._narrow: dict[str, torch.Tensor] = {}
        #: every answer over HTTP is read into this one buffer (copied into the parameters
        #: before the next step)
        self._answers = ReceiveBuffer()
        self._optimizer_name = optimizer
        self._param_names: list[list[str]] = []
        #: each group's parameters as the session holds them, by ``id`` (see
        #: :meth:`_check_groups`)
        self._param_ids: list[list[int]] = []
        self._by_name: dict[str, torch.Tensor] = {}
        self._seen_version: dict[str, int] = {}
        #: each parameter's values as last in step with the session, to find edits made
        #: through ``p.data`` (None: not looked for)
        self._refs: _edits.References | None = (_edits.References() if detect_data_edits
                                                 else None)
        self._synced: list[dict[str, Any]] = []
        #: each group's tensor options (a tensor lr) as the objects the server last saw: one
        #: still there with another value was filled in place (by a scheduler)
        self._held: list[dict[str, torch.Tensor]] = []
        self._worker = worker
        self._version = 0  # the session version the local parameter values belong to
        self._scalars: dict[str, float] = {}  # sent with the next step (record_scalars)
        #: the last step if no answer came back for it (``_UnansweredStep``)
        self._unanswered: _UnansweredStep | None = None
        #: a closure's loss goes with the step as its ``loss`` scalar (off once the session
        #: refused scalars: a sharded one)
        self._loss_scalar = True
        #: the newest session version any answer showed (>= ``_version``)
        self._known_version = 0
        #: bumped by whatever may change the session's state besides a new version
        self._state_epoch = 0
        self._state_view = SessionState(self._session_state,
                                        lambda: (self._known_version, self._state_epoch),
                                        compare_values=detect_state_data_edits)
        #: the last state dict read (laid out as torch's, as handed out), a read of it again
        #: conditional on its revision (None: none kept)
        self._last_export: StateExport | None = None
        #: the dtype torch's optimizer would keep each parameter's step count in
        self._step_dtypes = StepDtypes()
        #: warns once per option given as a NumPy float32/float16 scalar (optserve._precision)
        self._narrow_floats = NarrowFloatOptions()
        self.__dict__.pop("_torch_state", None)  # (what torch's __init__ assigned: unused)

        groups = []
        for group, opts in zip(self.param_groups, explicit, strict=True):
            names = self._names_for(group)
            self._remember(names, group["params"])
            groups.append({"params": dict(zip(names, group["params"], strict=True)), **opts})
        if worker is not None:
            assert session_id is not None
            try:
                self._join(session_id)
            except BaseException:
                if self._owns_client:
                    self._client.close()
                raise
            self._named_as(self._optimizer_name)
            return
        for opts in (options, *explicit):
            self._narrow_floats.check(optimizer, opts)
        try:
            # (the client pauses the collector while it encodes and decodes 1,000 tensors or
            # more: see optserve._gc)
            info = self._client.create_session(
                optimizer, param_groups=groups, options=options, scheduler=scheduler,
                id=session_id, binary=binary, durability=durability, metrics=metrics,
                nonfinite=nonfinite,
            )
        except BaseException:
            if self._owns_client:
                self._client.close()
            raise
        self._session_id = info.id
        self._release_when_dropped()
        self._at(info.version)
        self.defaults = {**info.defaults, **options}
        #: the options the session's optimizer has (other keys of a group stay local)
        self._option_names = frozenset(info.defaults)
        self._adopt(info)
        for group, keys in zip(self.param_groups, given, strict=True):
            _order_keys(group, [*keys, "param_names", *self.defaults])
        if optimizer in STATE_MADE_AT_CONSTRUCTION:
            self._step_dtypes.made(self.param_groups)
        self._named_as(optimizer)

    def _named_as(self, optimizer: str) -> None:
        """This optimizer's class becomes :func:`_named_class` of ``optimizer``: a subclass
        of ``RemoteOptimizer`` whose ``__name__`` is the session's optimizer's (``"Adam"``), as
        ``type(opt).__name__`` is for torch's own. Code names things after it: torch's
        ``repr(opt)`` (``Adam (`` ...), Lightning's ``LearningRateMonitor`` (its metrics
        ``lr-Adam``, ``lr-Adam/pg2``: they were ``lr-RemoteOptimizer``), profiler labels.
        A subclass of ``RemoteOptimizer`` of one's own keeps its class."""
        if type(self) is RemoteOptimizer:
            named = _named_class(optimizer)
            self.__class__ = named
            self._zero_grad_profile_name = f"Optimizer.zero_grad#{named.__name__}.zero_grad"

    def _server_options(self, optimizer: str, explicit: list[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
        """Each group's own keys that are options of the server's ``optimizer`` (one ``GET
        /v1/optimizers``). Others (a group's ``"name"``, timm's ``"lr_scale"``: torch keeps
        any key in a group) stay in the local group only, as a local scheduler's
        ``initial_lr`` does: :meth:`state_dict` has them, steps never send them."""
        local = getattr(torch.optim, optimizer, None)
        if isinstance(local, type) and issubclass(local, torch.optim.Optimizer):
            taken = set(inspect.signature(local.__init__).parameters) - {"self", "params"}
            if all(k in taken for g in explicit for k in g):
                return explicit  # (options of torch's class here: no need to ask)
        known = {o.name: set(o.defaults) for o in self._client.list_optimizers()}
        if optimizer not in known:  # (the session's create says what is wrong with it)
            return explicit
        return [{k: v for k, v in g.items() if k in known[optimizer]} for g in explicit]

    # ------------------------------------------------------------------ bookkeeping
    @property
    def session_id(self) -> str:
        """The id of the server session this optimizer steps."""
        return self._session_id

    @property
    def client(self) -> Client:
        return self._client

    @property
    def worker(self) -> str | None:
        """The worker id this optimizer pushes as (``None``: it owns its session)."""
        return self._worker

    @property
    def version(self) -> int:
        """The session version the local parameter values come from."""
        return self._version

    def _at(self, version: int) -> None:
        """The local parameter values are now those of this session version."""
        self._version = version
        self._learn(version)

    def _learn(self, version: object) -> None:
        """An answer showed the session at this version (``opt.state`` older than it is
        fetched again when read)."""
        if type(version) is int and version > self._known_version:
            self._known_version = version

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        """The session's state, torch's ``{param: {"step": ..., "exp_avg": ..., ...}}``: a
        view fetched when first read after this optimizer learned of a newer session version
        or changed the state itself (see the module's docs). Keys the session's optimizer does
        not keep, put in an entry by code around this optimizer, are kept here across steps.
        Assigning a mapping loads it into the session: see :meth:`_assign_state`."""
        view: defaultdict[torch.Tensor, Any] | None = self.__dict__.get("_state_view")
        if view is None:  # (torch's Optimizer.__init__, before the session exists)
            torch_state: defaultdict[torch.Tensor, Any] = self.__dict__["_torch_state"]
            return torch_state
        return view

    @state.setter
    def state(self, value: Mapping[torch.Tensor, Any]) -> None:
        if "_state_view" not in self.__dict__:  # torch's Optimizer.__init__ sets it first
            self.__dict__["_torch_state"] = value
            return
        if value is not self._state_view:
            self._assign_state(value)

    def _assign_state(self, value: object, *, base_version: int | None = None) -> None:
        """``opt.state = mapping``: the session's state becomes ``mapping`` (this optimizer's
        parameters to their state dicts, as torch's ``state`` holds them), one import of it
        with the session's current group options (``GET`` the session, ``PUT .../state_dict``
        without a scheduler state: its options and scheduler stay as they are, and options
        changed locally still go with the next step). An empty mapping (``defaultdict(dict)``)
        resets it: every parameter's state is made afresh at its next step, as a local
        optimizer makes it, so training goes on as a local one whose ``state`` was replaced
        the same way. One atomic import: the session takes all of it or, refused (a wrong
        shape, a parameter that is not this optimizer's, ``TypeError`` for what is not a
        mapping of dicts), none of it. In a sync session it discards an open round, as
        :meth:`load_state_dict` does. Keys of an entry that the session's optimizer does not
        keep (a wrapper's: see :meth:`load_state_dict`) are not sent: they become this
        optimizer's client-side state, as the mapping's other keys become the session's.

        The import is conditional on the session being as the ``GET`` saw it (``If-Match``
        its version, ``base_revision`` its revision): another client's change in between (an
        option PATCH, a step, a scheduler step) is never reverted by the options the ``GET``
        read. The ``GET`` and the import are then made again, up to
        :data:`STATE_ASSIGN_ATTEMPTS` times in all; past that the last
        :class:`~optserve.PreconditionFailedError` is raised, the session's state as the
        other clients left it.

        ``base_version``: the import is conditional on that version instead of the one the
        ``GET`` saw (:meth:`_write_back_state`: the version :attr:`state` was read at); made
        again only while the session is still at it (an option changed meanwhile), a version
        past it raising that ``PreconditionFailedError`` at once. A ``GET`` that already shows
        the session at another version raises it without sending the import (its ``If-Match``
        could not hold: :func:`stale_import` gives the 412 the server would)."""
        params = [p for group in self.param_groups for p in group["params"]]
        ids: list[list[Any]] = []
        for group in self.param_groups:
            start = sum(len(g) for g in ids)
            ids.append(list(range(start, start + len(group["params"]))))
        entries, client_state = self._split_state(
            assigned_state(value, params),
            [{k: v for k, v in g.items() if k not in _NOT_OPTIONS} for g in self.param_groups],
            ids)
        for attempt in range(1, STATE_ASSIGN_ATTEMPTS + 1):
            info = self._client.get_session(self._session_id)
            self._learn(info.version)
            groups: list[dict[str, Any]] = []
            start = 0
            for local, server in zip(self.param_groups, info.param_groups, strict=True):
                count = len(local["params"])
                groups.append({**server.options, "params": list(range(start, start + count))})
                start += count
            self._state_epoch += 1
            self._last_export = None
            self._state_view.forget()
            if base_version is not None and info.version != base_version:
                # (the GET already shows the session at another version than the edit was
                # read at: the import's If-Match cannot hold, so it is refused here as the
                # server would refuse it, the view forgotten as then, without uploading the
                # whole state only for that 412)
                raise stale_import(self._client, self._session_id, info, base_version)
            try:
                imported = self._client.import_state(
                    self._session_id,
                    {"state": _steps_as_the_session_keeps(entries), "param_groups": groups},
                    format="safetensors" if self._binary else "json",
                    base_version=info.version if base_version is None else base_version,
                    base_revision=info.revision)
            except PreconditionFailedError:
                if attempt == STATE_ASSIGN_ATTEMPTS or (base_version is not None
                                                        and info.version != base_version):
                    raise
                continue
            break
        self._state_view.keep_only({params[index]: entry
                                    for index, entry in client_state.items()})
        self._step_dtypes.replaced({params[index]: entry for index, entry in entries.items()}
                                   if isinstance(entries, Mapping) else {})
        self._imported(imported)
        if not entries:
            self._state_view.known_empty()

    def _write_back_state(self) -> None:
        """Send the edits made to the session's values in :attr:`state` since they were
        fetched (``opt.state[p]["exp_avg"].zero_()``, ``opt.state[p]["step"] = t``,
        ``del opt.state[p]``: see :meth:`SessionState.edited`), as one import of the state as
        it now stands (:meth:`_assign_state`): a local optimizer steps with its state as
        edited, and so does the session. Nothing when nothing was edited (no request), or for a
        parameter-server worker (whose edits stay local: the import would put the state this
        worker fetched over the other workers' steps since).

        The import is conditional on the session version :attr:`state` was read at
        (``If-Match``): when another client changed the session's state since (a step, an
        import, a parameter overwrite), the edit was made on a state the session no longer
        holds, and importing it would silently undo the other client's change (a lost
        update). Then nothing is imported and :class:`~optserve.PreconditionFailedError` is
        raised saying so, with the edit dropped: :attr:`state` reads the session's current
        state, to be edited again if the edit still holds (kept, it would fail every later
        step the same way, with no way to send it). Nothing else of the call that was to send
        it (the step, ...) is done.

        An import refused otherwise (a tensor of another shape: a 422, the session's state
        unchanged) or unanswered raises, and the edits stay in :attr:`state`, to be sent again
        by the next step or ``state_dict()``, which fail the same way until the edit is fixed
        or cleared (``opt.state[p][k] = ...``, ``del opt.state[p]``, ``opt.state.clear()``,
        ``load_state_dict()``): a local optimizer keeps failing on its edited state too."""
        if self._worker is None and self._state_view.edited():
            held = self._state_view.held()
            read_at = held.version
            try:
                self._assign_state(self._state_view.as_it_stands(), base_version=read_at)
            except PreconditionFailedError as exc:
                if read_at is None or self._known_version == read_at:
                    self._state_view.keep_pending(held)
                    raise
                raise PreconditionFailedError(
                    f"{exc.status_code} opt.state was edited after it was read at session "
                    f"version {read_at}, but another client changed the session since (it is "
                    f"at version {self._known_version} now): the edit was not applied, to not "
                    "overwrite that client's change, and is dropped (the call that was to "
                    "send it stopped there); read opt.state again for the session's current "
                    "state and edit that", response=exc.response, problem=exc.problem) from exc
            except Exception:
                self._state_view.keep_pending(held)
                raise

    def _imported(self, info: SessionInfo) -> None:
        """After an import (which changes no parameter): the local values are those of its
        version too when nothing else came between."""
        if info.version == self._version + 1:
            self._version = info.version
        self._adopt(info)

    def _join(self, session_id: str) -> None:
        info = self._client.get_session(session_id)
        local = [list(n) for n in self._param_names]
        remote = [list(g.params) for g in info.param_groups]
        if local != remote:
            raise ValueError(f"session {session_id!r} holds parameters {remote}; this optimizer "
                             f"names its parameters {local} (pass model.named_parameters() "
                             "or the same tensors in the same order as the session's creator)")
        for name, p in self._by_name.items():
            shape = info.params.get(name)
            if shape is not None and tuple(shape.shape) != tuple(p.shape):
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} here but "
                                 f"{tuple(shape.shape)} in session {session_id!r}")
        self._session_id = info.id
        self._release_when_dropped()
        # the session's optimizer, whatever the optimizer argument said (a worker passes none:
        # its default "Adam" named the wrong class for the state keys a loaded state dict is
        # split by and the options it is filled with)
        self._optimizer_name = info.optimizer
        self.defaults = dict(info.defaults)
        self._option_names = frozenset(info.defaults)
        for group, server in zip(self.param_groups, info.param_groups, strict=True):
            group.update(server.options)
        _link_shared(self.defaults, self.param_groups, info.shared_tensors)
        self._adopt(info)
        self.pull_params()

    def _names_for(self, group: dict[str, Any]) -> list[str]:
        """The session's names for a group's parameters: its ``param_names`` (made unique, see
        :meth:`_unique`; one a session cannot take, see :func:`_session_name`, stood in for),
        else their positions across groups."""
        if "param_names" in group:
            taken = set(self._by_name)
            names = []
            for name in group["param_names"]:
                names.append(self._unique(_session_name(str(name)), taken))
                taken.add(names[-1])
            return names
        start = sum(len(n) for n in self._param_names)
        return [str(i) for i in range(start, start + len(group["params"]))]

    @staticmethod
    def _unique(name: str, taken: set[str]) -> str:
        """``name``, or ``name#2``, ``name#3``, ... when it is taken: torch's ``param_names``
        are labels and may repeat (groups of each submodule's ``named_parameters()``), a
        session's names may not. The optimizer's groups keep the given names."""
        k = 2
        unique = name
        while unique in taken:
            unique = f"{name}#{k}"
            k += 1
        return unique

    def _remember(self, names: list[str], params: list[torch.Tensor]) -> None:
        self._param_names.append(names)
        self._param_ids.append([id(p) for p in params])
        for name, p in zip(names, params, strict=True):
            self._by_name[name] = p
            self._seen_version[name] = p._version
        if self._refs is not None:  # (the values the session is made with, or joined to)
            with gc_paused(len(params)):
                self._refs.snapshot(zip(names, params, strict=True))

    def _check_groups(self) -> None:
        """A ``ValueError`` when ``param_groups`` no longer lists the parameters the session
        holds: a group appended to it by hand, or a group's ``"params"`` list edited in place
        (a parameter appended, removed or replaced). A local optimizer steps whatever its
        groups list then; the session's parameters are those it was made with and those
        :meth:`add_param_group` added, and steps sent by position would go to the wrong
        parameters (an appended one was a bare ``zip()`` error, a replaced one a silently
        different training)."""
        groups, held = self.param_groups, self._param_ids
        if len(groups) != len(held):
            raise ValueError(
                f"param_groups holds {len(groups)} groups, the session {len(held)}: add a "
                "group with add_param_group(), not by changing param_groups itself")
        for index, (group, ids) in enumerate(zip(groups, held, strict=True)):
            params = group.get("params")
            if isinstance(params, (list, tuple)) and list(map(id, params)) == ids:
                continue
            if not isinstance(params, (list, tuple)):
                what = f"a {type(params).__name__} now"
            elif len(params) != len(ids):
                what = f"{len(params)} now, {len(ids)} then"
            else:
                at = next(i for i, (a, b) in enumerate(zip(map(id, params), ids, strict=True))
                          if a != b)
                what = f"another tensor at index {at}"
            raise ValueError(
                f"param_groups[{index}]['params'] no longer lists the parameters the session "
                f"holds for it ({what}): a "
                "RemoteOptimizer's parameters are those it was made with and those "
                "add_param_group() added; add new ones with add_param_group(), and to drop "
                "or replace some, make a new RemoteOptimizer over the parameters to train")

    def _adopt(self, info: SessionInfo) -> None:
        """Take the server's view of every group's options: fill in what the local groups
        lack (torch's defaults) and remember what the server holds, to send only changes."""
        if len(info.param_groups) != len(self.param_groups):
            raise RuntimeError(
                f"session {info.id!r} has {len(info.param_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        self._learn(info.version)
        for group, server in zip(self.param_groups, info.param_groups, strict=True):
            for k, v in server.options.items():
                group.setdefault(k, v)
        self._synced = [
            {k: _norm(v) for k, v in g.options.items()} for g in info.param_groups
        ]
        self._held = [_tensor_options(g) for g in self.param_groups]

    def _changed_options(self) -> dict[int, dict[str, Any]]:
        """Every option changed locally since the server last saw it, by group index. A tensor
        option changed in place (``group["lr"].fill_(v)``, as torch's schedulers change a
        tensor lr) is listed under ``"$fill"``: the server fills the tensor its group holds,
        so that every group and the defaults holding it there follow, as they do here; one
        assigned (``group["lr"] = v``) replaces the group's value only."""
        out: dict[int, dict[str, Any]] = {}
        for index in range(len(self.param_groups)):
            changed = self._group_changes(index)
            if changed:
                out[index] = changed
        return out

    def _group_changes(self, index: int) -> dict[str, Any]:
        """What :meth:`_changed_options` holds for group ``index``."""
        group, synced, held = self.param_groups[index], self._synced[index], self._held[index]
        changed = {
            k: group[k]
            for k, v in synced.items()
            if k in group and not _same(_norm(group[k]), v)
        }
        self._narrow_floats.check(self._optimizer_name, changed)
        fills = [k for k, v in changed.items() if held.get(k) is v]
        if fills:
            changed[_FILL] = fills
        return changed

    def _sent(self, changes: dict[int, dict[str, Any]]) -> None:
        """The server now holds these option values."""
        for index, changed in changes.items():
            self._synced[index].update({k: _norm(v) for k, v in changed.items() if k != _FILL})
            self._held[index] = _tensor_options(self.param_groups[index])

    def _sync_param_groups(self, *, fills_only: bool = False) -> None:
        """PATCH every option changed locally since the server last saw it (``fills_only``:
        of the groups where a tensor option was filled in place): group by group, each after
        the server's answer to the one before (a fill there may have changed the groups
        holding the same tensor already)."""
        for index in range(len(self.param_groups)):
            changed = self._group_changes(index)
            if changed and (_FILL in changed or not fills_only):
                self._adopt(self._client.update_param_group(self._session_id, index,
                                                            **changed))

    def _locally_edited(self) -> dict[str, torch.Tensor]:
        """The parameters edited locally since they were last in step with the session: their
        version counter moved (in place), or, with ``detect_data_edits``, their values differ
        bit for bit from those last written or sent (through ``p.data``)."""
        seen = self._seen_version
        moved = {name for name, p in self._by_name.items() if p._version != seen[name]}
        if self._refs is not None:  # (those whose counter moved need no comparison)
            moved |= self._refs.edited_among(self._by_name, moved)
        return {name: p for name, p in self._by_name.items() if name in moved}

    def _copy_in(self, params: Mapping[str, Tensor], slots: bool = False,
                 keep: bool = True) -> None:
        """The new values into the parameters: every dense one with one
        ``torch._foreach_copy_`` (1,000 small tensors: one call, not 1,000). ``slots``: the
        values are the same-host segment's slots, which the parameters may live in
        (``zero_copy``: ``optserve._zero_copy``). ``keep``: the values' tensors may serve as
        the parameters' references for ``detect_data_edits`` (``optserve._edits``), else
        copies are made (an answer of touched rows only)."""
        dense: list[tuple[str, Tensor, Any]] = []
        there: list[tuple[str, torch.Tensor]] = []  # living in their slots: nothing to copy
        in_slots = self._in_slots if slots and self._zero_copy else None
        with torch.no_grad():
            for name, value in params.items():
                p = self._by_name.get(name)
                if p is None:
                    continue
                if in_slots is not None and in_slots.lives_in(name, p, value):
                    there.append((name, p))
                    continue
                if isinstance(value, torch.Tensor) and value.layout == torch.sparse_coo:
                    # some rows (?return=touched): only those changed
                    rows = value._indices()[0].to(p.device)
                    p.index_copy_(0, rows, value._values().to(device=p.device, dtype=p.dtype))
                    self._seen_version[name] = p._version
                    if self._refs is not None:
                        self._refs.rows(name, p, rows, value._values())
                else:
                    dense.append((name, p, value))
            if dense:
                torch._foreach_copy_([p for _, p, _ in dense],
                                     [v if type(v) is torch.Tensor else torch.as_tensor(v)
                                      for _, _, v in dense])
            for name, p, _ in dense:
                self._seen_version[name] = p._version
        if there:
            _zero_copy.bump([p for _, p in there])
            for name, p in there:
                self._seen_version[name] = p._version
        refs = self._refs
        if refs is not None:
            # what the parameters hold now, to find edits through p.data before the next step:
            # the answer's own tensor where it can serve, else a copy (optserve._edits)
            copies = [(name, p) for name, p in there]
            for name, p, value in dense:
                if keep and refs.usable(p, value):
                    refs.adopt(name, value)
                else:
                    copies.append((name, p))
            refs.snapshot(copies)

    def _take_lrs(self, lrs: list[float]) -> None:
        """Learning rates the server set (its own scheduler) become the local ones. (An
        answer's lrs are floats: a bool lr the session holds as given is the same number.)"""
        for group, synced, lr in zip(self.param_groups, self._synced, lrs, strict=False):
            held = synced.get("lr")
            if "lr" in synced and not _same(float(held) if type(held) is bool else held, lr):
                if isinstance(group.get("lr"), torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
                synced["lr"] = lr

    # ------------------------------------------------------------------ torch API
    def record_scalars(self, **scalars: float) -> None:
        """Scalars (``loss=0.31, accuracy=0.9``: numbers or one-element tensors) to send with
        the next :meth:`step`, recorded in the session's history with it. A closure's loss
        goes along by itself (as ``loss``, unless recorded here)."""
        for name, value in scalars.items():
            item = getattr(value, "item", None)
            self._scalars[name] = float(item() if callable(item) else value)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @_outside_compile
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Evaluate ``closure`` (if given, with grad enabled), send the gradients, step on the
        server and copy the updated values into the parameters. Returns the closure's loss,
        which is also sent along as the step's ``loss`` scalar (see :meth:`record_scalars`).

        Row-sparse gradients (``nn.Embedding(sparse=True)``) travel as their rows, and only
        the rows they touched come back. LBFGS takes a closure, as torch's does: the server
        runs torch's own ``LBFGS.step`` and asks for the loss and gradients at each point its
        line search tries; each time the parameters are set to that point and ``closure`` is
        called here (see :meth:`_lbfgs_step`).

        The step's norms do not travel in its answer, over either transport
        (``metrics="history"``; this method returns none of them): the server takes them after
        answering, off the step's path, into the session's history (:meth:`Client.history`,
        ``optserve watch``, the web page). Over HTTP a large session's answer then streams
        while the server steps (docs/protocol.md, "?metrics=history").

        Under ``torch.set_default_dtype(torch.float64)`` a step of ASGD or NAdam, or of Adam
        or AdamW with ``differentiable=True``, raises ``ValueError`` before anything is done
        (their local steps would compute with float64 scalar state: see
        ``_refuse_float64_scalar_steps``), as their construction does: the default may have
        changed since."""
        _refuse_float64_scalar_steps(self._optimizer_name, self.defaults, self.param_groups)
        self._check_groups()
        self._write_back_state()
        self._state_epoch += 1
        self._last_export = None
        self._state_view.forget()
        if self._optimizer_name == "LBFGS":
            first: float | None = self._lbfgs_step(closure)
            return first
        loss = None
        automatic = False  # the closure's loss rides along as a scalar nobody asked for
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            value = _scalar(loss)
            if value is not None and "loss" not in self._scalars and self._loss_scalar:
                self._scalars["loss"] = value
                automatic = True
        scalars, self._scalars = self._scalars, {}
        try:
            try:
                self._step(scalars, retry=closure is None)
            except APIStatusError as exc:
                if not (automatic and _refuses_scalars(exc)):
                    raise
                # a sharded session takes no scalars (422 before anything was
                # applied): the step goes again without the loss nobody asked to send, and
                # later steps of this optimizer leave it out (a scalar given through
                # record_scalars is still sent, and refused)
                self._loss_scalar = False
                del scalars["loss"]
                self._step(scalars)
        except APIStatusError as exc:  # (a stale push says where the session is)
            self._learn(exc.problem.get("current_version"))
            raise
        return loss

    def _step(self, scalars: dict[str, float], *, retry: bool = False) -> None:
        """:meth:`step` after the closure: send the gradients, copy the new values in.

        A step whose request got no answer (a connection error or a timeout once the client's
        retries were spent: it may or may not have been applied) is remembered with its key;
        the next step (``retry``: one without a closure) that sends the same (the same
        ``p.grad`` tensors at the same versions, the same option changes, from the same
        session version; the scalars it carried unless recorded anew) is that step's retry
        and goes with its key: answered if it was applied, applied if it was not. Anything
        else is a step of its own, with a fresh key (its answer's parameters are the
        session's, whether the unanswered one was applied or not)."""
        self.push_params(only_edited=True)
        # options changed locally (by hand or by any torch scheduler) ride with the step: one
        # round trip, applied atomically with it (a sync round's step is every worker's: there
        # they are PATCHed first)
        changes = self._changed_options()
        if changes and self._worker is not None:
            self._sync_param_groups()
            changes = {}
        # no cyclic collections walking the whole process while a many-tensor step makes and
        # drops its per-tensor objects (none of them cyclic), here and in the client's encoding
        # and decoding; not while the answer is awaited (a sync round waits for the other
        # workers' pushes): see optserve._gc
        tensors = len(self._by_name)
        wire = self._wire_dtype
        with gc_paused(tensors):
            grads = sent_grads = self._grads()
            sparse = any(g.layout != torch.strided for g in grads.values())
            if wire is not None:  # narrower gradients on the wire; the server widens them
                grads = _narrowed(grads, wire, self._narrow)
        base = self._version if self._worker is not None else None
        result = None
        key = uuid.uuid4().hex  # the step's, over either transport
        unanswered, self._unanswered = self._unanswered, None
        sent_changes = _norm(changes)
        if retry and unanswered is not None and unanswered.matches(
                sent_grads, sent_changes, {**unanswered.scalars, **scalars}, self._version):
            # the user's retry of a step that got no answer: its key and its very request
            # (the fingerprint the server keeps covers the scalars and the metrics asked)
            key, scalars = unanswered.key, unanswered.scalars
        local = False
        taken = self._answers.taken  # (a failed step that wrote into it: see _failed)
        try:
            if self._client.transport != "http" and wire is None and not sparse:
                # same host: gradients and new values through shared memory; the parameters
                # live in their slots (zero_copy), or the values are copied from there into
                # them
                result = self._client._step_local(
                    self._session_id, grads, return_params=True, worker=self._worker,
                    base_version=base, param_groups=changes or None, views=True,
                    scalars=scalars or None, metrics="history", key=key)
                local = result is not None
            if result is None:
                # a step the socket may have carried goes over HTTP as the same request (its
                # norms in the history only, as every step asks), so its key's first answer.
                # Straight to HTTP: the same-host path was tried above if this step
                # could take it (Client.step would try it a second time, to fail the same way)
                result = self._client._step_http(
                    self._session_id, grads, return_params="touched" if sparse else True,
                    binary=self._binary, worker=self._worker, base_version=base,
                    param_groups=changes or None, upcast=wire is not None,
                    params_dtype=str(wire).removeprefix("torch.") if wire is not None else None,
                    scalars=scalars or None, into=self._answers,
                    metrics="history", key=key)
        except APIStatusError as exc:
            if exc.status_code == 503:  # (host_restarting: maybe applied; the key is safe)
                self._remember_unanswered(key, sent_grads, sent_changes, scalars)
            self._failed(exc, taken)
            raise  # answered: refused, nothing applied (a retry is a step of its own)
        except BaseException as exc:
            # no answer (a timeout, a broken connection, an interrupt): maybe applied
            self._remember_unanswered(key, sent_grads, sent_changes, scalars)
            self._failed(exc, taken)
            raise
        self._sent(changes)
        self._step_dtypes.stepped(self.param_groups)
        if result.params is not None:
            # (narrowed to float16, a value past its range came back infinite)
            values = (self._widened_where_infinite(result.params) if wire == torch.float16
                      else result.params)
            with gc_paused(tensors):
                self._copy_in(values, slots=local, keep=not sparse)
        if self._refs is not None:
            with gc_paused(tensors):
                self._refs.settle(self._by_name.items(), result.params or ())
        self._at(result.params_at if result.params is not None else result.version)
        self._learn(result.version)
        self._take_lrs(result.lr)

    def _failed(self, exc: BaseException, taken: int) -> None:
        """A step failed: unless it was refused before anything was written where the
        parameters' references may be (a 4xx, no answer read into the kept buffer), each
        reference becomes a copy of its parameter as it is now, which the session holds (the
        edits were sent before the step; a step applied without its answer coming back brings
        its values with its retry)."""
        refs = self._refs
        if refs is None:
            return
        if isinstance(exc, APIStatusError) and 400 <= exc.status_code < 500 \
                and self._answers.taken == taken:
            return
        refs.snapshot(self._by_name.items())

    def _remember_unanswered(self, key: str, grads: Mapping[str, torch.Tensor], changes: Any,
                             scalars: dict[str, float]) -> None:
        self._unanswered = _UnansweredStep(
            key, {n: (weakref.ref(g), g._version) for n, g in grads.items()}, changes,
            dict(scalars), self._version)

    def _widened_where_infinite(self, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The parameters answered narrowed to float16, those holding an infinity pulled again
        at their own width: a finite value past float16's range (65504) narrows to one, and
        the local parameter would then hold it where the server's does not. (Their current
        values: where other workers step the session too, maybe of a later version than the
        answer's, as a pull's are.)"""
        bad = [n for n, t in params.items() if isinstance(t, torch.Tensor) and bool(torch.isinf(
            t._values() if t.layout == torch.sparse_coo else t).any())]
        if not bad:
            return params
        pulled = self._client.get_params(self._session_id, bad, binary=self._binary)
        self._learn(pulled.version)
        wide = pulled.params
        return {**params, **{n: wide[n] for n in bad}}

    def _grads(self) -> dict[str, torch.Tensor]:
        grads: dict[str, torch.Tensor] = {}
        for names, group in zip(self._param_names, self.param_groups, strict=True):
            for name, p in zip(names, group["params"], strict=True):
                if p.grad is not None:
                    grads[name] = p.grad
        return grads

    def _lbfgs_step(self, closure: Callable[[], Any] | None) -> Any:
        """torch's ``LBFGS.step(closure)``, the closure called here at every point the server's
        LBFGS asks for: first at the current parameters (sent with the step's opening), then
        at each point of its line search, until the step ends. Returns the first evaluation's
        loss, as torch's does."""
        if closure is None:
            raise TypeError("LBFGS.step() needs a closure that reevaluates the model and "
                            "returns the loss")
        if self._worker is not None:
            raise RuntimeError("an LBFGS session steps through one client's evaluations; it "
                               "takes no parameter-server workers")
        self.push_params(only_edited=True)
        self._sync_param_groups()
        # the collector paused while the gradients are gathered and the values copied in, as
        # in a step (the client pauses it to encode and decode): not while the closure runs,
        # nor while an answer is awaited (see optserve._gc)
        tensors = len(self._by_name)
        orig_loss: Any = None
        for reopened in range(_LBFGS_REOPENS + 1):
            with torch.enable_grad():
                loss = closure()
            orig_loss = loss if orig_loss is None else orig_loss
            with gc_paused(tensors):
                grads = self._grads()
            answer = self._client.open_evaluation_step(self._session_id, _loss_value(loss),
                                                       grads, binary=self._binary)
            # the values the session holds, put back when the step fails after the parameters
            # took a point the line search tried (a 507 at its commit applies nothing: the next
            # step's first evaluation must be at the session's values, not at that point)
            held: dict[str, torch.Tensor] | None = None
            try:
                while isinstance(answer, EvaluationRequest):
                    with gc_paused(tensors):
                        if held is None:
                            held = {n: p.detach().clone() for n, p in self._by_name.items()}
                        self._copy_in(answer.params)  # the point the line search tries
                    with torch.enable_grad():
                        loss = closure()
                    with gc_paused(tensors):
                        grads = self._grads()
                    answer = self._client.evaluate(self._session_id, answer.evaluation,
                                                   _loss_value(loss), grads,
                                                   binary=self._binary)
            except APIStatusError as exc:
                if held is not None:
                    with gc_paused(tensors):
                        self._copy_in(held)
                # the step is gone (the server restarted, or the step timed out): nothing of it
                # was applied, so it is opened again from the session's values, as torch's
                # step would run from them
                if exc.code in _STEP_GONE and reopened < _LBFGS_REOPENS:
                    continue
                raise
            except BaseException:
                if held is not None:
                    with gc_paused(tensors):
                        self._copy_in(held)
                raise
            break
        assert not isinstance(answer, EvaluationRequest)  # (the loop ends only at the end)
        if answer.params is not None:
            with gc_paused(tensors):
                self._copy_in(answer.params)
        self._at(answer.params_at if answer.params is not None else answer.version)
        self._learn(answer.version)
        self._take_lrs(answer.lr)
        return orig_loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, on the server too.

        An edit of :attr:`state` not sent yet goes first (:meth:`_write_back_state`): when it
        is refused because another client changed the session since the state was read
        (:class:`~optserve.PreconditionFailedError`), nothing of the addition is done, on the
        server or here (no group, no option sent: a local scheduler's fill of a tensor lr the
        defaults hold is sent only after it, then the group). Once the edit is in, a refusal of
        the fill or of the group itself leaves the edit applied, as a step after it would."""
        if getattr(self, "_initializing", True):
            super().add_param_group(param_group)
            self._refuse_duplicates()
            self._refuse_uninitialized()
            return
        _refuse_float64_scalar_steps(self._optimizer_name, self.defaults, [param_group])
        self._check_groups()
        # (keys the optimizer has no option for stay in the local group: see _server_options;
        # a wrapper may have added its own to the defaults, timm's Lookahead its lookahead_*)
        explicit = _without_defaults({k: v for k, v in param_group.items()
                                      if k not in _NOT_OPTIONS and k in self._option_names},
                                     self.defaults)
        self._narrow_floats.check(self._optimizer_name, explicit)
        # an edit of opt.state first: refused (another client changed the session since it
        # was read), nothing of the addition is done, here or there (not the fills below)
        self._write_back_state()
        # the server's defaults as torch's are now: a local scheduler's fills of a tensor lr
        # the defaults hold sent next (the new group starts from them, there as here; other
        # changes ride with the next step as before)
        self._sync_param_groups(fills_only=True)
        self._state_epoch += 1
        self._last_export = None
        super().add_param_group(param_group)
        self._refuse_duplicates()
        self._refuse_uninitialized()
        group = self.param_groups[-1]
        names = self._names_for(group)
        try:
            info = self._client.add_param_group(
                self._session_id, list(zip(names, group["params"], strict=True)),
                binary=self._binary, **explicit,
            )
        except BaseException:
            self.param_groups.pop()
            raise
        self._remember(names, group["params"])
        self._adopt(info)

    def _refuse_uninitialized(self) -> None:
        """The group torch's ``add_param_group`` just appended, taken back with a
        ``ValueError`` when it holds a lazy module's parameter not yet initialized
        (``nn.LazyLinear`` before its first forward). torch's optimizer takes one, its state
        made at the first step; a session is made from the parameters' values, which such a
        parameter does not have yet (it was torch's ``Attempted to use an uninitialized
        parameter in <method 'detach' ...>`` from deep in the encoding)."""
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if torch.nn.parameter.is_lazy(p):
                self.param_groups.pop()
                raise ValueError(
                    f"param_groups[{len(self.param_groups)}] holds an uninitialized parameter "
                    f"(index {i}, a lazy module's): a RemoteOptimizer's session is made from "
                    "the parameters' values; run a forward pass (a dummy batch) through the "
                    "model before making the optimizer")

    def _refuse_duplicates(self) -> None:
        """The group torch's ``add_param_group`` just appended, taken back with a
        ``ValueError`` when it lists a tensor twice. torch takes that with a deprecation
        warning and steps the tensor once for each time it is listed; a session holds each
        entry as a parameter of its own and steps it once (the tensor would end with one
        entry's values), so it cannot be the same training."""
        group = self.param_groups[-1]
        first: dict[int, int] = {}
        for i, p in enumerate(group["params"]):
            j = first.setdefault(id(p), i)
            if j != i:
                self.param_groups.pop()
                raise ValueError(
                    f"param_groups[{len(self.param_groups)}] lists one tensor twice (index "
                    f"{i} is the parameter at index {j}): torch steps such a parameter once "
                    "for each time it is listed (deprecated: 'in future, this will cause an "
                    "error'), a session steps each entry once; list each parameter once")

    def state_dict(self) -> dict[str, Any]:
        """The session's state in torch's format (fetched from the server, or not again while
        the session did not change since the last state read: see :meth:`_export_state`)::

            {"state": {0: {"step": tensor(...), "exp_avg": tensor(...), ...}, ...},
             "param_groups": [{"lr": ..., ..., "params": [0, 1, ...]}, ...]}

        ``torch.save`` it, or load it into a local optimizer of the same class. When the
        session runs a scheduler, its state comes along under ``"scheduler"`` (local torch
        optimizers ignore that key). With ``wire_dtype``, the session's values of the
        parameters that travel narrowed (the master weights, at their own width, of the same
        session version as the state) come along under ``"master_params"`` (``{param id:
        tensor}``, torch's ids): the model's parameters hold them narrowed, and
        :meth:`load_state_dict` of this state dict into a new ``RemoteOptimizer`` with a
        ``wire_dtype`` puts them back into its session, so a run resumed from a checkpoint
        goes on as the uninterrupted one (local torch optimizers ignore that key).

        Keys that code around this optimizer put in ``self.state[p]`` and the session's
        optimizer does not keep (timm's ``Lookahead``: ``lookahead_slow_buff``) are in each
        parameter's entry beside the session's, the tensors themselves, as torch's
        ``state_dict()`` holds them; so are keys of ``param_groups`` that are no option of it
        (``lookahead_k``, a group's ``"name"``).

        The session's tensors in it are those :attr:`state` then holds, as torch's
        ``state_dict()`` holds its state's own tensors: one edited in place
        (``sd["state"][0]["exp_avg"].mul_(0.5)``) is an edit of :attr:`state`, sent before the
        next step. (Unlike torch's, each entry is a dict of its own: a key assigned or
        deleted in it is not an edit of the state; and a step replaces the state's tensors,
        so an edit of the returned ones after a step changes nothing.)"""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._check_groups()
        self._write_back_state()
        self.push_params(only_edited=True)
        self._sync_param_groups()
        sd, masters, version = self._export_with_masters()
        groups = []
        for local, server in zip(self.param_groups, sd["param_groups"], strict=True):
            # in the local group's key order, "params" last, as torch's state_dict() packs
            # them (the session's values of its options, the local keys it has no option for)
            packed = {k: (list(v) if k == "param_names" else
                          _as_given(server[k], v) if k in server else v)
                      for k, v in local.items() if k != "params"}
            packed.update({k: v for k, v in server.items()
                           if k not in _NOT_OPTIONS and k not in packed})
            packed["params"] = list(server["params"])
            groups.append(packed)
        _link_as(groups, self.param_groups)
        exported: dict[torch.Tensor, Any] = {}
        for group, server in zip(self.param_groups, sd["param_groups"], strict=True):
            for p, index in zip(group["params"], server["params"], strict=True):
                if index in sd["state"]:
                    exported[p] = sd["state"][index]
        # (its tensors become opt.state's: one edited in place is an edit of the state, sent
        # before the next step, as torch's state_dict() holds its state's tensors themselves)
        self._state_view.take(exported, version)
        state_dict: dict[str, Any] = {"state": self._with_client_state(sd), "param_groups": groups}
        if "scheduler" in sd:
            state_dict["scheduler"] = sd["scheduler"]
        if masters:
            state_dict[MASTER_PARAMS] = masters
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Import a state dict into the session (one from :meth:`state_dict`, a ``torch.load``
        of it, or a local optimizer's of the same class) and take its group options locally,
        as torch does. With ``wire_dtype``, its ``"master_params"`` (see :meth:`state_dict`)
        then become the session's parameters (each checked first: one of this optimizer's
        ids, a tensor of its parameter's shape and dtype, else a ``ValueError`` and nothing
        sent); without, they are ignored, as a local optimizer ignores them.

        Each parameter's entry is split first: the keys the session's optimizer keeps (worked
        out by torch's class of that name here, with the state dict's group options:
        ``optserve._state_keys``) go to the session, the others (a wrapper's, such as timm's
        ``Lookahead``'s ``lookahead_slow_buff``) become this optimizer's client-side state,
        in ``self.state[p]`` beside the session's keys and in :meth:`state_dict`; the state
        dict's group keys that are no option of the session's optimizer stay in the local
        groups. It replaces the client-side state as a whole (what the state dict does not
        hold is dropped), once the session took its part.

        As torch's, it replaces the whole state: an edit of :attr:`state` not sent yet is
        replaced with it, never sent (nor refused as made on a state another client changed
        since it was read), and the import is not conditional on any version read before: it
        overwrites whatever other clients did to the session's state meanwhile, as loading a
        checkpoint means to. Parameters edited locally (``model.load_state_dict`` of the same
        checkpoint first) are sent after the import (:meth:`push_params`)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_groups()
        state_dict = _positional_ids(state_dict)
        saved_groups = deepcopy(state_dict["param_groups"])
        _fill_as_torch_loads(self._optimizer_name, saved_groups)
        if len(self.param_groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for saved, synced in zip(saved_groups, self._synced, strict=True):
            self._narrow_floats.check(self._optimizer_name,
                                      {k: v for k, v in saved.items() if k in synced})
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group "
                    "that doesn't match the size of optimizer's group"
                )
        masters = self._masters_to_load(state_dict.get(MASTER_PARAMS), saved_groups)
        saved_ids = [list(saved["params"]) for saved in saved_groups]
        session_state, client_state = self._split_state(
            state_dict.get("state", {}),
            [{**{k: v for k, v in group.items() if k not in _NOT_OPTIONS},
              **{k: v for k, v in saved.items() if k not in _NOT_OPTIONS}}
             for group, saved in zip(self.param_groups, saved_groups, strict=True)],
            saved_ids)
        if "state" in state_dict:
            state_dict["state"] = _steps_as_the_session_keeps(session_state,
                                                              self._optimizer_name)
        # (no write-back of an edit of opt.state not sent yet, nor is the import conditional
        # on the version opt.state was read at: torch's load replaces the state whole, the
        # edit with it; parameters edited locally, a checkpoint's model loaded first, are sent
        # after it, so that nothing moves the session before it)
        self._state_epoch += 1
        self._last_export = None
        # groups holding one tensor (a tensor lr default's groups, as torch.save keeps them)
        # stay one tensor in the session only as a torch.save file says it (docs/protocol.md)
        info = self._client.import_state(
            self._session_id, self._importable(state_dict, saved_groups),
            format="torch" if _groups_share_tensors(saved_groups) else
            "safetensors" if self._binary else "json")
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        self.param_groups = new_groups
        by_id = {int(index): p
                 for group, group_ids in zip(self.param_groups, saved_ids, strict=True)
                 for p, index in zip(group["params"], group_ids, strict=True)
                 if isinstance(index, (int, str)) and str(index).isdigit()}
        self._state_view.keep_only({by_id[index]: entry for index, entry in client_state.items()
                                    if index in by_id})
        if isinstance(session_state, Mapping):
            self._step_dtypes.replaced(
                {by_id[int(index)]: entry for index, entry in session_state.items()
                 if isinstance(index, (int, str)) and str(index).isdigit()
                 and int(index) in by_id}, self.param_groups)
        self._imported(info)
        self.push_params(only_edited=True)
        if masters:
            # the session's parameters at their own width; the local ones keep the narrowed
            # values the model was loaded with, as after a step (nothing to send at the next)
            self._at(self._client.put_params(self._session_id, masters,
                                             binary=self._binary).version)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _export_state(self, fmt: StateFormat) -> tuple[dict[str, Any], int | None]:
        """The session's state dict and the version it is of, its tensors as torch's would be
        (:meth:`_as_torch_keeps`): read on the condition that the session changed since the
        last one read (``If-None-Match`` its state tag, see ``optserve._last_export``), else
        (a 304) that one again, its tensors the same. What is kept for that is what is
        handed out: the tensors as laid out, not the ones that came off the wire (kept, those
        were a second copy of every state tensor laid out anew, a channels_last parameter's,
        held until the next step)."""
        last = self._last_export
        if last is not None and self._worker is not None and self._state_view.edited():
            # (a worker's edit of the state stays local, never sent: the tensors edited, also
            # through .data, which moves no version counter, are no longer the session's, and
            # a 304 would hand them out again as its state)
            last = None
        got = self._client._export_state_if_changed(self._session_id, fmt, last)
        if not got.not_modified:
            self._as_torch_keeps(got.state_dict)
            got = got.kept_as_given()
        self._last_export = got
        return got.state_dict, got.version

    def _as_torch_keeps(self, sd: dict[str, Any]) -> None:
        """The session's exported ``sd`` with each parameter's state laid out
        (``optserve._state_layout``) and its step count typed (``optserve._step_dtypes``) as
        torch's optimizer would keep it (changed in place)."""
        state = sd["state"]
        for group, server in zip(self.param_groups, sd["param_groups"], strict=True):
            for p, index in zip(group["params"], server["params"], strict=True):
                entry = state.get(index)
                if entry is not None:
                    state[index] = self._step_dtypes.as_torch_keeps(
                        p, laid_out_as_torch(p, entry))

    def _narrowed_names(self) -> list[str]:
        """The parameters whose values travel narrowed (``wire_dtype``: floating ones wider
        than it), by name."""
        wire = self._wire_dtype
        if wire is None:
            return []
        return [name for name, p in self._by_name.items()
                if p.is_floating_point() and p.element_size() > wire.itemsize]

    def _export_with_masters(self) -> tuple[dict[str, Any], dict[int, torch.Tensor], int | None]:
        """The session's state dict, with ``wire_dtype`` the values of the parameters that
        travel narrowed at that same session version, by torch's param id (exported again
        when another worker's step came between the two reads), and that version."""
        fmt: StateFormat = "safetensors" if self._binary else "json"
        narrowed = self._narrowed_names()
        for attempt in range(1, MASTER_READ_ATTEMPTS + 1):
            sd, version = self._export_state(fmt)
            self._learn(version)  # (opt.state read next is not older than this)
            if not narrowed:
                return sd, {}, version
            try:
                pulled = self._client.get_params(self._session_id, narrowed,
                                                 binary=self._binary, at_version=version)
            except PreconditionFailedError:
                if attempt == MASTER_READ_ATTEMPTS:
                    raise
                continue
            ids = {name: index
                   for names, server in zip(self._param_names, sd["param_groups"], strict=True)
                   for name, index in zip(names, server["params"], strict=True)}
            return sd, {ids[name]: torch.as_tensor(pulled.params[name]).clone()
                        for name in narrowed}, version
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def _masters_to_load(self, masters: Any, saved_groups: list[dict[str, Any]]
                         ) -> dict[str, torch.Tensor]:
        """A state dict's ``"master_params"`` as the session's parameters to put, by name,
        each checked against this optimizer's parameter of that id (the state dict's group
        ids, in order, as torch maps its state): nothing when this optimizer has no
        ``wire_dtype`` or the state dict carries none."""
        if masters is None or self._wire_dtype is None:
            return {}
        if not isinstance(masters, Mapping):
            raise ValueError(f"the state dict's {MASTER_PARAMS!r} must map param ids to "
                             f"tensors, not {type(masters).__name__}")
        by_id = {int(index): (name, p)
                 for names, group, saved in zip(self._param_names, self.param_groups,
                                                saved_groups, strict=True)
                 for name, p, index in zip(names, group["params"], saved["params"],
                                           strict=True)}
        out: dict[str, torch.Tensor] = {}
        for index, value in masters.items():
            found = by_id.get(int(index)) if isinstance(index, (int, str)) \
                and str(index).isdigit() else None
            if found is None:
                raise ValueError(f"the state dict's {MASTER_PARAMS!r} names param id "
                                 f"{index!r}, which none of its param groups holds")
            name, p = found
            if not isinstance(value, torch.Tensor) or value.shape != p.shape \
                    or value.dtype != p.dtype:
                what = (f"a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                        f"{list(value.shape)}" if isinstance(value, torch.Tensor)
                        else type(value).__name__)
                raise ValueError(f"the state dict's {MASTER_PARAMS!r} holds {what} for param "
                                 f"{index} ({name!r}), whose parameter is a "
                                 f"{str(p.dtype).removeprefix('torch.')} tensor of shape "
                                 f"{list(p.shape)}")
            out[name] = value
        return out

    def _importable(self, state_dict: Mapping[str, Any], groups: list[dict[str, Any]]
                    ) -> dict[str, Any]:
        """What of a state dict the session takes: its state, its groups' options and the
        keys a scheduler adds (``initial_lr``, ...), and its server scheduler's state. Torch's
        ``load_state_dict`` takes any state dict and keeps whatever its groups hold: keys the
        session has no option for (a group's ``"name"``, SWALR's ``swa_lr``) stay in the local
        groups, and other top-level keys (one a state-dict hook added) are ignored, as torch
        ignores them."""
        out = {k: state_dict[k] for k in _STATE_DICT_KEYS if k in state_dict}
        out["param_groups"] = [
            {k: v for k, v in g.items()
             if k in _NOT_OPTIONS or k in synced or k in _SCHEDULER_GROUP_KEYS}
            for g, synced in zip(groups, self._synced, strict=True)]
        return out

    def _split_state(self, state: Any, options: list[dict[str, Any]],
                     ids: list[list[Any]]) -> tuple[Any, dict[int, dict[Any, Any]]]:
        """A state dict's ``"state"`` as what the session's optimizer keeps and the client's
        keys by param id (``optserve._state_keys``): ``options`` each group's options, ``ids``
        each group's param ids in the state dict. Anything but a mapping goes to the session
        as it is (which refuses it)."""
        if not isinstance(state, Mapping):
            return state, {}
        keys = _state_keys.state_keys(self._optimizer_name, options,
                                      [group["params"] for group in self.param_groups])
        by_id: dict[int, _state_keys.Keys] = {}
        for group_ids, group_keys in zip(ids, keys, strict=True):
            for index, kept in zip(group_ids, group_keys, strict=True):
                if isinstance(index, (int, str)) and str(index).isdigit():
                    by_id[int(index)] = kept
        return _state_keys.split_state(state, by_id)

    def _with_client_state(self, sd: dict[str, Any]) -> dict[Any, Any]:
        """The session's exported ``"state"`` with the client's keys of each parameter's entry
        (:meth:`SessionState.client_entries`) merged in, after the session's; a parameter with
        only the client's keys gets an entry of them, after the others."""
        state: dict[Any, Any] = sd["state"]
        kept = self._state_view.client_entries()
        if not kept:
            return state
        ids = {id(p): index
               for group, server in zip(self.param_groups, sd["param_groups"], strict=True)
               for p, index in zip(group["params"], server["params"], strict=True)}
        for p, entry in kept.items():
            index = ids.get(id(p))
            if index is None:
                continue
            held = state.get(index)
            if isinstance(held, dict):
                held.update({k: v for k, v in entry.items() if k not in held})
            else:
                state[index] = dict(entry)
        return state

    def _session_state(self) -> tuple[dict[torch.Tensor, Any], int | None]:
        """The session's state keyed by this optimizer's parameters (see :attr:`state`), and
        the session version it is of."""
        if not hasattr(self, "_session_id"):
            return {}, None
        self._check_groups()
        sd, version = self._export_state("safetensors" if self._binary else "json")
        self._learn(version)
        state: dict[torch.Tensor, Any] = {}
        for group, server in zip(self.param_groups, sd["param_groups"], strict=True):
            for p, index in zip(group["params"], server["params"], strict=True):
                entry = sd["state"].get(index)
                if entry is not None:
                    state[p] = entry
        return state, version

    # ------------------------------------------------------------------ extras
    def push_params(self, *, only_edited: bool = False) -> None:
        """Send the local parameter values to the session (``PUT .../params``); with
        ``only_edited``, only those edited since the last step (in place, or through
        ``p.data`` with ``detect_data_edits``: see :meth:`_locally_edited`). Edits of
        :attr:`state` not sent yet go first, as a step sends them (:meth:`_write_back_state`)."""
        # (the comparisons make views of every parameter: the collector paused, see
        # optserve._gc)
        with gc_paused(len(self._by_name) if only_edited else 0):
            params = self._locally_edited() if only_edited else dict(self._by_name)
        if not params:
            return
        # (an edit of opt.state first: the push's newer version would have the next read of
        # opt.state fetch the state again, dropping the edit before the step that sends it)
        self._write_back_state()
        self._at(self._client.put_params(self._session_id, params,
                                         binary=self._binary).version)
        for name, p in params.items():
            self._seen_version[name] = p._version
        if self._refs is not None:
            with gc_paused(len(params)):
                self._refs.snapshot(params.items())

    def pull_params(self) -> None:
        """Copy the session's current parameter values into the local tensors (e.g. after
        other workers stepped the same session); with ``wire_dtype``, pulled narrowed on the
        wire (``?params_dtype=``) as a step's answer is, so the model holds the session's
        values narrowed after a pull or a join as after a step (in float16, a parameter that
        came back infinite is pulled again at its own width, as a step's answer is: a value
        past 65504 narrows to an infinity the session does not hold). An edit of
        :attr:`state` not sent yet stays as edited when the pull shows a newer session
        version (another client's steps), not replaced unsaid by a fetch of that version's
        state: the next step then refuses it (:class:`~optserve.PreconditionFailedError`, see
        :meth:`_write_back_state`) rather than import it over the other client's steps."""
        wire = self._wire_dtype
        result = self._client.get_params(
            self._session_id, binary=self._binary,
            params_dtype=None if wire is None else str(wire).removeprefix("torch."))
        values = (self._widened_where_infinite(result.params) if wire == torch.float16
                  else result.params)
        with gc_paused(len(values)):  # (the copies: see optserve._gc)
            self._copy_in(values)
        self._at(result.version)

    def _release_when_dropped(self) -> None:
        """Garbage collected without :meth:`close` on a client that outlives it, this optimizer
        lets go of its session's same-host binding (the segment, in the server and here) at
        the client's next step on each thread, as a dropped ``torch.optim`` optimizer frees
        its memory (the session stays, as :meth:`close` leaves it)."""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if not self._owns_client:  # (a client of its own goes with it, its channels too)
            self._finalizer = weakref.finalize(self, _release_later, weakref.ref(self._client),
                                               self._session_id)

    def close(self, *, delete_session: bool = False) -> None:
        """Optionally delete the server session, then close the client if this optimizer made
        it, else let go of the session's same-host binding on it (bound again if the session
        is stepped through the client later)."""
        try:
            if delete_session:
                self._client.delete_session(self._session_id)
        finally:
            if self._owns_client:
                self._client.close()
            else:
                finalizer = self.__dict__.get("_finalizer")
                if finalizer is not None:
                    finalizer.detach()
                self._client._release_local(self._session_id)

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leaving a ``with`` block deletes the session this optimizer created (a worker that
        joined a session leaves it be) and closes the client it made. To keep the session,
        call :meth:`close` yourself instead. When the block already raised, a failure to
        delete (say, the server went away) does not hide that exception."""
        if exc is None:
            self.close(delete_session=self._worker is None)
            return
        try:
            self.close(delete_session=self._worker is None)
        except OptserveError:
            pass

    def __getstate__(self) -> dict[str, Any]:
        """Refused (``pickle``, ``copy.copy``, ``copy.deepcopy``): a copy would step the same
        server session as this one, or none."""
        session = getattr(self, "_session_id", None)
        raise TypeError(
            "a RemoteOptimizer cannot be pickled or copied (pickle, copy.copy, copy.deepcopy): "
            f"it stands for the server session {session!r} and holds its client's "
            "connections. Save or copy its state_dict() instead and load_state_dict() it into "
            "another optimizer (a new RemoteOptimizer, or a local one of the same class); to "
            "copy a model, keep the optimizer out of what you deepcopy")


#: the classes :func:`_named_class` made, by optimizer name
_NAMED_CLASSES: dict[str, type[RemoteOptimizer]] = {}


def _named_class(optimizer: str) -> type[RemoteOptimizer]:
    """``RemoteOptimizer`` under the name of the session's optimizer: a subclass with nothing
    of its own but its ``__name__`` (``"Adam"``; ``__qualname__`` ``"RemoteOptimizer[Adam]"``,
    so ``type(opt)`` shows ``<class 'optserve._optimizer.RemoteOptimizer[Adam]'>``), one per
    name. ``isinstance(opt, RemoteOptimizer)`` holds; ``isinstance(opt, torch.optim.Adam)``
    does not (the update is the session's, not that class's code here)."""
    named = _NAMED_CLASSES.get(optimizer)
    if named is None:
        named = type(optimizer, (RemoteOptimizer,), {
            "__module__": RemoteOptimizer.__module__,
            "__qualname__": f"RemoteOptimizer[{optimizer}]",
            "__doc__": f"A RemoteOptimizer whose session runs torch.optim.{optimizer}."})
        _NAMED_CLASSES[optimizer] = named
    return named


def _release_later(client: weakref.ref[Client], session_id: str) -> None:
    """A dropped optimizer's finalizer: its session's bindings on ``client`` are let go at
    their channels' next step (a finalizer takes no lock: ``Client._release_local_later``)."""
    found = client()
    if found is not None:
        found._release_local_later(session_id)


def _tensor_options(group: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A group's options that are tensors (a tensor lr), by key."""
    return {k: v for k, v in group.items()
            if k not in _NOT_OPTIONS and isinstance(v, torch.Tensor)}


def _link_as(groups: list[dict[str, Any]], local: list[dict[str, Any]]) -> None:
    """Make the options of ``groups`` (a state dict's, as the session exported them: a tensor
    each) one tensor where the ``local`` groups' are one tensor object, as torch's
    ``state_dict()`` holds them (a ``torch.save`` of it keeps them one)."""
    first: dict[int, Any] = {}
    for group, mine in zip(groups, local, strict=True):
        for key, value in mine.items():
            if key in _NOT_OPTIONS or not isinstance(value, torch.Tensor):
                continue
            held = group.get(key)
            target = first.setdefault(id(value), held)
            if isinstance(held, torch.Tensor) and isinstance(target, torch.Tensor) \
                    and held.dtype == target.dtype and held.shape == target.shape \
                    and torch.equal(held, target):
                group[key] = target


def _groups_share_tensors(groups: list[dict[str, Any]]) -> bool:
    """Whether two of the groups' options are one tensor object."""
    seen: set[int] = set()
    for group in groups:
        for key, value in group.items():
            if key not in _NOT_OPTIONS and isinstance(value, torch.Tensor):
                if id(value) in seen:
                    return True
                seen.add(id(value))
    return False


def _as_torch_makes(optimizer: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with each list that torch's own constructor of ``optimizer`` holds as a
    tuple (Adam's and AdamW's ``betas``) as that tuple, so that the defaults, and the groups
    that take them, hold what a local optimizer's would. Others keep the list given, as torch
    does (NAdam's ``betas``, Rprop's ``etas``). Worked out by torch itself: its class made here
    on one placeholder tensor (nothing changes when there is no such class here, or it refuses
    the options: the server's create then says what is wrong)."""
    lists = [k for k, v in options.items() if type(v) is list]
    local = getattr(torch.optim, optimizer, None)
    if not lists or not (isinstance(local, type) and issubclass(local, torch.optim.Optimizer)):
        return options
    try:
        made = local([torch.zeros(1, requires_grad=True)], **options).defaults
    except Exception:  # noqa: BLE001 - the server's create answers what is wrong
        return options
    return {**options, **{k: made[k] for k in lists
                          if type(made.get(k)) is tuple and len(made[k]) == len(options[k])}}


def _in_form_of(value: Any, local: Any) -> Any:
    """A server's option ``value`` (pairs decoded as tuples) as a list where the local group
    holds that option as a list of the same length (torch's groups hold the object given:
    NAdam's ``betas=[0.9, 0.99]`` stays a list in a local optimizer's state_dict)."""
    if type(local) is list and type(value) is tuple and len(value) == len(local):
        return list(value)
    return value


def _as_given(value: Any, local: Any) -> Any:
    """A server's option ``value`` for a state dict: the local group's object itself where it
    holds that value (torch's groups hold the object given, and its state dict packs them: a
    NumPy ``float64`` lr, ``betas=(np.float64(0.9), 0.999)``, a bool), else the server's (as
    :func:`_in_form_of`). A tensor option is the server's (a copy, of the session's value)."""
    if (not isinstance(local, torch.Tensor) and not isinstance(value, torch.Tensor)
            and _same(_norm(local), _norm(value))):
        return local
    return _in_form_of(value, local)


def _without_defaults(options: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A group's ``options`` less those that are the defaults' very tensor object: left out, the
    session's group takes the defaults' tensor, so the two stay one tensor there as they are in
    torch (a scheduler's fill moves both)."""
    return {k: v for k, v in options.items()
            if not (isinstance(v, torch.Tensor) and v is defaults.get(k))}


def _link_shared(defaults: dict[str, Any], groups: list[dict[str, Any]],
                 shared: list[list[tuple[str | int, str]]]) -> None:
    """Make the option slots the session holds as one tensor (its description's
    ``shared_tensors``) one tensor object here too: the first slot's (the defaults' where they
    are among them), as torch's groups built from a tensor default hold it. Slots that hold
    no tensor alike here are left as they are."""
    def held(slot: tuple[str | int, str]) -> Any:
        where, key = slot
        if where == "defaults":
            return defaults.get(key)
        return groups[where].get(key) if type(where) is int and 0 <= where < len(groups) \
            else None

    for slots in shared:
        target = held(slots[0])
        if not isinstance(target, torch.Tensor):
            continue
        for where, key in slots[1:]:
            value = held((where, key))
            if isinstance(value, torch.Tensor) and value.dtype == target.dtype \
                    and value.shape == target.shape:
                if where == "defaults":
                    defaults[key] = target
                else:
                    groups[int(where)][key] = target


def _order_keys(group: dict[str, Any], order: list[str]) -> None:
    """``group``'s keys, in place, in the ``order`` given (keys it does not list after them, as
    they are): torch's groups hold the keys given first, then its ``param_names``, then its
    defaults in the order its class makes them (``lr``, ``momentum``, ``dampening``, ...),
    whatever order the options were passed in; ``state_dict()`` packs them in that order."""
    ranked = {k: group[k] for k in order if k in group}
    ranked.update(group)
    group.clear()
    group.update(ranked)


def _fill_as_torch_loads(optimizer: str, groups: Any) -> None:
    """Fill in the options a state dict's ``groups`` lack as torch's ``load_state_dict`` does:
    it ends with the class's ``__setstate__``, which sets the options newer torch versions
    added (Adam's ``maximize``, ``foreach``, ``capturable``, ``differentiable``, ``fused``,
    ``decoupled_weight_decay``, ...) to their defaults where a checkpoint saved by an older
    torch has none. Run here by torch's own ``__setstate__`` of ``optimizer``'s class on a
    bare instance, the groups' param ids standing for the parameters (no state: the step
    counts it converts are converted where the session takes them,
    :func:`_steps_as_the_session_keeps`). Nothing changes when there is no such class here,
    or it fails on the groups (the import then says what is wrong with them); an option its
    ``__setstate__`` does not fill stays missing, as torch leaves it (the import refuses
    it)."""
    local = getattr(torch.optim, optimizer, None)
    if not (isinstance(local, type) and issubclass(local, torch.optim.Optimizer)) \
            or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return
    bare = local.__new__(local)
    bare.defaults = {}
    try:
        local.__setstate__(bare, {"state": {}, "param_groups": groups})
    except Exception:  # noqa: BLE001, S110 - the import answers what is wrong with them
        pass


#: the longest parameter name a session takes (``app.engine.session.MAX_NAME``), and the one
#: it keeps for its wire formats (``RESERVED_NAMES``)
_MAX_NAME = 512
_RESERVED_NAME = "__metadata__"


def _optimizer_name(optimizer: object) -> str:
    """The session's optimizer from ``RemoteOptimizer``'s ``optimizer`` argument: its name
    (``"Adam"``), or torch's class itself (``torch.optim.AdamW``, as code that makes its
    optimizer from a class passes it). Anything else is a ``TypeError`` saying so: a learning
    rate passed where ``torch.optim.Adam(params, 1e-3)`` takes it was ``attribute name must be
    string, not 'float'``."""
    if isinstance(optimizer, str):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        name: str = optimizer.__name__
        if getattr(torch.optim, name, None) is optimizer:
            return name
        raise TypeError(f"a session runs torch.optim's own optimizer classes (by name, or the "
                        f"class itself); {optimizer.__module__}.{name} is not one of them, "
                        "and its code cannot run on the server")
    hint = (f"; pass the learning rate as lr={optimizer!r}"
            if isinstance(optimizer, (numbers.Number, torch.Tensor)) else "")
    raise TypeError(
        "RemoteOptimizer's second argument is the optimizer: the name of a torch.optim class "
        f"(\"Adam\", \"SGD\", ...) or the class itself, not {type(optimizer).__name__} "
        f"{optimizer!r:.60}{hint}")


def _session_name(name: str) -> str:
    """``name`` as the session's name of a parameter: itself when a session takes it, else (an
    empty name, one past 512 characters, the wire formats' ``"__metadata__"``: torch's
    ``param_names`` are labels and may be anything) a stand-in of at most 500 of its first
    characters and a ``"#"`` (made unique like any other, :meth:`RemoteOptimizer._unique`).
    The groups keep the names given, as torch's do; the session's serve its history, pulls
    and parameter-server joins (which name their parameters the same way)."""
    if 0 < len(name) <= _MAX_NAME and name != _RESERVED_NAME:
        return name
    return f"{name[:500]}#"


def _is_index(param_id: Any) -> bool:
    """A param id the session takes as one: a whole number (or its digits, as JSON keeps
    them)."""
    return (isinstance(param_id, int) and not isinstance(param_id, bool)) or (
        isinstance(param_id, str) and param_id.isdigit())


def _positional_ids(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with its param ids numbered by position across its groups when any is
    not a number. torch's ``load_state_dict`` maps the saved ids to the optimizer's
    parameters by position, whatever they are (any hashable): ``torch.distributed.checkpoint``'s
    ``set_optimizer_state_dict`` hands it the parameters' names (``"0.weight"``). The
    session's import takes integer ids, so names become the numbers torch's own
    ``state_dict()`` would give, in ``param_groups``, ``state`` and ``"master_params"`` alike
    (an entry of ``state`` under an id no group lists is left as it is). Numbered ids are
    left as they are."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        return state_dict  # (refused further on, as before)
    ids = [i for g in groups for i in g["params"]]
    if all(_is_index(i) for i in ids):
        return state_dict
    try:
        position = {i: n for n, i in enumerate(ids)}  # (a repeated id: its last, as torch)
    except TypeError:
        return state_dict  # an unhashable id: torch's load fails on it too, as the import
    out = dict(state_dict)
    out["param_groups"] = [{**g, "params": [position[i] for i in g["params"]]} for g in groups]
    for key in ("state", MASTER_PARAMS):
        entries = state_dict.get(key)
        if isinstance(entries, Mapping):
            out[key] = {position.get(k, k): v for k, v in entries.items()}
    return out


def _refuses_scalars(exc: APIStatusError) -> bool:
    """The session takes no step scalars (a sharded one: 422 ``not_supported_here`` naming
    ``scalars``, answered before anything was applied)."""
    return (exc.status_code == 422 and exc.code == "not_supported_here"
            and exc.field == "scalars")
