"""A step whose safetensors header lists many tensors works out its in-place answer off the
event loop.

The step's answer written over its spent gradients (``answer_in_place``) needs the header's
entries in file order, worked out once per layout: for 300,000 tensors that took 1.2 s on the
event loop, every other request (a ``/healthz`` beside it) waiting. A header past
``OFFLOAD_BYTES`` now has it worked out on a thread, as its decoding is; a small one stays
inline (a thread hop costs a small step more than the work)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from app.api import sessions
from app.api.bodies import OFFLOAD_BYTES

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"


def seeded(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("count,on_loop", [(10, True), (5_000, False)])
def test_the_answer_in_place_of_a_big_header_is_worked_out_off_the_loop(
        live_server: str, monkeypatch: pytest.MonkeyPatch, count: int, on_loop: bool) -> None:
    where: list[bool] = []
    answer = sessions.answer_in_place

    def spy(*args: Any) -> Any:
        where.append(asyncio._get_running_loop() is not None)
        return answer(*args)
    monkeypatch.setattr(sessions, "answer_in_place", spy)
    params = {f"p{i:05d}": seeded(64, i) for i in range(count)}
    body = safetensors.torch.save(params, metadata={"optimizer": "Adam", "id": f"h{count}",
                                                    "options": '{"lr": 0.01}'})
    r = httpx.post(f"{live_server}/v1/sessions", content=body,
                   headers={"Content-Type": BINARY}, timeout=120)
    assert r.status_code == 201, r.text
    local = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.01)
    for k in range(2):
        grads = {n: seeded(64, 10_000 * (k + 1) + i) for i, n in enumerate(params)}
        sent = safetensors.torch.save(grads)
        assert (int.from_bytes(sent[:8], "little") > OFFLOAD_BYTES) is not on_loop
        r = httpx.post(f"{live_server}/v1/sessions/h{count}/step", content=sent,
                       headers={"Content-Type": BINARY, "Accept": BINARY}, timeout=120)
        assert r.status_code == 200, r.text
        for n, p in local.items():
            p.grad = grads[n]
        opt.step()
        got = safetensors.torch.load(r.content)
        assert got.keys() == local.keys()
        for n, p in local.items():
            assert torch.equal(got[n], p.detach()), n
    assert where == [on_loop, on_loop]
    assert httpx.delete(f"{live_server}/v1/sessions/h{count}", timeout=60).status_code == 204
