"""A ``torch.save`` import reads its body as it is (:class:`app.wire.buffer_file.BufferFile`):
it made a ``bytes`` copy of it first (``bytes(buf)`` in ``torch_file``, before any check), so a
refused body held twice its size in memory. Python's allocations while a body is checked and
loaded are measured with tracemalloc (the copy was one allocation of the body's size); the
state loaded is torch's own ``torch.load`` of the same bytes."""

from __future__ import annotations

import io
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import torch

from app.api.requests import state_from_torch, torch_file
from app.errors import Invalid
from app.wire.buffer_file import BufferFile

N = 2_000_000  # (an 8 MB file)


def _body() -> bytearray:
    f = io.BytesIO()
    torch.save({"state": {0: {"momentum_buffer": torch.linspace(-1.0, 1.0, N)}},
                "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}, f)
    return bytearray(f.getvalue())


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """What ``fn`` returns (or the Invalid it raises), and the most memory Python allocated
    meanwhile."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Invalid as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_refused_torch_file_is_not_copied() -> None:
    body = _body()
    refused, peak = _peak(lambda: torch_file(body, N, N))  # (expands to more than N bytes)
    assert isinstance(refused, Invalid) and refused.code == "torch_file_too_large", refused
    assert peak < len(body) // 8, (peak, len(body))  # (was: the body's size, copied)


def test_an_imported_torch_file_is_read_from_the_body() -> None:
    body = _body()
    expected = torch.load(io.BytesIO(bytes(body)), map_location="cpu", weights_only=True)

    def load() -> Any:
        data, expands = torch_file(body, 16 * N, N)
        assert expands >= 4 * N
        return state_from_torch(data, 16 * N, N)
    state, peak = _peak(load)
    assert peak < len(body) // 8, (peak, len(body))  # (was: the body's size, copied)
    got = state["state"][0]["momentum_buffer"]
    assert torch.equal(got, expected["state"][0]["momentum_buffer"])
    assert state["param_groups"] == expected["param_groups"]
    body[:] = b""  # (nothing holds a view of the body: it can be freed, resized)


def test_a_buffer_file_reads_as_bytes_io() -> None:
    data = bytes(random.Random(7).randrange(256) for _ in range(1000))
    ours, theirs = BufferFile(bytearray(data)), io.BytesIO(data)
    rng = random.Random(11)
    for _ in range(500):
        what = rng.randrange(5)
        if what == 0:
            n = rng.choice([-1, 0, 1, 7, 100, 2000])
            assert ours.read(n) == theirs.read(n)
        elif what == 1:
            offset, whence = rng.randrange(-1100, 1100), rng.randrange(3)
            try:
                want = theirs.seek(offset, whence)
            except ValueError:
                with pytest.raises(ValueError):
                    ours.seek(offset, whence)
                continue
            assert ours.seek(offset, whence) == want
        elif what == 2:
            a = bytearray(rng.randrange(64))
            b = bytearray(len(a))
            assert ours.readinto(a) == theirs.readinto(b) and a == b
        elif what == 3:
            assert ours.tell() == theirs.tell()
        else:
            assert ours.read() == theirs.read()
    ours.close()
    with pytest.raises(ValueError):
        ours.read(1)
