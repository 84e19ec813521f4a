"""How a row pull that names several parameters in its GET form is refused, as
docs/protocol.md ("Row pulls") gives it: the page said every such pull is a 422
``invalid_rows``, while ``name`` itself given twice is a 422 ``invalid_query`` (the rule for any
query parameter given twice, checked first). The page's examples are read here and sent to a
live server; none changes anything (a pull), and the one-name pull beside them answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EMB = {"dtype": "float32", "shape": [3, 2], "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}


def documented() -> list[tuple[str, str, str]]:
    """(query, code, field) for each example of the sentence."""
    text = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    match = re.search(r"several names in the GET form: `\?([^`]+)` or `\?([^`]+)`, naming "
                      r"`([a-z]+)`; `name` itself given twice, `\?([^`]+)`, is a 422 "
                      r"`([a-z_]+)` naming `([a-z]+)`", text)
    assert match, "docs/protocol.md no longer says how a row pull of several names is refused"
    one, two, field, twice, code, twice_field = match.groups()
    return [(one, "invalid_rows", field), (two, "invalid_rows", field),
            (twice, code, twice_field)]


@pytest.fixture(scope="module")
def session(live_server: str) -> Iterator[tuple[httpx.Client, str]]:
    with httpx.Client(base_url=live_server) as client:
        made = client.post("/v1/sessions", json={"optimizer": "SGD", "options": {"lr": 0.1},
                                                 "params": {"emb": EMB, "other": EMB}})
        assert made.status_code == 201, made.text
        yield client, made.json()["id"]
        client.delete(f"/v1/sessions/{made.json()['id']}")


@pytest.mark.parametrize("query,code,field", documented())
def test_a_row_pull_of_several_names_is_refused_as_the_protocol_doc_says(
        session: tuple[httpx.Client, str], query: str, code: str, field: str) -> None:
    client, sid = session
    r = client.get(f"/v1/sessions/{sid}/params?{query}")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (r.json()["code"], r.json()["field"]) == (code, field)
    one = client.get(f"/v1/sessions/{sid}/params?name=emb&rows=1")
    assert one.status_code == 200
    assert one.json()["params"]["emb"]["values"]["data"] == EMB["data"][2:4]
