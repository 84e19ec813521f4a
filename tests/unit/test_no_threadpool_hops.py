"""FastAPI runs a plain ``def`` dependency (or endpoint) in its thread pool: a thread hop per
request for what is an attribute lookup. Every dependency and endpoint of the app is
``async def``, so a request reaches the engine without one (the step path's only thread hop is
the one to the device worker)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.api import bodies
from app.main import create_app
from tests.conftest import _test_settings


def callables(dependant: Dependant) -> Iterator[Any]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from callables(sub)


def test_every_dependency_and_endpoint_is_async() -> None:
    app = create_app(_test_settings())
    sync = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        for call in callables(route.dependant):
            target = call if inspect.isfunction(call) else type(call).__call__
            if not (inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(target)):
                sync.append(f"{route.path} {getattr(call, '__name__', call)}")
    assert sync == [], sync


def test_a_binary_body_goes_off_the_event_loop_by_its_header_not_its_size(
        app_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a safetensors body parses its header and makes views of the body: what it costs
    grows with the header, not with the tensors' bytes. A 4 MB gradient of one tensor is
    decoded on the event loop (a hop to a thread cost more than the decode: ``benchmarks.ab``
    at 1e5 and 1e6, CHANGELOG); a body whose header alone is past ``OFFLOAD_BYTES`` (thousands
    of tensors) still goes to a thread. Both steps equal torch's."""
    sizes: list[int] = []
    offload = bodies.offload

    async def spy(fn: Any, size: int) -> Any:
        sizes.append(size)
        return await offload(fn, size)
    monkeypatch.setattr(bodies, "offload", spy)
    binary = {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}
    for sid, shapes in (("one", {"w": (1_000_000,)}),
                        ("many", {f"p{i:05d}": (2,) for i in range(6000)})):
        p0 = {n: torch.randn(s) for n, s in shapes.items()}
        g = {n: torch.randn(s) for n, s in shapes.items()}
        r = app_client.post("/v1/sessions", content=st_save(p0, {
            "optimizer": "SGD", "options": '{"lr": 0.1, "momentum": 0.9}', "id": sid}),
            headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        body = st_save(g)
        sizes.clear()
        r = app_client.post(f"/v1/sessions/{sid}/step", content=body, headers=binary)
        assert r.status_code == 200, r.text
        header = 8 + int.from_bytes(body[:8], "little")
        assert sizes[0] == header  # what read_tensors offered to offload: the header
        assert (header > bodies.OFFLOAD_BYTES) == (sid == "many")
        local = {n: t.clone() for n, t in p0.items()}
        opt = torch.optim.SGD(list(local.values()), lr=0.1, momentum=0.9)
        for n, t in local.items():
            t.grad = g[n]
        opt.step()
        got = st_load(r.content)
        for n in local:
            assert torch.equal(got[n], local[n]), n
