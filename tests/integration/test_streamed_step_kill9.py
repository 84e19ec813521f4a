"""A streamed step answer under durability ``step`` (the server's default) against a real
``kill -9`` of a ``python -m app`` subprocess (``OPTSERVE_STEP_CHUNK`` of 65,536 elements, a
session of one 600,000-element parameter stepped in 10 chunks and a small one stepped whole,
Adam: its third step streams).

The client holds the answer's head of a keyed step and the server is killed before the client
read on; after the restart the session is torch's after two steps or after three, never between
(parameters and exported optimizer state bitwise), a step whose complete answer the client
held is there, the step's keyed retry is applied exactly once (the answer torch's, the version
3), and the next step is torch's: the log record holds the gradients, not the answer's values
written over the same request body."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from tests.integration.test_durability import Proc
from tests.integration.test_streamed_step import b64, seeded

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
CHUNK = 65_536
N = 600_000  # (at least 8 chunks: stepped in chunks; a record over 1 MB: written beside)
OPTIONS = {"lr": 0.01, "weight_decay": 0.01}


def gradients(k: int) -> dict[str, torch.Tensor]:
    return {"w": seeded(N, 500 + k), "b": seeded(3, 600 + k)}


def torch_after(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters and optimizer state of an in-process Adam after ``steps`` steps."""
    params = {"w": seeded(N, 7), "b": seeded(3, 8)}
    opt = torch.optim.Adam(list(params.values()), **OPTIONS)  # type: ignore[arg-type]
    for k in range(steps):
        for n, p in params.items():
            p.grad = gradients(k)[n]
        opt.step()
    state = {f"{i}.{name}": v for i, s in opt.state_dict()["state"].items()
             for name, v in s.items()}
    return params, state


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path / "data", env={"OPTSERVE_STEP_CHUNK": str(CHUNK)})
    try:
        yield p.start()
    finally:
        p.stop()


def step(http: httpx.Client, sid: str, k: int, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": BINARY, "Accept": BINARY}
    if key is not None:
        headers["Idempotency-Key"] = key
    return http.post(f"/v1/sessions/{sid}/step?metrics=history",
                     content=safetensors.torch.save(gradients(k)), headers=headers)


def assert_torch_after(http: httpx.Client, sid: str, steps: int) -> None:
    """The session is torch's after ``steps`` steps: version, parameters, optimizer state."""
    params, state = torch_after(steps)
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Optserve-Version"]) == steps
    got = safetensors.torch.load(r.content)
    assert got.keys() == params.keys()
    for n, p in params.items():
        assert torch.equal(got[n], p.detach()), n
    r = http.get(f"/v1/sessions/{sid}/state_dict?format=torch")
    assert r.status_code == 200, r.text
    exported = torch.load(io.BytesIO(r.content), weights_only=True)["state"]
    for name, want in state.items():
        i, field = name.split(".")
        assert torch.equal(torch.as_tensor(exported[int(i)][field]), want), name


def restored_steps(http: httpx.Client, sid: str) -> int:
    r = http.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


def started(http: httpx.Client) -> str:
    """A session whose first two steps are answered (the second streamed), torch's."""
    sid = f"s-{uuid.uuid4().hex[:10]}"
    first = {"w": seeded(N, 7), "b": seeded(3, 8)}
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": OPTIONS,
        "params": {n: b64(t) for n, t in first.items()}})
    assert r.status_code == 201, r.text
    for k in range(2):
        r = step(http, sid, k)
        assert r.status_code == 200, r.text
        want, _ = torch_after(k + 1)
        got = safetensors.torch.load(r.content)
        assert all(torch.equal(got[n], want[n].detach()) for n in want)
    return sid


def test_a_kill_while_the_answer_streams_leaves_the_step_whole(server: Proc) -> None:
    """Killed once the client holds the streamed answer's first bytes: after the restart the
    session is torch's after two steps or after three (three where the answer had come whole),
    the keyed retry makes it three, once, and the next step is torch's."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sid = started(http)
        key = uuid.uuid4().hex
        got = bytearray()
        whole = False
        headers = {"Content-Type": BINARY, "Accept": BINARY, "Idempotency-Key": key}
        with http.stream("POST", f"/v1/sessions/{sid}/step?metrics=history",
                         content=safetensors.torch.save(gradients(2)),
                         headers=headers) as r:
            assert r.status_code == 200
            pieces = r.iter_raw()
            got += next(pieces)
            server.kill9()
            try:
                for piece in pieces:
                    got += piece
                whole = len(got) == int(r.headers["content-length"])
            except httpx.RemoteProtocolError:
                pass
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        there = restored_steps(http, sid)
        assert there in ((3,) if whole else (2, 3))
        assert_torch_after(http, sid, there)
        r = step(http, sid, 2, key=key)
        assert r.status_code == 200, r.text
        assert r.headers["X-Optserve-Version"] == "3"
        assert_torch_after(http, sid, 3)
        assert step(http, sid, 3).status_code == 200
        assert_torch_after(http, sid, 4)


def test_a_kill_after_the_whole_answer_keeps_the_step(server: Proc) -> None:
    """Killed as soon as the streamed answer is complete: the restarted server holds the step
    (replayed from the record written from the answer's request body: torch's values)."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sid = started(http)
        r = step(http, sid, 2)
        assert r.status_code == 200, r.text
        server.kill9()
    want, _ = torch_after(3)
    got = safetensors.torch.load(r.content)
    assert all(torch.equal(got[n], want[n].detach()) for n in want)
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert_torch_after(http, sid, 3)
