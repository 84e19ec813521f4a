"""The repeat of an LBFGS step's last evaluation after a restart is answered with the step's
commit. An evaluation post is safe to retry (docs/protocol.md); when the evaluation was the one
whose answer committed the step and the server died before the client read that answer, the
step is applied and logged, but the restarted server knew no step of that id: the repeat was a
404 ``evaluation_not_found``, and a client (the SDK) then opened a new step from its own older
values while the session held the committed ones: the session went on from parameters the
client never evaluated. Now the repeat is answered as the step's commit (``replayed``, the
session's parameters, bitwise torch's ``LBFGS`` after that step), the same evaluation with
other values is 409 ``evaluation_answered`` as it is live, and an evaluation no step committed
with is still 404. Real ``python -m app``, ``kill -9`` or SIGTERM, durability ``step``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration import test_lbfgs_restored_history as restored_history
from tests.integration.test_durability import Proc
from tests.integration.test_lbfgs_restored_history import Local, closure_values, create, w_start
from tests.torch_reference import assert_tensors_equal, json_tensor, tensor_from_json

pytestmark = pytest.mark.integration
#: a real ``python -m app`` on a data directory of its own (the other module's fixture)
proc = restored_history.proc


def last_evaluation(c: httpx.Client, sid: str) -> tuple[str, dict[str, Any], httpx.Response]:
    """One step through its evaluations: the last evaluation's id and body, and its answer."""
    r = c.post(f"/v1/sessions/{sid}/step", json={})
    asked: tuple[str, dict[str, Any]] | None = None
    while r.status_code == 200 and r.json().get("needs") == "evaluation":
        question = r.json()
        loss, g = closure_values(tensor_from_json(question["params"]["w"]))
        body = {"loss": loss, "grads": {"w": json_tensor(g)}}
        asked = (question["evaluation"], body)
        r = c.post(f"/v1/sessions/{sid}/step/{question['evaluation']}", json=body)
    assert r.status_code == 200, r.text
    assert asked is not None  # (max_iter 4: the step evaluates more than its opening point)
    return asked[0], asked[1], r


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_the_last_evaluation_repeated_after_a_restart_is_answered_with_the_commit(
        proc: Proc, how: str) -> None:
    """``kill9``: the commit replayed from the log; ``sigterm``: from the snapshot the
    shutdown writes (the log emptied)."""
    proc.start()
    local = Local(w_start(7))
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        create(c, "lb", w_start(7))
        eval_id, body, first = last_evaluation(c, "lb")
        local.step()
        committed = first.json()
        assert committed["version"] == 1 and "replayed" not in committed
    restored_history.restart(proc, how)  # (kill -9: as if the answer were lost with it)
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        again = c.post(f"/v1/sessions/lb/step/{eval_id}", json=body)
        assert again.status_code == 200, again.text
        answer = again.json()
        assert answer["replayed"] is True and again.headers["idempotent-replayed"] == "true"
        assert (answer["version"], answer["step"]) == (committed["version"],
                                                       committed["step"])
        assert answer["loss"] == committed["loss"]
        assert_tensors_equal({"w": tensor_from_json(answer["params"]["w"])},
                             {"w": local.w.detach()}, "the replayed commit")
        # the same evaluation with other values; one no step committed with
        other = {**body, "loss": body["loss"] + 1.0}
        r = c.post(f"/v1/sessions/lb/step/{eval_id}", json=other)
        assert r.status_code == 409 and r.json()["code"] == "evaluation_answered", r.text
        r = c.post(f"/v1/sessions/lb/step/{eval_id}0", json=body)
        assert r.status_code == 404 and r.json()["code"] == "evaluation_not_found", r.text
        # nothing was applied again: the next step goes on from the committed one, as torch's
        _, _, nxt = last_evaluation(c, "lb")
        local.step()
        assert nxt.json()["version"] == 2
        assert_tensors_equal({"w": tensor_from_json(nxt.json()["params"]["w"])},
                             {"w": local.w.detach()}, "the next step")
