"""Safetensors bodies (``app.wire.safetensors_body``): the writer's files read back bit for bit
(by our reader and by the safetensors library), and the strict reader turns every malformed file
into ``BadRequest`` (not safetensors) or ``Invalid`` (a dtype we do not carry)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import safetensors.torch
import torch

from app.errors import BadRequest, Invalid
from app.wire.dtypes import SAFETENSORS_NAMES, TORCH_DTYPES
from app.wire.safetensors_body import read_safetensors, write_safetensors


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.arange(n) % 3 == 0).reshape(shape)
    if dtype.is_floating_point:
        values = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1 / 3, 65504.0] * n)[:n]
        return values.to(dtype).reshape(shape)
    info = torch.iinfo(dtype)
    return torch.tensor([info.min, info.max, 0, 1, -1 if info.min else 2, 7] * n)[:n].to(
        dtype).reshape(shape)


def raw_bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() \
        else b""


def st_file(header: Any, data: bytes, header_len: int | None = None, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


ALL = {name: sample(TORCH_DTYPES[name]) for name in TORCH_DTYPES}


def test_round_trip_every_dtype_with_metadata() -> None:
    tensors = {f"t_{name}": t for name, t in ALL.items()}
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.empty(0, 4, dtype=torch.float16)
    meta = {"version": "3", "lr": "[0.1, 0.01]", "note": "ünïcode"}
    blob = write_safetensors(tensors, meta)
    assert isinstance(blob, bytes)
    for buf in (blob, bytearray(blob)):
        got, got_meta = read_safetensors(buf)
        assert got_meta == meta
        assert set(got) == set(tensors)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert raw_bits(got[name]) == raw_bits(t), name
    # the library agrees with our writer
    lib = safetensors.torch.load(blob)
    for name, t in tensors.items():
        assert raw_bits(lib[name]) == raw_bits(t)


def test_reads_what_the_library_writes() -> None:
    tensors = {"a": ALL["float32"], "b": ALL["int64"], "c": torch.tensor(True)}
    blob = safetensors.torch.save(tensors, metadata={"k": "v"})
    got, meta = read_safetensors(bytearray(blob))
    assert meta == {"k": "v"}
    for name, t in tensors.items():
        assert raw_bits(got[name]) == raw_bits(t)


def test_no_metadata_and_no_tensors() -> None:
    got, meta = read_safetensors(write_safetensors({}, None))
    assert (got, meta) == ({}, {})
    got, meta = read_safetensors(st_file({}, b""))
    assert (got, meta) == ({}, {})


def test_writer_takes_any_layout() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    views = {"t": base.t(), "strided": base[:, ::2], "expanded": torch.ones(1).expand(3)}
    got, _ = read_safetensors(write_safetensors(views, None))
    for name, t in views.items():
        assert torch.equal(got[name], t), name


def test_bytearray_gives_views_bytes_give_copies() -> None:
    t = torch.tensor([1.0, 2.0, 3.0])
    blob = write_safetensors({"t": t}, None)
    buf = bytearray(blob)
    got, _ = read_safetensors(buf)
    buf[-4:] = struct.pack("<f", 9.0)  # the reader did not copy
    assert got["t"].tolist() == [1.0, 2.0, 9.0]
    got, _ = read_safetensors(blob)
    got["t"].add_(1)  # a copy of immutable bytes is writable
    assert got["t"].tolist() == [2.0, 3.0, 4.0]


def test_unaligned_offsets_are_copied_correctly() -> None:
    f = torch.tensor([1.5, -2.25], dtype=torch.float32)
    d = torch.tensor([math.pi], dtype=torch.float64)
    header = {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
              "d": {"dtype": "F64", "shape": [1], "data_offsets": [9, 17]}}
    blob = st_file(header, b"\x07" + raw_bits(f) + raw_bits(d))
    for buf in (blob, bytearray(blob)):
        got, _ = read_safetensors(buf)
        assert got["u"].tolist() == [7]
        assert raw_bits(got["f"]) == raw_bits(f)
        assert raw_bits(got["d"]) == raw_bits(d)


def test_header_order_need_not_match_data_order() -> None:
    a, b = torch.tensor([1.0]), torch.tensor([2.0, 3.0])
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    got, _ = read_safetensors(st_file(header, raw_bits(b) + raw_bits(a)))
    assert got["a"].tolist() == [1.0] and got["b"].tolist() == [2.0, 3.0]


def test_every_wire_dtype_has_a_safetensors_name() -> None:
    assert set(SAFETENSORS_NAMES.values()) == set(TORCH_DTYPES)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DATA_8 = b"\0" * 8

MALFORMED: list[tuple[str, bytes, type[Exception], str]] = [
    ("empty", b"", BadRequest, "body"),
    ("seven-bytes", b"\x02\0\0\0\0\0\0", BadRequest, "body"),
    ("header-longer-than-body", st_file({"x": F32_2}, DATA_8, header_len=4096), BadRequest,
     "body"),
    ("header-length-max", b"\xff" * 8 + b"{}      ", BadRequest, "body"),
    ("header-not-json", struct.pack("<Q", 8) + b"{{{{{{{{", BadRequest, "body"),
    ("header-not-utf8", struct.pack("<Q", 8) + b'{"\xff\xfe":1}', BadRequest, "body"),
    ("header-list", st_file([1, 2], b""), BadRequest, "body"),
    ("header-string", st_file("hello", b""), BadRequest, "body"),
    ("header-deep", struct.pack("<Q", 40000) + b"[" * 20000 + b"]" * 20000, BadRequest, "body"),
    ("metadata-not-object", st_file({"__metadata__": ["a"]}, b""), BadRequest,
     "body.__metadata__"),
    ("metadata-empty-list", st_file({"__metadata__": []}, b""), BadRequest, "body.__metadata__"),
    ("metadata-zero", st_file({"__metadata__": 0}, b""), BadRequest, "body.__metadata__"),
    ("metadata-int-value", st_file({"__metadata__": {"a": 1}}, b""), BadRequest,
     "body.__metadata__"),
    ("metadata-null-value", st_file({"__metadata__": {"a": None}}, b""), BadRequest,
     "body.__metadata__"),
    ("entry-not-object", st_file({"x": [1]}, DATA_8), BadRequest, "body.x"),
    ("entry-missing-offsets", st_file({"x": {"dtype": "F32", "shape": [2]}}, DATA_8), BadRequest,
     "body.x"),
    ("entry-extra-key", st_file({"x": {**F32_2, "device": "cuda"}}, DATA_8), BadRequest,
     "body.x"),
    ("unsupported-dtype", st_file({"x": {**F32_2, "dtype": "F8_E5M2"}}, DATA_8), Invalid,
     "body.x.dtype"),
    ("complex-dtype", st_file({"x": {**F32_2, "dtype": "C64", "shape": [1]}}, DATA_8), Invalid,
     "body.x.dtype"),
    ("lowercase-dtype", st_file({"x": {**F32_2, "dtype": "f32"}}, DATA_8), Invalid,
     "body.x.dtype"),
    ("shape-negative", st_file({"x": {**F32_2, "shape": [-2]}}, DATA_8), Invalid,
     "body.x.shape"),
    ("shape-not-list", st_file({"x": {**F32_2, "shape": 2}}, DATA_8), Invalid, "body.x.shape"),
    ("shape-huge-empty", st_file({"x": {"dtype": "F32", "shape": [0, 2**62, 4],
                                        "data_offsets": [0, 0]}}, b""), Invalid, "body.x.shape"),
    ("offsets-not-list", st_file({"x": {**F32_2, "data_offsets": "0-8"}}, DATA_8), BadRequest,
     "body.x.data_offsets"),
    ("offsets-three", st_file({"x": {**F32_2, "data_offsets": [0, 4, 8]}}, DATA_8), BadRequest,
     "body.x.data_offsets"),
    ("offsets-float", st_file({"x": {**F32_2, "data_offsets": [0.0, 8]}}, DATA_8), BadRequest,
     "body.x.data_offsets"),
    ("offsets-negative", st_file({"x": {**F32_2, "data_offsets": [-8, 0]}}, DATA_8), BadRequest,
     "body.x.data_offsets"),
    ("offsets-reversed", st_file({"x": {**F32_2, "data_offsets": [8, 0]}}, DATA_8), BadRequest,
     "body.x.data_offsets"),
    ("truncated", st_file({"x": F32_2}, DATA_8[:5]), BadRequest, "body.x.data_offsets"),
    ("size-mismatch", st_file({"x": {**F32_2, "shape": [3]}}, DATA_8), BadRequest,
     "body.x.data_offsets"),
    ("overlap", st_file({"x": F32_2, "y": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12),
     BadRequest, "body.y"),
    ("same-span-twice", st_file({"x": F32_2, "y": F32_2}, DATA_8), BadRequest, None),
    ("gap", st_file({"x": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12), BadRequest, "body.x"),
    ("trailing-bytes", st_file({"x": F32_2}, DATA_8 + b"\0"), BadRequest, "body"),
    ("data-without-tensors", st_file({}, DATA_8), BadRequest, "body"),
]


@pytest.mark.parametrize(("name", "blob", "error", "field"), MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed(name: str, blob: bytes, error: type[Exception], field: str | None) -> None:
    for buf in (blob, bytearray(blob)):
        with pytest.raises(error) as info:
            read_safetensors(buf)
        err = info.value
        assert type(err) is error
        if field is not None:
            assert err.field == field  # type: ignore[attr-defined]
        assert err.code in ("invalid_safetensors", "invalid_tensor")  # type: ignore[attr-defined]
        assert err.status == (400 if error is BadRequest else 422)  # type: ignore[attr-defined]


def test_field_prefix_is_the_callers() -> None:
    with pytest.raises(BadRequest) as info:
        read_safetensors(st_file({"x": F32_2}, DATA_8[:4]), field="state")
    assert info.value.field == "state.x.data_offsets"


def test_writer_takes_tensors_that_share_memory() -> None:
    """The same tensor under two names, and views of one storage (as in a state dict whose
    entries alias), are written as independent copies."""
    base = torch.arange(6, dtype=torch.float32)
    tensors = {"a": base, "b": base, "head": base[:3], "tail": base[3:], "empty": base[:0]}
    got, _ = read_safetensors(write_safetensors(tensors, None))
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
    got["a"].add_(1)
    assert got["b"].tolist() == base.tolist()


def test_packed_tensors_are_one_copy_and_a_valid_safetensors_body() -> None:
    """pack(): every view aligned (widest dtypes first), the values equal, later changes to
    the source do not reach the copy, and header + buffer is a file both readers accept."""
    import safetensors.torch

    from app.wire.safetensors_body import pack, packed_header

    src = {"h": torch.arange(3, dtype=torch.float16), "w": torch.randn(2, 3),
           "d": torch.randn(5, dtype=torch.float64), "e": torch.empty(0, 4),
           "i": torch.arange(4, dtype=torch.int32), "s": torch.tensor(2.5),
           "t": torch.randn(3, 4).t(), "b": torch.tensor([True, False, True]),
           "z": torch.randn(2, 2, dtype=torch.float64)}
    packed = pack(src)
    # widest first; one dtype's run may be cut by another of the same width (w, e, i, s, t)
    assert list(packed) == ["d", "z", "w", "e", "i", "s", "t", "h", "b"]
    for name, t in packed.items():
        assert torch.equal(t, src[name]) and t.dtype == src[name].dtype
        assert t.shape == src[name].shape and t.is_contiguous()
        assert t.data_ptr() % t.element_size() == 0
    src["w"].add_(1.0)
    assert not torch.equal(packed["w"], src["w"])
    body = packed_header(packed, {"version": "3"}) + bytes(packed.buffer)
    theirs = safetensors.torch.load(body)
    ours, meta = read_safetensors(bytearray(body))
    assert meta == {"version": "3"}
    for name in src:
        assert torch.equal(theirs[name], packed[name]) and torch.equal(ours[name], packed[name])


def test_a_large_header_is_read_with_the_collector_paused_and_resumed() -> None:
    """A header of thousands of tensors is parsed without cyclic collections (they walk every
    live object); the collector is on again afterwards, also when pauses overlap in threads,
    and stays off if it was off."""
    import gc
    import threading

    import safetensors.torch

    from app.runtime import gc_paused
    from app.wire import safetensors_body

    tensors = {f"t{i}": torch.full((2,), float(i)) for i in range(3000)}
    body = bytearray(safetensors.torch.save(tensors))
    assert int.from_bytes(body[:8], "little") >= safetensors_body.PAUSE_GC_HEADER
    seen: list[bool] = []
    real = safetensors_body._make_tensors  # the tensors are made inside the pause

    def spy(*args: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args)

    safetensors_body._make_tensors = spy  # type: ignore[assignment]
    try:
        got, _ = read_safetensors(body)
    finally:
        safetensors_body._make_tensors = real  # type: ignore[assignment]
    assert seen == [False] and gc.isenabled()
    assert all(torch.equal(got[n], t) for n, t in tensors.items())

    inside, go = threading.Barrier(2), threading.Event()

    def hold() -> None:
        with gc_paused():
            inside.wait(5)
            go.wait(5)
    other = threading.Thread(target=hold)
    other.start()
    with gc_paused():
        inside.wait(5)
    assert not gc.isenabled()  # the other thread still pauses it
    go.set()
    other.join(5)
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_kept_header_gives_the_same_tensors_and_is_checked_against_each_body() -> None:
    """Headers are kept parsed (a client sends the same one every step): the second body with
    that header reads its own bytes, a body cut short under a kept header is still refused,
    and the metadata handed out is the caller's own."""
    first = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    second = {"a": -first["a"], "b": torch.full((4,), 7.0)}
    meta = {"scalars": "{}"}
    raw1 = bytearray(safetensors.torch.save(first, metadata=meta))
    raw2 = bytearray(safetensors.torch.save(second, metadata=meta))
    assert raw1[:8 + int.from_bytes(raw1[:8], "little")] == raw2[:8 + int.from_bytes(
        raw2[:8], "little")]  # the same header
    for raw, want in ((raw1, first), (raw2, second), (raw1, first)):
        got, got_meta = read_safetensors(raw)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name])
        assert got_meta == meta
        got_meta["scalars"] = "changed"  # the next read still sees the file's own
    with pytest.raises(BadRequest):
        read_safetensors(raw1[:-4])
    with pytest.raises(BadRequest):
        read_safetensors(raw1 + b"\0\0\0\0")


def test_offsets_words_say_what_is_wrong() -> None:
    """Reversed offsets are named so, offsets past the data as outside it (a truncated file)."""
    with pytest.raises(BadRequest) as reversed_:
        read_safetensors(st_file({"x": {**F32_2, "data_offsets": [8, 0]}}, DATA_8))
    assert str(reversed_.value.detail) == "data_offsets [8, 0] end before they begin"
    with pytest.raises(BadRequest) as outside:
        read_safetensors(st_file({"x": F32_2}, DATA_8[:5]))
    assert "fall outside the 5 data bytes" in outside.value.detail
