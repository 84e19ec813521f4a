"""The default retry budget: with ``max_retries`` left at None a failed call is retried while
less than ``retry_budget`` seconds (default 60) have passed since its first failure, its waits
growing from 0.5 s and capped at 4 s (a restart of a few seconds is waited out); an int
``max_retries`` counts retries as before, with no bound in time unless ``retry_budget`` is
given too. The clock and the waits are the SDK's own hooks, advanced by the waits."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import optserve
from optserve import _base_client, _constants


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_base_client, "_now", lambda: c.now)
    monkeypatch.setattr(_base_client, "_sleep", c.sleep)

    async def async_sleep(seconds: float) -> None:
        c.sleep(seconds)

    monkeypatch.setattr(_base_client, "_async_sleep", async_sleep)
    return c


def refusing(requests: list[httpx.Request], clock: Clock,
             until: float = float("inf")) -> httpx.MockTransport:
    """Connections refused until ``until`` seconds have passed on the clock, then answered."""
    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if clock.now >= 1000.0 + until:
            return httpx.Response(200, json={"status": "ok"})
        raise httpx.ConnectError("refused", request=request)
    return httpx.MockTransport(handle)


def test_the_default_is_a_60_s_budget() -> None:
    c = optserve.Client("http://test", transport="http")
    assert c.max_retries is None and c.retry_budget == _constants.DEFAULT_RETRY_BUDGET == 60.0
    assert optserve.Client("http://test", max_retries=3).retry_budget is None
    assert optserve.Client("http://test", max_retries=3, retry_budget=5).retry_budget == 5.0


def test_a_default_client_retries_until_its_budget_is_spent(clock: Clock) -> None:
    requests: list[httpx.Request] = []
    http = httpx.Client(transport=refusing(requests, clock))
    with optserve.Client("http://test", http_client=http) as c, \
            pytest.raises(optserve.APIConnectionError):
        c.health()
    # every retry started before 60 s had passed since the first failure, the next did not
    assert sum(clock.waits[:-1]) < 60.0 <= sum(clock.waits)
    assert len(requests) == len(clock.waits) + 1 > 3
    assert max(clock.waits) <= _constants.MAX_RETRY_DELAY == 4.0


def test_a_default_client_waits_out_a_15_s_restart(clock: Clock) -> None:
    requests: list[httpx.Request] = []
    http = httpx.Client(transport=refusing(requests, clock, until=15.0))
    with optserve.Client("http://test", http_client=http) as c:
        assert c.health() == {"status": "ok"}
    assert 15.0 <= sum(clock.waits) < 15.0 + _constants.MAX_RETRY_DELAY


def test_an_int_max_retries_counts_without_a_time_bound(clock: Clock) -> None:
    requests: list[httpx.Request] = []
    http = httpx.Client(transport=refusing(requests, clock))
    with optserve.Client("http://test", max_retries=30, http_client=http) as c, \
            pytest.raises(optserve.APIConnectionError):
        c.health()
    assert len(requests) == 31 and sum(clock.waits) > 60.0


def test_both_bounds_when_both_are_given(clock: Clock) -> None:
    requests: list[httpx.Request] = []
    http = httpx.Client(transport=refusing(requests, clock))
    with optserve.Client("http://test", max_retries=30, retry_budget=5,
                         http_client=http) as c, pytest.raises(optserve.APIConnectionError):
        c.health()
    assert sum(clock.waits[:-1]) < 5.0 <= sum(clock.waits) and len(requests) < 31


def test_the_async_client_has_the_same_budget(clock: Clock) -> None:
    requests: list[httpx.Request] = []

    async def run() -> None:
        http = httpx.AsyncClient(transport=refusing(requests, clock, until=40.0))
        async with optserve.AsyncClient("http://test", http_client=http) as c:
            assert await c.health() == {"status": "ok"}

    asyncio.run(run())
    assert 40.0 <= sum(clock.waits) < 40.0 + _constants.MAX_RETRY_DELAY


@pytest.mark.parametrize("budget", [-1, float("inf"), float("nan"), True, "60"])
def test_a_bad_retry_budget_is_refused(budget: object) -> None:
    with pytest.raises(ValueError, match="retry_budget"):
        optserve.Client("http://test", retry_budget=budget)  # type: ignore[arg-type]
