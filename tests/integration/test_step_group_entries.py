"""A step's ``param_groups`` entries as docs/protocol.md ("Options with the step") gives them:
``null`` and ``{}`` leave a group alone in the list form; in the object form an entry is an
object (``{"0": null}`` is a 422 ``invalid_body``, which the page did not say: it read as if
``null`` were taken in both forms and, for a group the session lacks, a 422
``unknown_param_group``). Each example the page now gives is sent to a live server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import test_header_given_twice_fields as given_twice

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GRADS = {"w": {"dtype": "float32", "shape": [2], "data": [0.5, -0.5]}}


#: a session of one SGD group over one parameter (the other module's fixture)
session = given_twice.session


def documented() -> list[tuple[Any, str, str]]:
    """(param_groups, code, field) for each refused example the sentence gives."""
    text = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    match = re.search(r"an entry of the object is an object, `\{\}` for a group left alone: "
                      r"`(.*?)` is a 422 `([a-z_]+)` naming `([a-z_.0-9]+)`; an entry for a "
                      r"group the session lacks, .*? is a 422 `([a-z_]+)` naming it: `(.*?)`, "
                      r"`(.*?)` of a session of one group naming `([a-z_.0-9]+)`", text)
    assert match, "docs/protocol.md no longer says how a step's group entries are refused"
    null, code1, field1, code2, missing, nulls, field2 = match.groups()
    return [(json.loads(null), code1, field1), (json.loads(missing), code2, "param_groups.3"),
            (json.loads(nulls), code2, field2)]


@pytest.mark.parametrize("groups,code,field", documented())
def test_a_refused_group_entry_is_answered_as_the_protocol_doc_says(
        session: tuple[httpx.Client, str], groups: Any, code: str, field: str) -> None:
    client, sid = session
    before = client.get(f"/v1/sessions/{sid}").json()["version"]
    r = client.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS, "param_groups": groups})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == (code, field)
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == before


@pytest.mark.parametrize("groups", [[None], [{}], {"0": {}}])
def test_groups_left_alone_step(session: tuple[httpx.Client, str], groups: Any) -> None:
    client, sid = session
    before = client.get(f"/v1/sessions/{sid}").json()
    r = client.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS, "param_groups": groups})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before["version"] + 1 and r.json()["lr"] == before["lr"]
