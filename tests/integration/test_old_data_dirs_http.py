"""A keyed create retried after an upgrade, against a real uvicorn server restored from the
data directories of ``tests/fixtures/old_data_dirs/`` (see ``tests/unit/test_old_data_dirs.py``):
the same request with the same ``Idempotency-Key`` an older server acknowledged is answered with
the session it made (``Idempotent-Replayed: true``: the key's fingerprint is the same across
commits), not refused. The first commit kept no create keys, so there it is a 409."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, _test_settings
from tests.unit.test_old_data_dirs import COMMITS, FIXTURES

pytestmark = pytest.mark.integration
#: commits from before creates kept their Idempotency-Key
NO_CREATE_KEYS = {"4921d32"}


@pytest.fixture(params=COMMITS)
def restored(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    commit = str(request.param)
    shutil.copytree(FIXTURES / commit / "stored", tmp_path / "data")
    live = LiveServer(_test_settings(data_dir=tmp_path / "data"))
    try:
        yield commit, live.start()
    finally:
        live.stop()


def test_a_keyed_create_an_older_server_acknowledged_is_answered_after_the_upgrade(
        restored: tuple[str, str]) -> None:
    commit, url = restored
    told = json.loads((FIXTURES / commit / "answers.json").read_text())["sessions"]["keyed"]
    body = {"id": "keyed", "optimizer": "RMSprop", "options": {"lr": 0.01},
            "params": {"z": {"dtype": "float32", "shape": [2], "data": [1, 2]}}}
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/sessions", json=body, headers={"Idempotency-Key": "k-1"})
        if commit in NO_CREATE_KEYS:
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "session_exists"
        else:
            assert r.status_code == 201, r.text
            assert r.headers.get("idempotent-replayed") == "true"
            assert r.json()["id"] == "keyed"
        # (answered, not made again: the session is as it was acknowledged)
        params = http.get("/v1/sessions/keyed/params").json()
        assert params["params"] == told["params"]["params"]
        assert (params["version"], params["step"]) == (told["params"]["version"],
                                                       told["params"]["step"])
        # another request under that key is refused, whatever the commit
        other = http.post("/v1/sessions", json={**body, "id": "keyed-2"},
                          headers={"Idempotency-Key": "k-1"})
        if commit in NO_CREATE_KEYS:
            assert other.status_code == 201, other.text
        else:
            assert other.status_code == 422, other.text
            assert other.json()["code"] == "idempotency_key_reused"
