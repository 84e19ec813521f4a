"""The committed openapi.json is the contract other-language clients code against: it must
match what the app serves, and describe every route with both content types and problems."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_app() -> None:
    served = json.loads(json.dumps(create_app().openapi(), sort_keys=True))
    committed = json.loads((ROOT / "openapi.json").read_text())
    assert served == committed, "openapi.json drifted from the app: run scripts/update-openapi"


def all_routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, looking inside included routers (FastAPI wraps them)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from all_routes(inner.routes)
        else:
            yield r


def test_every_route_is_documented_with_problems_and_bodies() -> None:
    app = create_app()
    doc = app.openapi()
    routes = {(m.lower(), r.path) for r in all_routes(app.routes)
              for m in getattr(r, "methods", ())
              if r.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                                "/ui", "/ui/")
              and m != "HEAD"}
    documented = {(m, p) for p, ms in doc["paths"].items() for m in ms}
    assert routes == documented
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            for status in ("401", "404", "422"):
                content = op["responses"][status]["content"]
                assert list(content) == ["application/problem+json"], (method, path, status)
            if path.startswith("/v1/sessions") and method in ("post", "put") and \
                    not path.endswith(("zero_grad", "scheduler/step")):
                body = op["requestBody"]["content"]
                assert "application/json" in body, (method, path)
    step = doc["paths"]["/v1/sessions/{session_id}/step"]["post"]
    assert set(step["requestBody"]["content"]) == {"application/json",
                                                   "application/octet-stream"}
    assert set(step["responses"]["200"]["content"]) == {"application/json",
                                                        "application/octet-stream"}


def test_schema_examples_are_valid_requests(app_client: object) -> None:
    """The examples in the contract work against the real app (values checked)."""
    from fastapi.testclient import TestClient

    assert isinstance(app_client, TestClient)
    schemas = create_app().openapi()["components"]["schemas"]
    created = app_client.post("/v1/sessions", json=schemas["CreateSession"]["example"])
    assert created.status_code == 201, created.text
    assert created.json()["lr"] == [0.1]
    r = app_client.post("/v1/sessions/seed/step", json=schemas["Grads"]["example"])
    assert r.status_code == 200, r.text
    assert r.json()["params"] == schemas["StepResult"]["example"]["params"]


def test_a_header_or_status_for_every_mutating_route_is_one_line(
        monkeypatch: Any) -> None:
    """What every POST/PUT/PATCH/DELETE shares comes from two lists in app.api.openapi_docs."""
    from app.api import openapi_docs

    header = {"name": "Idempotency-Key", "in": "header", "required": False,
              "schema": {"type": "string", "maxLength": 200}}
    monkeypatch.setattr(openapi_docs, "MUTATING_HEADERS", [header])
    monkeypatch.setattr(openapi_docs, "MUTATING_PROBLEMS", {"507": "Storage full"})
    doc = create_app().openapi()
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            mutating = method in ("post", "put", "patch", "delete")
            assert (header in op.get("parameters", [])) == mutating, (method, path)
            assert ("507" in op["responses"]) == mutating, (method, path)
            if mutating:
                assert op["responses"]["507"]["content"] == {
                    "application/problem+json": {"schema": {
                        "$ref": "#/components/schemas/Problem"}}}


def test_each_parameter_is_listed_once_per_operation() -> None:
    """OpenAPI names a parameter by its name and location, once per operation (``pushGrads``
    listed ``upcast`` twice: from its signature and from the hand-written list)."""
    doc = create_app().openapi()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            keys = [(p["in"], p["name"]) for p in op.get("parameters", ())]
            assert len(keys) == len(set(keys)), (method, path, keys)
