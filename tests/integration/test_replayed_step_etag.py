"""A replayed step's ``ETag`` names the version of the parameters its answer carries. A step's
key sent again after the session moved on is answered with the original step's ``version``
and the session's *current* parameters (``params_version``: docs/protocol.md); its ``ETag``
is that ``params_version``, as every other answer's ``ETag`` names its parameters' version, so
a worker that goes on from the replayed answer with ``If-Match: <ETag>`` (the version its next
gradient is computed at) is counted as it is: not stale (it was counted stale by the versions
between the original step and now, which ``max_staleness`` refuses and ``staleness_lr``
divides the lr by). ``X-Optserve-Version`` stays the answer's
``version``. Over JSON and binary; values against
in-process torch."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

pytestmark = pytest.mark.integration
BINARY = "application/octet-stream"
START = torch.tensor([1.0, -2.0, 0.5])
GRADS = [torch.tensor([0.5, 0.25, -1.0]), torch.tensor([-0.75, 1.5, 0.125]),
         torch.tensor([0.3, -0.2, 0.1])]


def js(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.tolist()}


def local_after(steps: int) -> torch.Tensor:
    w = START.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.1)
    for g in (GRADS[0], GRADS[1], GRADS[2])[:steps]:
        w.grad = g.clone()
        opt.step()
    return w.detach()


def step(http: httpx.Client, sid: str, g: torch.Tensor, binary: bool, key: str | None = None,
         headers: dict[str, str] | None = None, query: str = "") -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["Idempotency-Key"] = key
    if binary:
        return http.post(f"/v1/sessions/{sid}/step{query}", content=st_save({"w": g}),
                         headers={**h, "content-type": BINARY, "accept": BINARY})
    return http.post(f"/v1/sessions/{sid}/step{query}", json={"grads": {"w": js(g)}},
                     headers=h)


def params_of(r: httpx.Response, binary: bool) -> torch.Tensor:
    if binary:
        return st_load(r.content)["w"]
    return torch.tensor(r.json()["params"]["w"]["data"], dtype=torch.float32)


@pytest.mark.parametrize("binary", [False, True])
def test_a_replayed_steps_etag_names_its_parameters_version(live_server: str,
                                                            binary: bool) -> None:
    sid = f"replay-etag-{int(binary)}"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        r = http.post("/v1/sessions", json={"id": sid, "optimizer": "Adam",
                                            "options": {"lr": 0.1}, "params": {"w": js(START)}})
        assert r.status_code == 201, r.text
        first = step(http, sid, GRADS[0], binary, key="k1")
        assert first.status_code == 200 and first.headers["etag"] == '"1"', first.text
        assert step(http, sid, GRADS[1], binary).status_code == 200  # the session moves on

        again = step(http, sid, GRADS[0], binary, key="k1")
        assert again.status_code == 200, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["x-optserve-version"] == "1"  # (the answer's version)
        assert again.headers["etag"] == '"2"'  # (its parameters' version)
        assert torch.equal(params_of(again, binary), local_after(2))
        if not binary:
            assert again.json()["version"] == 1 and again.json()["params_version"] == 2

        # without parameters in it, the answer's tag is its version
        none = step(http, sid, GRADS[0], binary, key="k1", query="?return=none")
        assert none.status_code == 422, none.text  # (another request for the key)
        assert step(http, sid, GRADS[2], binary, key="k3",
                    query="?return=none").headers["etag"] == '"3"'
        bare = step(http, sid, GRADS[2], binary, key="k3", query="?return=none")
        assert bare.headers["idempotent-replayed"] == "true" and bare.headers["etag"] == '"3"'

        # going on from a replayed answer with its tag (the session at 3 now)
        replay = step(http, sid, GRADS[0], binary, key="k1")
        assert replay.status_code == 200 and replay.headers["etag"] == '"3"', replay.text
        assert replay.headers["x-optserve-version"] == "1"
        assert torch.equal(params_of(replay, binary), local_after(3))
        # (If-Match on a step names the version its gradient was computed at: the push's
        # staleness is counted from it, and staleness_lr / max_staleness act on that)
        went_on = step(http, sid, GRADS[1], binary, headers={"If-Match": replay.headers["etag"]})
        assert went_on.status_code == 200, went_on.text
        assert went_on.headers["etag"] == '"4"'
        if not binary:
            assert went_on.json()["staleness"] == 0, went_on.text
