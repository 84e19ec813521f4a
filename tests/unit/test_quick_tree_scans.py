"""The quick paths of the walks over a client's state tree give what the walks give.

``refuse_unwritable`` walks a state with a path object per node to name what it refuses; a
scan without paths (``_unwritable_somewhere``) now decides first whether there is anything to
name (two million numbers took 1.2 s of paths). ``tree_from_json`` gives a list of plain JSON
values back as it is, without a path per value (0.8 s per two million). Each is checked here
against the walk it shortcuts, on generated trees."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.state_dicts import INT64, OPTION_INTS, _unwritable_somewhere, refuse_unwritable
from app.errors import Invalid
from app.wire.dtypes import DTYPE_NAMES
from app.wire.tree import MAX_STATE_DEPTH, nodes_once, tree_from_json

EDGES = [INT64[0] - 1, INT64[0], -1, 0, 7, INT64[1], INT64[1] + 1, OPTION_INTS[1],
         OPTION_INTS[1] + 1]
TENSORS = [torch.zeros(2), torch.zeros(2, device="meta"), torch.zeros(2).to_sparse(),
           torch.zeros(2, dtype=torch.complex64), torch.zeros(2, dtype=torch.float8_e4m3fn)]
leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3),
                   st.sampled_from(EDGES), st.integers(-5, 5), st.sampled_from(TENSORS))
keys = st.one_of(st.text(max_size=3), st.sampled_from(EDGES))
trees = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=4)), max_leaves=20)
states = st.dictionaries(st.sampled_from(["state", "param_groups", "scheduler", 5, 2**70]),
                         trees, max_size=3)


def _refused(state: object) -> bool:
    try:
        refuse_unwritable(state)
    except Invalid:
        return True
    return False


def _walked(state: object) -> bool:
    """What the walk alone decides (the function's body past the scan)."""
    for node, at in nodes_once(state, "state_dict"):
        if isinstance(node, dict) and any(
                type(k) is int and not INT64[0] <= k <= INT64[1] for k in node):
            return True
        if type(node) is int:
            low, high = OPTION_INTS if at.top() == "param_groups" else INT64
            if not low <= node <= high:
                return True
        if isinstance(node, torch.Tensor) and (
                node.is_nested or node.layout != torch.strided or node.device.type == "meta"
                or node.is_quantized or node.dtype not in DTYPE_NAMES):
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(states)
def test_the_scan_finds_what_the_walk_refuses(state: dict[Any, Any]) -> None:
    scanned = _unwritable_somewhere(state)
    assert scanned == _walked(state)
    assert _refused(state) == scanned


def test_a_list_shared_under_two_top_keys_is_refused_as_the_walk_meets_it() -> None:
    """A ``torch.save`` pickle may hold one list under ``param_groups`` and ``state``: the walk
    checks it once, with the bounds of where it meets it first; the scan may find more, and
    then the walk decides."""
    shared = [2**63]
    assert not _refused({"param_groups": [shared], "state": {0: shared}})
    assert _refused({"state": {0: shared}, "param_groups": [shared]})


#: containers of plain values, and empty ones (which hold none)
PLAIN = [{"a": 1, "b": 2.5, "c": "x", "d": None, "e": True}, {}, [1, 2.5, "x", None, True], []]


@pytest.mark.parametrize("depth", [MAX_STATE_DEPTH - 2, MAX_STATE_DEPTH - 1, MAX_STATE_DEPTH])
@pytest.mark.parametrize("leaf", PLAIN, ids=["object", "empty-object", "list", "empty-list"])
def test_plain_values_come_back_as_they_are_at_any_depth_the_walk_takes(
        depth: int, leaf: dict[str, Any] | list[Any]) -> None:
    """At the deepest level taken, a list's or an object's values are one level deeper than
    it: past the limit unless it is empty (as the walk had it)."""
    tree: Any = type(leaf)(leaf)
    for _ in range(depth):
        tree = {"k": tree} if isinstance(leaf, dict) else [tree]
    if depth >= MAX_STATE_DEPTH and leaf:
        with pytest.raises(Invalid, match="nested too deeply"):
            tree_from_json(tree, "state_dict")
        return
    got = tree_from_json(tree, "state_dict")
    assert got == tree and got is not tree
    inner = got
    for _ in range(depth):
        inner = inner["k"] if isinstance(leaf, dict) else inner[0]
    values = list(inner.values()) if isinstance(inner, dict) else inner
    wanted = list(leaf.values()) if isinstance(leaf, dict) else leaf
    assert inner == leaf and [type(v) for v in values] == [type(v) for v in wanted]
