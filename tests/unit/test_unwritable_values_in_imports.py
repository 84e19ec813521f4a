"""A state import holding a value no log record or export can hold is a 422 naming it, and the
session is left exactly as it was: an integer past int64, or a tensor that is not a dense CPU
tensor of a wire dtype (meta, sparse, float8).

A ``torch.save`` file holds any Python int (``lr`` 2**70, a scheduler's ``last_epoch``) and any
tensor, a JSON text integers up to 2**64 - 1; the session's log record, description and export
hold int64 and the wire's dtypes. Taken, such an import was a 500 (its record could not be
written; a meta tensor could not be checked), or, from JSON, taken whole, after which a step
made the session's export, its description and the tenant's session list 500s; a sparse
tensor ``lr`` was refused naming another option. The same file with values in range imports,
and the session then equals torch doing the same (its export and its next step)."""

from __future__ import annotations

import collections
import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests.unit.test_tensor_lr_aliasing import assert_same, seeded

SHAPES = {"w": (3, 2), "b": (2,)}
SCHED = {"name": "MultiStepLR", "options": {"milestones": [2, 5], "gamma": 0.5}}


def _local() -> tuple[list[torch.Tensor], torch.optim.Adam, Any]:
    params = [seeded(shape, i).requires_grad_() for i, shape in enumerate(SHAPES.values())]
    opt = torch.optim.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, **SCHED["options"])  # type: ignore[arg-type]
    return params, opt, sched


def _step(params: list[torch.Tensor], opt: torch.optim.Adam, sched: Any, k: int) -> None:
    for i, p in enumerate(params):
        p.grad = seeded(tuple(p.shape), 100 * k + i)
    opt.step()
    sched.step()


def _grads(k: int) -> dict[str, Any]:
    return {n: {"dtype": "float32", "shape": list(shape),
                "data": seeded(shape, 100 * k + i).reshape(-1).tolist()}
            for i, (n, shape) in enumerate(SHAPES.items())}


def _source() -> dict[str, Any]:
    """A torch-made state dict (two steps), with its scheduler's state."""
    params, opt, sched = _local()
    for k in range(2):
        _step(params, opt, sched, 50 + k)
    return {**opt.state_dict(), "scheduler": sched.state_dict()}


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _session(c: TestClient, sid: str) -> None:
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": 0.01}, "scheduler": SCHED,
            "param_groups": [{"params": {n: {"dtype": "float32", "shape": list(shape),
                                             "data": seeded(shape, i).reshape(-1).tolist()}}}
                             for i, (n, shape) in enumerate(SHAPES.items())]}
    assert c.post("/v1/sessions", json=body).status_code == 201
    assert c.post(f"/v1/sessions/{sid}/step", json={"grads": _grads(0)}).status_code == 200


def _whole(c: TestClient, sid: str) -> Any:
    return (c.get(f"/v1/sessions/{sid}").json(), c.get(f"/v1/sessions/{sid}/state_dict").json(),
            c.get(f"/v1/sessions/{sid}/params").json())


def _setter(*path: Any) -> Callable[[dict[str, Any], Any], None]:
    def put(sd: dict[str, Any], value: Any) -> None:
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return put


#: (what is changed, the value, the problem's code and field)
CASES = [
    ("lr", _setter("param_groups", 1, "lr"), 2**70, "invalid_state",
     "state_dict.param_groups.1.lr"),
    ("last_epoch", _setter("scheduler", "last_epoch"), 2**70, "invalid_state",
     "state_dict.scheduler.last_epoch"),
    ("a milestone's count", _setter("scheduler", "milestones"),
     collections.Counter({2: 1, 5: 2**70}), "invalid_state", "state_dict.scheduler.milestones.5"),
    ("base_lrs", _setter("scheduler", "base_lrs"), [0.01, -(2**64)], "invalid_state",
     "state_dict.scheduler.base_lrs.1"),
    ("a meta tensor lr", _setter("param_groups", 0, "lr"), torch.empty((), device="meta"),
     "state_mismatch", "state_dict.param_groups.0.lr"),
    ("a sparse tensor lr", _setter("param_groups", 0, "lr"), torch.tensor([0.01]).to_sparse(),
     "state_mismatch", "state_dict.param_groups.0.lr"),
    ("a float8 tensor lr", _setter("param_groups", 1, "lr"),
     torch.tensor(0.01).to(torch.float8_e4m3fn), "state_mismatch", "state_dict.param_groups.1.lr"),
    ("a float8 tensor in _last_lr", _setter("scheduler", "_last_lr"),
     [0.01, torch.tensor(0.01).to(torch.float8_e5m2)], "state_mismatch",
     "state_dict.scheduler._last_lr.1"),
    ("a meta tensor in base_lrs", _setter("scheduler", "base_lrs"),
     [torch.empty((), device="meta"), 0.01], "state_mismatch", "state_dict.scheduler.base_lrs.0"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_import_of_a_value_no_record_holds_is_refused_whole(
        app_client: TestClient, case: Any) -> None:
    c = app_client
    what, change, value, code, field = case
    sid = f"unwritable-{CASES.index(case)}"
    _session(c, sid)
    before = _whole(c, sid)
    sd = _source()
    bad = copy.deepcopy(sd)
    change(bad, value)
    r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=_saved(bad),
              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == (code, field), r.json()
    assert _whole(c, sid) == before
    assert c.get("/v1/sessions").status_code == 200
    # the file as torch made it imports; the session then equals torch, and steps as torch does
    r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=_saved(sd),
              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    params, opt, sched = _local()
    _step(params, opt, sched, 0)  # (the session's step before the import)
    opt.load_state_dict({k: v for k, v in copy.deepcopy(sd).items() if k != "scheduler"})
    sched.load_state_dict(sd["scheduler"])
    r = c.post(f"/v1/sessions/{sid}/step", json={"grads": _grads(1)})
    assert r.status_code == 200, r.text
    _step(params, opt, sched, 1)
    got = torch.load(io.BytesIO(c.get(f"/v1/sessions/{sid}/state_dict?format=torch").content),
                     weights_only=True)
    for g in (*got["param_groups"], *opt.state_dict()["param_groups"]):
        g.pop("param_names", None)
    assert_same(got["state"], opt.state_dict()["state"], "state")
    assert_same(got["param_groups"], opt.state_dict()["param_groups"], "param_groups")
    assert_same(got["scheduler"], sched.state_dict(), "scheduler")
    pulled = c.get(f"/v1/sessions/{sid}/params").json()["params"]
    for (name, shape), p in zip(SHAPES.items(), params, strict=True):
        want = p.detach()
        assert torch.equal(torch.tensor(pulled[name]["data"], dtype=torch.float32).reshape(shape),
                           want), name


@pytest.mark.parametrize("key", ["last_epoch", "_step_count"])
def test_json_import_of_a_scheduler_count_past_int64_is_refused_whole(
        app_client: TestClient, key: str) -> None:
    """From JSON (which reads integers up to 2**64 - 1): taken, the next step made the count
    2**64, and the session's export, description and the session list were 500s."""
    c = app_client
    sid = f"wide-json-{key}"
    _session(c, sid)
    before = _whole(c, sid)
    sd = c.get(f"/v1/sessions/{sid}/state_dict").json()
    sd.pop("version", None)
    sd["scheduler"][key] = 2**64 - 1
    r = c.put(f"/v1/sessions/{sid}/state_dict", json=sd)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_state", f"state_dict.scheduler.{key}")
    assert _whole(c, sid) == before
    assert c.post(f"/v1/sessions/{sid}/step", json={"grads": _grads(1)}).status_code == 200
    assert c.get(f"/v1/sessions/{sid}/state_dict").status_code == 200
    assert c.get("/v1/sessions").status_code == 200
    # int64's largest is taken, as torch takes it
    sd = c.get(f"/v1/sessions/{sid}/state_dict").json()
    sd.pop("version", None)
    sd["scheduler"][key] = 2**63 - 1
    r = c.put(f"/v1/sessions/{sid}/state_dict", json=sd)
    assert r.status_code == 200, r.text
    assert c.get(f"/v1/sessions/{sid}/state_dict").json()["scheduler"][key] == 2**63 - 1


def test_a_torch_tensor_holding_more_than_its_file_is_refused_whole(
        app_client: TestClient) -> None:
    """A tensor of a ``torch.save`` file may view one float with stride 0 (``expand``): a file
    of 2 KB held an ``lr`` of 2**40 elements, and the copy the import's checks made of it
    tried to allocate 4 TiB (a 500; at 16 GiB it would have been taken). 422
    ``torch_file_too_large`` naming it, with the limit; nothing imported. An expanded state
    tensor of the parameter's shape imports, as its own copy, equal to torch's."""
    c = app_client
    sid = "expanded-lr"
    _session(c, sid)
    before = _whole(c, sid)
    sd = _source()
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = torch.zeros(1).expand(2**40)
    data = _saved(bad)
    assert len(data) < 1 << 14
    r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=data,
              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("torch_file_too_large",
                                                   "state_dict.param_groups.0.lr"), problem
    assert isinstance(problem["limit"], int) and problem["limit"] < 2**40
    assert _whole(c, sid) == before
    expanded = copy.deepcopy(sd)
    expanded["state"][1]["exp_avg"] = torch.full((1,), 0.25).expand(2)
    r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=_saved(expanded),
              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    got = torch.load(io.BytesIO(c.get(f"/v1/sessions/{sid}/state_dict?format=torch").content),
                     weights_only=True)
    assert torch.equal(got["state"][1]["exp_avg"], torch.full((2,), 0.25))
    assert_same(got["state"][0], sd["state"][0], "state.0")


def test_a_milestone_at_int64s_largest_exports_and_imports_back(app_client: TestClient) -> None:
    """The largest milestone a create takes (int64's largest: one past it is refused at
    create) exports, JSON and torch, and imports into a session made with the same body; the
    imported scheduler state equals the exported one."""
    c = app_client
    sched = {"name": "MultiStepLR", "options": {"milestones": [3, 2**63 - 1]}}
    body = {"optimizer": "SGD", "options": {"lr": 0.1}, "scheduler": sched,
            "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}}
    assert c.post("/v1/sessions", json={**body, "id": "far-milestone"}).status_code == 201
    grads = {"grads": {"w": {"dtype": "float32", "shape": [2], "data": [0.5, 0.25]}}}
    assert c.post("/v1/sessions/far-milestone/step", json=grads).status_code == 200
    data = c.get("/v1/sessions/far-milestone/state_dict?format=torch").content
    exported = torch.load(io.BytesIO(data), weights_only=True)
    assert exported["scheduler"]["milestones"] == {3: 1, 2**63 - 1: 1}
    for fmt in ("torch", "json"):
        sid = f"far-milestone-{fmt}"
        assert c.post("/v1/sessions", json={**body, "id": sid}).status_code == 201
        if fmt == "torch":
            r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=data,
                      headers={"content-type": "application/octet-stream"})
        else:
            sd = c.get("/v1/sessions/far-milestone/state_dict").json()
            sd.pop("version", None)
            r = c.put(f"/v1/sessions/{sid}/state_dict", json=sd)
        assert r.status_code == 200, r.text
        got = torch.load(io.BytesIO(c.get(f"/v1/sessions/{sid}/state_dict?format=torch").content),
                         weights_only=True)
        assert got["scheduler"] == exported["scheduler"], fmt


def test_a_group_option_a_create_takes_exports_and_imports_back(app_client: TestClient) -> None:
    """A group option a create takes from JSON (an integer up to 2**64 - 1: an ``lr`` of
    2**63) exports and imports back into a session made with the same body (an option is never
    counted up, unlike a scheduler's counts, which stay within int64); one past 2**64 - 1,
    which only a ``torch.save`` file holds, is refused naming it."""
    c = app_client
    body = {"optimizer": "SGD", "options": {"lr": 2**63},
            "params": {"w": {"dtype": "float64", "shape": [2], "data": [1.0, 2.0]}}}
    assert c.post("/v1/sessions", json={**body, "id": "wide-lr"}).status_code == 201
    grads = {"grads": {"w": {"dtype": "float64", "shape": [2], "data": [0.0, 0.0]}}}
    assert c.post("/v1/sessions/wide-lr/step", json=grads).status_code == 200
    sd = c.get("/v1/sessions/wide-lr/state_dict").json()
    sd.pop("version", None)
    data = c.get("/v1/sessions/wide-lr/state_dict?format=torch").content
    for fmt in ("json", "torch"):
        sid = f"wide-lr-{fmt}"
        assert c.post("/v1/sessions", json={**body, "id": sid}).status_code == 201
        r = (c.put(f"/v1/sessions/{sid}/state_dict", json=sd) if fmt == "json" else
             c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=data,
                   headers={"content-type": "application/octet-stream"}))
        assert r.status_code == 200, r.text
        assert c.get(f"/v1/sessions/{sid}").json()["param_groups"][0]["lr"] == 2**63
    sd2 = torch.load(io.BytesIO(data), weights_only=True)
    sd2["param_groups"][0]["lr"] = 2**64
    r = c.put("/v1/sessions/wide-lr-json/state_dict?format=torch", content=_saved(sd2),
              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_state",
                                                     "state_dict.param_groups.0.lr")


def _lattice(n: int) -> list[Any]:
    """``[[[None] * n] * n] * n``: one list held n times, itself held n times (a pickle keeps
    each list once: a file of a few KB, a tree of n**3 leaves)."""
    inner: list[Any] = [None] * n
    middle = [inner] * n
    return [middle] * n


@pytest.mark.parametrize("where", ["state", "scheduler", "unknown key"])
def test_a_torch_file_holding_one_list_many_times_is_refused_at_once(
        app_client: TestClient, where: str) -> None:
    """Each list of a loaded ``torch.save`` file is walked once: a 4 KB file whose lists held
    one list 400 times, three deep (6.4e7 leaves), took some 45 s of the server's CPU to
    refuse (a tree of 10**9 leaves, some 12 minutes). Refused at once now, naming where, the
    session unchanged."""
    import time

    c = app_client
    sid = f"lattice-{where.replace(' ', '-')}"
    _session(c, sid)
    before = _whole(c, sid)
    sd = _source()
    if where == "state":
        sd["state"][0]["exp_avg"] = _lattice(400)
        field = "state_dict.state.0.exp_avg"
    elif where == "scheduler":
        sd["scheduler"]["base_lrs"] = _lattice(400)
        field = "state_dict.scheduler.base_lrs"
    else:
        sd["extra"] = _lattice(400)
        field = "state_dict.extra"
    data = _saved(sd)
    assert len(data) < 1 << 14
    started = time.monotonic()
    r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=data,
              headers={"content-type": "application/octet-stream"})
    took = time.monotonic() - started
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("state_mismatch", field), r.json()
    assert took < 10, took
    assert _whole(c, sid) == before


def test_one_state_entry_held_by_two_parameters_is_still_refused(
        app_client: TestClient) -> None:
    """A list or dict met again is walked once, but what it holds is still held twice: two
    parameters given one state entry (one dict) share every tensor of it, a 422
    ``invalid_state`` naming the second, the session unchanged."""
    c = app_client
    sid = "one-entry-twice"
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": 0.01},
            "params": {n: {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}
                       for n in ("a", "b")}}
    assert c.post("/v1/sessions", json=body).status_code == 201
    before = _whole(c, sid)
    p = [torch.tensor([1.0, 2.0], requires_grad=True) for _ in range(2)]
    opt = torch.optim.Adam(p, lr=0.01)
    for t in p:
        t.grad = torch.tensor([0.5, -0.5])
    opt.step()
    sd = opt.state_dict()
    sd["state"][1] = sd["state"][0]
    r = c.put(f"/v1/sessions/{sid}/state_dict?format=torch", content=_saved(sd),
              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_state", "state_dict.state.1")
    assert _whole(c, sid) == before
