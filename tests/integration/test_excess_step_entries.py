"""A step's safetensors body (over OFFLOAD_BYTES) naming more tensors than its session holds is
refused from its header, before any of its tensors is made (it was decoded whole first: 100,000
entries for a session of three), with the answer the step gave once its tensors were made: the
same body's answer with the refusal from the header switched off (decoded whole, every tensor
made), and the answer of the same gradients as a JSON body (422 ``unknown_parameter`` naming the
first name that is not a parameter's, or an earlier entry's ``dtype_mismatch`` /
``shape_mismatch``; a malformed ``param_groups`` first, as before). Nothing changes: the
parameters, the optimizer's state and the step count are as they were, and the next step is
torch's. Bodies that may pair into row-sparse gradients, a retry under an Idempotency-Key the
session holds, and a small body go the whole way, with their answers as before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

import app.wire.safetensors_body as safetensors_body
from app.api import sessions
from app.api.bodies import OFFLOAD_BYTES
from tests.torch_reference import json_tensor, tensors_from_json

pytestmark = pytest.mark.integration
BIN_CT = {"content-type": "application/octet-stream"}
PARAMS = {"a": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([[0.25, 4.0]]),
          "c": torch.tensor([3.0])}
GRADS = {"a": torch.tensor([0.5, 0.25, -1.0]), "b": torch.tensor([[2.0, -0.5]]),
         "c": torch.tensor([-0.75])}


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many tensors the server's safetensors reader made, body by body."""
    counts: list[int] = []
    make = safetensors_body._make_tensors

    def counted(*args: Any) -> dict[str, torch.Tensor]:
        out = make(*args)
        counts.append(len(out))
        return out
    monkeypatch.setattr(safetensors_body, "_make_tensors", counted)
    yield counts


def _session(client: TestClient, sid: str) -> tuple[dict[str, torch.Tensor],
                                                    torch.optim.Adam]:
    """An Adam session of PARAMS stepped once with GRADS, and torch's own run of the same."""
    r = client.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.1},
        "params": {n: json_tensor(t) for n, t in PARAMS.items()}})
    assert r.status_code == 201, r.text
    local = {n: torch.nn.Parameter(t.clone()) for n, t in PARAMS.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.1)
    _step_both(client, sid, local, opt, GRADS)
    return local, opt


def _step_both(client: TestClient, sid: str, local: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer, grads: dict[str, torch.Tensor]) -> None:
    r = client.post(f"/v1/sessions/{sid}/step", content=save(grads), headers=BIN_CT)
    assert r.status_code == 200, r.text
    for n, p in local.items():
        p.grad = grads[n].clone()
    opt.step()
    got = tensors_from_json(r.json()["params"])
    for n, p in local.items():
        assert torch.equal(got[n], p.detach()), n


def _held(client: TestClient, sid: str) -> tuple[Any, Any, Any]:
    """The session's parameters, optimizer state and description (its step count)."""
    params = client.get(f"/v1/sessions/{sid}/params").json()
    state = client.get(f"/v1/sessions/{sid}/state_dict").json()
    info = client.get(f"/v1/sessions/{sid}").json()
    return params, state, info


def _excess(first: dict[str, torch.Tensor], extra: int = 27, numel: int = 6000
            ) -> dict[str, torch.Tensor]:
    """``first``, then ``extra`` tensors of ``numel`` elements no session here has (ten times
    its three in all; a body over OFFLOAD_BYTES, as one whose decoding costs is)."""
    return {**first, **{f"extra{i:03d}": torch.full((numel,), float(i))
                        for i in range(extra)}}


def _json_answer(client: TestClient, sid: str, grads: dict[str, torch.Tensor],
                 query: str = "", **fields: Any) -> dict[str, Any]:
    """The same step as a JSON body: decoded whole and checked by the session."""
    r = client.post(f"/v1/sessions/{sid}/step{query}", json={
        "grads": {n: json_tensor(t) for n, t in grads.items()}, **fields})
    assert 400 <= r.status_code < 500, r.text
    out: dict[str, Any] = r.json()
    return out


def _whole_way(client: TestClient, monkeypatch: pytest.MonkeyPatch, made: list[int],
               sid: str, body: bytes, query: str = "") -> dict[str, Any]:
    """The answer of the same binary body decoded whole first, as before (no refusal from
    its header: ``sessions._refuse_entries`` does nothing), its tensors all made."""
    made.clear()
    with monkeypatch.context() as patched:
        patched.setattr(sessions, "_refuse_entries", lambda *args: None)
        r = client.post(f"/v1/sessions/{sid}/step{query}", content=body, headers=BIN_CT)
    assert 400 <= r.status_code < 500, r.text
    assert made and made[0] > 3  # (decoded whole)
    out: dict[str, Any] = r.json()
    return out


def _same_problem(binary: Any, before: dict[str, Any]) -> None:
    got = binary.json()
    for key in ("status", "code", "field", "detail"):
        assert got[key] == before[key], (key, got, before)


@pytest.mark.parametrize("grads,code,field", [
    # the session's names first, then 27 it lacks: the first of those is named
    (_excess(dict(GRADS)), "unknown_parameter", "grads.extra000"),
    # names it lacks first
    ({**_excess({}, 30)}, "unknown_parameter", "grads.extra000"),
    # an earlier entry's mismatch is the answer, as the session's check found it first
    (_excess({"a": GRADS["a"].double()}), "dtype_mismatch", "grads.a"),
    (_excess({"b": torch.zeros(2, 1)}), "shape_mismatch", "grads.b"),
])
def test_excess_entries_refused_from_the_header(app_client: TestClient, made: list[int],
                                                monkeypatch: pytest.MonkeyPatch,
                                                grads: dict[str, torch.Tensor], code: str,
                                                field: str) -> None:
    local, opt = _session(app_client, "s")
    held = _held(app_client, "s")
    made.clear()
    r = app_client.post("/v1/sessions/s/step", content=save(grads), headers=BIN_CT)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == (code, field)
    assert made == []  # refused before any tensor of it was made
    assert _held(app_client, "s") == held
    _same_problem(r, _whole_way(app_client, monkeypatch, made, "s", save(grads)))
    _same_problem(r, _json_answer(app_client, "s", grads))
    assert _held(app_client, "s") == held
    _step_both(app_client, "s", local, opt, {n: -2 * g for n, g in GRADS.items()})


def test_upcast_widening_is_taken_before_the_unknown_name(
        app_client: TestClient, made: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    local, opt = _session(app_client, "u")
    held = _held(app_client, "u")
    # (all float16: the header lists them by name, the session's first)
    grads = {n: t.half() for n, t in _excess({"a": GRADS["a"], "b": GRADS["b"]}).items()}
    body = save(grads)
    made.clear()
    r = app_client.post("/v1/sessions/u/step?upcast=true", content=body, headers=BIN_CT)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("unknown_parameter", "grads.extra000")
    assert made == []
    _same_problem(r, _whole_way(app_client, monkeypatch, made, "u", body, "?upcast=true"))
    _same_problem(r, _json_answer(app_client, "u", grads, "?upcast=true"))
    # without upcast the half-precision gradient is the answer, as before
    made.clear()
    r = app_client.post("/v1/sessions/u/step", content=body, headers=BIN_CT)
    assert (r.json()["code"], r.json()["field"]) == ("dtype_mismatch", "grads.a")
    assert made == []
    _same_problem(r, _whole_way(app_client, monkeypatch, made, "u", body))
    _same_problem(r, _json_answer(app_client, "u", grads))
    assert _held(app_client, "u") == held
    _step_both(app_client, "u", local, opt, GRADS)


def test_a_malformed_param_groups_is_still_the_answer(
        app_client: TestClient, made: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    _session(app_client, "g")
    held = _held(app_client, "g")
    grads = _excess(dict(GRADS))
    made.clear()
    body = save(grads, metadata={"param_groups": "5"})
    r = app_client.post("/v1/sessions/g/step", headers=BIN_CT, content=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "param_groups"
    assert made == []
    _same_problem(r, _whole_way(app_client, monkeypatch, made, "g", body))
    _same_problem(r, _json_answer(app_client, "g", grads, param_groups=5))
    assert _held(app_client, "g") == held


@pytest.mark.parametrize("scalars,field", [
    ({"loss": "x"}, "scalars.loss"),  # not a number
    ([1.0], "scalars"),  # not an object
    ({"1loss": 0.5}, "scalars.1loss"),  # a name that must start with a letter or '_'
])
def test_malformed_scalars_are_still_the_answer(
        app_client: TestClient, made: list[int], monkeypatch: pytest.MonkeyPatch,
        scalars: Any, field: str) -> None:
    """The engine refuses a malformed ``scalars`` before it checks the gradients: so does the
    refusal from the header (it answered 422 unknown_parameter instead)."""
    _session(app_client, "m")
    held = _held(app_client, "m")
    grads = _excess(dict(GRADS))
    made.clear()
    body = save(grads, metadata={"scalars": json.dumps(scalars)})
    r = app_client.post("/v1/sessions/m/step", headers=BIN_CT, content=body)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_scalars", field)
    assert made == []
    _same_problem(r, _whole_way(app_client, monkeypatch, made, "m", body))
    _same_problem(r, _json_answer(app_client, "m", grads, scalars=scalars))
    assert _held(app_client, "m") == held


def test_a_body_that_may_hold_sparse_pairs_goes_the_whole_way(app_client: TestClient,
                                                             made: list[int]) -> None:
    _session(app_client, "p")
    held = _held(app_client, "p")
    grads = {**_excess(dict(GRADS)), "extra.indices": torch.tensor([0]),
             "extra.values": torch.tensor([[1.0]])}
    made.clear()
    r = app_client.post("/v1/sessions/p/step", content=save(grads), headers=BIN_CT)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("unknown_parameter", "grads.extra000")
    assert made == [len(grads)]
    assert _held(app_client, "p") == held


def test_a_held_idempotency_key_keeps_its_answer(app_client: TestClient,
                                                 made: list[int]) -> None:
    _session(app_client, "k")
    r = app_client.post("/v1/sessions/k/step", content=save(GRADS),
                        headers={**BIN_CT, "Idempotency-Key": "key-1"})
    assert r.status_code == 200, r.text
    held = _held(app_client, "k")
    grads = _excess(dict(GRADS))
    made.clear()
    r = app_client.post("/v1/sessions/k/step", content=save(grads),
                        headers={**BIN_CT, "Idempotency-Key": "key-1"})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("idempotency_key_reused",
                                                     "Idempotency-Key")
    assert made == [len(grads)]
    # a fresh key: refused from the header
    made.clear()
    r = app_client.post("/v1/sessions/k/step", content=save(grads),
                        headers={**BIN_CT, "Idempotency-Key": "key-2"})
    assert (r.json()["code"], r.json()["field"]) == ("unknown_parameter", "grads.extra000")
    assert made == []
    assert _held(app_client, "k") == held


def test_a_small_body_is_refused_as_it_was(app_client: TestClient, made: list[int],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A body of up to OFFLOAD_BYTES is decoded inline (well under a millisecond) and refused
    by the session as it was: the same answer, its tensors made."""
    _session(app_client, "small")
    held = _held(app_client, "small")
    grads = _excess(dict(GRADS), numel=1)
    body = save(grads)
    assert len(body) <= OFFLOAD_BYTES
    made.clear()
    r = app_client.post("/v1/sessions/small/step", content=body, headers=BIN_CT)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("unknown_parameter", "grads.extra000")
    assert made == [len(grads)]
    _same_problem(r, _whole_way(app_client, monkeypatch, made, "small", body))
    assert _held(app_client, "small") == held
