"""The SDK keeps the safetensors headers it made and parsed lately (``optserve._safetensors``:
a model's steps send and get back the same tensor entries every time, with other
``__metadata__``). A header met again must give exactly what it gave the first time it was
worked out, whatever the metadata around the same entries, and never another header's
entries."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from optserve import _safetensors as st
from optserve import _tensors as T
from optserve._json import json_dumps
from optserve._recent import Recent
from tests.unit.sdk.test_sdk_many_tensors_codec import bits_equal, handmade

TEXT = hs.text(alphabet=hs.characters(codec="utf-8"), max_size=12)
METADATA = hs.dictionaries(TEXT, TEXT, max_size=4)


def _header(body: bytes) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(body[8:8 + struct.unpack_from("<Q", body)[0]])
    return header


def _package_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` as the header holds it (the package writes it)."""
    return _header(body).get("__metadata__") or {}


@settings(max_examples=60, deadline=None)
@given(metas=hs.lists(METADATA, min_size=2, max_size=5), count=hs.integers(1, 40))
def test_the_same_entries_under_other_metadata_decode_as_the_package_reads_them(
        metas: list[dict[str, str]], count: int) -> None:
    st._PARSED.clear()
    gen = torch.Generator().manual_seed(count)
    for meta in metas:  # the same entries each time, other values and other metadata
        tensors = {f"p{i}": torch.randn(3, generator=gen) for i in range(count)}
        body = safetensors.torch.save(tensors, metadata=meta or None)
        decoded, metadata = T.tensors_from_safetensors(body)
        assert metadata == _package_metadata(body) == meta
        assert list(decoded) == [n for n in _header(body) if n != "__metadata__"]
        for name, t in tensors.items():
            assert bits_equal(decoded[name], t), name
        _, entries, metadata = st.parse(body)
        assert metadata == meta
        wires, metadata = st.loads(body)
        assert metadata == meta
        assert all(bytes(wires[n].data) == tensors[n].numpy().tobytes() for n in tensors)
    # one header's entries, kept once (twice where some bodies had no metadata at all)
    assert len(st._PARSED._items) == len({bool(meta) for meta in metas})


def _with_metadata(head: bytes, tail: bytes) -> bytes:
    """A body of a hand-written header (padded to 8) and its data."""
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + tail


def test_a_later_metadata_key_wins_as_in_json_every_time() -> None:
    """JSON lets a repeated key's last value win: a header whose ``__metadata__`` comes again
    after the entries is not kept by the entries, and each such body answers its own."""
    data = torch.ones(2).numpy().tobytes()
    # (the first two alike: the later one decides even where the first alone would agree)
    for first, last in (("1", "1"), ("3", "1"), ("1", "2"), ("3", "4"), ("1", "5")):
        head = (b'{"__metadata__":{"a":"%s"},"t":{"dtype":"F32","shape":[2],'
                b'"data_offsets":[0,8]},"__metadata__":{"a":"%s"}}' % (first.encode(),
                                                                       last.encode()))
        body = _with_metadata(head, data)
        decoded, metadata = T.tensors_from_safetensors(body)
        assert metadata == {"a": last}
        assert torch.equal(decoded["t"], torch.ones(2))


def test_metadata_that_is_not_a_flat_object_of_strings_is_refused_every_time() -> None:
    tensors = b'"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    good = _with_metadata(b'{"__metadata__":{"a":"1"},' + tensors + b"}", bytes(4))
    assert T.tensors_from_safetensors(good)[1] == {"a": "1"}
    for meta in (b'{"a":1}', b'{"a":{"b":"c"}}', b'["a"]', b'{"a":"1"'):
        bad = _with_metadata(b'{"__metadata__":' + meta + b"," + tensors + b"}", bytes(4))
        with pytest.raises(ValueError, match="metadata|JSON"):
            T.tensors_from_safetensors(bad)
    # and the entries kept from the good one still serve the next good one
    again = _with_metadata(b'{"__metadata__":{"a":"}\\"{"},' + tensors + b"}",
                           torch.full((1,), 2.0).numpy().tobytes())
    decoded, metadata = T.tensors_from_safetensors(again)
    assert metadata == {"a": '}"{'}
    assert decoded["t"].item() == 2.0


@settings(max_examples=40, deadline=None)
@given(gaps=hs.lists(hs.integers(0, 9), min_size=1, max_size=3), pads=hs.lists(
    hs.integers(0, 7), min_size=2, max_size=4))
def test_the_same_entries_at_another_alignment_are_decoded_for_that_alignment(
        gaps: list[int], pads: list[int]) -> None:
    """A writer that does not pad its header puts the data at any alignment: which tensors
    are copies of their own (not aligned to their element size) depends on it, so it is
    part of what is kept."""
    entries = [("a", torch.randn(3)), ("b", torch.randn(2).double()),
               ("c", torch.arange(5, dtype=torch.int16))]
    base = handmade(entries, [0, 1, 2], gaps, align=False)
    n = struct.unpack_from("<Q", base)[0]
    head = base[8:8 + n].rstrip(b" ")
    for pad in pads:
        padded = head + b" " * pad  # (the same entries, the data moved by pad bytes)
        body = struct.pack("<Q", len(padded)) + padded + base[8 + n:]
        decoded, _ = T.tensors_from_safetensors(body)
        for name, t in entries:
            assert bits_equal(decoded[name], t), (name, pad)
            # (each aligned to its element size: a view where it lies so, else a copy)
            assert decoded[name].data_ptr() % t.element_size() == 0, (name, pad)


def test_another_shape_of_the_same_bytes_makes_another_header() -> None:
    a = st.body({"w": T.to_wire(torch.ones(4))})
    b = st.body({"w": T.to_wire(torch.ones(2, 2))})
    assert safetensors.torch.load(bytes(a))["w"].shape == (4,)
    assert safetensors.torch.load(bytes(b))["w"].shape == (2, 2)


@settings(max_examples=60, deadline=None)
@given(metas=hs.lists(hs.one_of(hs.none(), METADATA), min_size=2, max_size=4),
       count=hs.integers(0, 12))
def test_a_kept_headers_body_is_what_one_object_would_write(
        metas: list[dict[str, str] | None], count: int) -> None:
    """The entries are written once and the metadata spliced in front each time: the bytes
    are those of the whole header written as one object (metadata first), and the package
    reads them back."""
    tensors = {f"p{i}": torch.full((i % 3 + 1,), float(i),
                                   dtype=torch.float64 if i % 2 else torch.float32)
               for i in range(count)}
    wires = T.encode_tensor_map(tensors, "t")
    for meta in metas:
        body = bytes(st.body(wires, meta))
        order = sorted(wires, key=lambda n: -wires[n].itemsize)
        whole: dict[str, Any] = {"__metadata__": meta} if meta else {}
        offset = 0
        for name in order:
            size = wires[name].data.nbytes
            whole[name] = {"dtype": st.DTYPES[wires[name].dtype][0],
                           "shape": list(wires[name].shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        head = json_dumps(whole)
        head += b" " * (-len(head) % 8)
        assert body[:8 + len(head)] == struct.pack("<Q", len(head)) + head
        assert _package_metadata(body) == (meta or {})
        back = safetensors.torch.load(body)
        for name, t in tensors.items():
            assert bits_equal(back[name], t), name


def test_the_kept_headers_are_bounded() -> None:
    kept: Recent[str, int] = Recent(3, 100)
    for i in range(5):
        kept.put(f"k{i}", i, 10)
    assert kept.get("k0") is None and kept.get("k1") is None
    assert [kept.get(f"k{i}") for i in (2, 3, 4)] == [2, 3, 4]
    kept.put("big", 9, 101)  # over the limit on its own: not kept
    assert kept.get("big") is None
    kept.put("k5", 5, 60)  # 10 + 10 + 60 of 100: the oldest goes for the limit too
    kept.put("k6", 6, 30)
    assert kept.get("k2") is None and kept.get("k3") is None
    assert kept.get("k5") == 5 and kept.get("k6") == 6
    body = safetensors.torch.save({f"p{i}": torch.ones(1) for i in range(20)})
    for i in range(20):  # headers that all differ: at most the bound of them kept
        T.tensors_from_safetensors(safetensors.torch.save({f"q{i}": torch.ones(1)}))
    T.tensors_from_safetensors(body)
    assert len(st._PARSED) <= 8


def _reference(body: bytes) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """What a body holds, read without the SDK: the header by the standard library's JSON (a
    repeated key's last value wins there too), each tensor's dtype, shape and bytes."""
    n = struct.unpack_from("<Q", body)[0]
    header = json.loads(body[8:8 + n])
    metadata = header.pop("__metadata__", None) or {}
    data = body[8 + n:]
    return ({name: (info["dtype"], info["shape"],
                    data[info["data_offsets"][0]:info["data_offsets"][1]])
             for name, info in header.items()}, metadata)


ENTRY_SETS = [
    [("a", "F32", [3]), ("b", "F64", [2]), ("c", "I16", [5])],
    [("a", "F32", [3]), ("b", "F64", [2])],
    [("x", "F32", [2, 2])],
    [("x", "F32", [4])],
]
SIZES_OF = {"F32": 4, "F64": 8, "I16": 2}


@settings(max_examples=150, deadline=None)
@given(steps=hs.lists(hs.tuples(
    hs.integers(0, len(ENTRY_SETS) - 1),  # which tensors
    hs.one_of(hs.none(), METADATA),  # the metadata
    hs.sampled_from(["first", "last", "middle", "twice"]),  # where the metadata lies
    hs.sampled_from(["", " ", "\n  "]),  # whitespace after the metadata's value
    hs.integers(0, 9),  # padding after the header
    hs.integers(0, 3),  # bytes before the data (its alignment)
), min_size=1, max_size=12))
def test_any_sequence_of_headers_reads_as_each_body_holds(steps: list[Any]) -> None:
    """Headers that share their entries and differ in everything else, one after the other:
    each body's tensors and metadata are what a plain JSON reading of it gives."""
    for which, meta, where, space, pad, gap in steps:
        parts = []
        offset = gap
        for name, code, shape in ENTRY_SETS[which]:
            size = SIZES_OF[code] * int(torch.tensor(shape).prod())
            parts.append(f'"{name}":{{"dtype":"{code}","shape":{json.dumps(shape)},'
                         f'"data_offsets":[{offset},{offset + size}]}}')
            offset += size
        if meta is not None:
            text = f'"__metadata__":{space}{json.dumps(meta)}{space}'
            if where == "first":
                parts.insert(0, text)
            elif where == "last":
                parts.append(text)
            elif where == "middle":
                parts.insert(len(parts) // 2, text)
            else:  # (the first one loses)
                parts.insert(0, '"__metadata__":{"lost":"1"}')
                parts.append(text)
        head = ("{" + ",".join(parts) + "}" + " " * pad).encode()
        data = bytes(range(256)) * (offset // 256 + 1)
        body = struct.pack("<Q", len(head)) + head + data[:offset]
        want, want_meta = _reference(body)
        decoded, metadata = T.tensors_from_safetensors(body)
        assert metadata == want_meta
        assert list(decoded) == list(want)
        for name, (_, shape, raw) in want.items():
            assert list(decoded[name].shape) == shape
            assert decoded[name].contiguous().view(torch.uint8).numpy().tobytes() == raw
        wires, metadata = st.loads(body)
        assert metadata == want_meta
        assert {n: bytes(w.data) for n, w in wires.items()} == {n: r for n, (_, _, r)
                                                               in want.items()}


def test_a_header_padded_with_what_json_does_not_take_is_refused_after_a_good_one() -> None:
    """Padding is left out of what a header is kept by, JSON's whitespace only: a header that
    ends in a vertical tab is refused every time, also after the same header padded with
    spaces was read."""
    head = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    good = struct.pack("<Q", len(head) + 3) + head + b"   " + bytes(4)
    assert list(T.tensors_from_safetensors(good)[0]) == ["t"]
    bad = struct.pack("<Q", len(head) + 3) + head + b"\x0b\x0b\x0b" + bytes(4)
    with pytest.raises(ValueError, match="JSON"):
        T.tensors_from_safetensors(bad)


def test_a_header_with_a_comma_too_many_after_its_metadata_is_refused_after_a_good_one(
        ) -> None:
    """The header less its metadata is what it is kept by: one whose metadata is followed by a
    comma and no entry (not JSON) does not find the header kept for the same metadata without
    the comma."""
    head_good = b'{"__metadata__":{"a":"1"}}'
    head_bad = b'{"__metadata__":{"a":"1"},}'
    body_good = struct.pack("<Q", len(head_good) + 1) + head_good + b" "
    body_bad = struct.pack("<Q", len(head_bad)) + head_bad
    assert T.tensors_from_safetensors(body_good) == ({}, {"a": "1"})
    with pytest.raises(ValueError, match="JSON"):
        T.tensors_from_safetensors(body_bad)
