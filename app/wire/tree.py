"""State-dict trees (nested dicts/lists of numbers, strings and tensors) to and from JSON.

- tensors become JSON tensors (or ``{"$tensor": key}`` references in safetensors mode);
- tuples become lists; non-finite floats become ``{"$float": "inf" | "-inf" | "nan"}``;
- dict keys become strings (torch's integer state ids are restored by the engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from app.errors import Invalid
from app.wire.integers import OPTION_INTS, int_text
from app.wire.json_tensor import decode_json_tensor, encode_json_tensor, is_json_tensor
from app.wire.tree_path import TreePath

_FLOAT_TAGS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
#: a sparse COO tensor in the service's own files (log records, snapshots): its indices,
#: values, shape and whether it is coalesced; never read from a client's tree
SPARSE_TAG = "$sparse"
#: a dict the service's own files hold that would read back as a tag (its keys those of
#: ``$float``, ``$tensor``, ``$sparse``, this one, or a JSON tensor's: parameter names are
#: keys there, and a parameter may be named ``$float`` or ``dtype``), wrapped in this one
DICT_TAG = "$dict"
#: an integer no JSON number holds (past what orjson writes: an LBFGS ``max_eval`` an older
#: server took past 64 bits) as its decimal text, in the service's own files only (snapshots,
#: log records); read back as that int only where its text is one (a dict of this key
#: alone that is not one reads back as it is, as servers before this tag wrote it)
BIG_INT_TAG = "$int"
_TAGS = frozenset({"$float", "$tensor", SPARSE_TAG, DICT_TAG, BIG_INT_TAG})
#: the deepest a state dict from a client nests (levels below its root): deeper is a 422
#: ``invalid_state`` "state is nested too deeply", JSON or ``torch.save``
MAX_STATE_DEPTH = 64


def nodes_once(tree: Any, path: str) -> Iterator[tuple[Any, TreePath]]:
    """Every node of ``tree`` with its path (``path`` for the root), in order, depth first,
    without recursion; each dict, list or tuple once: a ``torch.save`` file's pickle may hold
    one list many times (``[[[None] * 1000] * 1000] * 1000``, a file of 3 KB, is a tree of
    10**9 leaves). Anything else is given at every place it is held. The walk holds one
    iterator per level it is down and writes no path (a :class:`TreePath` is written when an
    error names it): a wide list under a long key made a path string per item at once, and
    a deep tree paths as long as it is deep, memory and time past any bound."""
    seen: set[int] = set()
    levels: list[Iterator[tuple[Any, TreePath]]] = [iter([(tree, TreePath(path))])]
    while levels:
        entry = next(levels[-1], None)
        if entry is None:
            levels.pop()
            continue
        node, at = entry
        if isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            levels.append(_children(node, at))
        yield node, at


def _children(node: dict[Any, Any] | list[Any] | tuple[Any, ...], at: TreePath
              ) -> Iterator[tuple[Any, TreePath]]:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        yield v, at.child(k)


def int_outside(tree: Any, low: int, high: int, *, keys: tuple[int, int] | None = None,
                odd: tuple[type, Callable[[Any], bool]] | None = None) -> bool:
    """Whether ``tree`` holds an int value outside ``low..high`` (with ``keys``, or an int
    dict key outside those bounds; with ``odd`` = ``(kind, test)``, or a node of that kind that
    ``test`` refuses): the quick test before :func:`nodes_once`'s walk names one (no paths
    made; each dict, list or tuple once)."""
    stack: list[Any] = [tree]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if type(node) is int:
            if not low <= node <= high:
                return True
        elif isinstance(node, (dict, list, tuple)):
            if not node or id(node) in seen:  # (an empty one holds nothing to look at)
                continue
            seen.add(id(node))
            if not isinstance(node, dict):
                stack.extend(node)
                continue
            if keys is not None:
                for k in node:  # (a loop, not any(): a generator per dict cost 2 us)
                    if type(k) is int and not keys[0] <= k <= keys[1]:
                        return True
            stack.extend(node.values())
        elif odd is not None and isinstance(node, odd[0]) and odd[1](node):
            return True
    return False


def _looks_tagged(obj: dict[str, Any]) -> bool:
    return (len(obj) == 1 and next(iter(obj)) in _TAGS) or is_json_tensor(obj)


def _float_tag(x: float) -> dict[str, str]:
    return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def is_float_tag(obj: object) -> bool:
    return isinstance(obj, dict) and obj.keys() == {"$float"}


def untag_float(obj: dict[str, Any], field: str, code: str) -> float:
    """``{"$float": "inf" | "-inf" | "nan"}`` to the float it stands for."""
    tag = obj["$float"]
    if not isinstance(tag, str) or tag not in _FLOAT_TAGS:
        raise Invalid(f"$float must be one of {sorted(_FLOAT_TAGS)}", code=code, field=field)
    return _FLOAT_TAGS[tag]


def to_jsonable(obj: Any, on_tensor: Callable[[torch.Tensor, str], Any], path: str = "",
                *, escape: bool = False) -> Any:
    """``escape`` (the service's own files): a dict that would read back as a tag is wrapped
    in ``{"$dict": ...}`` (:data:`DICT_TAG`), which :func:`tree_from_json` unwraps there."""
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.sparse_coo:  # its parts (the service's own files only)
            return {SPARSE_TAG: {
                "indices": on_tensor(obj._indices(), f"{path}.indices"),
                "values": on_tensor(obj._values(), f"{path}.values"),
                "shape": list(obj.shape), "coalesced": obj.is_coalesced()}}
        return on_tensor(obj, path)
    if isinstance(obj, dict):
        out = {str(k): to_jsonable(v, on_tensor, f"{path}.{k}" if path else str(k),
                                   escape=escape)
               for k, v in obj.items()}
        return {DICT_TAG: out} if escape and _looks_tagged(out) else out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, on_tensor, f"{path}.{i}" if path else str(i), escape=escape)
                for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return _float_tag(obj)
    if escape and type(obj) is int and not OPTION_INTS[0] <= obj <= OPTION_INTS[1]:
        return {BIG_INT_TAG: str(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot put {type(obj).__name__} on the wire at {path}")


def tree_to_json(obj: Any, *, b64: bool = False) -> Any:
    """A tree with tensors to plain JSON values (tensors as JSON tensor objects)."""
    return to_jsonable(obj, lambda t, _p: encode_json_tensor(t.detach().cpu(), b64=b64))


def tree_to_safetensors(obj: Any, *, escape: bool = False
                        ) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tree with tensors to (JSON with ``{"$tensor": key}`` refs, tensors by key);
    ``escape``: for the service's own files (:func:`to_jsonable`)."""
    tensors: dict[str, torch.Tensor] = {}

    def put(t: torch.Tensor, path: str) -> dict[str, str]:
        tensors[path] = t.detach().cpu()
        return {"$tensor": path}

    return to_jsonable(obj, put, escape=escape), tensors


def tree_from_json(
    obj: Any, field: str = "", tensors: dict[str, torch.Tensor] | None = None, depth: int = 0,
    *, sparse: bool = False,
) -> Any:
    """Plain JSON (from :func:`tree_to_json` or :func:`tree_to_safetensors`) back to a tree;
    ``$sparse`` tags become sparse tensors and ``$dict`` ones their dicts only with ``sparse``
    (the service's own files). Each node's path is a :class:`TreePath`, written only where
    an error names it."""
    return _from_json(obj, TreePath(field), tensors, depth, sparse)


def _from_json(obj: Any, at: TreePath, tensors: dict[str, torch.Tensor] | None, depth: int,
               sparse: bool) -> Any:
    if depth > MAX_STATE_DEPTH:
        raise Invalid("state is nested too deeply", code="invalid_state", field=str(at))
    if isinstance(obj, dict):
        if not obj:
            return {}
        if obj.keys() == {"$float"}:
            return untag_float(obj, str(at), "invalid_state")
        if sparse and obj.keys() == {DICT_TAG} and isinstance(obj[DICT_TAG], dict):
            return {k: _from_json(v, at.child(k), tensors, depth + 1, sparse)
                    for k, v in obj[DICT_TAG].items()}
        if sparse and obj.keys() == {BIG_INT_TAG}:
            big = _big_int(obj[BIG_INT_TAG])
            if big is not None:
                return big
        if sparse and obj.keys() == {SPARSE_TAG}:
            parts = _from_json(obj[SPARSE_TAG], at, tensors, depth + 1, False)
            return torch.sparse_coo_tensor(parts["indices"], parts["values"],
                                           tuple(parts["shape"]),
                                           is_coalesced=bool(parts["coalesced"]),
                                           check_invariants=False)
        if obj.keys() == {"$tensor"}:
            key = obj["$tensor"]
            if tensors is None or not isinstance(key, str) or key not in tensors:
                raise Invalid(f"$tensor reference {key!r:.60} names no tensor in the body",
                              code="invalid_state", field=str(at))
            return tensors[key]
        if is_json_tensor(obj):  # (the service's own files: base64 as servers took it)
            return decode_json_tensor(obj, at, canonical=not sparse)
        if depth >= MAX_STATE_DEPTH:  # (a value below is past the limit: named there)
            return {k: _from_json(v, at.child(k), tensors, depth + 1, sparse)
                    for k, v in obj.items()}
        return {k: v if type(v) in _JSON_SCALARS else
                _from_json(v, at.child(k), tensors, depth + 1, sparse)
                for k, v in obj.items()}
    if isinstance(obj, list):
        if depth >= MAX_STATE_DEPTH:  # (a value below is past the limit: named there)
            return [_from_json(v, at.child(i), tensors, depth + 1, sparse)
                    for i, v in enumerate(obj)]
        # plain values as they are, without a path each (what the walk gives for them)
        return [v if type(v) in _JSON_SCALARS else
                _from_json(v, at.child(i), tensors, depth + 1, sparse)
                for i, v in enumerate(obj)]
    return obj


def _big_int(text: object) -> int | None:
    """The int a :data:`BIG_INT_TAG`'s text stands for: decimal digits (after one ``-``)
    of an int outside :data:`OPTION_INTS`, the only ones written so; else None."""
    value = int_text(text, _BIG_INT_DIGITS, signed=True)
    return None if value is None or OPTION_INTS[0] <= value <= OPTION_INTS[1] else value


#: the most digits a :data:`BIG_INT_TAG` is read with (Python's own limit on int from text)
_BIG_INT_DIGITS = 4300


#: the values a JSON text's list holds that :func:`_from_json` gives back as they are
_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})
