"""LBFGS over HTTP, the closure as a round trip: ``POST .../step`` asks for evaluations until
torch's own ``LBFGS.step`` returns. Against live servers: bitwise in-process torch (with and
without strong Wolfe line search, several history sizes and iteration counts, JSON and
safetensors, the state dict both ways), other sessions stepping while a step waits, abandoned
steps leaving the session exactly as it was, the protocol's refusals and retries, and an
acknowledged step surviving ``kill -9``."""

from __future__ import annotations

import copy
import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.wire.safetensors_body import read_safetensors, write_safetensors
from tests.integration.test_durability import Proc
from tests.torch_reference import json_tensor, tensors_from_json

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
GEN = torch.Generator().manual_seed(3)
X = torch.randn(40, 4, generator=GEN)
Y = X @ torch.tensor([1.5, -2.0, 0.25, 3.0]) + 0.5 + 0.1 * torch.randn(40, generator=GEN)
START = {"w": torch.zeros(4), "b": torch.zeros(1)}
Loss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def regression(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((X @ p["w"] + p["b"] - Y) ** 2).mean()


def evaluate(params: dict[str, torch.Tensor], f: Loss = regression
             ) -> tuple[float, dict[str, torch.Tensor]]:
    """What a client does with an evaluation request: loss and gradients at ``params``."""
    leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
    loss = f(leaves)
    loss.backward()
    return float(loss.detach()), {n: t.grad for n, t in leaves.items() if t.grad is not None}


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class Local:
    """The in-process torch reference: LBFGS over the same parameters, counting closure calls."""

    def __init__(self, options: dict[str, Any], start: dict[str, torch.Tensor] = START) -> None:
        self.params = {n: t.clone().requires_grad_() for n, t in start.items()}
        self.opt = torch.optim.LBFGS(list(self.params.values()), **options)
        self.calls = 0

    def step(self) -> tuple[float, int]:
        self.calls = 0

        def closure() -> torch.Tensor:
            self.calls += 1
            self.opt.zero_grad()
            loss = regression(self.params)
            loss.backward()
            return loss
        loss = self.opt.step(closure)
        return float(loss.detach()), self.calls


def create(http: httpx.Client, options: dict[str, Any], sid: str | None = None,
           start: dict[str, torch.Tensor] = START, **extra: Any) -> str:
    sid = sid or f"lbfgs-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "LBFGS", "options": options,
                                        "params": {n: json_tensor(t) for n, t in start.items()},
                                        **extra})
    assert r.status_code == 201, r.text
    return sid


def _decode(r: httpx.Response) -> dict[str, Any]:
    """A step answer (question or end), JSON or safetensors, as one dict with tensors."""
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith(BINARY):
        tensors, meta = read_safetensors(bytearray(r.content))
        out: dict[str, Any] = {}
        for k, v in meta.items():
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        out["params"] = tensors
        return out
    body: dict[str, Any] = r.json()
    if "params" in body:
        body["params"] = tensors_from_json(body["params"])
    return body


def _body(loss: float, grads: dict[str, torch.Tensor], fmt: str) -> dict[str, Any]:
    if fmt == "json":
        return {"json": {"loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}}}
    return {"content": write_safetensors(grads, {"loss": json.dumps(loss)}),
            "headers": {"content-type": BINARY, "accept": BINARY}}


def remote_step(http: httpx.Client, sid: str, *, fmt: str = "json", inline: bool = False,
                at: dict[str, torch.Tensor] | None = None, query: str = "",
                f: Loss = regression) -> tuple[dict[str, Any], int]:
    """One LBFGS step driven like a client: (the final answer, evaluations computed here)."""
    evaluations = 0
    if inline:  # the first evaluation rides with the open
        assert at is not None
        loss, grads = evaluate(at, f)
        evaluations += 1
        r = http.post(f"/v1/sessions/{sid}/step{query}", **_body(loss, grads, fmt))
    elif fmt == "json":
        r = http.post(f"/v1/sessions/{sid}/step{query}")
    else:
        r = http.post(f"/v1/sessions/{sid}/step{query}", headers={"accept": BINARY})
    answer = _decode(r)
    while answer.get("needs") == "evaluation":
        assert answer["evaluations"] == evaluations
        loss, grads = evaluate(answer["params"], f)
        evaluations += 1
        r = http.post(f"/v1/sessions/{sid}/step/{answer['evaluation']}",
                      **_body(loss, grads, fmt))
        answer = _decode(r)
    return answer, evaluations


def state_of(http: httpx.Client, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/state_dict?format=torch")
    assert r.status_code == 200
    sd: dict[str, Any] = torch.load(io.BytesIO(r.content), weights_only=True)
    return sd


def assert_same_state(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and bitwise(got, want), path
    elif isinstance(want, dict):
        assert {str(k) for k in got} == {str(k) for k in want}, path
        by = {str(k): v for k, v in got.items()}
        for k, v in want.items():
            assert_same_state(by[str(k)], v, f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_state(a, b, f"{path}.{i}")
    else:
        assert got == want or (got != got and want != want), (path, got, want)


def params_of(http: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    return tensors_from_json(http.get(f"/v1/sessions/{sid}/params").json()["params"])


CONFIGS = [
    {"lr": 1, "max_iter": 5, "history_size": 3},
    {"lr": 0.5, "max_iter": 20, "history_size": 10},
    {"lr": 1, "max_iter": 6, "history_size": 2, "line_search_fn": "strong_wolfe"},
    {"lr": 1, "max_iter": 12, "history_size": 5, "line_search_fn": "strong_wolfe",
     "tolerance_change": 1e-12, "tolerance_grad": 1e-10},
]


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in
                                                                      o.items()))
def test_lbfgs_equals_torch(http: httpx.Client, options: dict[str, Any], fmt: str) -> None:
    sid = create(http, options)
    local = Local(options)
    for i in range(4):
        want_loss, want_calls = local.step()
        at = {n: p.detach().clone() for n, p in params_of(http, sid).items()}
        answer, computed = remote_step(http, sid, fmt=fmt, inline=i % 2 == 1, at=at)
        assert answer["version"] == answer["step"] == i + 1
        assert answer["loss"] == want_loss, i
        assert answer["evaluations"] == computed == want_calls, i
        for n, p in local.params.items():
            assert bitwise(answer["params"][n], p.detach()), (i, n)
    assert_same_state(state_of(http, sid)["state"], local.opt.state_dict()["state"])

    # the state travels both ways: exported into a local LBFGS, and a local one imported
    exported = state_of(http, sid)
    resumed = Local(options, {n: p.detach() for n, p in local.params.items()})
    resumed.opt.load_state_dict(exported)
    twin = create(http, options, start={n: p.detach() for n, p in local.params.items()})
    buf = io.BytesIO()
    torch.save(local.opt.state_dict(), buf)
    r = http.put(f"/v1/sessions/{twin}/state_dict?format=torch", content=buf.getvalue(),
                 headers={"content-type": BINARY})
    assert r.status_code == 200, r.text
    for _ in range(2):
        local.step()
        resumed.step()
        for target in (sid, twin):
            answer, _ = remote_step(http, target, fmt=fmt)
            for n, p in local.params.items():
                assert bitwise(answer["params"][n], p.detach()), (target, n)
                assert bitwise(resumed.params[n].detach(), p.detach()), n


def test_an_al_list_longer_than_lbfgs_keeps_is_refused(http: httpx.Client) -> None:
    """torch makes an LBFGS state's scratch list ``al`` ``history_size`` long and keeps it so:
    a ``torch.save`` file whose ``al`` holds more (one more tensor, or 200,000 entries at a
    byte each) is a 422 naming it, and the session is as it was; the local state itself
    imports, and the session then steps as torch."""
    options = {"lr": 0.1, "max_iter": 4, "history_size": 5}
    sid = create(http, options)
    local = Local(options)
    local.step()
    remote_step(http, sid)
    sd = local.opt.state_dict()
    assert len(sd["state"][0]["al"]) == 5
    before = _snapshot(http, sid)
    for al in ([torch.tensor(float(i)) for i in range(6)], [None] * 200_000):
        long = copy.deepcopy(sd)
        long["state"][0]["al"] = al
        buf = io.BytesIO()
        torch.save(long, buf)
        r = http.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=buf.getvalue(),
                     headers={"content-type": BINARY})
        assert r.status_code == 422, r.text
        assert (r.json()["code"], r.json()["field"]) == ("state_mismatch",
                                                         "state_dict.state.0.al"), r.text
        _assert_snapshot(http, sid, before)
    buf = io.BytesIO()
    torch.save(sd, buf)
    r = http.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=buf.getvalue(),
                 headers={"content-type": BINARY})
    assert r.status_code == 200, r.text
    local.step()
    answer, _ = remote_step(http, sid)
    for n, p in local.params.items():
        assert bitwise(answer["params"][n], p.detach()), n


def test_an_export_made_before_the_history_updates_imports_back(http: httpx.Client) -> None:
    """torch makes ``al`` at the first update of the history: after steps of one iteration
    each (``max_iter: 1``) the state has none. That export was refused by the import of a
    session made alike (422 ``state_mismatch``, ``al`` missing); it now imports, in JSON and as
    a torch file, and the session steps on as torch does."""
    options = {"lr": 0.1, "max_iter": 1}
    sid = create(http, options)
    local = Local(options)
    local.step()
    remote_step(http, sid)
    assert "al" not in local.opt.state_dict()["state"][0]
    assert_same_state(state_of(http, sid)["state"], local.opt.state_dict()["state"])
    exported = http.get(f"/v1/sessions/{sid}/state_dict").json()
    as_file = http.get(f"/v1/sessions/{sid}/state_dict?format=torch").content
    for body in ({"json": exported},
                 {"content": as_file, "headers": {"content-type": BINARY}}):
        new = create(http, options)
        query = "" if "json" in body else "?format=torch"
        r = http.put(f"/v1/sessions/{new}/state_dict{query}", **body)  # type: ignore[arg-type]
        assert r.status_code == 200, r.text
        assert http.put(f"/v1/sessions/{new}/params", json={"params": {
            n: json_tensor(p.detach()) for n, p in local.params.items()}}).status_code == 200
        twin = Local(options, {n: p.detach() for n, p in local.params.items()})
        twin.opt.load_state_dict(copy.deepcopy(local.opt.state_dict()))
        twin.step()
        answer, _ = remote_step(http, new)
        for n, p in twin.params.items():
            assert bitwise(answer["params"][n], p.detach()), n
        assert_same_state(state_of(http, new)["state"], twin.opt.state_dict()["state"])


@pytest.mark.parametrize("max_eval", [0, -3])
def test_a_line_search_with_no_evaluation_to_spend_is_refused(http: httpx.Client,
                                                              max_eval: int) -> None:
    """torch's strong_wolfe line search given ``max_eval`` < 1 raises UnboundLocalError at the
    step (its constructor takes it): a create, or a PATCH that makes a group so, was a bare
    500 (the options' check steps a throwaway LBFGS). A 422 naming ``max_eval``, nothing made
    or changed; with ``max_eval`` 1 the session steps as torch."""
    wolfe = {"lr": 1, "max_iter": 4, "line_search_fn": "strong_wolfe"}
    with pytest.raises(UnboundLocalError):
        Local({**wolfe, "max_eval": max_eval}).step()
    sid = f"lbfgs-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "LBFGS", "options": {**wolfe, "max_eval": max_eval},
        "params": {n: json_tensor(t) for n, t in START.items()}})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (r.json()["code"], r.json()["field"]) == ("invalid_option", "options.max_eval")
    assert "max_eval must be at least 1" in r.json()["detail"]
    assert http.get(f"/v1/sessions/{sid}").status_code == 404
    sid = create(http, wolfe)
    before = state_of(http, sid), http.get(f"/v1/sessions/{sid}").json()
    r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"max_eval": max_eval})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_option", "param_groups.0.max_eval")
    assert_same_state(state_of(http, sid), before[0])
    assert http.get(f"/v1/sessions/{sid}").json() == before[1]
    r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"max_eval": 1})
    assert r.status_code == 200, r.text
    local = Local({**wolfe, "max_eval": 1})
    for _ in range(2):
        answer, evaluations = remote_step(http, sid)
        loss, calls = local.step()
        assert (answer["loss"], evaluations) == (loss, calls)
    for n, t in params_of(http, sid).items():
        assert bitwise(t, local.params[n].detach()), n


def test_a_create_with_a_huge_max_iter_holds_no_other_session(http: httpx.Client) -> None:
    """The checks of a create's (and a PATCH's) options step a throwaway LBFGS on the device's
    worker, which every session's step waits for: with ``max_iter`` 10**7 and tolerances that
    never stop it, that step ran some 8 minutes (200,000: 9.8 s). Both are answered at once
    now, another session's step beside them too, and the session's options are the client's;
    it then steps as torch (the real step's iterations are the client's evaluations)."""
    huge = {"lr": 1, "max_iter": 10**7, "tolerance_grad": -1.0, "tolerance_change": -1.0}
    other = create(http, {"lr": 1, "max_iter": 2})
    done: list[int] = []

    def step_other() -> None:
        time.sleep(0.2)
        answer, _ = remote_step(http, other)
        done.append(answer["version"])

    beside = threading.Thread(target=step_other)
    beside.start()
    with httpx.Client(base_url=str(http.base_url), timeout=60) as slow:
        sid = create(slow, huge)
        r = slow.patch(f"/v1/sessions/{sid}/param_groups/0", json={"max_iter": 10**7 + 1})
        assert r.status_code == 200, r.text
        assert r.json()["param_groups"][0]["max_iter"] == 10**7 + 1
        r = slow.patch(f"/v1/sessions/{sid}/param_groups/0", json={"max_iter": 3})
        assert r.status_code == 200, r.text
    beside.join(60)
    assert done == [1]
    local = Local({**huge, "max_iter": 3, "max_eval": 10**7 * 5 // 4})  # (made at create)
    loss, calls = local.step()
    answer, evaluations = remote_step(http, sid)
    assert (answer["loss"], evaluations) == (loss, calls)
    for n, p in local.params.items():
        assert bitwise(answer["params"][n], p.detach()), n


def test_lbfgs_with_scheduler_and_return_none(http: httpx.Client) -> None:
    options = {"lr": 1, "max_iter": 4, "history_size": 3}
    sid = create(http, options, scheduler={"name": "StepLR",
                                           "options": {"step_size": 1, "gamma": 0.5}})
    local = Local(options)
    sched = torch.optim.lr_scheduler.StepLR(local.opt, step_size=1, gamma=0.5)
    for _ in range(3):
        local.step()
        sched.step()
        answer, _ = remote_step(http, sid, query="?return=none")
        assert "params" not in answer
        assert answer["lr"] == [local.opt.param_groups[0]["lr"]]
    for n, got in params_of(http, sid).items():
        assert bitwise(got, local.params[n].detach()), n


def test_other_sessions_step_while_an_lbfgs_step_waits(http: httpx.Client) -> None:
    """The step waits on the client, not on the device worker: another session steps many
    times meanwhile, and the LBFGS step then finishes as torch's would."""
    options = {"lr": 1, "max_iter": 5, "history_size": 3}
    sid = create(http, options)
    r = http.post(f"/v1/sessions/{sid}/step")
    question = r.json()
    assert question["needs"] == "evaluation" and question["evaluations"] == 0
    other = f"sgd-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/sessions", json={"id": other, "optimizer": "SGD",
                                        "options": {"lr": 0.1},
                                        "params": {"x": json_tensor(torch.ones(8))}})
    assert r.status_code == 201
    started = time.monotonic()
    for _ in range(20):
        r = http.post(f"/v1/sessions/{other}/step", json={"grads": {"x": json_tensor(
            torch.ones(8))}}, timeout=5)
        assert r.status_code == 200
    assert time.monotonic() - started < 10
    # reads of the LBFGS session meanwhile see it as it was before the step
    assert http.get(f"/v1/sessions/{sid}").json()["version"] == 0
    assert all(bitwise(t, START[n]) for n, t in params_of(http, sid).items())
    local = Local(options)
    local.step()
    loss, grads = evaluate(tensors_from_json(question["params"]))
    r = http.post(f"/v1/sessions/{sid}/step/{question['evaluation']}",
                  json={"loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}})
    answer = _decode(r)
    while answer.get("needs"):
        loss, grads = evaluate(answer["params"])
        answer = _decode(http.post(f"/v1/sessions/{sid}/step/{answer['evaluation']}",
                                   json={"loss": loss, "grads": {n: json_tensor(g) for n, g in
                                                                 grads.items()}}))
    for n, p in local.params.items():
        assert bitwise(answer["params"][n], p.detach()), n


def _snapshot(http: httpx.Client, sid: str) -> tuple[dict[str, torch.Tensor], Any, int]:
    info = http.get(f"/v1/sessions/{sid}").json()
    return params_of(http, sid), state_of(http, sid), info["version"]


def _assert_snapshot(http: httpx.Client, sid: str,
                     before: tuple[dict[str, torch.Tensor], Any, int]) -> None:
    params, state, version = _snapshot(http, sid)
    assert version == before[2]
    for n, t in before[0].items():
        assert bitwise(params[n], t), n
    assert_same_state(state, before[1])


def test_abandoned_steps_leave_the_session_unchanged(http: httpx.Client) -> None:
    options = {"lr": 0.1, "max_iter": 8, "history_size": 4}  # 8 evaluations every step
    sid = create(http, options)
    local = Local(options)
    local.step()
    remote_step(http, sid)
    before = _snapshot(http, sid)

    # timed out after two evaluations (the line search had moved the copy's parameters)
    r = http.post(f"/v1/sessions/{sid}/step?timeout_s=0.5")
    question = r.json()
    assert question["timeout_s"] == 0.5
    for _ in range(2):
        loss, grads = evaluate(tensors_from_json(question["params"]))
        r = http.post(f"/v1/sessions/{sid}/step/{question['evaluation']}", json={
            "loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}})
        question = r.json()
        assert question["needs"] == "evaluation"
    time.sleep(1.0)
    r = http.post(f"/v1/sessions/{sid}/step/{question['evaluation']}",
                  json={"loss": 1.0, "grads": {}})
    assert r.status_code == 409 and r.json()["code"] == "step_ended", r.text
    assert r.json()["outcome"] == "abandoned"
    _assert_snapshot(http, sid, before)

    # abandoned by the client
    question = http.post(f"/v1/sessions/{sid}/step").json()
    r = http.delete(f"/v1/sessions/{sid}/step/{question['step_id']}")
    assert r.status_code == 200 and r.json() == {"step_id": question["step_id"],
                                                 "outcome": "abandoned"}
    _assert_snapshot(http, sid, before)
    assert http.delete(f"/v1/sessions/{sid}/step/nope").status_code == 404

    # and the next step goes on from where the session was
    local.step()
    answer, _ = remote_step(http, sid)
    for n, p in local.params.items():
        assert bitwise(answer["params"][n], p.detach()), n


def test_protocol_refusals_and_retries(http: httpx.Client) -> None:
    options = {"lr": 1, "max_iter": 5, "history_size": 3}
    sid = create(http, options)
    local = Local(options)
    local.step()
    key = {"idempotency-key": f"open-{uuid.uuid4().hex}"}
    first = http.post(f"/v1/sessions/{sid}/step", headers=key).json()
    eid = first["evaluation"]
    # a second open is refused; a retry of this one (same key) gets the same question
    r = http.post(f"/v1/sessions/{sid}/step")
    assert r.status_code == 409 and r.json()["code"] == "step_in_progress"
    assert (r.json()["step_id"], r.json()["evaluation"]) == (first["step_id"], eid)
    again = http.post(f"/v1/sessions/{sid}/step", headers=key).json()
    assert again["evaluation"] == eid
    # other mutations wait for the end of the step: 409 meanwhile
    r = http.put(f"/v1/sessions/{sid}/params", json={"params": {"w": json_tensor(torch.ones(4))}})
    assert r.status_code == 409 and r.json()["code"] == "step_in_progress"
    # bad evaluations: the step stays open at the same question
    bad = [({"loss": 1.0, "grads": {"w": json_tensor(torch.ones(5))}}, "shape_mismatch",
            "grads.w"),
           ({"loss": 1.0, "grads": {"nope": json_tensor(torch.ones(1))}}, "unknown_parameter",
            "grads.nope"),
           ({"loss": "NaN", "grads": {}}, "nonfinite_loss", "loss"),
           ({"loss": 1.0, "grads": {"w": json_tensor(torch.full((4,), float("inf")))}},
            "nonfinite_gradient", "grads.w"),
           ({"grads": {}}, "missing_field", "loss"),
           ({"loss": "one"}, "invalid_loss", "loss"),
           ({"loss": 1.0, "extra": 1}, "unknown_field", "extra")]
    for body, code, field in bad:
        r = http.post(f"/v1/sessions/{sid}/step/{eid}", json=body)
        assert r.status_code == 422 and (r.json()["code"], r.json()["field"]) == (code, field), \
            r.text
    # in a safetensors body, __metadata__ holds the loss (and format) only: a param_groups or
    # scalars entry (which other optimizers' steps take) is refused, never dropped unread
    for extra in ("param_groups", "scalars", "lose"):
        r = http.post(f"/v1/sessions/{sid}/step/{eid}",
                      content=write_safetensors({}, {"loss": "1.0", extra: "{}"}),
                      headers={"content-type": BINARY})
        assert r.status_code == 422 and (r.json()["code"], r.json()["field"]) == (
            "unknown_field", f"__metadata__.{extra}"), r.text
    r = http.post(f"/v1/sessions/{sid}/step/{first['step_id']}.9", json={"loss": 1.0})
    assert r.status_code == 409 and r.json()["code"] == "evaluation_not_pending"
    r = http.post(f"/v1/sessions/{sid}/step/nope.1", json={"loss": 1.0})
    assert r.status_code == 404 and r.json()["code"] == "evaluation_not_found"
    # an evaluation posted twice (a retry) gets the same answer; other values are refused
    loss, grads = evaluate(tensors_from_json(first["params"]))
    body = {"loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}}
    one = http.post(f"/v1/sessions/{sid}/step/{eid}", json=body)
    two = http.post(f"/v1/sessions/{sid}/step/{eid}", json=body)
    assert one.status_code == two.status_code == 200 and one.json() == two.json()
    r = http.post(f"/v1/sessions/{sid}/step/{eid}", json={**body, "loss": loss + 1})
    assert r.status_code == 409 and r.json()["code"] == "evaluation_answered"
    answer = _decode(one)
    while answer.get("needs"):
        loss, grads = evaluate(answer["params"])
        answer = _decode(http.post(f"/v1/sessions/{sid}/step/{answer['evaluation']}", json={
            "loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}}))
    for n, p in local.params.items():
        assert bitwise(answer["params"][n], p.detach()), n
    # the open's key, retried after the step ended: its answer, nothing applied again
    r = http.post(f"/v1/sessions/{sid}/step", headers=key)
    assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true"
    replayed = r.json()
    assert (replayed["version"], replayed["loss"], replayed["evaluations"], replayed["replayed"]) \
        == (1, answer["loss"], answer["evaluations"], True)
    assert http.get(f"/v1/sessions/{sid}").json()["version"] == 1
    # evaluations belong to LBFGS steps of this session
    other = f"sgd-{uuid.uuid4().hex[:8]}"
    http.post("/v1/sessions", json={"id": other, "optimizer": "SGD", "options": {"lr": 0.1},
                                    "params": {"x": json_tensor(torch.ones(2))}})
    r = http.post(f"/v1/sessions/{other}/step/{eid}", json={"loss": 1.0})
    # (a session of another optimizer takes none: 422 not_an_evaluation_session, as
    # docs/protocol.md lists it; this was a 404 evaluation_not_found, as for an unknown id)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("not_an_evaluation_session", "optimizer")
    assert http.get(f"/v1/sessions/{other}").json()["version"] == 0
    other_lbfgs = create(http, options)
    r = http.post(f"/v1/sessions/{other_lbfgs}/step/{eid}", json={"loss": 1.0})
    assert r.status_code == 404 and r.json()["code"] == "evaluation_not_found", r.text
    for bad in ("0", "1_0", "\u0663", " 5", "inf", "nan", "1e9", "-1", "0x10"):
        r = http.post(f"/v1/sessions/{sid}/step", params={"timeout_s": bad}, json={})
        assert r.status_code == 422 and r.json()["field"] == "timeout_s", (bad, r.text)
    assert http.get(f"/v1/sessions/{sid}").json()["version"] == 1
    # pushed gradients are refused on an LBFGS session: it takes evaluations
    r = http.post(f"/v1/sessions/{sid}/grads", json={"grads": {"w": json_tensor(torch.ones(4))}})
    assert r.status_code == 422 and r.json()["code"] == "evaluation_protocol"


def test_an_opening_evaluations_unknown_metadata_is_refused(http: httpx.Client) -> None:
    """The first evaluation riding with the open, in safetensors: an option change in its
    ``__metadata__.param_groups`` (or any entry but ``loss`` and ``format``) is a 422
    ``unknown_field``, no step opened; the step ran at the group's own lr before."""
    options = {"lr": 1, "max_iter": 5, "history_size": 3}
    sid = create(http, options)
    loss, grads = evaluate(START)
    for extra in ({"param_groups": '[{"lr": 0.5}]'}, {"scalars": '{"acc": 1}'}):
        r = http.post(f"/v1/sessions/{sid}/step", content=write_safetensors(
            grads, {"loss": json.dumps(loss), **extra}), headers={"content-type": BINARY})
        assert r.status_code == 422 and (r.json()["code"], r.json()["field"]) == (
            "unknown_field", f"__metadata__.{next(iter(extra))}"), r.text
    assert http.get(f"/v1/sessions/{sid}").json()["version"] == 0
    local = Local(options)
    local.step()
    r = http.post(f"/v1/sessions/{sid}/step", content=write_safetensors(
        grads, {"loss": json.dumps(loss), "format": "pt"}), headers={"content-type": BINARY})
    answer = _decode(r)
    while answer.get("needs"):
        loss, grads = evaluate(answer["params"])
        answer = _decode(http.post(f"/v1/sessions/{sid}/step/{answer['evaluation']}",
                                   **_body(loss, grads, "json")))
    for n, p in local.params.items():
        assert bitwise(answer["params"][n], p.detach()), n


def test_nonfinite_skip_policy_skips_the_step(http: httpx.Client) -> None:
    sid = create(http, {"lr": 1, "max_iter": 4}, nonfinite="skip")
    before = _snapshot(http, sid)
    question = http.post(f"/v1/sessions/{sid}/step").json()
    r = http.post(f"/v1/sessions/{sid}/step/{question['evaluation']}",
                  json={"loss": "Infinity", "grads": {}})
    assert r.status_code == 200 and r.json()["skipped"] is True and r.json()["version"] == 0
    _assert_snapshot(http, sid, before)


def test_lbfgs_step_survives_kill9(tmp_path: Path) -> None:
    """An acknowledged LBFGS step is in the log (fsynced before the answer): after kill -9
    the session is exactly at it and goes on like torch; a step open at the crash never
    happened."""
    options = {"lr": 1, "max_iter": 6, "history_size": 3, "line_search_fn": "strong_wolfe"}
    proc = Proc(tmp_path / "data").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            sid = create(http, options, sid="crash-lbfgs")
            local = Local(options)
            for _ in range(2):
                local.step()
                answer, _ = remote_step(http, sid, fmt="safetensors")
            question = http.post(f"/v1/sessions/{sid}/step").json()  # open at the crash
            assert question["needs"] == "evaluation"
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            params, state, version = _snapshot(http, sid)
            assert version == 2
            for n, p in local.params.items():
                assert bitwise(params[n], p.detach()), n
            assert_same_state(state["state"], local.opt.state_dict()["state"])
            local.step()
            answer, _ = remote_step(http, sid)
            for n, p in local.params.items():
                assert bitwise(answer["params"][n], p.detach()), n
    finally:
        proc.stop()


def test_a_tensor_lr_filled_between_steps_moves_t_as_in_torch(tmp_path: Path) -> None:
    """torch's LBFGS leaves its ``t`` the group's tensor lr itself (``t = lr``, past a step's
    first iteration without a line search), and the next step's first update reads it: a
    scheduler's in-place fill of the lr, or a client's ``$fill``, moves it. The step ran on a
    copy and kept the copy's lr as ``t``, so after a fill the session went on unlike torch
    (StepLR halving a 0.5 lr: [2.6411, 2.8206] for torch's [2.5514, 2.7757] after three steps).
    Bitwise torch now, live, after a SIGTERM restart (restored from the snapshot the stop
    writes) and after kill -9 (replayed)."""
    options = {"lr": 0.5, "max_iter": 3}
    lr = torch.tensor(0.5)
    local = Local({**options, "lr": lr})
    sched = torch.optim.lr_scheduler.StepLR(local.opt, step_size=1, gamma=0.5)
    proc = Proc(tmp_path / "data").start()
    try:
        def step_both(http: httpx.Client) -> None:
            local.step()
            sched.step()
            answer, _ = remote_step(http, "lbfgs-t")
            for n, p in local.params.items():
                assert bitwise(answer["params"][n], p.detach()), n

        def fill_both(http: httpx.Client, value: float) -> None:
            r = http.patch("/v1/sessions/lbfgs-t/param_groups/0",
                           json={"lr": value, "$fill": ["lr"]})
            assert r.status_code == 200, r.text
            lr.fill_(value)

        with httpx.Client(base_url=proc.url, timeout=30) as http:
            create(http, {**options, "lr": json_tensor(torch.tensor(0.5))}, sid="lbfgs-t",
                   scheduler={"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}})
            for _ in range(3):
                step_both(http)
            fill_both(http, 0.3)
            step_both(http)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            fill_both(http, 0.2)
            step_both(http)
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            fill_both(http, 0.4)
            step_both(http)
    finally:
        proc.stop()


def test_concurrent_evaluation_posts_are_answered_once(http: httpx.Client) -> None:
    """Two posts of one evaluation at once (a client retrying on a slow answer): one is taken,
    the other waits for the same answer or is told to wait; the step moves on once."""
    options = {"lr": 1, "max_iter": 3}
    sid = create(http, options)
    question = http.post(f"/v1/sessions/{sid}/step").json()
    loss, grads = evaluate(tensors_from_json(question["params"]))
    body = {"loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}}
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(http.post(f"/v1/sessions/{sid}/step/{question['evaluation']}",
                                 json=body))
    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [a for a in answers if a.status_code == 200]
    assert ok and all(a.status_code in (200, 409) for a in answers)
    assert all(a.json() == ok[0].json() for a in ok)
    nxt = ok[0].json()
    if nxt.get("needs"):
        r = http.delete(f"/v1/sessions/{sid}/step/{nxt['step_id']}")
        assert r.json()["outcome"] == "abandoned"


def test_base_version_and_if_match_must_name_the_current_version(http: httpx.Client) -> None:
    """An LBFGS step evaluates the session's current parameters, so a ``base_version`` (or
    ``If-Match``) must be the session's version: an older one is 409 ``stale_gradient``, one it
    never had 422 ``invalid_base_version``, both before anything changes (whatever
    ``max_staleness``); the current one steps as torch does. (They were ignored: a step with
    an evaluation of version 0's parameters stepped a session at version 2.)"""
    options = {"lr": 0.5, "max_iter": 3}
    sid = create(http, options, max_staleness=5)
    local = Local(options)
    for k in range(2):
        answer, _ = remote_step(http, sid, query=f"?base_version={k}")
        assert answer["version"] == k + 1
        local.step()
    before = _snapshot(http, sid)
    loss, grads = evaluate(START)  # the first evaluation at version 0's parameters
    stale = http.post(f"/v1/sessions/{sid}/step?base_version=0", **_body(loss, grads, "json"))
    assert stale.status_code == 409, stale.text
    problem = stale.json()
    assert problem["code"] == "stale_gradient" and problem["field"] == "base_version"
    assert problem["current_version"] == 2 and problem["base_version"] == 0
    r = http.post(f"/v1/sessions/{sid}/step", headers={"If-Match": '"1"'})
    assert r.status_code == 409 and r.json()["code"] == "stale_gradient"
    never = http.post(f"/v1/sessions/{sid}/step?base_version=99")
    assert never.status_code == 422 and never.json()["code"] == "invalid_base_version"
    _assert_snapshot(http, sid, before)
    answer, _ = remote_step(http, sid, query="?base_version=2")
    want_loss, _ = local.step()
    assert answer["version"] == 3 and answer["loss"] == want_loss
    params = params_of(http, sid)
    for n, t in local.params.items():
        assert bitwise(params[n], t.detach()), n


def test_a_long_history_imports_as_a_torch_file(http: httpx.Client) -> None:
    """An LBFGS state holds up to ``2 * history_size + 2`` vectors of every parameter's
    elements, more than the four copies of the parameters other optimizers stay under: a
    ``torch.save`` file of such a state (a local run's, and the session's own export) imports."""
    n = 200_000
    start = {"x": torch.zeros(n)}
    scale = torch.linspace(0.5, 50.0, n)
    options = {"lr": 1, "max_iter": 20, "history_size": 20}
    sid = create(http, options, start=start)
    x = start["x"].clone().requires_grad_()
    opt = torch.optim.LBFGS([x], **options)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (0.5 * scale * x * x - x).sum()
        loss.backward()
        return loss
    opt.step(closure)
    sd = opt.state_dict()
    assert len(sd["state"][0]["old_dirs"]) >= 13  # past four copies of x and 16 MiB
    buf = io.BytesIO()
    torch.save(sd, buf)
    url = f"/v1/sessions/{sid}/state_dict"
    headers = {"content-type": BINARY}
    body = buf.getvalue()
    for _ in ("local", "own export"):
        r = http.put(f"{url}?format=torch", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert_same_state(state_of(http, sid)["state"], sd["state"])
        body = http.get(f"{url}?format=torch").content
    http.delete(f"/v1/sessions/{sid}")
