"""/metrics moves by exactly what the requests did; request ids are echoed everywhere."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families


def _jt(values: list[float], shape: list[int]) -> dict[str, object]:
    return {"dtype": "float32", "shape": shape, "data": values}


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_and_histograms_move_by_the_right_amounts(app_client: TestClient) -> None:
    c = app_client
    before = _samples(c)
    r = c.post("/v1/sessions", json={"id": "m", "optimizer": "SGD", "options": {"lr": 0.5},
                                     "params": {"w": _jt([1.0, 2.0], [2])}})
    assert r.status_code == 201
    for _ in range(3):
        assert c.post("/v1/sessions/m/step",
                      json={"grads": {"w": _jt([1.0, 1.0], [2])}}).status_code == 200
    bad = c.post("/v1/sessions/m/step", json={"grads": {"w": _jt([1.0], [1])}})
    assert bad.status_code == 422
    for _ in range(2):
        assert c.post("/v1/sessions/m/grads",
                      json={"grads": {"w": _jt([0.5, 0.5], [2])}}).status_code == 200
    assert c.post("/v1/sessions/nope/step", json={"grads": {}}).status_code == 404
    after = _samples(c)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("optserve_steps_total", session="m", outcome="ok") == 3
    assert delta("optserve_steps_total", session="m", outcome="shape_mismatch") == 1
    assert delta("optserve_steps_total", session="", outcome="session_not_found") == 1
    assert delta("optserve_pushes_total", session="m", outcome="ok") == 2
    # every step request on the session decoded (the one on an unknown session is refused
    # before its body is read); the three good ones reached the worker and were encoded
    # (the mis-shaped one is refused by its check, before the device worker runs anything)
    assert delta("optserve_step_phase_seconds_count", phase="decode") == 4
    assert delta("optserve_step_phase_seconds_count", phase="encode") == 3
    assert delta("optserve_step_phase_seconds_count", phase="queue") == 3
    assert delta("optserve_step_phase_seconds_count", phase="device") == 3
    assert delta("optserve_worker_seconds_count", op="push", phase="run") == 2
    assert delta("optserve_http_requests_total", method="POST", status="200") == 5
    assert delta("optserve_request_bytes_total") > 0
    assert after[("optserve_sessions", ())] == 1
    # SGD without momentum keeps no state: the params (2 float32) and the accumulator (2)
    assert after[("optserve_device_memory_bytes", ())] == 16
    # and the values the steps produced are torch's: w = [1, 2] - 3 * 0.5 * [1, 1]
    got = c.get("/v1/sessions/m/params").json()["params"]["w"]["data"]
    assert got == [-0.5, 0.5]


def test_request_id_is_echoed_in_header_and_problem(app_client: TestClient) -> None:
    r = app_client.get("/v1/sessions/absent", headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["request_id"] == "trace-42"
    r = app_client.get("/v1/sessions/absent", headers={"X-Request-Id": "bad id with spaces"})
    generated = r.headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32
    assert r.json()["request_id"] == generated
