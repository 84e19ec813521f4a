"""State imports that change a group's ``lr`` between a number and a tensor (a one-element
floating tensor), with and without a scheduler, mirrored by an in-process torch Adam whose
``load_state_dict`` (optimizer's and scheduler's) takes the same states: every import torch
takes is taken, and the parameters and the state after it equal torch's, bitwise. A
scheduler keeps copies of the groups' lrs (``base_lrs``, ``_last_lr``), tensors where those
are, and torch loads a number or a tensor there whichever the session holds."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

P0 = [1.0, -2.0, 3.0, 0.5]
GRADS = [[0.1, -0.2, 0.3, 0.05], [-0.4, 0.2, 0.1, 0.3], [0.25, 0.5, -0.125, 0.0625],
         [0.3, -0.1, 0.2, -0.05]]
SCHEDULERS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "StepLR": {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}},
    "ExponentialLR": {"name": "ExponentialLR", "options": {"gamma": 0.5}},
    "SequentialLR": {"name": "SequentialLR", "options": {
        "schedulers": [{"name": "ConstantLR", "options": {"factor": 0.5, "total_iters": 2}},
                       {"name": "ExponentialLR", "options": {"gamma": 0.9}}],
        "milestones": [2]}},
}
OCTET = "application/octet-stream"


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def decoded(value: Any) -> Any:
    """A JSON tree with its JSON tensors as torch tensors."""
    if isinstance(value, dict) and set(value) == {"dtype", "shape", "data"}:
        return torch.tensor(value["data"], dtype=getattr(torch, value["dtype"])).reshape(
            value["shape"])
    if isinstance(value, dict):
        return {k: decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decoded(v) for v in value]
    return value


def flipped(lr: Any) -> Any:
    """A float lr as a float32 tensor of the same value, a tensor lr as its float."""
    return float(lr.item()) if isinstance(lr, torch.Tensor) else torch.tensor(
        lr, dtype=torch.float32)


def json_lr(lr: Any) -> Any:
    if isinstance(lr, torch.Tensor):
        return {"dtype": str(lr.dtype).removeprefix("torch."), "shape": list(lr.shape),
                "data": [lr.item()]}
    return lr


def same(a: Any, b: Any, where: str = "") -> None:
    """Equal values of the same kinds (a tensor where the other holds a tensor), bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), (where, a, b)
        assert a.dtype == b.dtype and torch.equal(a, b), (where, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(map(str, a)) == set(map(str, b)), (where, a, b)
        by_str = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            same(v, by_str[str(k)], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}.{i}")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


class Local:
    """The in-process torch run the session must equal."""

    def __init__(self, lr: Any, scheduler: dict[str, Any] | None) -> None:
        self.p = torch.tensor(P0)
        # (a clone: torch's schedulers fill a tensor lr in place)
        self.opt = torch.optim.Adam([self.p], lr=lr.clone() if isinstance(lr, torch.Tensor)
                                    else lr)
        self.sched: Any = None
        if scheduler is not None:
            self.sched = self._scheduler(scheduler)

    def _scheduler(self, spec: dict[str, Any]) -> Any:
        cls = getattr(torch.optim.lr_scheduler, spec["name"])
        options = dict(spec["options"])
        if "schedulers" in options:
            options["schedulers"] = [self._scheduler(s) for s in options["schedulers"]]
        return cls(self.opt, **options)

    def step(self, grad: list[float]) -> None:
        self.p.grad = torch.tensor(grad)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def state(self) -> dict[str, Any]:
        out = copy.deepcopy(self.opt.state_dict())
        if self.sched is not None:
            out["scheduler"] = copy.deepcopy(self.sched.state_dict())
        return out

    def load(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)
        sched = state.pop("scheduler", None)
        self.opt.load_state_dict(state)
        if sched is not None:
            self.sched.load_state_dict(sched)


class Remote:
    def __init__(self, client: TestClient, lr: Any, scheduler: dict[str, Any] | None) -> None:
        self.c = client
        body: dict[str, Any] = {"optimizer": "Adam", "options": {"lr": json_lr(lr)},
                                "params": {"w": vector(P0)}}
        if scheduler is not None:
            body["scheduler"] = scheduler
        r = client.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        self.sid = r.json()["id"]

    def step(self, grad: list[float]) -> dict[str, Any]:
        r = self.c.post(f"/v1/sessions/{self.sid}/step", json={"grads": {"w": vector(grad)}})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def export(self, accept: str = "application/json") -> Any:
        r = self.c.get(f"/v1/sessions/{self.sid}/state_dict", headers={"accept": accept})
        assert r.status_code == 200, r.text
        return r.content if accept == OCTET else r.json()

    def put(self, body: Any) -> Any:
        if isinstance(body, bytes):
            return self.c.put(f"/v1/sessions/{self.sid}/state_dict", content=body,
                              headers={"content-type": OCTET})
        return self.c.put(f"/v1/sessions/{self.sid}/state_dict", json=body)


def check_equal(remote: Remote, local: Local) -> None:
    """The session's parameters and exported state equal the local run's, bitwise and kind
    for kind (a group's lr and the scheduler's copies of it)."""
    params = remote.c.get(f"/v1/sessions/{remote.sid}/params").json()["params"]["w"]
    assert torch.equal(decoded(params), local.p)
    exported = decoded(remote.export())
    want = local.state()
    for g in exported["param_groups"]:
        g.pop("param_names")
    same(want["state"], {int(k): v for k, v in exported["state"].items()}, "state")
    same(want["param_groups"], exported["param_groups"], "param_groups")
    if local.sched is not None:
        same(want["scheduler"], exported["scheduler"], "scheduler")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "safetensors"])
@pytest.mark.parametrize("start", ["float", "tensor"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_an_import_flipping_the_lr_kind_then_the_earlier_export_as_torch(
        app_client: TestClient, sched: str, start: str, binary: bool) -> None:
    """Step; export; import that state with the group's lr of the other kind (a tensor for a
    number, a number for a tensor); step; import the earlier export (JSON or safetensors);
    step twice: every import is taken and each value equals torch's."""
    lr0: Any = 0.01 if start == "float" else torch.tensor(0.01)
    local, remote = Local(lr0, SCHEDULERS[sched]), Remote(app_client, lr0, SCHEDULERS[sched])
    for r in (local, remote):
        r.step(GRADS[0])
    earlier = remote.export(OCTET if binary else "application/json")
    earlier_local = local.state()
    check_equal(remote, local)

    changed = remote.export()
    changed["param_groups"][0]["lr"] = json_lr(flipped(decoded(changed["param_groups"][0]["lr"])))
    changed_local = local.state()
    changed_local["param_groups"][0]["lr"] = flipped(changed_local["param_groups"][0]["lr"])
    r = remote.put(changed)
    assert r.status_code == 200, r.text
    local.load(changed_local)
    check_equal(remote, local)

    for r in (local, remote):
        r.step(GRADS[1])
    check_equal(remote, local)

    r = remote.put(earlier)
    assert r.status_code == 200, r.text
    local.load(earlier_local)
    check_equal(remote, local)
    for grad in GRADS[2:]:
        answer = remote.step(grad)
        local.step(grad)
        lr = local.opt.param_groups[0]["lr"]
        assert answer["lr"] == [lr.item() if isinstance(lr, torch.Tensor) else lr]
        check_equal(remote, local)


@pytest.mark.parametrize("start", ["float", "tensor"])
def test_an_export_of_the_other_lr_kind_imports_as_in_torch(app_client: TestClient,
                                                             start: str) -> None:
    """A session made with a float lr takes the export of one made with a tensor lr (tensors
    in the groups' ``initial_lr`` and the scheduler's ``base_lrs`` and ``_last_lr``), and the
    other way round, as torch's ``load_state_dict`` does."""
    spec = SCHEDULERS["StepLR"]
    lr0: Any = 0.01 if start == "float" else torch.tensor(0.01)
    other = Remote(app_client, flipped(lr0), spec)
    other.step(GRADS[0])
    given = other.export()
    local, remote = Local(lr0, spec), Remote(app_client, lr0, spec)
    r = remote.put(given)
    assert r.status_code == 200, r.text
    loaded = decoded(copy.deepcopy(given))
    for g in loaded["param_groups"]:
        g.pop("param_names")
    loaded["state"] = {int(k): v for k, v in loaded["state"].items()}
    local.load(loaded)
    check_equal(remote, local)
    for grad in GRADS[1:]:
        remote.step(grad)
        local.step(grad)
        check_equal(remote, local)


@pytest.mark.parametrize(("key", "value"), [
    ("base_lrs", {"dtype": "int64", "shape": [], "data": [1]}),
    ("base_lrs", {"dtype": "float32", "shape": [2], "data": [0.1, 0.2]}),
    ("_last_lr", "0.01"),
])
def test_a_scheduler_lr_that_is_no_lr_is_refused_naming_it(app_client: TestClient, key: str,
                                                           value: Any) -> None:
    """An item of ``base_lrs`` or ``_last_lr`` that is neither a number nor a one-element
    floating tensor (what a group's lr may be) is a 422 naming it; nothing is imported."""
    remote = Remote(app_client, 0.01, SCHEDULERS["StepLR"])
    remote.step(GRADS[0])
    before = remote.export()
    bad = copy.deepcopy(before)
    bad["scheduler"][key][0] = value
    r = remote.put(bad)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "state_mismatch"
    assert r.json()["field"] == f"state_dict.scheduler.{key}.0"
    assert remote.export() == before


def test_a_float_initial_lr_over_a_tensor_one_is_taken_as_in_torch(
        app_client: TestClient) -> None:
    """A scheduler clones a tensor lr into the group's ``initial_lr``; a PATCH giving it a
    float (torch: ``group["initial_lr"] = 0.02``) is taken, and so is the tensor back."""
    spec = SCHEDULERS["StepLR"]
    local, remote = Local(torch.tensor(0.01), spec), Remote(app_client, torch.tensor(0.01), spec)
    for value in (0.02, torch.tensor(0.03)):
        r = app_client.patch(f"/v1/sessions/{remote.sid}/param_groups/0",
                             json={"initial_lr": json_lr(value)})
        assert r.status_code == 200, r.text
        local.opt.param_groups[0]["initial_lr"] = value
        for r in (local, remote):
            r.step(GRADS[0])
        check_equal(remote, local)


def test_a_tensor_lr_into_a_foreach_group_is_refused_naming_the_lr(
        app_client: TestClient) -> None:
    """torch's Adam refuses a tensor lr with ``foreach=True`` (and ``capturable=False``); an
    import giving a foreach group one is a 422 naming the lr it changes (torch's message also
    names ``capurable`` and ``foreach``, which the import left as they were)."""
    r = app_client.post("/v1/sessions", json={"optimizer": "Adam", "options": {
        "lr": 0.01, "foreach": True}, "params": {"w": vector(P0)}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = json_lr(torch.tensor(0.01))
    with pytest.raises(ValueError) as torch_refusal:
        torch.optim.Adam([torch.tensor(P0)], lr=torch.tensor(0.01), foreach=True)
    r = app_client.put(f"/v1/sessions/{sid}/state_dict", json=bad)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_option",
                                                      "state_dict.param_groups.0.lr")
    assert r.json()["detail"] == str(torch_refusal.value)
    assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
