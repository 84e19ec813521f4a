"""Parameter-server mode against a real server: synchronous rounds (exact reduction, duplicate
pushes, timeouts, K changed between rounds), async pushes with bounded staleness, versioned
pulls (304, long polls), the SDK's worker mode and ``pull_params``, and a restart."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve
from tests.conftest import ENGINES, LiveServer, _test_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def client(engine_url: str) -> Iterator[optserve.Client]:
    with optserve.Client(engine_url, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as p:
        yield p


def sid() -> str:
    return f"ps-{uuid.uuid4().hex[:12]}"


def wait_pending(client: optserve.Client, session: str, n: int, timeout: float = 10.0) -> None:
    """Until ``n`` workers have pushed to the open round of ``session``."""
    deadline = time.monotonic() + timeout
    while True:
        sync = client.get_session(session).sync
        assert sync is not None
        if len(sync["pending"]) >= n:
            return
        assert time.monotonic() < deadline, f"round never reached {n} pushes: {sync}"
        time.sleep(0.01)


def push(url: str, session: str, grads: dict[str, torch.Tensor], worker: str,
         **kw: Any) -> optserve.StepResult:
    with optserve.Client(url, max_retries=0) as c:
        return c.step(session, grads, worker=worker, **kw)


# --------------------------------------------------------------------------- sync rounds
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 6, generator=g)
    teacher = torch.randn(6, 3, generator=g)
    return x, torch.tanh(x @ teacher) + 0.1 * torch.randn(64, 3, generator=g)


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w1": torch.randn(6, 16, generator=g) * 0.4, "b1": torch.zeros(16),
            "w2": torch.randn(16, 3, generator=g) * 0.4, "b2": torch.zeros(3)}


def loss_grads(params: dict[str, torch.Tensor], x: torch.Tensor,
               y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    h = torch.tanh(x @ leaves["w1"] + leaves["b1"])
    loss = F.mse_loss(h @ leaves["w2"] + leaves["b2"], y)
    loss.backward()
    return float(loss.detach()), {n: t.grad for n, t in leaves.items() if t.grad is not None}


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_sync_mean_of_equal_shards_equals_full_batch(
    client: optserve.Client, engine_url: str, pool: ThreadPoolExecutor
) -> None:
    x, y = data()
    params = init_params()
    s = sid()
    client.create_session("Adam", params, options={"lr": 0.01}, id=s,
                          sync={"workers": 4, "reduce": "mean", "timeout_s": 30})
    ref = {n: p.clone() for n, p in params.items()}
    ref_opt = torch.optim.Adam([ref[n] for n in ref], lr=0.01)
    current = {n: p.clone() for n, p in params.items()}
    workers = ["w0", "w1", "w2", "w3"]
    for step in range(1, 6):
        shards = [loss_grads(current, x[k * 16:(k + 1) * 16], y[k * 16:(k + 1) * 16])[1]
                  for k in range(4)]
        futures = [pool.submit(push, engine_url, s, g, w) for w, g in zip(workers, shards,
                                                                            strict=True)]
        results = [f.result(timeout=30) for f in futures]
        # the local reference: one full-batch step
        _, full = loss_grads({n: t.detach() for n, t in ref.items()}, x, y)
        for n, t in ref.items():
            t.grad = full[n]
        ref_opt.step()
        for r in results:
            assert (r.version, r.step) == (step, step)
            assert r.sync == {"workers": workers, "expected": 4, "partial": False}
            assert r.params is not None
            for n in ref:
                assert torch.equal(r.params[n], results[0].params[n])  # same for every worker
                torch.testing.assert_close(r.params[n], ref[n], rtol=0, atol=1e-6)
        current = {n: t.clone() for n, t in results[0].params.items()}


def test_duplicate_push_in_a_round_is_409(
    client: optserve.Client, live_server: str, pool: ThreadPoolExecutor
) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(3)}, options={"lr": 1.0}, id=s,
                          sync={"workers": 2, "timeout_s": 30})
    first = pool.submit(push, live_server, s, {"w": torch.ones(3)}, "a")
    wait_pending(client, s, 1)
    with pytest.raises(optserve.ConflictError) as err:
        client.step(s, {"w": torch.ones(3)}, worker="a")
    assert err.value.code == "duplicate_push"
    assert err.value.problem["status"] == 409
    # a push without a worker id is refused too, and neither touched the round
    with pytest.raises(optserve.ValidationError) as err2:
        client.step(s, {"w": torch.ones(3)})
    assert err2.value.code == "missing_worker"
    second = client.step(s, {"w": 3 * torch.ones(3)}, worker="b")
    assert first.result(timeout=10).version == second.version == 1
    assert second.params is not None
    assert second.params["w"].tolist() == [-2.0, -2.0, -2.0]  # mean of 1 and 3


def test_bad_push_is_that_pushers_error_and_does_not_poison_the_round(
    client: optserve.Client, live_server: str, pool: ThreadPoolExecutor
) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 1.0}, id=s,
                          sync={"workers": 2, "reduce": "sum", "timeout_s": 30})
    first = pool.submit(push, live_server, s, {"w": torch.ones(2)}, "a")
    wait_pending(client, s, 1)
    bad: list[tuple[dict[str, torch.Tensor], str]] = [
        ({"w": torch.ones(3)}, "shape_mismatch"),
        ({"w": torch.ones(2, dtype=torch.float64)}, "dtype_mismatch"),
        ({"nope": torch.ones(2)}, "unknown_parameter"),
        ({"w": torch.tensor([1.0, float("nan")])}, "nonfinite_gradient"),
    ]
    for grads, code in bad:
        with pytest.raises(optserve.ValidationError) as err:
            client.step(s, grads, worker="b")
        assert err.value.code == code
    assert client.get_session(s).sync["pending"] == ["a"]  # type: ignore[index]
    result = client.step(s, {"w": torch.full((2,), 2.0)}, worker="b")
    assert first.result(timeout=10).version == result.version == 1
    assert result.params is not None and result.params["w"].tolist() == [-3.0, -3.0]


def test_round_timeout_fail_discards_the_round(
    client: optserve.Client, live_server: str, pool: ThreadPoolExecutor
) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 1.0}, id=s,
                          sync={"workers": 3, "timeout_s": 0.5, "on_timeout": "fail"})
    started = time.monotonic()
    futures = [pool.submit(push, live_server, s, {"w": torch.ones(2)}, w) for w in "ab"]
    for f in futures:
        with pytest.raises(optserve.ConflictError) as err:
            f.result(timeout=10)
        assert err.value.code == "round_timeout"
        assert err.value.problem["field"] == "sync.timeout_s"  # the option that ran out
        assert err.value.problem["workers"] == ["a", "b"]
        assert err.value.problem["expected"] == 3
        assert "timed out" in (err.value.problem.get("detail") or "")
    assert 0.4 < time.monotonic() - started < 5
    after = client.get_params(s)
    assert after.version == 0 and after.params["w"].tolist() == [0.0, 0.0]
    assert client.get_session(s).sync["pending"] == []  # type: ignore[index]
    # the next round starts afresh (nothing of the failed one left)
    client.configure_session(s, sync={"workers": 1})
    r = client.step(s, {"w": torch.ones(2)}, worker="c")
    assert r.version == 1 and r.params is not None and r.params["w"].tolist() == [-1.0, -1.0]


def test_round_timeout_apply_partial_steps_with_what_arrived(
    client: optserve.Client, live_server: str, pool: ThreadPoolExecutor
) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2), "v": torch.zeros(1)},
                          options={"lr": 1.0}, id=s,
                          sync={"workers": 3, "timeout_s": 0.5, "on_timeout": "apply_partial"})
    a = pool.submit(push, live_server, s, {"w": torch.ones(2), "v": torch.full((1,), 5.0)}, "a")
    b = pool.submit(push, live_server, s, {"w": torch.full((2,), 3.0)}, "b")  # a partial push
    ra, rb = a.result(timeout=10), b.result(timeout=10)
    assert ra.version == rb.version == 1
    assert ra.sync == rb.sync == {"workers": ["a", "b"], "expected": 3, "partial": True}
    assert ra.params is not None
    assert ra.params["w"].tolist() == [-2.0, -2.0]  # mean over the two senders
    assert ra.params["v"].tolist() == [-5.0]  # mean over the one sender


def test_k_changed_between_rounds_takes_effect(
    client: optserve.Client, live_server: str, pool: ThreadPoolExecutor
) -> None:
    s = sid()
    info = client.create_session("SGD", {"w": torch.zeros(1)}, options={"lr": 1.0}, id=s,
                                 sync={"workers": 2, "reduce": "sum", "timeout_s": 30})
    assert info.sync == {"workers": 2, "reduce": "sum", "timeout_s": 30.0,
                         "on_timeout": "fail", "pending": []}
    one = torch.ones(1)
    r1 = [pool.submit(push, live_server, s, {"w": one}, w) for w in "ab"]
    assert [f.result(timeout=10).version for f in r1] == [1, 1]
    # a third worker joins
    info = client.configure_session(s, sync={"workers": 3})
    assert info.sync is not None and info.sync["workers"] == 3
    assert info.sync["reduce"] == "sum" and info.sync["timeout_s"] == 30.0  # merged
    r2 = [pool.submit(push, live_server, s, {"w": one}, w) for w in "ab"]
    wait_pending(client, s, 2)
    time.sleep(0.2)
    assert client.get_params(s).version == 1  # two of three: still waiting
    c = client.step(s, {"w": one}, worker="c")
    assert c.version == 2 and c.sync is not None and c.sync["workers"] == ["a", "b", "c"]
    assert [f.result(timeout=10).version for f in r2] == [2, 2]
    # two leave while a round is open: lowering K completes it
    r3 = pool.submit(push, live_server, s, {"w": one}, "a")
    wait_pending(client, s, 1)
    client.configure_session(s, sync={"workers": 1})
    done = r3.result(timeout=10)
    assert done.version == 3 and done.sync == {"workers": ["a"], "expected": 1,
                                               "partial": False}
    assert done.params is not None and done.params["w"].tolist() == [-6.0]
    # and with sync off every push steps at once
    client.configure_session(s, sync=None)
    assert client.step(s, {"w": one}).version == 4
    with pytest.raises(optserve.ValidationError) as err:
        client.configure_session(s, sync={"workers": 0})
    assert err.value.code == "missing_field" or err.value.problem["field"] == "sync.workers"


# --------------------------------------------------------------------------- async pushes
@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_async_pushes_from_8_threads_lose_and_double_nothing(
    client: optserve.Client, engine_url: str
) -> None:
    s = sid()
    init = torch.linspace(-0.1, 0.1, 10)
    client.create_session("SGD", {"w": init}, options={"lr": 0.001}, id=s)
    local = init.clone()
    local_opt = torch.optim.SGD([local], lr=0.001)
    for _ in range(400):
        local.grad = torch.ones(10)
        local_opt.step()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with optserve.Client(engine_url, max_retries=0) as c:
                for _ in range(50):
                    c.step(s, {"w": torch.ones(10)}, return_params=False, worker=f"t{k}")
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    final = client.get_params(s)
    assert (final.version, final.step) == (400, 400)
    torch.testing.assert_close(final.params["w"], init - 0.4, rtol=0, atol=1e-5)
    assert torch.equal(final.params["w"], local)  # 400 identical updates, bitwise


def test_async_client_pushes_from_many_coroutines(live_server: str) -> None:
    s = sid()

    async def go() -> optserve.ParamsResult:
        async with optserve.AsyncClient(live_server, max_retries=0) as ac:
            await ac.create_session("SGD", {"w": torch.zeros(4)}, options={"lr": 0.5}, id=s)

            async def pusher() -> None:
                for _ in range(10):
                    await ac.step(s, {"w": torch.ones(4)}, return_params=False)
            await asyncio.gather(*(pusher() for _ in range(8)))
            # and a sync round with one coroutine per worker
            await ac.configure_session(s, sync={"workers": 4, "reduce": "sum"})
            results = await asyncio.gather(*(
                ac.step(s, {"w": torch.ones(4)}, worker=f"c{k}") for k in range(4)))
            assert {r.version for r in results} == {81}
            return await ac.get_params(s)
    final = asyncio.run(go())
    assert final.version == 81
    assert final.params["w"].tolist() == [-42.0] * 4  # 80 * 0.5 + 4 * 0.5


def test_stale_push_is_refused_and_changes_nothing(client: optserve.Client,
                                                   http: httpx.Client) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 0.1}, id=s,
                          max_staleness=2)
    for _ in range(3):
        client.step(s, {"w": torch.ones(2)})
    before = client.get_params(s)
    with pytest.raises(optserve.ConflictError) as err:
        client.step(s, {"w": torch.ones(2)}, base_version=0)
    p = err.value.problem
    assert (p["code"], p["current_version"], p["staleness"], p["max_staleness"]) == (
        "stale_gradient", 3, 3, 2)
    after = client.get_params(s)
    assert after.version == 3 and torch.equal(after.params["w"], before.params["w"])
    # If-Match carries the base version too; staleness 2 is within the bound
    body = {"grads": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 1.0]}}}
    r = http.post(f"/v1/sessions/{s}/step", json=body, headers={"If-Match": '"1"'})
    assert r.status_code == 200 and r.json()["staleness"] == 2 and r.json()["version"] == 4
    r = http.post(f"/v1/sessions/{s}/step", json=body, headers={"If-Match": '"1"'})
    assert r.status_code == 409 and r.json()["current_version"] == 4
    assert r.headers["content-type"] == "application/problem+json"
    r = http.post(f"/v1/sessions/{s}/step?base_version=9", json=body)
    assert r.status_code == 422 and r.json()["code"] == "invalid_base_version"
    # a bound can be set and lifted later
    client.configure_session(s, max_staleness=None)
    assert client.step(s, {"w": torch.ones(2)}, base_version=0).staleness == 4


def test_inverse_staleness_lr_equals_a_local_step_with_scaled_lr(
    client: optserve.Client,
) -> None:
    s = sid()
    torch.manual_seed(0)
    w0 = torch.randn(5)
    grads = [torch.randn(5) for _ in range(5)]
    client.create_session("SGD", {"w": w0}, options={"lr": 0.1, "momentum": 0.9}, id=s,
                          max_staleness=10, staleness_lr="inverse")
    local = w0.clone()
    opt = torch.optim.SGD([local], lr=0.1, momentum=0.9)

    def local_step(g: torch.Tensor, lr: float) -> None:
        opt.param_groups[0]["lr"] = lr
        local.grad = g
        opt.step()
        opt.param_groups[0]["lr"] = 0.1

    for g in grads[:3]:
        client.step(s, {"w": g}, base_version=client.get_params(s).version)  # staleness 0
        local_step(g, 0.1)
    r = client.step(s, {"w": grads[3]}, base_version=1)  # at version 3: staleness 2
    local_step(grads[3], 0.1 / (1 + 2))
    assert r.staleness == 2 and r.lr == [0.1] and r.params is not None
    torch.testing.assert_close(r.params["w"], local, rtol=0, atol=1e-6)
    assert client.get_session(s).param_groups[0].lr == 0.1  # lr unchanged afterwards
    r = client.step(s, {"w": grads[4]})
    local_step(grads[4], 0.1)
    assert r.params is not None
    torch.testing.assert_close(r.params["w"], local, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- versioned pulls
def test_if_none_match_gives_304(client: optserve.Client, http: httpx.Client) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 0.1}, id=s)
    client.step(s, {"w": torch.ones(2)})
    r = http.get(f"/v1/sessions/{s}/params", headers={"If-None-Match": '"1"'})
    assert r.status_code == 304 and r.content == b""
    assert (r.headers["etag"], r.headers["x-optserve-version"]) == ('"1"', "1")
    r = http.get(f"/v1/sessions/{s}/params", headers={"If-None-Match": 'W/"0", "7"'})
    assert r.status_code == 200 and r.json()["version"] == 1
    r = http.get(f"/v1/sessions/{s}/params?names=nope", headers={"If-None-Match": '"1"'})
    assert r.status_code == 422  # a bad request is not "not modified"
    r = http.get(f"/v1/sessions/{s}/params?names=w", headers={"If-None-Match": '"0"'})
    assert r.status_code == 200 and list(r.json()["params"]) == ["w"]


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_long_poll_waits_for_the_version_or_times_out(
    client: optserve.Client, http: httpx.Client, pool: ThreadPoolExecutor
) -> None:
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 0.1}, id=s)

    def poll(query: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, float]:
        t0 = time.monotonic()
        r = http.get(f"/v1/sessions/{s}/params?{query}", headers=headers)
        return r, time.monotonic() - t0

    waiting: Future[tuple[httpx.Response, float]] = pool.submit(poll, "min_version=2&wait_s=20")
    watching = pool.submit(poll, "wait_s=20", {"If-None-Match": '"0"'})  # anything newer
    time.sleep(0.3)
    assert not waiting.done() and not watching.done()
    client.step(s, {"w": torch.ones(2)})
    r, took = watching.result(timeout=10)
    assert r.status_code == 200 and r.json()["version"] == 1 and took < 5
    time.sleep(0.2)
    assert not waiting.done()
    client.step(s, {"w": torch.ones(2)})
    r, took = waiting.result(timeout=10)
    assert r.status_code == 200 and r.json()["version"] == 2 and took < 5
    torch.testing.assert_close(torch.tensor(r.json()["params"]["w"]["data"]),
                               torch.full((2,), -0.2))
    # time out: the current state after wait_s
    r, took = poll("min_version=50&wait_s=0.5")
    assert r.status_code == 200 and r.json()["version"] == 2 and 0.4 < took < 5
    # already there: no wait at all; the SDK's wrapper says the same
    r, took = poll("min_version=1&wait_s=30")
    assert r.json()["version"] == 2 and took < 2
    got = client.get_params(s, min_version=3, wait_s=0.3)
    assert got.version == 2
    assert http.get(f"/v1/sessions/{s}/params?wait_s=-1").status_code == 422
    for bad in ("nan", "inf"):  # (its message said "less than or equal to 1e9")
        r = http.get(f"/v1/sessions/{s}/params?wait_s={bad}")
        assert r.status_code == 422 and r.json()["field"] == "wait_s"
        assert "finite" in r.json()["detail"], r.text


# --------------------------------------------------------------------------- SDK worker mode
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.b(torch.tanh(self.a(x))))


def test_remote_optimizer_workers_and_pull_params(
    client: optserve.Client, live_server: str, pool: ThreadPoolExecutor
) -> None:
    torch.manual_seed(0)
    creator = Net()
    s = sid()
    client.create_session("SGD", dict(creator.named_parameters()), options={"lr": 0.05}, id=s,
                          sync={"workers": 2, "timeout_s": 30})
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 4, generator=g) for _ in range(2)]
    ys = [torch.randn(8, 2, generator=g) for _ in range(2)]

    def run_worker(k: int) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(100 + k)  # a different local init: joining pulls the session's
        model = Net()
        with optserve.Client(live_server, max_retries=0) as c:
            opt = optserve.RemoteOptimizer(model.named_parameters(), client=c, session_id=s,
                                           worker=f"w{k}")
            assert opt.param_groups[0]["lr"] == 0.05 and opt.version == 0
            for _ in range(3):
                opt.zero_grad()
                F.mse_loss(model(xs[k]), ys[k]).backward()
                opt.step()
            return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.version

    a, b = pool.submit(run_worker, 0), pool.submit(run_worker, 1)
    (pa, va), (pb, vb) = a.result(timeout=30), b.result(timeout=30)
    assert va == vb == 3
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    # the same three rounds in one process: mean of the two workers' gradients
    ref = Net()
    ref.load_state_dict(creator.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        grads = []
        for k in range(2):
            ref.zero_grad()
            F.mse_loss(ref(xs[k]), ys[k]).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])  # type: ignore[union-attr]
        for p, g0, g1 in zip(ref.parameters(), *grads, strict=True):
            p.grad = (g0 + g1) / 2
        opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(pa[n], p.detach(), rtol=0, atol=1e-6)
    # a late joiner copies the current parameters into its module
    late = Net()
    got = optserve.pull_params(client, s, into=late)
    assert got.version == 3
    for n, p in late.named_parameters():
        assert torch.equal(p.detach(), pa[n])
    part = {"a.bias": torch.zeros(8)}
    optserve.pull_params(client, s, into=part, names=["a.bias"])
    assert torch.equal(part["a.bias"], pa["a.bias"])
    with pytest.raises(ValueError, match="no local tensor"):
        optserve.pull_params(client, s, into={"a.bias": torch.zeros(8)})
    with pytest.raises(ValueError, match="session_id"):
        optserve.RemoteOptimizer(late.parameters(), client=client, worker="x")


def test_pull_params_by_position(client: optserve.Client) -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    s = sid()
    client.create_session("SGD", list(model.parameters()), options={"lr": 0.1}, id=s)
    other = nn.Linear(3, 2)
    optserve.pull_params(client, s, into=other)  # names "0", "1": by position
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)


# --------------------------------------------------------------------------- restart
def test_sync_session_survives_a_restart(pool: ThreadPoolExecutor) -> None:
    settings = _test_settings(durability="step")
    server = LiveServer(settings)
    url = server.start()
    s = "ps-restart"
    try:
        with optserve.Client(url, max_retries=0) as c:
            c.create_session("Adam", {"w": torch.linspace(0, 1, 6), "v": torch.ones(2)},
                             options={"lr": 0.1}, id=s,
                             sync={"workers": 2, "timeout_s": 30}, max_staleness=5,
                             staleness_lr="inverse")
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                fs = [pool.submit(push, url, s, {"w": torch.randn(6, generator=g)}, w)
                      for w in "ab"]
                [f.result(timeout=10) for f in fs]
            c.configure_session(s, sync={"workers": 1, "reduce": "sum"})
            c.step(s, {"w": torch.ones(6), "v": torch.ones(2)}, worker="a")
            c.configure_session(s, sync=None)
            c.step(s, {"v": torch.ones(2)}, base_version=2)  # scaled by 1/(1+2)
            before, info = c.get_params(s), c.get_session(s)
    finally:
        server.stop()
    again = LiveServer(settings)
    url = again.start()
    try:
        with optserve.Client(url, max_retries=0) as c:
            after, info2 = c.get_params(s), c.get_session(s)
            assert (after.version, after.step) == (before.version, before.step) == (5, 5)
            for n in before.params:
                assert torch.equal(after.params[n], before.params[n]), n
            assert (info2.sync, info2.max_staleness, info2.staleness_lr) == (
                info.sync, 5, "inverse")
            c.configure_session(s, sync={"workers": 1})
            assert c.step(s, {"v": torch.ones(2)}, worker="z").version == 6
    finally:
        again.stop()



def json_push(url: str, session: str, grads: dict[str, torch.Tensor], worker: str,
              b64: bool) -> dict[str, torch.Tensor]:
    """A worker's push over plain HTTP with JSON both ways; the answer's parameters."""
    import base64

    body = {"grads": {n: {"dtype": "float32", "shape": list(t.shape),
                          "b64": base64.b64encode(t.numpy().tobytes()).decode()}
                      for n, t in grads.items()}}
    r = httpx.post(f"{url}/v1/sessions/{session}/step" + ("?encoding=b64" if b64 else ""),
                   json=body, headers={"X-Optserve-Worker": worker}, timeout=60)
    assert r.status_code == 200, r.text
    out = {}
    for n, t in r.json()["params"].items():
        assert t["dtype"] == "float32"
        flat = (torch.frombuffer(bytearray(base64.b64decode(t["b64"])), dtype=torch.float32)
                if b64 else torch.tensor(t["data"], dtype=torch.float32))
        out[n] = flat.reshape(t["shape"])
    return out


@pytest.mark.parametrize("answer", ["json", "json-b64", "bfloat16"])
def test_a_rounds_parameters_are_encoded_once_for_all_its_workers(
        live_server: str, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch,
        answer: str) -> None:
    """Every worker of a sync round receives the same parameters: their JSON (or their
    narrowing) is made once per round, not once per worker, and every worker's answer equals
    the torch step on the mean gradient (in the form it asked for)."""
    from app.api import bodies
    from app.engine import host as host_module

    made = {"json": 0, "narrow": 0}
    real_encode, real_pack = bodies.wire_sparse.encode_json, host_module.pack

    def counting_encode(t: torch.Tensor, b64: bool) -> Any:
        made["json"] += 1
        return real_encode(t, b64=b64)

    def counting_pack(tensors: Any, dtype: Any = None) -> Any:
        made["narrow"] += 1
        return real_pack(tensors, dtype)

    monkeypatch.setattr(bodies.wire_sparse, "encode_json", counting_encode)
    monkeypatch.setattr(host_module, "pack", counting_pack)
    params = init_params()
    s = sid()
    workers = ["w0", "w1", "w2"]
    ref = {n: p.clone() for n, p in params.items()}
    ref_opt = torch.optim.Adam(list(ref.values()), lr=0.01)
    with optserve.Client(live_server, max_retries=0, transport="http") as c:
        c.create_session("Adam", params, options={"lr": 0.01}, id=s,
                         sync={"workers": 3, "reduce": "mean", "timeout_s": 30})
    for step in range(3):
        shards = [{n: torch.randn(p.shape, generator=torch.Generator().manual_seed(
            100 * step + k)) for n, p in params.items()} for k in range(3)]
        made.update(json=0, narrow=0)
        if answer == "bfloat16":
            futures = [pool.submit(push, live_server, s, g, w, params_dtype="bfloat16")
                       for w, g in zip(workers, shards, strict=True)]
            answers = [f.result(timeout=30).params for f in futures]
        else:
            futures = [pool.submit(json_push, live_server, s, g, w, answer == "json-b64")
                       for w, g in zip(workers, shards, strict=True)]
            answers = [f.result(timeout=30) for f in futures]
        for n, t in ref.items():
            t.grad = (shards[0][n] + shards[1][n] + shards[2][n]) / 3
        ref_opt.step()
        for got in answers:
            assert got is not None
            for n, t in ref.items():
                want = t.detach().bfloat16() if answer == "bfloat16" else t.detach()
                assert got[n].dtype == want.dtype and torch.equal(got[n], want), n
        if answer == "bfloat16":
            assert made["narrow"] == 1, made  # one narrowed pack for the three workers
        else:
            assert made["json"] == len(params), made  # each tensor's JSON made once


def test_a_rounds_narrowed_answer_narrows_only_wider_parameters(live_server: str) -> None:
    """``params_dtype`` in a sync round answers as outside rounds: a float32 parameter comes
    back bfloat16, a float16 one stays float16 (it was converted to bfloat16, losing bits)."""
    params = {"w": torch.randn(5, generator=torch.Generator().manual_seed(1)),
              "h": torch.randn(3, generator=torch.Generator().manual_seed(2)).half()}
    grads = {"w": torch.randn(5, generator=torch.Generator().manual_seed(3)),
             "h": torch.randn(3, generator=torch.Generator().manual_seed(4)).half()}
    s = sid()
    with optserve.Client(live_server, max_retries=0, transport="http") as c:
        c.create_session("SGD", params, options={"lr": 0.5}, id=s,
                         sync={"workers": 1, "reduce": "sum", "timeout_s": 30})
        out = c.step(s, grads, worker="w0", params_dtype="bfloat16")
    ref = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.5)
    for n, p in ref.items():
        p.grad = grads[n]
    opt.step()
    assert out.params is not None
    assert out.params["w"].dtype == torch.bfloat16
    assert torch.equal(out.params["w"], ref["w"].detach().bfloat16())
    assert out.params["h"].dtype == torch.float16
    assert torch.equal(out.params["h"], ref["h"].detach())


def test_a_retried_sync_push_is_answered_in_the_dtype_it_asked_for(
        live_server: str, pool: ThreadPoolExecutor) -> None:
    """A keyed push with ``params_dtype`` retried after its round stepped gets the parameters
    narrowed as its first answer had them (bfloat16), as an async step's retry does; the
    replay sent them float32."""
    params = {"w": torch.randn(4, generator=torch.Generator().manual_seed(5))}
    grads = [{"w": torch.randn(4, generator=torch.Generator().manual_seed(6 + k))}
             for k in range(2)]
    s = sid()
    with optserve.Client(live_server, max_retries=0, transport="http") as c:
        c.create_session("SGD", params, options={"lr": 0.5}, id=s,
                         sync={"workers": 2, "reduce": "mean", "timeout_s": 30})
    futures = [pool.submit(push, live_server, s, g, w, params_dtype="bfloat16",
                           idempotency_key=f"key-{w}")
               for w, g in zip(["a", "b"], grads, strict=True)]
    first = [f.result(timeout=30) for f in futures]
    ref = params["w"].clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.5)
    ref.grad = (grads[0]["w"].clone().add_(grads[1]["w"])).div_(2)
    opt.step()
    want = ref.detach().bfloat16()
    for w, g, answer in zip(["a", "b"], grads, first, strict=True):
        assert answer.params is not None and torch.equal(answer.params["w"], want)
        again = push(live_server, s, g, w, params_dtype="bfloat16", idempotency_key=f"key-{w}")
        assert again.replayed and again.version == answer.version == 1
        assert again.params is not None
        assert again.params["w"].dtype == torch.bfloat16
        assert torch.equal(again.params["w"], want)


def test_a_round_timeout_names_the_timeout_the_round_ran_under(
        client: optserve.Client, live_server: str, pool: ThreadPoolExecutor) -> None:
    """A round's timer keeps the timeout it started with; a PATCH of ``timeout_s`` while it
    runs is the next round's. The 409 ``round_timeout`` says the timeout that ran out (0.5 s),
    not the new one (it said "timed out after 50 s", ``timeout_s`` 50, after half a second);
    the session is unchanged."""
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(2)}, options={"lr": 1.0}, id=s,
                          sync={"workers": 2, "timeout_s": 0.5, "on_timeout": "fail"})
    first = pool.submit(push, live_server, s, {"w": torch.ones(2)}, "a")
    wait_pending(client, s, 1)
    client.configure_session(s, sync={"timeout_s": 50})
    with pytest.raises(optserve.ConflictError) as err:
        first.result(timeout=10)
    assert err.value.code == "round_timeout"
    assert err.value.problem["field"] == "sync.timeout_s"
    assert err.value.problem["timeout_s"] == 0.5
    assert "after 0.5 s" in (err.value.problem.get("detail") or "")
    after = client.get_params(s)
    assert after.version == 0 and after.params["w"].tolist() == [0.0, 0.0]
    assert client.get_session(s).sync["timeout_s"] == 50  # type: ignore[index]


def test_a_push_whose_scalar_names_overflow_the_session_is_its_own_422(
        client: optserve.Client, live_server: str, pool: ThreadPoolExecutor) -> None:
    """A session keeps at most 128 scalar names. In a sync round, a push bringing one name too
    many (with the names the round has gathered: "x" fits, "y" after it does not) is that
    worker's own 422 ``invalid_scalars``; the round goes on and steps with the other pushes,
    torch's step on their mean. It was taken into the round, whose step then failed with the
    same 422 for every worker, nothing applied."""
    s = sid()
    client.create_session("SGD", {"w": torch.zeros(3)}, options={"lr": 0.5}, id=s,
                          sync={"workers": 1, "timeout_s": 30})
    names = [f"m{i}" for i in range(127)]
    for start in range(0, len(names), 16):
        client.step(s, {"w": torch.zeros(3)}, worker="w0",
                    scalars={n: 1.0 for n in names[start:start + 16]})
    client.configure_session(s, sync={"workers": 2})
    p = client.get_params(s).params["w"]
    g = [torch.randn(3, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    first = pool.submit(push, live_server, s, {"w": g[0]}, "a", scalars={"x": 1.0})
    wait_pending(client, s, 1)
    for worker, scalars in (("b", {"y": 2.0}), ("a2", {"m0": 1.0, "z": 1.0})):
        with pytest.raises(optserve.ValidationError) as err:
            push(live_server, s, {"w": g[1]}, worker, scalars=scalars)
        assert err.value.code == "invalid_scalars"
        assert err.value.problem["field"] in ("scalars.y", "scalars.z")
    assert client.get_session(s).sync["pending"] == ["a"]  # type: ignore[index]
    second = push(live_server, s, {"w": g[2]}, "c", scalars={"m1": 3.0})
    answers = [first.result(timeout=30), second]
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.5)
    ref.grad = g[0].clone().add_(g[2]).div_(2)
    opt.step()
    for out in answers:
        assert out.version == 9 and out.params is not None
        assert out.sync == {"workers": ["a", "c"], "expected": 2, "partial": False}
        assert torch.equal(out.params["w"], ref.detach())
