"""State-dict imports that do not fit the session are a 422 that changes nothing (params,
version, description and the exported state are the same before and after), in every format;
``?format=torch`` never unpickles anything but plain data.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import ENGINES
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    from_wire,
    grad_stream,
    json_tensor,
    make_params,
    state_from_safetensors,
    state_to_safetensors,
    tensors_from_json,
    to_wire,
    torch_bytes,
    torch_state_dict,
)

pytestmark = pytest.mark.integration

SHAPES = {"w1": [4, 3], "b1": [4], "w2": [2, 4]}
FORMATS = ("json", "safetensors", "torch")
PROBLEM = "application/problem+json"


# ----------------------------------------------------------------------------- helpers
def make_session(http: httpx.Client, scheduler: dict[str, Any] | None = None) -> str:
    """Adam over two groups (w1, b1 | w2), stepped twice so every parameter has state."""
    params = make_params(SHAPES, seed=21)
    body: dict[str, Any] = {
        "optimizer": "Adam",
        "options": {"lr": 0.01},
        "param_groups": [
            {"params": {n: json_tensor(params[n]) for n in ("w1", "b1")}},
            {"params": {"w2": json_tensor(params["w2"])}, "lr": 0.002, "amsgrad": True},
        ],
    }
    if scheduler is not None:
        body["scheduler"] = scheduler
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    stream = grad_stream(SHAPES, seed=22)
    for _ in range(2):
        grads = next(stream)
        r = http.post(f"/v1/sessions/{sid}/step",
                      json={"grads": {n: json_tensor(g) for n, g in grads.items()}})
        assert r.status_code == 200, r.text
    return sid


def exported(http: httpx.Client, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/state_dict")
    assert r.status_code == 200
    return torch_state_dict(from_wire(r.json()))


def snapshot(http: httpx.Client, sid: str) -> tuple[Any, Any, Any]:
    desc = http.get(f"/v1/sessions/{sid}").json()
    params = http.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"}).json()
    state = http.get(f"/v1/sessions/{sid}/state_dict", params={"encoding": "b64"}).json()
    return desc, params, state


def put_state(http: httpx.Client, sid: str, sd: Any, fmt: str) -> httpx.Response:
    url = f"/v1/sessions/{sid}/state_dict"
    if fmt == "json":
        return http.put(url, json=to_wire(sd))
    content = state_to_safetensors(sd) if fmt == "safetensors" else torch_bytes(sd)
    return http.put(url, params={"format": fmt}, content=content,
                    headers={"Content-Type": "application/octet-stream"})


def put_torch_bytes(http: httpx.Client, sid: str, content: bytes) -> httpx.Response:
    return http.put(f"/v1/sessions/{sid}/state_dict", params={"format": "torch"},
                    content=content, headers={"Content-Type": "application/octet-stream"})


def assert_refused(r: httpx.Response, *words: str, status: int = 422) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem: dict[str, Any] = r.json()
    assert problem["status"] == status
    assert problem["type"] == f"urn:optserve:problem:{problem['code']}"
    for w in words:
        assert w in problem["detail"], problem
    return problem


def assert_unchanged(http: httpx.Client, sid: str, before: tuple[Any, Any, Any]) -> None:
    after = snapshot(http, sid)
    assert after[0] == before[0], "description (version, step, groups) changed"
    assert after[1] == before[1], "params changed"
    assert after[2] == before[2], "state changed"
    assert_tensors_equal(tensors_from_json(after[1]["params"]),
                         tensors_from_json(before[1]["params"]))


# ----------------------------------------------------------------------------- mutations
def _drop_group(sd: dict[str, Any]) -> None:
    sd["param_groups"].pop()
    sd["state"].pop(2)


def _shrink_group(sd: dict[str, Any]) -> None:
    sd["param_groups"][0]["params"].pop()
    sd["param_groups"][0].pop("param_names", None)
    sd["state"].pop(1)


def _wrong_shape(sd: dict[str, Any]) -> None:
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].t().contiguous()  # [3, 4], not [4, 3]


def _wrong_shape_amsgrad(sd: dict[str, Any]) -> None:
    sd["state"][2]["max_exp_avg_sq"] = torch.zeros(8)  # same numel, wrong shape


def _int_state(sd: dict[str, Any]) -> None:
    sd["state"][1]["exp_avg_sq"] = torch.zeros(4, dtype=torch.int64)


def _missing_state_key(sd: dict[str, Any]) -> None:
    del sd["state"][0]["exp_avg_sq"]


def _unknown_state_id(sd: dict[str, Any]) -> None:
    sd["state"][7] = copy.deepcopy(sd["state"][0])


def _duplicate_id(sd: dict[str, Any]) -> None:
    sd["param_groups"][1]["params"] = [0]


def _unknown_top_key(sd: dict[str, Any]) -> None:
    sd["optimizer"] = "Adam"


def _bad_group_option(sd: dict[str, Any]) -> None:
    sd["param_groups"][1]["betas"] = (1.0, 0.0)


def _other_optimizers_option(sd: dict[str, Any]) -> None:
    sd["param_groups"][0]["momentum"] = 0.9


def _no_param_groups(sd: dict[str, Any]) -> None:
    del sd["param_groups"]


# (id, mutation, words the detail must contain)
MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], None], tuple[str, ...]]] = [
    ("wrong-group-count", _drop_group, ("1 param groups", "2")),
    ("wrong-group-size", _shrink_group, ("1 parameters", "2")),
    ("state-tensor-wrong-shape", _wrong_shape, ("shape", "[3, 4]", "[4, 3]")),
    ("state-tensor-wrong-shape-same-numel", _wrong_shape_amsgrad, ("shape", "[8]", "[2, 4]")),
    ("state-tensor-int", _int_state, ("dtype",)),
    ("state-key-missing", _missing_state_key, ("exp_avg_sq",)),
    ("state-unknown-id", _unknown_state_id, ("7",)),
    ("param-id-twice", _duplicate_id, ("twice",)),
    ("unknown-top-level-key", _unknown_top_key, ("optimizer",)),
    ("invalid-group-option", _bad_group_option, ("Invalid beta parameter at index 0: 1.0",)),
    ("option-of-another-optimizer", _other_optimizers_option, ("momentum",)),
    ("no-param-groups", _no_param_groups, ("param groups",)),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("mutate", "words"),
                         [pytest.param(m, w, id=i) for i, m, w in MUTATIONS])
def test_mismatched_import_is_422_and_changes_nothing(
    http: httpx.Client, mutate: Callable[[dict[str, Any]], None], words: tuple[str, ...],
    fmt: str,
) -> None:
    sid = make_session(http)
    good = exported(http, sid)
    before = snapshot(http, sid)
    bad = copy.deepcopy(good)
    mutate(bad)
    problem = assert_refused(put_state(http, sid, bad, fmt), *words)
    assert problem.get("field", "").startswith("state_dict"), problem
    assert_unchanged(http, sid, before)
    # Control: the unmutated state imports fine (version +1, state the same).
    r = put_state(http, sid, good, fmt)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before[0]["version"] + 1
    assert snapshot(http, sid)[2] == before[2]
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize(("mutate", "words"), [
    pytest.param(m, w, id=i) for i, m, w in MUTATIONS
    if i in ("wrong-group-size", "state-tensor-wrong-shape", "invalid-group-option")])
def test_mismatched_import_on_each_engine(
    http: httpx.Client, mutate: Callable[[dict[str, Any]], None], words: tuple[str, ...],
) -> None:
    """A representative few of the cases above on both engines (safetensors bodies)."""
    test_mismatched_import_is_422_and_changes_nothing(http, mutate, words, "safetensors")


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_scheduler_state_into_session_without_scheduler(http: httpx.Client) -> None:
    with_sched = make_session(http, {"name": "StepLR", "options": {"step_size": 1,
                                                                   "gamma": 0.5}})
    plain = make_session(http)
    sd = exported(http, with_sched)
    assert "scheduler" in sd
    before = snapshot(http, plain)
    for fmt in FORMATS:
        problem = assert_refused(put_state(http, plain, sd, fmt), "scheduler")
        assert problem["field"] == "state_dict.scheduler"
        assert_unchanged(http, plain, before)
    for s in (with_sched, plain):
        http.delete(f"/v1/sessions/{s}")


def _sched_drop_key(s: dict[str, Any]) -> None:
    del s["base_lrs"]


def _sched_wrong_type(s: dict[str, Any]) -> None:
    s["last_epoch"] = "2"


def _sched_wrong_length(s: dict[str, Any]) -> None:
    s["base_lrs"] = [0.01]


def _sched_extra_key(s: dict[str, Any]) -> None:
    s["lr_lambdas"] = [None]


def _sched_not_dict(s: dict[str, Any]) -> None:
    s.clear()


@pytest.mark.parametrize("mutate", [_sched_drop_key, _sched_wrong_type, _sched_wrong_length,
                                    _sched_extra_key, _sched_not_dict])
def test_scheduler_state_with_wrong_structure(http: httpx.Client,
                                              mutate: Callable[[dict[str, Any]], None]) -> None:
    sid = make_session(http, {"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}})
    good = exported(http, sid)
    before = snapshot(http, sid)
    assert before[0]["lr"] == [0.0025, 0.0005]  # two StepLR steps happened
    for fmt in FORMATS:
        bad = copy.deepcopy(good)
        mutate(bad["scheduler"])
        problem = assert_refused(put_state(http, sid, bad, fmt))
        assert problem["field"].startswith("state_dict.scheduler"), problem
        assert_unchanged(http, sid, before)
    http.delete(f"/v1/sessions/{sid}")


def test_scheduler_state_of_another_kind(http: httpx.Client) -> None:
    step_lr = make_session(http, {"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}})
    cosine = make_session(http, {"name": "CosineAnnealingLR", "options": {"T_max": 4}})
    sd = exported(http, step_lr)
    before = snapshot(http, cosine)
    for fmt in FORMATS:
        problem = assert_refused(put_state(http, cosine, sd, fmt), "keys differ")
        assert problem["field"] == "state_dict.scheduler"
        assert_unchanged(http, cosine, before)
    for s in (step_lr, cosine):
        http.delete(f"/v1/sessions/{s}")


def test_nested_scheduler_state_with_wrong_structure(http: httpx.Client) -> None:
    sched = {"name": "SequentialLR", "options": {"milestones": [1], "schedulers": [
        {"name": "ConstantLR", "options": {"factor": 0.5, "total_iters": 1}},
        {"name": "ExponentialLR", "options": {"gamma": 0.9}}]}}
    sid = make_session(http, sched)
    good = exported(http, sid)
    before = snapshot(http, sid)
    bad = copy.deepcopy(good)
    bad["scheduler"]["_schedulers"].pop()
    assert_refused(put_state(http, sid, bad, "json"))
    bad = copy.deepcopy(good)
    bad["scheduler"]["_schedulers"][1]["gamma"] = "0.9"
    problem = assert_refused(put_state(http, sid, bad, "torch"))
    assert problem["field"] == "state_dict.scheduler._schedulers.1.gamma"
    assert_unchanged(http, sid, before)
    http.delete(f"/v1/sessions/{sid}")


# ----------------------------------------------------------------------------- torch files
class _CreatesFile:
    """Unpickling this opens (and so creates) ``path`` for writing."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _evil_payloads(path: Path) -> dict[str, bytes]:
    sd = {"state": {0: {"step": _CreatesFile(str(path))}}, "param_groups": []}
    raw = pickle.dumps(sd, protocol=2)
    f = io.BytesIO()
    torch.save(sd, f)  # a real torch.save zip whose data.pkl holds the payload
    return {"torch.save": f.getvalue(), "bare-pickle": raw}


@pytest.mark.parametrize("kind", ["torch.save", "bare-pickle"])
def test_malicious_pickle_is_never_run(http: httpx.Client, tmp_path: Path, kind: str) -> None:
    # The payload is real: plain unpickling creates the file.
    proof = tmp_path / "proof"
    payload = _evil_payloads(proof)[kind]
    loaded = (torch.load(io.BytesIO(payload), weights_only=False) if kind == "torch.save"
              else pickle.loads(payload))
    loaded["state"][0]["step"].close()
    assert proof.exists()

    target = tmp_path / "pwned"
    sid = make_session(http)
    before = snapshot(http, sid)
    r = put_torch_bytes(http, sid, _evil_payloads(target)[kind])
    assert 400 <= r.status_code < 500, r.text
    # a torch.save zip is loaded with weights_only=True; a bare pickle is not even read (only
    # the zip format is bounded before loading)
    expected = "weights_only" if kind == "torch.save" else "zip format"
    problem = assert_refused(r, expected, status=r.status_code)
    assert problem["code"] == "invalid_torch_file"
    assert not target.exists(), "the server unpickled arbitrary code"
    assert not os.path.exists(str(target))
    assert_unchanged(http, sid, before)
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("content", [
    b"\x00garbage\xff" * 20,
    b"PK\x03\x04 not really a zip",
    b"",
    pickle.dumps({"state": {}, "param_groups": []}),  # a bare pickle, not a torch.save file
    torch_bytes([1, 2, 3]),  # loads fine, but is no state dict
], ids=["garbage", "fake-zip", "empty", "bare-pickle", "not-a-state-dict"])
def test_garbage_torch_file(http: httpx.Client, content: bytes) -> None:
    sid = make_session(http)
    before = snapshot(http, sid)
    r = put_torch_bytes(http, sid, content)
    assert 400 <= r.status_code < 500, r.text
    assert_refused(r, status=r.status_code)
    assert_unchanged(http, sid, before)
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, b"{}", b""],
                         ids=["garbage", "json-not-safetensors", "empty"])
def test_garbage_safetensors_state(http: httpx.Client, content: bytes) -> None:
    sid = make_session(http)
    before = snapshot(http, sid)
    r = http.put(f"/v1/sessions/{sid}/state_dict", content=content,
                 headers={"Content-Type": "application/octet-stream"})
    assert 400 <= r.status_code < 500, r.text
    assert_refused(r, status=r.status_code)
    assert_unchanged(http, sid, before)
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_round_trip_keeps_everything(http: httpx.Client) -> None:
    """Control for all of the above: an export imported back in each format is accepted and
    changes nothing but the version."""
    sid = make_session(http, {"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}})
    before = snapshot(http, sid)
    # Accept: application/octet-stream asks for the safetensors export without ?format
    r = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/octet")
    assert r.headers["X-Optserve-Version"] == str(before[0]["version"])
    assert_trees_equal(state_from_safetensors(r.content), exported(http, sid), "safetensors")
    for i, fmt in enumerate(FORMATS, start=1):
        r = put_state(http, sid, exported(http, sid), fmt)
        assert r.status_code == 200, r.text
        after = snapshot(http, sid)
        assert after[0]["version"] == before[0]["version"] + i
        assert after[1]["params"] == before[1]["params"]
        assert after[2] == before[2]
    http.delete(f"/v1/sessions/{sid}")


def test_a_state_its_own_steps_made_non_finite_moves_to_a_session_that_takes_it(
    http: httpx.Client,
) -> None:
    """Adam under ``nonfinite: reject`` takes a finite gradient of 3e38: its exp_avg_sq (the
    gradient squared) is infinite, as torch's is. The export holds it; an import into a
    ``reject`` session is refused (422 ``nonfinite_state``, naming the way out) and changes
    nothing; into a session created with ``"nonfinite": "allow"`` it is taken, and that
    session then steps equal to in-process torch from the same state."""
    w = torch.tensor([1.0, 2.0, -3.0])
    big = torch.tensor([3e38, -3e38, 1.0])
    ids = []
    for policy in ("reject", "allow"):
        r = http.post("/v1/sessions", json={"optimizer": "Adam", "options": {"lr": 0.1},
                                            "params": {"w": json_tensor(w)},
                                            "nonfinite": policy})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    source, target = ids
    ref_p = w.clone().requires_grad_(True)
    ref = torch.optim.Adam([ref_p], lr=0.1)
    r = http.post(f"/v1/sessions/{source}/step", json={"grads": {"w": json_tensor(big)}})
    assert r.status_code == 200, r.text
    ref_p.grad = big.clone()
    ref.step()
    exported = http.get(f"/v1/sessions/{source}/state_dict")
    assert exported.status_code == 200
    state = from_wire(exported.json())
    assert torch.isinf(state["state"]["0"]["exp_avg_sq"]).any()
    assert_trees_equal(torch_state_dict(state)["state"], ref.state_dict()["state"])

    before = http.get(f"/v1/sessions/{source}").json()
    r = http.put(f"/v1/sessions/{source}/state_dict", json=exported.json())
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "nonfinite_state"
    assert problem["field"] == "state_dict.state.0.exp_avg_sq"
    assert 'created with "nonfinite": "skip" or "allow"' in problem["detail"]
    assert http.get(f"/v1/sessions/{source}").json() == before

    # the parameters too (an import carries the optimizer's state, not them)
    params = http.get(f"/v1/sessions/{source}/params").json()["params"]
    assert http.put(f"/v1/sessions/{target}/params", json={"params": params}).status_code == 200
    r = http.put(f"/v1/sessions/{target}/state_dict", json=exported.json())
    assert r.status_code == 200, r.text
    g = torch.tensor([0.5, -0.25, 2.0])
    r = http.post(f"/v1/sessions/{target}/step", json={"grads": {"w": json_tensor(g)}})
    assert r.status_code == 200, r.text
    ref_p.grad = g.clone()
    ref.step()
    assert_tensors_equal(tensors_from_json(r.json()["params"]), {"w": ref_p.detach()},
                         "stepped from the moved state")


@pytest.mark.parametrize("fmt", ["json", "torch"])
@pytest.mark.parametrize(("step", "words"), [
    (3, ('got the number 3:', 'keeps this value as a 0-d tensor',
         '{"dtype": "float32", "shape": [], "data": [3]}')),
    (16777217.0, ('got the number 16777217.0:',
                  '{"dtype": "float64", "shape": [], "data": [16777217.0]}',
                  "float32 cannot hold 16777217.0 exactly; a float64 step count is kept in "
                  "float64")),
], ids=["count", "count-float32-rounds"])
def test_a_step_count_given_as_a_number_is_refused_naming_the_tensor_to_give(
        http: httpx.Client, fmt: str, step: float, words: tuple[str, ...]) -> None:
    """A ``step`` given as a number where the session's Adam keeps a 0-d tensor (an old
    checkpoint's ``"step": 3``; under ``torch.set_default_dtype(torch.float64)`` a count
    float32 cannot hold) is a 422 naming the field, the number and the tensor to give (in
    float64 where float32 would round the count): the detail said only "expected a tensor of
    shape []". The tensor it names imports, and the session keeps that count."""
    sid = make_session(http)
    good = exported(http, sid)
    before = snapshot(http, sid)
    bad = copy.deepcopy(good)
    bad["state"][0]["step"] = step
    problem = assert_refused(put_state(http, sid, bad, fmt), *words)
    assert problem["field"] == "state_dict.state.0.step", problem
    assert problem["code"] == "state_mismatch", problem
    assert_unchanged(http, sid, before)
    fixed = copy.deepcopy(good)
    fixed["state"][0]["step"] = torch.tensor(step, dtype=torch.float64 if step > 2**24
                                             else torch.float32)
    r = put_state(http, sid, fixed, fmt)
    assert r.status_code == 200, r.text
    assert exported(http, sid)["state"][0]["step"].item() == step
    http.delete(f"/v1/sessions/{sid}")
