"""Deletes of one session sent at once without a key: one deletes it (204), every other
finds it gone (404 ``session_not_found``), plain and sharded sessions, against a real uvicorn
server; a keyed delete sent several times at once is answered 204 each time (its retries)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.torch_reference import json_tensor

pytestmark = pytest.mark.integration

AT_ONCE = 12


def make(url: str, shards: int) -> str:
    sid = f"del-{uuid.uuid4().hex[:12]}"
    r = httpx.post(f"{url}/v1/sessions", timeout=120, json={
        "id": sid, "optimizer": "SGD", "shards": shards,
        "params": {"a": json_tensor(torch.ones(4)), "b": json_tensor(torch.zeros(3))}})
    assert r.status_code == 201, r.text
    return sid


@pytest.mark.parametrize("shards", [1, 2])
def test_deletes_of_one_session_at_once_delete_it_once(live_server: str, shards: int) -> None:
    """A sharded session's second delete, waiting for the first, found its shards gone,
    took that for done and answered 204 as well: two deletes said they deleted it."""
    for _ in range(3):
        sid = make(live_server, shards)
        with ThreadPoolExecutor(AT_ONCE) as pool:
            answers = list(pool.map(
                lambda url: httpx.delete(url, timeout=120),
                [f"{live_server}/v1/sessions/{sid}"] * AT_ONCE))
        assert sorted(r.status_code for r in answers) == [204] + [404] * (AT_ONCE - 1), \
            [r.text for r in answers]
        assert all(r.json()["code"] == "session_not_found" for r in answers
                   if r.status_code == 404)
        assert httpx.get(f"{live_server}/v1/sessions/{sid}", timeout=30).status_code == 404

    sid = make(live_server, shards)
    key = f"delete-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(AT_ONCE) as pool:
        answers = list(pool.map(
            lambda _: httpx.delete(f"{live_server}/v1/sessions/{sid}",
                                   headers={"Idempotency-Key": key}, timeout=120),
            range(AT_ONCE)))
    assert [r.status_code for r in answers] == [204] * AT_ONCE, [r.text for r in answers]
    assert httpx.get(f"{live_server}/v1/sessions/{sid}", timeout=30).status_code == 404
