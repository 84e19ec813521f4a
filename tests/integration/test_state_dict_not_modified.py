"""A state dict read again while the session did not change is not downloaded again: ``GET
.../state_dict`` with ``If-None-Match: "r<revision>.<token>"`` (the ``X-Optserve-State-Tag`` it
was read with) is a 304 while the session is still at that revision, and the whole state once
anything changed it (a step, an option ``PATCH``, which does not move the version its ``ETag``
names). ``RemoteOptimizer.state_dict()`` and ``opt.state`` read so, the tensors handed out still
those of ``opt.state``. Every state compared with an in-process ``torch.optim`` run's."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest
import torch

import optserve
from tests.conftest import ENGINES
from tests.integration.test_sdk_dropin_edges import assert_same_form, backward, mlp, train
from tests.integration.test_sdk_state_edits_kept import assert_state_equal

pytestmark = pytest.mark.integration


class Recorded:
    """A client whose exchanges are listed as ``(method, path, status)``."""

    def __init__(self, url: str) -> None:
        self.answers: list[tuple[str, str, int]] = []
        self.http = httpx.Client(event_hooks={"response": [self._record]}, timeout=60)
        self.client = optserve.Client(url, max_retries=0, http_client=self.http)

    def _record(self, response: httpx.Response) -> None:
        self.answers.append((response.request.method, response.request.url.path,
                             response.status_code))

    def state_reads(self) -> list[int]:
        """The statuses of the state dict reads, in order."""
        return [status for method, path, status in self.answers
                if method == "GET" and path.endswith("/state_dict")]


@pytest.fixture
def recorded(live_server: str) -> Iterator[Recorded]:
    r = Recorded(live_server)
    try:
        yield r
    finally:
        r.client.close()
        r.http.close()


@pytest.fixture
def other_client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("shards", [1, 2])
def test_a_revision_tag_is_a_304_until_the_session_changes(engine_url: str, shards: int) -> None:
    """Raw HTTP, on both engines, a plain and a 2-shard session: the state read at revision r
    with state tag ``"r<r>.<token>"`` (``X-Optserve-State-Tag``), then asked again with it (and
    ``W/`` it): 304, no body, the version, revision and state tag headers; ``"r0<r>.<token>"``,
    the revision alone (``"r<r>"``: last release's form, which a session made again under the
    same id matched), another token or a version tag alone: the whole state. An lr ``PATCH``
    (version unchanged, revision moved): the whole state, the new lr in it; a step: the whole
    state, torch's after the same step."""
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    local_ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    local_w = local_ps["w"]
    local = torch.optim.Adam(local_ps.values(), lr=0.01)

    def step_both(c: optserve.Client, session_id: str) -> None:
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        c.step(session_id, grads, return_params=False)
        for k, p in local_ps.items():
            p.grad = grads[k].clone()
        local.step()

    with optserve.Client(engine_url, max_retries=0) as c:
        info = c.create_session("Adam", params, options={"lr": 0.01}, shards=shards)
        step_both(c, info.id)
        with httpx.Client(base_url=engine_url) as http:
            path = f"/v1/sessions/{info.id}/state_dict?format=json"
            first = http.get(path)
            assert first.status_code == 200
            revision = int(first.headers["X-Optserve-Revision"])
            version = first.headers["X-Optserve-Version"]
            state_tag = first.headers["X-Optserve-State-Tag"]
            token = state_tag.strip('"').partition(".")[2]
            assert state_tag == f'"r{revision}.{token}"' and len(token) >= 12, state_tag
            sd = c.export_state(info.id)
            assert torch.equal(torch.as_tensor(sd["state"][0]["exp_avg"]),
                               local.state[local_w]["exp_avg"])
            for tag in (state_tag, f"W/{state_tag}", f'"r{revision + 5}.{token}", {state_tag}'):
                again = http.get(path, headers={"If-None-Match": tag})
                assert again.status_code == 304, tag
                assert again.content == b""
                assert again.headers["X-Optserve-Revision"] == str(revision)
                assert again.headers["X-Optserve-State-Tag"] == state_tag
                assert again.headers["X-Optserve-Version"] == version
                assert again.headers["ETag"] == f'"{version}"'
            other_token = format(int(token, 16) ^ 1, f"0{len(token)}x")
            for tag in (f'"r0{revision}.{token}"', f'"r{revision}"', f'W/"r{revision}"',
                        f'"r{revision}.{other_token}"', f'"{version}"',
                        f'"r{revision + 1}.{token}"'):
                whole = http.get(path, headers={"If-None-Match": tag})
                assert whole.status_code == 200, tag
                assert whole.json() == first.json()
            # an option change moves the revision, not the version
            c.update_param_group(info.id, 0, lr=0.5)
            for group in local.param_groups:
                group["lr"] = 0.5
            changed = http.get(path, headers={"If-None-Match": state_tag})
            assert changed.status_code == 200
            assert changed.headers["X-Optserve-Version"] == version
            assert changed.headers["X-Optserve-State-Tag"] == (
                f'"r{changed.headers["X-Optserve-Revision"]}.{token}"')
            assert changed.json()["param_groups"][0]["lr"] == local.param_groups[0]["lr"]
            # a step: the whole state, torch's
            step_both(c, info.id)
            stepped = http.get(path, headers={
                "If-None-Match": changed.headers["X-Optserve-State-Tag"]})
            assert stepped.status_code == 200
        sd = optserve._tensors.decode_state_json(stepped.json())
        for i, p in enumerate(local_ps.values()):
            for k, v in local.state[p].items():
                assert torch.equal(torch.as_tensor(sd["state"][i][k]), v), (i, k)
        c.delete_session(info.id)


@pytest.mark.parametrize(("optimizer", "options", "key"), [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ("Adam", {"lr": 0.01}, "exp_avg"),
])
def test_state_dict_of_an_unchanged_session_is_not_downloaded_again(
        recorded: Recorded, other_client: optserve.Client, optimizer: str,
        options: dict[str, float], key: str) -> None:
    """``state_dict()`` twice with nothing between: the second read is a 304, the state dict
    torch's both times and its tensors ``opt.state``'s; another client's lr change (no new
    version): the whole state, the new lr; another client's step: the whole state, torch's
    after it. ``opt.state`` read after a step is fetched whole, then ``state_dict()`` 304."""
    local_model = mlp()
    remote_model = copy.deepcopy(local_model)
    local = getattr(torch.optim, optimizer)(local_model.parameters(), **options)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, recorded.client,
                                      **options)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    weight = remote_model[0].weight
    recorded.answers.clear()
    first = remote.state_dict()
    assert_same_form(local.state_dict(), first)
    second = remote.state_dict()
    assert recorded.state_reads() == [200, 304]
    assert_same_form(local.state_dict(), second)
    assert second["state"][0][key] is remote.state[weight][key]
    assert recorded.state_reads() == [200, 304]  # (opt.state: no read)
    # in place, as torch's state_dict() tensors are its state's: sent before the next step
    with torch.no_grad():
        second["state"][0][key].mul_(0.5)
        local.state[local_model[0].weight][key].mul_(0.5)
    # another client's lr change: no new version, a new revision
    other_client.update_param_group(remote.session_id, 0, lr=0.05)
    for opt in (local, remote):
        opt.param_groups[0]["lr"] = 0.05
    recorded.answers.clear()
    third = remote.state_dict()  # (sends the edit, then reads the state whole)
    assert recorded.state_reads() == [200]
    assert_same_form(local.state_dict(), third)
    assert remote.state_dict()["param_groups"][0]["lr"] == 0.05
    assert recorded.state_reads() == [200, 304]
    # another client's step, taken by the local optimizer too
    local.zero_grad()
    backward(local_model, 7)
    names = other_client.get_session(remote.session_id).param_groups[0].params
    other_client.step(remote.session_id, {n: p.grad.clone() for n, p in zip(
        names, local_model.parameters(), strict=True)}, return_params=False)
    local.step()
    remote.pull_params()
    recorded.answers.clear()
    assert_state_equal(local, remote, local_model, remote_model)  # (opt.state: read whole)
    fourth = remote.state_dict()
    assert recorded.state_reads() == [200, 304]
    assert_same_form(local.state_dict(), fourth)
    assert fourth["state"][0][key] is remote.state[weight][key]
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 5))
    assert_same_form(local.state_dict(), remote.state_dict())
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(p, q)
    remote.close(delete_session=True)
