"""A Ray front and a host actor of another optserve commit (fronts in this process, hosts on
the shared test cluster asking for no CPU): the front's code version is patched, the host's is
its process's own. Every value is compared with in-process torch computed here."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.code_version import code_version
from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.torch_reference import adam_after as reference_adam_after
from tests.torch_reference import assert_tensors_equal as assert_equal
from tests.torch_reference import json_tensor, make_params, tensor_from_json

ray = pytest.importorskip("ray")
ray_host = pytest.importorskip("app.engine.ray_host")
pytestmark = [pytest.mark.integration, pytest.mark.ray]
LR = 0.01
tensors = partial(make_params, {"w": (3, 2), "b": (4,)})
adam_after = partial(reference_adam_after, lr=LR)


@pytest.fixture
def data(ray_cluster: Any, tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    try:
        yield data
    finally:
        kill_hosts(data)


@pytest.fixture(scope="module")
def shared_data(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One data directory for the cases that kill no host (a session id of their own each):
    a later one finds the host actors an earlier one started (a Ray worker process importing
    torch and the app) instead of starting its own."""
    data = tmp_path_factory.mktemp("versions") / "data"
    try:
        yield data
    finally:
        kill_hosts(data)


def step(url: str, sid: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/step", timeout=300,
                      json={"grads": {n: json_tensor(t) for n, t in tensors(seed).items()}})


def params_of(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return {n: tensor_from_json(t) for n, t in r.json()["params"].items()}


def made_and_stepped(url: str, sid: str, seed: int, grads_seed: int) -> tuple[Any, str]:
    """A session ``sid`` of Adam over ``tensors(seed)`` made through the front at ``url`` and
    stepped once with ``tensors(grads_seed)``, as torch's Adam: its first parameters and its
    host."""
    p0 = tensors(seed)
    r = httpx.post(f"{url}/v1/sessions", timeout=300, json={
        "id": sid, "optimizer": "Adam", "options": {"lr": LR},
        "params": {n: json_tensor(t) for n, t in p0.items()}})
    assert r.status_code == 201, r.text
    host = r.json()["placement"]["host"]
    assert_equal(params_of(step(url, sid, grads_seed)), adam_after(p0, tensors(grads_seed)),
                 "step")
    return p0, host



def unchanged_then_stepped(url: str, sid: str, p0: Any, stepped: int, grads_seed: int) -> None:
    """Read through the front at ``url``, ``sid`` holds torch's Adam step from ``p0`` with
    ``tensors(stepped)`` (nothing else applied), and its next step with ``tensors(grads_seed)``
    is torch's."""
    assert_equal(params_of(httpx.get(f"{url}/v1/sessions/{sid}/params", timeout=120)),
                 adam_after(p0, tensors(stepped)), "unchanged")
    assert_equal(params_of(step(url, sid, grads_seed)),
                 adam_after(p0, tensors(stepped), tensors(grads_seed)), "stepped after")

def test_a_front_of_another_commit_gets_503_and_the_session_is_unchanged(
        ray_cluster: Any, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session made and stepped through a front; a front whose code version is not its
    host's gets 503 ``host_version_mismatch`` (problem+json, ``Retry-After``, the host named)
    for a read and a step, again on a second try; the front of the host's commit (checked
    once, before its first call) reads the session as it was and steps it as torch's Adam."""
    settings = partial(ray_settings, ray_cluster, data_dir=shared_data,
                       ray_resources='{"num_cpus": 0}')
    same = LiveServer(settings())
    url = same.start()
    other = None
    try:
        p0, host = made_and_stepped(url, "versioned", 0, 1)

        monkeypatch.setattr(ray_host, "code_version", lambda: "0123456789abcdef")
        other = LiveServer(settings())
        other_url = other.start()
        for _ in range(2):
            for r in (httpx.get(f"{other_url}/v1/sessions/versioned/params", timeout=120),
                      step(other_url, "versioned", 2)):
                assert r.status_code == 503, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.headers["retry-after"] == "10"
                problem = r.json()
                assert problem["code"] == "host_version_mismatch", problem
                assert host in problem["detail"] and "docs/cluster.md" in problem["detail"]
                assert code_version() in problem["detail"], problem
        monkeypatch.undo()

        unchanged_then_stepped(url, "versioned", p0, 1, 2)
    finally:
        if other is not None:
            other.stop()
        same.stop()


def older_host_class() -> Any:
    """An actor class as an older commit's: the host actor's methods but ``code_version``
    (pickled by value: no module holds it)."""
    methods = {k: v for k, v in vars(ray_host.HostActor).items()
               if k not in ("code_version", "__dict__", "__weakref__")}
    older = type("OlderHostActor", (), methods)
    return ray.remote(max_restarts=-1, max_task_retries=0)(older)


def test_a_host_actor_from_before_the_check_is_refused_until_replaced(
        ray_cluster: Any, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session's host actor killed and started again as an older commit's (Ray's handle of
    it has no ``code_version``: AttributeError): the front that made the session takes the new
    actor's handle and answers 503 ``host_version_mismatch`` for a read and a step; once that
    actor is killed too, the front starts the host again from its own commit, and the session
    is as it was and steps as torch's Adam."""
    monkeypatch.setattr(ray_host, "VERSION_RECHECK_S", 0.0)
    settings = partial(ray_settings, ray_cluster, data_dir=data, ray_resources='{"num_cpus": 0}')
    front = LiveServer(settings())
    url = front.start()
    older = None
    try:
        p0, host = made_and_stepped(url, "older", 3, 4)

        assert kill_hosts(data) == [host]
        with monkeypatch.context() as m:  # (a front of the older commit starts it again)
            m.setattr(ray_host, "_actor_class", older_host_class)
            older = LiveServer(settings())
            older_url = older.start()
        # (its host started again as the older commit's: refused by this commit's front too)
        r = httpx.get(f"{older_url}/v1/sessions/older/params", timeout=120)
        assert r.status_code == 503 and r.json()["code"] == "host_version_mismatch", r.text
        for _ in range(2):
            for r in (httpx.get(f"{url}/v1/sessions/older/params", timeout=120),
                      step(url, "older", 5)):
                assert r.status_code == 503, r.text
                problem = r.json()
                assert problem["code"] == "host_version_mismatch", problem
                assert host in problem["detail"] and "before versions" in problem["detail"]

        assert kill_hosts(data) == [host]
        unchanged_then_stepped(url, "older", p0, 4, 5)
    finally:
        if older is not None:
            older.stop()
        front.stop()


def test_a_sharded_sessions_history_through_a_front_of_another_commit_is_503(
        ray_cluster: Any, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded session's ``GET .../history`` (which the front refuses itself, 422
    ``not_supported_here``) and a step with scalars through a front of another commit are 503
    ``host_version_mismatch``, as every other call there is (they were the 422); through the
    host's commit's front they are the 422 still, and the session, untouched, steps as
    torch's Adam."""
    settings = partial(ray_settings, ray_cluster, data_dir=shared_data,
                       ray_resources='{"num_cpus": 0}')
    same = LiveServer(settings())
    url = same.start()
    other = None
    try:
        p0 = tensors(6)
        r = httpx.post(f"{url}/v1/sessions", timeout=300, json={
            "id": "sharded", "optimizer": "Adam", "options": {"lr": LR}, "shards": 2,
            "params": {n: json_tensor(t) for n, t in p0.items()}})
        assert r.status_code == 201, r.text
        assert_equal(params_of(step(url, "sharded", 7)), adam_after(p0, tensors(7)), "step")
        with_scalars = {"grads": {n: json_tensor(t) for n, t in tensors(8).items()},
                        "scalars": {"loss": 0.5}}

        monkeypatch.setattr(ray_host, "code_version", lambda: "0123456789abcdef")
        other = LiveServer(settings())
        other_url = other.start()
        for _ in range(2):
            for r in (httpx.get(f"{other_url}/v1/sessions/sharded/history", timeout=120),
                      httpx.post(f"{other_url}/v1/sessions/sharded/step", timeout=120,
                                 json=with_scalars)):
                assert r.status_code == 503, r.text
                problem = r.json()
                assert problem["code"] == "host_version_mismatch", problem
                assert r.headers["retry-after"] == "10"
        monkeypatch.undo()

        for r, field in ((httpx.get(f"{url}/v1/sessions/sharded/history", timeout=120),
                          "history"),
                         (httpx.post(f"{url}/v1/sessions/sharded/step", timeout=120,
                                     json=with_scalars), "scalars")):
            assert r.status_code == 422, r.text
            assert (r.json()["code"], r.json()["field"]) == ("not_supported_here", field)
        unchanged_then_stepped(url, "sharded", p0, 7, 8)
    finally:
        if other is not None:
            other.stop()
        same.stop()
