"""Work kept per safetensors header (fingerprint sampling plans, step records' gradient layouts)
is kept for many clients at once, bounded by memory: ten clients of different models each get
their plan and layout built once, not on every step; the kept values never hold more than the
budget (the latest one excepted), nor more entries than the bound."""

from __future__ import annotations

import pytest
import torch

from app.engine import persist
from app.engine.ops import Step
from app.wire import content_digest
from app.wire.kept_by_header import KeptByHeader, forget_all
from app.wire.safetensors_body import read_safetensors, write_safetensors
from app.wire.tensor_maps import BodyTensors

CLIENTS = 10
TENSORS = 64


def model(client: int, step: int) -> dict[str, torch.Tensor]:
    """Client ``client``'s gradients at ``step``: its own names (its own header), new values."""
    gen = torch.Generator().manual_seed(1000 * client + step)
    return {f"m{client}.layer{i}.weight": torch.randn(3 + (i % 4), generator=gen)
            for i in range(TENSORS)}


def body(client: int, step: int) -> BodyTensors:
    """A step's body as the server decodes it (a fresh one every step, the same header)."""
    decoded, _ = read_safetensors(bytearray(write_safetensors(model(client, step), {})))
    assert isinstance(decoded, BodyTensors)
    assert decoded.header is not None and len(decoded.runs) == 1
    return decoded


def test_ten_clients_of_different_models_reuse_their_plans_and_layouts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    forget_all()
    plans, layouts = [0], [0]
    plan_of = content_digest._plan_of
    header_entries = persist.header_entries  # type: ignore[attr-defined]

    def counted_plan(tensors: BodyTensors) -> object:
        plans[0] += 1
        return plan_of(tensors)

    def counted_entries(*args: object, **kwargs: object) -> bytes:
        layouts[0] += 1
        return header_entries(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(content_digest, "_plan_of", counted_plan)
    monkeypatch.setattr(persist, "header_entries", counted_entries)

    for step in range(4):  # every client steps in turn, four times
        for client in range(CLIENTS):
            grads = body(client, step)
            assert content_digest.cheap(grads) == (step > 0), (client, step)
            # the kept plan's digest is the digest of the tensors themselves
            assert content_digest.tensors_digest(grads) == content_digest.tensors_digest(
                dict(model(client, step)))
            record = persist.Record(Step(grads), seq=step + 2, version=step + 1, keys=[])
            again = persist.decode_record(persist.encode_record(record)).op
            assert isinstance(again, Step)
            for name, t in model(client, step).items():
                assert torch.equal(again.grads[name], t), name
        assert plans[0] == CLIENTS, step  # built at the first step only
        assert layouts[0] == CLIENTS, step
    forget_all()


def test_what_is_kept_is_bounded_by_memory_and_entries() -> None:
    kept: KeptByHeader[bytes] = KeptByHeader(max_bytes=10_000, weigh=len, max_entries=6)
    cost = {h: len(h) + 1000 + 200 for h in (b"h%d" % i for i in range(20))}
    for i in range(5):
        kept.put(b"h%d" % i, bytes(1000))
    assert len(kept) == 5 and kept.charged == sum(cost[b"h%d" % i] for i in range(5))
    assert kept.get(b"h0") is not None  # used: the oldest is now h1
    for i in range(5, 20):
        kept.put(b"h%d" % i, bytes(1000))
        assert kept.charged <= 10_000 and len(kept) <= 6
    assert len(kept) == 6 and b"h19" in kept and b"h13" not in kept
    before = kept.charged
    kept.put(b"h19", bytes(1000))  # put again: charged once
    assert kept.charged == before and len(kept) == 6
    kept.put(b"huge", bytes(50_000))  # one very large model: kept alone, the others dropped
    assert len(kept) == 1 and kept.get(b"huge") is not None
    assert kept.charged == len(b"huge") + 50_000 + 200
    kept.put(b"small", bytes(10))
    assert b"huge" not in kept and len(kept) == 1
    kept.clear()
    assert len(kept) == 0 and kept.charged == 0


def test_real_plans_are_charged_what_they_hold() -> None:
    """A plan's charge grows with its header and names: with a budget of three plans of this
    size, the fourth client's drops the first."""
    forget_all()
    grads = [body(client, 0) for client in range(4)]
    plans = [content_digest._plan_of(g) for g in grads]
    assert all(p is not None for p in plans)
    one = len(grads[0].header or b"") + plans[0].nbytes() + 200  # type: ignore[union-attr]
    assert one > TENSORS * len("m0.layer0.weight")
    kept: KeptByHeader[object] = KeptByHeader(3 * one + one // 2, lambda p: p.nbytes())  # type: ignore[attr-defined]
    for g, p in zip(grads, plans, strict=True):
        assert g.header is not None
        kept.put(g.header, p)
    assert len(kept) == 3 and bytes(grads[0].header or b"") not in kept
