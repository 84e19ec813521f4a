"""A state tag names one session object at one revision: ``GET .../state_dict`` answers its
``X-Optserve-State-Tag``, ``"r<revision>.<token>"``, and ``If-None-Match`` of it is a 304 only
while the session is that very one at that revision.

Revisions count from 0 for each creation: a session deleted and made again under the same id,
stepped as often, is at the revision of the old one. With the revision alone as the tag
(``"r<revision>"``, the form before), the new session answered the old tag 304, and the SDK
(``Client``/``AsyncClient.export_state_if_changed``, ``RemoteOptimizer.state_dict()``) served the
OLD session's state as the new one's, silently. The token, minted with each creation and each
restore, tells them apart; a sharded session's changes with any of its shards'. A server
restarted (SIGTERM, every session restored from its snapshot) mints new tokens: a tag read before
is a whole answer once (the same state, read again), then the new tag 304s. Every state is
compared with an in-process ``torch.optim`` run's, bit for bit."""

from __future__ import annotations

import asyncio
import copy
import signal
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import optserve
from optserve._tensors import decode_state_json
from tests.conftest import ENGINES
from tests.integration.test_durability import Proc
from tests.integration.test_sdk_dropin_edges import assert_same_form, mlp, train

pytestmark = pytest.mark.integration

Tensors = dict[str, torch.Tensor]
LR = 0.01
TAG = "X-Optserve-State-Tag"


class Twin:
    """An in-process ``torch.optim.Adam`` over ``params`` (in their order), stepped with the
    gradients a session is given."""

    def __init__(self, params: Tensors) -> None:
        self.params = {n: v.clone().requires_grad_() for n, v in params.items()}
        self.opt = torch.optim.Adam(self.params.values(), lr=LR)

    def step(self, grads: Tensors) -> None:
        for n, p in self.params.items():
            p.grad = grads[n].clone()
        self.opt.step()

    def assert_state(self, sd: Mapping[str, Any]) -> None:
        """``sd`` (a state dict as read, its state keyed by torch's ids) holds this optimizer's
        state, bit for bit, and its lr."""
        assert set(sd["state"]) == set(range(len(self.params)))
        for i, p in enumerate(self.params.values()):
            mine = self.opt.state[p]
            assert set(sd["state"][i]) == set(mine), i
            for key, value in mine.items():
                theirs = torch.as_tensor(sd["state"][i][key])
                assert theirs.dtype == value.dtype and torch.equal(theirs, value), (i, key)
        assert sd["param_groups"][0]["lr"] == self.opt.param_groups[0]["lr"]


def values(seed: int, scale: float) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g) * scale, "b": torch.randn(4, generator=g) * scale}


def made_and_stepped(c: optserve.Client, sid: str, seed: int, shards: int) -> Twin:
    """Session ``sid`` made (``shards``) from values of ``seed`` and stepped once, and its
    in-process twin."""
    params, grads = values(seed, 1.0 + seed), values(seed + 100, 0.5)
    c.create_session("Adam", params, options={"lr": LR}, id=sid, shards=shards)
    c.step(sid, grads, return_params=False)
    twin = Twin(params)
    twin.step(grads)
    return twin


def state_path(sid: str) -> str:
    return f"/v1/sessions/{sid}/state_dict?format=json"


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("shards", [1, 2])
def test_a_tag_of_a_deleted_session_is_a_whole_answer_from_one_made_again_under_its_id(
        engine_url: str, shards: int) -> None:
    """Create, step, read the state (tag T, and an SDK export); delete; create again under the
    same id with other values, step once (the same revision as T): a read with T is a 200, the
    NEW session's state, torch's; so are ``Client.export_state_if_changed`` and
    ``AsyncClient.export_state_if_changed`` given the old export; the new tag: 304."""
    sid = f"again-{shards}-{uuid.uuid4().hex[:8]}"
    with optserve.Client(engine_url, max_retries=0) as c, \
            httpx.Client(base_url=engine_url, timeout=60) as http:
        old_twin = made_and_stepped(c, sid, 1, shards)
        old = http.get(state_path(sid))
        assert old.status_code == 200, old.text
        old_twin.assert_state(decode_state_json(old.json()))
        old_tag, revision = old.headers[TAG], old.headers["X-Optserve-Revision"]
        old_export = c.export_state_if_changed(sid, format="json")
        assert (old_export.tag, str(old_export.revision)) == (old_tag, revision)
        c.delete_session(sid)

        twin = made_and_stepped(c, sid, 2, shards)
        again = http.get(state_path(sid), headers={"If-None-Match": old_tag})
        # (the revision alone cannot tell the two sessions apart)
        assert again.headers["X-Optserve-Revision"] == revision
        assert again.status_code == 200, again.text
        twin.assert_state(decode_state_json(again.json()))
        new_tag = again.headers[TAG]
        assert new_tag != old_tag and new_tag.startswith(f'"r{revision}.')

        got = c.export_state_if_changed(sid, old_export, format="json")
        assert not got.not_modified and (got.revision, got.tag) == (old_export.revision, new_tag)
        twin.assert_state(got.state_dict)

        async def read_async() -> optserve.StateExport:
            async with optserve.AsyncClient(engine_url, max_retries=0) as ac:
                return await ac.export_state_if_changed(sid, old_export, format="json")
        got_async = asyncio.run(read_async())
        assert not got_async.not_modified and got_async.tag == new_tag
        twin.assert_state(got_async.state_dict)

        # the new session's own tag: a 304, nothing exported
        for tag in (new_tag, f"{old_tag}, {new_tag}"):
            same = http.get(state_path(sid), headers={"If-None-Match": tag})
            assert (same.status_code, same.content, same.headers[TAG]) == (304, b"", new_tag)
        assert c.export_state_if_changed(sid, got, format="json").not_modified
        c.delete_session(sid)


def test_remote_optimizer_state_dict_is_the_session_made_again_under_its_id(
        live_server: str) -> None:
    """``RemoteOptimizer.state_dict()`` read (kept with its tag); another client deletes its
    session and makes it again under the same id with other values, stepped once (the same
    revision): ``state_dict()`` is the new session's, equal to a local ``torch.optim.Adam``'s
    made from those values and given that step."""
    sid = f"again-opt-{uuid.uuid4().hex[:8]}"
    model = mlp()
    local_model = copy.deepcopy(model)
    local = torch.optim.Adam(local_model.parameters(), lr=LR)
    with optserve.Client(live_server, max_retries=0) as c, \
            optserve.Client(live_server, max_retries=0) as other:
        remote = optserve.RemoteOptimizer(model.parameters(), "Adam", c, session_id=sid, lr=LR)
        for m, opt in ((local_model, local), (model, remote)):
            train(m, opt, range(1))
        assert_same_form(local.state_dict(), remote.state_dict())  # (kept, with its tag)
        info = other.get_session(sid)
        names = info.param_groups[0].params
        other.delete_session(sid)

        torch.manual_seed(3)
        made = {n: torch.randn_like(p) * 2 for n, p in zip(names, model.parameters(), strict=True)}
        grads = {n: torch.randn_like(v) for n, v in made.items()}
        other.create_session("Adam", made, options={"lr": LR}, id=sid)
        other.step(sid, grads, return_params=False)
        assert other.get_session(sid).revision == info.revision
        twin = [v.clone().requires_grad_() for v in made.values()]
        twin_opt = torch.optim.Adam(twin, lr=LR)
        for p, n in zip(twin, names, strict=True):
            p.grad = grads[n].clone()
        twin_opt.step()

        assert_same_form(twin_opt.state_dict(), remote.state_dict())
        remote.close(delete_session=True)


def test_a_tag_read_before_a_restart_is_a_whole_answer_after_it(tmp_path: Path) -> None:
    """A plain and a 2-shard session stepped, their states read (raw tags and SDK exports);
    SIGTERM (every session snapshotted) and a start on the same data: the old tags are whole
    answers, the same state (torch's), at the same revision, with a new tag; that tag 304s."""
    proc = Proc(tmp_path / "data")
    try:
        proc.start()
        read: dict[str, tuple[Twin, str, str, optserve.StateExport]] = {}
        with optserve.Client(proc.url, max_retries=0) as c, \
                httpx.Client(base_url=proc.url, timeout=60) as http:
            for shards in (1, 2):
                sid = f"restart-{shards}"
                twin = made_and_stepped(c, sid, shards, shards)
                before = http.get(state_path(sid))
                assert before.status_code == 200, before.text
                export = c.export_state_if_changed(sid, format="json")
                assert export.tag == before.headers[TAG]
                assert http.get(state_path(sid), headers={
                    "If-None-Match": export.tag}).status_code == 304
                read[sid] = (twin, before.headers[TAG], before.headers["X-Optserve-Revision"],
                             export)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(120) == 0
        proc.start()
        with optserve.Client(proc.url, max_retries=0) as c, \
                httpx.Client(base_url=proc.url, timeout=60) as http:
            for sid, (twin, tag, revision, export) in read.items():
                after = http.get(state_path(sid), headers={"If-None-Match": tag})
                assert (after.status_code, after.headers["X-Optserve-Revision"]) == (
                    200, revision), (sid, after.text)
                twin.assert_state(decode_state_json(after.json()))
                new_tag = after.headers[TAG]
                assert new_tag != tag and new_tag.startswith(f'"r{revision}.'), sid
                got = c.export_state_if_changed(sid, export, format="json")
                assert not got.not_modified and got.tag == new_tag, sid
                twin.assert_state(got.state_dict)
                same = http.get(state_path(sid), headers={"If-None-Match": new_tag})
                assert (same.status_code, same.headers[TAG]) == (304, new_tag), sid
    finally:
        proc.stop()
