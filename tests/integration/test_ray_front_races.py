"""Races between several Ray-engine fronts over one data directory and one cluster (two
uvicorn fronts in this process, hosts on the shared test cluster asking for no CPU): requests
for one session id fired at once through different fronts.

Every value is compared with in-process torch computed here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.engine.directory import Directory
from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.torch_reference import json_tensor, tensor_from_json

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]
LR = 0.01


def tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen),
            "e": torch.randn(5, generator=gen)}


def adam_after(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """``params`` after one in-process torch Adam step with ``grads``."""
    local = {n: t.clone() for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=LR)
    for n, p in local.items():
        p.grad = grads[n].clone()
    opt.step()
    return local


def at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Each call in a thread of its own, released together."""
    barrier = threading.Barrier(len(calls))
    out: list[httpx.Response | BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    answers = [o for o in out if isinstance(o, httpx.Response)]
    assert len(answers) == len(calls), out
    return answers


def pulled(url: str, sid: str) -> dict[str, torch.Tensor]:
    r = httpx.get(f"{url}/v1/sessions/{sid}/params", timeout=120)
    assert r.status_code == 200, r.text
    return {n: tensor_from_json(t) for n, t in r.json()["params"].items()}


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for n in want:
        assert torch.equal(got[n], want[n]), f"{what}: {n}"


@pytest.fixture
def two_fronts(ray_cluster: Any, tmp_path: Path) -> Iterator[list[str]]:
    """Two fronts in this process on one data directory (hosts asking for no CPU)."""
    data = tmp_path / "data"
    fronts = [LiveServer(ray_settings(ray_cluster, data_dir=data,
                                      ray_resources='{"num_cpus": 0}')) for _ in range(2)]
    try:
        yield [f.start() for f in fronts]
    finally:
        for f in fronts:
            f.stop()
        kill_hosts(data)


@pytest.mark.parametrize("shards", [1, 2])
def test_one_keyed_create_sent_through_two_fronts_at_once_makes_one_session(
        two_fronts: list[str], monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """The same keyed create (one ``Idempotency-Key``, one id) sent through two fronts at
    once: the try that claimed the id's entry indexes the key right after the claim, and a try
    reaching the directory between the two found the entry and answered 409
    ``session_exists`` for its own create (seen through three ``python -m app`` fronts for a
    sharded session; the index's write is held 0.5 s here to make it every time). Now it
    waits for the index and is answered with the session made (201, replayed): both tries
    answer the same session, which every front serves and which steps as torch does; the
    same key with another body is a 422 ``idempotency_key_reused``, not a 409."""
    claim_created = Directory.claim_created

    def slow_index(self: Directory, *args: Any, **kwargs: Any) -> str | None:
        time.sleep(0.5)
        return claim_created(self, *args, **kwargs)
    monkeypatch.setattr(Directory, "claim_created", slow_index)
    a, b = two_fronts
    for rep in range(3):
        sid, p0 = f"raced-{shards}-{rep}", tensors(rep)
        body: dict[str, Any] = {"id": sid, "optimizer": "Adam", "options": {"lr": LR},
                                "params": {n: json_tensor(t) for n, t in p0.items()}}
        if shards > 1:
            body["shards"] = shards
        key = {"Idempotency-Key": f"raced-{shards}-{rep}-{time.time_ns()}"}
        answers = at_once([partial(httpx.post, f"{u}/v1/sessions", json=body, headers=key,
                                   timeout=300) for u in (a, b)])
        assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
        assert sorted(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == \
            [False, True], [dict(r.headers) for r in answers]
        assert {r.json()["id"] for r in answers} == {sid}
        for url in (a, b):
            listed = httpx.get(f"{url}/v1/sessions", timeout=120).json()["sessions"]
            assert [s["id"] for s in listed].count(sid) == 1
            assert_equal(pulled(url, sid), p0, "created")
        other = {**body, "options": {"lr": LR * 2}}
        for url in (a, b):
            r = httpx.post(f"{url}/v1/sessions", json=other, headers=key, timeout=300)
            assert r.status_code == 422, r.text
            assert r.json()["code"] == "idempotency_key_reused"
        g = tensors(100 + rep)
        r = httpx.post(f"{b}/v1/sessions/{sid}/step", timeout=300,
                       json={"grads": {n: json_tensor(t) for n, t in g.items()}})
        assert r.status_code == 200, r.text
        want = adam_after(p0, g)
        assert_equal({n: tensor_from_json(t) for n, t in r.json()["params"].items()}, want,
                     "stepped")
        assert_equal(pulled(a, sid), want, "pulled through the other front")
