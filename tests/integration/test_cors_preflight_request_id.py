"""A CORS preflight's answer carries ``X-Request-Id`` as every answer does (docs/protocol.md,
"Headers": "Every response, errors included, carries X-Request-Id"), and a refused preflight's
problem+json its ``request_id`` (README, "Observing it"): the CORS middleware answers
preflights itself, and sat outside the middleware that gives each request its id."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration
ORIGIN = "https://page.example"


@pytest.fixture(scope="module")
def cors_url() -> Iterator[str]:
    with LiveServer(_test_settings(cors_origins=ORIGIN)).serving() as url:
        yield url


@pytest.mark.parametrize("origin,method,status", [
    (ORIGIN, "POST", 200),                   # allowed
    ("https://other.example", "POST", 400),  # refused: bad_request problem+json
])
def test_a_preflight_answer_carries_the_request_id(cors_url: str, origin: str, method: str,
                                                    status: int) -> None:
    preflight = {"Origin": origin, "Access-Control-Request-Method": method,
                 "Access-Control-Request-Headers": "content-type, idempotency-key"}
    with httpx.Client(base_url=cors_url) as client:
        mine = client.options("/v1/sessions/s/step", headers={**preflight,
                                                               "X-Request-Id": "page-42.a"})
        assert mine.status_code == status
        assert mine.headers["x-request-id"] == "page-42.a"
        other = client.options("/v1/sessions/s/step", headers=preflight)
        assert len(other.headers["x-request-id"]) == 32  # one of the server's own
        if status == 400:
            problem = mine.json()
            assert mine.headers["content-type"].startswith("application/problem+json")
            assert (problem["code"], problem["field"]) == ("bad_request", "Origin")
            assert problem["request_id"] == "page-42.a"
            assert other.json()["request_id"] == other.headers["x-request-id"]
        else:
            assert mine.headers["access-control-allow-origin"] == ORIGIN


def test_an_answer_to_an_allowed_origin_still_carries_both(cors_url: str) -> None:
    """The id and the CORS headers together on an ordinary answer (a 401-free server: the
    list of sessions)."""
    with httpx.Client(base_url=cors_url) as client:
        r = client.get("/v1/sessions", headers={"Origin": ORIGIN, "X-Request-Id": "list-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "list-1"
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
