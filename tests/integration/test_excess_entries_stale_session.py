"""The refusal of a step's body from its header (one naming more tensors than its session
holds) is the session's as it is when the header is read, not as it was when the request
began: the body is read in between (seconds, for a large one), and meanwhile the session may
be deleted, or deleted and made again with other parameters. It refused such a body with the
old session's ``unknown_parameter`` ("this session has 'p0', 'p1', 'p2'") where the step then
answered 404 (no session), or stepped the new session (which holds every name sent)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import save

from app.engine.front import Front
from tests.torch_reference import json_tensor, tensors_from_json

pytestmark = pytest.mark.integration
NAMES = [f"p{i}" for i in range(10)]
START = {n: torch.linspace(-1.0, 1.0, 8000) * (i + 1) for i, n in enumerate(NAMES)}
GRADS = {n: torch.linspace(0.5, -0.25, 8000) * (i - 4) for i, n in enumerate(NAMES)}


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Set once the server has asked for a step's refusal from its header (before it reads
    the body): the live server runs in this process."""
    event = threading.Event()
    ask = Front.entries_refusal

    async def asking(self: Front, *args: Any, **kwargs: Any) -> Any:
        out = await ask(self, *args, **kwargs)
        event.set()
        return out
    monkeypatch.setattr(Front, "entries_refusal", asking)
    yield event


def _create(client: httpx.Client, sid: str, names: list[str]) -> None:
    r = client.post("/v1/sessions", json={
        "id": sid, "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.5},
        "params": {n: json_tensor(START[n]) for n in names}})
    assert r.status_code == 201, r.text


def _step_around(url: str, sid: str, body: bytes, asked: threading.Event,
                 meanwhile: Any) -> tuple[int, dict[str, Any]]:
    """A step sent in two parts: its head and its first bytes, then (once the server has
    asked for the refusal from the header) ``meanwhile()``, then the rest."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as s:
        s.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\n"
                  "Content-Type: application/octet-stream\r\nAccept: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                  + body[:1000])
        assert asked.wait(60)
        meanwhile()
        s.sendall(body[1000:])
        answer = b""
        while chunk := s.recv(1 << 20):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def test_a_session_made_again_meanwhile_steps(live_server: str,
                                              asked: threading.Event) -> None:
    body = save(GRADS)
    with httpx.Client(base_url=live_server, timeout=60) as client:
        _create(client, "again", NAMES[:3])

        def again() -> None:
            assert client.delete("/v1/sessions/again").status_code == 204
            _create(client, "again", NAMES)
        status, answer = _step_around(live_server, "again", body, asked, again)
    assert status == 200, answer
    local = [torch.nn.Parameter(START[n].clone()) for n in NAMES]
    opt = torch.optim.SGD(local, lr=0.1, momentum=0.5)
    for p, n in zip(local, NAMES, strict=True):
        p.grad = GRADS[n].clone()
    opt.step()
    got = tensors_from_json(answer["params"])
    for p, n in zip(local, NAMES, strict=True):
        assert torch.equal(got[n], p.detach()), n


def test_a_session_deleted_meanwhile_is_not_found(live_server: str,
                                                  asked: threading.Event) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        _create(client, "gone", NAMES[:3])

        def delete() -> None:
            assert client.delete("/v1/sessions/gone").status_code == 204
        status, answer = _step_around(live_server, "gone", save(GRADS), asked, delete)
    assert (status, answer["code"]) == (404, "session_not_found"), answer
