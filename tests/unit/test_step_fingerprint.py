"""A step's idempotency fingerprint is of its content: the same tensors give the same digest
whatever their order, body format or memory (a decoded safetensors body sampled by its kept
plan, a JSON body's tensors, a same-host binding's slots), and changed bytes, names, dtypes or
shapes inside the sampled windows give another. A key logged with the fingerprint servers
before kept (``POST <path>?<query> <headers> <body digest>``) still answers its retry after a
restart: replayed, not a 422 and not applied twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from app.api import sessions as session_routes
from app.api.conditions import idempotency
from app.main import create_app
from app.wire.content_digest import WINDOW, tensors_digest
from app.wire.safetensors_body import read_safetensors, write_safetensors
from tests.conftest import _test_settings
from tests.torch_reference import json_tensor, tensor_from_json

BINARY = "application/octet-stream"


def grads(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300_000, generator=gen),  # past the windows: 1.2 MB
            "b": torch.randn(3, generator=gen).double(),
            "h": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
            "e": torch.empty(0)}


def test_the_same_tensors_in_any_order_and_memory_have_one_digest() -> None:
    g = grads()
    want = tensors_digest(g)
    for order in (list(g), sorted(g), list(reversed(list(g)))):
        decoded, _ = read_safetensors(bytearray(write_safetensors({n: g[n] for n in order},
                                                                  {"loss": "0.5"})))
        assert decoded.header is not None and decoded.runs
        assert tensors_digest(decoded) == want  # the plan made
        assert tensors_digest(decoded) == want  # the plan kept
    assert tensors_digest({n: t.clone() for n, t in g.items()}) == want


@pytest.mark.parametrize("change", ["head", "tail", "dtype", "shape", "name", "small"])
def test_another_step_has_another_digest(change: str) -> None:
    g = grads()
    other = {n: t.clone() for n, t in g.items()}
    if change == "head":  # the stream: b (24 B), e, h (8 B), then w
        other["w"][0] += 1
    elif change == "tail":
        other["w"][-1] += 1
    elif change == "dtype":
        other["b"] = other["b"].float()
    elif change == "shape":
        other["h"] = other["h"].reshape(4)
    elif change == "name":
        other["c"] = other.pop("b")
    else:
        other["h"][1, 1] += 1
    assert tensors_digest(other) != tensors_digest(g)
    assert 4 * 300_000 > 3 * WINDOW  # (w is sampled, not hashed whole)


def test_sparse_gradients_are_their_rows_and_values() -> None:
    values = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))

    def coo(rows: list[int], n: int) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, 2),
                                       check_invariants=False)
    # the dense shape is a declaration (a JSON body may give it, safetensors cannot)
    assert tensors_digest({"e": coo([1, 5, 1], 10)}) == tensors_digest({"e": coo([1, 5, 1], 6)})
    assert tensors_digest({"e": coo([1, 5, 1], 10)}) != tensors_digest({"e": coo([1, 5, 2], 10)})
    assert tensors_digest({"e": coo([1, 5, 1], 10)}) != tensors_digest({"e": values})


def _step(c: TestClient, sid: str, body: bytes, key: str) -> Any:
    return c.post(f"/v1/sessions/{sid}/step", content=body,
                  headers={"Content-Type": BINARY, "Idempotency-Key": key})


def test_a_key_logged_with_the_old_fingerprint_answers_its_retry_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first server keeps the fingerprint servers before this one kept (what its records
    and snapshot hold); the restarted one takes the step's content, and answers the retry of
    the logged key (also in a JSON body: a 422, the old fingerprint does not cover it) and
    refuses other gradients under it."""
    settings = _test_settings(data_dir=tmp_path / "data", durability="step")
    p0 = {"w": torch.randn(4, generator=torch.Generator().manual_seed(2))}
    g = {"w": torch.randn(4, generator=torch.Generator().manual_seed(3))}
    body = safetensors.torch.save(g)

    async def old(request: Any, buf: Any, *args: Any) -> Any:
        return await idempotency(request, buf)
    with monkeypatch.context() as patched:
        patched.setattr(session_routes, "_step_idempotency", old)
        with TestClient(create_app(settings)) as c:
            made = c.post("/v1/sessions", json={"id": "s", "optimizer": "SGD",
                                                "options": {"lr": 0.5},
                                                "params": {"w": json_tensor(p0["w"])}})
            assert made.status_code == 201, made.text
            first = _step(c, "s", body, "k-old")
            assert first.status_code == 200, first.text
    want = p0["w"] - 0.5 * g["w"]
    with TestClient(create_app(settings)) as c:
        again = _step(c, "s", body, "k-old")
        assert again.status_code == 200, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["X-Optserve-Version"] == "1"
        assert torch.equal(tensor_from_json(again.json()["params"]["w"]), want)
        other = _step(c, "s", safetensors.torch.save({"w": g["w"] * 2}), "k-old")
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
        assert c.get("/v1/sessions/s").json()["version"] == 1


def test_only_the_tensors_under_the_windows_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A map of many small tensors (a JSON body, a same-host step of some of the slots) is
    sampled as a body is: the bytes of the tensors the windows fall on are read, not every
    tensor's (16,000 tensors took 60-200 ms a step reading each one)."""
    from app.wire import content_digest

    gen = torch.Generator().manual_seed(4)
    many = {f"p{i:05d}": torch.randn(256, generator=gen) for i in range(4000)}  # 1 KiB each
    want = tensors_digest(many)
    read: list[int] = []
    real = content_digest._raw

    def counted(t: torch.Tensor) -> memoryview:
        read.append(t.numel())
        return real(t)
    monkeypatch.setattr(content_digest, "_raw", counted)
    assert tensors_digest(many) == want
    assert len(read) <= 3 * WINDOW // 1024 + 3, len(read)  # three windows of 256 tensors
    # the same bytes laid out as one safetensors body (its plan) give the same digest
    monkeypatch.setattr(content_digest, "_raw", real)
    decoded, _ = read_safetensors(bytearray(write_safetensors(many, {})))
    assert tensors_digest(decoded) == want
