"""Small data directories of older commits (``tests/fixtures/upgrade/``, see
``tests/unit/test_upgrade_fixtures.py``) restored by a real server of this one, where what is
checked is what a client sees over HTTP (an ``Idempotency-Key``'s fingerprint included)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer, _test_settings, kill_hosts, ray_settings
from tests.torch_reference import (
    assert_trees_equal,
    json_tensor,
    tensor_from_json,
    tensors_from_json,
)
from tests.upgrade_cases import copied_case, f32, sgd_after_its_step

pytestmark = pytest.mark.integration


def test_a_keyed_delete_of_a_sharded_session_an_older_server_acknowledged_is_done(
        tmp_path: Path) -> None:
    """c938206 answered a keyed delete of a sharded session 204 but kept its key under the
    first shard's own scope (``<tenant>#<id>``, ``shard0of2``) and deleted that shard only
    (a bug fixed since). Restored here, the retry of that delete was a 404, the other shard
    stayed held out of sight, and a create of the id was a 409 naming ``shard1of2`` (the
    id unusable for good). Now the retry is answered as the delete it repeats, the leftover
    shard is deleted at start, and the id can be made again."""
    inputs, data = copied_case("c938206-sharded-keyed-delete", tmp_path)
    live = LiveServer(_test_settings(data_dir=data))
    try:
        import httpx
        with httpx.Client(base_url=live.start(), timeout=60) as http:
            assert http.get("/readyz").json().get("refused") is None
            assert http.get("/v1/sessions").json()["sessions"] == []
            key = inputs["delete"]["Idempotency-Key"]
            r = http.delete("/v1/sessions/gone", headers={"Idempotency-Key": key})
            assert r.status_code == inputs["delete"]["status"], r.text
            assert r.headers.get("Idempotent-Replayed") == "true"
            made = inputs["create"]
            body = {**made, "params": {n: {"dtype": "float32", "shape": [len(v)], "data": v}
                                       for n, v in made["params"].items()}}
            r = http.post("/v1/sessions", json=body)
            assert r.status_code == 201, r.text
            params = http.get("/v1/sessions/gone/params").json()
            # (past the version of the leftover shard deleted at start: app.engine.
            # last_versions)
            assert (params["version"], params["step"]) == (2, 0)
            assert {n: t["data"] for n, t in params["params"].items()} == made["params"]
    finally:
        live.stop()


@pytest.mark.ray
def test_a_keyed_delete_an_older_ray_front_acknowledged_answers_its_retry(
        tmp_path: Path, ray_cluster: Any) -> None:
    """c938206's Ray engine kept a keyed delete's key in its hosts' tombstones only (no
    ``directory/.deletes/``, which a Ray front answers retries from since). Restored here, the
    retry of such a delete (of a plain session, and of a sharded one) was a 404. Now a keyed
    delete of an id the directory holds nothing under asks the hosts, and is answered (204,
    replayed) by the one that kept it, and the directory marks it."""
    inputs, data = copied_case("c938206-ray-keyed-delete", tmp_path)
    _hosts_without_cpus(data)
    live = LiveServer(ray_settings(ray_cluster, data_dir=data))
    try:
        import httpx
        with httpx.Client(base_url=live.start(), timeout=120) as http:
            for _ in range(2):  # (the second from the directory's mark)
                for sent in inputs["deletes"]:
                    r = http.delete(f"/v1/sessions/{sent['id']}",
                                    headers={"Idempotency-Key": sent["Idempotency-Key"]})
                    assert r.status_code == sent["status"], r.text
                    assert r.headers.get("Idempotent-Replayed") == "true"
            r = http.delete("/v1/sessions/todel", headers={"Idempotency-Key": "kd-2"})
            assert r.status_code == 422, r.text  # (the key of another request)
            r = http.delete("/v1/sessions/never", headers={"Idempotency-Key": "kd-9"})
            assert r.status_code == 404, r.text
    finally:
        live.stop()
        kill_hosts(data)


def _read_through_restarts(http: Any, path: str, within_s: float = 180.0) -> Any:
    """``GET path``, asked again while it answers 503 ``host_restarting`` (as a client honouring
    ``Retry-After`` does: the front retries a read for 10 s itself, and hosts Ray restarts on
    a loaded test machine, each restoring its sessions and a sharded session's coordinator
    asking the other, can take longer); only a hang is timed."""
    deadline = time.monotonic() + within_s
    while True:
        r = http.get(path)
        if r.status_code != 503 or r.json().get("code") != "host_restarting" \
                or time.monotonic() > deadline:
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))


def _hosts_without_cpus(data: Path) -> None:
    """The Ray hosts of a copied case take no CPU of the shared test cluster (these tests run
    late in the Ray suite, whose earlier tests' hosts may hold all of them)."""
    for host in data.glob("hosts/*/host.json"):
        saved = json.loads(host.read_text())
        host.write_text(json.dumps({**saved, "resources": {"num_cpus": 0}}))


@pytest.mark.ray
def test_a_sharded_session_an_older_ray_front_snapshotted_one_shard_of_is_served_whole(
        tmp_path: Path, ray_cluster: Any) -> None:
    """c938206's Ray engine (before revisions were counted) snapshotted one shard of a sharded
    SGD session (its shard 0, on one host: create, step and a push of its parameter's
    gradient, three logged updates) and left the other, on another host, with its log only.
    That snapshot holds no revision, while the other shard's log replay counts the step: the
    shards' revisions differed, and the session was missing from the listing and every read
    and step of it a 503 ``shards_out_of_step`` (``/readyz`` 200). Now its coordinator puts
    them at one revision, as the embedded engine's start does, and the session is served as
    that front acknowledged it, and steps as torch does."""
    inputs, data = copied_case("c938206-ray-sharded-push", tmp_path)
    _hosts_without_cpus(data)

    local, opt = sgd_after_its_step(inputs)
    acknowledged = {n: p.detach().clone() for n, p in local.items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in local.values()]
    pushed = {n: f32(v) for n, v in inputs["push"].items()}
    nxt = {"u": f32([0.5, -1.0, 2.0]), "v": f32([-3.0, 0.25])}
    for n, p in local.items():
        p.grad = nxt[n] + pushed[n] if n in pushed else nxt[n].clone()
    opt.step()

    live = LiveServer(ray_settings(ray_cluster, data_dir=data))
    try:
        import httpx
        with httpx.Client(base_url=live.start(), timeout=120) as http:
            r = http.get("/readyz")
            assert r.status_code == 200 and r.json().get("refused") is None, r.text
            assert [s["id"] for s in http.get("/v1/sessions").json()["sessions"]] == ["sh"]
            r = http.get("/v1/sessions/sh")
            assert r.status_code == 200, r.text
            assert (r.json()["version"], r.json()["step"]) == (1, 1)
            r = http.get("/v1/sessions/sh/params")
            assert r.status_code == 200, r.text
            params = tensors_from_json(r.json()["params"])
            assert_trees_equal(params, acknowledged, "restored")
            r = http.get("/v1/sessions/sh/state_dict")
            assert r.status_code == 200, r.text
            state = r.json()["state"]
            assert_trees_equal([tensor_from_json(state[str(i)]["momentum_buffer"])
                                for i in range(2)], momentum, "momentum")
            r = http.post("/v1/sessions/sh/step",
                          json={"grads": {n: json_tensor(t) for n, t in nxt.items()}})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 2
            assert_trees_equal(tensors_from_json(r.json()["params"]), dict(local),
                               "the next step")
            kill_hosts(data, restart=True)  # (each host restored again from its store)
            r = _read_through_restarts(http, "/v1/sessions/sh/params")
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 2
            assert_trees_equal(tensors_from_json(r.json()["params"]), dict(local),
                               "after its hosts restarted")
    finally:
        live.stop()
        kill_hosts(data)


@pytest.mark.ray
def test_a_sharded_session_whose_alignment_met_a_passing_failure_is_served_after_it(
        tmp_path: Path, ray_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The c938206 sharded session above, its coordinator's first look at the other shard's
    revision failing as a host restarting does, past a read's retries (503
    ``host_restarting`` for 12 s, injected in that host's actor). The alignment was logged
    and left: the shards stayed apart, the session missing from the listing, its description
    and every step a 503 ``shards_out_of_step`` until the coordinator's host restarted (out of
    service for good after twice ``commit_timeout_s``). Now it is tried again by the
    session's next call: once the failure passed, the session reads as that front
    acknowledged it and steps as torch does, also after its hosts restarted."""
    from app.engine import ray_host
    from tests.ray_faults import revision_tip_fails_once

    monkeypatch.setattr(ray_host, "_actor_class", revision_tip_fails_once)
    inputs, data = copied_case("c938206-ray-sharded-push", tmp_path)
    _hosts_without_cpus(data)
    other = json.loads((data / "directory" / "default~sh").read_text())["shards"][1]

    local, opt = sgd_after_its_step(inputs)
    acknowledged = {n: p.detach().clone() for n, p in local.items()}
    pushed = {n: f32(v) for n, v in inputs["push"].items()}
    nxt = {"u": f32([0.5, -1.0, 2.0]), "v": f32([-3.0, 0.25])}
    for n, p in local.items():
        p.grad = nxt[n] + pushed[n] if n in pushed else nxt[n].clone()
    opt.step()

    live = LiveServer(ray_settings(ray_cluster, data_dir=data))
    try:
        import httpx
        import ray
        with httpx.Client(base_url=live.start(), timeout=120) as http:
            r = _read_through_restarts(http, "/v1/sessions/sh/params")
            assert ray.get(ray.get_actor(other, namespace="optserve")
                           .revision_tip_failures.remote())  # (the failure was injected)
            assert r.status_code == 200, r.text
            assert (r.json()["version"], r.json()["step"]) == (1, 1)
            assert_trees_equal(tensors_from_json(r.json()["params"]), acknowledged,
                               "read after the failure")
            assert [s["id"] for s in http.get("/v1/sessions").json()["sessions"]] == ["sh"]
            r = http.post("/v1/sessions/sh/step",
                          json={"grads": {n: json_tensor(t) for n, t in nxt.items()}})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 2
            assert_trees_equal(tensors_from_json(r.json()["params"]), dict(local),
                               "stepped after the failure")
            kill_hosts(data, restart=True)  # (each host restored again from its store)
            r = _read_through_restarts(http, "/v1/sessions/sh/params")
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 2
            assert_trees_equal(tensors_from_json(r.json()["params"]), dict(local),
                               "after its hosts restarted")
    finally:
        live.stop()
        kill_hosts(data)
