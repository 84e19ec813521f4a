"""A body of many tensors is decoded, and its header written, in pieces: no single
``split_with_sizes`` cuts more than ``SPLIT_PIECE`` views and no single ``orjson.dumps`` writes
more than ``DUMPS_PIECE`` members. Each such call holds the interpreter lock throughout, and the
event loop waited for it (100,000 tensors: 30-70 ms for one split, ~20 ms for one dumps) while
a thread decoded a step's body or wrote its answer's header. The bytes and tensors are the same
as the whole calls made; a key written twice is still refused, whichever pieces its two
members fall in. The answer's kept header entries go out as they are, not joined to their
frame (a 6.7 MB copy, four times over, on the event loop)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import torch
from safetensors.torch import save

from app.errors import BadRequest
from app.wire import safetensors_header, tensor_maps
from app.wire.safetensors_body import (
    pack,
    packed_header,
    packed_header_parts,
    read_safetensors,
)
from app.wire.safetensors_body import (
    safetensors_header as whole_header,
)

COUNT = 20_000  # (more than two pieces of 8,192)


@pytest.fixture(autouse=True)
def _fresh_headers() -> Iterator[None]:
    safetensors_header.forget_headers()
    yield
    safetensors_header.forget_headers()


@pytest.fixture
def dumped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The members of each object ``orjson.dumps`` writes from here on (0: not an object)."""
    sizes: list[int] = []
    dumps = orjson.dumps

    def counted(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        sizes.append(len(obj) if isinstance(obj, dict) else 0)
        return dumps(obj, *args, **kwargs)
    monkeypatch.setattr(orjson, "dumps", counted)
    return sizes


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The views each ``split_with_sizes`` cuts from here on."""
    sizes: list[int] = []
    split_with_sizes = torch.Tensor.split_with_sizes

    def counted(self: torch.Tensor, sizes_: list[int], *args: Any) -> Any:
        sizes.append(len(sizes_))
        return split_with_sizes(self, sizes_, *args)
    monkeypatch.setattr(torch.Tensor, "split_with_sizes", counted)
    return sizes


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    out = {f"t{i:05d}": torch.randn(1 + i % 3, generator=gen) for i in range(COUNT)}
    out["m"] = torch.randn(2, 3, generator=gen)  # (a 2-D one among them)
    return out


def test_a_body_of_many_tensors_is_cut_in_pieces(dumped: list[int], split: list[int]) -> None:
    sent = _tensors()
    body = bytearray(save(sent))
    got, _ = read_safetensors(body)
    assert set(got) == set(sent)
    assert all(torch.equal(got[n], t) for n, t in sent.items())
    assert got["t00007"].data_ptr() != sent["t00007"].data_ptr()  # (views of the body)
    assert len(split) >= 3 and max(split) <= tensor_maps.SPLIT_PIECE
    objects = [n for n in dumped if n]
    assert objects and max(objects) <= safetensors_header.DUMPS_PIECE
    # the kept parse: the next body with the same header reads its own values, in pieces
    split.clear()
    again = {n: t + 1 for n, t in sent.items()}
    got, _ = read_safetensors(bytearray(save(again)))
    assert all(torch.equal(got[n], t) for n, t in again.items())
    assert len(split) >= 3 and max(split) <= tensor_maps.SPLIT_PIECE


def test_header_entries_are_written_in_pieces(dumped: list[int]) -> None:
    layout = [(f"p{i}", torch.float32 if i % 2 else torch.float64, (1, i % 4))
              for i in range(COUNT)]
    reference: dict[str, Any] = {}
    pos = 0
    for name, dtype, shape in layout:
        end = pos + shape[0] * shape[1] * dtype.itemsize
        reference[name] = {"dtype": "F32" if dtype == torch.float32 else "F64",
                           "shape": list(shape), "data_offsets": [pos, end]}
        pos = end
    want = dumped_whole = orjson.loads(b"{" + safetensors_header.header_entries(layout) + b"}")
    assert dumped_whole == reference and list(want) == list(reference)
    assert max(dumped) <= safetensors_header.DUMPS_PIECE and len(dumped) >= 3
    assert safetensors_header.dumps_object(reference) == orjson.dumps(reference)


def test_a_key_written_twice_is_refused_across_pieces() -> None:
    sent = {f"t{i:05d}": torch.tensor([float(i)]) for i in range(COUNT)}
    text = save(sent)
    n = int.from_bytes(text[:8], "little")
    header = text[8:8 + n]
    # the last entry's name written as the first's: its members fall in different pieces
    last = f'"t{COUNT - 1:05d}"'.encode()
    assert header.count(last) == 1
    forged = header.replace(last, b'"t00000"')
    with pytest.raises(BadRequest) as refused:
        read_safetensors(bytearray(text[:8] + forged + text[8 + n:]))
    assert refused.value.code == "duplicate_key" and refused.value.field == "t00000"


def test_kept_header_entries_are_sent_as_they_are() -> None:
    sent = _tensors()
    body = bytearray(save(sent))
    got, _ = read_safetensors(body)
    from app.api.bodies import answer_in_place

    packed = answer_in_place(got, body)
    assert packed is not None and packed.entries is not None
    meta = {"version": "3", "lr": "[0.001]"}
    parts = packed_header_parts(packed, meta)
    assert parts[1] is packed.entries  # (not copied into its frame)
    assert b"".join(parts) == packed_header(packed, meta) == whole_header(packed, meta)
    answer = b"".join([*parts, bytes(packed.buffer)])
    back, metadata = read_safetensors(answer)
    assert metadata == meta and all(torch.equal(back[n], t) for n, t in sent.items())
    for meta_ in ({}, {"x": "y" * 13}):  # (no metadata; padding of every length)
        fresh = pack(sent)
        assert b"".join(packed_header_parts(fresh, meta_)) == whole_header(fresh, meta_)
