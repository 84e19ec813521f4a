"""A keyed create sent several times at once (a client's retry that overtakes its first try,
or one key shared by mistake) makes one session: one answer is the create's, every other is
its replay (201, ``Idempotent-Replayed: true``) naming the same session; plain and sharded
sessions, against a real uvicorn server."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from tests.torch_reference import json_tensor

pytestmark = pytest.mark.integration

AT_ONCE = 12


@pytest.mark.parametrize("shards", [1, 2])
def test_a_keyed_create_sent_many_times_at_once_makes_one_session(live_server: str,
                                                                  shards: int) -> None:
    """A sharded one made a session per request (12 sessions for one key): the key's index
    is written once the create is done, and the creates at once found none."""
    key = f"create-{uuid.uuid4().hex}"
    body: dict[str, Any] = {"optimizer": "SGD", "options": {"lr": 0.1}, "shards": shards,
                            "params": {"a": json_tensor(torch.ones(4)),
                                       "b": json_tensor(torch.zeros(3))}}
    with httpx.Client(base_url=live_server, timeout=120) as c:
        before = {s["id"] for s in c.get("/v1/sessions").json()["sessions"]}

    def create(_: int) -> httpx.Response:
        return httpx.post(f"{live_server}/v1/sessions", json=body,
                          headers={"Idempotency-Key": key}, timeout=120)
    with ThreadPoolExecutor(AT_ONCE) as pool:
        answers = list(pool.map(create, range(AT_ONCE)))
    assert [r.status_code for r in answers] == [201] * AT_ONCE, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sorted(r.headers.get("idempotent-replayed") == "true" for r in answers) == \
        [False] + [True] * (AT_ONCE - 1)
    with httpx.Client(base_url=live_server, timeout=120) as c:
        after = {s["id"] for s in c.get("/v1/sessions").json()["sessions"]}
        assert after - before == {answers[0].json()["id"]}
        assert c.delete(f"/v1/sessions/{answers[0].json()['id']}").status_code == 204
