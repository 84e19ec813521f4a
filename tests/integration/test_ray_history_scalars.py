"""``GET .../history`` and client scalars on a Ray-hosted session (its host on the test
cluster): recorded and answered by the same code as on the embedded engine, so a session stepped
the same way on both servers has the same history, every column bit for bit but the rows'
wall ``time`` (JSON, CSV, ``since``/``until``/``fields``/``points``), its learning rates those an
in-process ``torch.optim`` run used, its parameters that run's; the history's refusals are the
same problems. A sharded session (either engine) refuses history and scalars: 422
``not_supported_here`` naming them, nothing applied."""

from __future__ import annotations

import csv
import io
import json
import uuid
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from tests.torch_reference import json_tensor, tensor_from_json

pytestmark = [pytest.mark.integration, pytest.mark.ray]
BINARY = "application/octet-stream"
STEPS = 6


def seeded(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def initial() -> dict[str, torch.Tensor]:
    return {"w": seeded((6, 4), 0), "b": seeded((4,), 1)}


def grads_of(k: int) -> dict[str, torch.Tensor]:
    return {"w": seeded((6, 4), 100 + k), "b": seeded((4,), 200 + k)}


def create(http: httpx.Client, shards: int = 1) -> str:
    sid = f"hist-{uuid.uuid4().hex[:8]}"
    params = initial()
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.01}, "shards": shards,
        "param_groups": [{"params": {"w": json_tensor(params["w"])}},
                         {"params": {"b": json_tensor(params["b"])}, "lr": 0.1}],
        "scheduler": {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}}})
    assert r.status_code == 201, r.text
    return sid


def run(http: httpx.Client, sid: str) -> None:
    """Steps with scalars (JSON and safetensors ``__metadata__``), a push with its own, a
    step whose norms go to the history only (``?metrics=history``)."""
    for k in range(STEPS):
        grads = grads_of(k)
        if k == 2:
            r = http.post(f"/v1/sessions/{sid}/grads", json={
                "grads": {"w": json_tensor(grads["w"])}, "scalars": {"tok": 64}})
            assert r.status_code == 200, r.text
            grads = {"b": grads["b"]}
        if k % 2:
            body = safetensors.torch.save(grads, metadata={"scalars": json.dumps({"loss": k})})
            r = http.post(f"/v1/sessions/{sid}/step?return=none&metrics=history", content=body,
                          headers={"content-type": BINARY})
        else:
            r = http.post(f"/v1/sessions/{sid}/step", json={
                "grads": {n: json_tensor(t) for n, t in grads.items()},
                "scalars": {"loss": 0.5 * k}})
        assert r.status_code == 200, r.text
        assert ("metrics" in r.json()) == (k % 2 == 0)


def torch_run() -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """The parameters after the run, and the lrs each step used."""
    params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
    opt = torch.optim.Adam([{"params": [params["w"]]}, {"params": [params["b"]], "lr": 0.1}],
                           lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    for k in range(STEPS):
        for n, p in params.items():
            p.grad = grads_of(k)[n]
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return {n: p.detach() for n, p in params.items()}, used


def history(http: httpx.Client, sid: str, **query: Any) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/history", params=query)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_a_ray_hosted_sessions_history_is_the_embedded_sessions(
        ray_server: str, live_server: str) -> None:
    with httpx.Client(base_url=ray_server, timeout=120) as ray_http, \
            httpx.Client(base_url=live_server, timeout=120) as plain:
        sids = {}
        for name, http in (("ray", ray_http), ("embedded", plain)):
            sids[name] = create(http)
            run(http, sids[name])
        want, used = torch_run()
        r = ray_http.get(f"/v1/sessions/{sids['ray']}/params")
        for n, t in want.items():
            assert torch.equal(tensor_from_json(r.json()["params"][n]), t), n

        full = {name: history(http, sids[name])
                for name, http in (("ray", ray_http), ("embedded", plain))}
        got = full["ray"]
        assert got["rows"] == STEPS and (got["first"], got["last"]) == (1, STEPS)
        assert got["fields"] == full["embedded"]["fields"]
        assert {"lr.1", "grad_norm.0", "scalars.loss", "scalars.tok"} <= set(got["fields"])
        for field in got["fields"]:
            if field != "time":
                assert got["columns"][field] == full["embedded"]["columns"][field], field
        assert [[got["columns"][f"lr.{i}"][k] for i in (0, 1)] for k in range(STEPS)] == used
        assert got["columns"]["scalars.loss"] == [0.5 * k if k % 2 == 0 else k
                                                 for k in range(STEPS)]
        assert got["columns"]["scalars.tok"] == [None, None, 64.0, None, None, None]
        assert all(v is not None and v > 0 for v in got["columns"]["grad_norm.0"])

        for query in ({"since": 1, "until": 4, "fields": ["lr", "grad_norm.0", "scalars"]},
                      {"points": 3, "fields": "scalars.loss,update_norm"}):
            answers = [history(ray_http, sids["ray"], **query),
                       history(plain, sids["embedded"], **query)]
            assert [a.pop("id") for a in answers] == [sids["ray"], sids["embedded"]]
            assert answers[0] == answers[1], query
        texts = []
        for name, http in (("ray", ray_http), ("embedded", plain)):
            r = http.get(f"/v1/sessions/{sids[name]}/history",
                         params={"fields": "step,version,lr,param_norm,scalars"},
                         headers={"accept": "text/csv"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
            texts.append(r.text)
        assert texts[0] == texts[1]
        assert len(list(csv.reader(io.StringIO(texts[0])))) == STEPS + 1

        for query in ({"fields": "nope"}, {"fields": "lr.2"}, {"points": 0}, {"since": -1},
                      {"since": ["1", "2"]}):
            problems = []
            for name, http in (("ray", ray_http), ("embedded", plain)):
                r = http.get(f"/v1/sessions/{sids[name]}/history", params=query)
                assert r.status_code == 422, r.text
                problems.append({k: r.json().get(k) for k in ("code", "field", "detail")})
            assert problems[0] == problems[1] and problems[0]["field"], query
        r = ray_http.post(f"/v1/sessions/{sids['ray']}/step", json={
            "grads": {}, "scalars": {f"s{i}": 1 for i in range(17)}})
        assert r.status_code == 422 and r.json()["field"] == "scalars", r.text
        assert ray_http.get(f"/v1/sessions/{sids['ray']}").json()["version"] == STEPS
        for name, http in (("ray", ray_http), ("embedded", plain)):
            http.delete(f"/v1/sessions/{sids[name]}")


@pytest.mark.parametrize("engine", ["ray", "embedded"])
def test_a_sharded_session_refuses_history_and_scalars(
        ray_server: str, live_server: str, engine: str) -> None:
    with httpx.Client(base_url=ray_server if engine == "ray" else live_server,
                      timeout=120) as http:
        sid = create(http, shards=2)
        r = http.get(f"/v1/sessions/{sid}/history")
        assert r.status_code == 422, r.text
        assert (r.json()["code"], r.json()["field"]) == ("not_supported_here", "history")
        grads = {n: json_tensor(t) for n, t in grads_of(0).items()}
        for url in (f"/v1/sessions/{sid}/step", f"/v1/sessions/{sid}/grads"):
            r = http.post(url, json={"grads": grads, "scalars": {"loss": 1.0}})
            assert r.status_code == 422, r.text
            assert (r.json()["code"], r.json()["field"]) == ("not_supported_here", "scalars")
        info = http.get(f"/v1/sessions/{sid}").json()
        assert info["version"] == 0 and info["accumulated"] == []
        http.delete(f"/v1/sessions/{sid}")
