"""What a sharded session refuses, with the codes docs/protocol.md ("Placement and sharding")
gives them: its sentence is read here and each refusal it names is asked of a live server,
so the page cannot pair a refusal with another's code again (it said `sync` was 422
`not_supported` and `add_param_group` `invalid_body`: the server answers the other way
round)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TWO = {"a": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]},
       "b": {"dtype": "float32", "shape": [1], "data": [3.0]}}


def documented() -> dict[str, tuple[str, str]]:
    """The refusals the sentence names: what -> (code, field)."""
    text = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    match = re.search(r"a sharded session refuses (.*?)\. See \[cluster\.md\]", text)
    assert match, "docs/protocol.md no longer says what a sharded session refuses"
    found = {what: (code, field) for what, code, field in re.findall(
        r"`([A-Za-z_]+)` \(422 `([a-z_]+)` naming `([a-z_.]+)`", match.group(1))}
    assert set(found) == {"sync", "add_param_group", "LBFGS"}, match.group(1)
    return found


def test_the_protocol_doc_names_the_codes_a_sharded_session_answers(live_server: str) -> None:
    docs = documented()
    with httpx.Client(base_url=live_server) as client:
        base = {"optimizer": "Adam", "options": {"lr": 0.1}, "params": TWO, "shards": 2}
        made = client.post("/v1/sessions", json={**base, "id": "sharded-codes"})
        assert made.status_code == 201, made.text
        answers = {
            "sync": [client.post("/v1/sessions", json={**base, "sync": {"workers": 2}}),
                     client.patch("/v1/sessions/sharded-codes", json={"sync": {"workers": 2}})],
            "add_param_group": [client.post("/v1/sessions/sharded-codes/param_groups", json={
                "params": {"c": {"dtype": "float32", "shape": [1], "data": [1.0]}}})],
            "LBFGS": [client.post("/v1/sessions", json={**base, "optimizer": "LBFGS",
                                                         "options": {"lr": 1.0}})],
        }
        for what, refusals in answers.items():
            for r in refusals:
                assert r.status_code == 422, (what, r.text)
                problem = r.json()
                assert (problem["code"], problem["field"]) == docs[what], (what, problem)
        assert client.delete("/v1/sessions/sharded-codes").status_code == 204
