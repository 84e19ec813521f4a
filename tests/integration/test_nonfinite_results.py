"""Steps whose own arithmetic makes a value non-finite, under ``nonfinite: reject``.

A session created with ``"nonfinite": "reject"`` refuses non-finite gradients, parameters and
imported state. Its own step could still put them there from finite gradients: Adagrad with
``weight_decay: 2**63`` overflows its ``sum`` to inf, a huge lr the parameters. Such a step was
taken, and the session then exported a state its own import refused (422 ``nonfinite_state``).
Now that step is refused whole: 422 ``nonfinite_state`` naming the state value
(``state_dict.state.<id>.<key>``) or ``nonfinite_parameter`` naming the parameter
(``params.<name>``), the session exactly as it was (live and after a restart, whatever its
durability), and the client gets on with a PATCH of the option. Records logged by older servers
(the step taken) still replay.

Expected values come from in-process torch run here.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer, _test_settings

from app.engine import CreateSpec, GroupSpec, embedded_engine
from app.engine.ops import Step
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    from_wire,
    json_tensor,
    tensor_from_json,
)

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"

#: (optimizer, options, parameter, gradients of the step taken, of the step refused, the code,
#: the field, the option a PATCH sets to get on: then the refused gradients step, but for Adam,
#: whose way on is smaller gradients, the first ones again)
CASES: dict[str, tuple[str, dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, str, str,
                       dict[str, Any]]] = {
    # 1.5 * 2**63 squared is 1.9e38: one step's sum is finite, two steps' is not
    "adagrad-weight-decay": ("Adagrad", {"lr": 0.01, "weight_decay": 2**63},
                             torch.tensor([1.0, 1.5]), torch.tensor([0.5, -0.25]),
                             torch.tensor([0.25, 0.5]), "nonfinite_state",
                             "state_dict.state.0.sum", {"weight_decay": 0.0}),
    # lr 1e38: 1 - 1e38 * 1 is finite, -1e38 - 1e38 * 3 is -inf in float32
    "sgd-huge-lr": ("SGD", {"lr": 1e38}, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]),
                    torch.tensor([3.0, 0.0]), "nonfinite_parameter", "params.p", {"lr": 0.1}),
    # Adam's exp_avg_sq: (1e30)^2 overflows; the parameters stay finite
    "adam-square": ("Adam", {"lr": 0.01}, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1e18]),
                    torch.tensor([1.0, 1e30]), "nonfinite_state",
                    "state_dict.state.0.exp_avg_sq", {"amsgrad": False}),
}


class Twin:
    def __init__(self, optimizer: str, options: dict[str, Any], p: torch.Tensor) -> None:
        self.p = p.clone()
        self.opt: torch.optim.Optimizer = getattr(torch.optim, optimizer)([self.p], **options)

    def step(self, g: torch.Tensor) -> None:
        self.p.grad = g.clone()
        self.opt.step()
        self.p.grad = None


@pytest.fixture
def data() -> Path:
    return Path(tempfile.mkdtemp(prefix="optserve-nfr-"))


@pytest.fixture
def server(data: Path) -> Iterator[httpx.Client]:
    live = LiveServer(_test_settings(data_dir=data))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c
    finally:
        live.stop()


def step(c: httpx.Client, sid: str, g: torch.Tensor, **kw: Any) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"},
                  json={"grads": {"p": json_tensor(g)}}, **kw)


def whole(c: httpx.Client, sid: str) -> dict[str, Any]:
    return {"describe": c.get(f"/v1/sessions/{sid}").json(),
            "params": c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json(),
            "state": c.get(f"/v1/sessions/{sid}/state_dict",
                           params={"encoding": "b64"}).json(),
            "history": c.get(f"/v1/sessions/{sid}/history").json()}


def same_as_twin(c: httpx.Client, sid: str, twin: Twin) -> None:
    got = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()["params"]
    assert_tensors_equal({"p": tensor_from_json(got["p"])}, {"p": twin.p.detach()}, sid)
    exported = from_wire(c.get(f"/v1/sessions/{sid}/state_dict").json())
    assert_trees_equal({int(k): v for k, v in exported["state"].items()},
                       twin.opt.state_dict()["state"], sid)


def create(c: httpx.Client, sid: str, optimizer: str, options: dict[str, Any],
           p: torch.Tensor, **extra: Any) -> None:
    r = c.post("/v1/sessions", json={"id": sid, "optimizer": optimizer, "options": options,
                                     "params": {"p": json_tensor(p)}, "nonfinite": "reject",
                                     **extra})
    assert r.status_code == 201, r.text


def exports_import_back(c: httpx.Client, sid: str, optimizer: str, options: dict[str, Any],
                        p: torch.Tensor, twin: Twin, g: torch.Tensor, way_out: dict[str, Any]
                        ) -> None:
    """``sid``'s export imports into a new session made with the same settings, which then
    steps as torch does (after the PATCH that gets it past the overflow)."""
    new = f"{sid}-copy"
    create(c, new, optimizer, options, p)
    got = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()["params"]
    assert c.put(f"/v1/sessions/{new}/params", json={"params": got}).status_code == 200
    r = c.put(f"/v1/sessions/{new}/state_dict",
              json=c.get(f"/v1/sessions/{sid}/state_dict").json())
    assert r.status_code == 200, r.text
    copy = Twin(optimizer, options, twin.p.detach())
    copy.opt.load_state_dict(deepcopy(twin.opt.state_dict()))  # (torch shares "step")
    same_as_twin(c, new, copy)
    r = c.patch(f"/v1/sessions/{new}/param_groups/0", json=way_out)
    assert r.status_code == 200, r.text
    copy.opt.param_groups[0].update(way_out)
    assert step(c, new, g).status_code == 200
    copy.step(g)
    same_as_twin(c, new, copy)


@pytest.mark.parametrize("durability", ["step", "interval", "memory"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_that_makes_a_value_nonfinite_is_refused_whole(
        data: Path, case: str, durability: str) -> None:
    optimizer, options, p0, g1, g2, code, field, way_out = CASES[case]
    sid = f"nf-{case}-{durability}"
    g_on = g1 if optimizer == "Adam" else g2
    twin = Twin(optimizer, options, p0)
    twin.step(g1)
    probe = Twin(optimizer, options, p0)  # torch's own next step goes non-finite
    probe.step(g1)
    probe.step(g2)
    values = [probe.p, *[v for v in probe.opt.state[probe.p].values()
                         if isinstance(v, torch.Tensor)]]
    assert not all(bool(torch.isfinite(v).all()) for v in values)
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            create(c, sid, optimizer, options, p0, durability=durability)
            assert step(c, sid, g1).status_code == 200
            same_as_twin(c, sid, twin)
            before = whole(c, sid)
            for key in (None, "k-1", "k-1"):  # refused keyed steps are not remembered
                r = step(c, sid, g2, headers={"Idempotency-Key": key} if key else {})
                assert r.status_code == 422, r.text
                assert r.headers["content-type"] == PROBLEM
                problem = r.json()
                assert problem["code"] == code, problem
                assert problem["field"] == field, problem
                assert "nothing changed" in problem["detail"]
                assert whole(c, sid) == before
            # its export imports back into a session made alike
            exports_import_back(c, sid, optimizer, options, p0, twin, g_on, way_out)
            if durability == "memory":
                r = c.patch(f"/v1/sessions/{sid}/param_groups/0", json=way_out)
                assert r.status_code == 200, r.text
                for k, v in way_out.items():
                    twin.opt.param_groups[0][k] = v
                assert step(c, sid, g_on).status_code == 200
                twin.step(g_on)
                same_as_twin(c, sid, twin)
                return
    finally:
        live.stop()
    # after a restart: as it was before the refused step, and it steps on as torch does
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            after = whole(c, sid)
            assert after["params"] == before["params"]
            assert after["state"] == before["state"]
            assert after["describe"]["version"] == before["describe"]["version"]
            assert after["describe"]["step"] == before["describe"]["step"]
            same_as_twin(c, sid, twin)
            r = step(c, sid, g2)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
            r = c.patch(f"/v1/sessions/{sid}/param_groups/0", json=way_out)
            assert r.status_code == 200, r.text
            for k, v in way_out.items():
                twin.opt.param_groups[0][k] = v
            assert step(c, sid, g_on).status_code == 200
            twin.step(g_on)
            same_as_twin(c, sid, twin)
    finally:
        live.stop()


def test_a_sync_rounds_step_is_refused_alike(server: httpx.Client) -> None:
    c = server
    optimizer, options, p0, g1, g2, code, field, _ = CASES["adagrad-weight-decay"]
    create(c, "nf-sync", optimizer, options, p0, sync={"workers": 1})
    twin = Twin(optimizer, options, p0)
    w = {"X-Optserve-Worker": "w0"}
    assert step(c, "nf-sync", g1, headers=w).status_code == 200
    twin.step(g1)
    before = whole(c, "nf-sync")
    r = step(c, "nf-sync", g2, headers=w)
    assert r.status_code == 422 and r.json()["code"] == code, r.text
    assert r.json()["field"] == field
    assert whole(c, "nf-sync") == before
    same_as_twin(c, "nf-sync", twin)


def test_steps_older_servers_took_still_replay(data: Path) -> None:
    """A step record logged before this check (no ``finite_result``) that left an infinite
    state replays as it ran: the session comes back with it."""
    optimizer, options, p0, g1, g2, _, _, _ = CASES["adagrad-weight-decay"]
    twin = Twin(optimizer, options, p0)

    async def log_as_older_servers() -> None:
        eng = embedded_engine("cpu", data_dir=data, durability="step")
        await eng.start()
        try:
            await eng.create(CreateSpec(optimizer, [GroupSpec({"p": p0.clone()})], options,
                                        id="old", nonfinite="reject"))
            host, key = await eng._host("default", "old")
            for g in (g1, g2):
                await host.execute(key, Step({"p": g.clone()}))
                twin.step(g)
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(log_as_older_servers())
    assert not bool(torch.isfinite(twin.opt.state[twin.p]["sum"]).all())
    live = LiveServer(_test_settings(data_dir=data))
    try:
        with httpx.Client(base_url=live.start(), timeout=60) as c:
            assert c.get("/readyz").status_code == 200
            same_as_twin(c, "old", twin)
    finally:
        live.stop()
