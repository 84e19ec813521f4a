"""A repeated ``Idempotency-Key`` is answered with ``"replayed": true`` in the body and the
header ``Idempotent-Replayed: true`` (docs/protocol.md, "All or nothing, and exactly once"),
also where the answer describes the session (a create, a ``PATCH`` of the session or of a
group, a group added, a state import): those answers carried the header only, so a client
reading the body (as it does for a replayed step, push, zero_grad or scheduler step) could not
tell a retry that was answered from the key from one applied now."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration
W = {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}
CREATE = {"optimizer": "SGD", "options": {"lr": 0.1}, "params": W,
          "scheduler": {"name": "StepLR", "options": {"step_size": 1}}}


@pytest.fixture
def client(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server) as c:
        yield c


def _state(c: httpx.Client, sid: str) -> dict[str, Any]:
    out: dict[str, Any] = c.get(f"/v1/sessions/{sid}/state_dict").json()
    return out


#: each describing operation: (method, path after the session, body maker)
OPERATIONS: dict[str, tuple[str, str, Callable[[httpx.Client, str], dict[str, Any]]]] = {
    "configure": ("PATCH", "", lambda c, sid: {"max_staleness": 3}),
    "update_param_group": ("PATCH", "/param_groups/0", lambda c, sid: {"lr": 0.05}),
    "add_param_group": ("POST", "/param_groups", lambda c, sid: {
        "params": {"v": {"dtype": "float32", "shape": [1], "data": [3.0]}}, "lr": 0.2}),
    "import": ("PUT", "/state_dict", _state),
}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_replayed_description_says_so_in_its_body(client: httpx.Client, name: str) -> None:
    made = client.post("/v1/sessions", json=CREATE)
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    method, path, body_of = OPERATIONS[name]
    body, key = body_of(client, sid), {"Idempotency-Key": str(uuid.uuid4())}
    first = client.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=key)
    assert first.status_code in (200, 201), first.text
    assert "replayed" not in first.json() and "idempotent-replayed" not in first.headers
    revision = first.json()["revision"]
    again = client.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=key)
    assert again.status_code == first.status_code, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["replayed"] is True
    assert again.json()["revision"] == revision  # nothing applied again
    listed = client.get("/v1/sessions").json()["sessions"]
    assert all("replayed" not in s for s in listed)
    assert "replayed" not in client.get(f"/v1/sessions/{sid}").json()
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204


def test_a_replayed_create_says_so_in_its_body(client: httpx.Client) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = client.post("/v1/sessions", json=CREATE, headers=key)
    assert first.status_code == 201 and "replayed" not in first.json()
    again = client.post("/v1/sessions", json=CREATE, headers=key)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["replayed"] is True and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert client.delete(f"/v1/sessions/{first.json()['id']}").status_code == 204


def test_an_added_group_is_located_also_when_replayed(client: httpx.Client) -> None:
    """``POST .../param_groups`` answers 201 with ``Location``: the new group's URL, the one
    ``PATCH .../param_groups/{index}`` takes (it had none). A replay of its key answers the
    group it added, not the last one, after another group was added since; the URL changes
    that group (its ``lr`` in the description, nothing else)."""
    made = client.post("/v1/sessions", json=CREATE)
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"params": {"v": {"dtype": "float32", "shape": [1], "data": [3.0]}}, "lr": 0.2}
    first = client.post(f"/v1/sessions/{sid}/param_groups", json=body, headers=key)
    assert first.status_code == 201, first.text
    assert first.headers["location"] == f"/v1/sessions/{sid}/param_groups/1"
    empty = client.post(f"/v1/sessions/{sid}/param_groups", json={"params": {}, "lr": 0.3})
    assert empty.status_code == 201, empty.text
    assert empty.headers["location"] == f"/v1/sessions/{sid}/param_groups/2"
    again = client.post(f"/v1/sessions/{sid}/param_groups", json=body, headers=key)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    changed = client.patch(first.headers["location"], json={"lr": 0.25})
    assert changed.status_code == 200, changed.text
    assert [g["lr"] for g in changed.json()["param_groups"]] == [0.1, 0.25, 0.3]
    assert [g["params"] for g in changed.json()["param_groups"]] == [["w"], ["v"], []]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
