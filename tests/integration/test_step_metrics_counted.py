"""A step's metrics (its outcome, its phases, the device worker's times) are counted after its
answer is written (``app.after_answer``), and still exactly: a ``GET /metrics`` sent on
another connection as soon as a step's answer is read counts that step, on both HTTP
protocols, for answered and refused steps, binary (the step's own lane) and JSON."""

from __future__ import annotations

import functools

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.torch_reference import adam_after, make_params

BINARY = "application/octet-stream"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(url: str) -> Samples:
    with httpx.Client(base_url=url) as scraper:  # (a connection of its own)
        r = scraper.get("/metrics")
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_each_step_is_counted_by_the_time_its_answer_is_read(server: str) -> None:
    n = 1000
    start = make_params({"w": [n]}, seed=3)["w"]
    with httpx.Client(base_url=server) as c:
        sid = "counted-after-answer"
        c.delete(f"/v1/sessions/{sid}")
        r = c.post("/v1/sessions", json={
            "id": sid, "optimizer": "Adam", "options": {"lr": 0.01},
            "params": {"w": {"dtype": "float32", "shape": [n], "data": start.tolist()}}})
        assert r.status_code == 201, r.text
        grad = st_save({"w": torch.linspace(-1, 1, n)})
        wrong = st_save({"w": torch.ones(n + 1)})
        names = ("decode", "encode", "queue", "device")
        for i in range(6):
            before = _samples(server)
            if i == 4:  # refused by its check: counted under its code, never reaches the device
                r = c.post(f"/v1/sessions/{sid}/step", content=wrong,
                           headers={"Content-Type": BINARY, "Accept": BINARY})
                assert r.status_code == 422, r.text
            elif i == 5:  # JSON, through the router
                r = c.post(f"/v1/sessions/{sid}/step",
                           json={"grads": {"w": {"dtype": "float32", "shape": [n],
                                                 "data": [0.5] * n}}})
                assert r.status_code == 200, r.text
            else:
                r = c.post(f"/v1/sessions/{sid}/step", content=grad,
                           headers={"Content-Type": BINARY, "Accept": BINARY})
                assert r.status_code == 200, r.text
            after = _samples(server)

            moved = functools.partial(_moved, before, after)
            refused = i == 4
            assert moved("optserve_steps_total", session=sid, outcome="ok") == (0 if refused
                                                                                 else 1)
            assert moved("optserve_steps_total", session=sid,
                         outcome="shape_mismatch") == (1 if refused else 0)
            assert [moved("optserve_step_phase_seconds_count", phase=p) for p in names] == (
                [1, 0, 0, 0] if refused else [1, 1, 1, 1])
            assert moved("optserve_worker_seconds_count", op="step",
                         phase="run") == (0 if refused else 1)
        # and the steps are torch's (the refused one changed nothing)
        ramp = {"w": torch.linspace(-1, 1, n)}
        expected = adam_after({"w": start}, *[ramp] * 4, {"w": torch.full((n,), 0.5)},
                              lr=0.01)["w"]
        got = c.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
        assert got.status_code == 200
        assert torch.equal(st_load(got.content)["w"], expected)
        c.delete(f"/v1/sessions/{sid}")
