"""A header that counts once, given on two lines, is a 400 ``bad_request`` whose ``field`` is
the one docs/protocol.md ("Errors") gives: the page listed the headers as ``Content-Type``,
``Content-Encoding``, ... while the server names the first two in lower case, as its 415s
for them do. The page's list is read here and each header is sent twice to a live server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
W = {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}
VALUES = {"content-type": "application/json", "content-encoding": "identity",
          "idempotency-key": "twice-1", "if-match": '"0"', "x-optserve-worker": "w1"}


def documented() -> list[str]:
    text = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    match = re.search(r"a header that counts once given on two lines, (.*?); a refused CORS", text)
    assert match, "docs/protocol.md no longer says how a header given twice is refused"
    names = re.findall(r"`([A-Za-z-]+)`", match.group(1))
    assert {n.lower() for n in names} == set(VALUES), names
    return names


@pytest.fixture(scope="module")
def session(live_server: str) -> Iterator[tuple[httpx.Client, str]]:
    with httpx.Client(base_url=live_server) as client:
        made = client.post("/v1/sessions", json={"optimizer": "SGD", "options": {"lr": 0.1},
                                                 "params": W})
        assert made.status_code == 201, made.text
        yield client, made.json()["id"]
        client.delete(f"/v1/sessions/{made.json()['id']}")


@pytest.mark.parametrize("name", documented())
def test_a_header_given_twice_is_named_as_the_protocol_doc_says(
        session: tuple[httpx.Client, str], name: str) -> None:
    client, sid = session
    value = VALUES[name.lower()]
    headers = [("content-type", "application/json"), (name, value), (name, value)]
    if name.lower() == "content-type":
        headers = headers[1:]
    r = client.post(f"/v1/sessions/{sid}/step", headers=headers,
                    content=b'{"grads": {"w": {"dtype": "float32", "shape": [2], '
                            b'"data": [1.0, 1.0]}}}')
    assert r.status_code == 400, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("bad_request", name), problem
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == 0  # nothing stepped
