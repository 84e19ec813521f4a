"""Request bodies to engine inputs (CreateSpec, GroupSpec, state trees). HTTP-free parsing."""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from typing import IO, Any, cast

import orjson
import torch

from app.api.bodies import FOREIGN_METADATA, only_keys, parse_json, tensor_map, unique_json
from app.api.openapi_docs import STEP_QUERY
from app.engine.interface import CreateSpec, GroupSpec, ReturnParams, SessionInfo
from app.engine.metrics import SHOWN
from app.engine.ops.params import check_param_count
from app.engine.placement import check_placement, check_resources
from app.engine.shards import check_shards
from app.engine.state_dicts import refuse_unknown_keys
from app.errors import BadRequest, Invalid
from app.wire.buffer_file import BufferFile
from app.wire.integers import int_text
from app.wire.json_tensor import refuse_loose_b64
from app.wire.safetensors_body import read_safetensors
from app.wire.tree import MAX_STATE_DEPTH, nodes_once, tree_from_json
from app.wire.tree_path import TreePath

_CREATE_KEYS = {"optimizer", "options", "params", "param_groups", "scheduler", "id", "nonfinite",
                "durability", "sync", "max_staleness", "staleness_lr", "metrics", "history",
                "shards", "resources", "placement"}
_PS_KEYS = ("sync", "max_staleness", "staleness_lr")  # checked by the engine (app.engine.ps)
_DURABILITY = ("step", "interval", "memory")
TORCH_FILE_SLACK = 16 * 1024 * 1024
#: what a ``torch.save`` import's pickle (its ``data.pkl``: the state's tree, its tensors by
#: reference) may hold beyond its parameters' and groups' shares (a scheduler's state, ...)
PICKLE_SLACK = 1 << 20
#: a parameter's share of the pickle: its state entry (a few tensors' references and their
#: keys) and its id in its group, plus its name at 4 bytes a character (torch's own export of
#: Adam over 1,000 parameters with 100-character names: 332 bytes a parameter)
PICKLE_PER_PARAM = 1024
#: a param group's share: its options, and each scheduler's lists of it (``base_lrs``, ...)
PICKLE_PER_GROUP = 16 * 1024
#: an LBFGS history entry's share (``old_dirs``, ``old_stps``, ``ro``, ``al``: 65 bytes each
#: in torch's own export of a history of 100)
PICKLE_PER_HISTORY_ENTRY = 256
#: what unpickling may make of each byte of a pickle, counted as the body's: a list of empty
#: dicts (2 bytes of pickle each) peaked at 24.7 times its pickle, of empty lists at 23.4, of
#: 1-tuples at 15.7 (``tracemalloc`` around ``torch.load(weights_only=True)``)
PICKLE_EXPANSION = 32
#: the records of a ``torch.save`` zip besides its storages (``data.pkl``, ``byteorder``,
#: ``version``, ``.format_version``, ``.storage_alignment``, ``.data/serialization_id``, ...)
TORCH_FILE_RECORDS = 16
#: the least a storage's reference takes in the pickle (its persistent id: ``'storage'``, the
#: storage class, its key, its device, its size; 21 bytes with every repeat memoized): a file
#: with more entries than its pickle can reference holds entries torch never reads
PICKLE_PER_STORAGE = 16
#: a zip's central directory entry begins so (zipfile's and torch's readers check it)
_CENTRAL_ENTRY = b"PK\x01\x02"
_NONFINITE = ("reject", "skip", "allow")


def _group(obj: object, field: str, tensors: dict[str, torch.Tensor] | None) -> GroupSpec:
    if not isinstance(obj, dict):
        raise Invalid("a param group must be an object {\"params\": {...}, ...options}",
                      code="invalid_body", field=field)
    if "params" not in obj:
        raise Invalid("a param group needs params", code="missing_field", field=f"{field}.params")
    options = {k: v for k, v in obj.items() if k != "params"}
    refuse_loose_b64(options, field)
    if tensors is None:
        return GroupSpec(tensor_map(obj["params"], f"{field}.params"), options)
    names = obj["params"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise Invalid("in a safetensors body, a group's params is a list of tensor names",
                      code="invalid_body", field=f"{field}.params")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise Invalid(f"tensor {missing[0]!r:.60} is not in the body", code="unknown_parameter",
                      field=f"{field}.params")
    seen: set[str] = set()
    for n in names:  # (as a name in two groups is: one parameter, listed once)
        if n in seen:
            raise Invalid(f"parameter {n!r:.60} appears twice", code="invalid_params",
                          field=f"{field}.params.{n}")
        seen.add(n)
    return GroupSpec({n: tensors[n] for n in names}, options)


def create_spec(obj: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, *,
                max_params: int = 0) -> CreateSpec:
    """The create body (JSON, or safetensors metadata plus its tensors) to a CreateSpec.
    ``max_params`` (``OPTSERVE_MAX_SESSION_PARAMS``; 0: none): a body of more parameters is
    refused before any of its tensors is made (the engine checks it again, for every caller)."""
    only_keys(obj, _CREATE_KEYS)
    check_param_count(_params_in(obj, tensors), max_params)
    if "optimizer" not in obj:
        raise Invalid("optimizer is required (e.g. \"SGD\", \"Adam\")", code="missing_field",
                      field="optimizer")
    options = obj.get("options", {})
    if not isinstance(options, dict):
        raise Invalid("options must be an object", code="invalid_option", field="options")
    refuse_loose_b64(options, "options")
    if "params" in obj and "param_groups" in obj:
        raise Invalid("give params or param_groups, not both", code="invalid_body",
                      field="params")
    groups: list[GroupSpec]
    if tensors is not None and "params" in obj:
        raise Invalid("a safetensors create's parameters are the body's tensors: its "
                      "__metadata__ takes no params (param_groups groups the tensors by name)",
                      code="unknown_field", field="params")
    if "param_groups" in obj:
        raw = obj["param_groups"]
        if not isinstance(raw, list) or not raw:
            raise Invalid("param_groups must be a non-empty list", code="invalid_body",
                          field="param_groups")
        groups = [_group(g, f"param_groups.{i}", tensors) for i, g in enumerate(raw)]
        if tensors is not None:
            used = {n for g in groups for n in g.params}
            unused = sorted(set(tensors) - used)
            if unused:
                raise Invalid(f"tensor {unused[0]!r:.60} is in no param group",
                              code="invalid_body", field="param_groups")
    elif tensors is not None:
        groups = [GroupSpec(dict(tensors), {})]
    elif "params" in obj:
        groups = [GroupSpec(tensor_map(obj["params"], "params"), {})]
    else:
        raise Invalid("params (or param_groups) is required", code="missing_field",
                      field="params")
    nonfinite = obj.get("nonfinite")
    if nonfinite is not None and nonfinite not in _NONFINITE:
        raise Invalid(f"nonfinite must be one of {list(_NONFINITE)}", code="invalid_body",
                      field="nonfinite")
    durability = obj.get("durability")
    if durability is not None and durability not in _DURABILITY:
        raise Invalid(f"durability must be one of {list(_DURABILITY)}", code="invalid_body",
                      field="durability")
    scheduler = obj.get("scheduler")
    _check_scheduler_spec(scheduler, "scheduler")
    session_id = obj.get("id")
    if session_id is not None and not isinstance(session_id, str):
        raise Invalid("id must be a string", code="invalid_id", field="id")
    resources = obj.get("resources")
    placement = obj.get("placement")
    return CreateSpec(optimizer=obj["optimizer"], groups=groups, options=options,
                      scheduler=scheduler, id=session_id, nonfinite=nonfinite,
                      durability=durability,
                      ps_options={k: obj[k] for k in _PS_KEYS if k in obj},
                      # checked by the engine (app.engine.ops.lifecycle)
                      metrics=obj.get("metrics"), history=obj.get("history"),
                      shards=check_shards(obj.get("shards", 1)),
                      resources=check_resources(resources) if resources is not None else None,
                      placement=check_placement(placement) if placement is not None else None)


def _params_in(obj: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> int:
    """How many parameters the create body names, counted without decoding any (what is
    not a mapping or a list here is refused later, by the decoding)."""
    if tensors is not None:
        return len(tensors)
    groups = obj.get("param_groups")
    if isinstance(groups, list):
        return sum(len(g["params"]) for g in groups
                   if isinstance(g, dict) and isinstance(g.get("params"), dict))
    params = obj.get("params")
    return len(params) if isinstance(params, dict) else 0


#: how deep schedulers may nest (SequentialLR / ChainedScheduler children), how many one spec
#: may hold in all, and how many entries a list option may have (``milestones``, ...)
MAX_SCHEDULER_DEPTH = 8
MAX_SCHEDULERS = 64
MAX_SCHEDULER_LIST = 1000


def _check_scheduler_spec(spec: object, field: str) -> None:
    """422 for a scheduler spec past its bounds, before the engine builds anything:

    - a ``name`` (nested ones too) that is not a string (the engine's scheduler parser looks
      names up in dicts first: an object or list as a name was an unhashable-type 500);
    - nesting deeper than :data:`MAX_SCHEDULER_DEPTH` (100 levels were a 500 of recursion in
      the engine; from 30 the session's exported state was refused by its own import),
      more than :data:`MAX_SCHEDULERS` schedulers, or a list option of more than
      :data:`MAX_SCHEDULER_LIST` entries (1e6 milestones took 8 s to create and 5 s every
      step, the scheduler's state being captured and logged with each).

    Here, at the HTTP front, not in the engine's parser: sessions logged before these bounds
    still replay. Walked without recursion (the JSON itself may nest 1,000 deep)."""
    count = 0
    stack: list[tuple[object, str, int]] = [(spec, field, 0)]
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict):
            continue  # (the engine refuses it, naming the field)
        count += 1
        if "name" in node and not isinstance(node["name"], str):
            raise Invalid("a scheduler's name must be a string (e.g. \"StepLR\")",
                          code="unknown_scheduler", field=f"{where}.name")
        options = node.get("options")
        if not isinstance(options, dict):
            continue
        for key, value in options.items():
            if key != "schedulers" and isinstance(value, list) \
                    and len(value) > MAX_SCHEDULER_LIST:
                raise Invalid(f"{key} has {len(value)} entries; at most {MAX_SCHEDULER_LIST} "
                              "are allowed", code="invalid_option",
                              field=f"{where}.options.{key}", limit=MAX_SCHEDULER_LIST)
        children = options.get("schedulers")
        if not isinstance(children, list) or not children:
            continue
        if depth >= MAX_SCHEDULER_DEPTH:
            raise Invalid(f"schedulers nest at most {MAX_SCHEDULER_DEPTH} levels deep",
                          code="invalid_scheduler", field=f"{where}.options.schedulers",
                          limit=MAX_SCHEDULER_DEPTH)
        if count + len(stack) + len(children) > MAX_SCHEDULERS:
            raise Invalid(f"a scheduler spec holds at most {MAX_SCHEDULERS} schedulers in all",
                          code="invalid_scheduler", field=f"{where}.options.schedulers",
                          limit=MAX_SCHEDULERS)
        stack.extend((child, f"{where}.options.schedulers.{i}", depth + 1)
                     for i, child in reversed(list(enumerate(children))))


def metadata_fields(metadata: dict[str, str]) -> dict[str, Any]:
    """safetensors ``__metadata__`` of a create or an added group: each value a JSON text, or a
    bare word taken as a string; what other writers add (:data:`FOREIGN_METADATA`, Hugging
    Face's ``"format": "pt"``) left out, as the bodies of tensors leave it."""
    out: dict[str, Any] = {}
    for key, text in metadata.items():
        if key in FOREIGN_METADATA:
            continue
        try:
            out[key] = orjson.loads(text)
        except orjson.JSONDecodeError:
            out[key] = text
        else:
            unique_json(text.encode(), out[key], f"__metadata__.{key}")
    return out


def group_changes(obj: dict[str, Any], index: int) -> dict[str, Any]:
    """A ``PATCH .../param_groups/{index}`` body: the group's option changes (checked by the
    engine; a tensor's base64 here)."""
    refuse_loose_b64(obj, f"param_groups.{index}")
    return obj


def group_spec(obj: dict[str, Any]) -> GroupSpec:
    return _group(obj, "param_group", None)


def group_spec_binary(buf: bytearray) -> GroupSpec:
    tensors, metadata = read_safetensors(buf)
    return GroupSpec(tensors, metadata_fields(metadata))


def state_from_json(buf: bytes | bytearray) -> Any:
    obj = parse_json(buf, within="state_dict")
    if not isinstance(obj, dict):
        raise BadRequest("the state dict must be a JSON object", code="invalid_json",
                         field="body")
    refuse_unknown_keys(obj)
    return tree_from_json(obj, "state_dict")


def state_from_safetensors(buf: bytearray) -> Any:
    tensors, metadata = read_safetensors(buf)
    if "optserve_state" not in metadata:
        raise Invalid("safetensors state dict lacks __metadata__.optserve_state (the JSON "
                      "skeleton of the state dict)", code="invalid_state",
                      field="__metadata__.optserve_state")
    unknown = sorted(set(metadata) - {"optserve_state"} - FOREIGN_METADATA)
    if unknown:  # (as in a step's body: never dropped unread)
        raise Invalid(f"unknown __metadata__ entry {unknown[0]!r:.60}; a safetensors state dict "
                      "holds its skeleton in __metadata__.optserve_state",
                      code="unknown_field", field=f"__metadata__.{unknown[0]}")
    skeleton = parse_json(metadata["optserve_state"].encode(), "__metadata__.optserve_state",
                          within="__metadata__.optserve_state")
    if isinstance(skeleton, dict):
        refuse_unknown_keys(skeleton)
    unused = sorted(set(tensors) - _tensor_refs(skeleton))
    if unused:
        raise Invalid(f"tensor {unused[0]!r:.80} is in the body but the optserve_state skeleton "
                      "does not reference it (write {\"$tensor\": key} where it belongs)",
                      code="invalid_state", field=f"body.{unused[0]}")
    return tree_from_json(skeleton, "state_dict", tensors)


def _tensor_refs(obj: Any) -> set[str]:
    """The keys the skeleton's ``{"$tensor": key}`` references name; a key named twice is a
    422 ``invalid_state`` naming the second reference's path: the two would be one tensor
    here (imported as two copies, or sharing memory), and torch never exports a state whose
    entries alias one another (each state tensor is its parameter's own). Paths are written
    only for an error (:class:`~app.wire.tree_path.TreePath`): a skeleton of one long key over
    a long list would otherwise hold a copy of the key per item."""
    found: dict[str, TreePath] = {}
    stack: list[tuple[Any, TreePath]] = [(obj, TreePath("state_dict"))]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            if item.keys() == {"$tensor"} and isinstance(item["$tensor"], str):
                key = item["$tensor"]
                if key in found:
                    raise Invalid(f"tensor {key!r:.80} is referenced twice, at "
                                  f"{str(found[key]):.200} and at {str(path):.200}: each state "
                                  "tensor is its own (torch never exports one shared by two "
                                  "entries); give each its own key",
                                  code="invalid_state", field=str(path))
                found[key] = path
            else:
                stack.extend((v, path.child(k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, path.child(i)) for i, v in reversed(list(enumerate(item))))
    return set(found)


def torch_file_limit(info: SessionInfo) -> int:
    """How many bytes a session's ``torch.save`` state may expand to: four times its
    parameters (no other torch optimizer keeps that much per parameter), or for LBFGS its
    ``2 * history_size + 2`` vectors of every parameter's elements, plus 16 MiB for the rest."""
    sizes = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
    params = sum(math.prod(p["shape"]) * sizes.get(str(p["dtype"]), 8)
                 for p in info.params.values())
    return int(max(4 * params, _lbfgs_bytes(info, sizes)) + TORCH_FILE_SLACK)


def _lbfgs_bytes(info: SessionInfo, sizes: dict[str, int]) -> int:
    """What an LBFGS session's state holds at most: its direction, previous gradient and
    ``history_size`` pairs of steps, each a flat vector of every parameter's elements in their
    widest dtype (0 for other optimizers)."""
    if info.optimizer != "LBFGS" or not info.param_groups:
        return 0
    given = info.param_groups[0].get("history_size", 100)
    history: int = given if type(given) is int and given >= 0 else 100
    elements: int = sum(math.prod(p["shape"]) for p in info.params.values())
    width = max((sizes.get(str(p["dtype"]), 8) for p in info.params.values()), default=8)
    return (2 * history + 2) * elements * width


def torch_pickle_limit(info: SessionInfo) -> int:
    """How many bytes a session's ``torch.save`` state's pickle may have: what its parameters
    (and their names), its groups and an LBFGS history take, with room to spare
    (:data:`PICKLE_PER_PARAM`, ...). Unpickled, a pickle's small objects take up to 25 times
    its size, and torch's reader takes seconds a megabyte: under :data:`TORCH_FILE_SLACK`
    alone, a pickle of 16 MB of empty dicts took the smallest session 400 MB and a minute."""
    names = sum(PICKLE_PER_PARAM + 4 * len(name) for name in info.params)
    history = 0
    if info.optimizer == "LBFGS" and info.param_groups:
        given = info.param_groups[0].get("history_size", 100)
        history = (4 * given + 8) * PICKLE_PER_HISTORY_ENTRY if type(given) is int else 0
    return PICKLE_SLACK + names + PICKLE_PER_GROUP * len(info.param_groups) + max(history, 0)


def torch_file(buf: bytearray, limit: int, pickle_limit: int) -> tuple[bytearray, int]:
    """A ``torch.save`` body as torch's reader takes it (:func:`state_from_torch`: the body
    itself, not a copy), and what it expands to when read (its zip entries' declared sizes,
    summed: a deflated entry of zeros is about a thousandth of its size, and torch's reader
    inflates it; and its pickle, :data:`PICKLE_EXPANSION` times its size, on top); 422
    ``torch_file_too_large`` past ``limit``, or for a pickle past ``pickle_limit``, 422
    ``invalid_torch_file`` for a file that is not a zip. The caller counts the expansion
    against the memory request bodies may hold (``OPTSERVE_MAX_BODIES_MB``)."""
    return buf, _check_zip(buf, limit, pickle_limit)


def _check_zip(data: bytes | bytearray, limit: int, pickle_limit: int | None) -> int:
    """Bound what a ``torch.save`` file expands to before torch reads it: every entry's
    declared size (torch's reader allocates that much and refuses a stream that inflates
    past it), summed, against ``limit``, and its pickles' (``*.pkl``) against
    ``pickle_limit`` (None: not bounded apart); the sum, with the pickles' counted
    :data:`PICKLE_EXPANSION` times more. First, its entries, which zipfile and torch's reader
    each make an object of (570 bytes each in zipfile's), against what its pickle can reference
    (:func:`_max_zip_entries`): a file of a million empty entries (108 MB) took the smallest
    session 11 s of CPU and 800 MB to import, every entry ignored."""
    entries_most = _max_zip_entries(limit, pickle_limit)
    if data.count(_CENTRAL_ENTRY) > entries_most:  # (each entry any reader walks starts so)
        raise Invalid(f"the torch.save file has more than {entries_most} entries, more than "
                      "this session's state can reference", code="torch_file_too_large",
                      field="body", limit=entries_most)
    try:
        with BufferFile(data) as f, zipfile.ZipFile(f) as zf:
            entries = zf.infolist()
    except Exception:  # (as torch.load's below: "zip file version 10.6" is NotImplementedError)
        raise Invalid("not a torch.save file: only the zip format (torch.save's default since "
                      "torch 1.6) is accepted", code="invalid_torch_file", field="body") from None
    total = pickled = 0
    for entry in entries:
        total += max(entry.file_size, 0)
        if total > limit:
            raise Invalid(f"the torch.save file expands to more than {limit} bytes, more than "
                          "this session's state can hold", code="torch_file_too_large",
                          field="body", limit=limit)
        if entry.filename.endswith(".pkl"):
            pickled += max(entry.file_size, 0)
            if pickle_limit is not None and pickled > pickle_limit:
                raise Invalid(f"the torch.save file's pickle (the state's tree) has more than "
                              f"{pickle_limit} bytes, more than this session's state needs",
                              code="torch_file_too_large", field="body", limit=pickle_limit)
    return total + PICKLE_EXPANSION * pickled


def _max_zip_entries(limit: int, pickle_limit: int | None) -> int:
    """How many entries a ``torch.save`` file within these bounds may have: its fixed records
    and one per storage its pickle can reference (:data:`PICKLE_PER_STORAGE`; by ``limit``
    where the pickle is not bounded apart)."""
    return TORCH_FILE_RECORDS + (limit if pickle_limit is None else pickle_limit) \
        // PICKLE_PER_STORAGE


def state_from_torch(buf: bytes | bytearray, limit: int, pickle_limit: int | None = None
                     ) -> Any:
    """A ``torch.save`` file (a body, as :func:`torch_file` checked it), loaded only with
    ``weights_only=True`` (never plain unpickling), and only after its zip entries are bounded
    by ``limit`` bytes (its pickle by ``pickle_limit``)."""
    _check_zip(buf, limit, pickle_limit)
    try:
        with BufferFile(buf) as f:  # (the body as it is: io.BytesIO copies a bytearray)
            state = torch.load(cast(IO[bytes], f), map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read a client's file is the client's 422
        raise Invalid(f"not a torch.save file loadable with weights_only=True: "
                      f"{_torch_reason(exc)}", code="invalid_torch_file", field="body") from None
    _check_tensor_sizes(state, limit)
    return state


def _check_tensor_sizes(state: Any, limit: int) -> None:
    """Bound what the loaded tensors hold once copied: each one's elements, summed, against
    ``limit``. A tensor of a ``torch.save`` file may view its storage with stride 0 (an
    ``expand``): a file of 2 KB held an ``lr`` of 2**40 elements over one float, and the copy
    the checks make of it tried to allocate 4 TiB (a 500; at 16 GiB it would have been taken,
    on a machine with less, the server killed). Walked without recursion, each list or dict
    once (:func:`~app.wire.tree.nodes_once`); a tensor is counted at each place it is held.
    A tree nested deeper than :data:`~app.wire.tree.MAX_STATE_DEPTH` levels is refused here
    first, as a JSON state is (422 ``invalid_state``): a pickle nests a million levels in 2 MB,
    and each later walk over the state would go down all of them."""
    total = 0
    for node, at in nodes_once(state, "state_dict"):
        if at.depth > MAX_STATE_DEPTH:
            raise Invalid("state is nested too deeply", code="invalid_state", field=str(at))
        if isinstance(node, torch.Tensor):
            total += node.numel() * node.element_size()
            if total > limit:
                raise Invalid(f"the torch.save file's tensors hold more than {limit} bytes "
                              "once copied (a tensor may view fewer bytes than it holds: "
                              "expand), more than this session's state can hold",
                              code="torch_file_too_large", field=str(at), limit=limit)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _torch_reason(exc: Exception) -> str:
    """The informative line of torch.load's message (it can span paragraphs with colour codes
    and advice to turn weights_only off, which the server never does)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error" in ln or "Unsupported" in ln:
            return ln[:300]
    return lines[0][:300] if lines else type(exc).__name__


def step_options(value: object) -> dict[int, dict[str, Any]] | None:
    """A step's ``param_groups``: option changes per group, as a list (``null`` or ``{}`` for
    groups left alone) or an object keyed by group index. Every group named is kept, ``{}``
    for one left alone: the engine refuses an entry for a group the session lacks
    (:func:`app.engine.ops.params.changed_groups`)."""
    if value is None:
        return None
    if isinstance(value, list):
        items = [(i, {} if v is None else v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = []
        seen: set[int] = set()
        for k, v in value.items():
            index = int_text(k, 6)
            if index is None or str(index) != k:  # (as PATCH's index: "01" is not group 1)
                raise Invalid(f"param_groups keys are group indexes, written as plain whole "
                              f"numbers (0, 1, ...), got {k!r:.40}",
                              code="invalid_body", field=f"param_groups.{k}")
            if index in seen:
                raise Invalid(f"param_groups names group {index} twice", code="invalid_body",
                              field=f"param_groups.{k}")
            seen.add(index)
            items.append((index, v))
    else:
        raise Invalid("param_groups must be a list (one entry per group) or an object keyed by "
                      "group index, each an object of options", code="invalid_body",
                      field="param_groups")
    out: dict[int, dict[str, Any]] = {}
    for index, options in items:
        if not isinstance(options, dict):
            raise Invalid("each param group's changes must be an object of options",
                          code="invalid_body", field=f"param_groups.{index}")
        refuse_loose_b64(options, f"param_groups.{index}")
        out[index] = options  # (``{}`` too: the engine checks that it names a group)
    return out or None


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}


#: the dtypes ``?params_dtype=`` narrows answers to (a step's, a pull's, a row pull's)
NARROW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def narrow_dtype(text: str | None) -> torch.dtype | None:
    """``?params_dtype=``'s dtype (None when not given); anything but float16 or bfloat16 is a
    422 ``invalid_query`` naming it. The step's and the pulls' one reading of it."""
    if text is None:
        return None
    dtype = NARROW_DTYPES.get(text)
    if dtype is None:
        raise Invalid("params_dtype must be float16 or bfloat16", code="invalid_query",
                      field="params_dtype")
    return dtype


def params_dtype_query(request: Any) -> torch.dtype | None:
    """A pull's ``?params_dtype=`` (``GET .../params``, rows too, ``POST .../params/rows``):
    at most once, and read as the step reads it (:func:`narrow_dtype`)."""
    if not request.scope.get("query_string"):
        return None
    given = request.query_params.getlist("params_dtype")
    if len(given) > 1:
        raise Invalid("params_dtype is given more than once", code="invalid_query",
                      field="params_dtype")
    return narrow_dtype(given[0] if given else None)


@dataclass(frozen=True)
class StepQuery:
    """The step's query string, read by hand (the step route solves no FastAPI dependencies):
    ``return`` (params | none | touched), ``base_version`` (an integer >= 0), ``upcast`` (a
    boolean), ``params_dtype`` (float16 | bfloat16), ``metrics`` (answer | history); each at
    most once, and no other name but those of :data:`STEP_QUERY`."""

    return_params: ReturnParams = True
    base_version: int | None = None
    upcast: bool = False
    params_dtype: torch.dtype | None = None
    #: False (``metrics=history``): the answer carries no ``metrics`` object
    answer_metrics: bool = True
    #: ``timeout_s`` was given (an LBFGS step's; other sessions refuse it)
    timeout_given: bool = False

    @classmethod
    def parse(cls, request: Any) -> StepQuery:
        if not request.scope.get("query_string"):
            return cls()
        q = request.query_params
        seen: set[str] = set()
        for name, _ in q.multi_items():
            if name not in STEP_QUERY:
                raise Invalid(f"{name!r:.60} is not a query parameter of the step (it takes "
                              f"{', '.join(STEP_QUERY)})", code="invalid_query", field=name[:60])
            if name in seen:
                raise Invalid(f"{name} is given more than once", code="invalid_query",
                              field=name)
            seen.add(name)
        ret = q.get("return", "params")
        if ret not in ("params", "none", "touched"):
            raise Invalid("return must be params, none or touched", code="invalid_query",
                          field="return")
        text = q.get("base_version")
        base = int_text(text, 18)
        if text is not None and base is None:
            raise Invalid("base_version must be an integer >= 0", code="invalid_query",
                          field="base_version")
        upcast = q.get("upcast", "false").lower()
        if upcast not in _BOOLS:
            raise Invalid("upcast must be true or false", code="invalid_query", field="upcast")
        narrow = narrow_dtype(q.get("params_dtype"))
        shown = q.get("metrics", "answer")
        if shown not in SHOWN:
            raise Invalid("metrics must be answer (the step's norms in the answer) or history "
                          "(only in the session's history, taken after the answer)",
                          code="invalid_query", field="metrics")
        returned: ReturnParams = "touched" if ret == "touched" else ret == "params"
        return cls(returned, base, _BOOLS[upcast], narrow, shown == "answer",
                   "timeout_s" in seen)
