"""Metrics, client scalars and history over real HTTP (uvicorn on 127.0.0.1): the step answer's
``metrics`` in JSON and safetensors, scalars with steps and pushes (JSON and
``__metadata__.scalars``), sync rounds and async staleness, ``GET .../history`` as JSON and
CSV with ``since``/``until``/``fields``/``points``, every bad input a 422 naming its field, and
the history surviving ``kill -9`` (the subprocess helpers of test_durability)."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import math
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

import optserve
from tests.integration.test_durability import Proc

pytestmark = pytest.mark.integration
BINARY = "application/octet-stream"


def jt(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def seeded(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def create(http: httpx.Client, **extra: Any) -> str:
    sid = extra.pop("id", None) or f"h-{uuid.uuid4().hex[:10]}"
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": 0.01},
            "param_groups": [{"params": {"w": jt(seeded((6, 4), 0))}},
                             {"params": {"b": jt(seeded((4,), 1))}, "lr": 0.1}], **extra}
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return sid


def step_json(http: httpx.Client, sid: str, k: int, **extra: Any) -> dict[str, Any]:
    grads = {"w": jt(seeded((6, 4), 100 + k)), "b": jt(seeded((4,), 200 + k))}
    r = http.post(f"/v1/sessions/{sid}/step?return=none", json={"grads": grads, **extra})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def problem(r: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["field"] == field, body
    return body


def test_metrics_in_json_and_safetensors_answers(http: httpx.Client) -> None:
    sid = create(http)
    local = {"w": seeded((6, 4), 0).requires_grad_(True), "b": seeded((4,), 1).requires_grad_(True)}
    opt = torch.optim.Adam([{"params": [local["w"]]}, {"params": [local["b"]], "lr": 0.1}],
                           lr=0.01)
    for k in range(2):
        g = {"w": seeded((6, 4), 100 + k), "b": seeded((4,), 200 + k)}
        before = {n: t.detach().clone() for n, t in local.items()}
        for n, t in local.items():
            t.grad = g[n]
        opt.step()
        if k == 0:  # JSON
            out = step_json(http, sid, k, scalars={"loss": 0.5, "acc": 1})
            m = out["metrics"]
        else:  # safetensors both ways, scalars in __metadata__
            body = safetensors.torch.save(g, metadata={"scalars": json.dumps({"loss": 0.25})})
            r = http.post(f"/v1/sessions/{sid}/step", content=body,
                          headers={"content-type": BINARY, "accept": BINARY})
            assert r.status_code == 200, r.text
            meta = safe_metadata(r.content)
            m = json.loads(meta["metrics"])
            params = safetensors.torch.load(r.content)
            assert torch.equal(params["w"], local["w"].detach())
        assert m["n"] == k + 1
        for i, name in enumerate(("w", "b")):
            upd = float((local[name].detach() - before[name]).double().norm())
            assert math.isclose(m["groups"][i]["grad_norm"], float(g[name].double().norm()),
                                rel_tol=1e-6)
            assert math.isclose(m["groups"][i]["update_norm"], upd, rel_tol=1e-6)
            assert math.isclose(m["groups"][i]["param_norm"],
                                float(local[name].detach().double().norm()), rel_tol=1e-6)
        assert m["scalars"] == ({"loss": 0.5, "acc": 1.0} if k == 0 else {"loss": 0.25})
        assert [g["lr"] for g in m["groups"]] == [0.01, 0.1]


def safe_metadata(content: bytes) -> dict[str, str]:
    n = int.from_bytes(content[:8], "little")
    header: dict[str, Any] = json.loads(content[8:8 + n])
    meta: dict[str, str] = header["__metadata__"]
    return meta


def test_pushed_scalars_are_recorded_with_the_step_they_join(http: httpx.Client) -> None:
    sid = create(http)
    step_json(http, sid, 0, scalars={"loss": 4.0})
    g = {"w": jt(seeded((6, 4), 7))}
    r = http.post(f"/v1/sessions/{sid}/grads", json={"grads": g, "scalars": {"loss": 1.0}})
    assert r.status_code == 200, r.text
    body = safetensors.torch.save({"w": seeded((6, 4), 8)},
                                  metadata={"scalars": json.dumps({"loss": 2.0, "tok": 64})})
    r = http.post(f"/v1/sessions/{sid}/grads", content=body, headers={"content-type": BINARY})
    assert r.status_code == 200, r.text
    out = step_json(http, sid, 1, scalars={"loss": 3.0})
    assert out["metrics"]["scalars"] == {"loss": 2.0, "tok": 64.0}
    step_json(http, sid, 2)
    h = http.get(f"/v1/sessions/{sid}/history", params={"fields": "step,scalars"}).json()
    assert h["fields"] == ["n", "step", "scalars.loss", "scalars.tok"]
    assert h["columns"]["step"] == [1, 2, 3]
    assert h["columns"]["scalars.loss"] == [4.0, 2.0, None]
    assert h["columns"]["scalars.tok"] == [None, 64.0, None]


def test_history_json_csv_since_until_fields_points(http: httpx.Client) -> None:
    sid = create(http)
    for k in range(30):
        step_json(http, sid, k, scalars={"loss": float((k * 7) % 11)})
    url = f"/v1/sessions/{sid}/history"
    full = http.get(url).json()
    assert full["rows"] == 30 and full["first"] == 1 and full["last"] == 30
    assert full["capacity"] == 100_000 and full["points"] is None
    assert {"n", "step", "version", "time", "lr.0", "lr.1", "grad_norm.1", "update_norm.0",
            "param_norm.1", "update_ratio.0", "scalars.loss", "skipped"} <= set(full["fields"])
    part = http.get(url, params={"since": 10, "until": 14, "fields": ["lr", "grad_norm.0"]})
    assert part.json()["columns"]["n"] == [11, 12, 13, 14]
    assert part.json()["fields"] == ["n", "lr.0", "lr.1", "grad_norm.0"]
    assert part.json()["columns"]["grad_norm.0"] == full["columns"]["grad_norm.0"][10:14]

    r = http.get(url, params={"fields": "step,scalars.loss,grad_norm.1"},
                 headers={"accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["n", "step", "scalars.loss", "grad_norm.1"]
    assert len(rows) == 31 and rows[1][:3] == ["1", "1", "0.0"] and rows[30][:2] == ["30", "30"]
    assert [float(x[3]) for x in rows[1:]] == full["columns"]["grad_norm.1"]

    ds = http.get(url, params={"points": 4, "fields": "scalars.loss"}).json()
    assert ds["points"] == 4 and ds["rows"] == 30
    assert ds["fields"] == ["n.min", "n.max", "scalars.loss.min", "scalars.loss.max"]
    assert ds["columns"]["n.min"][0] == 1 and ds["columns"]["n.max"][-1] == 30
    assert min(ds["columns"]["scalars.loss.min"]) == 0.0
    assert max(ds["columns"]["scalars.loss.max"]) == 10.0
    assert http.get(url, params={"since": 30}).json()["columns"]["n"] == []


def test_history_bad_inputs_name_the_field(http: httpx.Client) -> None:
    sid = create(http)
    url = f"/v1/sessions/{sid}/history"
    problem(http.get(url, params={"fields": "nope"}), 422, "fields")
    for empty in ("", ",", " , "):  # (naming no field: not every field)
        assert problem(http.get(url, params={"fields": empty}), 422, "fields")[
            "code"] == "invalid_query"
    with optserve.Client(str(http.base_url), transport="http") as client:
        for names in ([], [""], ["lr", " "]):
            with pytest.raises(ValueError, match="fields"):
                client.history(sid, fields=names)
    problem(http.get(url, params={"points": 0}), 422, "points")
    problem(http.get(url, params={"since": -1}), 422, "since")
    problem(http.get(f"/v1/sessions/nope-{sid}/history"), 404, "session_id")
    assert http.get(url, headers={"accept": "image/png"}).status_code == 406
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {}, "scalars": {"loss": "x"}})
    problem(r, 422, "scalars.loss")
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {},
                                                    "scalars": {f"s{i}": 1 for i in range(17)}})
    problem(r, 422, "scalars")
    body = safetensors.torch.save({"w": seeded((6, 4), 1)},
                                  metadata={"scalars": json.dumps({"9x": 1.0})})
    r = http.post(f"/v1/sessions/{sid}/grads", content=body, headers={"content-type": BINARY})
    problem(r, 422, "scalars.9x")
    body = safetensors.torch.save({"w": seeded((6, 4), 1)}, metadata={"scalars": "{not json"})
    r = http.post(f"/v1/sessions/{sid}/grads", content=body, headers={"content-type": BINARY})
    problem(r, 400, "__metadata__.scalars")
    problem(http.patch(f"/v1/sessions/{sid}", json={"history": -1}), 422, "history")
    problem(http.patch(f"/v1/sessions/{sid}", json={"metrics": "yes"}), 422, "metrics")
    problem(http.post("/v1/sessions", json={"optimizer": "SGD", "metrics": 1,
                                            "params": {"x": jt(torch.ones(1))}}), 422, "metrics")
    assert http.get(f"/v1/sessions/{sid}").json()["version"] == 0  # nothing applied


def test_history_query_typos_and_repeats_are_refused(http: httpx.Client) -> None:
    """A column of a param group the session does not have (``lr.99``, ``grad_norm.2`` of a
    two-group session) or written otherwise (``lr.01``) came back as an empty column, and a
    repeated ``since``/``until``/``points`` was taken (the last one), so a typo went unseen:
    each is a 422 ``invalid_query`` naming the query parameter. A group added later has its
    columns from then on (``null`` before)."""
    sid = create(http)
    for k in range(6):
        step_json(http, sid, k)
    url = f"/v1/sessions/{sid}/history"
    full = http.get(url).json()
    for fields in ("lr.99", "grad_norm.2", "lr.2,lr.0", "lr.01", "update_norm.00", "lr.-1"):
        body = problem(http.get(url, params={"fields": fields}), 422, "fields")
        assert body["code"] == "invalid_query", body
        if fields in ("lr.01", "update_norm.00"):  # the group is there: the spelling is not
            plain = fields.split(".")[0] + "." + str(int(fields.split(".")[1]))
            assert f"'{plain}'" in body["detail"] and "session has" not in body["detail"], body
    for name, values in [("since", ["1", "5"]), ("until", ["5", "5"]), ("points", ["2", "3"])]:
        body = problem(http.get(url, params=[(name, v) for v in values]), 422, name)
        assert body["code"] == "invalid_query" and "more than once" in body["detail"], body
    got = http.get(url, params=[("since", "4"), ("fields", "lr.1"), ("fields", "lr.0")]).json()
    assert got["columns"] == {"n": [5, 6], "lr.1": full["columns"]["lr.1"][4:],
                              "lr.0": full["columns"]["lr.0"][4:]}
    r = http.post(f"/v1/sessions/{sid}/param_groups",
                  json={"params": {"c": jt(seeded((3,), 9))}, "lr": 0.5})
    assert r.status_code == 201, r.text
    step_json(http, sid, 6)
    got = http.get(url, params={"fields": "lr.2", "since": 4}).json()
    assert got["columns"] == {"n": [5, 6, 7], "lr.2": [None, None, 0.5]}


def test_metrics_switch_and_history_size_per_session(http: httpx.Client) -> None:
    sid = create(http, metrics=False, history=3)
    info = http.get(f"/v1/sessions/{sid}").json()
    assert info["metrics"] is False and info["history"] == 3
    out = step_json(http, sid, 0)
    assert out["metrics"]["groups"] == [{"lr": 0.01}, {"lr": 0.1}]
    r = http.patch(f"/v1/sessions/{sid}", json={"metrics": True, "history": 5})
    assert r.status_code == 200 and r.json()["metrics"] is True and r.json()["history"] == 5
    for k in range(1, 8):
        step_json(http, sid, k)
    h = http.get(f"/v1/sessions/{sid}/history", params={"fields": "grad_norm"}).json()
    assert h["first"] == 4 and h["last"] == 8 and h["columns"]["n"] == [4, 5, 6, 7, 8]
    assert all(v is not None and v > 0 for v in h["columns"]["grad_norm.0"])


def test_parameter_server_steps_record_staleness_and_workers(http: httpx.Client) -> None:
    sid = create(http)
    step_json(http, sid, 0)
    step_json(http, sid, 1)
    g = {"w": jt(seeded((6, 4), 5))}
    r = http.post(f"/v1/sessions/{sid}/step?return=none&base_version=0", json={"grads": g})
    assert r.status_code == 200 and r.json()["metrics"]["staleness"] == 2

    sync = create(http, sync={"workers": 2})

    def push(worker: str, loss: float) -> dict[str, Any]:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as c:
            r = c.post(f"/v1/sessions/{sync}/step?return=none",
                       json={"grads": g, "scalars": {"loss": loss}},
                       headers={"X-Optserve-Worker": worker})
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(push, ["w1", "w0"], [1.0, 3.0])
    assert a["metrics"] == b["metrics"]
    assert a["metrics"]["workers"] == ["w0", "w1"] and a["metrics"]["scalars"] == {"loss": 2.0}
    h = http.get(f"/v1/sessions/{sync}/history", params={"fields": "workers,staleness"}).json()
    assert h["columns"]["workers"] == [2] and h["columns"]["staleness"] == [None]


def test_history_survives_kill9(tmp_path: Path) -> None:
    proc = Proc(tmp_path / "data", env={"OPTSERVE_SNAPSHOT_EVERY_STEPS": "5"})
    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            sid = create(http, id="crash")
            for k in range(12):  # snapshots at 5 and 10, then two steps only in the log
                step_json(http, sid, k, scalars={"loss": 1.0 / (k + 1)})
            before = http.get(f"/v1/sessions/{sid}/history").json()
            csv_before = http.get(f"/v1/sessions/{sid}/history",
                                  headers={"accept": "text/csv"}).text
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            after = http.get(f"/v1/sessions/{sid}/history").json()
            assert after == before  # every value, the times and norms included, bit for bit
            assert http.get(f"/v1/sessions/{sid}/history",
                            headers={"accept": "text/csv"}).text == csv_before
            assert after["rows"] == 12 and after["columns"]["scalars.loss"][-1] == 1 / 12
            out = step_json(http, sid, 12)
            assert out["metrics"]["n"] == 13
    finally:
        proc.stop()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "safetensors"])
@pytest.mark.parametrize("n", [24, 400_000], ids=["inline", "worker"])
def test_metrics_history_leaves_the_norms_out_of_the_answer_and_in_the_row(
        http: httpx.Client, binary: bool, n: int) -> None:
    """``?metrics=history``: no ``metrics`` in the answer (JSON or safetensors metadata); a
    history query sent right after it has the step's row with the norms the answer would have
    carried (a twin session stepped with ``?metrics=answer``: the same values), which equal
    torch's; the parameters equal torch's bit for bit. A bad value is a 422 naming the field,
    and nothing is applied."""
    p0 = seeded((n,), 5)
    sids = []
    for _ in range(2):
        sid = f"mh-{uuid.uuid4().hex[:10]}"
        r = http.post("/v1/sessions", json={"id": sid, "optimizer": "Adam",
                                             "options": {"lr": 0.01},
                                             "params": {"w": jt(p0)}})
        assert r.status_code == 201, r.text
        sids.append(sid)
    quiet, loud = sids
    bad = http.post(f"/v1/sessions/{quiet}/step?metrics=none",
                    json={"grads": {"w": jt(seeded((n,), 9))}})
    problem(bad, 422, "metrics")
    assert http.get(f"/v1/sessions/{quiet}").json()["version"] == 0
    local = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([local], lr=0.01)
    for k in range(2):
        g = seeded((n,), 300 + k)
        before = local.detach().clone()
        local.grad = g
        opt.step()
        answers = []
        for sid, shown in ((quiet, "history"), (loud, "answer")):
            url = f"/v1/sessions/{sid}/step?metrics={shown}"
            if binary:
                r = http.post(url, content=safetensors.torch.save({"w": g}),
                              headers={"content-type": BINARY, "accept": BINARY})
                assert r.status_code == 200, r.text
                meta = safe_metadata(r.content)
                answers.append(json.loads(meta["metrics"]) if "metrics" in meta else None)
                params = safetensors.torch.load(r.content)["w"]
            else:
                r = http.post(url, json={"grads": {"w": jt(g)}})
                assert r.status_code == 200, r.text
                answers.append(r.json().get("metrics"))
                params = torch.tensor(r.json()["params"]["w"]["data"], dtype=torch.float32)
            assert torch.equal(params, local.detach()), sid
        assert answers[0] is None and answers[1] is not None
        row = http.get(f"/v1/sessions/{quiet}/history", params={"since": k}).json()["columns"]
        assert row["n"] == [k + 1]
        for key in ("grad_norm", "update_norm", "param_norm", "update_ratio", "lr"):
            assert row[f"{key}.0"] == [answers[1]["groups"][0][key]], key
        upd = float((local.detach() - before).double().norm())
        tol = 1e-6 if n < 1000 else 1e-4  # torch's float32 norm of 400,000 values
        assert math.isclose(row["update_norm.0"][0], upd, rel_tol=tol)
        assert math.isclose(row["grad_norm.0"][0], float(g.double().norm()), rel_tol=tol)


def test_concurrent_history_only_steps_fill_every_row(http: httpx.Client) -> None:
    """Four clients step one 1.6 MB session at once, each step with ``?metrics=history``: the
    steps run on the device worker one after another, each taking its norms after its answer
    and before the next step. Every row is then whole and belongs to its step: replaying the
    gradients in the order of the versions the answers carried equals the server's parameters
    bit for bit, and each row's update and parameter norms equal that replay's."""
    n = 400_000
    p0 = seeded((n,), 11)
    sid = f"mhc-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                        "options": {"lr": 0.1, "momentum": 0.9},
                                        "params": {"w": jt(p0)}})
    assert r.status_code == 201, r.text
    base = str(http.base_url).rstrip("/")

    def client(c: int) -> list[tuple[int, int]]:
        done = []
        with httpx.Client(base_url=base, timeout=60) as mine:
            for k in range(5):
                g = seeded((n,), 1000 * c + k)
                r = mine.post(f"/v1/sessions/{sid}/step?metrics=history&return=none",
                              content=safetensors.torch.save({"w": g}),
                              headers={"content-type": BINARY})
                assert r.status_code == 200, r.text
                assert "metrics" not in r.json()
                done.append((r.json()["version"], 1000 * c + k))
        return done

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        versions = sorted(v for part in pool.map(client, range(4)) for v in part)
    assert [v for v, _ in versions] == list(range(1, 21))
    local = p0.clone().requires_grad_(True)
    opt = torch.optim.SGD([local], lr=0.1, momentum=0.9)
    want_update, want_param = [], []
    for _, seed in versions:
        before = local.detach().clone()
        local.grad = seeded((n,), seed)
        opt.step()
        want_update.append(float((local.detach() - before).double().norm()))
        want_param.append(float(local.detach().double().norm()))
    got = safetensors.torch.load(http.get(f"/v1/sessions/{sid}/params",
                                          headers={"accept": BINARY}).content)["w"]
    assert torch.equal(got, local.detach())
    cols = http.get(f"/v1/sessions/{sid}/history").json()["columns"]
    assert cols["n"] == list(range(1, 21)) and cols["version"] == list(range(1, 21))
    for i in range(20):  # (float32 norms of 400,000 values)
        assert math.isclose(cols["update_norm.0"][i], want_update[i], rel_tol=1e-4), i
        assert math.isclose(cols["param_norm.0"][i], want_param[i], rel_tol=1e-4), i


def test_scalar_names_are_bounded_per_session_and_survive_kill9(tmp_path: Path) -> None:
    """A client naming a scalar per step (``loss_<step>``) grew the history by a column of
    the ring's size per step (``benchmarks.scalar_names``: 8,000 such steps took the server
    from 347 to 852 MB, and a 321 MB history answer to 2,140 MB):
    :data:`metrics.MAX_SCALAR_NAMES` distinct names per session, then a 422
    ``invalid_scalars`` naming the new one, for steps and pushes, with nothing applied; the
    names it has are always taken. The bound is logged with each step and holds the same
    after a kill -9 (a snapshot, then steps only in the log)."""
    from app.engine.metrics import MAX_SCALAR_NAMES, MAX_SCALARS

    proc = Proc(tmp_path / "data", env={"OPTSERVE_SNAPSHOT_EVERY_STEPS": "3"})
    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            sid = create(http, id="names")
            ref_w, ref_b = seeded((6, 4), 0).requires_grad_(), seeded((4,), 1).requires_grad_()
            ref = torch.optim.Adam([{"params": [ref_w]}, {"params": [ref_b], "lr": 0.1}],
                                   lr=0.01)
            k = 0

            def step_both(**extra: Any) -> None:
                nonlocal k
                step_json(http, sid, k, **extra)
                ref_w.grad, ref_b.grad = seeded((6, 4), 100 + k), seeded((4,), 200 + k)
                ref.step()
                k += 1

            names = [f"s{i}" for i in range(MAX_SCALAR_NAMES)]
            for start in range(0, MAX_SCALAR_NAMES - 1, MAX_SCALARS):  # all but the last
                step_both(scalars={n: 1.0 for n in names[start:start + MAX_SCALARS]
                                   if n != names[-1]})
            r = http.post(f"/v1/sessions/{sid}/grads",
                          json={"grads": {}, "scalars": {names[-1]: 2.0}})
            assert r.status_code == 200, r.text  # the 128th, pending for the next step
            before = http.get(f"/v1/sessions/{sid}").json()
            for path, body in ((f"/v1/sessions/{sid}/step",
                                {"grads": {"b": jt(seeded((4,), 9))},
                                 "scalars": {"loss_0": 1.0}}),
                               (f"/v1/sessions/{sid}/grads",
                                {"grads": {"b": jt(seeded((4,), 9))},
                                 "scalars": {"s0": 1.0, "loss_1": 1.0}})):
                body_ = problem(http.post(path, json=body), 422, problem_field(body))
                assert body_["code"] == "invalid_scalars"
                assert body_["limit"] == MAX_SCALAR_NAMES
            assert http.get(f"/v1/sessions/{sid}").json() == before
            step_both(scalars={"s0": 3.0, names[-1]: 4.0})  # names it has: taken
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            r = http.post(f"/v1/sessions/{sid}/step",
                          json={"grads": {}, "scalars": {"loss_2": 1.0}})
            assert problem(r, 422, "scalars.loss_2")["code"] == "invalid_scalars"
            step_both(scalars={"s5": 1.0})
            params = http.get(f"/v1/sessions/{sid}/params").json()["params"]
            got = {n: torch.tensor(p["data"]).reshape(p["shape"]) for n, p in params.items()}
            assert torch.equal(got["w"], ref_w.detach()) and torch.equal(got["b"], ref_b.detach())
            hist = http.get(f"/v1/sessions/{sid}/history?fields=scalars").json()
            assert len(hist["fields"]) == 1 + MAX_SCALAR_NAMES  # n and the 128 names
    finally:
        proc.stop()


def problem_field(body: dict[str, Any]) -> str:
    """The field a refused step or push names: its first new scalar name."""
    return "scalars." + next(n for n in body["scalars"] if n.startswith("loss_"))
