"""problem+json (and other error bodies) to the SDK's typed exceptions."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import optserve
from optserve import _exceptions


def client_answering(status: int, body: Any = None, *, content: bytes | None = None,
                     headers: dict[str, str] | None = None) -> optserve.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content, headers=headers)
        return httpx.Response(status, json=body,
                              headers={"Content-Type": "application/problem+json",
                                       **(headers or {})})
    return optserve.Client("http://test", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def problem(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"urn:optserve:problem:{code}", "title": code.replace("_", " "),
            "status": status, "detail": detail, "code": code, **extra}


@pytest.mark.parametrize(
    "status, cls",
    [
        (400, optserve.BadRequestError),
        (401, optserve.AuthenticationError),
        (403, optserve.PermissionDeniedError),
        (404, optserve.NotFoundError),
        (409, optserve.ConflictError),
        (413, optserve.PayloadTooLargeError),
        (422, optserve.ValidationError),
        (429, optserve.RateLimitError),
        (500, optserve.InternalServerError),
        (503, optserve.InternalServerError),
        (405, optserve.APIStatusError),
        (406, optserve.APIStatusError),
        (415, optserve.APIStatusError),
    ],
)
def test_status_maps_to_exception_class(status: int, cls: type[optserve.APIStatusError]) -> None:
    body = problem(status, "some_code", "what went wrong", field="grads.w")
    with client_answering(status, body, headers={"X-Request-Id": "req-42"}) as client:
        with pytest.raises(cls) as info:
            client.get_session("s1")
    err = info.value
    assert type(err) is cls
    assert isinstance(err, optserve.APIStatusError) and isinstance(err, optserve.OptserveError)
    assert err.status_code == status
    assert err.code == "some_code"
    assert err.detail == "what went wrong"
    assert err.field == "grads.w"
    assert err.problem == body
    assert err.request_id == "req-42"
    assert err.response.status_code == status
    assert str(err) == f"{status} what went wrong (field: grads.w)"


def test_validation_error_carries_extra_problem_members() -> None:
    body = problem(422, "nonfinite_gradient", "non-finite gradient values in 'w'",
                   field="grads.w", names=["w"])
    with client_answering(422, body) as client, pytest.raises(optserve.ValidationError) as info:
        client.step("s", {"w": [1.0]})
    assert info.value.problem["names"] == ["w"]
    assert info.value.code == "nonfinite_gradient"
    assert info.value.request_id is None


def test_non_json_error_body() -> None:
    with client_answering(502, content=b"Bad Gateway from proxy",
                          headers={"Content-Type": "text/plain"}) as client:
        with pytest.raises(optserve.InternalServerError) as info:
            client.health()
    err = info.value
    assert err.status_code == 502
    assert err.code is None and err.detail is None and err.field is None
    assert err.problem == {}
    assert "Bad Gateway from proxy" in str(err)


def test_error_without_detail_uses_title() -> None:
    with client_answering(404, {"title": "Not Found", "status": 404}) as client:
        with pytest.raises(optserve.NotFoundError, match="404 Not Found"):
            client.get_session("x")


def test_undecodable_success_body_is_a_response_validation_error() -> None:
    with client_answering(200, content=b"not json",
                          headers={"Content-Type": "application/json"}) as client:
        with pytest.raises(optserve.APIResponseValidationError) as info:
            client.get_session("x")
    assert info.value.response.status_code == 200
    with client_answering(200, content=b"\x00\x01",
                          headers={"Content-Type": "application/octet-stream"}) as client:
        with pytest.raises(optserve.APIResponseValidationError, match="safetensors"):
            client.step("x", {})


def test_async_client_raises_the_same_types() -> None:
    body = problem(409, "session_exists", "a session with id 'a' already exists", field="id")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json=body)

    async def main() -> None:
        transport = httpx.MockTransport(handler)
        async with optserve.AsyncClient(
            "http://test", http_client=httpx.AsyncClient(transport=transport)
        ) as client:
            with pytest.raises(optserve.ConflictError) as info:
                await client.create_session("SGD", {"x": [1.0]}, id="a")
        assert info.value.field == "id"

    asyncio.run(main())


def test_hierarchy_is_as_documented() -> None:
    assert issubclass(optserve.APITimeoutError, optserve.APIConnectionError)
    assert issubclass(optserve.APIConnectionError, optserve.OptserveError)
    assert issubclass(optserve.APIResponseValidationError, optserve.OptserveError)
    for name in ["BadRequestError", "AuthenticationError", "PermissionDeniedError",
                 "NotFoundError", "ConflictError", "PayloadTooLargeError", "ValidationError",
                 "RateLimitError", "InternalServerError"]:
        cls = getattr(optserve, name)
        assert issubclass(cls, optserve.APIStatusError)
        assert name in (_exceptions.__doc__ or "")
    assert _exceptions.status_error_class(599) is optserve.InternalServerError
