"""Retries: only when no response came back, with capped exponential backoff and jitter."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import httpx
import pytest
import torch

import optserve
from optserve import _base_client, _constants


class Script:
    """A MockTransport handler that raises or answers per call, and counts calls."""

    def __init__(self, *outcomes: Exception | Callable[[], httpx.Response]) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome = self.outcomes[min(len(self.requests), len(self.outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(_base_client, "_sleep", recorded.append)

    async def fake_async_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(_base_client, "_async_sleep", fake_async_sleep)
    return recorded


def client(script: Script, max_retries: int = 2) -> optserve.Client:
    return optserve.Client("http://test", max_retries=max_retries,
                           http_client=httpx.Client(transport=httpx.MockTransport(script)))


def OK_HEALTH() -> httpx.Response:
    return httpx.Response(200, json={"status": "ok"})


def STEP_OK() -> httpx.Response:
    return httpx.Response(200, json={"version": 1, "step": 1, "lr": [0.1], "skipped": False},
                          headers={"X-Optserve-Version": "1", "X-Optserve-Step": "1"})


def test_connection_errors_are_retried_then_raised(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"))
    with client(script, max_retries=2) as c, pytest.raises(optserve.APIConnectionError) as info:
        c.health()
    assert not isinstance(info.value, optserve.APITimeoutError)
    assert len(script.requests) == 3
    assert len(sleeps) == 2
    assert 0.5 * 0.75 <= sleeps[0] <= 0.5
    assert 1.0 * 0.75 <= sleeps[1] <= 1.0
    assert info.value.request.url == "http://test/healthz"


def test_a_connection_error_then_success(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"), OK_HEALTH)
    with client(script) as c:
        assert c.health() == {"status": "ok"}
    assert len(script.requests) == 2
    assert len(sleeps) == 1


def test_retries_leave_the_processs_random_state_alone(sleeps: list[float]) -> None:
    """The backoff's jitter draws from a generator of the SDK's own: a retry does not move
    Python's global ``random`` stream, which seeded training code (``random.shuffle`` of its
    data) draws from, so a run with a retried request trains as one without."""
    random.seed(1234)
    want = [random.random() for _ in range(3)]
    random.seed(1234)
    script = Script(httpx.ConnectError("refused"), httpx.ConnectError("refused"), OK_HEALTH)
    with client(script) as c:
        assert c.health() == {"status": "ok"}
    assert len(sleeps) == 2
    assert [random.random() for _ in range(3)] == want


@pytest.mark.parametrize("status", [400, 404, 409, 422, 429, 500, 507])
def test_http_errors_are_never_retried(status: int, sleeps: list[float]) -> None:
    script = Script(lambda: httpx.Response(status, json={"detail": "no", "code": "x"}))
    with client(script) as c, pytest.raises(optserve.APIStatusError) as info:
        c.get_session("s")
    assert info.value.status_code == status
    assert len(script.requests) == 1
    assert sleeps == []


def test_zero_retries(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"))
    with client(script, max_retries=0) as c, pytest.raises(optserve.APIConnectionError):
        c.health()
    assert len(script.requests) == 1
    assert sleeps == []


def test_read_timeout_retried_for_idempotent_requests(sleeps: list[float]) -> None:
    script = Script(httpx.ReadTimeout("slow"), OK_HEALTH)
    with client(script) as c:
        assert c.health() == {"status": "ok"}
    assert len(script.requests) == 2


def test_a_step_that_may_have_reached_the_server_is_resent_with_its_key(
        sleeps: list[float]) -> None:
    """A read timeout on POST .../step may mean the step was applied: the retry carries the
    same Idempotency-Key, so the server answers it instead of stepping twice."""
    script = Script(httpx.ReadTimeout("slow"), STEP_OK)
    with client(script) as c:
        result = c.step("s", {"w": [1.0]}, return_params=False)
    assert (result.version, result.step) == (1, 1)
    assert len(script.requests) == 2
    keys = [r.headers["idempotency-key"] for r in script.requests]
    assert keys[0] == keys[1] and len(keys[0]) == 32
    assert script.requests[0].content == script.requests[1].content
    script = Script(httpx.RemoteProtocolError("server disconnected"), STEP_OK)
    with client(script) as c:
        c.push_grads("s", {"w": [1.0]})
    assert len(script.requests) == 2
    assert script.requests[0].headers["idempotency-key"] == \
        script.requests[1].headers["idempotency-key"]


def test_every_mutation_gets_its_own_key_and_reads_none(sleeps: list[float]) -> None:
    script = Script(STEP_OK, STEP_OK, OK_HEALTH)
    with client(script) as c:
        c.step("s", {"w": [1.0]}, return_params=False)
        c.step("s", {"w": [1.0]}, return_params=False)
        c.health()
    first, second, read = script.requests
    assert first.headers["idempotency-key"] != second.headers["idempotency-key"]
    assert "idempotency-key" not in read.headers


def test_503_is_retried_after_its_retry_after(sleeps: list[float]) -> None:
    """503: the server applied nothing (a storage error, a host restarting): retried, the
    mutation with the same key, after Retry-After (capped)."""
    def unavailable() -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "3"},
                              json={"detail": "later", "code": "storage_error"})
    script = Script(unavailable, STEP_OK)
    with client(script) as c:
        c.step("s", {"w": [1.0]}, return_params=False)
    assert len(script.requests) == 2 and sleeps[0] >= 3.0
    assert script.requests[0].headers["idempotency-key"] == \
        script.requests[1].headers["idempotency-key"]
    script = Script(*[unavailable] * 5)
    with client(script) as c, pytest.raises(optserve.APIStatusError) as info:
        c.get_session("s")
    assert info.value.status_code == 503 and len(script.requests) == 3  # max_retries=2


def test_a_retry_after_that_is_not_an_ascii_number_is_the_backoff(sleeps: list[float]
                                                                   ) -> None:
    """``Retry-After: ²`` (from a proxy, say) is a digit to ``str.isdigit``, not to
    ``float``: the retry waits the backoff instead of raising ValueError."""
    def unavailable() -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": b"\xb2"},  # latin-1 "²"
                              json={"detail": "later", "code": "storage_error"})
    script = Script(unavailable, STEP_OK)
    with client(script) as c:
        c.step("s", {"w": [1.0]}, return_params=False)
    assert len(script.requests) == 2 and 0 < sleeps[0] <= _constants.MAX_RETRY_DELAY


def test_a_step_that_never_left_is_retried(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectTimeout("connect"), httpx.ConnectError("refused"), STEP_OK)
    with client(script) as c:
        result = c.step("s", {"w": [1.0]}, return_params=False)
    assert (result.version, result.step, result.lr) == (1, 1, [0.1])
    assert len(script.requests) == 3
    # the same body went out every time
    assert script.requests[0].content == script.requests[2].content


def test_timeout_error_type(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectTimeout("connect"))
    with client(script, max_retries=1) as c, pytest.raises(optserve.APITimeoutError):
        c.health()
    assert len(script.requests) == 2


def test_backoff_is_capped_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    for attempt in range(12):
        delay = _base_client.BaseClient._retry_delay(attempt)
        full = min(_constants.INITIAL_RETRY_DELAY * 2**attempt, _constants.MAX_RETRY_DELAY)
        assert full * (1 - _constants.RETRY_JITTER) <= delay <= full
    monkeypatch.setattr(_base_client, "_jitter", lambda: 0.0)
    assert _base_client.BaseClient._retry_delay(30) == _constants.MAX_RETRY_DELAY


def test_async_client_retries_connection_errors(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ConnectError("refused"), OK_HEALTH)

    async def main() -> None:
        async with optserve.AsyncClient(
            "http://test", http_client=httpx.AsyncClient(transport=httpx.MockTransport(script))
        ) as c:
            assert await c.health() == {"status": "ok"}

    asyncio.run(main())
    assert len(script.requests) == 3
    assert len(sleeps) == 2


def test_async_client_does_not_retry_http_errors(sleeps: list[float]) -> None:
    script = Script(lambda: httpx.Response(422, json={"detail": "bad", "code": "invalid"}))

    async def main() -> None:
        async with optserve.AsyncClient(
            "http://test", http_client=httpx.AsyncClient(transport=httpx.MockTransport(script))
        ) as c:
            with pytest.raises(optserve.ValidationError):
                await c.zero_grad("s")

    asyncio.run(main())
    assert len(script.requests) == 1
    assert sleeps == []


def test_a_large_step_is_resent_whole_with_its_key(sleeps: list[float]) -> None:
    """A body sent in pieces (above 256 KB) is read afresh for each attempt: the retry sends
    every byte again, under the same key."""
    grad = torch.arange(200_000, dtype=torch.float32)
    script = Script(httpx.ReadTimeout("slow"), STEP_OK)
    with client(script) as c:
        c.step("s", {"w": grad}, return_params=False)
    assert len(script.requests) == 2
    first, second = script.requests
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.content == second.content
    assert len(first.content) == int(first.headers["content-length"]) > 800_000


def unavailable_for(seconds: str) -> Callable[[], httpx.Response]:
    def answer() -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": seconds},
                              json={"detail": "later", "code": "session_damaged"})
    return answer


def test_a_retry_after_past_the_backoff_cap_is_honoured(sleeps: list[float]) -> None:
    """The server asks 30 s on ``session_damaged`` / ``no_capacity``: the retry waits the 30 s
    (up to ``max_retry_after``, default 60 s), not the backoff's 8 s cap, which would only
    get the same 503 again."""
    script = Script(unavailable_for("30"), STEP_OK)
    with client(script) as c:
        c.step("s", {"w": [1.0]}, return_params=False)
    assert len(script.requests) == 2 and sleeps == [30.0]
    assert _constants.DEFAULT_MAX_RETRY_AFTER == 60.0
    script = Script(unavailable_for("60"), OK_HEALTH)
    with client(script) as c:
        c.health()
    assert sleeps[-1] == 60.0


def test_a_retry_after_past_max_retry_after_is_raised_at_once(sleeps: list[float]) -> None:
    """Past ``max_retry_after`` the 503 is raised without a retry (the server said an earlier
    one would fail); the caller reads the wait from the error."""
    script = Script(unavailable_for("61"), OK_HEALTH)
    with client(script) as c, pytest.raises(optserve.InternalServerError) as info:
        c.health()
    assert len(script.requests) == 1 and sleeps == []
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "61"
    script = Script(unavailable_for("30"), OK_HEALTH)
    with optserve.Client("http://test", max_retry_after=10.0, http_client=httpx.Client(
            transport=httpx.MockTransport(script))) as c, pytest.raises(optserve.APIStatusError):
        c.health()
    assert len(script.requests) == 1 and sleeps == []
    script = Script(unavailable_for("10"), OK_HEALTH)
    with optserve.Client("http://test", max_retry_after=10.0, http_client=httpx.Client(
            transport=httpx.MockTransport(script))) as c:
        c.health()
    assert sleeps == [10.0]
    with pytest.raises(ValueError, match="max_retry_after"):
        optserve.Client("http://test", max_retry_after=-1.0)


def test_async_client_honours_retry_after_up_to_its_maximum(sleeps: list[float]) -> None:
    script = Script(unavailable_for("30"), OK_HEALTH, unavailable_for("30"))

    async def main() -> None:
        async with optserve.AsyncClient(
            "http://test", http_client=httpx.AsyncClient(transport=httpx.MockTransport(script))
        ) as c:
            assert await c.health() == {"status": "ok"}
        async with optserve.AsyncClient(
            "http://test", max_retry_after=20.0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(script))
        ) as c:
            with pytest.raises(optserve.APIStatusError):
                await c.health()

    asyncio.run(main())
    assert len(script.requests) == 3 and sleeps == [30.0]


def test_a_session_no_retry_restores_is_raised_at_once(sleeps: list[float]) -> None:
    """``session_damaged`` without ``Retry-After`` (a session with nothing on disk to restore
    it from: delete it) is raised without a retry; with one (restored from its store once its
    disk works) it is retried after the wait asked, like any 503."""
    gone = Script(lambda: httpx.Response(503, json={"detail": "delete it",
                                                    "code": "session_damaged"}), STEP_OK)
    with client(gone) as c, pytest.raises(optserve.APIStatusError) as info:
        c.step("s", {"w": [1.0]}, return_params=False)
    assert len(gone.requests) == 1 and sleeps == []
    assert info.value.status_code == 503 and info.value.problem["code"] == "session_damaged"
    other = Script(lambda: httpx.Response(503, json={"detail": "later", "code": "unavailable"}),
                   STEP_OK)
    with client(other) as c:
        c.step("s", {"w": [1.0]}, return_params=False)
    assert len(other.requests) == 2 and len(sleeps) == 1
    healing = Script(unavailable_for("3"), STEP_OK)
    with client(healing) as c:
        c.step("s", {"w": [1.0]}, return_params=False)
    assert len(healing.requests) == 2 and sleeps[-1] == 3.0
