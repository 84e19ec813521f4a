"""State-dict trees (``app.wire.tree``): real torch state dicts go to JSON (or a safetensors
skeleton plus tensors) and come back equal, tensors bit for bit; malformed trees are ``Invalid``."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import orjson
import pytest
import torch

from app.errors import Invalid
from app.wire.safetensors_body import read_safetensors, write_safetensors
from app.wire.tree import (
    nodes_once,
    to_jsonable,
    tree_from_json,
    tree_to_json,
    tree_to_safetensors,
)


def optimizer_state(cls: type[torch.optim.Optimizer], **options: Any) -> dict[str, Any]:
    """A real state dict after three steps, with a scheduler's state alongside."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g).to(torch.float64)]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.005}], **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
        sched.step()
    sd = opt.state_dict()
    sd["scheduler"] = sched.state_dict()
    return sd


def normalize(obj: Any) -> Any:
    """What the wire keeps: tuples as lists, keys as strings."""
    if isinstance(obj, dict):
        return {str(k): normalize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [normalize(v) for v in obj]
    return obj


def assert_tree_equal(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        if want.numel():
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               want.reshape(-1).view(torch.uint8)), path
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for k in want:
            assert_tree_equal(got[k], want[k], f"{path}.{k}")
        return
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_tree_equal(a, b, f"{path}.{i}")
        return
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), path
        return
    assert type(got) is type(want) and got == want, (path, got, want)


OPTIMIZERS = [
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.ASGD, {"lr": 0.01}),
    (torch.optim.Rprop, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.1}),
]


@pytest.mark.parametrize(("cls", "options"), OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
@pytest.mark.parametrize("b64", [False, True], ids=["data", "b64"])
def test_state_dict_round_trip_through_json_text(
    cls: type[torch.optim.Optimizer], options: dict[str, Any], b64: bool
) -> None:
    sd = optimizer_state(cls, **options)
    text = orjson.dumps(tree_to_json(sd, b64=b64), option=orjson.OPT_SERIALIZE_NUMPY)
    back = tree_from_json(orjson.loads(text), "state_dict")
    assert_tree_equal(back, normalize(sd))


@pytest.mark.parametrize(("cls", "options"), OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_state_dict_round_trip_through_safetensors(
    cls: type[torch.optim.Optimizer], options: dict[str, Any]
) -> None:
    sd = optimizer_state(cls, **options)
    skeleton, tensors = tree_to_safetensors(sd)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    first = next(iter(sd["state"][0]))
    assert skeleton["state"]["0"][first] == {"$tensor": f"state.0.{first}"}
    blob = write_safetensors(tensors, {"optserve_state": orjson.dumps(skeleton).decode()})
    read, meta = read_safetensors(bytearray(blob))
    back = tree_from_json(orjson.loads(meta["optserve_state"]), "state_dict", read)
    assert_tree_equal(back, normalize(sd))


def test_back_into_torch_continues_identically() -> None:
    """A state dict that went through the wire loads into torch (ids back to ints) and the
    optimizer continues bit for bit as the original."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, generator=g)
    b = a.clone()
    opt_a = torch.optim.Adam([a], lr=0.01, betas=(0.8, 0.95))
    for _ in range(2):
        a.grad = torch.randn(5, generator=g)
        opt_a.step()
    b.data.copy_(a.data)
    wire = orjson.loads(orjson.dumps(tree_to_json(opt_a.state_dict()),
                                     option=orjson.OPT_SERIALIZE_NUMPY))
    back = tree_from_json(wire, "state_dict")
    back["state"] = {int(k): v for k, v in back["state"].items()}
    opt_b = torch.optim.Adam([b], lr=0.5)
    opt_b.load_state_dict(back)
    assert list(opt_b.param_groups[0]["betas"]) == [0.8, 0.95]
    grad = torch.randn(5, generator=g)
    a.grad, b.grad = grad, grad.clone()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a, b)


def test_nonfinite_floats_are_tagged() -> None:
    tree = {"a": math.inf, "b": [-math.inf, math.nan, 1.5], "c": (0.0, -0.0), "d": None,
            "e": True, "f": "text", 3: 7}
    out = tree_to_json(tree)
    assert out == {"a": {"$float": "inf"}, "b": [{"$float": "-inf"}, {"$float": "nan"}, 1.5],
                   "c": [0.0, -0.0], "d": None, "e": True, "f": "text", "3": 7}
    orjson.dumps(out)  # plain JSON now
    back = tree_from_json(orjson.loads(orjson.dumps(out)))
    assert back["a"] == math.inf and back["b"][0] == -math.inf and math.isnan(back["b"][1])
    assert math.copysign(1.0, back["c"][1]) == -1.0
    assert back["3"] == 7 and back["e"] is True


def test_tensor_leaves_and_lookalikes() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    out = tree_to_json({"x": t, "scalar": torch.tensor(2.0)})
    assert out["x"] == {"dtype": "int32", "shape": [2, 2], "data": out["x"]["data"]}
    assert out["x"]["data"].tolist() == [1, 2, 3, 4]
    # an object with a tensor's keys plus another is not a tensor: it stays an object
    lookalike = {"dtype": "float32", "shape": [1], "data": [1.0], "note": "x"}
    assert tree_from_json({"o": lookalike}) == {"o": lookalike}
    back = tree_from_json({"t": {"dtype": "float32", "shape": [], "data": ["Infinity"]}})
    assert back["t"].item() == math.inf and back["t"].shape == ()


def test_safetensors_refs_need_the_tensors() -> None:
    t = torch.ones(2)
    assert tree_from_json({"x": {"$tensor": "k"}}, "s", {"k": t})["x"] is t
    for obj, tensors in [({"$tensor": "k"}, None), ({"$tensor": "nope"}, {"k": t}),
                         ({"$tensor": 5}, {"k": t}), ({"$tensor": ["k"]}, {"k": t}),
                         ({"$tensor": None}, {})]:
        with pytest.raises(Invalid) as info:
            tree_from_json({"a": [obj]}, "state_dict", tensors)
        assert info.value.field == "state_dict.a.0"
        assert info.value.code == "invalid_state"


@pytest.mark.parametrize("tag", ["Infinity", "INF", "", 1, None, [], {}, ["inf"], {"x": 1}],
                         ids=repr)
def test_bad_float_tag(tag: Any) -> None:
    with pytest.raises(Invalid) as info:
        tree_from_json({"param_groups": [{"eps": {"$float": tag}}]}, "state_dict")
    assert info.value.field == "state_dict.param_groups.0.eps"


def test_malformed_tensor_inside_a_tree() -> None:
    bad = {"dtype": "float32", "shape": [2], "data": [1.0]}
    with pytest.raises(Invalid) as info:
        tree_from_json({"state": {"0": {"exp_avg": bad}}}, "state_dict")
    assert info.value.field == "state_dict.state.0.exp_avg.data"


def test_nesting_is_bounded() -> None:
    ok: Any = 1
    for _ in range(60):
        ok = [ok]
    assert tree_from_json(ok) is not None
    deep: Any = 1
    for _ in range(70):
        deep = {"k": deep}
    with pytest.raises(Invalid) as info:
        tree_from_json(deep, "state_dict")
    assert info.value.code == "invalid_state"
    assert info.value.field is not None and info.value.field.startswith("state_dict.k.k.k")
    very_deep: Any = []
    for _ in range(50_000):
        very_deep = [very_deep]
    with pytest.raises(Invalid):
        tree_from_json(very_deep)


def test_unserializable_leaf_is_a_type_error() -> None:
    """Server-side bug guard: only JSON-able leaves and tensors may be put on the wire."""
    with pytest.raises(TypeError, match="cannot put set"):
        to_jsonable({"a": [{1, 2}]}, lambda t, p: None)


def test_nodes_once_names_each_node_by_its_path_in_order() -> None:
    """Every node of a tree, depth first in order, each list or dict once (a list held twice
    is walked at its first place), with the dotted path an error names it by."""
    shared = [1, 2]
    tree = {"a": [{"b": 1.5}, shared], "c": shared, "d": (3,)}
    walked = [(str(at), at.depth, node) for node, at in nodes_once(tree, "root")]
    assert [(p, d) for p, d, _ in walked] == [
        ("root", 0), ("root.a", 1), ("root.a.0", 2), ("root.a.0.b", 3), ("root.a.1", 2),
        ("root.a.1.0", 3), ("root.a.1.1", 3), ("root.d", 1), ("root.d.0", 2)]
    assert walked[3][2] == 1.5 and walked[-1][2] == 3


def test_a_walk_over_a_long_key_holds_no_path_per_item() -> None:
    """A list under a long key (``{"k" * 10000: [0] * 50000}``, a body of 150 KB): the walks
    wrote each item's path as they met it, all of a level's at once, 500 MB for this tree.
    The walk and a JSON decode of it now hold a few MB."""
    wide = {"state": {"k" * 10_000: [0] * 50_000}}
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        assert sum(1 for _ in nodes_once(wide, "state_dict")) == 50_003
        tree_from_json(wide, "state_dict")
        grown = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert grown < 16 << 20, f"{grown >> 20} MB"


def test_ints_past_64_bits_round_trip_the_service_files_and_nothing_else_reads_as_one() -> None:
    """An int no JSON number holds is a ``$int`` tag in the service's own files (a snapshot of a
    session an older server took with an LBFGS ``max_eval`` past 64 bits failed on it); a
    dict of that key alone from the tree is escaped, and one an older server wrote unescaped
    (its text no such int) reads back as the dict it was."""
    tree = {"big": [2**70, -(2**70), 2**64 - 1, -(2**63), True],
            "$int": {"$int": str(2**70)}, "odd": {"$int": "12"}}
    skeleton, tensors = tree_to_safetensors(tree, escape=True)
    assert skeleton["big"][:2] == [{"$int": str(2**70)}, {"$int": str(-(2**70))}]
    assert tree_from_json(orjson.loads(orjson.dumps(skeleton)), "", tensors, sparse=True) == tree
    old = {"odd": {"$int": "12"}, "word": {"$int": "x"}, "small": {"$int": str(2**64 - 1)}}
    assert tree_from_json(old, "", {}, sparse=True) == old
    assert tree_from_json({"b": {"$int": str(2**70)}}) == {"b": {"$int": str(2**70)}}
