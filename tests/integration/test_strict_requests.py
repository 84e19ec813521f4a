"""Every ``/v1`` operation refuses what it would otherwise ignore and run anyway
(``app.api.strict_requests``), against a real uvicorn on 127.0.0.1, before anything is done:
- a query parameter it does not take: 422 ``invalid_query`` naming it;
- on a change, an ``If-Match``/``If-None-Match`` it does not evaluate: 422
  ``unsupported_precondition`` naming it.

Before, only the step refused unknown query names: ``PUT .../state_dict?base_verison=3``
imported unconditionally over a session that had moved on, and ``GET .../params?min_verison=9
&wait_s=5`` answered at once with the version the client meant to wait past. And every change
but the step and the import ignored ``If-Match``: a ``DELETE`` with ``If-Match: "999"`` deleted
the session. (The changes whose operation lists ``If-Match`` evaluate it now:
``test_conditional_changes``.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.torch_reference import Reference, assert_tensors_equal, json_tensor, tensors_from_json

pytestmark = pytest.mark.integration

OPENAPI = json.loads((Path(__file__).parents[2] / "openapi.json").read_text())
#: what each operation's placeholders are filled with (a session made by ``made``)
PLACEHOLDERS = {"session_id": "{sid}", "index": "0", "eval_id": "e1", "step_id": "s1"}


def operations() -> list[tuple[str, str, tuple[str, ...]]]:
    """(method, path, documented query names) of every /v1 operation of the contract."""
    out = []
    for path, ops in sorted(OPENAPI["paths"].items()):
        if not path.startswith("/v1/"):
            continue
        for method, op in sorted(ops.items()):
            names = tuple(p["name"] for p in op.get("parameters", ()) if p["in"] == "query")
            out.append((method.upper(), path, names))
    return out


def made(http: httpx.Client, sid: str) -> tuple[Reference, dict[str, torch.Tensor]]:
    """A fresh Adam session ``sid`` stepped twice, and its in-process twin."""
    http.delete(f"/v1/sessions/{sid}")
    w = torch.randn(5, generator=torch.Generator().manual_seed(7))
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "Adam",
                                        "options": {"lr": 0.01},
                                        "params": {"w": json_tensor(w)}})
    assert r.status_code == 201, r.text
    ref = Reference(torch.optim.Adam, [({"w": w}, {})], {"lr": 0.01})
    for seed in (1, 2):
        g = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(g)}})
        assert r.status_code == 200, r.text
        ref.step({"w": g})
    return ref, dict(ref.params)


def current(http: httpx.Client, sid: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    desc = http.get(f"/v1/sessions/{sid}").json()
    params = tensors_from_json(http.get(f"/v1/sessions/{sid}/params").json()["params"])
    return desc, params


def assert_refused(r: httpx.Response, name: str) -> None:
    assert r.status_code == 422, (r.status_code, r.text)
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == "invalid_query"
    assert problem["field"] == name
    assert f"{name!r} is not a query parameter" in problem["detail"]


def request_to(method: str, path: str, sid: str) -> tuple[str, dict[str, Any] | None]:
    """The URL of ``method path`` for session ``sid``, and a body the operation would take
    where it takes one (a refusal must not depend on the body being wrong)."""
    url = path.format(**{k: v.format(sid=sid) for k, v in PLACEHOLDERS.items()})
    body = ({"grads": {"w": json_tensor(torch.ones(5))}} if method == "POST"
            else {"params": {"w": json_tensor(torch.zeros(5))}} if method == "PUT"
            else {"lr": 0.5} if method == "PATCH" and path.endswith("{index}")
            else {"max_staleness": 3} if method == "PATCH" else None)
    return url, body


def pending(http: httpx.Client, sid: str
            ) -> tuple[Reference, dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`made`, plus gradients pushed for its next step; and its description."""
    ref, want = made(http, sid)
    http.post(f"/v1/sessions/{sid}/grads",
              json={"grads": {"w": json_tensor(torch.ones(5))}}).raise_for_status()
    before, params = current(http, sid)
    assert_tensors_equal(params, want, "before")
    return ref, want, before


def assert_as_it_was(http: httpx.Client, sid: str, ref: Reference,
                     want: dict[str, torch.Tensor], before: dict[str, Any]) -> None:
    """The session as :func:`pending` left it: its description (version, revision, options,
    scheduler, sync), its parameters, and its pending gradients, which its next step uses,
    equal to torch."""
    after, params = current(http, sid)
    assert after == before
    assert_tensors_equal(params, want, "after the refusals")
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {}})
    assert r.status_code == 200, r.text
    ref.step({"w": torch.ones(5)})
    assert_tensors_equal(tensors_from_json(r.json()["params"]), ref.params, "next step")


@pytest.mark.parametrize("method,path,names", operations(), ids=lambda v: str(v))
def test_an_unknown_query_parameter_is_refused_and_nothing_changes(
    live_server: str, method: str, path: str, names: tuple[str, ...]
) -> None:
    sid = "strict-q"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ref, want, before = pending(http, sid)
        url, body = request_to(method, path, sid)
        r = http.request(method, url, params={"bogus": "1"}, json=body)
        assert_refused(r, "bogus")
        # one documented name beside it does not make it pass
        if names:
            r = http.request(method, url, params=[(names[0], "1"), ("bogus", "1")], json=body)
            assert_refused(r, "bogus")
        assert_as_it_was(http, sid, ref, want, before)


@pytest.mark.parametrize("method,path,names", [op for op in operations() if op[2]],
                         ids=lambda v: str(v))
def test_every_documented_query_parameter_is_taken(
    live_server: str, method: str, path: str, names: tuple[str, ...]
) -> None:
    """The check refuses exactly the undocumented: each documented name gets past it (a value
    it finds wrong is that parameter's own 422, never 'not a query parameter')."""
    sid = "strict-q-known"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        made(http, sid)
        url, _ = request_to(method, path, sid)
        for name in names:
            r = http.request(method, url, params={name: "1"})
            assert "is not a query parameter" not in r.text, (name, r.text)


def test_a_misspelt_precondition_imports_nothing(live_server: str) -> None:
    sid = "strict-q-import"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ref, want = made(http, sid)
        exported = http.get(f"/v1/sessions/{sid}/state_dict").json()
        r = http.post(f"/v1/sessions/{sid}/step",
                      json={"grads": {"w": json_tensor(torch.full((5,), 0.5))}})
        assert r.status_code == 200, r.text
        ref.step({"w": torch.full((5,), 0.5)})
        before, params = current(http, sid)
        assert before["version"] == 3
        # the client meant "only if still at version 2": misspelt, it must not import
        r = http.put(f"/v1/sessions/{sid}/state_dict?base_verison=2", json=exported)
        assert_refused(r, "base_verison")
        after, params = current(http, sid)
        assert after == before
        assert_tensors_equal(params, ref.params, "not imported")
        state = http.get(f"/v1/sessions/{sid}/state_dict").json()
        assert state["state"]["0"]["step"]["data"] == [3.0]
        # spelt right: the 412 the client asked for
        r = http.put(f"/v1/sessions/{sid}/state_dict?base_version=2", json=exported)
        assert r.status_code == 412, r.text


def test_a_misspelt_long_poll_bound_answers_at_once_with_a_422(live_server: str) -> None:
    sid = "strict-q-poll"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        made(http, sid)
        start = time.monotonic()
        r = http.get(f"/v1/sessions/{sid}/params?min_verison=9&wait_s=30")
        assert_refused(r, "min_verison")
        assert time.monotonic() - start < 10
        # HEAD is GET's check too
        r = http.head(f"/v1/sessions/{sid}/params?min_verison=9")
        assert r.status_code == 422


def test_probes_and_scrapers_may_add_their_own_query(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            r = http.get(path, params={"_": "1700000000"})
            assert r.status_code == 200, (path, r.text)


def unevaluated() -> list[tuple[str, str, str]]:
    """(method, path, precondition) of each /v1 change (POST, PUT, PATCH, DELETE) and each of
    If-Match / If-None-Match its contract does not list (those it lists have their own tests:
    test_state_dict's conditional imports, test_parameter_server's base versions)."""
    out = []
    for path, ops in sorted(OPENAPI["paths"].items()):
        for method, op in sorted(ops.items()):
            if path.startswith("/v1/") and method in ("post", "put", "patch", "delete"):
                listed = {p["name"] for p in op.get("parameters", ()) if p["in"] == "header"}
                out.extend((method.upper(), path, header)
                           for header in ("If-Match", "If-None-Match") if header not in listed)
    return out


def test_the_contract_lists_the_preconditions_the_server_evaluates() -> None:
    listed = set(unevaluated())
    S = "/v1/sessions/{session_id}"
    evaluated = [("POST", f"{S}/step", "If-Match"), ("POST", f"{S}/params/rows", "If-None-Match"),
                 ("POST", f"{S}/params/rows", "If-Match")]  # (a read: test_conditional_reads)
    evaluated += [(method, path, "If-Match") for method, path in (
        ("PUT", f"{S}/state_dict"), ("PUT", f"{S}/params"), ("DELETE", S), ("PATCH", S),
        ("POST", f"{S}/param_groups"), ("PATCH", f"{S}/param_groups/{{index}}"),
        ("POST", f"{S}/scheduler/step"))]
    for each in evaluated:
        assert each not in listed
    assert ("POST", f"{S}/grads", "If-Match") in listed
    assert ("DELETE", S, "If-None-Match") in listed
    assert len(listed) == 2 * 14 - len(evaluated)  # 14 changes


@pytest.mark.parametrize("method,path,header", unevaluated(), ids=lambda v: str(v))
def test_a_precondition_a_change_does_not_evaluate_is_refused_and_nothing_changes(
    live_server: str, method: str, path: str, header: str
) -> None:
    sid = "strict-pre"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ref, want, before = pending(http, sid)
        url, body = request_to(method, path, sid)
        # the session's own current version: refused all the same (not evaluated, not false)
        r = http.request(method, url, json=body, headers={header: f'"{before["version"]}"'})
        assert r.status_code == 422, (r.status_code, r.text)
        assert r.json()["code"] == "unsupported_precondition"
        assert r.json()["field"] == header
        assert_as_it_was(http, sid, ref, want, before)


def test_a_stale_conditional_delete_deletes_nothing(live_server: str) -> None:
    sid = "strict-pre-delete"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        _, want = made(http, sid)
        r = http.delete(f"/v1/sessions/{sid}", headers={"If-Match": '"999"'})
        assert r.status_code == 412, r.text
        assert r.json()["field"] == "If-Match"
        _, params = current(http, sid)
        assert_tensors_equal(params, want, "still there")
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_a_create_takes_if_none_match_star_only(live_server: str) -> None:
    sid = "strict-pre-create"
    body = {"id": sid, "optimizer": "SGD", "options": {"lr": 0.1},
            "params": {"w": json_tensor(torch.ones(3))}}
    with httpx.Client(base_url=live_server, timeout=60) as http:
        http.delete(f"/v1/sessions/{sid}")
        r = http.post("/v1/sessions", json=body, headers={"If-None-Match": '"0"'})
        assert r.status_code == 422 and r.json()["field"] == "If-None-Match", r.text
        assert http.get(f"/v1/sessions/{sid}").status_code == 404
        r = http.post("/v1/sessions", json=body, headers={"If-None-Match": "*"})
        assert r.status_code == 201, r.text
        r = http.post("/v1/sessions", json=body, headers={"If-None-Match": "*"})
        assert r.status_code == 409 and r.json()["code"] == "session_exists", r.text


def test_a_read_without_a_version_ignores_preconditions_and_a_versioned_one_evaluates_them(
        live_server: str) -> None:
    """The history and the list ignore ``If-Match`` (as a cache's revalidation would); the
    session, its parameters and its state dict answer a version and evaluate it (412:
    ``test_conditional_reads``)."""
    sid = "strict-pre-read"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        made(http, sid)
        for path in (f"/v1/sessions/{sid}/history", "/v1/sessions"):
            r = http.get(path, headers={"If-Match": '"999"'})
            assert r.status_code == 200, (path, r.text)
        for path in ("", "/params", "/state_dict"):
            r = http.get(f"/v1/sessions/{sid}{path}", headers={"If-Match": '"999"'})
            assert r.status_code == 412, (path, r.text)


def changes() -> list[tuple[str, str]]:
    """(method, path) of each /v1 change (POST, PUT, PATCH, DELETE) but the step, the one
    change that takes a worker (a POST that only reads, the row pull, included: it is refused
    a worker as any POST is)."""
    return sorted((method.upper(), path) for path, ops in OPENAPI["paths"].items()
                  for method in ops if path.startswith("/v1/")
                  and method in ("post", "put", "patch", "delete")
                  and path != "/v1/sessions/{session_id}/step")


@pytest.mark.parametrize("method,path", changes(), ids=lambda v: str(v))
def test_a_worker_named_on_a_change_other_than_a_step_is_refused(
    live_server: str, method: str, path: str
) -> None:
    """A sync session: a worker's gradients pushed to /grads would join the shared
    accumulator, not that worker's push; refused, and the round still closes as torch would."""
    sid = "strict-worker"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        http.delete(f"/v1/sessions/{sid}")
        w = torch.randn(5, generator=torch.Generator().manual_seed(3))
        r = http.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                            "options": {"lr": 0.1, "momentum": 0.9},
                                            "params": {"w": json_tensor(w)},
                                            "sync": {"workers": 1}})
        assert r.status_code == 201, r.text
        before, params = current(http, sid)
        url, body = request_to(method, path, sid)
        r = http.request(method, url, json=body, headers={"X-Optserve-Worker": "w1"})
        assert r.status_code == 422, (r.status_code, r.text)
        assert r.json()["code"] == "unsupported_header"
        assert r.json()["field"] == "X-Optserve-Worker"
        after, params = current(http, sid)
        assert after == before
        assert_tensors_equal(params, {"w": w}, "unchanged")
        # the round of its one worker: exactly torch's step of that worker's gradient
        g = torch.randn(5, generator=torch.Generator().manual_seed(4))
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(g)}},
                      headers={"X-Optserve-Worker": "w1"})
        assert r.status_code == 200, r.text
        ref = Reference(torch.optim.SGD, [({"w": w}, {})], {"lr": 0.1, "momentum": 0.9})
        ref.step({"w": g})
        assert_tensors_equal(tensors_from_json(r.json()["params"]), ref.params, "the round")


@pytest.mark.parametrize(("method", "path", "body", "code"), [
    ("PATCH", "{sid}%2Fparam_groups%2F0", {"lr": 0.5}, "session_not_found"),
    ("POST", "{sid}%2Fparam_groups", {"params": {"z": [1.0]}}, "session_not_found"),
    ("PUT", "{sid}%2Fparams", {"params": {"w": [0.0] * 5}}, "session_not_found"),
    ("POST", "{sid}%2Fstep", {"grads": {"w": [1.0] * 5}}, "session_not_found"),
    ("POST", "{sid}%2Fzero_grad", None, "session_not_found"),
    ("GET", "{sid}%2fparams", None, "session_not_found"),
    ("PATCH", "{sid}/param_groups/0%2F", {"lr": 0.5}, "not_found"),
])
def test_an_encoded_slash_in_a_segment_names_no_route(live_server: str, method: str, path: str,
                                                      body: Any, code: str) -> None:
    """``PATCH /v1/sessions/s%2Fparam_groups%2F0`` (what the SDK sends for a session id
    ``s/param_groups/0``, quoted) changed group 0 of ``s``: the server routed on the decoded
    path. A segment that encodes a slash is a 404, nothing run (an id never holds a slash)."""
    sid = "strict-slash"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ref, want, before = pending(http, sid)
        tensors = ({k: ({n: json_tensor(torch.tensor(v)) for n, v in t.items()}
                        if isinstance(t, dict) else t) for k, t in body.items()}
                   if body is not None else None)
        r = http.request(method, f"/v1/sessions/{path.format(sid=sid)}", json=tensors)
        assert r.status_code == 404, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code
        if code == "session_not_found":
            assert r.json()["field"] == "session_id"
        assert_as_it_was(http, sid, ref, want, before)


@pytest.mark.parametrize("written", ["00", "01", "000"])
def test_a_steps_group_index_is_a_plain_whole_number(live_server: str, written: str) -> None:
    """A step's ``param_groups`` object keyed ``"00"`` changed group 0 (``"01"`` group 1) as
    ``"0"`` does: a key is the index itself, as ``PATCH .../param_groups/{i}``'s is; a 422
    naming it, nothing stepped."""
    sid = "strict-step-index"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ref, want, before = pending(http, sid)
        g = {"w": json_tensor(torch.ones(5))}
        r = http.post(f"/v1/sessions/{sid}/step",
                      json={"grads": g, "param_groups": {written: {"lr": 0.5}}})
        assert r.status_code == 422, (written, r.text)
        assert (r.json()["code"], r.json()["field"]) == ("invalid_body", f"param_groups.{written}")
        assert_as_it_was(http, sid, ref, want, before)
        r = http.post(f"/v1/sessions/{sid}/step",
                      json={"grads": g, "param_groups": {"0": {"lr": 0.5}}})
        assert r.status_code == 200, r.text
        assert r.json()["lr"] == [0.5]


@pytest.mark.parametrize("written", ["01", "+0", "%200", "0.0", "00"])
def test_a_group_index_is_a_plain_whole_number(live_server: str, written: str) -> None:
    """``PATCH .../param_groups/0.0`` changed group 0 (``01`` group 1): the index as the path
    writes it must be the number itself, as a history field's ``lr.01`` must."""
    sid = "strict-index"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ref, want, before = pending(http, sid)
        r = http.patch(f"/v1/sessions/{sid}/param_groups/{written}", json={"lr": 0.5})
        assert r.status_code == 422, (written, r.text)
        assert r.json()["field"] == "index"
        assert_as_it_was(http, sid, ref, want, before)
        r = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["param_groups"][0]["lr"] == 0.5
