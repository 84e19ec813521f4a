"""The optimizers a session can run (real ``torch.optim`` classes), their default options,
and the checks that turn JSON options into constructor arguments.

Validation reuses torch's own: options are tried on a throwaway optimizer over tiny tensors
(constructed and stepped once) before a session is touched, so torch's ``ValueError`` becomes a
422 and the session stays as it was.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from app.errors import Invalid, shown
from app.wire.integers import OPTION_INTS
from app.wire.json_tensor import decode_json_tensor, is_json_tensor
from app.wire.tree import is_float_tag, untag_float

SUPPORTED = (
    "Adafactor", "Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "LBFGS", "Muon",
    "NAdam", "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam",
)
#: the optimizers stepped with pushed gradients (LBFGS steps through evaluations, SparseAdam
#: takes only row-sparse gradients: see app.engine.sparse and app.engine.evaluations)
GRADIENT_STEPPED = tuple(n for n in SUPPORTED if n not in ("LBFGS", "SparseAdam"))
UNSUPPORTED: dict[str, str] = {}
# Options whose default is None, and the type they take when given.
_NONE_DEFAULT_TYPES: dict[str, tuple[type, ...]] = {
    "foreach": (bool,),
    "fused": (bool,),
    "adjust_lr_fn": (str,),
}
#: the options a tensor may hold: lr, and the copy of it a scheduler keeps (torch clones a
#: tensor lr into the group's initial_lr; a session's own state dict carries it back)
_TENSOR_OPTIONS = ("lr", "initial_lr")
# Words in torch's messages that point at an option (first match wins: "_foreach ops don't
# support autograd" is about differentiable, unless only foreach was given).
_MESSAGE_HINTS = (
    ("autograd", "differentiable"), ("_foreach", "foreach"),
    # (Muon's "Adjust learning rate function ... is not supported", "Number of steps must be
    # less than 100": they were blamed on lr and, "eps" read in "steps", on eps)
    ("adjust learning rate function", "adjust_lr_fn"), ("number of steps", "ns_steps"),
    # (schedulers': LinearLR's factors, ReduceLROnPlateau's min_lr kept as min_lrs; they named
    # only scheduler.options)
    ("starting multiplicative factor", "start_factor"),
    ("ending multiplicative factor", "end_factor"), ("min_lrs", "min_lr"),
    ("learning rate", "lr"), ("beta", "betas"), ("epsilon", "eps"), ("eps", "eps"),
    ("weight_decay", "weight_decay"), ("weight decay", "weight_decay"),
    # (a weight_decay of true: torch adds the parameter with it as alpha)
    ("boolean alpha", "weight_decay"),
    ("momentum", "momentum"), ("nesterov", "nesterov"), ("dampening", "dampening"),
    ("eta values", "etas"),
    # (LBFGS's line search with max_eval < 1: "cannot access local variable 'bracket_f'")
    ("no evaluation left", "max_eval"),
)


def optimizer_class(name: object) -> type[torch.optim.Optimizer]:
    if not isinstance(name, str):
        raise Invalid("optimizer must be a string naming a torch.optim class",
                      code="unknown_optimizer", field="optimizer")
    if name in UNSUPPORTED:
        raise Invalid(UNSUPPORTED[name], code="unsupported_optimizer", field="optimizer")
    if name not in SUPPORTED or not hasattr(torch.optim, name):
        raise Invalid(f"unknown optimizer {name!r:.60}; supported: {', '.join(SUPPORTED)}",
                      code="unknown_optimizer", field="optimizer")
    cls: type[torch.optim.Optimizer] = getattr(torch.optim, name)
    return cls


def default_options(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default for n, p in sig.parameters.items()
        if n not in ("self", "params") and p.default is not inspect.Parameter.empty
    }


def catalogue() -> dict[str, Any]:
    """What ``GET /v1/optimizers`` lists."""
    return {
        "optimizers": [
            {"name": n, "defaults": default_options(getattr(torch.optim, n))}
            for n in SUPPORTED if hasattr(torch.optim, n)
        ],
        "unsupported": [{"name": n, "reason": r} for n, r in UNSUPPORTED.items()],
    }


def _is_number(x: object) -> bool:
    """A JSON number, or a bool: torch takes a bool where it takes a number (an int subclass:
    its checks, ``0.0 <= lr``, pass, and it steps with its value), so a session does too, and
    holds the bool as given (its groups, state dict and answers give back ``true``)."""
    return type(x) in (bool, int, float)


def _option_value(name: str, value: Any, default: Any, field: str) -> Any:
    """One JSON option value to what the torch constructor takes, type-checked by its default."""
    if is_float_tag(value):
        value = untag_float(value, field, "invalid_option")
    if is_json_tensor(value) or isinstance(value, torch.Tensor):
        # (base64 as servers before the canonical check took it: records replay as they ran;
        # requests are checked where they are parsed, app.api.requests)
        tensor = value if isinstance(value, torch.Tensor) else decode_json_tensor(
            value, field, canonical=False)
        if name not in _TENSOR_OPTIONS or not tensor.is_floating_point():
            raise Invalid("only lr may be given as a tensor (and initial_lr, the scheduler's "
                          "copy of a tensor lr), and only as a floating tensor",
                          code="invalid_option", field=field)
        # Its size is torch's to check ("Tensor lr must be 1-element"), in the probe.
        return tensor.detach().clone()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise Invalid(f"{name} must be true or false, got {shown(value, 40)}",
                          code="invalid_option", field=field)
        return value
    if _is_number(default):
        if not _is_number(value):
            raise Invalid(f"{name} must be a number, got {shown(value, 40)}",
                          code="invalid_option", field=field)
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise Invalid(f"{name} must be a list of {len(default)} values, got {shown(value, 60)}",
                          code="invalid_option", field=field)
        items = []
        for i, (v, d) in enumerate(zip(value, default, strict=True)):
            if is_float_tag(v):  # (as a session's export writes a non-finite element)
                v = untag_float(v, f"{field}.{i}", "invalid_option")
            if is_json_tensor(v) or isinstance(v, torch.Tensor):
                # (torch takes Adam's betas as tensors; a JSON tensor shown as a dict said
                # only "must be a number, got {'data': ...")
                raise Invalid(f"{field}.{i} is a tensor: only lr may be given as a tensor (and "
                              "initial_lr, the scheduler's copy of a tensor lr); give "
                              f"{name} as numbers", code="invalid_option", field=f"{field}.{i}")
            if not (_is_number(v) or (v is None and d is None)):
                raise Invalid(f"{field}.{i} must be a number, got {shown(v, 40)}",
                              code="invalid_option", field=f"{field}.{i}")
            items.append(v)
        return tuple(items)
    if default is None:
        allowed = _NONE_DEFAULT_TYPES.get(name, (bool, int, float, str))
        if value is not None and (type(value) not in allowed):
            kinds = " or ".join(t.__name__ for t in allowed)
            raise Invalid(f"{name} must be null or {kinds}, got {shown(value, 40)}",
                          code="invalid_option", field=field)
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise Invalid(f"{name} must be a string", code="invalid_option", field=field)
        return value
    raise Invalid(f"option {name} cannot be set over the wire", code="invalid_option",
                  field=field)


def normalize_options(
    cls: type[torch.optim.Optimizer],
    options: object,
    field: str,
    extra_keys: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON options to constructor keyword arguments; unknown names and wrong types are 422."""
    if not isinstance(options, dict):
        raise Invalid("options must be a JSON object", code="invalid_option", field=field)
    defaults = default_options(cls)
    # the constructor's defaults say what type an option takes; other keys a group may hold
    # (a scheduler's initial_lr, ...) take the type of their current value; one that is a
    # tensor now (a tensor lr's initial_lr) takes a number as well, as a group's lr does
    extra = {k: 0.0 if isinstance(v, torch.Tensor) else v for k, v in (extra_keys or {}).items()}
    known = {**extra, **defaults}
    out: dict[str, Any] = {}
    for key, value in options.items():
        where = f"{field}.{key}"
        if key in ("params", "param_names"):
            raise Invalid(f"{key} is not an option", code="unknown_option", field=where)
        if key not in known:
            raise Invalid(f"{cls.__name__} has no option {key!r:.60}; its options are: "
                          f"{', '.join(defaults)}", code="unknown_option", field=where)
        out[key] = _option_value(key, value, known[key], where)
    return out


def fresh(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` whose tensor values (a tensor ``lr``) are clones. Torch's
    schedulers fill a tensor lr in place: a throwaway optimizer or a scheduler's dry run must
    get its own, never the one the session keeps or is about to take."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def blame(message: str, fields: dict[str, str], fallback: str,
          given: dict[str, str] | None = None) -> str:
    """Which option a torch error message is about (best effort), as a field path.

    ``fields`` maps each option name in play to where it is; ``given`` (if any), the options
    the client gave in this request: one of those the message names comes first (SGD's
    "Nesterov momentum requires a momentum and zero dampening" for a ``nesterov`` sent alone
    names ``nesterov``, not the ``dampening`` the group already held)."""
    for tier in (given, fields):
        found = _named(message, tier) if tier else None
        if found is not None:
            return found
    only = given or fields
    if len(only) == 1:
        return next(iter(only.values()))
    return fallback


def _named(message: str, fields: dict[str, str]) -> str | None:
    """The field of the option ``message`` names: by its name, else by torch's words for it."""
    lowered = message.lower()
    for name in sorted(fields, key=len, reverse=True):
        if re.search(rf"\b{re.escape(name.lower())}\b", lowered):
            return fields[name]
    for words, name in _MESSAGE_HINTS:
        # (a hint starts a word: "eps" is not in "steps")
        if name in fields and re.search(rf"(?<![a-z]){re.escape(words)}", lowered):
            return fields[name]
    return None


#: what torch raises for options it cannot work with. NameError: LBFGS's strong_wolfe line
#: search, given no evaluation to spend (``max_eval`` < 1), reads a variable it never set
#: (UnboundLocalError)
TORCH_ERRORS = (ValueError, TypeError, RuntimeError, KeyError, IndexError, AssertionError,
                NotImplementedError, ZeroDivisionError, OverflowError, NameError)


_FLOAT_MAX: dict[torch.dtype, float] = {}
#: what torch says when a Python number it converts to a tensor's dtype is past its range
#: ("value cannot be converted to type c10::Half without overflow")
OVERFLOW_WORDS = "without overflow"


#: options that need per-parameter state torch makes only when the option is on at a
#: parameter's first step: (classes, option, whether a value turns it on, the state key).
#: Turned on after a parameter stepped, torch's next step raises ``KeyError`` on that key.
_STATE_FOR_OPTION: tuple[tuple[tuple[type[torch.optim.Optimizer], ...], str,
                               Callable[[Any], bool], str], ...] = (
    ((torch.optim.Adam, torch.optim.AdamW), "amsgrad", bool, "max_exp_avg_sq"),
    ((torch.optim.RMSprop,), "momentum", lambda v: v > 0, "momentum_buffer"),
    ((torch.optim.RMSprop,), "centered", bool, "grad_avg"),
)


def check_state_for_options(cls: type[torch.optim.Optimizer], group: dict[str, Any],
                            states: list[dict[str, Any]], where: str) -> None:
    """Refuse (422 ``option_needs_state``) a group whose options need per-parameter state
    that its parameters' state lacks: an option turned on after they stepped (``amsgrad`` of
    Adam, ``momentum`` or ``centered`` of RMSprop), by a PATCH or with a step. Torch's own
    step would raise ``KeyError`` mid-step. (An imported state like that is refused by the
    import's own check of each parameter's state.)"""
    for classes, option, on, key in _STATE_FOR_OPTION:
        if issubclass(cls, classes) and on(group.get(option)) and any(
                state and key not in state for state in states):
            raise Invalid(f"{option} cannot be turned on for parameters that already stepped "
                          f"without it: torch keeps {key!r} only for parameters that stepped "
                          f"with it from their first step (set it when the group is made, "
                          "or start its state over)", code="option_needs_state",
                          field=f"{where}.{option}")


def float_max(dtype: torch.dtype) -> float:
    """The largest finite value of a floating ``dtype`` (kept per dtype)."""
    top = _FLOAT_MAX.get(dtype)
    if top is None:
        top = _FLOAT_MAX[dtype] = float(torch.finfo(dtype).max)
    return top


def option_numbers(value: Any, tensors: bool = False) -> list[float]:
    """The numbers of an option value a step converts to the parameters' dtype: a float, the
    floats of a tuple (``betas``), and with ``tensors`` the value of a one-element floating
    tensor (a tensor ``lr``: torch converts it as it converts a float; a float64 tensor holds
    values past float32's range). Other tensors are torch's to refuse ("Tensor lr must be
    1-element")."""
    out = []
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if type(v) is float:
            out.append(v)
        elif (tensors and isinstance(v, torch.Tensor) and v.numel() == 1
              and v.is_floating_point() and v.layout == torch.strided):
            out.append(float(v.item()))
    return out


#: options torch never converts to the parameters' dtype: ASGD's ``t0`` is subtracted from the
#: step count (a float32 tensor, or a Python number). Its default, 1e6, is past float16's range:
#: an ASGD session of float16 parameters was refused every step and every PATCH for it
NOT_IN_PARAMS_DTYPE = frozenset({"t0"})
#: what :func:`overflowing` skips in a torch param group itself: its parameters and their
#: names (not options), and :data:`NOT_IN_PARAMS_DTYPE`
GROUP_LISTS_AND_NOT_IN_PARAMS_DTYPE = NOT_IN_PARAMS_DTYPE | {"params", "param_names"}


#: option types :func:`overflowing` passes over at once (no number of theirs is converted; a
#: tensor check per flag, ``isinstance(v, torch.Tensor)``, cost half the groups' check)
_NO_NUMBERS = frozenset({bool, int, str, type(None)})


def overflowing(options: dict[str, Any], dtype: torch.dtype, tensors: bool = False,
                skip: frozenset[str] = NOT_IN_PARAMS_DTYPE) -> tuple[str, float] | None:
    """The first option (its name and number) past the range of a floating ``dtype``, finite
    (a non-finite one is refused as such where it is given), else None. ``skip``: keys that
    are not such options (:data:`NOT_IN_PARAMS_DTYPE`, and a param group's own lists:
    :data:`GROUP_LISTS_AND_NOT_IN_PARAMS_DTYPE`)."""
    if not dtype.is_floating_point:
        return None
    top = float_max(dtype)
    for key, value in options.items():
        if key in skip:
            continue
        if type(value) is float:  # (most options: option_numbers' answer, without its list)
            if math.isfinite(value) and abs(value) > top:
                return key, value
            continue
        if type(value) in _NO_NUMBERS or not isinstance(value, (tuple, list, torch.Tensor)):
            continue  # (an int, a bool, a string, None: option_numbers finds no number)
        for v in option_numbers(value, tensors):
            if math.isfinite(v) and abs(v) > top:
                return key, v
    return None


def overflow_words(dtype: torch.dtype) -> str:
    """What a refusal of a value past ``dtype``'s range says of the range."""
    name = str(dtype).removeprefix("torch.")
    return (f"beyond the range of the parameters' dtype ({name}, at most "
            f"{float_max(dtype)!r} in magnitude)")


def check_overflow(options: dict[str, Any], dtype: torch.dtype, where: str,
                   tensors: bool = False, then: str = "") -> None:
    """Every float option must fit the parameters' dtype: torch raises "value cannot be
    converted ... without overflow" in the middle of a step otherwise (some of its step
    functions take a tensor lr past it silently and make the parameters infinite). With
    ``tensors``, a one-element tensor ``lr`` is checked by its value too (made by requests:
    records logged before that check replay as they ran). ``then``: what the refusal says
    to do, after what it found."""
    found = overflowing(options, dtype, tensors)
    if found is not None:
        key, v = found
        raise Invalid(f"{key} is {v!r}, {overflow_words(dtype)}; a step would overflow"
                      f"{then}", code="option_overflow", field=f"{where}.{key}")


#: options torch's constructor works out of another one when they are not given: LBFGS's
#: ``max_eval`` is ``max_iter * 5 // 4``
DERIVED_OPTIONS = {"max_eval": "max_iter"}


def refuse_unwritable_ints(opt: torch.optim.Optimizer, given: dict[str, Any],
                           fields: dict[str, str], fallback: str = "options") -> None:
    """422 ``invalid_option`` for an integer option of a built optimizer (its defaults and
    groups) past :data:`OPTION_INTS`, which no description, export or log record could hold,
    naming the option it came from: the one the client gave, or the one torch worked it out of
    (:data:`DERIVED_OPTIONS`; ``given``: the options given to the constructor). An LBFGS
    ``max_iter`` of -2**63 makes a ``max_eval`` of -1.25 * 2**63: taken, the create was
    answered with a 500 after it was applied, and every list of the tenant's sessions after it
    was a 500 too."""
    low, high = OPTION_INTS
    for group in (opt.defaults, *opt.param_groups):
        for key, value in group.items():
            if type(value) is not int or low <= value <= high:
                continue
            source = key if key in given else DERIVED_OPTIONS.get(key, key)
            how = (f" (torch's {type(opt).__name__} makes it of {source})"
                   if source != key else "")
            raise Invalid(f"{key} would be {value}{how}, past the integers a JSON answer "
                          f"holds ({low} to {high})", code="invalid_option",
                          field=fields.get(source, fallback))


#: more than Muon's shape scaling makes of an lr for any tensor this side of 2**63 elements:
#: ``sqrt(rows / cols)`` and ``0.2 * sqrt(max(rows, cols))`` are both under ``sqrt(2**63)``
#: (with room for rounding); an lr that times this is in range needs no look at the shapes
_MUON_SCALE_BOUND = 2.0 ** 32


def muon_lr_overflow(group: dict[str, Any], dtype: torch.dtype) -> str | None:
    """Why torch's Muon cannot step this group (a torch param group, or options with
    ``params`` and ``param_names``) of parameters of ``dtype``, else None: Muon scales the
    group's ``lr`` by each parameter's shape (``sqrt(max(1, rows / cols))``, or ``0.2 *
    sqrt(max(rows, cols))`` with ``adjust_lr_fn="match_rms_adamw"``) and converts it to the
    dtype its update takes with the parameter's (the update is bfloat16: float16 parameters
    take it as float32) after it has changed the parameter and its momentum: past that range,
    torch raises half-way through the step. A throwaway step over a tiny parameter never
    scales it (its shape is square)."""
    adjust = getattr(getattr(torch.optim, "_muon", None), "_adjust_lr", None)
    lr = group.get("lr")
    if adjust is None or not dtype.is_floating_point:
        return None
    value = (float(lr.item()) if isinstance(lr, torch.Tensor) and lr.numel() == 1
             else lr if type(lr) in (int, float) else None)
    if value is None or not math.isfinite(value):
        return None  # (refused as such where it is given)
    bound = torch.promote_types(dtype, torch.bfloat16)
    top = float_max(bound)
    if abs(value) * _MUON_SCALE_BOUND <= top:
        return None  # (no shape scales it that far: no walk of the parameters, every step)
    names = group.get("param_names") or []
    for i, p in enumerate(group.get("params", [])):
        if p.dim() < 2 or not p.numel():
            continue  # (torch refuses a parameter that is not a matrix; one with no elements
            # is :func:`empty_step_refusal`'s: its scaling divides by a count of 0)
        try:
            adjusted = adjust(value, group.get("adjust_lr_fn"), p.shape)
        except (ArithmeticError, TypeError, ValueError):
            continue  # (torch's own step refuses it, where the probe or a step checks it)
        if math.isfinite(adjusted) and abs(adjusted) > top:
            name = names[i] if i < len(names) else f"parameter {i}"
            return (f"lr {value!r} is {adjusted!r} once Muon scales it for the shape "
                    f"{list(p.shape)} of {name!r:.60}, beyond the range of the dtype torch "
                    f"converts it to ({str(bound).removeprefix('torch.')}, at most {top!r} in "
                    "magnitude); a step would overflow")
    return None


def probe(
    cls: type[torch.optim.Optimizer],
    defaults: dict[str, Any],
    groups: list[dict[str, Any]],
    dtypes: list[torch.dtype],
    device: torch.device,
    fields: dict[str, str],
    fallback: str = "options",
    check: list[int] | None = None,
    group_fields: dict[int, tuple[dict[str, str], dict[str, str]]] | None = None,
) -> None:
    """Construct and step a throwaway optimizer with these options over tiny tensors, so that
    torch's own validation (at construction and at step) speaks before any session changes.

    torch validates only its constructor's arguments, never a group's own options: the options
    of each group in ``check`` (default: all) are also tried as constructor arguments, whatever
    the other groups hold (a running group may hold a value a scheduler drove where torch's
    constructor would not go, e.g. an lr a hair below zero). A refusal there names that group:
    ``group_fields[i]`` is the options the client gave group ``i`` and every option in play in
    it, each mapped to where it is (``fields`` maps an option name to one place only, whichever
    group set it last)."""
    tiny_groups = []
    tensors = []
    for opts, dtype in zip(groups, dtypes, strict=True):
        t = torch.full((2, 2), 0.5, dtype=dtype, device=device)
        tensors.append(t)
        tiny_groups.append({"params": [t], **fresh(opts)})
    ctor_keys = default_options(cls).keys()
    in_play = {k: v for g in (defaults, *groups) for k, v in g.items()}
    try:
        opt = cls(tiny_groups, **fresh(defaults))
    except TORCH_ERRORS as exc:
        raise refusal(exc, fields, fallback, values=in_play) from None
    for i in range(len(groups)) if check is None else check:
        own = {k: v for k, v in groups[i].items() if k in ctor_keys}
        if not own:
            continue
        try:
            cls([torch.full((2, 2), 0.5, dtype=dtypes[i], device=device)],
                **fresh({**defaults, **own}))
        except TORCH_ERRORS as exc:
            given, named = (group_fields or {}).get(i, ({}, fields))
            raise refusal(exc, named, fallback, given, {**defaults, **own}) from None
    try:
        for t in tensors:
            t.grad = probe_grad(cls, t, 0.25)
        for _ in range(probe_steps(opt)):
            probe_step(opt)
    except NameError as exc:  # (see TORCH_ERRORS)
        why = (": its line search has no evaluation left (max_eval must be at least 1)"
               if cls is torch.optim.LBFGS else "")
        raise refusal(ValueError(f"torch's {cls.__name__}.step fails with these options "
                                  f"({type(exc).__name__}: {exc}){why}"),
                       fields, fallback) from None
    except TORCH_ERRORS as exc:
        # (the options the client gave, of every group checked, come first here too: foreach
        # sent to a differentiable group is named, not the differentiable it held)
        given = {k: v for sent, _ in (group_fields or {}).values() for k, v in sent.items()}
        raise refusal(exc, fields, fallback, given or None, in_play) from None


def empty_step_refusal(cls: type[torch.optim.Optimizer], defaults: dict[str, Any],
                       options: dict[str, Any], shape: torch.Size, dtype: torch.dtype,
                       device: torch.device) -> str | None:
    """Why torch cannot step a parameter of ``shape`` with no elements in a group of these
    options (None when it can): its Adafactor, and its Muon for some shapes, divide by a count
    of the elements and raise ZeroDivisionError in the middle of the step. Tried on a throwaway
    parameter of that shape, which costs nothing (it has no elements)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    try:
        opt = cls([{"params": [t], **fresh(options)}], **fresh(defaults))
        t.grad = probe_grad(cls, t, 0.0)
        probe_step(opt)
    except TORCH_ERRORS as exc:
        return f"torch's {cls.__name__}.step raises {type(exc).__name__}: {exc}"
    return None


def refusal(exc: Exception, fields: dict[str, str], fallback: str,
             given: dict[str, str] | None = None,
             values: dict[str, Any] | None = None) -> Invalid:
    """torch's refusal of options as a 422 naming the option it is about. torch's "value
    cannot be converted to type c10::Half without overflow" names none: it is about the
    option of the largest magnitude among ``values`` (the options in play), the one given
    first (SGD's ``1 - dampening`` of a ``dampening`` of -65504, a ``weight_decay`` of
    100000 beside an ``lr``: they named only ``options``)."""
    message = str(exc) or type(exc).__name__
    field = blame(message, fields, fallback, given)
    if field == fallback and values and OVERFLOW_WORDS in message:
        field = _largest(values, given or fields) or fallback
    return Invalid(message, code="invalid_option", field=field)


def _largest(values: dict[str, Any], fields: dict[str, str]) -> str | None:
    """Where the option of ``fields`` with the largest finite magnitude in ``values`` is."""
    sizes = {k: abs(float(v)) for k, v in values.items()
             if k in fields and type(v) in (int, float) and math.isfinite(v)}
    return fields[max(sizes, key=sizes.__getitem__)] if sizes else None


def probe_grad(cls: type[torch.optim.Optimizer], t: torch.Tensor, fill: float) -> torch.Tensor:
    """A gradient for a throwaway step: dense, or every row as a row-sparse gradient for an
    optimizer that takes only sparse ones (SparseAdam)."""
    dense = torch.full_like(t, fill)
    if cls is not torch.optim.SparseAdam:
        return dense
    if t.dim() == 0:
        return dense.to_sparse()
    rows = torch.arange(t.shape[0], device=t.device).reshape(1, -1)
    return torch.sparse_coo_tensor(rows, dense, t.shape, check_invariants=False)


def probe_steps(opt: torch.optim.Optimizer) -> int:
    """The throwaway steps :func:`probe` takes: two where torch's first step of a parameter
    takes another path than its later ones and converts an option to the parameters' dtype
    only on those (SGD with momentum: its first step clones the gradient into the momentum
    buffer, the next ones add it with ``alpha=1 - dampening``: a float16 session's
    ``dampening`` of -65504 was taken, and its second step failed half-way, a 500, and with
    durability ``memory`` the session was lost), else one (a second costs each create, PATCH
    and step carrying options as much again: 0.35 ms for Adam)."""
    if isinstance(opt, torch.optim.SGD) and any(g.get("momentum") for g in opt.param_groups):
        return 2
    return 1


#: the iterations (and closure calls) a throwaway LBFGS step may take: what torch refuses shows
#: in the first (a line search with no evaluation to spend, ...); its loop otherwise runs the
#: client's ``max_iter`` on the device's worker, every other session waiting (a create with
#: ``max_iter`` 200,000 and negative tolerances held it 9.8 s, 10**6 about 50 s)
PROBE_LBFGS_ITERATIONS = 2


def probe_step(opt: torch.optim.Optimizer) -> None:
    """One throwaway step with the gradients already set (LBFGS: through a closure that
    leaves them as they are, for at most :data:`PROBE_LBFGS_ITERATIONS` iterations: ``opt``
    is the probe's own)."""
    if isinstance(opt, torch.optim.LBFGS):
        for group in opt.param_groups:
            for key in ("max_iter", "max_eval"):
                most = group.get(key)
                if isinstance(most, (int, float)) and most > PROBE_LBFGS_ITERATIONS:
                    group[key] = PROBE_LBFGS_ITERATIONS
        opt.step(lambda: 0.0)  # type: ignore[no-untyped-call]
    else:
        opt.step()
