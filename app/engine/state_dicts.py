"""Export and import of optimizer + scheduler state in torch's own ``state_dict`` shape.

An import is checked completely before anything is loaded: group count and sizes (as torch
checks), every group option (through a throwaway optimizer), every state tensor's shape against
what the optimizer itself makes for these parameters, and the scheduler's state against the
session's scheduler. A mismatch is a 422 at import time, even where torch would only fail at
the next step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from app.engine import optimizers, option_values, schedulers
from app.errors import Invalid, shown
from app.wire.dtypes import DTYPE_NAMES, TORCH_DTYPES
from app.wire.integers import INT64, OPTION_INTS, int_text, ints_as_text
from app.wire.tree import int_outside, nodes_once, tree_to_json

if TYPE_CHECKING:
    from app.engine.session import Session

# Keys that torch's schedulers add to param groups; a state dict may carry them.
SCHEDULER_GROUP_KEYS = {"initial_lr": 0.0, "max_lr": 0.0, "min_lr": 0.0,
                        "base_momentum": 0.0, "max_momentum": 0.0}
_TOP_KEYS = {"state", "param_groups", "scheduler"}


def detach_tree(obj: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """Deep copy with every tensor copied to the CPU (later steps cannot change the copy); a
    tensor held in several places is one copy, as torch's ``state_dict()`` holds it (groups
    sharing one tensor ``lr``: a ``torch.save`` of the export keeps them one)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        copied = memo.get(id(obj))
        if copied is None:
            copied = memo[id(obj)] = (obj.detach().clone() if obj.device.type == "cpu"
                                      else obj.detach().cpu())
        return copied
    if isinstance(obj, dict):
        return {k: detach_tree(v, memo) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detach_tree(v, memo) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detach_tree(v, memo) for v in obj)
    return obj


def jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    """A group's (or the defaults') options as a description writes them. An integer past
    :data:`OPTION_INTS`, which no JSON answer holds, is written as its decimal text: servers
    before the create's check (``optimizers.refuse_unwritable_ints``) took an LBFGS
    ``max_iter`` whose ``max_eval`` (``max_iter * 5 // 4``) is one, and their data directories
    restore it as it ran; its description, and every list of its tenant's sessions, was a
    500."""
    out: dict[str, Any] = tree_to_json(detach_tree(options))
    if int_outside(out, *OPTION_INTS):
        out = ints_as_text(out, *OPTION_INTS)
    return out


@dataclass
class PreparedImport:
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    names: list[list[str]]


def state_id(key: object, field: str) -> int:
    """A state key: an int (a torch file's) or its decimal text (a JSON key's). A request's
    keys are checked for their canonical form first (:func:`check_state_keys`); a logged
    import's replay takes them as they were taken then (``"00"`` as 0)."""
    if type(key) is int:
        return key
    number = int_text(key, 18)
    if number is not None:
        return number
    raise Invalid(f"state keys must be integer parameter ids, got {key!r:.40}",
                  code="state_mismatch", field=field)


def check_state_keys(state: object) -> None:
    """A requested import's ``state`` keys: ints (a torch file's) or the text an export writes
    (``"0"``, ``"12"``); other text (``"00"``, ``"+1"``, ``" 1"``, ``"1_0"``, ``"1.0"``,
    non-ASCII digits) is a 422 ``state_mismatch`` naming the key (``state_dict.state.00``):
    ``"00"`` was taken as parameter 0. At the request only: records of imports a server took
    before this check replay as they ran (:func:`state_id`)."""
    raw = state.get("state") if isinstance(state, dict) else None
    if not isinstance(raw, dict):
        return  # (refused, or taken, by the import's own checks)
    for key in raw:
        if type(key) is int:
            continue
        number = int_text(key, 18)
        if number is None or str(number) != key:
            raise Invalid(f"state keys must be integer parameter ids written as plain whole "
                          f"numbers (0, 1, ...), got {key!r:.40}", code="state_mismatch",
                          field=f"state_dict.state.{key}")


def _is_num(x: object) -> bool:
    return type(x) in (int, float)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


#: the per-group learning rates a scheduler keeps (at any depth: SequentialLR and
#: ChainedScheduler nest their schedulers' states): copies of the groups' ``initial_lr`` and
#: ``lr``, tensors where those are. torch's ``load_state_dict`` takes a number or a tensor
#: there whichever the session holds, as a group's ``lr`` may be either
SCHEDULER_LR_LISTS = frozenset({"base_lrs", "_last_lr"})


def _check_lr_item(got: Any, field: str) -> None:
    """An item of a scheduler's lr list: a number or a one-element floating tensor (what a
    group's ``lr`` may be; torch refuses an lr tensor of more elements at the next step)."""
    if _is_num(got) or (isinstance(got, torch.Tensor) and got.is_floating_point()
                        and got.numel() == 1):
        return
    raise Invalid(f"expected a learning rate (a number or a one-element floating tensor), "
                  f"got {shown(got, 40)}", code="state_mismatch", field=field)


def _not_a_tensor(expected: torch.Tensor, got: Any, field: str) -> str:
    """Why ``got`` cannot stand where the optimizer keeps the tensor ``expected``. A number
    (an old checkpoint's ``"step": 3``, a count written by hand) is named with the tensor to
    give instead: the session takes no number for a tensor (torch's ``load_state_dict`` makes
    a ``step`` tensor of one in torch's default dtype, which is the client's to choose: the
    Python SDK does so itself, in the dtype torch would). A ``step`` count float32 cannot
    hold exactly is shown in float64, the dtype the session then keeps it in, as torch's
    ``load_state_dict`` keeps a float64 count."""
    want = f"expected a tensor of shape {list(expected.shape)}"
    if not _is_num(got) or expected.dim() != 0:
        return f"{want}, got {shown(got, 40)}"
    dtype = str(expected.dtype).removeprefix("torch.")
    number = shown(got, 40)
    why = ""
    if field.endswith(".step") and expected.is_floating_point() \
            and math.isfinite(float(got)) \
            and float(torch.tensor(float(got), dtype=expected.dtype).item()) != got:
        why = (f" ({dtype} cannot hold {number} exactly; a float64 step count is kept in "
               "float64, as torch keeps it)")
        dtype = "float64"
    return (f"{want}, got the number {number}: the optimizer keeps this value as a 0-d tensor "
            "(as torch's state_dict() holds it), and a number is not taken for one; give "
            f'{{"dtype": "{dtype}", "shape": [], "data": [{number}]}} in JSON{why}')


def same_structure(expected: Any, got: Any, field: str,
                   lr_lists: frozenset[str] = frozenset(), floats: bool = False) -> None:
    """``got`` must have the shape of ``expected``: keys, lengths, tensor shapes, scalar kinds,
    tensor dtypes; with ``floats`` (a parameter's optimizer state, which torch's
    ``load_state_dict`` casts: :func:`as_torch_loads`) a floating tensor of any floating
    dtype where a floating one is expected. The items of a list under a key in ``lr_lists``
    are learning rates: a number or a one-element floating tensor, either where the other
    is expected."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise Invalid(_not_a_tensor(expected, got, field), code="state_mismatch", field=field)
        if got.shape != expected.shape:
            raise Invalid(f"tensor has shape {list(got.shape)}, expected "
                          f"{list(expected.shape)}", code="state_mismatch", field=field)
        if got.dtype != expected.dtype and not (
                floats and got.is_floating_point() and expected.is_floating_point()):
            raise Invalid(f"tensor has dtype {str(got.dtype).removeprefix('torch.')}, expected "
                          f"{str(expected.dtype).removeprefix('torch.')} (no silent casts)",
                          code="state_mismatch", field=field)
        return
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            raise Invalid("expected an object", code="state_mismatch", field=field)
        exp_keys = {str(k) for k in expected}
        got_keys = {str(k) for k in got}
        if exp_keys != got_keys:
            missing, extra = sorted(exp_keys - got_keys), sorted(got_keys - exp_keys)
            raise Invalid(f"keys differ: missing {missing[:10]}, unexpected {extra[:10]}",
                          code="state_mismatch", field=field)
        by_str = {str(k): v for k, v in got.items()}
        for k, v in expected.items():
            g = by_str[str(k)]
            if str(k) in lr_lists and isinstance(v, list):
                if not isinstance(g, (list, tuple)) or len(g) != len(v):
                    raise Invalid(f"expected a list of {len(v)} items", code="state_mismatch",
                                  field=f"{field}.{k}")
                for i, item in enumerate(g):
                    _check_lr_item(item, f"{field}.{k}.{i}")
                continue
            same_structure(v, g, f"{field}.{k}", lr_lists, floats)
        return
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            raise Invalid(f"expected a list of {len(expected)} items", code="state_mismatch",
                          field=field)
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            same_structure(e, g, f"{field}.{i}", lr_lists, floats)
        return
    if isinstance(expected, bool):
        ok = isinstance(got, bool)
    elif isinstance(expected, int):
        ok = type(got) is int
    elif isinstance(expected, float):
        ok = _is_num(got)
    elif expected is None:
        ok = got is None
    elif isinstance(expected, str):
        ok = isinstance(got, str)
    else:
        ok = type(got) is type(expected)
    if not ok:
        raise Invalid(f"expected {type(expected).__name__}, got {shown(got, 40)}",
                      code="state_mismatch", field=field)


def _expected_state(
    session: Session, group_opts: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bool]:
    """What the optimizer itself keeps per parameter (after one step), in parameter order, and
    whether it makes that state eagerly at construction (Adagrad) rather than at first step.
    An import may still leave a parameter's state out (or give it as ``{}``): torch's
    ``load_state_dict`` replaces the whole state, and Adagrad makes a parameter's state again
    at its next step (``step`` 0, ``sum`` filled with the optimizer's
    ``initial_accumulator_value``), as it does for a parameter added with
    ``add_param_group``."""
    scratch_groups = []
    scratch: list[torch.Tensor] = []
    for g, opts in zip(session.optimizer.param_groups, group_opts, strict=True):
        ts = [torch.zeros_like(p) for p in g["params"]]
        for t in ts:
            t.grad = optimizers.probe_grad(session.cls, t, 0.0)
        scratch.extend(ts)
        scratch_groups.append({"params": ts, **opts})
    opt = session.cls(scratch_groups, **session.defaults)
    eager = any(len(opt.state[t]) > 0 for t in scratch)
    optimizers.probe_step(opt)
    return [dict(opt.state[t]) for t in scratch], eager


def conform(template: Any, value: Any) -> Any:
    """``value`` (a tree that went through JSON: string keys, lists) in the types of
    ``template`` (the live object's state): integer keys back to integers, ``Counter`` and
    other dict kinds back to their kind, lists back to tuples. MultiStepLR keeps its milestones
    in a ``Counter`` of ints: with string keys it would never decay again."""
    if isinstance(template, dict) and isinstance(value, dict):
        int_keys = bool(template) and all(type(k) is int for k in template)
        sample = next(iter(template.values())) if template else None
        out = {}
        for k, v in value.items():
            key: Any = k
            if int_keys and isinstance(k, str):
                number = int_text(k, 19, signed=True)
                key = k if number is None else number
            out[key] = conform(template.get(key, sample), v)
        kind = type(template)
        return kind(out) if kind is not dict else out
    if isinstance(template, (list, tuple)) and isinstance(value, (list, tuple)):
        items = [conform(template[i] if i < len(template) else (template[0] if template
                                                                 else None), v)
                 for i, v in enumerate(value)]
        return tuple(items) if isinstance(template, tuple) else items
    return value


def own_tensors(obj: Any, field: str) -> Any:
    """A copy of a client's tree in which every tensor is a plain dense CPU tensor owning its
    memory (contiguous, no stride-0 expansion, no two entries sharing storage): sparse, meta,
    quantized and complex tensors are refused."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.device.type != "cpu" or obj.is_quantized \
                or obj.is_complex():
            kind = "meta" if obj.device.type == "meta" else str(obj.layout).removeprefix("torch.")
            raise Invalid(f"a state tensor must be a dense CPU tensor, got {kind} "
                          f"{str(obj.dtype).removeprefix('torch.')}", code="state_mismatch",
                          field=field)
        return obj.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(obj, dict):
        return {k: own_tensors(v, f"{field}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [own_tensors(v, f"{field}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(own_tensors(v, f"{field}.{i}") for i, v in enumerate(obj))
    return obj


def _check_step(value: Any, field: str) -> None:
    """A per-parameter ``step`` counts steps: a finite integral number >= 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return  # not a step counter torch keeps; the structure check spoke already
        number = float(value.item())
    elif type(value) in (int, float):
        number = float(value)
    else:
        return
    if not math.isfinite(number) or number < 0 or number != math.floor(number):
        raise Invalid(f"step must be a whole number of steps >= 0, got {number!r}",
                      code="state_mismatch", field=field)


#: the way out a refusal of non-finite state names: a session's own steps can make its state
#: non-finite (Adam's exp_avg_sq from a finite gradient past 1.8e19), and its export then
#: holds it
NONFINITE_WAY_OUT = ("; nonfinite is set at create: import it into a session created with "
                     "\"nonfinite\": \"skip\" or \"allow\"")


def _check_finite(obj: Any, field: str) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            raise Invalid("non-finite values in the state; this session rejects them "
                          "(nonfinite: reject)" + NONFINITE_WAY_OUT, code="nonfinite_state",
                          field=field)
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise Invalid("non-finite value in the state; this session rejects them "
                          "(nonfinite: reject)" + NONFINITE_WAY_OUT, code="nonfinite_state",
                          field=field)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{field}.{k}")
    elif isinstance(obj, (list, tuple)):  # LBFGS keeps lists of tensors
        for i, v in enumerate(obj):
            _check_finite(v, f"{field}.{i}")


def refuse_unwritable(state: object, where: str = "state_dict") -> None:
    """422 naming the first value of an imported state that no log record, description or
    export could hold: ``invalid_state`` for an integer (a value or a key) past int64 (a group
    option's past :data:`OPTION_INTS`), ``state_mismatch`` (as for a state tensor before) for
    a tensor that is not a dense CPU tensor of a dtype the wire carries (a meta, sparse,
    quantized or complex one, a float8 one). A ``torch.save`` file holds any Python int
    (``lr`` 2**70, a scheduler's ``last_epoch``) and any tensor, a JSON text integers up to
    2**64 - 1: taken, the import was a 500 (its record could not be written; a meta tensor
    could not even be checked), or from JSON, a scheduler's count there made the session's
    export, its description and the tenant's session list 500s once a step counted it past
    2**64 - 1. Walked without recursion, in order, each list or dict once
    (:func:`~app.wire.tree.nodes_once`), once :func:`_unwritable_somewhere`'s quicker scan
    found something to name (a path object per node cost 1.2 s per two million numbers)."""
    if not _unwritable_somewhere(state):
        return
    for node, at in nodes_once(state, where):
        if isinstance(node, dict):
            for k in node:
                if type(k) is int and not INT64[0] <= k <= INT64[1]:
                    raise Invalid(f"a key here, an integer of {k.bit_length()} bits, is past "
                                  "int64", code="invalid_state", field=str(at))
        elif type(node) is int:
            bounds = OPTION_INTS if at.top() == "param_groups" else INT64
            if not bounds[0] <= node <= bounds[1]:
                raise Invalid(f"an integer of {node.bit_length()} bits is out of range (from "
                              f"{bounds[0]} to {bounds[1]}): a state holds integers its JSON "
                              "export can write back", code="invalid_state", field=str(at))
        elif isinstance(node, torch.Tensor) and _unwritable_tensor(node):
            kind = ("meta" if node.device.type == "meta" else "nested" if node.is_nested
                    else str(node.layout).removeprefix("torch."))
            raise Invalid(f"a {kind} tensor of {str(node.dtype).removeprefix('torch.')}: a "
                          "state's tensors are dense, of the dtypes "
                          f"{', '.join(TORCH_DTYPES)}", code="state_mismatch", field=str(at))


def _unwritable_tensor(t: torch.Tensor) -> bool:
    return (t.is_nested or t.layout != torch.strided or t.device.type == "meta"
            or t.is_quantized or t.dtype not in DTYPE_NAMES)


def _unwritable_somewhere(state: object) -> bool:
    """Whether :func:`refuse_unwritable`'s walk would refuse something in ``state``: the same
    tests, without the paths (each dict, list or tuple once)."""
    if isinstance(state, dict):
        if any(type(k) is int and not INT64[0] <= k <= INT64[1] for k in state):
            return True
        return any(_unwritable_under(v, OPTION_INTS if k == "param_groups" else INT64)
                   for k, v in state.items())
    return _unwritable_under(state, INT64)


def _unwritable_under(tree: object, bounds: tuple[int, int]) -> bool:
    return int_outside(tree, *bounds, keys=INT64, odd=(torch.Tensor, _unwritable_tensor))


def refuse_unknown_keys(state: dict[Any, Any]) -> None:
    """422 ``state_mismatch`` naming a state dict's first unknown top-level key: checked
    before anything walks the tree (an unknown key over two million empty objects took 6 s of
    walks, on the device worker, before this refusal)."""
    unknown = {str(k) for k in state} - _TOP_KEYS
    if unknown:
        raise Invalid(f"unknown key(s) {sorted(unknown)}; a state dict has state, param_groups "
                      "and optionally scheduler", code="state_mismatch",
                      field=f"state_dict.{sorted(unknown)[0]}")


def prepare_import(session: Session, state: object, request: bool = False,
                   tensors: bool = False, first_elsewhere: bool = False) -> PreparedImport:
    """The state checked completely, ready to load. ``first_elsewhere``: the state is a shard's
    part of a sharded session's, whose first entry another shard holds (this part may begin
    with an empty entry: :func:`load_optimizer_state`). A ``request`` (not a logged record) is
    also refused, in what it changes, a non-finite option or scheduler-kept group key out of
    range (``initial_lr: -5``), and a non-finite number in the scheduler's state, which
    torch's checks let through; ``tensors``: a tensor ``lr`` past the parameters' dtype too
    (422 ``option_overflow``, as a float one)."""
    if not isinstance(state, dict):
        raise Invalid("a state dict must be an object with state and param_groups",
                      code="state_mismatch", field="state_dict")
    refuse_unknown_keys(state)
    if request:
        refuse_unwritable(state)
    groups = state.get("param_groups")
    current = session.optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(current):
        have = len(groups) if isinstance(groups, list) else "no"
        raise Invalid(f"the state has {have} param groups; this session has {len(current)}",
                      code="state_mismatch", field="state_dict.param_groups")
    new_groups: list[dict[str, Any]] = []
    group_opts: list[dict[str, Any]] = []
    order: list[int] = []
    fields: dict[str, str] = {}
    for i, (g, cur) in enumerate(zip(groups, current, strict=True)):
        where = f"state_dict.param_groups.{i}"
        ids = group_ids(g, i, len(cur["params"]))
        extra = {**SCHEDULER_GROUP_KEYS,
                 **{k: v for k, v in cur.items() if k not in ("params", "param_names")}}
        raw = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        required = [k for k in cur if k not in ("params", "param_names")
                    and k not in SCHEDULER_GROUP_KEYS]
        missing = [k for k in required if k not in raw]
        if missing:
            raise Invalid(f"param group {i} lacks option(s) {', '.join(missing)}; a state dict's "
                          "groups carry every option", code="state_mismatch",
                          field=f"{where}.{missing[0]}")
        opts = optimizers.normalize_options(session.cls, raw, where, extra)
        fields.update({k: f"{where}.{k}" for k in opts})
        group_opts.append(opts)
        new_groups.append({**opts, "params": list(ids)})
        order.extend(ids)
    if len(set(order)) != len(order):
        raise Invalid("a parameter id appears twice in param_groups", code="state_mismatch",
                      field="state_dict.param_groups")
    dtypes = session.group_dtypes()
    # torch's constructor checks for every group whose options change (a running group may
    # hold a value a scheduler drove where the constructor would not go: importing it back
    # unchanged is fine)
    before = session.group_options()
    changed = [i for i, (new, old) in enumerate(zip(group_opts, before, strict=True))
               if any(k not in old or not _same_value(v, old[k]) for k, v in new.items())]
    if request:  # (what a group held already, e.g. a session's own export, imports back)
        for i in changed:
            new, old = group_opts[i], before[i]
            given = {k: v for k, v in new.items() if k not in old or not _same_value(v, old[k])}
            where = f"state_dict.param_groups.{i}"
            option_values.refuse_nonfinite_options(session.optimizer_name, given, where)
            option_values.refuse_lbfgs_history(session.optimizer_name, given, where)
            option_values.check_scheduler_group_keys(session.cls, given, where)
    for i, (opts, dtype) in enumerate(zip(group_opts, dtypes, strict=True)):
        optimizers.check_overflow(
            opts, dtype, f"state_dict.param_groups.{i}", tensors,
            f": give state_dict.param_groups.{i} values in range. (A session left holding "
            "such a value by an older server exports it: PATCH that session's group "
            f"(.../param_groups/{i}) to a value in range, then export again)")
    # a refusal names what the import changes in the group first (a tensor lr into a foreach
    # group: the lr, not the capturable torch's message also names)
    group_fields = {}
    for i in changed:
        where = f"state_dict.param_groups.{i}"
        new, old = group_opts[i], before[i]
        group_fields[i] = ({k: f"{where}.{k}" for k, v in new.items()
                            if k not in old or not _same_value(v, old[k])},
                           {k: f"{where}.{k}" for k in new})
    optimizers.probe(session.cls, session.defaults,
                     scheduled_lrs_taken(session, state, group_opts), dtypes, session.device,
                     fields, "state_dict.param_groups", check=changed, group_fields=group_fields)

    raw_state = state.get("state", {})
    if not isinstance(raw_state, dict):
        raise Invalid("state must be an object of per-parameter states", code="state_mismatch",
                      field="state_dict.state")
    position = {pid: i for i, pid in enumerate(order)}
    params = [p for g in current for p in g["params"]]
    group_of = [i for i, g in enumerate(current) for _ in g["params"]]
    lbfgs = session.optimizer_name == "LBFGS"
    try:
        expected, eager = _expected_state(session, group_opts) if not lbfgs else ([], False)
    except optimizers.TORCH_ERRORS as exc:
        # (its throwaway step is over the parameters' own shapes, which the probe's tiny ones
        # are not: Muon scales the lr by them, and an lr of 3e38 for a (4, 3) parameter
        # overflows float32 there; it was a 500)
        given = {k: v for sent, _ in group_fields.values() for k, v in sent.items()}
        raise optimizers.refusal(exc, fields, "state_dict.param_groups", given or None,
                                 {k: v for g in group_opts for k, v in g.items()}) from None
    new_state: dict[int, Any] = {}
    for key, entry in raw_state.items():
        where = f"state_dict.state.{key}"
        pid = state_id(key, where)
        if pid in new_state:
            raise Invalid(f"two states for parameter id {pid}", code="state_mismatch",
                          field=where)
        if pid not in position:
            raise Invalid(f"state for parameter id {pid}, which no param group lists",
                          code="state_mismatch", field=where)
        if not isinstance(entry, dict):
            raise Invalid("a parameter's state must be an object", code="state_mismatch",
                          field=where)
        if lbfgs:
            if entry:
                check_lbfgs_state(session, group_opts[0], position[pid], entry, where)
        elif entry:
            same_structure(expected[position[pid]], entry, where, floats=True)
        elif eager and not new_state and not first_elsewhere:
            # torch's Adagrad.__setstate__ (its load_state_dict) reads the first loaded
            # entry's step to tell whether steps are tensors: KeyError 'step' when it is empty
            raise Invalid(f"{session.optimizer_name} cannot load a state whose first entry is "
                          "empty (torch's load_state_dict raises KeyError 'step'): leave the "
                          "parameter out of the state, or put its entry after a full one; "
                          "either way its state is made afresh at its next step",
                          code="state_mismatch", field=where)
        entry = own_tensors(entry, where)
        if not lbfgs:
            entry = as_torch_loads(entry, params[position[pid]],
                                   group_opts[group_of[position[pid]]])
        if "step" in entry:
            _check_step(entry["step"], f"{where}.step")
        if session.nonfinite == "reject":
            _check_finite(entry, where)
        new_state[pid] = entry
    sched_state = state.get("scheduler")
    if sched_state is not None:
        if session.scheduler is None:
            raise Invalid("the state carries a scheduler but this session has none",
                          code="state_mismatch", field="state_dict.scheduler")
        live = session.scheduler.state_dict()
        same_structure(live, sched_state, "state_dict.scheduler", SCHEDULER_LR_LISTS)
        if request:
            option_values.refuse_nonfinite_scheduler_state(sched_state, "state_dict.scheduler",
                                                           live)
            restart = schedulers.restart_past_int64(sched_state, "state_dict.scheduler")
            if restart is not None:
                raise restart
        sched_state = conform(live, own_tensors(sched_state, "state_dict.scheduler"))
    names = [list(g["param_names"]) for g in current]
    return PreparedImport({"state": new_state, "param_groups": new_groups}, sched_state, names)


def as_torch_loads(entry: dict[Any, Any], param: torch.Tensor, group: dict[str, Any]
                   ) -> dict[Any, Any]:
    """A parameter's imported state with each tensor in the dtype torch's ``load_state_dict``
    gives it (``Optimizer._process_value_according_to_param_policy``): ``step`` as it is (in
    float32 in a ``capturable`` or ``fused`` group), every other tensor in its parameter's
    dtype. So a NAdam ``mu_product`` (ASGD's ``eta``, ``mu``, ``ax``) saved in float64 (a
    local optimizer's under ``torch.set_default_dtype(torch.float64)``) goes into a float32
    session as torch's own optimizer would take it, and the steps after are bitwise torch's;
    it was a 422 "no silent casts". Cast here, before the checks: a value past the
    parameter's dtype's range becomes inf, refused where the session rejects non-finite
    values. (The device is the loader's to change, as before.)"""
    if not param.is_floating_point():
        return {k: v for k, v in entry.items()}  # (torch moves such a state, never casts it)
    out: dict[Any, Any] = {}
    for key, value in entry.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key == "step":
            out[key] = (value.to(dtype=torch.float32) if group.get("capturable")
                        or group.get("fused") else value)
        else:
            out[key] = value.to(dtype=param.dtype)
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """torch's ``load_state_dict`` of ``sd``, its states kept in ``sd``'s order with its empty
    entries (``{}``) where they are, as torch keeps them. An empty entry may come first: torch's
    Adagrad cannot load that (its ``__setstate__`` reads the first entry's ``step``), but a
    shard's part of a state whose first entry is full may begin with one, and a shard's
    snapshot keeps it (torch makes the parameter's state at its next step either way)."""
    state = sd["state"]
    full = {k: v for k, v in state.items() if not (isinstance(v, dict) and not v)}
    if len(full) == len(state):
        opt.load_state_dict(sd)
    else:
        opt.load_state_dict({**sd, "state": full})
        by_id = {pid: p for saved, group in zip(sd["param_groups"], opt.param_groups,
                                                strict=True)
                 for pid, p in zip(saved["params"], group["params"], strict=True)}
        ordered: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        for pid in state:
            p = by_id[pid]
            ordered[p] = opt.state[p] if p in opt.state else {}
        opt.state = ordered


def own_lbfgs_memory(opt: torch.optim.Optimizer) -> None:
    """An LBFGS optimizer's state tensors (its history's lists too) as fresh allocations of
    their own, for a state loaded from a snapshot. LBFGS dots its history (``old_dirs``,
    ``old_stps``) at every iteration, and torch's CPU ``dot`` (MKL's sdot) rounds by where the
    vectors start in memory: tensors decoded from a snapshot are views at any offset of its
    bytes (torch's ``load_state_dict`` keeps a tensor of the right dtype as it is), where the
    running session's are torch's own aligned allocations, so the steps after a restart
    rounded otherwise than the session's that never stopped. (An import's tensors are copies
    already: :func:`own_tensors`.)"""
    if isinstance(opt, torch.optim.LBFGS):
        for p, kept in opt.state.items():
            opt.state[p] = {k: _own_memory(v) for k, v in kept.items()}


def _own_memory(value: Any) -> Any:
    """A tensor (or a list's tensors) as a fresh allocation of its own."""
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, list):
        return [_own_memory(v) for v in value]
    return value


def scheduled_lrs_taken(session: Session, state: dict[str, Any],
                        group_opts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups' options as torch's constructor checks see them in an import: an ``lr`` below
    zero that the imported scheduler state says its last step wrote (its ``_last_lr``) is
    taken, as torch's ``load_state_dict`` takes it. A schedule that ends at 0 (LinearLR's
    ``end_factor: 0``) lands a hair below it in torch's own arithmetic, and the session's export
    must import into another session; a negative lr a client gives is refused as before."""
    sched = state.get("scheduler")
    written = sched.get("_last_lr") if isinstance(sched, dict) else None
    if session.scheduler is None or not isinstance(written, list) \
            or len(written) != len(group_opts):
        return group_opts
    out = []
    for opts, last in zip(group_opts, written, strict=True):
        lr = opts.get("lr")
        if type(lr) is float and lr < 0 and type(last) is float and last == lr:
            opts = {**opts, "lr": -lr}
        out.append(opts)
    return out


_LBFGS_COUNTERS = ("func_evals", "n_iter")
_LBFGS_HISTORY = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad",
                  "prev_loss", "al")


def check_lbfgs_state(session: Session, options: dict[str, Any], position: int,
                      entry: dict[str, Any], where: str) -> None:
    """LBFGS keeps one state for the whole problem, under its first parameter: step counters,
    and once it has moved, its direction ``d``, step ``t``, the history of ``old_dirs`` /
    ``old_stps`` / ``ro`` (at most ``history_size`` each), ``H_diag``, the previous flat
    gradient and loss, and the scratch list ``al``. Vectors hold every parameter's elements,
    flattened (torch's ``_gather_flat_grad``)."""
    if position != 0:
        raise Invalid("LBFGS keeps its state under its first parameter only",
                      code="state_mismatch", field=where)
    keys = {str(k) for k in entry}
    allowed = {*_LBFGS_COUNTERS, *_LBFGS_HISTORY}
    # (``al`` is made at the first update of the history: a state whose steps have all been
    # first iterations, max_iter 1 or a step that stopped at once, has none)
    history_keys = set(_LBFGS_HISTORY) - {"al"}
    if not keys <= allowed or not set(_LBFGS_COUNTERS) <= keys or (
            keys & set(_LBFGS_HISTORY) and not history_keys <= keys):
        raise Invalid(f"an LBFGS state has {', '.join(_LBFGS_COUNTERS)} and, once it has "
                      f"moved, {', '.join(_LBFGS_HISTORY)}; got {sorted(keys)[:12]}",
                      code="state_mismatch", field=where)
    for k in _LBFGS_COUNTERS:
        if type(entry[k]) is not int or entry[k] < 0:
            raise Invalid(f"{k} must be a whole number >= 0", code="state_mismatch",
                          field=f"{where}.{k}")
    if "d" not in entry:
        return
    params = session.optimizer.param_groups[0]["params"]
    n = sum(p.numel() for p in params)
    dtype = torch.cat([p.detach().reshape(-1)[:0] for p in params]).dtype

    def vector(v: Any, field: str) -> None:
        if not isinstance(v, torch.Tensor) or v.shape != (n,) or v.dtype != dtype:
            raise Invalid(f"expected a {str(dtype).removeprefix('torch.')} tensor of shape "
                          f"[{n}] (every parameter's elements)", code="state_mismatch",
                          field=field)

    def scalar(v: Any, field: str, number_ok: bool) -> None:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            return
        if number_ok and type(v) in (int, float):
            return
        raise Invalid("expected a number or a one-element floating tensor",
                      code="state_mismatch", field=field)

    vector(entry["d"], f"{where}.d")
    vector(entry["prev_flat_grad"], f"{where}.prev_flat_grad")
    scalar(entry["t"], f"{where}.t", True)
    scalar(entry["H_diag"], f"{where}.H_diag", True)
    scalar(entry["prev_loss"], f"{where}.prev_loss", True)
    lists = {k: entry.get(k, []) for k in ("old_dirs", "old_stps", "ro", "al")}
    for k, v in lists.items():
        if not isinstance(v, (list, tuple)):
            raise Invalid("expected a list", code="state_mismatch", field=f"{where}.{k}")
    history = len(lists["old_dirs"])
    if len(lists["old_stps"]) != history or len(lists["ro"]) != history:
        raise Invalid("old_dirs, old_stps and ro must be as long as each other",
                      code="state_mismatch", field=f"{where}.old_stps")
    size = options.get("history_size", 100)
    if history > size or len(lists["al"]) < history:
        raise Invalid(f"the history holds {history} entries; history_size is {size} and al "
                      f"has {len(lists['al'])}", code="state_mismatch",
                      field=f"{where}.old_dirs")
    if lists["al"] and isinstance(size, int) and size > len(lists["al"]):
        # (torch sized al at its first curvature pair and keeps it: with a larger
        # history_size its history grows past al, and a step some steps later fails)
        raise Invalid(f"history_size is {size} but al has {len(lists['al'])} entries: torch "
                      "sizes al once, at the first curvature pair, so the history would grow "
                      "past it and a later step fail; give at most that history_size",
                      code="state_mismatch", field=f"{where}.al")
    # (torch makes al history_size long once, and keeps it: at most that, or as long as this
    # session's own is. Unbounded, a torch file's list of millions of references to one
    # scalar became that many tensors here)
    held = session.optimizer.state.get(params[0], {}).get("al")
    most = max(size, len(held) if isinstance(held, list) else 0)
    if len(lists["al"]) > most:
        raise Invalid(f"al has {len(lists['al'])} entries; LBFGS keeps history_size ({size}) "
                      "of them", code="state_mismatch", field=f"{where}.al")
    for i in range(history):
        vector(lists["old_dirs"][i], f"{where}.old_dirs.{i}")
        vector(lists["old_stps"][i], f"{where}.old_stps.{i}")
        scalar(lists["ro"][i], f"{where}.ro.{i}", False)
    for i, v in enumerate(lists["al"]):
        if v is not None:
            scalar(v, f"{where}.al.{i}", False)


def group_ids(g: object, i: int, count: int) -> list[int]:
    """The parameter ids of group ``i`` of an imported state dict, which must hold ``count``
    of them (as the session's group does)."""
    where = f"state_dict.param_groups.{i}"
    if not isinstance(g, dict):
        raise Invalid("a param group must be an object", code="state_mismatch", field=where)
    ids = g.get("params")
    if not isinstance(ids, list) or not all(type(x) is int for x in ids):
        raise Invalid("params must be a list of integer ids", code="state_mismatch",
                      field=f"{where}.params")
    if len(ids) != count:
        raise Invalid(f"group {i} has {len(ids)} parameters in the state but {count} in this "
                      "session", code="state_mismatch", field=f"{where}.params")
    # (checked here, for a sharded session's import too, which took any param_names)
    names = g.get("param_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(ids)
                              or not all(isinstance(n, str) for n in names)):
        raise Invalid("param_names must list one name per parameter",
                      code="state_mismatch", field=f"{where}.param_names")
    return ids
