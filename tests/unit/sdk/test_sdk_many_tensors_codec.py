"""The SDK's codecs for many small tensors: the joined encoding of small torch tensors and the
batched decoding of a safetensors body give, tensor for tensor, what the one-tensor-at-a-time
paths give (``to_wire``; ``loads`` + ``from_wire``), whatever the mix of dtypes, shapes,
strides, views, sizes and layouts."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from optserve import _safetensors as st
from optserve import _sparse
from optserve import _tensors as T
from tests.unit.sdk.test_sdk_codec import sample

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


class Tagged(torch.Tensor):
    """A tensor subclass: takes the general path."""


def made(kind: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` held in one of the ways training code holds one."""
    if kind == "transposed" and len(shape) == 2:
        return sample(dtype, shape[::-1], seed).t()
    if kind == "strided":
        return sample(dtype, (*shape[:-1], shape[-1] * 2) if shape else (2,), seed)[..., ::2] \
            if shape else sample(dtype, (), seed)
    if kind == "expanded" and shape and shape[0] > 1:
        return sample(dtype, (1, *shape[1:]), seed).expand(shape)
    if kind == "neg" and dtype.is_floating_point:
        return torch._neg_view(sample(dtype, shape, seed))
    if kind == "parameter" and dtype.is_floating_point:
        return torch.nn.Parameter(sample(dtype, shape, seed))  # requires grad
    if kind == "subclass":
        return sample(dtype, shape, seed).as_subclass(Tagged)
    if kind == "large":
        return sample(dtype, (T.JOIN_MAX + 3,), seed)
    return sample(dtype, shape, seed)


SHAPES = hs.sampled_from([(), (0,), (1,), (4,), (3, 5), (2, 0, 3), (2, 3, 4), (7, 1)])
KINDS = hs.sampled_from(["plain", "plain", "plain", "transposed", "strided", "expanded", "neg",
                         "parameter", "subclass", "large"])
TENSORS = hs.lists(hs.tuples(hs.sampled_from(DTYPES), SHAPES, KINDS), min_size=0, max_size=40)


def wire_key(w: st.WireTensor) -> tuple[str, tuple[int, ...], bytes]:
    return w.dtype, w.shape, bytes(w.data)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))  # (the same element size: any strides)


@settings(max_examples=150, deadline=None)
@given(specs=TENSORS, seed=hs.integers(0, 1000))
def test_the_joined_encoding_is_each_tensors_own(specs: list[Any], seed: int) -> None:
    tensors = {f"t{i:02d}": made(kind, dtype, shape, seed + i)
               for i, (dtype, shape, kind) in enumerate(specs)}
    joined = T.encode_tensor_map(tensors, "grads")
    assert list(joined) == list(tensors)  # the order, which the body's layout follows
    for name, t in tensors.items():
        assert wire_key(joined[name]) == wire_key(T.to_wire(t, name)), name
    # and the body it makes is what the safetensors package reads back, bit for bit
    body = st.dumps(joined)
    for name, back in safetensors.torch.load(body).items():
        assert bits_equal(back, tensors[name].detach().resolve_neg().contiguous()), name


def test_the_joined_encoding_with_row_sparse_tensors_among_them() -> None:
    dense = {f"d{i}": torch.randn(3) for i in range(5)}
    rows = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.randn(2, 3), (4, 3),
                                   check_invariants=True)
    mixed = {"d0": dense["d0"], "s": rows, **{k: v for k, v in dense.items() if k != "d0"}}
    out = _sparse.encode_tensor_map(mixed, "grads")
    assert list(out) == list(mixed)
    assert isinstance(out["s"], _sparse.SparseWire)
    for name, t in dense.items():
        assert wire_key(out[name]) == wire_key(T.to_wire(t))  # type: ignore[arg-type]


def test_the_joined_encoding_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(TypeError, match=r"grads\['c'\]: dtype torch.complex64 cannot be sent"):
        T.encode_tensor_map({"a": torch.ones(2), "b": torch.ones(2),
                             "c": torch.ones(2, dtype=torch.complex64),
                             "d": torch.ones(2, dtype=torch.complex64)}, "grads")
    with pytest.raises(TypeError, match="names must be strings"):
        T.encode_tensor_map({"a": torch.ones(2), 3: torch.ones(2)}, "grads")  # type: ignore[dict-item]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_element_with_any_stride_is_sent(dtype: torch.dtype) -> None:
    """A one-element view counts as contiguous whatever its stride (bfloat16's bytes were
    taken through a byte view that refused it)."""
    x = sample(dtype, (2,), 1)[::2]
    assert x.is_contiguous() and x.stride() == (2,)
    w = T.to_wire(x)
    assert bits_equal(T.from_wire(w), x)


def test_joined_wires_do_not_follow_later_edits_of_the_tensors() -> None:
    """The joined copy is taken at encoding: a gradient changed after it (the next backward
    pass, while a retry re-sends the body) does not change the request's bytes."""
    grads = {"a": torch.ones(3), "b": torch.ones(3)}
    out = T.encode_tensor_map(grads, "grads")
    grads["a"].fill_(5)
    assert bytes(out["a"].data) == torch.ones(3).numpy().tobytes()


# --------------------------------------------------------------------------- decoding
def handmade(entries: list[tuple[str, torch.Tensor]], data_order: list[int], gaps: list[int],
             align: bool) -> bytes:
    """A safetensors body whose header lists ``entries`` in their order while their bytes lie in
    ``data_order``, ``gaps[i]`` spare bytes before each (aligned to the element size unless
    ``align`` is false)."""
    data = bytearray()
    header: dict[str, Any] = {}
    for k, i in enumerate(data_order):
        name, t = entries[i]
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        data += bytes(gaps[k % len(gaps)])
        if align:
            data += bytes(-len(data) % t.element_size())
        header[name] = (len(data), len(data) + len(raw))
        data += raw
    codes = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
             torch.float64: "F64", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
             torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}
    head = json.dumps({name: {"dtype": codes[t.dtype], "shape": list(t.shape),
                              "data_offsets": list(header[name])} for name, t in entries}
                      ).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + bytes(data)


@settings(max_examples=150, deadline=None)
@given(specs=hs.lists(hs.tuples(hs.sampled_from(DTYPES), SHAPES), min_size=0, max_size=30),
       seed=hs.integers(0, 1000), data=hs.data(), align=hs.booleans())
def test_the_batched_decoding_is_each_tensors_own(specs: list[Any], seed: int, data: Any,
                                                  align: bool) -> None:
    entries = [(f"t{i:02d}", sample(dtype, shape, seed + i))
               for i, (dtype, shape) in enumerate(specs)]
    order = data.draw(hs.permutations(range(len(entries))))
    gaps = data.draw(hs.lists(hs.sampled_from([0, 0, 0, 1, 2, 8]), min_size=1, max_size=4))
    body = handmade(entries, order, gaps, align)
    decoded, metadata = T.tensors_from_safetensors(body)
    wires, _ = st.loads(body)
    assert metadata == {}
    assert list(decoded) == list(wires) == [name for name, _ in entries]
    for name, t in entries:
        assert bits_equal(decoded[name], t), name
        assert bits_equal(decoded[name], T.from_wire(wires[name])), name
    # each its own memory: writing one changes no other
    for t in decoded.values():
        if t.numel():
            t.zero_()
    for name, t in entries:
        if t.numel():
            assert not decoded[name].any(), name


def test_the_batched_decoding_reads_the_safetensors_packages_files() -> None:
    tensors = {f"p{i}": torch.randn(4, generator=torch.Generator().manual_seed(i))
               for i in range(300)}
    tensors["big"] = torch.randn(3, 5)
    tensors["h"] = torch.randn(2).to(torch.bfloat16)
    body = safetensors.torch.save(tensors, metadata={"k": "v"})
    decoded, metadata = T.tensors_from_safetensors(body)
    assert metadata == {"k": "v"}
    assert set(decoded) == set(tensors)
    for name, t in tensors.items():
        assert bits_equal(decoded[name], t), name


def test_the_batched_decoding_uses_a_writable_buffer_as_it_is() -> None:
    """An answer read into the optimizer's kept buffer is decoded in place, no copy (the
    tensors are views of it), as ``loads`` does."""
    body = bytearray(st.dumps({f"p{i}": T.to_wire(torch.full((2,), float(i))) for i in range(3)}))
    view = memoryview(body)
    decoded, _ = T.tensors_from_safetensors(view)
    body[-8:] = np.array([7.0, 7.0], dtype="<f4").tobytes()  # the last tensor's bytes
    assert torch.equal(decoded["p2"], torch.full((2,), 7.0))


def framed(head: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\x01", "shorter"),
        (struct.pack("<Q", 100) + b"{}", "claims"),
        (framed(b"[]"), "object"),
        (framed(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'), "data_offsets"),
        (framed(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)),
         "cannot hold"),
        (framed(b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', bytes(4)),
         "bad shape"),
        (framed(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', bytes(4)),
         "bad shape"),
        (framed(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', bytes(4)),
         "data_offsets"),
        (framed(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', bytes(4)),
         "data_offsets"),
        (framed(b'{"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}', bytes(4)), "dtype"),
        (framed(b'{"a":[1]}', bytes(4)), "not an object"),
    ],
)
def test_the_batched_decoding_refuses_malformed_bodies(body: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        T.tensors_from_safetensors(body)
    with pytest.raises(ValueError, match=match):
        st.loads(body)
