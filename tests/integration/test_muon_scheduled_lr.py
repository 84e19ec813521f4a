"""A Muon session whose own scheduler (ExponentialLR with a gamma past 1) would write an lr that
Muon's shape scaling takes past the dtype's range: the step whose scheduler step writes it is
refused (409 ``scheduler_out_of_range``, naming the scheduler, nothing changed), as every
scheduler write out of range is. The write was taken and every next step refused with a 422
``option_overflow`` that advised a PATCH of the lr, which the scheduler wrote over again."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from app.engine import scheduler_writes
from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration

ROWS = 16  # (Muon scales the lr of a [16, 1] parameter by sqrt(16) = 4)
GAMMA = 1e38  # (lr 1.0 to 1e38: in float32's range, 4e38 past it)
START = [float(i % 5) - 2.0 for i in range(ROWS)]
GRAD = [0.5 - 0.125 * (i % 7) for i in range(ROWS)]


def _tensor(data: list[float]) -> dict[str, object]:
    return {"dtype": "float32", "shape": [ROWS, 1], "data": data}


def test_a_scheduler_that_takes_a_muon_lr_past_its_scaled_range_refuses_that_step() -> None:
    with LiveServer(_test_settings()).serving() as url, httpx.Client(base_url=url,
                                                                      timeout=60) as c:
        r = c.post("/v1/sessions", json={
            "optimizer": "Muon", "id": "m", "options": {"lr": 1.0},
            "params": {"w": _tensor(START)},
            "scheduler": {"name": "ExponentialLR", "options": {"gamma": GAMMA}}})
        assert r.status_code == 201, r.text
        before = c.get("/v1/sessions/m/state_dict").json()
        r = c.post("/v1/sessions/m/step", json={"grads": {"w": _tensor(GRAD)}})
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["code"] == "scheduler_out_of_range"
        assert problem["field"] == "param_groups.0.lr"
        assert problem["scheduler"] == "ExponentialLR"
        assert "Muon scales it" in problem["detail"], problem["detail"]
        assert c.get("/v1/sessions/m/state_dict").json() == before
        # without the scheduler the session steps as torch's Muon does
        r = c.patch("/v1/sessions/m", json={"scheduler": None})
        assert r.status_code == 200, r.text
        r = c.post("/v1/sessions/m/step", json={"grads": {"w": _tensor(GRAD)}})
        assert r.status_code == 200, r.text
        w = torch.tensor(START).reshape(ROWS, 1).requires_grad_()
        opt = torch.optim.Muon([w], lr=1.0)
        w.grad = torch.tensor(GRAD).reshape(ROWS, 1)
        opt.step()
        got = c.get("/v1/sessions/m/params").json()["params"]["w"]["data"]
        assert torch.equal(torch.tensor(got, dtype=torch.float32).reshape(ROWS, 1), w.detach())


def test_a_muon_lr_a_scheduler_wrote_past_its_range_is_refused_naming_the_scheduler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session a server before that check left holding such an lr (its scheduler's write
    taken): each step's 422 ``option_overflow`` names the scheduler and says to replace or
    remove it, not only to PATCH the lr, which it goes on from."""
    data = tmp_path / "data"
    create = {"optimizer": "Muon", "id": "m", "options": {"lr": 1.0},
              "params": {"w": _tensor(START)},
              "scheduler": {"name": "ExponentialLR", "options": {"gamma": GAMMA}}}
    with monkeypatch.context() as m:
        m.setattr(scheduler_writes, "muon_lr_overflow", lambda *_a: None)
        with LiveServer(_test_settings(data_dir=data)).serving() as url, \
                httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/sessions", json=create).status_code == 201
            r = c.post("/v1/sessions/m/step", json={"grads": {"w": _tensor(GRAD)}})
            assert r.status_code == 200, r.text
            assert r.json()["lr"] == [GAMMA]
    with LiveServer(_test_settings(data_dir=data)).serving() as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/sessions/m/step", json={"grads": {"w": _tensor(GRAD)}})
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "option_overflow"
        assert problem["field"] == "param_groups.0.lr"
        assert "ExponentialLR" in problem["detail"]
        assert '{"scheduler": null}' in problem["detail"]
