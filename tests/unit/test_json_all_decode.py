"""``all_decode`` (the early refusal's look at the JSON tensors after the refused name) says
True exactly when ``decode_json_tensor`` decodes every tensor given: each malformed form the
decoder refuses, alone and among well-formed tensors of the same dtype (whose values it checks
together), and well-formed tensors of every kind of value it takes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from app.errors import Invalid
from app.wire.json_tensor import all_decode, decode_json_tensor
from tests.torch_reference import json_tensor

GOOD: list[Any] = [
    {"dtype": "float32", "shape": [2], "data": [1.5, -2]},
    {"dtype": "float32", "shape": [3], "data": ["NaN", "Infinity", "-Infinity"]},
    {"dtype": "float16", "shape": [1], "data": [65504.0]},
    {"dtype": "bfloat16", "shape": [1, 1], "data": [1e38]},
    {"dtype": "float64", "shape": [0], "data": []},
    {"dtype": "int64", "shape": [2], "data": [2**63 - 1, -(2**63)]},
    {"dtype": "uint8", "shape": [1], "data": [255]},
    {"dtype": "bool", "shape": [2], "data": [True, False]},
    json_tensor(torch.arange(5, dtype=torch.float32), b64=True),
    {"dtype": "int32", "shape": [0], "b64": ""},
]
BAD: list[Any] = [
    [1.0],
    {"dtype": "float32", "shape": [1], "data": [1.0], "extra": 1},
    {"dtype": "float31", "shape": [1], "data": [1.0]},
    {"dtype": "float32", "data": [1.0]},
    {"dtype": "float32", "shape": [-1], "data": []},
    {"dtype": "float32", "shape": [1] * 65, "data": [1.0]},
    {"dtype": "float32", "shape": [1]},
    {"dtype": "float32", "shape": [1], "data": [1.0], "b64": "AAAAAA=="},
    {"dtype": "float32", "shape": [1], "data": "1.0"},
    {"dtype": "float32", "shape": [3], "data": [1.0, 2.0]},
    {"dtype": "float32", "shape": [1], "data": [True]},
    {"dtype": "float32", "shape": [1], "data": ["nan"]},
    {"dtype": "float32", "shape": [1], "data": [[1.0]]},
    {"dtype": "float32", "shape": [1], "data": [1e39]},
    {"dtype": "float32", "shape": [1], "data": [10**400]},
    {"dtype": "float16", "shape": [1], "data": [1e5]},
    {"dtype": "int64", "shape": [1], "data": [1.0]},
    {"dtype": "int64", "shape": [1], "data": [2**63]},
    {"dtype": "uint8", "shape": [1], "data": [256]},
    {"dtype": "int32", "shape": [1], "data": ["NaN"]},
    {"dtype": "bool", "shape": [1], "data": [1]},
    {"dtype": "float32", "shape": [1], "b64": 5},
    {"dtype": "float32", "shape": [1], "b64": "AAAA"},
    {"dtype": "float32", "shape": [1], "b64": "AA!A"},
    {"dtype": "float32", "shape": [1], "b64": "AAAAAB=="},
]


def decodes(obj: Any) -> bool:
    try:
        decode_json_tensor(obj, "t")
    except Invalid:
        return False
    return True


def test_the_catalogue_is_what_the_decoder_says() -> None:
    assert all(decodes(t) for t in GOOD)
    assert not any(decodes(t) for t in BAD)


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_a_malformed_tensor_anywhere_is_seen(bad: Any) -> None:
    assert not all_decode({"x": bad}, "grads")
    for good in GOOD:
        for pair in itertools.permutations([good, bad]):
            assert not all_decode(dict(zip("ab", pair, strict=True)), "grads"), pair


def test_well_formed_tensors_decode_together() -> None:
    assert all_decode({}, "grads")
    assert all_decode({f"t{i}": t for i, t in enumerate(GOOD)}, "grads")
    assert all_decode({f"t{i}": t for i, t in enumerate(GOOD * 3)}, "grads")
