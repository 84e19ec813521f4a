"""The code of a query value an operation does not take is the one docs/protocol.md
("Headers") gives it. The page said every query parameter of the wrong type or range is a 422
``invalid``, while a step's ``upcast``/``timeout_s``/``base_version``, a state dict's
``format`` and the other words are a 422 ``invalid_query``: the page now lists which is which,
and this test reads that list and sends each example to a live server, checking the code, the
field, and that the session did not change."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
W = {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}
STEP = {"grads": {"w": {"dtype": "float32", "shape": [2], "data": [0.5, -0.5]}}}
PUT_PARAMS = {"params": W}
#: where each parameter is asked: method, the path after the session, body, LBFGS session?
WHERE: dict[str, tuple[str, str, dict[str, Any] | None, bool]] = {
    "wait_s": ("GET", "params", None, False),
    "min_version": ("GET", "params", None, False),
    "encoding": ("GET", "params", None, False),
    "since": ("GET", "history", None, False),
    "until": ("GET", "history", None, False),
    "points": ("GET", "history", None, False),
    "format": ("GET", "state_dict", None, False),
    "return": ("POST", "step", STEP, False),
    "metrics": ("POST", "step", STEP, False),
    "upcast": ("POST", "step", STEP, False),
    "params_dtype": ("POST", "step", STEP, False),
    "timeout_s": ("POST", "step", None, True),
    "base_version": ("PUT", "params", PUT_PARAMS, False),
    "base_revision": ("PUT", "params", PUT_PARAMS, False),
}


def documented() -> list[tuple[str, str, str]]:
    """(code, parameter, value) for every example the sentence gives."""
    text = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    match = re.search(r"A query parameter of the wrong type or range is a 422 naming it: "
                      r"`invalid` for (.*?), `invalid_query` for (.*?); one that takes", text)
    assert match, "docs/protocol.md no longer says which code a wrong query value gets"
    out = []
    for code, part in zip(("invalid", "invalid_query"), match.groups(), strict=True):
        examples = re.findall(r"`\?([a-z_]+)=([^`&]*)`", part)
        assert len(examples) >= 4, part
        out += [(code, name, value) for name, value in examples]
    return out


@pytest.fixture(scope="module")
def sessions(live_server: str) -> Iterator[tuple[httpx.Client, dict[bool, str]]]:
    with httpx.Client(base_url=live_server) as client:
        ids = {}
        for lbfgs in (False, True):
            r = client.post("/v1/sessions", json={
                "optimizer": "LBFGS" if lbfgs else "SGD", "options": {"lr": 0.1}, "params": W})
            assert r.status_code == 201, r.text
            ids[lbfgs] = r.json()["id"]
        yield client, ids
        for sid in ids.values():
            client.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("code,name,value", documented())
def test_a_query_value_gets_the_code_the_protocol_doc_gives(
        sessions: tuple[httpx.Client, dict[bool, str]], code: str, name: str,
        value: str) -> None:
    client, ids = sessions
    method, path, body, lbfgs = WHERE[name]
    url = f"/v1/sessions/{ids[lbfgs]}"
    before = client.get(url).json()
    r = client.request(method, f"{url}/{path}", params={name: value}, json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert (problem["code"], problem["field"]) == (code, name), problem
    assert problem["type"] == f"urn:optserve:problem:{code}"
    after = client.get(url).json()
    assert (after["version"], after["revision"]) == (before["version"], before["revision"])
