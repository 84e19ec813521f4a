"""A session an older server took with an option no JSON number holds (an LBFGS ``max_iter``
of 2**64 - 1, whose ``max_eval``, ``max_iter * 5 // 4``, torch makes past 64 bits: the create's
check that refuses it came later) is restored from its data directory as it ran, and answered:
the list of sessions, its description and its JSON export write that integer as its decimal
text. It made every list of the tenant's sessions a 500, its description and export too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.engine import optimizers, persist
from app.engine.store import read_snapshot
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_lbfgs import (
    assert_same_state,
    bitwise,
    params_of,
    remote_step,
    state_of,
)

pytestmark = pytest.mark.integration

MAX_ITER = 2**64 - 1


def _client(url: str) -> httpx.Client:
    # (a connection each: the old server's 500 after its create closed the one it answered on)
    return httpx.Client(base_url=url, timeout=60, headers={"Connection": "close"})


def _old_server_data(data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory as a server from before ``refuse_unwritable_ints`` left it: the
    session ``bad`` made with that ``max_iter``, and ``good``."""
    params = {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}
    with monkeypatch.context() as m:
        m.setattr(optimizers, "refuse_unwritable_ints", lambda *_a, **_k: None)
        with LiveServer(_test_settings(data_dir=data)).serving() as url, _client(url) as c:
            c.post("/v1/sessions", json={"optimizer": "LBFGS", "id": "bad", "params": params,
                                         "options": {"max_iter": MAX_ITER}})
            assert c.post("/v1/sessions", json={"optimizer": "SGD", "id": "good",
                                                 "params": params}).status_code == 201
    return data


def test_a_session_with_an_option_past_64_bits_is_listed_described_and_exported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _old_server_data(tmp_path / "data", monkeypatch)
    # what torch makes of that max_iter
    made = torch.optim.LBFGS([torch.nn.Parameter(torch.ones(2))], max_iter=MAX_ITER)
    max_eval = made.defaults["max_eval"]
    assert max_eval > 2**64 - 1
    with LiveServer(_test_settings(data_dir=data)).serving() as url, _client(url) as c:
        r = c.get("/v1/sessions")
        assert r.status_code == 200, r.text
        listed: dict[str, Any] = {s["id"]: s for s in r.json()["sessions"]}
        assert sorted(listed) == ["bad", "good"]
        bad = listed["bad"]
        for options in (bad["defaults"], bad["param_groups"][0]):
            assert options["max_eval"] == str(max_eval)
            assert options["max_iter"] == MAX_ITER  # (one a JSON number holds: as it is)
        r = c.get("/v1/sessions/bad")
        assert r.status_code == 200, r.text
        assert r.json() == bad
        r = c.get("/v1/sessions/bad/state_dict")
        assert r.status_code == 200, r.text
        exported = r.json()
        assert exported["param_groups"][0]["max_eval"] == str(max_eval)
        r = c.put("/v1/sessions/bad/state_dict", json=exported)  # (not a number: refused)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "state_dict.param_groups.0.max_eval"
        # the group's max_eval changed to one a JSON number holds is written as a number
        r = c.patch("/v1/sessions/bad/param_groups/0", json={"max_eval": 25})
        assert r.status_code == 200, r.text
        assert r.json()["param_groups"][0]["max_eval"] == 25
        assert c.get("/v1/sessions/good").status_code == 200


def _values_of(tree: Any, key: str) -> Iterator[Any]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _values_of(v, key)


def _quadratic(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((p["w"] - torch.tensor([3.0, -1.0])) ** 2).sum()


def test_a_session_with_an_option_past_64_bits_is_snapshotted_and_restored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its snapshot (at the stop) holds that integer (a ``$int`` tag in the snapshot's JSON):
    every snapshot of it failed, so its log was never emptied. A restart restores it from the
    snapshot with torch's own int, and its next step is in-process torch's."""
    data = _old_server_data(tmp_path / "data", monkeypatch)
    [snapshot] = [p for p in data.rglob("snapshot.bin") if "bad" in str(p.parent)]
    assert (snapshot.parent / "wal.bin").stat().st_size == 0  # (compacted: the snapshot holds it)
    start = {"w": torch.tensor([1.0, 2.0])}
    local = torch.optim.LBFGS([torch.nn.Parameter(start["w"].clone())], max_iter=MAX_ITER)
    params = {"w": local.param_groups[0]["params"][0]}

    def closure() -> torch.Tensor:
        local.zero_grad()
        loss = _quadratic(params)
        loss.backward()
        return loss
    local.step(closure)
    # what the snapshot restores: torch's own int (answers write it as its text)
    held = persist.decode_tree(read_snapshot(snapshot), persist.SNAPSHOT_KEY)
    found = list(_values_of(held, "max_eval"))
    assert found and all(type(v) is int and v == local.defaults["max_eval"] for v in found)
    with LiveServer(_test_settings(data_dir=data)).serving() as url, _client(url) as c:
        answer, _ = remote_step(c, "bad", f=_quadratic)
        assert answer.get("needs") is None, answer
        assert_same_state(state_of(c, "bad")["state"], local.state_dict()["state"])
        assert bitwise(params_of(c, "bad")["w"], params["w"].detach())
