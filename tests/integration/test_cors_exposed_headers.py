"""What a page on an allowed origin may read of an answer (``Access-Control-Expose-Headers``)
is what docs/protocol.md lists, and includes ``Idempotent-Replayed``: a retried keyed delete is
answered 204 with no body, so that header is the only word a page gets that the delete it
retried had already been done."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import CORS_EXPOSED_HEADERS, create_app
from tests.conftest import _test_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ORIGIN = "https://page.example"


@pytest.fixture
def cors_client() -> Iterator[TestClient]:
    with TestClient(create_app(_test_settings(cors_origins=ORIGIN))) as client:
        yield client


def exposed(headers: dict[str, str] | object) -> set[str]:
    value = headers["access-control-expose-headers"]  # type: ignore[index]
    return {h.strip().lower() for h in value.split(",")}


def test_the_protocol_doc_lists_every_exposed_header() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    match = re.search(r"answers expose (.*?)(?:\.\s|\(a page)", text, re.S)
    assert match, "docs/protocol.md no longer says which headers answers expose"
    listed = set(re.findall(r"`([A-Za-z-]+)`", match.group(1)))
    assert listed == set(CORS_EXPOSED_HEADERS)


def test_a_page_can_read_that_a_retried_delete_was_replayed(cors_client: TestClient) -> None:
    body = {"id": "cors-del", "optimizer": "SGD", "options": {"lr": 0.1},
            "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}}
    page = {"Origin": ORIGIN, "Idempotency-Key": "delete-once"}
    assert cors_client.post("/v1/sessions", json=body).status_code == 201
    first = cors_client.delete("/v1/sessions/cors-del", headers=page)
    assert first.status_code == 204 and "idempotent-replayed" not in first.headers
    again = cors_client.delete("/v1/sessions/cors-del", headers=page)
    assert again.status_code == 204 and again.content == b""
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["access-control-allow-origin"] == ORIGIN
    assert "idempotent-replayed" in exposed(again.headers)
    assert cors_client.get("/v1/sessions/cors-del").status_code == 404
