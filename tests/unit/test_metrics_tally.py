"""``Metrics`` counts the request path's series itself and sets them into prometheus_client's
series when the registry is read: ``/metrics`` (``generate_latest``) is byte for byte what
prometheus_client's own ``inc()`` and ``observe()`` gave for the same requests, computed here
with them, on another ``Metrics`` fed the old way."""

from __future__ import annotations

import math
import random
import sys
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client import metrics as prometheus_metrics

from app.observability import Metrics


class _FixedClock:
    """prometheus_client's clock for series' ``_created`` samples: one instant."""

    @staticmethod
    def time() -> float:
        return 1_700_000_000.25


def _amounts(rng: random.Random) -> list[float]:
    """Seconds as a server measures them, and the edges: a bucket's bound exactly, zero,
    beyond the last bound, infinity and NaN (no bucket, but the sum)."""
    out = [rng.expovariate(1 / 0.004) for _ in range(300)]
    return out + [0.0, 0.0001, 0.001, 30.0, 31.5, math.inf, math.nan, 0.00025]


def test_exposition_is_prometheus_clients_for_the_same_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus_metrics, "time", _FixedClock)
    rng = random.Random(9)
    ours, ref = Metrics(), Metrics()
    sessions = ["s", "t", ""]
    for i, amount in enumerate(_amounts(rng)):
        method, status = rng.choice(["POST", "GET"]), rng.choice(["200", "404", "422"])
        size_in, size_out = rng.randrange(10_000), rng.randrange(10_000)
        ours.request(method, status, size_in, size_out)
        ref.series(ref.requests, method, status).inc()
        ref.bytes_in.inc(size_in)
        ref.bytes_out.inc(size_out)

        session, what = rng.choice(sessions), rng.choice(["ok", "skipped", "invalid_body"])
        counter = ours.steps if i % 3 else ours.pushes
        ours.count(counter, session, what)
        ref.series(ref.steps if i % 3 else ref.pushes, session, what).inc()
        if session:
            ref._series.setdefault(session, set()).add((ref.steps if i % 3 else ref.pushes, what))

        name = rng.choice(["decode", "encode"])
        ours.observe_phase(name, amount)
        ref.series(ref.step_phase, name).observe(amount)

        op, run = rng.choice(["step", "push", "create"]), amount * 0.5
        ours.observe_worker(op, amount, run)
        ref.series(ref.worker, op, "queue").observe(amount)
        ref.series(ref.worker, op, "run").observe(run)
        if op == "step":
            ref.series(ref.step_phase, "queue").observe(amount)
            ref.series(ref.step_phase, "device").observe(run)
        if i == 150:  # a read half way: the counting goes on from the values set
            assert generate_latest(ours.registry) == generate_latest(ref.registry)
            ours.forget_session("t")
            ref.forget_session("t")
    assert generate_latest(ours.registry) == generate_latest(ref.registry)
    assert b'optserve_steps_total{outcome="ok",session="s"}' in generate_latest(ours.registry)
    assert ours.registry.get_sample_value(
        "optserve_http_requests_total", {"method": "POST", "status": "200"}) == (
        ref.registry.get_sample_value(
            "optserve_http_requests_total", {"method": "POST", "status": "200"}))


def test_counts_from_several_threads_are_all_kept() -> None:
    # (threads switched as often as the interpreter can: unlocked counting loses counts)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _count_in_threads()
    finally:
        sys.setswitchinterval(interval)


def _count_in_threads() -> None:
    m = Metrics()
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(10_000):
            m.observe_worker("step", 0.001, 0.002)
            m.request("POST", "200", 3, 5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    get = m.registry.get_sample_value
    assert get("optserve_worker_seconds_count", {"op": "step", "phase": "run"}) == 40_000
    assert get("optserve_step_phase_seconds_count", {"phase": "device"}) == 40_000
    assert get("optserve_http_requests_total", {"method": "POST", "status": "200"}) == 40_000
    assert get("optserve_request_bytes_total") == 120_000
    assert get("optserve_response_bytes_total") == 200_000
